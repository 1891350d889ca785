//! Diagnostics: positions, the [`Problem`] a config error is made of, and the
//! collector that lets parsing go on after a mistake so that every problem of
//! a file is reported in one run.

use std::fmt;

/// A (line, column) position in the config file, both 1-based (0 = unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos(pub u64, pub u64);

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0, self.1)
    }
}

/// A value read from the file together with where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct At<T> {
    /// The value.
    pub value: T,
    /// Where it was written.
    pub pos: Pos,
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// The key the problem is about, as a dotted path (`dependencies[0].rise`).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Collects problems during parsing so that all of them are reported at once.
///
/// Whether a part of the config parsed is judged by whether it added
/// problems ([`Problems::count`] before and after), never by flags.
#[derive(Debug, Default)]
pub struct Problems(Vec<Problem>);

impl Problems {
    /// Records a problem at a position.
    pub fn at(&mut self, pos: Pos, key: impl Into<String>, msg: impl Into<String>) {
        self.0.push(Problem { line: pos.0, column: pos.1, key: key.into(), message: msg.into() });
    }

    /// How many problems have been recorded so far.
    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// The problems in file order (a stable sort: same-position problems keep
    /// the order they were found in).
    pub fn into_sorted(mut self) -> Vec<Problem> {
        self.0.sort_by_key(|p| (p.line, p.column));
        self.0
    }
}

/// The candidate closest to `word` when it is close enough to be a typo
/// (Levenshtein distance at most a third of the word, at least 1).
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(&word.to_ascii_lowercase(), c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// The suffix ", did you mean `x`?" for a near miss, or "" for none.
pub fn suggestion<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    did_you_mean(word, candidates).map(|c| format!(", did you mean `{c}`?")).unwrap_or_default()
}

/// Edit distance between two strings by character: insertions, deletions,
/// substitutions and swaps of two neighbours (`tpc` → `tcp`) cost 1 each
/// (optimal string alignment).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between the first i characters of a and the first j of b.
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// Whether a name uses only letters, digits and the given extra characters
/// (names become metric labels and appear in URLs and logs).
pub fn is_name(s: &str, extra: &[char]) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
}

/// Whether a text is a JSON object, as every problem+json body must be.
pub fn is_json_object(s: &str) -> bool {
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_near_miss_suggests_the_closest_candidate_and_a_far_one_nothing() {
        assert_eq!(did_you_mean("adress", ["address", "url"]), Some("address"));
        assert_eq!(did_you_mean("bypas", ["bypass", "needs"]), Some("bypass"));
        assert_eq!(did_you_mean("htp", ["http", "tcp"]), Some("http"));
        assert_eq!(did_you_mean("bogus", ["address", "url"]), None);
        assert_eq!(suggestion("bogus", ["address"]), "");
    }

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
        assert_eq!(edit_distance("tpc", "tcp"), 1);
    }
}
