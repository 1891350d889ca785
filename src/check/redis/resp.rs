//! RESP2, the Redis protocol, as far as a check needs it: commands out as
//! arrays of bulk strings, replies in (parsed by offset, one whole reply at a
//! time, [`RespError::Incomplete`] until it has all arrived).
//!
//! A reply that arrives in pieces is first walked by a [`Framer`], which
//! resumes where the previous piece ended, and parsed once when complete:
//! the work is linear in the reply's size however it is split.

/// Largest reply accepted (an `INFO server` reply is ~1-2 KiB).
pub(super) const MAX_REPLY: usize = 1024 * 1024;
/// Deepest array nesting accepted (`ROLE` on a master nests three levels).
const MAX_DEPTH: usize = 8;
/// Longest server text kept in a message.
const MAX_MESSAGE: usize = crate::check::text::MAX_QUOTE;
/// Longest reply line accepted before its CRLF.
const MAX_LINE: usize = 64 * 1024;

/// Why received bytes are not (yet) a RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum RespError {
    /// The bytes so far are the start of a reply; more are needed.
    #[error("incomplete reply")]
    Incomplete,
    /// The bytes cannot start a reply (another protocol answered).
    #[error("not a Redis reply (starts with {0:?})")]
    NotResp(String),
    /// No CRLF within [`MAX_LINE`] bytes.
    #[error("reply line longer than 64 KiB")]
    LineTooLong,
    /// A length or integer that is not a number.
    #[error("invalid length or integer {0:?}")]
    BadInteger(String),
    /// A line longer than an integer can be (a length or an integer reply).
    #[error("length or integer line longer than 32 bytes")]
    IntegerTooLong,
    /// A bulk string length that is negative (other than -1) or too large.
    #[error("invalid bulk length")]
    BadBulkLength,
    /// A bulk string not followed by CRLF.
    #[error("bulk string not terminated by CRLF")]
    Unterminated,
    /// An array length that is negative (other than -1) or too large.
    #[error("invalid array length")]
    BadArrayLength,
    /// Arrays nested deeper than [`MAX_DEPTH`].
    #[error("reply nested too deeply")]
    TooDeep,
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Reply {
    /// `+OK`
    Status(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Int(i64),
    /// `$3\r\nfoo`
    Bulk(Vec<u8>),
    /// `*2\r\n...`
    Array(Vec<Reply>),
    /// `$-1` / `*-1`
    Nil,
}

impl Reply {
    /// A short rendering for messages (never a request argument).
    pub(super) fn describe(&self) -> String {
        let s = match self {
            Reply::Status(s) => format!("+{s}"),
            Reply::Error(e) => format!("-{e}"),
            Reply::Int(i) => format!(":{i}"),
            Reply::Bulk(b) => format!("bulk {:?}", crate::check::text::clip_bytes(b, MAX_MESSAGE)),
            Reply::Array(a) => format!("array of {}", a.len()),
            Reply::Nil => "nil".into(),
        };
        truncate(s)
    }

    /// The text of a bulk or status reply.
    pub(super) fn as_text(&self) -> Option<String> {
        match self {
            Reply::Bulk(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Reply::Status(s) => Some(s.clone()),
            _ => None,
        }
    }
}

/// Cuts server text to a length fit for a message.
pub(super) fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Encodes a command as a RESP array of bulk strings.
pub(super) fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses the reply at the front of `buf`, returning it and how many bytes it
/// took; [`RespError::Incomplete`] when more bytes are needed.
pub(super) fn parse(buf: &[u8]) -> Result<(Reply, usize), RespError> {
    parse_at(buf, 0, 0)
}

/// Parses the reply starting at offset `pos`, nested `depth` arrays deep;
/// returns it and the offset just past it.
fn parse_at(buf: &[u8], pos: usize, depth: usize) -> Result<(Reply, usize), RespError> {
    let rest = &buf[pos..];
    let Some(&kind) = rest.first() else { return Err(RespError::Incomplete) };
    if !matches!(kind, b'+' | b'-' | b':' | b'$' | b'*') {
        return Err(RespError::NotResp(String::from_utf8_lossy(&rest[..rest.len().min(24)]).into_owned()));
    }
    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
        return Err(if rest.len() > MAX_LINE { RespError::LineTooLong } else { RespError::Incomplete });
    };
    let line = String::from_utf8_lossy(&rest[1..eol]).into_owned();
    let after = pos + eol + 2;
    let int = |l: &str| l.parse::<i64>().map_err(|_| RespError::BadInteger(crate::check::text::clip(l, 32)));
    match kind {
        b'+' => Ok((Reply::Status(line), after)),
        b'-' => Ok((Reply::Error(line), after)),
        b':' => Ok((Reply::Int(int(&line)?), after)),
        b'$' => {
            let len = int(&line)?;
            if len == -1 {
                return Ok((Reply::Nil, after));
            }
            let len = usize::try_from(len).ok().filter(|l| *l <= MAX_REPLY).ok_or(RespError::BadBulkLength)?;
            if buf.len() < after + len + 2 {
                return Err(RespError::Incomplete);
            }
            if &buf[after + len..after + len + 2] != b"\r\n" {
                return Err(RespError::Unterminated);
            }
            Ok((Reply::Bulk(buf[after..after + len].to_vec()), after + len + 2))
        }
        _ => {
            let n = int(&line)?;
            if n == -1 {
                return Ok((Reply::Nil, after));
            }
            if depth >= MAX_DEPTH {
                return Err(RespError::TooDeep);
            }
            let n = usize::try_from(n).ok().filter(|n| *n <= MAX_REPLY).ok_or(RespError::BadArrayLength)?;
            let mut items = Vec::with_capacity(n.min(64));
            let mut at = after;
            for _ in 0..n {
                let (item, end) = parse_at(buf, at, depth + 1)?;
                items.push(item);
                at = end;
            }
            Ok((Reply::Array(items), at))
        }
    }
}

/// Longest line an integer or a length can take (`-9223372036854775808`).
const MAX_INT_LINE: usize = 32;

/// Finds where one whole reply ends in bytes that arrive in pieces,
/// resuming each time where it stopped, so that no byte is looked at twice.
#[derive(Debug, Default)]
pub(super) struct Framer {
    /// Offset of the next element to walk.
    pos: usize,
    /// Offset where the search for the current element's CRLF resumes.
    searched: usize,
    /// Items still expected by each open array, innermost last.
    open: Vec<usize>,
}

impl Framer {
    /// Walks `buf` (the reply's bytes so far, from its first byte): the
    /// reply's length once it is complete, `None` while more bytes are needed.
    pub(super) fn advance(&mut self, buf: &[u8]) -> Result<Option<usize>, RespError> {
        loop {
            let rest = &buf[self.pos..];
            let Some(&kind) = rest.first() else { return Ok(None) };
            if !matches!(kind, b'+' | b'-' | b':' | b'$' | b'*') {
                return Err(RespError::NotResp(String::from_utf8_lossy(&rest[..rest.len().min(24)]).into_owned()));
            }
            let from = self.searched.max(self.pos + 1);
            let Some(eol) = buf[from..].windows(2).position(|w| w == b"\r\n").map(|i| from + i) else {
                self.searched = buf.len().saturating_sub(1).max(self.pos + 1);
                let limit = if matches!(kind, b'+' | b'-') { MAX_LINE } else { MAX_INT_LINE };
                return Err(if rest.len() > limit {
                    if limit == MAX_LINE { RespError::LineTooLong } else { RespError::IntegerTooLong }
                } else {
                    // Waiting for the rest of the line.
                    return Ok(None);
                });
            };
            let line = &buf[self.pos + 1..eol];
            if matches!(kind, b':' | b'$' | b'*') && line.len() > MAX_INT_LINE {
                return Err(RespError::IntegerTooLong);
            }
            let int = || {
                std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| l.parse::<i64>().ok())
                    .ok_or_else(|| RespError::BadInteger(String::from_utf8_lossy(line).into_owned()))
            };
            let mut next = eol + 2;
            match kind {
                b':' => {
                    int()?;
                }
                b'$' => {
                    let len = int()?;
                    if len != -1 {
                        let len =
                            usize::try_from(len).ok().filter(|l| *l <= MAX_REPLY).ok_or(RespError::BadBulkLength)?;
                        if buf.len() < next + len + 2 {
                            self.searched = eol;
                            return Ok(None);
                        }
                        if &buf[next + len..next + len + 2] != b"\r\n" {
                            return Err(RespError::Unterminated);
                        }
                        next += len + 2;
                    }
                }
                b'*' => {
                    let n = int()?;
                    if n > 0 {
                        if self.open.len() >= MAX_DEPTH {
                            return Err(RespError::TooDeep);
                        }
                        let n = usize::try_from(n).ok().filter(|n| *n <= MAX_REPLY).ok_or(RespError::BadArrayLength)?;
                        self.open.push(n);
                        self.pos = next;
                        self.searched = next;
                        continue;
                    } else if n < -1 {
                        return Err(RespError::BadArrayLength);
                    }
                }
                _ => {}
            }
            self.pos = next;
            self.searched = next;
            // One element is complete: close the arrays it completes.
            loop {
                match self.open.last_mut() {
                    None => return Ok(Some(self.pos)),
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_and_parse_round_trip() {
        assert_eq!(encode(&[b"PING"]), b"*1\r\n$4\r\nPING\r\n");
        let role = b"*3\r\n$6\r\nmaster\r\n:10\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n$1\r\n0\r\nX";
        let (r, used) = parse(role).unwrap();
        assert_eq!(used, role.len() - 1, "the trailing byte belongs to the next reply");
        let Reply::Array(items) = r else { panic!() };
        assert_eq!(items[0], Reply::Bulk(b"master".to_vec()));
        assert_eq!(items[1], Reply::Int(10));
        assert_eq!(parse(b"$-1\r\n").unwrap().0, Reply::Nil);
        assert_eq!(parse(b"*-1\r\n").unwrap().0, Reply::Nil);
    }

    #[test]
    fn partial_replies_ask_for_more_and_garbage_is_rejected() {
        for partial in [&b""[..], b"+PO", b"$5\r\nhel", b"*2\r\n:1\r\n"] {
            assert_eq!(parse(partial), Err(RespError::Incomplete), "{partial:?}");
        }
        assert!(parse(b"HTTP/1.1 400 Bad Request\r\n").unwrap_err().to_string().contains("not a Redis reply"));
        assert_eq!(parse(b"$3\r\nabcd\r\n"), Err(RespError::Unterminated));
        assert_eq!(parse(b":x\r\n"), Err(RespError::BadInteger("x".into())));
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert_eq!(parse(deep.as_bytes()), Err(RespError::TooDeep));
    }

    #[test]
    fn a_reply_split_anywhere_parses_only_once_complete() {
        let reply = b"*2\r\n$5\r\nhello\r\n*1\r\n:7\r\n";
        for cut in 0..reply.len() {
            assert_eq!(parse(&reply[..cut]), Err(RespError::Incomplete), "cut {cut}");
        }
        let (r, used) = parse(reply).unwrap();
        assert_eq!(used, reply.len());
        assert_eq!(r, Reply::Array(vec![Reply::Bulk(b"hello".to_vec()), Reply::Array(vec![Reply::Int(7)])]));
    }

    #[test]
    fn the_framer_finds_each_reply_end_however_the_bytes_are_split() {
        let reply = b"*3\r\n$5\r\nhello\r\n*2\r\n:7\r\n+OK\r\n*-1\r\n+NEXT\r\n";
        let whole = reply.len() - 7;
        for cut in 0..reply.len() {
            let mut f = Framer::default();
            let first = f.advance(&reply[..cut]).unwrap();
            if cut < whole {
                assert_eq!(first, None, "cut {cut}");
                assert_eq!(f.advance(reply).unwrap(), Some(whole), "cut {cut}");
            } else {
                assert_eq!(first, Some(whole), "cut {cut}");
            }
        }
        assert_eq!(Framer::default().advance(b"$-1\r\n").unwrap(), Some(5));
        assert_eq!(Framer::default().advance(b"*0\r\n").unwrap(), Some(4));
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert_eq!(Framer::default().advance(deep.as_bytes()), Err(RespError::TooDeep));
        let long_int = format!(":{}", "9".repeat(60_000));
        assert_eq!(Framer::default().advance(long_int.as_bytes()), Err(RespError::IntegerTooLong));
        assert!(matches!(Framer::default().advance(b"GARBAGE"), Err(RespError::NotResp(_))));
    }

    /// A large array arriving in small pieces is walked once: each advance
    /// looks only at the new bytes (counted as the offsets it resumes from).
    #[test]
    fn a_large_array_arriving_in_pieces_is_walked_once() {
        let mut reply = b"*20000\r\n".to_vec();
        for _ in 0..20_000 {
            reply.extend_from_slice(b"$4\r\nabcd\r\n");
        }
        let mut f = Framer::default();
        let mut walked_from = Vec::new();
        for end in (1..reply.len()).step_by(7) {
            walked_from.push(f.pos);
            assert_eq!(f.advance(&reply[..end]).unwrap(), None);
            assert!(f.pos <= end && f.searched <= end);
        }
        assert_eq!(f.advance(&reply).unwrap(), Some(reply.len()));
        assert!(walked_from.windows(2).all(|w| w[0] <= w[1]), "the walk never goes back");
    }

    #[test]
    fn long_server_text_is_cut_on_a_char_boundary() {
        let s = truncate("é".repeat(150));
        assert!(s.len() <= MAX_MESSAGE + '…'.len_utf8() && s.ends_with('…'), "{s}");
        assert_eq!(truncate("short".into()), "short");
    }
}
