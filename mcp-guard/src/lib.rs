//! mcp-guard: the enforcement layer for the Model Context Protocol.
//!
//! The modules follow the pipeline: `transport` (the HTTP and stdio fronts agents talk to),
//! `mcp` (JSON-RPC and protocol revisions), `policy` (what is allowed), `proxy` (the
//! per-message pipeline), `upstream` (the real servers), `egress` (kernel confinement of the
//! server processes), `control` (the local socket other fronts use to place their children),
//! `metrics`, `learn` (least-privilege policy suggestion from audit logs), and `daemon`
//! (wiring, signals, reload).
pub mod answer_polling;
pub mod audit;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod egress;
pub mod identity;
pub mod learn;
pub mod logging;
pub mod mcp;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod service;
pub mod transport;
pub mod upstream;

/// One line for an error and its sources, skipping a source whose text the line already holds
/// (many errors embed their source in their own message).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// Runs `future`, turning a panic inside it into `Err` with the panic's message, so that a
/// connection's task can answer with an error and go on serving instead of unwinding.
pub async fn catch_panic<F: std::future::Future>(future: F) -> Result<F::Output, String> {
    use futures_util::FutureExt as _;
    std::panic::AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|message| message.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default()
        })
}

/// What the library's unit tests share.
#[cfg(test)]
pub(crate) mod test_support {
    /// Replaces the file at `path` as deployment tools do: a new file renamed over it, so a
    /// reader sees the old file or the new one, and the inode changes.
    pub fn replace_file(path: &std::path::Path, contents: &str) {
        let next = path.with_extension("next");
        std::fs::write(&next, contents).unwrap();
        std::fs::rename(&next, path).unwrap();
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("opening x: {source}")]
    struct Embeds {
        source: std::io::Error,
    }

    #[test]
    fn error_chain_does_not_repeat_embedded_sources() {
        let error = Embeds {
            source: std::io::Error::other("gone"),
        };
        assert_eq!(super::error_chain(&error), "opening x: gone");
    }

    #[tokio::test]
    async fn a_panic_comes_back_as_its_message() {
        assert_eq!(super::catch_panic(async { 7 }).await, Ok(7));
        let literal = super::catch_panic(async { panic!("a literal") }).await;
        assert_eq!(literal, Err::<(), _>("a literal".to_owned()));
        let formatted = super::catch_panic(async { panic!("formatted {}", 2) }).await;
        assert_eq!(formatted, Err::<(), _>("formatted 2".to_owned()));
    }
}
