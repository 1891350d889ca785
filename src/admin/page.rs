//! The status page (`GET /` on the admin port): what the sidecar sees, for a
//! human, from the same document as `/status`.
//!
//! Server-rendered HTML with an inline stylesheet and no script (a `<meta>`
//! refresh reloads it every few seconds) and no external asset, so it works
//! offline through `kubectl port-forward`. The Content-Security-Policy allows
//! nothing but that one stylesheet (by nonce), and every value is escaped:
//! a dependency's error text is whatever its server said.

use std::fmt::Write;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::Value;

use crate::state::History;

/// Seconds between automatic reloads.
pub const REFRESH_SECONDS: u32 = 5;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as escaped display text (`—` for null).
fn v(value: &Value) -> String {
    match value {
        Value::Null => "—".into(),
        Value::String(s) => escape(s),
        other => escape(&other.to_string()),
    }
}

/// A short human duration: `45s`, `12m 3s`, `5h 2m`, `3d 4h`.
pub fn ago(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// Banner text and color class of a service state.
fn banner(state: &str) -> (&'static str, &'static str) {
    match state {
        "in_service" => ("IN SERVICE", "ok"),
        "degraded" => ("DEGRADED", "warn"),
        "out_of_service" => ("OUT OF SERVICE", "bad"),
        "starting" => ("STARTING", "info"),
        "draining" => ("DRAINING", "op"),
        "maintenance" => ("MAINTENANCE", "op"),
        _ => ("UNKNOWN", "info"),
    }
}

/// Color class of a dependency verdict.
fn verdict_class(state: &str) -> &'static str {
    match state {
        "up" => "ok",
        "down" => "bad",
        _ => "info",
    }
}

const CSS: &str = r#"
:root{--ok:#1a7f37;--warn:#b35900;--bad:#c62828;--info:#1f5fa8;--op:#6f42c1;--fg:#1f2328;--mut:#59636e;--bg:#f6f8fa;--card:#fff;--line:#d1d9e0}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--mut:#9198a1;--bg:#0d1117;--card:#151b23;--line:#3d444d}}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1100px;margin:0 auto;padding:12px}
.banner{color:#fff;border-radius:8px;padding:14px 18px;margin-bottom:14px}
.banner h1{margin:0;font-size:1.6em;letter-spacing:.04em}
.banner p{margin:4px 0 0;opacity:.95}
.banner.ok{background:var(--ok)}.banner.warn{background:var(--warn)}.banner.bad{background:var(--bad)}.banner.info{background:var(--info)}.banner.op{background:var(--op)}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px;margin-bottom:14px;overflow-x:auto}
h2{font-size:1.05em;margin:2px 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 8px;border-top:1px solid var(--line);vertical-align:top}
th{font-size:.8em;text-transform:uppercase;color:var(--mut);border-top:0}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:.85em;font-weight:600}
.pill.ok{background:var(--ok)}.pill.bad{background:var(--bad)}.pill.info{background:var(--info)}.pill.op{background:var(--op)}.pill.warn{background:var(--warn)}
.mut{color:var(--mut);font-size:.88em}
.msg{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;word-break:break-word;max-width:32em}
.s-ok{fill:var(--ok)}.s-fail{fill:var(--bad)}
.override{border-left:4px solid var(--op);padding:4px 10px;margin:6px 0;list-style:none}
ul{padding:0;margin:0}
footer{color:var(--mut);font-size:.85em;text-align:center;padding:8px}
a{color:inherit}
@media (max-width:700px){
 thead{display:none}
 table,tbody,tr,td{display:block;width:100%}
 tr{border-top:1px solid var(--line);padding:6px 0}
 td{border:0;padding:2px 4px}
 td[data-label]::before{content:attr(data-label) ": ";color:var(--mut);font-size:.85em}
 .banner h1{font-size:1.3em}
}
"#;

/// The sparkline of the last checks: one bar per check, height by latency,
/// red for a failure.
pub fn sparkline(history: &History) -> String {
    if history.is_empty() {
        return "<span class=\"mut\">no checks yet</span>".into();
    }
    let (w, h, bar) = (160.0f32, 28.0f32, 4.0f32);
    let max = history.iter().map(|(_, ms)| ms).fold(1.0f32, f32::max);
    let mut out = format!(
        "<svg class=\"spark\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"last {} checks\">",
        history.len()
    );
    for (i, (ok, ms)) in history.iter().enumerate() {
        let bh = if ok { (ms / max * (h - 4.0)).max(3.0) } else { h };
        let _ = write!(
            out,
            "<rect class=\"{}\" x=\"{}\" y=\"{:.1}\" width=\"{}\" height=\"{:.1}\"><title>{:.1} ms{}</title></rect>",
            if ok { "s-ok" } else { "s-fail" },
            i as f32 * bar,
            h - bh,
            bar - 1.0,
            bh,
            ms,
            if ok { "" } else { ", failed" }
        );
    }
    out.push_str("</svg>");
    out
}

/// The page for a `/status` document and each dependency's recent checks.
pub fn render(status: &Value, histories: &[History]) -> (String, String) {
    let nonce = format!("{:032x}", rand::random::<u128>());
    let svc = &status["service"];
    let state = svc["state"].as_str().unwrap_or("unknown");
    let (title, class) = banner(state);
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>{title} · healthgate</title><style nonce=\"{nonce}\">{CSS}</style></head><body><main>"
    );
    let _ = write!(
        h,
        "<header id=\"banner\" class=\"banner {class}\" data-state=\"{}\"><h1>{title}</h1><p>for {} (since {}) · readiness {}</p></header>",
        escape(state),
        ago(svc["for_seconds"].as_f64().unwrap_or(0.0)),
        v(&svc["since"]),
        if svc["ready"].as_bool() == Some(true) { "passing" } else { "failing" },
    );
    overrides(&mut h, &status["overrides"]);
    dependencies(&mut h, status, histories);
    listeners(&mut h, status);
    let _ = write!(
        h,
        "<footer>healthgate {} · up {} · reloads every {REFRESH_SECONDS} s · <a href=\"/status\">/status</a> · <a href=\"/metrics\">/metrics</a></footer></main></body></html>",
        v(&status["version"]),
        ago(status["uptime_seconds"].as_f64().unwrap_or(0.0)),
    );
    (h, nonce)
}

fn overrides(h: &mut String, o: &Value) {
    let deps = o["dependencies"].as_array().map(Vec::as_slice).unwrap_or_default();
    if o["mode"].is_null() && deps.is_empty() {
        return;
    }
    h.push_str("<section id=\"overrides\"><h2>Active overrides</h2><ul>");
    let line = |h: &mut String, what: String, g: &Value| {
        let _ = write!(
            h,
            "<li class=\"override\"><strong>{what}</strong> — {} <span class=\"mut\">by {} · expires {} (in {})</span></li>",
            v(&g["reason"]),
            v(&g["by"]),
            v(&g["expires_at"]),
            ago(g["expires_in_seconds"].as_f64().unwrap_or(0.0)),
        );
    };
    if !o["mode"].is_null() {
        line(h, format!("pod: {}", v(&o["mode"]["mode"])), &o["mode"]);
    }
    for d in deps {
        line(h, format!("{} forced {}", v(&d["dependency"]), v(&d["force"])), d);
    }
    h.push_str("</ul></section>");
}

fn dependencies(h: &mut String, status: &Value, histories: &[History]) {
    let deps = status["dependencies"].as_array().map(Vec::as_slice).unwrap_or_default();
    let _ = write!(h, "<section><h2>Dependencies ({})</h2>", deps.len());
    if deps.is_empty() {
        h.push_str("<p class=\"mut\">none configured</p></section>");
        return;
    }
    h.push_str(
        "<table id=\"dependencies\"><thead><tr><th>dependency</th><th>state</th><th>last cause</th><th>since</th><th>latency</th><th>last checks</th></tr></thead><tbody>",
    );
    for (i, d) in deps.iter().enumerate() {
        let state = d["state"].as_str().unwrap_or("unknown");
        let checked = d["checked_state"].as_str().unwrap_or(state);
        let forced = !d["forced"].is_null();
        let latency = d["last_latency_seconds"].as_f64().map_or("—".into(), |s| format!("{:.1} ms", s * 1000.0));
        let since = v(&d["since"]);
        let _ = write!(
            h,
            "<tr class=\"dep\" data-dep=\"{}\" data-state=\"{}\"><td data-label=\"dependency\"><strong>{}</strong><br><span class=\"mut\">{} · {}</span></td>",
            v(&d["name"]),
            escape(state),
            v(&d["name"]),
            v(&d["type"]),
            v(&d["impact"]),
        );
        let _ = write!(
            h,
            "<td data-label=\"state\"><span class=\"pill {}\">{}</span>",
            verdict_class(state),
            escape(state)
        );
        if forced {
            let _ = write!(
                h,
                " <span class=\"pill op forced\">forced</span><br><span class=\"mut\">check says {}</span>",
                escape(checked)
            );
        }
        h.push_str("</td>");
        let cause = if d["last_ok"].as_bool() == Some(false) || state == "down" || checked == "down" {
            format!("{}<div class=\"msg\">{}</div>", v(&d["last_cause"]), v(&d["last_message"]))
        } else {
            "<span class=\"mut\">—</span>".into()
        };
        let _ = write!(
            h,
            "<td data-label=\"last cause\" class=\"cause\">{cause}</td><td data-label=\"since\"><time datetime=\"{since}\" title=\"{since}\">{} ago</time></td><td data-label=\"latency\">{latency}</td><td data-label=\"last checks\">{}</td></tr>",
            ago(d["for_seconds"].as_f64().unwrap_or(0.0)),
            histories.get(i).map(sparkline).unwrap_or_default(),
        );
    }
    h.push_str("</tbody></table></section>");
}

fn listeners(h: &mut String, status: &Value) {
    let ls = status["listeners"].as_array().map(Vec::as_slice).unwrap_or_default();
    h.push_str("<section><h2>Listeners and routes</h2><table id=\"listeners\"><thead><tr><th>listener</th><th>route</th><th>needs</th><th>admission</th></tr></thead><tbody>");
    let names = |x: &Value| {
        let n: Vec<String> = x.as_array().map(Vec::as_slice).unwrap_or_default().iter().map(v).collect();
        if n.is_empty() { "—".to_string() } else { n.join(", ") }
    };
    for l in ls {
        for r in l["routes"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let admitted = r["admitted"].as_bool() == Some(true);
            let admission = if admitted {
                "<span class=\"pill ok\">admitted</span>".to_string()
            } else {
                format!(
                    "<span class=\"pill bad\">short-circuited</span> <span class=\"mut\">missing {}</span>",
                    names(&r["missing"])
                )
            };
            let _ = write!(
                h,
                "<tr class=\"route\"><td data-label=\"listener\"><strong>{}</strong> <span class=\"mut\">{} {} → {}</span></td><td data-label=\"route\">{}</td><td data-label=\"needs\">{}</td><td data-label=\"admission\">{admission}</td></tr>",
                v(&l["name"]),
                v(&l["protocol"]),
                v(&l["listen"]),
                v(&l["upstream"]),
                v(&r["name"]),
                names(&r["needs"]),
            );
        }
    }
    h.push_str("</tbody></table></section>");
}

/// The HTTP response for a rendered page: a strict CSP allowing only the
/// page's own stylesheet, and headers that keep it out of caches and frames.
pub fn response((html, nonce): &(String, String)) -> Response<Full<Bytes>> {
    let mut r = super::with_type(StatusCode::OK, "text/html; charset=utf-8", html.clone());
    let csp = format!(
        "default-src 'none'; style-src 'nonce-{nonce}'; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    let headers = r.headers_mut();
    if let Ok(csp) = HeaderValue::from_str(&csp) {
        headers.insert(CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    #[test]
    fn every_markup_character_is_escaped() {
        assert_eq!(escape(r#"<script>"a"&'b'</script>"#), "&lt;script&gt;&quot;a&quot;&amp;&#39;b&#39;&lt;/script&gt;");
    }

    #[test]
    fn durations_read_as_the_largest_two_units() {
        assert_eq!(ago(42.9), "42s");
        assert_eq!(ago(725.0), "12m 5s");
        assert_eq!(ago(3.0 * 86400.0 + 7200.0), "3d 2h");
    }

    #[test]
    fn a_hostile_message_and_name_are_rendered_as_text() {
        let status = json!({
            "service": {"state": "out_of_service", "since": "t", "for_seconds": 1.0, "ready": false},
            "dependencies": [{"name": "db", "type": "tcp", "impact": "out_of_service", "state": "down",
                "checked_state": "down", "forced": null, "last_ok": false, "last_cause": "protocol",
                "last_message": "<script>alert(1)</script><img src=x onerror=alert(2)>"}],
            "listeners": [{"name": "web\"><b>", "routes": [{"name": "default", "needs": ["db"], "admitted": false, "missing": ["db"]}]}],
            "overrides": {"mode": null, "dependencies": []},
        });
        let (html, _) = render(&status, &[History::default()]);
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{html}");
        assert!(html.contains("web&quot;&gt;&lt;b&gt;"), "{html}");
        assert!(html.contains("class=\"banner bad\""), "{html}");
    }

    #[test]
    fn the_sparkline_has_one_bar_per_check_and_marks_failures() {
        let mut hist = History::default();
        hist.push(true, Duration::from_millis(2));
        hist.push(false, Duration::from_millis(300));
        let svg = sparkline(&hist);
        assert_eq!(svg.matches("<rect").count(), 2);
        assert_eq!(svg.matches("s-fail").count(), 1);
    }
}
