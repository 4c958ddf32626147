//! The hash chain: how a record becomes a line, and how a line is checked.
//!
//! A line is the record serialised by serde_json (compact, fields in the struct's order) as
//!
//! ```text
//! {"seq":7,"ts":"2026-11-01T14:37:22.123456Z","prev":"<64 hex>","kind":"call",...,"hash":"<64 hex>"}
//! ```
//!
//! `hash` is the lowercase hex SHA-256 of the same line without its `hash` field, that is of
//! the bytes before `,"hash":` followed by the closing `}`; `prev` is the previous record's
//! `hash` ([`GENESIS_PREV`] for the first record ever). Because `hash` is always last, a
//! reader checks the exact bytes on disk without re-serialising anything: any changed byte
//! changes the hash, and a record removed, inserted or moved breaks the `prev` link (and the
//! `seq` count) of the record after it.
//!
//! What a chain cannot show by itself is records cut off the end at a line boundary; compare
//! the last hash `audit verify` prints with one noted earlier (`--head`) for that.

use std::io::Write;

use serde::Deserialize;
use sha2::{Digest, Sha256};

#[cfg(doc)]
use super::record::GENESIS_PREV;

/// `,"hash":"` + 64 hex digits + `"}`.
const HASH_FIELD: &[u8] = br#","hash":""#;
const HASH_SUFFIX_LEN: usize = HASH_FIELD.len() + 64 + 2;

/// A hex SHA-256, as it appears in `prev` and `hash`.
pub type HexHash = [u8; 64];

/// Appends to `out` the line (with its newline) for `body`, the serialised
/// [`super::AuditRecord`] (a JSON object whose first field is `kind`), and returns its hash.
pub(super) fn seal(out: &mut Vec<u8>, body: &[u8], seq: u64, ts: &str, prev: &HexHash) -> HexHash {
    debug_assert!(body.starts_with(b"{\"kind\"") && body.ends_with(b"}"));
    let start = out.len();
    // ts is RFC 3339 and prev is hex: neither needs JSON escaping.
    write!(out, r#"{{"seq":{seq},"ts":"{ts}","prev":""#).expect("writing to a Vec");
    out.extend_from_slice(prev);
    out.extend_from_slice(b"\",");
    out.extend_from_slice(&body[1..]);
    let hash = hex_sha256(&[&out[start..]]);
    out.pop(); // the closing brace, which the hash field goes before
    out.extend_from_slice(HASH_FIELD);
    out.extend_from_slice(&hash);
    out.extend_from_slice(b"\"}\n");
    hash
}

fn hex_sha256(parts: &[&[u8]]) -> HexHash {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    let mut hex = [0u8; 64];
    hex::encode_to_slice(hasher.finalize(), &mut hex).expect("64 hex digits for 32 bytes");
    hex
}

/// What a line's own bytes say about it (the links to its neighbours are checked by callers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CheckedLine {
    pub seq: u64,
    pub prev: HexHash,
    pub hash: HexHash,
}

/// Why a line is not a sound record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LineFault {
    /// No `hash` field where the writer puts it: not a line the writer wrote whole.
    NoHash,
    /// The content does not hash to the stated hash: the line was edited.
    HashMismatch { stated: String, computed: String },
    /// The hash is right but the line lacks `seq`, `ts`, `prev` or `kind`.
    NotARecord(String),
}

impl std::fmt::Display for LineFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoHash => f.write_str("does not end with a valid \"hash\" field"),
            Self::HashMismatch { stated, computed } => write!(
                f,
                "hash mismatch: the record was changed after it was written (it states hash \
                 {}..., its content hashes to {}...)",
                &stated[..12],
                &computed[..12]
            ),
            Self::NotARecord(why) => write!(f, "not an audit record: {why}"),
        }
    }
}

/// The first 12 digits, enough to tell hashes apart in a message.
pub(super) fn short(hash: &HexHash) -> &str {
    std::str::from_utf8(&hash[..12]).unwrap_or("?")
}

/// Checks a line (without its newline) on its own: the hash matches the content, and the
/// chain fields are there.
pub(super) fn check_line(line: &[u8]) -> Result<CheckedLine, LineFault> {
    let (content, stated) = split_hash(line).ok_or(LineFault::NoHash)?;
    let computed = hex_sha256(&[content, b"}"]);
    if computed != stated {
        return Err(LineFault::HashMismatch {
            stated: hash_str(&stated).to_owned(),
            computed: hash_str(&computed).to_owned(),
        });
    }
    #[derive(Deserialize)]
    struct ChainFields<'a> {
        seq: u64,
        #[allow(dead_code)]
        ts: &'a str,
        prev: &'a str,
        #[allow(dead_code)]
        kind: super::RecordKind,
    }
    let fields: ChainFields =
        serde_json::from_slice(line).map_err(|error| LineFault::NotARecord(error.to_string()))?;
    let prev = parse_hex_hash(fields.prev.as_bytes())
        .ok_or_else(|| LineFault::NotARecord("\"prev\" is not 64 lowercase hex digits".into()))?;
    Ok(CheckedLine {
        seq: fields.seq,
        prev,
        hash: stated,
    })
}

/// The line's bytes before `,"hash":`, and the stated hash.
fn split_hash(line: &[u8]) -> Option<(&[u8], HexHash)> {
    let suffix_start = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    let (content, suffix) = line.split_at(suffix_start);
    let hex = suffix.strip_prefix(HASH_FIELD)?.strip_suffix(b"\"}")?;
    Some((content, parse_hex_hash(hex)?))
}

pub(super) fn parse_hex_hash(text: &[u8]) -> Option<HexHash> {
    let hash: HexHash = text.try_into().ok()?;
    hash.iter()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        .then_some(hash)
}

pub(super) fn hash_str(hash: &HexHash) -> &str {
    std::str::from_utf8(hash).expect("hex digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::GENESIS_PREV;

    fn genesis() -> HexHash {
        GENESIS_PREV.as_bytes().try_into().unwrap()
    }

    fn sealed(body: &str) -> (Vec<u8>, HexHash) {
        let mut out = Vec::new();
        let hash = seal(
            &mut out,
            body.as_bytes(),
            1,
            "2026-11-01T00:00:00.000000Z",
            &genesis(),
        );
        (out, hash)
    }

    #[test]
    fn a_sealed_line_checks_and_hashes_itself_without_the_hash_field() {
        let (line, hash) = sealed(r#"{"kind":"call","tool":"x"}"#);
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.starts_with(r#"{"seq":1,"ts":"2026-11-01T00:00:00.000000Z","prev":"000"#));
        let ending = format!(
            "{},\"hash\":\"{}\"}}\n",
            r#","kind":"call","tool":"x""#,
            hash_str(&hash)
        );
        assert!(text.ends_with(&ending), "{text}");
        let without_hash = text.replace(&format!(r#","hash":"{}""#, hash_str(&hash)), "");
        assert_eq!(
            hex_sha256(&[without_hash.trim_end().as_bytes()]),
            hash,
            "the hash covers the line minus its hash field"
        );
        let checked = check_line(&line[..line.len() - 1]).unwrap();
        assert_eq!(checked.seq, 1);
        assert_eq!(checked.prev, genesis());
        assert_eq!(checked.hash, hash);
    }

    #[test]
    fn every_changed_byte_is_caught() {
        let (line, _) = sealed(r#"{"kind":"call","tool":"x","rule":"r1"}"#);
        let line = &line[..line.len() - 1];
        for index in 0..line.len() {
            let mut edited = line.to_vec();
            edited[index] ^= 0x01;
            assert!(
                check_line(&edited).is_err(),
                "byte {index} changed unnoticed"
            );
        }
    }

    #[test]
    fn a_line_without_a_hash_is_refused() {
        assert_eq!(check_line(b"{\"seq\":1}"), Err(LineFault::NoHash));
        assert_eq!(check_line(b""), Err(LineFault::NoHash));
    }
}
