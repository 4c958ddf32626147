//! Newline-delimited messages (a stdio server's output, a stdio front's input, the control
//! socket), line by line, holding no more of a line than a bound: a peer that writes an
//! endless line, or a message larger than anyone should buffer, must not make mcp-guard hold
//! it all.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Bytes kept from each end of a line over the bound: enough to find the id of a JSON-RPC
/// response, which SDKs write at the start (Python) or at the end (TypeScript).
const EDGE_BYTES: usize = 256;

/// One line, without its newline.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Whole(Vec<u8>),
    /// A line over the bound, read to its end and dropped: how long it was, and its first and
    /// last bytes.
    TooLong {
        length: usize,
        head: Vec<u8>,
        tail: Vec<u8>,
    },
}

/// Reads lines of at most `max` bytes from `reader`.
pub struct BoundedLines<R> {
    reader: R,
    max: usize,
}

impl<R: AsyncBufRead + Unpin> BoundedLines<R> {
    pub fn new(reader: R, max: usize) -> BoundedLines<R> {
        BoundedLines { reader, max }
    }

    /// The next line; `None` at the end of the output. A last line without its newline
    /// counts.
    pub async fn next(&mut self) -> std::io::Result<Option<Line>> {
        let mut line = Vec::new();
        let mut length = 0;
        let mut tail: Option<Vec<u8>> = None;
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                return Ok((length > 0).then(|| finish(line, length, tail)));
            }
            let newline = available.iter().position(|byte| *byte == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            if tail.is_none() && length + chunk.len() > self.max {
                line.extend_from_slice(chunk);
                tail = Some(last_bytes(&line).to_vec());
                line.truncate(EDGE_BYTES);
            } else if let Some(tail) = tail.as_mut() {
                // The head is the line's first bytes, even under a bound smaller than it.
                let room = EDGE_BYTES.saturating_sub(line.len()).min(chunk.len());
                line.extend_from_slice(&chunk[..room]);
                tail.extend_from_slice(last_bytes(chunk));
                let excess = tail.len().saturating_sub(EDGE_BYTES);
                tail.drain(..excess);
            } else {
                line.extend_from_slice(chunk);
            }
            length += chunk.len();
            let consumed = chunk.len() + usize::from(newline.is_some());
            self.reader.consume(consumed);
            if newline.is_some() {
                return Ok(Some(finish(line, length, tail)));
            }
        }
    }
}

fn last_bytes(bytes: &[u8]) -> &[u8] {
    &bytes[bytes.len().saturating_sub(EDGE_BYTES)..]
}

fn finish(line: Vec<u8>, length: usize, tail: Option<Vec<u8>>) -> Line {
    match tail {
        None => Line::Whole(line),
        Some(tail) => Line::TooLong {
            length,
            head: line,
            tail,
        },
    }
}

/// The id of the JSON-RPC response a message too large to read begins or ends with, if its
/// `id` is a number next to its `"jsonrpc":"2.0"` member (as SDKs write them: TypeScript's
/// `..."jsonrpc":"2.0","id":7}`, Python's `{"jsonrpc":"2.0","id":7,...`). mcp-guard numbers
/// the requests it sends, so a number is all an answer to one of them can carry.
pub fn response_id(head: &[u8], tail: &[u8]) -> Option<i64> {
    [head, tail].into_iter().find_map(|edge| {
        let compact: Vec<u8> = edge
            .iter()
            .copied()
            .filter(|byte| !byte.is_ascii_whitespace())
            .collect();
        id_after(&compact, br#""jsonrpc":"2.0","id":"#).or_else(|| id_before_version(&compact))
    })
}

/// The number that follows `prefix` in `text`.
fn id_after(text: &[u8], prefix: &[u8]) -> Option<i64> {
    let start = find(text, prefix)? + prefix.len();
    let digits: Vec<u8> = text[start..]
        .iter()
        .copied()
        .enumerate()
        .take_while(|(index, byte)| byte.is_ascii_digit() || (*index == 0 && *byte == b'-'))
        .map(|(_, byte)| byte)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// The number in `"id":N,"jsonrpc":"2.0"`.
fn id_before_version(text: &[u8]) -> Option<i64> {
    let version = find(text, br#","jsonrpc":"2.0""#)?;
    let before = &text[..version];
    let start = before.iter().rposition(|byte| *byte == b':')? + 1;
    let key = before[..start].strip_suffix(b":")?;
    if !key.ends_with(br#""id""#) {
        return None;
    }
    std::str::from_utf8(&before[start..]).ok()?.parse().ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(output: &[u8], max: usize, buffer: usize) -> Vec<Line> {
        let reader = tokio::io::BufReader::with_capacity(buffer, output);
        let mut lines = BoundedLines::new(reader, max);
        let mut all = Vec::new();
        while let Some(line) = lines.next().await.unwrap() {
            all.push(line);
        }
        all
    }

    #[tokio::test]
    async fn lines_within_the_bound_are_whole_and_a_longer_one_keeps_only_its_ends() {
        let long = format!("{}middle{}", "a".repeat(300), "z".repeat(300));
        let output = format!("first\n{long}\nlast");
        for buffer in [7, 64, 8192] {
            let lines = lines_of(output.as_bytes(), 100, buffer).await;
            assert_eq!(lines.len(), 3, "buffer {buffer}");
            assert_eq!(lines[0], Line::Whole(b"first".to_vec()));
            assert_eq!(
                lines[1],
                Line::TooLong {
                    length: long.len(),
                    head: long.as_bytes()[..EDGE_BYTES].to_vec(),
                    tail: long.as_bytes()[long.len() - EDGE_BYTES..].to_vec(),
                },
                "buffer {buffer}"
            );
            // The line after an over-long one is read as it was written.
            assert_eq!(lines[2], Line::Whole(b"last".to_vec()));
        }
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_bound_is_whole() {
        let lines = lines_of(b"abcd\nabcde\n", 4, 2).await;
        assert_eq!(lines[0], Line::Whole(b"abcd".to_vec()));
        assert!(matches!(lines[1], Line::TooLong { length: 5, .. }));
    }

    #[test]
    fn the_id_of_a_response_is_found_at_either_end() {
        let typescript = br#"{"result":{"content":[{"type":"text","text":"..."#;
        let typescript_end = br#"..."}]},"jsonrpc":"2.0","id":42}"#;
        assert_eq!(response_id(typescript, typescript_end), Some(42));
        let python = br#"{"jsonrpc": "2.0", "id": 7, "result": {"contents": [{"uri": "file:///a""#;
        assert_eq!(response_id(python, b"...\"}]}}"), Some(7));
        let id_first = br#"{"id":9,"jsonrpc":"2.0","result":{"#;
        assert_eq!(response_id(id_first, b"}}"), Some(9));
        // An `id` deep in the result, with no version beside it, names nobody.
        assert_eq!(response_id(br#"{"result":{"id":3,"#, b"}}"), None);
        assert_eq!(response_id(b"garbage", b"more garbage"), None);
    }
}
