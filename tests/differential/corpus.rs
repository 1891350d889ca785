//! The differential corpus format (`tests/differential/cases.txt`).
//!
//! A case starts with `[name]`; then one directive per line, `key: value`
//! or a bare `key`. Byte values are exact: nothing is added, line ends are
//! written as `\r\n` (`\r`, `\n`, `\t`, `\\`, `\xNN` are escapes) and
//! `{{N*text}}` repeats `text` N times. Consecutive `client:` (or `app:`)
//! lines are concatenated into one send. `#` starts a comment line.
//!
//! Client directives, run in order: `client:` send bytes; `client-pause: ms`;
//! `client-await-head` wait (up to 2 s) for a response head; `client-if-NNN:`
//! sends bytes only if that awaited head had status NNN;
//! `client-shutdown` half-closes (SHUT_WR); `client-close` closes at once.
//!
//! App directives (its reply to the first request; `app-next` starts the
//! reply to the next one; requests past the last reply get `200 ok`):
//! `app:` send bytes; `app-pause: ms`; `app-early` starts this reply as soon
//! as the head arrived; `app-await-body` then reads the body; `app-close`
//! closes the connection; `app-tunnel` echoes every later byte (after a 101).
//!
//! Outcome directives: `differs: aspect, ...` (aspects `status`, `framing`,
//! `conn`, `app`) with `reason:` (why healthgate's answer is the better or an
//! equally valid one, with the RFC section); or `defect: N` for a known
//! healthgate defect being fixed. `note:` is free text.

use std::collections::BTreeSet;

/// One step of the client.
#[derive(Debug, Clone)]
pub enum ClientStep {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Wait this many milliseconds.
    Pause(u64),
    /// Wait for a response head.
    AwaitHead,
    /// Write these bytes if the awaited head had this status.
    SendIf(u16, Vec<u8>),
    /// shutdown(SHUT_WR).
    Shutdown,
    /// Close the connection at once.
    Close,
}

/// One action of the app's reply to a request.
#[derive(Debug, Clone)]
pub enum AppStep {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Wait this many milliseconds.
    Pause(u64),
    /// Read the request body to its end (after `app-early`).
    AwaitBody,
    /// Close the connection.
    Close,
    /// Echo every later byte.
    Tunnel,
}

/// The app's reply to one request.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// Start as soon as the head arrived (the body is read only on `AwaitBody`).
    pub early: bool,
    /// Actions in order.
    pub steps: Vec<AppStep>,
}

/// The reply to requests past the script.
pub fn default_reply() -> Reply {
    Reply { early: false, steps: vec![AppStep::Send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec())] }
}

/// One case.
#[derive(Debug, Clone, Default)]
pub struct Case {
    /// Unique name.
    pub name: String,
    /// Free text.
    pub note: String,
    /// What the client does.
    pub client: Vec<ClientStep>,
    /// The app's replies, one per request in arrival order.
    pub replies: Vec<Reply>,
    /// Aspects expected to differ.
    pub differs: BTreeSet<String>,
    /// Why they differ.
    pub reason: String,
    /// A known healthgate defect this case shows.
    pub defect: Option<String>,
}

impl Case {
    /// Every byte the client may send, in order (for counting its requests).
    pub fn client_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for s in &self.client {
            match s {
                ClientStep::Send(b) | ClientStep::SendIf(_, b) => out.extend_from_slice(b),
                _ => {}
            }
        }
        out
    }

    /// Status codes the app's script can send (a response with any other code came from the proxy).
    pub fn app_statuses(&self) -> BTreeSet<u16> {
        let mut out = BTreeSet::new();
        for r in self.replies.iter().chain(std::iter::once(&default_reply())) {
            for s in &r.steps {
                if let AppStep::Send(b) = s {
                    let t = String::from_utf8_lossy(b);
                    for (i, _) in t.match_indices("HTTP/1.") {
                        if let Some(code) = t.get(i + 9..i + 12).and_then(|c| c.parse().ok()) {
                            out.insert(code);
                        }
                    }
                }
            }
        }
        out
    }
}

/// The aspects a case can declare as different.
pub const ASPECTS: [&str; 4] = ["status", "framing", "conn", "app"];

/// Decodes escapes and repetitions of a byte value.
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut expanded = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("{{") {
        expanded.push_str(&rest[..i]);
        let end = rest[i..].find("}}").ok_or("unclosed {{")? + i;
        let (n, text) = rest[i + 2..end].split_once('*').ok_or("{{N*text}} expected")?;
        let n: usize = n.trim().parse().map_err(|_| format!("bad repeat count {n:?}"))?;
        expanded.push_str(&text.repeat(n));
        rest = &rest[end + 2..];
    }
    expanded.push_str(rest);
    let b = expanded.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex = expanded.get(i + 2..i + 4).ok_or("short \\x escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad \\x{hex}"))?);
                i += 2;
            }
            other => return Err(format!("unknown escape \\{}", other.map(|&c| c as char).unwrap_or(' '))),
        }
        i += 2;
    }
    Ok(out)
}

/// Parses the corpus; errors name the line.
pub fn parse(text: &str) -> Result<Vec<Case>, String> {
    let mut cases: Vec<Case> = Vec::new();
    let mut last_key = String::new();
    for (n, raw) in text.lines().enumerate() {
        let at = |e: String| format!("cases.txt line {}: {e}", n + 1);
        let line = raw.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if cases.iter().any(|c| c.name == name) {
                return Err(at(format!("duplicate case {name}")));
            }
            cases.push(Case { name: name.to_string(), ..Case::default() });
            last_key.clear();
            continue;
        }
        let case = cases.last_mut().ok_or_else(|| at("directive before the first [case]".into()))?;
        let (key, value) = match line.split_once(": ") {
            Some((k, v)) => (k, v),
            None => (line.trim_end_matches(':'), ""),
        };
        let bytes = || unescape(value).map_err(at);
        let ms = || value.trim().parse::<u64>().map_err(|_| at(format!("{key} needs milliseconds")));
        let reply = |c: &mut Case| {
            if c.replies.is_empty() {
                c.replies.push(Reply::default());
            }
        };
        match key {
            "note" => case.note = value.to_string(),
            "reason" => case.reason = value.to_string(),
            "defect" => case.defect = Some(value.trim().to_string()),
            "differs" => {
                for a in value.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                    if !ASPECTS.contains(&a) {
                        return Err(at(format!("unknown aspect {a:?}")));
                    }
                    case.differs.insert(a.to_string());
                }
            }
            "client" => {
                let b = bytes()?;
                match case.client.last_mut() {
                    Some(ClientStep::Send(prev)) if last_key == "client" => prev.extend_from_slice(&b),
                    _ => case.client.push(ClientStep::Send(b)),
                }
            }
            "client-pause" => case.client.push(ClientStep::Pause(ms()?)),
            "client-await-head" => case.client.push(ClientStep::AwaitHead),
            k if k.starts_with("client-if-") => {
                let code = k["client-if-".len()..].parse().map_err(|_| at(format!("{k}: status code expected")))?;
                case.client.push(ClientStep::SendIf(code, bytes()?));
            }
            "client-shutdown" => case.client.push(ClientStep::Shutdown),
            "client-close" => case.client.push(ClientStep::Close),
            "app" => {
                reply(case);
                let b = bytes()?;
                let steps = &mut case.replies.last_mut().unwrap().steps;
                match steps.last_mut() {
                    Some(AppStep::Send(prev)) if last_key == "app" => prev.extend_from_slice(&b),
                    _ => steps.push(AppStep::Send(b)),
                }
            }
            "app-pause" | "app-await-body" | "app-close" | "app-tunnel" | "app-early" => {
                reply(case);
                let r = case.replies.last_mut().unwrap();
                match key {
                    "app-pause" => r.steps.push(AppStep::Pause(ms()?)),
                    "app-await-body" => r.steps.push(AppStep::AwaitBody),
                    "app-close" => r.steps.push(AppStep::Close),
                    "app-tunnel" => r.steps.push(AppStep::Tunnel),
                    _ => r.early = true,
                }
            }
            "app-next" => {
                reply(case);
                case.replies.push(Reply::default());
            }
            _ => return Err(at(format!("unknown directive {key:?}"))),
        }
        last_key = key.to_string();
    }
    for c in &cases {
        if c.client.is_empty() {
            return Err(format!("case {}: no client bytes", c.name));
        }
        if !c.differs.is_empty() && c.reason.is_empty() {
            return Err(format!("case {}: `differs` without a `reason`", c.name));
        }
        if c.differs.is_empty() && !c.reason.is_empty() {
            return Err(format!("case {}: `reason` without `differs`", c.name));
        }
        if c.defect.is_some() && !c.differs.is_empty() {
            return Err(format!("case {}: a known defect is not explained", c.name));
        }
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_repeats_are_exact() {
        assert_eq!(unescape(r"a\r\n{{3*xy}}\x00\\").unwrap(), b"a\r\nxyxyxy\x00\\".to_vec());
    }
}
