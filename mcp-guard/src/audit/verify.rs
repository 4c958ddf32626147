//! `audit verify`: walks the chain through the files and reports the first place it breaks.
//!
//! Each line must hash to its stated `hash` (else it was edited), carry the next `seq` (else
//! records are missing or out of order) and name the previous record's hash as `prev` (else
//! records were removed, inserted or reordered). A last line without its newline, or one that
//! does not parse, is a truncated tail.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::chain::{self, HexHash, LineFault};
use super::record::GENESIS_PREV;

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Accept a chain that starts after seq 1, as when older rotated files were archived: the
    /// first record's `prev` is then taken on trust.
    pub partial: bool,
    /// The hex hash of a record known to be in the log (noted from an earlier verify, say):
    /// the chain must reach it, which shows that no whole records were cut from the end since.
    pub head: Option<String>,
}

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    pub records: u64,
    /// 0 when there are no records.
    pub last_seq: u64,
    /// [`GENESIS_PREV`] when there are no records.
    pub last_hash: String,
}

impl fmt::Display for VerifySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ok: {} records, last seq {}, last hash {}",
            self.records, self.last_seq, self.last_hash
        )
    }
}

/// The first place the chain breaks: displays as `FILE:LINE: what`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ChainBreak {
    pub file: PathBuf,
    /// 1-based; None when the problem is the file itself (unreadable) or the chain as a whole.
    pub line: Option<u64>,
    pub problem: String,
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file.display(), self.problem),
            None => write!(f, "{}: {}", self.file.display(), self.problem),
        }
    }
}

/// The record before the one being checked.
struct Previous {
    seq: u64,
    hash: HexHash,
    file: usize,
    line: u64,
}

/// Verifies the chain running through `files`, which must be in chain order (see
/// [`super::files::chain_order`]).
pub fn verify(files: &[PathBuf], options: &VerifyOptions) -> Result<VerifySummary, ChainBreak> {
    let head = match &options.head {
        Some(text) => Some(
            chain::parse_hex_hash(text.as_bytes()).ok_or_else(|| ChainBreak {
                file: PathBuf::from("--head"),
                line: None,
                problem: format!("\"{text}\" is not 64 lowercase hex digits"),
            })?,
        ),
        None => None,
    };
    let mut head_seen = false;
    let mut previous: Option<Previous> = None;
    let mut records = 0u64;
    let mut line = Vec::with_capacity(4096);
    for (file_index, path) in files.iter().enumerate() {
        let last_file = file_index + 1 == files.len();
        let unreadable = |error: io::Error| ChainBreak {
            file: path.clone(),
            line: None,
            problem: format!("cannot read: {error}"),
        };
        let mut reader = BufReader::with_capacity(1 << 20, File::open(path).map_err(unreadable)?);
        let mut number = 0u64;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).map_err(unreadable)? == 0 {
                break;
            }
            number += 1;
            let at = |problem: String| ChainBreak {
                file: path.clone(),
                line: Some(number),
                problem,
            };
            let Some(body) = line.strip_suffix(b"\n") else {
                return Err(at(
                    "truncated: the last line is incomplete (no newline at its end)".into(),
                ));
            };
            let checked = match chain::check_line(body) {
                Ok(checked) => checked,
                Err(fault) => {
                    let at_end = reader.fill_buf().map_err(unreadable)?.is_empty();
                    return Err(at(describe_fault(&fault, last_file && at_end)));
                }
            };
            check_link(&checked, previous.as_ref(), files, options.partial).map_err(at)?;
            head_seen |= head == Some(checked.hash);
            records += 1;
            previous = Some(Previous {
                seq: checked.seq,
                hash: checked.hash,
                file: file_index,
                line: number,
            });
        }
    }
    if let Some(head) = head.filter(|_| !head_seen) {
        return Err(ChainBreak {
            file: files.last().cloned().unwrap_or_default(),
            line: None,
            problem: format!(
                "truncated: the chain ends before the record with hash {} (--head): records \
                 were cut from the end",
                chain::hash_str(&head)
            ),
        });
    }
    Ok(match previous {
        Some(last) => VerifySummary {
            records,
            last_seq: last.seq,
            last_hash: chain::hash_str(&last.hash).to_owned(),
        },
        None => VerifySummary {
            records: 0,
            last_seq: 0,
            last_hash: GENESIS_PREV.to_owned(),
        },
    })
}

fn describe_fault(fault: &LineFault, last_line: bool) -> String {
    match fault {
        LineFault::HashMismatch { .. } => fault.to_string(),
        _ if last_line => format!("truncated: the last line is not a whole record ({fault})"),
        _ => format!("edited: the line {fault}"),
    }
}

/// Checks that `record` follows `previous` (or starts the chain).
fn check_link(
    record: &chain::CheckedLine,
    previous: Option<&Previous>,
    files: &[PathBuf],
    partial: bool,
) -> Result<(), String> {
    let Some(previous) = previous else {
        if partial {
            return Ok(());
        }
        if record.seq != 1 {
            return Err(format!(
                "chain starts at seq {}, not 1: earlier records or files are missing (give \
                 every rotated file, oldest first, or --partial to start here)",
                record.seq
            ));
        }
        if record.prev.as_slice() != GENESIS_PREV.as_bytes() {
            return Err(
                "prev mismatch: the first record's prev is not 64 zeros (a record was \
                 removed from the start)"
                    .into(),
            );
        }
        return Ok(());
    };
    let expected = previous.seq + 1;
    if record.seq > expected {
        let missing = if record.seq == expected + 1 {
            format!("record {expected} is")
        } else {
            format!("records {expected}..{} are", record.seq - 1)
        };
        return Err(format!(
            "seq gap: expected seq {expected}, found {}: {missing} missing or out of order",
            record.seq
        ));
    }
    if record.seq < expected {
        return Err(format!(
            "seq out of order: expected seq {expected}, found {} (records reordered, \
             duplicated or inserted)",
            record.seq
        ));
    }
    if record.prev != previous.hash {
        return Err(format!(
            "prev mismatch: prev {}... is not the hash of the record before it ({}:{}, hash \
             {}...): records were reordered, removed or inserted",
            chain::short(&record.prev),
            display_name(&files[previous.file]),
            previous.line,
            chain::short(&previous.hash)
        ));
    }
    Ok(())
}

fn display_name(path: &Path) -> String {
    path.display().to_string()
}
