//! The AMQP 0-9-1 wire format, as far as a health check needs it: frames,
//! field tables, the methods the broker sends ([`Incoming`]) and the methods
//! the check sends ([`Method`]).
//!
//! Received bytes collect in an [`Inbox`], which decodes one whole frame at
//! a time by offset and reports [`WireError::Incomplete`] until a frame is
//! complete.

/// The protocol header a client opens with (AMQP 0-9-1).
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Frame type of a method frame.
const FRAME_METHOD: u8 = 1;
/// Frame type of a content header frame.
const FRAME_HEADER: u8 = 2;
/// Frame type of a content body frame.
const FRAME_BODY: u8 = 3;
/// Frame type of a heartbeat frame.
const FRAME_HEARTBEAT: u8 = 8;
/// The octet every frame ends with.
const FRAME_END: u8 = 0xCE;
/// frame_max healthgate proposes (our frames are tiny), and the largest
/// frame accepted before `connection.tune` settles the real limit.
pub const FRAME_MAX: u32 = 131_072;
/// Bytes of a frame besides its payload (type, channel, size, frame-end).
const FRAME_OVERHEAD: usize = 8;

/// Why received bytes are not (yet) a frame or method healthgate understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The bytes so far are the start of a frame; more are needed.
    #[error("incomplete frame")]
    Incomplete,
    /// The server answered with the protocol header of another AMQP version.
    #[error("the server does not speak AMQP 0-9-1 (it answered with protocol header {0}-{1}-{2})")]
    OtherVersion(u8, u8, u8),
    /// The server started answering with a protocol header (it rejects ours).
    #[error("the server rejected the AMQP 0-9-1 protocol header")]
    HeaderRejected,
    /// The bytes cannot start an AMQP frame (another protocol answered).
    #[error("not an AMQP server (unexpected bytes {0:?})")]
    NotAmqp(String),
    /// A frame announced a payload size beyond the negotiated frame_max.
    #[error("frame of {0} bytes is larger than the negotiated frame_max of {1}")]
    TooLarge(usize, usize),
    /// `connection.start` announced another protocol version.
    #[error("the server announces AMQP {0}-{1}, not 0-9-1")]
    Version(u8, u8),
    /// A frame did not end with the frame-end octet.
    #[error("frame does not end with the frame-end octet")]
    NoFrameEnd,
    /// A method's arguments end early.
    #[error("truncated method frame")]
    Truncated,
    /// A field table holds a value type healthgate does not know.
    #[error("unknown field type {0:?} in a table")]
    UnknownFieldType(char),
}

/// A field value: what a check sends, and what it reads (the rest is skipped).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A long string (`S`).
    Str(String),
    /// A boolean (`t`).
    Bool(bool),
    /// A nested field table (`F`).
    Table(Vec<(String, Value)>),
    /// Any other value (skipped when read, sent as void `V`).
    Other,
}

/// A method the broker sent, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// `connection.start`: the broker's properties and login mechanisms.
    Start {
        /// The `version` server property.
        version: Option<String>,
        /// The `product` server property.
        product: Option<String>,
        /// Space-separated SASL mechanisms.
        mechanisms: String,
    },
    /// `connection.secure`: a SASL challenge.
    Secure,
    /// `connection.tune`: the broker's limits.
    Tune {
        /// Highest channel number (0: no limit).
        channel_max: u16,
        /// Largest frame (0: no limit).
        frame_max: u32,
        /// Proposed heartbeat in seconds.
        heartbeat: u16,
    },
    /// `connection.open-ok`.
    OpenOk,
    /// `connection.close`: the broker ends the connection.
    Close {
        /// Reply code.
        code: u16,
        /// Reply text.
        text: String,
        /// Class of the method that caused it (0: none).
        class: u16,
        /// Method that caused it.
        method: u16,
    },
    /// `connection.close-ok`.
    CloseOk,
    /// `connection.blocked` with its reason (a resource alarm).
    Blocked(String),
    /// `connection.unblocked`.
    Unblocked,
    /// `channel.open-ok`.
    ChannelOpenOk,
    /// `channel.close`: the broker closes a channel.
    ChannelClose {
        /// Reply code.
        code: u16,
        /// Reply text.
        text: String,
    },
    /// `channel.close-ok`.
    ChannelCloseOk,
    /// `queue.declare-ok`.
    DeclareOk {
        /// Messages in the queue.
        messages: u32,
        /// Consumers of the queue.
        consumers: u32,
    },
    /// Any other method (class, method).
    Other(u16, u16),
}

impl Incoming {
    /// Decodes a method frame's payload.
    pub fn decode(payload: &[u8]) -> Result<Incoming, WireError> {
        let mut r = Reader::new(payload);
        let (class, method) = (r.u16()?, r.u16()?);
        Ok(match (class, method) {
            (10, 10) => {
                let (major, minor) = (r.u8()?, r.u8()?);
                if (major, minor) != (0, 9) {
                    return Err(WireError::Version(major, minor));
                }
                let props = r.table()?;
                let get = |k: &str| {
                    props.iter().find_map(|(n, v)| match v {
                        Value::Str(s) if n == k => Some(s.clone()),
                        _ => None,
                    })
                };
                let mechanisms = String::from_utf8_lossy(r.long()?).into_owned();
                Incoming::Start { version: get("version"), product: get("product"), mechanisms }
            }
            (10, 20) => Incoming::Secure,
            (10, 30) => Incoming::Tune { channel_max: r.u16()?, frame_max: r.u32()?, heartbeat: r.u16()? },
            (10, 41) => Incoming::OpenOk,
            (10, 50) => Incoming::Close { code: r.u16()?, text: r.short()?, class: r.u16()?, method: r.u16()? },
            (10, 51) => Incoming::CloseOk,
            (10, 60) => Incoming::Blocked(r.short()?),
            (10, 61) => Incoming::Unblocked,
            (20, 11) => Incoming::ChannelOpenOk,
            (20, 40) => Incoming::ChannelClose { code: r.u16()?, text: r.short()? },
            (20, 41) => Incoming::ChannelCloseOk,
            (50, 11) => {
                let _queue = r.short()?;
                Incoming::DeclareOk { messages: r.u32()?, consumers: r.u32()? }
            }
            (c, m) => Incoming::Other(c, m),
        })
    }

    /// The AMQP name, for messages.
    pub fn name(&self) -> String {
        match self {
            Incoming::Start { .. } => "connection.start".into(),
            Incoming::Secure => "connection.secure".into(),
            Incoming::Tune { .. } => "connection.tune".into(),
            Incoming::OpenOk => "connection.open-ok".into(),
            Incoming::Close { .. } => "connection.close".into(),
            Incoming::CloseOk => "connection.close-ok".into(),
            Incoming::Blocked(_) => "connection.blocked".into(),
            Incoming::Unblocked => "connection.unblocked".into(),
            Incoming::ChannelOpenOk => "channel.open-ok".into(),
            Incoming::ChannelClose { .. } => "channel.close".into(),
            Incoming::ChannelCloseOk => "channel.close-ok".into(),
            Incoming::DeclareOk { .. } => "queue.declare-ok".into(),
            Incoming::Other(c, m) => format!("method {c}.{m}"),
        }
    }
}

/// What a received frame carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A method frame's payload, still encoded (decode with [`Incoming::decode`]).
    Method(Vec<u8>),
    /// A heartbeat, or content (header or body) of nothing a check asked for.
    Other,
}

/// One received frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// The channel it was sent on (0: the connection itself).
    pub channel: u16,
    /// What it carries.
    pub body: Body,
}

/// Bytes received from the broker, decoded one whole frame at a time.
#[derive(Debug)]
pub struct Inbox {
    buf: Vec<u8>,
    /// Where the next undecoded frame starts in `buf`.
    start: usize,
    /// Largest whole frame accepted (the negotiated frame_max).
    max_frame: usize,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox { buf: Vec::new(), start: 0, max_frame: FRAME_MAX as usize }
    }
}

impl Inbox {
    /// Refuses frames larger than `frame_max` from now on (the value
    /// `connection.tune-ok` settled; a frame never needs to be larger).
    pub fn set_max_frame(&mut self, frame_max: u32) {
        self.max_frame = (frame_max as usize).max(4096);
    }

    /// Whether no undecoded byte is waiting.
    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    /// Appends received bytes (first dropping the frames already decoded).
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Decodes the next whole frame; [`WireError::Incomplete`] when its bytes
    /// have not all arrived. Any other error leaves the bytes where they are:
    /// the stream can no longer be framed.
    pub fn next_frame(&mut self) -> Result<Frame, WireError> {
        let buf = &self.buf[self.start..];
        if buf.len() >= 4 && &buf[..4] == b"AMQP" {
            return Err(if buf.len() >= 8 {
                WireError::OtherVersion(buf[5], buf[6], buf[7])
            } else {
                WireError::HeaderRejected
            });
        }
        let Some(&kind) = buf.first() else { return Err(WireError::Incomplete) };
        if ![FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT].contains(&kind) {
            let head: String =
                buf.iter().take(16).map(|&c| if c.is_ascii_graphic() || c == b' ' { c as char } else { '.' }).collect();
            return Err(WireError::NotAmqp(head));
        }
        if buf.len() < 7 {
            return Err(WireError::Incomplete);
        }
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
        if size + FRAME_OVERHEAD > self.max_frame {
            return Err(WireError::TooLarge(size + FRAME_OVERHEAD, self.max_frame));
        }
        if buf.len() < 7 + size + 1 {
            return Err(WireError::Incomplete);
        }
        if buf[7 + size] != FRAME_END {
            return Err(WireError::NoFrameEnd);
        }
        let channel = u16::from_be_bytes([buf[1], buf[2]]);
        let body = if kind == FRAME_METHOD { Body::Method(buf[7..7 + size].to_vec()) } else { Body::Other };
        self.start += 8 + size;
        Ok(Frame { channel, body })
    }
}

/// A method the check sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Method<'a> {
    /// `connection.start-ok`: client properties and the login.
    ConnectionStartOk {
        /// Client properties (product, version, connection name, capabilities).
        properties: &'a [(String, Value)],
        /// The SASL mechanism.
        mechanism: &'a str,
        /// The SASL response (for PLAIN: NUL user NUL password).
        response: &'a [u8],
        /// The locale.
        locale: &'a str,
    },
    /// `connection.tune-ok`: the limits the check accepts.
    ConnectionTuneOk {
        /// Highest channel number.
        channel_max: u16,
        /// Largest frame.
        frame_max: u32,
        /// Heartbeat in seconds (0: none).
        heartbeat: u16,
    },
    /// `connection.open` of a virtual host.
    ConnectionOpen {
        /// The virtual host.
        vhost: &'a str,
    },
    /// `connection.close` (not in reply to any method).
    ConnectionClose {
        /// Reply code.
        code: u16,
        /// Reply text.
        text: &'a str,
    },
    /// `connection.close-ok`.
    ConnectionCloseOk,
    /// `channel.open`.
    ChannelOpen,
    /// `channel.close` (not in reply to any method).
    ChannelClose {
        /// Reply code.
        code: u16,
        /// Reply text.
        text: &'a str,
    },
    /// `channel.close-ok`.
    ChannelCloseOk,
    /// `queue.declare` with no arguments.
    QueueDeclare {
        /// The queue name.
        queue: &'a str,
        /// Only check that the queue exists, never create it.
        passive: bool,
    },
    /// `basic.publish` (neither mandatory nor immediate).
    BasicPublish {
        /// The exchange ("" is the default exchange).
        exchange: &'a str,
        /// The routing key.
        routing_key: &'a str,
    },
}

impl Method<'_> {
    /// Appends this method as one method frame on `channel`.
    pub fn encode(&self, channel: u16, out: &mut Vec<u8>) {
        let mut w = Writer::default();
        match *self {
            Method::ConnectionStartOk { properties, mechanism, response, locale } => {
                w.u16(10).u16(11).table(properties).short(mechanism).long(response).short(locale);
            }
            Method::ConnectionTuneOk { channel_max, frame_max, heartbeat } => {
                w.u16(10).u16(31).u16(channel_max).u32(frame_max).u16(heartbeat);
            }
            Method::ConnectionOpen { vhost } => {
                w.u16(10).u16(40).short(vhost).short("").u8(0);
            }
            Method::ConnectionClose { code, text } => {
                w.u16(10).u16(50).u16(code).short(text).u16(0).u16(0);
            }
            Method::ConnectionCloseOk => {
                w.u16(10).u16(51);
            }
            Method::ChannelOpen => {
                w.u16(20).u16(10).short("");
            }
            Method::ChannelClose { code, text } => {
                w.u16(20).u16(40).u16(code).short(text).u16(0).u16(0);
            }
            Method::ChannelCloseOk => {
                w.u16(20).u16(41);
            }
            Method::QueueDeclare { queue, passive } => {
                w.u16(50).u16(10).u16(0).short(queue).u8(u8::from(passive)).table(&[]);
            }
            Method::BasicPublish { exchange, routing_key } => {
                w.u16(60).u16(40).u16(0).short(exchange).short(routing_key).u8(0);
            }
        }
        frame(out, FRAME_METHOD, channel, &w.0);
    }
}

/// Appends the content header of an empty, property-less basic message
/// (what follows a `basic.publish` with no body).
pub fn encode_empty_message_header(channel: u16, out: &mut Vec<u8>) {
    let mut w = Writer::default();
    // Class basic (60), weight 0, body size 0, no properties.
    w.u16(60).u16(0).u64(0).u16(0);
    frame(out, FRAME_HEADER, channel, &w.0);
}

/// Appends a frame.
fn frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
}

/// Builds method arguments.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A short string; callers pass names already validated to fit 255 bytes.
    fn short(&mut self, s: &str) -> &mut Self {
        let b = &s.as_bytes()[..s.len().min(255)];
        self.0.push(b.len() as u8);
        self.0.extend_from_slice(b);
        self
    }
    fn long(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
    /// A field table of string, boolean and nested-table values.
    fn table(&mut self, fields: &[(String, Value)]) -> &mut Self {
        let mut t = Writer::default();
        for (k, v) in fields {
            t.short(k);
            match v {
                Value::Str(s) => {
                    t.u8(b'S').long(s.as_bytes());
                }
                Value::Bool(b) => {
                    t.u8(b't').u8(u8::from(*b));
                }
                Value::Table(inner) => {
                    t.u8(b'F').table(inner);
                }
                Value::Other => {
                    t.u8(b'V');
                }
            }
        }
        self.long(&t.0)
    }
}

/// Reads method arguments by offset.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or(WireError::Truncated)?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn short(&mut self) -> Result<String, WireError> {
        let n = self.u8()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn long(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn table(&mut self) -> Result<Vec<(String, Value)>, WireError> {
        let n = self.u32()? as usize;
        let mut r = Reader::new(self.take(n)?);
        let mut out = Vec::new();
        while r.pos < r.b.len() {
            let k = r.short()?;
            let v = r.value()?;
            out.push((k, v));
        }
        Ok(out)
    }
    /// One typed field value (RabbitMQ's type letters).
    fn value(&mut self) -> Result<Value, WireError> {
        Ok(match self.u8()? {
            b't' => Value::Bool(self.u8()? != 0),
            b'b' | b'B' => {
                self.take(1)?;
                Value::Other
            }
            b's' | b'u' => {
                self.take(2)?;
                Value::Other
            }
            b'I' | b'i' | b'f' => {
                self.take(4)?;
                Value::Other
            }
            b'l' | b'L' | b'd' | b'T' => {
                self.take(8)?;
                Value::Other
            }
            b'D' => {
                self.take(5)?;
                Value::Other
            }
            b'S' => Value::Str(String::from_utf8_lossy(self.long()?).into_owned()),
            b'x' => {
                self.long()?;
                Value::Other
            }
            b'A' => {
                let n = self.u32()? as usize;
                let mut r = Reader::new(self.take(n)?);
                while r.pos < r.b.len() {
                    r.value()?;
                }
                Value::Other
            }
            b'F' => Value::Table(self.table()?),
            b'V' => Value::Other,
            t => return Err(WireError::UnknownFieldType(t as char)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbox(bytes: &[u8]) -> Inbox {
        let mut i = Inbox::default();
        i.extend(bytes);
        i
    }

    fn decode_one(bytes: &[u8]) -> Incoming {
        match inbox(bytes).next_frame().unwrap().body {
            Body::Method(p) => Incoming::decode(&p).unwrap(),
            b => panic!("{b:?}"),
        }
    }

    #[test]
    fn frames_round_trip_and_garbage_is_a_protocol_error() {
        let mut tune = Writer::default();
        tune.u16(10).u16(30).u16(2047).u32(131072).u16(60);
        let mut buf = Vec::new();
        frame(&mut buf, FRAME_METHOD, 0, &tune.0);
        assert_eq!(inbox(&buf[..5]).next_frame(), Err(WireError::Incomplete));
        let mut i = inbox(&buf);
        let f = i.next_frame().unwrap();
        assert!(i.is_empty());
        assert_eq!(f.channel, 0);
        let Body::Method(payload) = f.body else { panic!("{f:?}") };
        assert_eq!(
            Incoming::decode(&payload).unwrap(),
            Incoming::Tune { channel_max: 2047, frame_max: 131072, heartbeat: 60 }
        );
        let err = inbox(b"HTTP/1.1 400 Bad Request\r\n").next_frame().unwrap_err();
        assert!(err.to_string().contains("not an AMQP server"), "{err}");
        let err = inbox(b"AMQP\x00\x00\x09\x00").next_frame().unwrap_err();
        assert!(err.to_string().contains("0-9-1"), "{err}");
    }

    #[test]
    fn frames_split_anywhere_decode_once_complete_and_in_order() {
        let mut bytes = Vec::new();
        Method::ChannelCloseOk.encode(3, &mut bytes);
        frame(&mut bytes, FRAME_HEARTBEAT, 0, &[]);
        Method::ConnectionClose { code: 320, text: "bye" }.encode(0, &mut bytes);
        for cut in 0..bytes.len() {
            let mut i = inbox(&bytes[..cut]);
            let mut got = Vec::new();
            loop {
                match i.next_frame() {
                    Ok(f) => got.push(f),
                    Err(WireError::Incomplete) => break,
                    Err(e) => panic!("cut {cut}: {e}"),
                }
            }
            i.extend(&bytes[cut..]);
            while let Ok(f) = i.next_frame() {
                got.push(f);
            }
            assert!(i.is_empty(), "cut {cut}");
            let channels: Vec<u16> = got.iter().map(|f| f.channel).collect();
            assert_eq!(channels, [3, 0, 0], "cut {cut}");
            assert_eq!(got[1].body, Body::Other);
            let Body::Method(p) = &got[2].body else { panic!() };
            assert_eq!(
                Incoming::decode(p).unwrap(),
                Incoming::Close { code: 320, text: "bye".into(), class: 0, method: 0 }
            );
        }
    }

    #[test]
    fn frames_beyond_the_negotiated_frame_max_are_refused_from_their_header() {
        let mut i = Inbox::default();
        i.set_max_frame(4096);
        // Only the header has arrived: the size alone refuses the frame.
        i.extend(&[FRAME_BODY, 0, 1, 0, 0, 0x10, 0x00]);
        assert_eq!(i.next_frame(), Err(WireError::TooLarge(4096 + 8, 4096)));
        let mut i = Inbox::default();
        i.extend(&[FRAME_BODY, 0, 1, 0, 0x40, 0, 0]);
        assert!(matches!(i.next_frame(), Err(WireError::TooLarge(..))), "4 MiB before tune");
    }

    #[test]
    fn a_start_announcing_another_version_is_refused() {
        let mut start = Writer::default();
        start.u16(10).u16(10).u8(1).u8(0).u32(0).long(b"PLAIN").long(b"en_US");
        assert_eq!(Incoming::decode(&start.0), Err(WireError::Version(1, 0)));
    }

    #[test]
    fn a_truncated_method_and_an_unknown_field_type_are_errors() {
        assert_eq!(Incoming::decode(&[0, 10, 0]), Err(WireError::Truncated));
        let mut start = Writer::default();
        start.u16(10).u16(10).u8(0).u8(9).u32(3).short("k").u8(b'?');
        assert_eq!(Incoming::decode(&start.0), Err(WireError::UnknownFieldType('?')));
    }

    #[test]
    fn start_reads_version_through_every_field_type() {
        let mut props = Writer::default();
        // A table with types a broker may send, then the strings we want.
        let mut t = Writer::default();
        t.short("n").u8(b'I').u32(7);
        t.short("arr").u8(b'A').u32(5).u8(b's').u16(1).u8(b'V').u8(b'V');
        t.short("x").u8(b'l').u64(1);
        t.short("capabilities").u8(b'F').table(&[("publisher_confirms".into(), Value::Bool(true))]);
        t.short("product").u8(b'S').long(b"RabbitMQ");
        t.short("version").u8(b'S').long(b"3.10.8");
        props.long(&t.0);
        let mut start = Writer::default();
        start.u16(10).u16(10).u8(0).u8(9);
        start.0.extend_from_slice(&props.0);
        start.long(b"AMQPLAIN PLAIN").long(b"en_US");
        match Incoming::decode(&start.0).unwrap() {
            Incoming::Start { version, product, mechanisms } => {
                assert_eq!(version.as_deref(), Some("3.10.8"));
                assert_eq!(product.as_deref(), Some("RabbitMQ"));
                assert_eq!(mechanisms, "AMQPLAIN PLAIN");
            }
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn outgoing_methods_encode_the_bytes_the_broker_expects() {
        let mut out = Vec::new();
        Method::QueueDeclare { queue: "q", passive: true }.encode(5, &mut out);
        assert_eq!(out, b"\x01\x00\x05\x00\x00\x00\x0d\x00\x32\x00\x0a\x00\x00\x01q\x01\x00\x00\x00\x00\xce");
        out.clear();
        encode_empty_message_header(5, &mut out);
        assert_eq!(out, b"\x02\x00\x05\x00\x00\x00\x0e\x00\x3c\x00\x00\0\0\0\0\0\0\0\0\x00\x00\xce");
        let props = [("capabilities".to_string(), Value::Table(vec![("x".into(), Value::Bool(true))]))];
        let start_ok =
            Method::ConnectionStartOk { properties: &props, mechanism: "PLAIN", response: b"\0u\0p", locale: "en_US" };
        out.clear();
        start_ok.encode(0, &mut out);
        let mut r = Reader::new(&out[7..out.len() - 1]);
        assert_eq!((r.u16().unwrap(), r.u16().unwrap()), (10, 11));
        assert_eq!(r.table().unwrap(), props);
        assert_eq!(r.short().unwrap(), "PLAIN");
        assert_eq!(r.long().unwrap(), b"\0u\0p");
        assert_eq!(r.short().unwrap(), "en_US");
        for (m, name) in [
            (Method::ConnectionCloseOk, "connection.close-ok"),
            (Method::ChannelOpen, "channel.open"),
            (Method::ChannelCloseOk, "channel.close-ok"),
        ] {
            out.clear();
            m.encode(0, &mut out);
            assert_eq!(*out.last().unwrap(), FRAME_END, "{name}");
        }
        // What the broker sends back decodes with the same codec.
        out.clear();
        Method::ChannelClose { code: 200, text: "" }.encode(1, &mut out);
        assert_eq!(decode_one(&out), Incoming::ChannelClose { code: 200, text: String::new() });
    }
}
