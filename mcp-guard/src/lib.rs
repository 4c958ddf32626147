//! mcp-guard: the enforcement layer for the Model Context Protocol.
//!
//! The modules follow the pipeline: `transport` (the HTTP and stdio fronts agents talk to),
//! `mcp` (JSON-RPC and protocol revisions), `policy` (what is allowed), `proxy` (the
//! per-message pipeline), `upstream` (the real servers), `egress` (kernel confinement of the
//! server processes), `control` (the local socket other fronts use to place their children),
//! `metrics`, `learn` (least-privilege policy suggestion from audit logs), and `daemon`
//! (wiring, signals, reload).
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
}
