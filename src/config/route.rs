//! Route configuration: what a route matches, what it needs, and the rule
//! that a route shadowed by an earlier one is an error. The compiled route
//! table that answers requests is `crate::routes`; it builds on these types.

use std::collections::HashSet;

use super::dependency::{Declared, Impact};
use super::node::{Map, Node, Value};
use super::problem::{At, Pos, Problems, is_json_object, is_name};

/// Keys of a route.
const KEYS: &[&str] = &["name", "match", "needs", "short_circuit"];
/// Keys of a route's `match`.
const MATCH_KEYS: &[&str] = &["path_prefix", "path", "methods", "headers", "host"];
/// Keys of a header condition.
const HEADER_KEYS: &[&str] = &["name", "value"];
/// Keys of a route's `short_circuit`.
const SHORT_CIRCUIT_KEYS: &[&str] = &["out_of_service_body", "degraded_body", "expose_dependencies"];
/// Route names with a meaning of their own (the `route` metric label of
/// unrouted and bypassed requests).
const RESERVED_NAMES: &[&str] = &["default", "bypass"];
/// The characters a route or listener name may use besides letters and digits.
pub(super) const NAME_CHARS: &[char] = &['_', '-'];

/// A header condition of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Header name (lower case).
    pub name: String,
    /// Required value; `None` = the header must be present.
    pub value: Option<String>,
}

/// What a route matches on. Every given condition must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMatch {
    /// Path prefix on segment boundaries (`/` matches everything).
    pub path_prefix: Option<String>,
    /// Exact path.
    pub path: Option<String>,
    /// Methods (upper case); empty = any.
    pub methods: Vec<String>,
    /// Header conditions.
    pub headers: Vec<HeaderMatch>,
    /// `Host` (without port, lower case).
    pub host: Option<String>,
}

/// A validated route as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Name (the `route` metric label).
    pub name: String,
    /// Conditions.
    pub matcher: RouteMatch,
    /// Dependencies needed (indices).
    pub needs: Vec<usize>,
    /// Whether this is a `bypass` shorthand (outcome `bypassed`).
    pub bypass: bool,
    /// Override of the 503 body.
    pub out_of_service_body: Option<String>,
    /// Override of the 500 body.
    pub degraded_body: Option<String>,
    /// Override of `short_circuit.expose_dependencies`.
    pub expose_dependencies: Option<bool>,
}

/// The path segments of a path, ignoring empty ones (`//a/` → `["a"]`).
pub fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// Whether a path prefix `outer` covers every path that `inner` (a prefix or
/// exact path) covers, on segment boundaries.
fn prefix_covers(outer: &str, inner: &str) -> bool {
    let mut o = segments(outer);
    let mut i = segments(inner);
    loop {
        match (o.next(), i.next()) {
            (None, _) => return true,
            (Some(_), None) => return false,
            (Some(a), Some(b)) if a != b => return false,
            _ => {}
        }
    }
}

/// Whether every request matching `later` also matches `earlier`, making
/// `later` unreachable (first match wins).
pub fn shadows(earlier: &RouteMatch, later: &RouteMatch) -> bool {
    let path = match (&earlier.path, &earlier.path_prefix, &later.path, &later.path_prefix) {
        (Some(e), _, Some(l), _) => e == l,
        (Some(_), _, None, _) => false,
        (None, Some(e), Some(l), _) => prefix_covers(e, l),
        (None, Some(e), None, Some(l)) => prefix_covers(e, l),
        (None, Some(_), None, None) => false,
        (None, None, _, _) => true,
    };
    let methods = earlier.methods.is_empty()
        || (!later.methods.is_empty() && later.methods.iter().all(|m| earlier.methods.contains(m)));
    let host = earlier.host.is_none() || earlier.host == later.host;
    let headers = earlier
        .headers
        .iter()
        .all(|e| later.headers.iter().any(|l| l.name == e.name && (e.value.is_none() || e.value == l.value)));
    path && methods && host && headers
}

/// Reads a problem+json body override; it must be a JSON object.
pub(super) fn problem_body(m: &Map<'_>, k: &str, p: &mut Problems) -> Option<String> {
    let b = m.str(k, p)?;
    if !is_json_object(&b.value) {
        p.at(b.pos, m.key(k), "must be a JSON object (it is sent as application/problem+json)");
    }
    Some(b.value)
}

/// Resolves a `needs:` value (`all` or a list of dependency names) to
/// dependency indices; absent means every gating dependency.
pub(super) fn needs(node: Option<&Node>, deps: &[Declared], key: &str, p: &mut Problems) -> Vec<usize> {
    let all = || deps.iter().enumerate().filter(|(_, d)| d.impact != Impact::Observe).map(|(i, _)| i).collect();
    let Some(node) = node else { return all() };
    match &node.value {
        Value::Seq(_) => {
            let mut out = Vec::new();
            for name in node.str_list(key, p).map(|l| l.value).unwrap_or_default() {
                match deps.iter().position(|d| d.name == name.value) {
                    Some(i) if !out.contains(&i) => out.push(i),
                    Some(_) => {}
                    None => p.at(name.pos, key, format!("unknown dependency {:?}", name.value)),
                }
            }
            out
        }
        _ => match node.str(key, p) {
            Some(k) if k.value == "all" => all(),
            Some(k) => {
                p.at(node.pos, key, format!("expected `all` or a list of dependency names, found {:?}", k.value));
                Vec::new()
            }
            None => Vec::new(),
        },
    }
}

/// Reads a listener's routes; `bypass` prefixes become routes needing
/// nothing, placed first. A route that an earlier one shadows is a problem.
pub(super) fn routes(
    bypass: &[At<String>],
    raw: Option<&Node>,
    listener_needs: &[usize],
    deps: &[Declared],
    key: &str,
    p: &mut Problems,
) -> Vec<RouteConfig> {
    let mut positions: Vec<Pos> = bypass.iter().map(|b| b.pos).collect();
    let mut routes: Vec<RouteConfig> = bypass
        .iter()
        .map(|b| RouteConfig {
            name: "bypass".into(),
            matcher: RouteMatch { path_prefix: Some(b.value.clone()), ..Default::default() },
            needs: Vec::new(),
            bypass: true,
            out_of_service_body: None,
            degraded_body: None,
            expose_dependencies: None,
        })
        .collect();
    let items = raw.and_then(|r| r.seq(key, p)).unwrap_or_default();
    let mut names = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let Some(r) = item.map(&format!("{key}[{i}]"), p) else { continue };
        r.deny_unknown(KEYS, p);
        let Some(name) = r.required_str("name", p) else { continue };
        if !is_name(&name.value, NAME_CHARS) {
            p.at(name.pos, r.key("name"), "must be non-empty and use only letters, digits, '_' and '-'");
        } else if RESERVED_NAMES.contains(&name.value.as_str()) {
            p.at(name.pos, r.key("name"), format!("`{}` is reserved", name.value));
        } else if !names.insert(name.value.clone()) {
            p.at(name.pos, r.key("name"), format!("duplicate route name {:?}", name.value));
        }
        let matcher = r.map("match", p).map(|m| route_match(&m, p)).unwrap_or_default();
        let needs = match r.get("needs") {
            Some(n) => needs(Some(n), deps, &r.key("needs"), p),
            None => listener_needs.to_vec(),
        };
        let sc = r.map("short_circuit", p);
        if let Some(sc) = &sc {
            sc.deny_unknown(SHORT_CIRCUIT_KEYS, p);
        }
        positions.push(name.pos);
        routes.push(RouteConfig {
            name: name.value,
            matcher,
            needs,
            bypass: false,
            out_of_service_body: sc.as_ref().and_then(|s| problem_body(s, "out_of_service_body", p)),
            degraded_body: sc.as_ref().and_then(|s| problem_body(s, "degraded_body", p)),
            expose_dependencies: sc.as_ref().and_then(|s| s.bool("expose_dependencies", p)).map(|b| b.value),
        });
    }
    for (j, later) in routes.iter().enumerate() {
        if let Some((earlier, at)) =
            routes[..j].iter().zip(&positions).find(|(e, _)| shadows(&e.matcher, &later.matcher))
        {
            let which = if later.bypass { "bypass prefix".to_string() } else { format!("route {:?}", later.name) };
            p.at(
                positions[j],
                key,
                format!(
                    "{which} is unreachable: {} at line {} matches every request it matches (first match wins)",
                    if earlier.bypass { "a bypass prefix".to_string() } else { format!("route {:?}", earlier.name) },
                    at.0
                ),
            );
        }
    }
    routes
}

/// Reads a route's `match`.
fn route_match(m: &Map<'_>, p: &mut Problems) -> RouteMatch {
    m.deny_unknown(MATCH_KEYS, p);
    let path_prefix = m.str("path_prefix", p);
    let path = m.str("path", p);
    for (field, v) in [("path_prefix", &path_prefix), ("path", &path)] {
        if let Some(v) = v.as_ref().filter(|v| !v.value.starts_with('/')) {
            p.at(v.pos, m.key(field), "must start with '/'");
        }
    }
    if let (Some(_), Some(path)) = (&path_prefix, &path) {
        p.at(path.pos, m.key("path"), "set path or path_prefix, not both");
    }
    let mut methods = Vec::new();
    for meth in m.str_list("methods", p).map(|l| l.value).unwrap_or_default() {
        if meth.value.is_empty() || !meth.value.bytes().all(|b| b.is_ascii_uppercase()) {
            p.at(meth.pos, m.key("methods"), format!("{:?} is not an upper-case HTTP method", meth.value));
        }
        methods.push(meth.value);
    }
    let mut headers = Vec::new();
    let items = m.get("headers").and_then(|h| h.seq(&m.key("headers"), p)).unwrap_or_default();
    for (i, h) in items.iter().enumerate() {
        let Some(hm) = h.map(&format!("{}[{i}]", m.key("headers")), p) else { continue };
        hm.deny_unknown(HEADER_KEYS, p);
        let Some(name) = hm.required_str("name", p) else { continue };
        if hyper::header::HeaderName::from_bytes(name.value.as_bytes()).is_err() {
            p.at(h.pos, m.key("headers"), format!("{:?} is not a header name", name.value));
        }
        headers.push(HeaderMatch { name: name.value.to_ascii_lowercase(), value: hm.str("value", p).map(|v| v.value) });
    }
    RouteMatch {
        path_prefix: path_prefix.map(|p| p.value),
        path: path.map(|p| p.value),
        methods,
        headers,
        host: m.str("host", p).map(|h| h.value.to_ascii_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(p: &str) -> RouteMatch {
        RouteMatch { path_prefix: Some(p.into()), ..Default::default() }
    }

    #[test]
    fn shadowing_is_detected() {
        assert!(shadows(&prefix("/api"), &prefix("/api/reports")));
        assert!(!shadows(&prefix("/api/reports"), &prefix("/api")));
        assert!(!shadows(&prefix("/cart"), &prefix("/cartography")));
        assert!(shadows(&prefix("/"), &RouteMatch { path: Some("/x".into()), ..Default::default() }));
        // A method-restricted earlier route leaves other methods reachable.
        assert!(!shadows(&RouteMatch { methods: vec!["GET".into()], ..prefix("/api") }, &prefix("/api/x")));
        assert!(shadows(
            &RouteMatch { methods: vec!["GET".into(), "POST".into()], ..prefix("/api") },
            &RouteMatch { methods: vec!["GET".into()], ..prefix("/api/x") }
        ));
        // A header-restricted earlier route leaves requests without the header reachable.
        let canary = RouteMatch { headers: vec![HeaderMatch { name: "x-canary".into(), value: None }], ..prefix("/") };
        assert!(!shadows(&canary, &prefix("/a")));
        let canary_a = RouteMatch {
            headers: vec![HeaderMatch { name: "x-canary".into(), value: Some("1".into()) }],
            ..prefix("/a")
        };
        assert!(shadows(&canary, &canary_a));
    }
}
