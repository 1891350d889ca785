//! Route-aware admission: which dependencies a request needs.
//!
//! A listener's `routes` are compiled once at load into a table that picks
//! the first matching route without scanning every route and without
//! allocating: path prefixes live in a trie keyed by path *segment*
//! (Kubernetes Ingress `pathType: Prefix` semantics: `/cart` matches `/cart`
//! and `/cart/1`, never `/cartography`), exact paths in a hash map, and each
//! trie node lists its routes in config order. Walking the request path
//! visits at most one node per segment; among the routes found there the
//! lowest index whose method/host/header conditions pass wins.
//!
//! `bypass` prefixes become routes that need nothing, placed before the
//! configured routes. The route types and the rule that a shadowed route is
//! a config error live in `crate::config::route`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use hyper::{HeaderMap, Method};

use crate::config::route::segments;
pub use crate::config::route::{HeaderMatch, RouteConfig, RouteMatch};

/// FNV-1a: the route table's keys are fixed at config load and short (path
/// segments), so a keyed hash's protection against crafted collisions buys
/// nothing here, while SipHash costs most of a lookup on the request path
/// (callgrind: bench/compare.sh, routes).
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// A map from path strings, hashed with [`Fnv`].
type PathMap<V> = HashMap<Box<str>, V, BuildHasherDefault<Fnv>>;

#[derive(Debug, Default)]
struct Node {
    children: PathMap<usize>,
    /// Routes whose prefix ends at this node, ascending.
    routes: Vec<usize>,
}

/// The compiled route table of one listener.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<RouteConfig>,
    nodes: Vec<Node>,
    /// Exact-path routes by path, ascending.
    exact: PathMap<Vec<usize>>,
    /// Routes with no path condition, ascending.
    anywhere: Vec<usize>,
}

impl RouteTable {
    /// Compiles routes (in priority order).
    pub fn new(routes: Vec<RouteConfig>) -> RouteTable {
        let mut t = RouteTable {
            routes: Vec::new(),
            nodes: vec![Node::default()],
            exact: PathMap::default(),
            anywhere: Vec::new(),
        };
        for (i, r) in routes.iter().enumerate() {
            if let Some(p) = &r.matcher.path {
                t.exact.entry(p.as_str().into()).or_default().push(i);
            } else if let Some(p) = &r.matcher.path_prefix {
                let mut node = 0;
                for seg in segments(p) {
                    let next = t.nodes.len();
                    node = *t.nodes[node].children.entry(seg.into()).or_insert(next);
                    if node == next {
                        t.nodes.push(Node::default());
                    }
                }
                t.nodes[node].routes.push(i);
            } else {
                t.anywhere.push(i);
            }
        }
        t.routes = routes;
        t
    }

    /// The routes, in priority order.
    pub fn routes(&self) -> &[RouteConfig] {
        &self.routes
    }

    /// Index of the first route matching the request, if any. Allocation-free.
    pub fn select(&self, method: &Method, path: &str, headers: &HeaderMap) -> Option<usize> {
        if self.routes.is_empty() {
            return None;
        }
        let mut best = usize::MAX;
        let consider = |list: &[usize], best: &mut usize| {
            for &i in list {
                if i >= *best {
                    break;
                }
                if self.conditions_hold(&self.routes[i].matcher, method, headers) {
                    *best = i;
                    break;
                }
            }
        };
        consider(&self.anywhere, &mut best);
        if let Some(list) = self.exact.get(path) {
            consider(list, &mut best);
        }
        let mut node = 0;
        consider(&self.nodes[0].routes, &mut best);
        for seg in segments(path) {
            match self.nodes[node].children.get(seg) {
                Some(&n) => {
                    node = n;
                    consider(&self.nodes[n].routes, &mut best);
                }
                None => break,
            }
        }
        (best != usize::MAX).then_some(best)
    }

    fn conditions_hold(&self, m: &RouteMatch, method: &Method, headers: &HeaderMap) -> bool {
        if !m.methods.is_empty() && !m.methods.iter().any(|x| x == method.as_str()) {
            return false;
        }
        if let Some(host) = &m.host {
            let h = headers.get(hyper::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
            let h =
                h.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map(|(h, _)| h).unwrap_or(h);
            if !h.eq_ignore_ascii_case(host) {
                return false;
            }
        }
        m.headers.iter().all(|hm| match (headers.get(hm.name.as_str()), &hm.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(want)) => v.as_bytes() == want.as_bytes(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, m: RouteMatch) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            matcher: m,
            needs: vec![],
            bypass: false,
            out_of_service_body: None,
            degraded_body: None,
            expose_dependencies: None,
        }
    }

    fn prefix(p: &str) -> RouteMatch {
        RouteMatch { path_prefix: Some(p.into()), ..Default::default() }
    }

    fn pick(t: &RouteTable, method: &str, path: &str, headers: &[(&str, &str)]) -> Option<String> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        t.select(&Method::from_bytes(method.as_bytes()).unwrap(), path, &h).map(|i| t.routes()[i].name.clone())
    }

    #[test]
    fn prefix_matches_on_segment_boundaries_only() {
        let t = RouteTable::new(vec![route("cart", prefix("/cart"))]);
        assert_eq!(pick(&t, "GET", "/cart", &[]).as_deref(), Some("cart"));
        assert_eq!(pick(&t, "GET", "/cart/", &[]).as_deref(), Some("cart"));
        assert_eq!(pick(&t, "GET", "/cart/1", &[]).as_deref(), Some("cart"));
        assert_eq!(pick(&t, "GET", "/cartography", &[]), None);
        assert_eq!(pick(&t, "GET", "/", &[]), None);
    }

    #[test]
    fn trailing_slash_in_a_prefix_is_ignored_and_root_matches_everything() {
        let t = RouteTable::new(vec![route("a", prefix("/api/")), route("all", prefix("/"))]);
        assert_eq!(pick(&t, "GET", "/api", &[]).as_deref(), Some("a"));
        assert_eq!(pick(&t, "GET", "/other", &[]).as_deref(), Some("all"));
    }

    #[test]
    fn first_match_wins_even_when_a_later_route_is_more_specific() {
        let t = RouteTable::new(vec![
            route("api", prefix("/api")),
            route("reports", RouteMatch { methods: vec!["POST".into()], ..prefix("/api/reports") }),
        ]);
        assert_eq!(pick(&t, "POST", "/api/reports", &[]).as_deref(), Some("api"));
        let t = RouteTable::new(vec![
            route("reports", RouteMatch { methods: vec!["GET".into()], ..prefix("/api/reports") }),
            route("api", prefix("/api")),
        ]);
        assert_eq!(pick(&t, "GET", "/api/reports/7", &[]).as_deref(), Some("reports"));
        assert_eq!(pick(&t, "POST", "/api/reports/7", &[]).as_deref(), Some("api"));
    }

    #[test]
    fn methods_headers_host_and_exact_path_conditions() {
        let t = RouteTable::new(vec![
            route("exact", RouteMatch { path: Some("/login".into()), ..Default::default() }),
            route(
                "canary",
                RouteMatch {
                    headers: vec![HeaderMatch { name: "x-canary".into(), value: Some("1".into()) }],
                    ..prefix("/")
                },
            ),
            route("admin-host", RouteMatch { host: Some("admin.example.com".into()), ..Default::default() }),
            route(
                "traced",
                RouteMatch { headers: vec![HeaderMatch { name: "x-trace".into(), value: None }], ..Default::default() },
            ),
        ]);
        assert_eq!(pick(&t, "GET", "/login", &[]).as_deref(), Some("exact"));
        assert_eq!(pick(&t, "GET", "/login/x", &[]), None);
        assert_eq!(pick(&t, "GET", "/x", &[("x-canary", "1")]).as_deref(), Some("canary"));
        assert_eq!(pick(&t, "GET", "/x", &[("x-canary", "2")]), None);
        assert_eq!(pick(&t, "GET", "/x", &[("host", "Admin.Example.com:8080")]).as_deref(), Some("admin-host"));
        assert_eq!(pick(&t, "GET", "/x", &[("x-trace", "abc")]).as_deref(), Some("traced"));
    }

    #[test]
    fn the_lowest_index_wins_across_trie_exact_and_anywhere_routes() {
        let t = RouteTable::new(vec![
            route("deep", prefix("/a/b/c")),
            route("get-anything", RouteMatch { methods: vec!["GET".into()], ..Default::default() }),
            route("a", prefix("/a")),
        ]);
        assert_eq!(pick(&t, "GET", "/a/b/c/d", &[]).as_deref(), Some("deep"));
        assert_eq!(pick(&t, "GET", "/a/b", &[]).as_deref(), Some("get-anything"));
        assert_eq!(pick(&t, "PUT", "/a/b", &[]).as_deref(), Some("a"));
    }

    #[test]
    fn many_routes_select_the_right_one() {
        let routes: Vec<_> = (0..200).map(|i| route(&format!("r{i}"), prefix(&format!("/svc{i}/v1")))).collect();
        let t = RouteTable::new(routes);
        assert_eq!(pick(&t, "GET", "/svc137/v1/items/9", &[]).as_deref(), Some("r137"));
        assert_eq!(pick(&t, "GET", "/svc137/v2", &[]), None);
    }
}
