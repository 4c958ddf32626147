//! The log's files: rotated files beside the live one, the order a chain runs through them,
//! and the last record of a file.
//!
//! The live file is `<path>`; rotation renames it to `<path>.N` with N one more than the
//! highest already there, so the chain runs `<path>.1`, `<path>.2`, ..., `<path>`.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::chain::{self, CheckedLine};

/// `<path>.<n>`.
pub fn rotated_path(path: &Path, n: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The numbers N of the existing `<path>.N`, ascending.
pub fn rotated_numbers(path: &Path) -> io::Result<Vec<u64>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(Vec::new());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some((base, Some(n))) = split_rotation(&entry.file_name())
            && base == name.as_bytes()
        {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// `name` as (base, rotation number): `audit.jsonl.12` is (`audit.jsonl`, 12), `audit.jsonl`
/// is (`audit.jsonl`, None). None for names that are neither.
fn split_rotation(name: &OsStr) -> Option<(&[u8], Option<u64>)> {
    let bytes = name.as_bytes();
    if let Some(dot) = bytes.iter().rposition(|&b| b == b'.') {
        let digits = &bytes[dot + 1..];
        if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) && dot > 0 {
            let n = std::str::from_utf8(digits).ok()?.parse().ok()?;
            return Some((&bytes[..dot], Some(n)));
        }
    }
    Some((bytes, None))
}

/// The files named on a command line, in chain order.
///
/// A directory stands for the logs in it: every `*.jsonl` with its rotated `*.jsonl.N`.
/// Files of one log (`X`, `X.1`, `X.2`, ...) are put in chain order whatever order they were
/// given in (so a shell glob such as `audit.jsonl*` works): rotated files by number, then the
/// live file. Separate logs keep the order they were given in. The writer's lock file
/// (`X.lock`) is left out.
pub fn chain_order(arguments: &[PathBuf]) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for argument in arguments {
        if argument.is_dir() {
            let before = files.len();
            for entry in std::fs::read_dir(argument)? {
                let path = entry?.path();
                let is_log = path
                    .file_name()
                    .and_then(split_rotation)
                    .is_some_and(|(base, _)| base.ends_with(b".jsonl"));
                if is_log && path.is_file() {
                    files.push(path);
                }
            }
            if files.len() == before {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{}: no audit log in this directory (*.jsonl, *.jsonl.N)",
                        argument.display()
                    ),
                ));
            }
            // Directory order is arbitrary; sort so that separate logs come out the same way
            // every time.
            files[before..].sort();
        } else if !argument.as_os_str().as_bytes().ends_with(b".jsonl.lock") {
            // The writer's lock file (which `audit.jsonl*` picks up) holds no records.
            files.push(argument.clone());
        }
    }
    // Group by log (directory and base name), groups in order of first appearance.
    let key = |path: &Path| -> (PathBuf, Vec<u8>, u64) {
        let (base, n) = path
            .file_name()
            .and_then(split_rotation)
            .map(|(base, n)| (base.to_vec(), n))
            .unwrap_or_default();
        let dir = path.parent().map(Path::to_owned).unwrap_or_default();
        // The live file comes after every rotated one.
        (dir, base, n.unwrap_or(u64::MAX))
    };
    let mut groups: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let mut keyed: Vec<(usize, u64, PathBuf)> = Vec::new();
    for path in files {
        let (dir, base, n) = key(&path);
        let group = match groups.iter().position(|g| g.0 == dir && g.1 == base) {
            Some(index) => index,
            None => {
                groups.push((dir, base));
                groups.len() - 1
            }
        };
        if !keyed.iter().any(|(_, _, seen)| *seen == path) {
            keyed.push((group, n, path));
        }
    }
    keyed.sort_by_key(|(group, n, _)| (*group, *n));
    Ok(keyed.into_iter().map(|(_, _, path)| path).collect())
}

/// The last record of a file, checked on its own.
#[derive(Debug)]
pub(super) enum Tail {
    /// The file is empty (or missing).
    Empty,
    /// The last line is a sound record.
    Record(CheckedLine),
    /// The last line is damaged: `line` is its 1-based number.
    Damaged { line: u64, problem: String },
}

/// Reads the end of `path` back to the start of its last line and checks that line.
pub(super) fn read_tail(path: &Path) -> io::Result<Tail> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Tail::Empty),
        Err(error) => return Err(error),
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Tail::Empty);
    }
    let damaged = |problem: String| -> io::Result<Tail> {
        Ok(Tail::Damaged {
            line: count_newlines(path)? + 1,
            problem,
        })
    };
    // Read backwards in growing chunks until the newline before the last line shows up.
    let mut chunk = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(chunk);
        let mut tail = Vec::with_capacity((len - start) as usize);
        file.seek(SeekFrom::Start(start))?;
        (&mut file).take(len - start).read_to_end(&mut tail)?;
        let Some(body) = tail.strip_suffix(b"\n") else {
            return damaged(
                "truncated: the last line is incomplete (no newline at its end), as when \
                 a write was cut short"
                    .into(),
            );
        };
        let line_start = match memchr::memrchr(b'\n', body) {
            Some(newline) => newline + 1,
            None if start == 0 => 0,
            None => {
                chunk *= 4;
                continue;
            }
        };
        let line = &body[line_start..];
        return match chain::check_line(line) {
            Ok(checked) => Ok(Tail::Record(checked)),
            // The damaged line is the last one: one past the newlines before it.
            Err(fault) => Ok(Tail::Damaged {
                line: count_newlines(path)?,
                problem: fault.to_string(),
            }),
        };
    }
}

/// Cuts an incomplete last line off `path`: the bytes after its last newline. Returns how many
/// bytes were cut (0 when the file ends with a newline, is empty or is missing).
///
/// Only a write cut short leaves such a line (a crash mid-write; a power loss with the tail
/// zero-filled). The writer acknowledges a record only once the whole group that holds it,
/// final newline included, is written and flushed, so the cut line was never acknowledged:
/// no call went ahead on it.
pub(super) fn cut_torn_tail(path: &Path) -> io::Result<u64> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let metadata = file.metadata()?;
    // Only a regular file can hold a torn line (the log may be a device, as in the tests).
    if !metadata.is_file() || metadata.len() == 0 {
        return Ok(0);
    }
    let len = metadata.len();
    let mut end = len;
    let mut buffer = vec![0u8; 64 * 1024];
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(buffer.len() as u64);
        let chunk = &mut buffer[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if end == len && chunk.last() == Some(&b'\n') {
            return Ok(0);
        }
        if let Some(newline) = memchr::memrchr(b'\n', chunk) {
            break start + newline as u64 + 1;
        }
        end = start;
    };
    file.set_len(keep)?;
    file.sync_all()?;
    Ok(len - keep)
}

fn count_newlines(path: &Path) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut count = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(count);
        }
        count += memchr::memchr_iter(b'\n', &buffer[..read]).count() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(names: &[&str]) -> Vec<PathBuf> {
        names.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn rotated_files_come_first_by_number_then_the_live_file() {
        let given = paths(&[
            "/l/audit.jsonl",
            "/l/audit.jsonl.lock",
            "/l/audit.jsonl.10",
            "/l/audit.jsonl.2",
            "/l/audit.jsonl.1",
        ]);
        assert_eq!(
            chain_order(&given).unwrap(),
            paths(&[
                "/l/audit.jsonl.1",
                "/l/audit.jsonl.2",
                "/l/audit.jsonl.10",
                "/l/audit.jsonl"
            ])
        );
    }

    #[test]
    fn separate_logs_keep_their_order() {
        let given = paths(&["/b/x.jsonl", "/a/y.jsonl.1", "/b/x.jsonl.1", "/a/y.jsonl"]);
        assert_eq!(
            chain_order(&given).unwrap(),
            paths(&["/b/x.jsonl.1", "/b/x.jsonl", "/a/y.jsonl.1", "/a/y.jsonl"])
        );
    }

    #[test]
    fn a_directory_stands_for_its_logs() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["audit.jsonl", "audit.jsonl.2", "audit.jsonl.1", "notes.txt"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let files = chain_order(&[dir.path().to_owned()]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["audit.jsonl.1", "audit.jsonl.2", "audit.jsonl"]);
        let empty = tempfile::tempdir().unwrap();
        assert!(chain_order(&[empty.path().to_owned()]).is_err());
    }

    #[test]
    fn rotated_numbers_are_found_beside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "a.jsonl",
            "a.jsonl.3",
            "a.jsonl.1",
            "a.jsonl.x",
            "b.jsonl.7",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(
            rotated_numbers(&dir.path().join("a.jsonl")).unwrap(),
            [1, 3]
        );
        assert_eq!(
            rotated_path(Path::new("/l/a.jsonl"), 4),
            Path::new("/l/a.jsonl.4")
        );
    }
}
