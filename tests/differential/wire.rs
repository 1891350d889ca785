//! HTTP/1.1 message framing for the differential suite: just enough parsing
//! to know where a request or a response ends, decode a chunked body and
//! name the framing, on both sides of a proxy. Lenient where real peers are
//! lenient (bare LF line ends); a message it cannot frame is `Bad`, and the
//! caller falls back to a quiet-time read.

/// Result of trying to parse one message at the start of a buffer.
#[derive(Debug)]
pub enum Parse<T> {
    /// A whole message and how many bytes it took.
    Done(T, usize),
    /// Not enough bytes yet.
    Partial,
    /// Bytes that cannot be framed.
    Bad(&'static str),
}

/// A message head: start line and headers (names lowercased, obs-fold joined).
#[derive(Debug, Clone)]
pub struct Head {
    /// The start line, without its line end.
    pub start: String,
    /// Header fields in order: (lowercased name, value trimmed of spaces).
    pub headers: Vec<(String, String)>,
    /// Bytes the head took, empty line included.
    pub len: usize,
}

impl Head {
    /// Every value of header `name`, in order.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect()
    }

    /// The comma-separated list elements of every `name` field, lowercased.
    pub fn tokens(&self, name: &str) -> Vec<String> {
        self.all(name)
            .iter()
            .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()).collect::<Vec<_>>())
            .filter(|t| !t.is_empty())
            .collect()
    }
}

/// Finds the end of a head (an empty line, CRLF or bare LF) and parses it.
pub fn parse_head(buf: &[u8]) -> Parse<Head> {
    let mut i = 0;
    let mut lines: Vec<&[u8]> = Vec::new();
    loop {
        let Some(nl) = buf[i..].iter().position(|&b| b == b'\n') else { return Parse::Partial };
        let mut line = &buf[i..i + nl];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        i += nl + 1;
        if line.is_empty() {
            if lines.is_empty() {
                // Leading empty lines before a request line are ignored (RFC 9112 §2.2).
                continue;
            }
            break;
        }
        lines.push(line);
    }
    let start = String::from_utf8_lossy(lines[0]).into_owned();
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in &lines[1..] {
        if matches!(line.first(), Some(b' ' | b'\t')) {
            if let Some(last) = headers.last_mut() {
                last.1.push(' ');
                last.1.push_str(String::from_utf8_lossy(line).trim());
            }
            continue;
        }
        let text = String::from_utf8_lossy(line);
        match text.split_once(':') {
            Some((n, v)) => headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string())),
            None => headers.push((text.trim().to_ascii_lowercase(), String::new())),
        }
    }
    Parse::Done(Head { start, headers, len: i }, i)
}

/// How a message body is delimited.
#[derive(Debug, Clone, PartialEq)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked` (last coding).
    Chunked,
    /// Ends when the connection closes (responses only).
    Close,
}

impl Framing {
    /// A short name for reports.
    pub fn name(&self) -> String {
        match self {
            Framing::None => "none".into(),
            Framing::Length(n) => format!("length {n}"),
            Framing::Chunked => "chunked".into(),
            Framing::Close => "close-delimited".into(),
        }
    }
}

/// The single value of a (possibly repeated or listed) Content-Length, if all agree.
fn content_length(head: &Head) -> Option<Result<u64, &'static str>> {
    let values = head.tokens("content-length");
    let first = values.first()?;
    if values.iter().any(|v| v != first) {
        return Some(Err("differing content-length"));
    }
    Some(first.parse::<u64>().map_err(|_| "invalid content-length"))
}

/// Body framing of a request head (RFC 9112 §6.3, requests have no close-delimited body).
pub fn request_framing(head: &Head) -> Result<Framing, &'static str> {
    let te = head.tokens("transfer-encoding");
    if !te.is_empty() {
        return if te.last().map(String::as_str) == Some("chunked") {
            Ok(Framing::Chunked)
        } else {
            Err("unframed transfer-encoding")
        };
    }
    match content_length(head) {
        None => Ok(Framing::None),
        Some(Ok(0)) => Ok(Framing::None),
        Some(Ok(n)) => Ok(Framing::Length(n)),
        Some(Err(e)) => Err(e),
    }
}

/// Body framing of a response head to a request with `method` (RFC 9112 §6.3).
pub fn response_framing(status: u16, method: &str, head: &Head) -> Result<Framing, &'static str> {
    if method.eq_ignore_ascii_case("HEAD") || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::None);
    }
    let te = head.tokens("transfer-encoding");
    if !te.is_empty() {
        return Ok(if te.last().map(String::as_str) == Some("chunked") { Framing::Chunked } else { Framing::Close });
    }
    match content_length(head) {
        None => Ok(Framing::Close),
        Some(Ok(n)) => Ok(Framing::Length(n)),
        Some(Err(e)) => Err(e),
    }
}

/// Decodes a chunked body at the start of `buf`: (payload, trailer fields, bytes used).
pub fn parse_chunked(buf: &[u8]) -> Parse<(Vec<u8>, Vec<String>)> {
    let mut i = 0;
    let mut body = Vec::new();
    loop {
        let Some(nl) = buf[i..].iter().position(|&b| b == b'\n') else { return Parse::Partial };
        let line = String::from_utf8_lossy(&buf[i..i + nl]).trim_end_matches('\r').to_string();
        i += nl + 1;
        let size_text = line.split(';').next().unwrap_or("").trim();
        if size_text.is_empty() || size_text.len() > 15 || !size_text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Parse::Bad("bad chunk size");
        }
        let size = u64::from_str_radix(size_text, 16).unwrap_or(u64::MAX) as usize;
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let Some(nl) = buf[i..].iter().position(|&b| b == b'\n') else { return Parse::Partial };
                let line = String::from_utf8_lossy(&buf[i..i + nl]).trim_end_matches('\r').to_string();
                i += nl + 1;
                if line.is_empty() {
                    return Parse::Done((body, trailers), i);
                }
                trailers.push(line.to_ascii_lowercase());
            }
        }
        if buf.len() < i + size {
            return Parse::Partial;
        }
        body.extend_from_slice(&buf[i..i + size]);
        i += size;
        match &buf[i..] {
            [b'\r', b'\n', ..] => i += 2,
            [b'\n', ..] => i += 1,
            [] | [b'\r'] => return Parse::Partial,
            _ => return Parse::Bad("chunk not followed by a line end"),
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Its head.
    pub head: Head,
    /// Its framing.
    pub framing: Framing,
    /// Payload (chunked decoded).
    pub body: Vec<u8>,
}

impl Request {
    /// The method (first word of the request line).
    pub fn method(&self) -> String {
        self.head.start.split(' ').next().unwrap_or("").to_string()
    }
}

/// Parses one whole request (head and body) at the start of `buf`.
pub fn parse_request(buf: &[u8]) -> Parse<Request> {
    let head = match parse_head(buf) {
        Parse::Done(h, _) => h,
        Parse::Partial => return Parse::Partial,
        Parse::Bad(e) => return Parse::Bad(e),
    };
    let framing = match request_framing(&head) {
        Ok(f) => f,
        Err(e) => return Parse::Bad(e),
    };
    let rest = &buf[head.len..];
    match framing {
        Framing::None | Framing::Close => {
            let len = head.len;
            Parse::Done(Request { head, framing: Framing::None, body: Vec::new() }, len)
        }
        Framing::Length(n) => {
            let n = n as usize;
            if rest.len() < n {
                return Parse::Partial;
            }
            let len = head.len + n;
            Parse::Done(Request { body: rest[..n].to_vec(), head, framing }, len)
        }
        Framing::Chunked => match parse_chunked(rest) {
            Parse::Done((body, _), used) => {
                let len = head.len + used;
                Parse::Done(Request { head, framing, body }, len)
            }
            Parse::Partial => Parse::Partial,
            Parse::Bad(e) => Parse::Bad(e),
        },
    }
}

/// Methods of every request in `bytes` that frames cleanly, and whether all of it did.
pub fn request_methods(mut bytes: &[u8]) -> (Vec<String>, bool) {
    let mut methods = Vec::new();
    while !bytes.iter().all(|b| b.is_ascii_whitespace()) {
        match parse_request(bytes) {
            Parse::Done(r, used) => {
                methods.push(r.method());
                bytes = &bytes[used..];
            }
            _ => {
                if let Parse::Done(h, _) = parse_head(bytes) {
                    methods.push(h.start.split(' ').next().unwrap_or("").to_string());
                }
                return (methods, false);
            }
        }
    }
    (methods, true)
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Its head.
    pub head: Head,
    /// Protocol version in the status line.
    pub version: String,
    /// Status code (0 when unreadable).
    pub status: u16,
    /// Its framing.
    pub framing: Framing,
    /// Payload (chunked decoded).
    pub body: Vec<u8>,
}

/// Parses one response at the start of `buf` for a request with `method`.
/// `eof` says no more bytes will come (a close-delimited body ends there).
pub fn parse_response(buf: &[u8], method: &str, eof: bool) -> Parse<Response> {
    let head = match parse_head(buf) {
        Parse::Done(h, _) => h,
        Parse::Partial => return Parse::Partial,
        Parse::Bad(e) => return Parse::Bad(e),
    };
    let mut words = head.start.splitn(3, ' ');
    let version = words.next().unwrap_or("").to_string();
    if !version.starts_with("HTTP/") {
        return Parse::Bad("not a status line");
    }
    let status = words.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let framing = match response_framing(status, method, &head) {
        Ok(f) => f,
        Err(e) => return Parse::Bad(e),
    };
    let rest = &buf[head.len..];
    let (body, used) = match &framing {
        Framing::None => (Vec::new(), 0),
        Framing::Length(n) => {
            let n = *n as usize;
            if rest.len() < n {
                return Parse::Partial;
            }
            (rest[..n].to_vec(), n)
        }
        Framing::Chunked => match parse_chunked(rest) {
            Parse::Done((b, _), used) => (b, used),
            Parse::Partial => return Parse::Partial,
            Parse::Bad(e) => return Parse::Bad(e),
        },
        Framing::Close => {
            if !eof {
                return Parse::Partial;
            }
            (rest.to_vec(), rest.len())
        }
    };
    let len = head.len + used;
    Parse::Done(Response { head, version, status, framing, body }, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_request_with_extension_and_trailer_is_decoded() {
        let raw =
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\nGET";
        let Parse::Done(r, used) = parse_request(raw) else { panic!() };
        assert_eq!((r.body.as_slice(), r.framing, &raw[used..]), (&b"abc"[..], Framing::Chunked, &b"GET"[..]));
    }

    #[test]
    fn pipelined_methods_are_counted() {
        let (m, ok) = request_methods(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nHEAD / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!((m, ok), (vec!["GET".to_string(), "HEAD".to_string()], true));
    }

    #[test]
    fn head_response_has_no_body_and_close_delimited_waits_for_eof() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        assert!(matches!(parse_response(raw, "HEAD", false), Parse::Done(_, 38)));
        let raw = b"HTTP/1.1 200 OK\r\n\r\nabc";
        assert!(matches!(parse_response(raw, "GET", false), Parse::Partial));
        assert!(matches!(parse_response(raw, "GET", true), Parse::Done(r, _) if r.body == b"abc"));
    }
}
