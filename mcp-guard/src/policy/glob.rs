//! Glob patterns for method, tool, prompt and resource names, and an index that finds the
//! patterns matching a name without trying every pattern.
//!
//! The syntax is deliberately small: `*` matches any run of characters (`/` included, so
//! `file:///srv/*` covers a whole tree and `*` every method) and `?` matches exactly one
//! character; everything else stands for itself. There is no escape: MCP names and URIs
//! rarely contain `*` or `?`, and a pattern containing them still matches them.

use std::collections::HashMap;

/// True when `text` contains a wildcard, i.e. is a pattern rather than an exact name.
pub fn is_pattern(text: &str) -> bool {
    text.contains(['*', '?'])
}

/// Whether the whole of `text` matches `pattern`. Never allocates.
///
/// The classic iterative matcher: on a mismatch it retries from the last `*`, letting that
/// star swallow one more character. Backtracking only to the last star is enough because a
/// later star can absorb anything an earlier one could, so the worst case is
/// O(pattern × text), with no recursion.
pub fn matches(pattern: &str, text: &str) -> bool {
    let (pattern, text) = (pattern.as_bytes(), text.as_bytes());
    let (mut p, mut t) = (0, 0);
    // (position of the last star in the pattern, text position it has swallowed up to)
    let mut last_star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                last_star = Some((p, t));
                p += 1;
            }
            Some(b'?') => {
                p += 1;
                t += char_width(text[t]);
            }
            Some(&literal) if literal == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match last_star {
                Some((star, swallowed)) => {
                    let swallowed = swallowed + char_width(text[swallowed]);
                    last_star = Some((star, swallowed));
                    p = star + 1;
                    t = swallowed;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Bytes in the UTF-8 character that starts with `lead`, so that `?` and a star's advance
/// consume whole characters. Literal bytes are compared one by one, which is sound because a
/// pattern's literal characters are themselves whole UTF-8 sequences.
fn char_width(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// The text before a pattern's first wildcard.
fn literal_prefix(pattern: &str) -> &str {
    pattern
        .find(['*', '?'])
        .map_or(pattern, |end| &pattern[..end])
}

/// The text after a pattern's last wildcard.
fn literal_suffix(pattern: &str) -> &str {
    pattern
        .rfind(['*', '?'])
        .map_or(pattern, |start| &pattern[start + 1..])
}

/// Exact names and glob patterns, each with a value, looked up by the name to match.
///
/// Exact names are one hash lookup. Patterns are bucketed by their literal prefix (or, for
/// those starting with a wildcard, their literal suffix), so a lookup hashes one slice of the
/// name per distinct prefix length and tries only the patterns of buckets that hit; only
/// patterns with neither (`*`, `*x*`) are tried one by one. With thousands of rules per
/// server that keeps a lookup to a few hash probes instead of thousands of pattern matches.
#[derive(Debug)]
pub struct PatternIndex<T> {
    exact: HashMap<Box<str>, Vec<T>>,
    by_prefix: Buckets<T>,
    by_suffix: Buckets<T>,
    unanchored: Vec<(Box<str>, T)>,
}

impl<T> Default for PatternIndex<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            by_prefix: Buckets::default(),
            by_suffix: Buckets::default(),
            unanchored: Vec::new(),
        }
    }
}

impl<T: Copy> PatternIndex<T> {
    /// Adds an exact name or a pattern (see [`is_pattern`]) with its value.
    pub fn insert(&mut self, pattern: &str, value: T) {
        if !is_pattern(pattern) {
            self.exact.entry(pattern.into()).or_default().push(value);
            return;
        }
        let (prefix, suffix) = (literal_prefix(pattern), literal_suffix(pattern));
        if !prefix.is_empty() {
            self.by_prefix.insert(prefix, pattern, value);
        } else if !suffix.is_empty() {
            self.by_suffix.insert(suffix, pattern, value);
        } else {
            self.unanchored.push((pattern.into(), value));
        }
    }

    /// Calls `visit` with the value of every name and pattern matching `text`, in no
    /// particular order; a value inserted under several matching patterns is visited for each.
    pub fn for_each_match(&self, text: &str, mut visit: impl FnMut(T)) {
        if let Some(values) = self.exact.get(text) {
            values.iter().copied().for_each(&mut visit);
        }
        self.by_prefix
            .for_each_match(text, |len| text.get(..len), &mut visit);
        self.by_suffix.for_each_match(
            text,
            |len| {
                text.len()
                    .checked_sub(len)
                    .and_then(|start| text.get(start..))
            },
            &mut visit,
        );
        for (pattern, value) in &self.unanchored {
            if matches(pattern, text) {
                visit(*value);
            }
        }
    }
}

/// Patterns grouped by a literal part (their prefix or their suffix).
#[derive(Debug)]
struct Buckets<T> {
    by_literal: HashMap<Box<str>, Vec<(Box<str>, T)>>,
    /// The distinct lengths of the literals, so a lookup probes only lengths that exist.
    literal_lengths: Vec<usize>,
}

impl<T> Default for Buckets<T> {
    fn default() -> Self {
        Self {
            by_literal: HashMap::new(),
            literal_lengths: Vec::new(),
        }
    }
}

impl<T: Copy> Buckets<T> {
    fn insert(&mut self, literal: &str, pattern: &str, value: T) {
        self.by_literal
            .entry(literal.into())
            .or_default()
            .push((pattern.into(), value));
        if let Err(at) = self.literal_lengths.binary_search(&literal.len()) {
            self.literal_lengths.insert(at, literal.len());
        }
    }

    /// `part(len)` is the slice of `text` a literal of that length would have to equal, or
    /// `None` when the text is too short or the cut is inside a character.
    fn for_each_match<'t>(
        &self,
        text: &'t str,
        part: impl Fn(usize) -> Option<&'t str>,
        visit: &mut impl FnMut(T),
    ) {
        for &len in &self.literal_lengths {
            let Some(bucket) = part(len).and_then(|literal| self.by_literal.get(literal)) else {
                continue;
            };
            for (pattern, value) in bucket {
                if matches(pattern, text) {
                    visit(*value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_match_only_themselves() {
        assert!(matches("tools/call", "tools/call"));
        assert!(!matches("tools/call", "tools/cal"));
        assert!(!matches("tools/cal", "tools/call"));
        assert!(matches("", ""));
        assert!(!matches("", "x"));
    }

    #[test]
    fn star_matches_any_run_including_slashes() {
        assert!(matches("*", ""));
        assert!(matches("*", "resources/templates/list"));
        assert!(matches("tools/*", "tools/call"));
        assert!(matches("tools/*", "tools/"));
        assert!(!matches("tools/*", "tool/call"));
        assert!(matches("file:///srv/*", "file:///srv/a/b/c.txt"));
        assert!(matches("*_admin", "delete_admin"));
        assert!(!matches("*_admin", "delete_admins"));
        assert!(matches("read_*_file", "read_big_text_file"));
        assert!(matches("a*b*c", "abbbbc"));
        assert!(matches("a*b*c", "aXbYbZc"));
        assert!(!matches("a*b*c", "aXbYcZ"));
        assert!(matches("**", "anything"));
    }

    #[test]
    fn question_mark_matches_one_character() {
        assert!(matches("step-?", "step-1"));
        assert!(!matches("step-?", "step-"));
        assert!(!matches("step-?", "step-12"));
        // One character, not one byte.
        assert!(matches("caf?", "café"));
        assert!(matches("?", "日"));
        assert!(matches("*?", "日本"));
        assert!(!matches("??", "日"));
    }

    #[test]
    fn non_ascii_literals_match_whole_characters() {
        assert!(matches("*é", "café"));
        assert!(!matches("*é", "cafë"));
        assert!(matches("日*語", "日本語"));
    }

    #[test]
    fn literal_parts_are_cut_at_the_first_and_last_wildcard() {
        assert_eq!(literal_prefix("read_*_file"), "read_");
        assert_eq!(literal_suffix("read_*_file"), "_file");
        assert_eq!(literal_prefix("*x"), "");
        assert_eq!(literal_suffix("x?"), "");
    }

    fn matches_in(index: &PatternIndex<u32>, text: &str) -> Vec<u32> {
        let mut found = Vec::new();
        index.for_each_match(text, |value| found.push(value));
        found.sort_unstable();
        found
    }

    #[test]
    fn the_index_finds_exact_prefixed_suffixed_and_unanchored_patterns() {
        let mut index = PatternIndex::default();
        index.insert("read_file", 0);
        index.insert("read_*", 1);
        index.insert("*_file", 2);
        index.insert("*", 3);
        index.insert("write_*", 4);
        index.insert("*_dir", 5);
        index.insert("*ea*", 6);
        index.insert("read_file", 7);
        assert_eq!(matches_in(&index, "read_file"), [0, 1, 2, 3, 6, 7]);
        assert_eq!(matches_in(&index, "write_dir"), [3, 4, 5]);
        assert_eq!(matches_in(&index, "x"), [3]);
        assert_eq!(matches_in(&index, ""), [3]);
    }

    #[test]
    fn the_index_is_safe_on_short_and_non_ascii_names() {
        let mut index = PatternIndex::default();
        index.insert("abcdef*", 0);
        index.insert("*uvwxyz", 1);
        index.insert("é*", 2);
        assert!(matches_in(&index, "ab").is_empty());
        // A cut at byte 1 falls inside "é": no bucket is probed with a broken slice.
        assert_eq!(matches_in(&index, "éa"), [2]);
        assert!(matches_in(&index, "日").is_empty());
    }
}
