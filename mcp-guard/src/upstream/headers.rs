//! The `headers` a `url` server gets on every request: its own credentials, which mcp-guard
//! holds so that agents never see them. They are kept current: a header read from a file is
//! read again once the file changes (modification time, size or inode), so a rotated
//! credential reaches the sessions already open, not only those opened after the reload.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::UpstreamError;
use crate::policy::{FileStamp, ValueSource, ValueSourceError, file_stamp};

/// One session's view of its server's `headers`.
pub struct ServerHeaders {
    sources: BTreeMap<String, ValueSource>,
    current: Mutex<Current>,
}

struct Current {
    map: HeaderMap,
    /// The files the headers were last read from, as they were then.
    stamps: Vec<(PathBuf, FileStamp)>,
}

impl ServerHeaders {
    /// Reads every header now; `Err` names the first that cannot be read (the session is
    /// then refused: a server that wants credentials would refuse it anyway).
    pub fn read(sources: &BTreeMap<String, ValueSource>) -> Result<ServerHeaders, UpstreamError> {
        let stamps = stamps_of(sources);
        let map = header_map(sources)?;
        Ok(ServerHeaders {
            sources: sources.clone(),
            current: Mutex::new(Current { map, stamps }),
        })
    }

    /// The headers to send now. A changed file is read again; one that can no longer be read
    /// (replaced by a broken one, or gone) leaves the value it last held in use, and is logged.
    /// Costs a `stat` per header file and a copy of the map; nothing is read or allocated for
    /// the files unless one changed.
    pub fn current(&self) -> HeaderMap {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = current
            .stamps
            .iter()
            .any(|(path, stamp)| file_stamp(path) != *stamp);
        if changed {
            current.stamps = stamps_of(&self.sources);
            match header_map(&self.sources) {
                Ok(map) => current.map = map,
                Err(error) => tracing::warn!(%error,
                    "a changed header file of a url server cannot be read; its last value stays in use"),
            }
        }
        current.map.clone()
    }
}

fn stamps_of(sources: &BTreeMap<String, ValueSource>) -> Vec<(PathBuf, FileStamp)> {
    sources
        .values()
        .filter_map(|source| source.file.as_ref())
        .map(|path| (path.clone(), file_stamp(path)))
        .collect()
}

/// The headers, read now. Marked sensitive: they are credentials, and must not show in debug
/// output.
fn header_map(sources: &BTreeMap<String, ValueSource>) -> Result<HeaderMap, UpstreamError> {
    let mut map = HeaderMap::with_capacity(sources.len());
    for (name, source) in sources {
        let failed = |source| UpstreamError::Header {
            name: name.clone(),
            source,
        };
        let text = source.header_value().map_err(failed)?;
        let mut value =
            HeaderValue::from_str(&text).map_err(|_| failed(ValueSourceError::NotAHeaderValue))?;
        value.set_sensitive(true);
        // Validated with the policy; a name that still fails is left out rather than sent
        // mangled.
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            map.insert(name, value);
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::replace_file;

    fn bearer_from(path: &std::path::Path) -> BTreeMap<String, ValueSource> {
        BTreeMap::from([(
            "Authorization".to_owned(),
            ValueSource {
                file: Some(path.to_owned()),
                prefix: "Bearer ".into(),
                ..ValueSource::default()
            },
        )])
    }

    #[test]
    fn headers_are_read_and_kept_out_of_debug_output() {
        let sources = BTreeMap::from([
            (
                "Authorization".to_owned(),
                ValueSource {
                    value: Some("s3cret".into()),
                    prefix: "Bearer ".into(),
                    ..ValueSource::default()
                },
            ),
            (
                "X-Api-Key".to_owned(),
                ValueSource {
                    env: Some("MCP_GUARD_TEST_SURELY_UNSET".into()),
                    ..ValueSource::default()
                },
            ),
        ]);
        // An unset variable refuses the session, naming the header, never a value.
        let error = ServerHeaders::read(&sources).err().unwrap().to_string();
        assert_eq!(
            error,
            "headers.X-Api-Key: environment variable MCP_GUARD_TEST_SURELY_UNSET is not set"
        );
        let only_set: BTreeMap<_, _> = sources.into_iter().take(1).collect();
        let map = ServerHeaders::read(&only_set).unwrap().current();
        let value = &map["authorization"];
        assert_eq!(value, "Bearer s3cret");
        assert!(value.is_sensitive());
        assert!(!format!("{map:?}").contains("s3cret"));
    }

    #[test]
    fn a_rotated_file_reaches_an_open_session_and_a_broken_one_does_not_replace_it() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "one\n").unwrap();
        let headers = ServerHeaders::read(&bearer_from(&token)).unwrap();
        assert_eq!(headers.current()["authorization"], "Bearer one");

        replace_file(&token, "two\n");
        assert_eq!(headers.current()["authorization"], "Bearer two");

        // Empty, then gone: the last good value stays.
        replace_file(&token, "\n");
        assert_eq!(headers.current()["authorization"], "Bearer two");
        std::fs::remove_file(&token).unwrap();
        assert_eq!(headers.current()["authorization"], "Bearer two");
        replace_file(&token, "three");
        assert_eq!(headers.current()["authorization"], "Bearer three");
    }
}
