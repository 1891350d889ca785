//! The raw schema: the YAML file as a generic tree in which every value and
//! every key keeps its line and column, and typed readers over it.
//!
//! The file is deserialized once into [`Node`]s (serde-saphyr's `Spanned`
//! works inside any `Deserialize` impl, so a recursive `deserialize_any`
//! keeps every position). The typed config is then read from the tree by the
//! schema modules with the readers below. A reader that meets a wrong type,
//! an unknown key or an invalid value records a [`Problem`] at that value and
//! answers `None`; the caller carries on, so one run reports every mistake of
//! the file instead of stopping at the first one, as a typed serde parse
//! would.
//!
//! This is the only module that names serde-saphyr.
//!
//! [`Problem`]: super::Problem

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Visitor};
use serde_saphyr::Spanned;

use super::problem::{At, Pos, Problems, suggestion};

/// Longest duration accepted anywhere in the config.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// One YAML value and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where the value starts.
    pub pos: Pos,
    /// The value.
    pub value: Value,
}

/// A YAML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`, `~` or nothing.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i128),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, keys in file order (duplicates included: they are reported).
    Map(Vec<(At<String>, Node)>),
}

impl Value {
    /// What the value is, for "expected X, found Y" messages.
    fn describe(&self) -> String {
        match self {
            Value::Null => "nothing".into(),
            Value::Bool(b) => format!("the boolean {b}"),
            Value::Int(i) => format!("the number {i}"),
            Value::Float(f) => format!("the number {f}"),
            Value::Str(s) => format!("the string {s:?}"),
            Value::Seq(_) => "a list".into(),
            Value::Map(_) => "a mapping".into(),
        }
    }

    /// A scalar's text (numbers and booleans as written in canonical form).
    fn scalar_text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Null | Value::Seq(_) | Value::Map(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<Value>::deserialize(d)?;
        Ok(Node { pos: Pos(s.referenced.line(), s.referenced.column()), value: s.value })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i128::try_from(v).map(Value::Int).map_err(|_| E::custom("integer too large"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = seq.next_element::<Node>()? {
            items.push(n);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(k) = map.next_key::<Node>()? {
            let Some(name) = k.value.scalar_text() else {
                return Err(de::Error::custom("a mapping key must be a plain name"));
            };
            entries.push((At { value: name, pos: k.pos }, map.next_value::<Node>()?));
        }
        Ok(Value::Map(entries))
    }
}

/// Parses YAML text into a tree; `Err` carries a YAML syntax problem (the
/// only kind that stops reading, as nothing after it has a meaning).
pub fn parse(text: &str) -> Result<Node, (String, Pos)> {
    // Repeated keys reach the tree, which reports each one with its key path.
    let options = serde_saphyr::options! { duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::PassThrough };
    serde_saphyr::from_str_with_options::<Node>(text, options).map_err(|e| {
        let pos = e.location().map(|l| Pos(l.line(), l.column())).unwrap_or_default();
        (e.without_snippet().to_string(), pos)
    })
}

/// The key path of `k` under `path` (`listeners[0]` + `name`).
pub fn join(path: &str, k: &str) -> String {
    if path.is_empty() { k.to_string() } else { format!("{path}.{k}") }
}

impl Node {
    /// Records "expected `what`" at this value.
    fn wrong_type(&self, key: &str, what: &str, p: &mut Problems) {
        p.at(self.pos, key, format!("expected {what}, found {}", self.value.describe()));
    }

    /// This value as a mapping (`None`, after a problem, when it is not one).
    /// Every key that appears twice is a problem at its second occurrence.
    pub fn map(&self, path: &str, p: &mut Problems) -> Option<Map<'_>> {
        let entries: &[(At<String>, Node)] = match &self.value {
            Value::Map(e) => e,
            // An empty section (`admin:`) is a mapping with no keys.
            Value::Null => &[],
            _ => {
                self.wrong_type(if path.is_empty() { "(document)" } else { path }, "a mapping of keys", p);
                return None;
            }
        };
        let mut kept: Vec<(&At<String>, &Node)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            if kept.iter().any(|(seen, _)| seen.value == k.value) {
                p.at(k.pos, join(path, &k.value), format!("duplicate key `{}`", k.value));
            } else {
                kept.push((k, v));
            }
        }
        Some(Map { entries: kept, path: path.to_string(), pos: self.pos })
    }

    /// A scalar as a string (numbers and booleans are accepted as their text).
    pub fn str(&self, key: &str, p: &mut Problems) -> Option<At<String>> {
        match self.value.scalar_text() {
            Some(s) => Some(At { value: s, pos: self.pos }),
            None => {
                self.wrong_type(key, "a string", p);
                None
            }
        }
    }

    /// A boolean.
    pub fn bool(&self, key: &str, p: &mut Problems) -> Option<At<bool>> {
        match self.value {
            Value::Bool(b) => Some(At { value: b, pos: self.pos }),
            _ => {
                self.wrong_type(key, "true or false", p);
                None
            }
        }
    }

    /// A whole number that fits `T`.
    pub fn int<T: TryFrom<i128>>(&self, key: &str, p: &mut Problems) -> Option<At<T>> {
        match self.value {
            Value::Int(i) => match T::try_from(i) {
                Ok(v) => Some(At { value: v, pos: self.pos }),
                Err(_) => {
                    p.at(self.pos, key, format!("{i} is out of range"));
                    None
                }
            },
            _ => {
                self.wrong_type(key, "a whole number", p);
                None
            }
        }
    }

    /// A number.
    pub fn float(&self, key: &str, p: &mut Problems) -> Option<At<f64>> {
        match self.value {
            Value::Float(f) => Some(At { value: f, pos: self.pos }),
            Value::Int(i) => Some(At { value: i as f64, pos: self.pos }),
            _ => {
                self.wrong_type(key, "a number", p);
                None
            }
        }
    }

    /// A duration written as a human string: `500ms`, `2s`, `1m`.
    pub fn duration(&self, key: &str, p: &mut Problems) -> Option<At<Duration>> {
        let s = self.str(key, p)?;
        match humantime::parse_duration(s.value.trim()) {
            Err(e) => {
                p.at(self.pos, key, format!("invalid duration {:?} ({e}); write e.g. 500ms, 2s, 1m", s.value));
                None
            }
            // Deadlines are `Instant + duration`; an absurd value would
            // overflow it at run time, so it is refused here instead.
            Ok(d) if d > MAX_DURATION => {
                p.at(self.pos, key, format!("duration {:?} is too long (at most 365d)", s.value));
                None
            }
            Ok(d) => Some(At { value: d, pos: self.pos }),
        }
    }

    /// One of a fixed set of keywords; a near miss gets a suggestion.
    pub fn choice<T: Copy>(&self, key: &str, options: &[(&str, T)], p: &mut Problems) -> Option<At<T>> {
        let s = self.str(key, p)?;
        match options.iter().find(|(name, _)| *name == s.value) {
            Some((_, v)) => Some(At { value: *v, pos: self.pos }),
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                p.at(self.pos, key, unknown_value("value", &s.value, &names));
                None
            }
        }
    }

    /// A list (a lone scalar is not promoted to a list).
    pub fn seq(&self, key: &str, p: &mut Problems) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(items) => Some(items),
            _ => {
                self.wrong_type(key, "a list", p);
                None
            }
        }
    }

    /// A list of strings; items of another type are problems and left out.
    pub fn str_list(&self, key: &str, p: &mut Problems) -> Option<At<Vec<At<String>>>> {
        let items = self.seq(key, p)?;
        let strings = items.iter().filter_map(|i| i.str(key, p)).collect();
        Some(At { value: strings, pos: self.pos })
    }
}

/// A YAML mapping being read.
pub struct Map<'a> {
    entries: Vec<(&'a At<String>, &'a Node)>,
    /// The key path of the mapping (`listeners[0]`; empty at the top).
    pub path: String,
    /// Where the mapping starts (missing keys are reported here).
    pub pos: Pos,
}

impl<'a> Map<'a> {
    /// The key path of one of its keys.
    pub fn key(&self, k: &str) -> String {
        join(&self.path, k)
    }

    /// The keys present, with their positions.
    pub fn keys(&self) -> impl Iterator<Item = &'a At<String>> + '_ {
        self.entries.iter().map(|(k, _)| *k)
    }

    /// The value of a key; a key written with no value (`null`) counts as absent.
    pub fn get(&self, k: &str) -> Option<&'a Node> {
        self.entries.iter().find(|(key, _)| key.value == k).map(|(_, v)| *v).filter(|v| v.value != Value::Null)
    }

    /// Whether a key is present (with a value).
    pub fn has(&self, k: &str) -> bool {
        self.get(k).is_some()
    }

    /// Reports every key not in `known`, suggesting the closest known one.
    pub fn deny_unknown(&self, known: &[&str], p: &mut Problems) {
        for k in self.keys() {
            if !known.contains(&k.value.as_str()) {
                p.at(k.pos, self.key(&k.value), unknown_key(&k.value, known));
            }
        }
    }

    /// Reports a required key that is missing.
    pub fn missing(&self, k: &str, p: &mut Problems) {
        p.at(self.pos, self.key(k), format!("missing key `{k}`"));
    }

    /// A string value.
    pub fn str(&self, k: &str, p: &mut Problems) -> Option<At<String>> {
        self.get(k)?.str(&self.key(k), p)
    }

    /// A string value that must be present.
    pub fn required_str(&self, k: &str, p: &mut Problems) -> Option<At<String>> {
        if !self.has(k) {
            self.missing(k, p);
        }
        self.str(k, p)
    }

    /// A boolean value.
    pub fn bool(&self, k: &str, p: &mut Problems) -> Option<At<bool>> {
        self.get(k)?.bool(&self.key(k), p)
    }

    /// A whole-number value.
    pub fn int<T: TryFrom<i128>>(&self, k: &str, p: &mut Problems) -> Option<At<T>> {
        self.get(k)?.int(&self.key(k), p)
    }

    /// A number value.
    pub fn float(&self, k: &str, p: &mut Problems) -> Option<At<f64>> {
        self.get(k)?.float(&self.key(k), p)
    }

    /// A duration value.
    pub fn duration(&self, k: &str, p: &mut Problems) -> Option<At<Duration>> {
        self.get(k)?.duration(&self.key(k), p)
    }

    /// A keyword value.
    pub fn choice<T: Copy>(&self, k: &str, options: &[(&str, T)], p: &mut Problems) -> Option<At<T>> {
        self.get(k)?.choice(&self.key(k), options, p)
    }

    /// A list of strings.
    pub fn str_list(&self, k: &str, p: &mut Problems) -> Option<At<Vec<At<String>>>> {
        self.get(k)?.str_list(&self.key(k), p)
    }

    /// A nested mapping.
    pub fn map(&self, k: &str, p: &mut Problems) -> Option<Map<'a>> {
        self.get(k)?.map(&self.key(k), p)
    }
}

/// The message for a keyword that is not one of `valid`: the closest one
/// when it is a near miss, and the whole list.
pub fn unknown_value(what: &str, word: &str, valid: &[&str]) -> String {
    match super::problem::did_you_mean(word, valid.iter().copied()) {
        Some(c) => format!("unknown {what} {word:?}, did you mean `{c}`? (expected one of {})", valid.join(", ")),
        None => format!("unknown {what} {word:?}; expected one of {}", valid.join(", ")),
    }
}

/// The message for a key the schema does not know.
pub fn unknown_key(k: &str, known: &[&str]) -> String {
    format!("unknown field `{k}`{}", suggestion(k, known.iter().copied()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_and_key_keeps_its_position() {
        let n = parse("a: 1\nb:\n  - x\n  - {c: true}\n").unwrap();
        let Value::Map(m) = &n.value else { panic!("{n:?}") };
        assert_eq!((m[0].0.value.as_str(), m[0].0.pos, m[0].1.pos), ("a", Pos(1, 1), Pos(1, 4)));
        assert_eq!(m[0].1.value, Value::Int(1));
        let Value::Seq(items) = &m[1].1.value else { panic!("{m:?}") };
        assert_eq!((items[0].pos, &items[0].value), (Pos(3, 5), &Value::Str("x".into())));
        let Value::Map(inner) = &items[1].value else { panic!("{items:?}") };
        assert_eq!((inner[0].0.pos, &inner[0].1.value), (Pos(4, 6), &Value::Bool(true)));
    }

    #[test]
    fn wrong_types_are_problems_at_the_value() {
        let n = parse("w: two\n").unwrap();
        let mut p = Problems::default();
        let m = n.map("", &mut p).unwrap();
        assert!(m.int::<usize>("w", &mut p).is_none());
        let p = p.into_sorted();
        assert_eq!((p[0].line, p[0].column, p[0].key.as_str()), (1, 4, "w"));
        assert_eq!(p[0].message, "expected a whole number, found the string \"two\"");
    }
}
