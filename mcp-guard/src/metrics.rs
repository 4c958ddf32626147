//! Prometheus metrics, served as text at `/metrics` on the policy's `metrics_listen` address.
//! Label values come from the policy (server names, verdicts), never from raw traffic.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    registry: Registry,
    /// Connection and datagram attempts by guarded processes, as the kernel judged them.
    pub egress_attempts: IntCounterVec,
    /// Events the kernel could not put on the full ring buffer.
    pub egress_events_lost: IntCounter,
    pub egress_guarded_cgroups: IntGauge,
    pub egress_allow_prefixes: IntGauge,
    pub egress_sessions_opened: IntCounter,
    pub egress_dns_resolutions: IntCounterVec,
    pub policy_reloads: IntCounterVec,
    pub build_info: IntGaugeVec,
    /// Every authorisation decision, by server, method, tool, decision and rule id.
    pub decisions: IntCounterVec,
    /// Time per request, by server and stage (policy, upstream, total).
    pub request_duration: HistogramVec,
    pub active_sessions: IntGauge,
    pub upstream_errors: IntCounterVec,
    /// Requests a `url` server answered 401 or 403, by server: it refuses the credentials
    /// mcp-guard sends it (`headers`), or wants some.
    pub upstream_credentials_rejected: IntCounterVec,
    /// Server notifications kept from an agent that may not see them, by server and method
    /// (the few methods that are ever withheld).
    pub notifications_withheld: IntCounterVec,
    /// Sessions the HTTP front refused to open because a limit of open sessions was reached,
    /// by reason (`daemon_limit`, `principal_limit`).
    pub sessions_refused: IntCounterVec,
    /// TLS handshakes on the HTTP front that failed, by reason (`error`, `timeout`).
    pub tls_handshake_failures: IntCounterVec,
    /// Requests the HTTP front refused before any policy decision because the caller could
    /// not be authenticated, by reason (a fixed set, see `AuthError::kind`).
    pub auth_failures: IntCounterVec,
    /// Time to authenticate a request's bearer token (accepted or refused), outside
    /// `request_duration`, which starts once the caller is known.
    pub authentication_duration: Histogram,
    /// Audit records written and audit write failures (shared with the audit writer).
    pub audit: crate::audit::AuditCounters,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let metrics = Metrics {
            egress_attempts: IntCounterVec::new(
                Opts::new(
                    "mcp_guard_egress_attempts_total",
                    "Connection and datagram attempts from guarded MCP server processes, by server, verdict and protocol",
                ),
                &["server", "verdict", "protocol"],
            )
            .expect("metric"),
            egress_events_lost: IntCounter::new(
                "mcp_guard_egress_ringbuf_events_lost_total",
                "Egress events the kernel dropped because the ring buffer was full",
            )
            .expect("metric"),
            egress_guarded_cgroups: IntGauge::new(
                "mcp_guard_egress_guarded_cgroups",
                "Cgroups currently confined by the egress programs",
            )
            .expect("metric"),
            egress_allow_prefixes: IntGauge::new(
                "mcp_guard_egress_allow_prefixes",
                "Address prefixes in the kernel allow-list",
            )
            .expect("metric"),
            egress_sessions_opened: IntCounter::new(
                "mcp_guard_egress_sessions_opened_total",
                "Guarded session cgroups created",
            )
            .expect("metric"),
            egress_dns_resolutions: IntCounterVec::new(
                Opts::new(
                    "mcp_guard_egress_dns_resolutions_total",
                    "Resolutions of host names in egress rules, by result",
                ),
                &["result"],
            )
            .expect("metric"),
            policy_reloads: IntCounterVec::new(
                Opts::new(
                    "mcp_guard_policy_reloads_total",
                    "Policy reloads, by result (applied or refused)",
                ),
                &["result"],
            )
            .expect("metric"),
            build_info: IntGaugeVec::new(
                Opts::new("mcp_guard_build_info", "Always 1; labels say which build runs"),
                &["version"],
            )
            .expect("metric"),
            decisions: IntCounterVec::new(
                Opts::new(
                    "mcp_guard_decisions_total",
                    "Authorisation decisions, by server, method, tool (named in the policy or listed by the server, else other), decision (allow, deny, would_deny) and rule id",
                ),
                &["server", "method", "tool", "decision", "rule"],
            )
            .expect("metric"),
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "mcp_guard_request_duration_seconds",
                    "Time spent per request, by server and stage (policy, upstream, total)",
                )
                .buckets(vec![
                    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001,
                    0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["server", "stage"],
            )
            .expect("metric"),
            active_sessions: IntGauge::new(
                "mcp_guard_active_sessions",
                "Agent sessions currently open",
            )
            .expect("metric"),
            upstream_credentials_rejected: IntCounterVec::new(
                Opts::new(
                    "mcp_guard_upstream_credentials_rejected_total",
                    "Requests a url server answered with HTTP 401 or 403 (it refuses or lacks the credentials of the server's headers), by server",
                ),
                &["server"],
            )
            .expect("metric"),
            upstream_errors: IntCounterVec::new(
                Opts::new(
                    "mcp_guard_upstream_errors_total",
                    "Requests refused because the upstream server failed, by server",
                ),
                &["server"],
            )
            .expect("metric"),
            notifications_withheld: IntCounterVec::new(
                Opts::new(
                    "mcp_guard_notifications_withheld_total",
                    "Server notifications kept from an agent that may not see them, by server and method",
                ),
                &["server", "method"],
            )
            .expect("metric"),
            sessions_refused: IntCounterVec::new(
                Opts::new(
                    "mcp_guard_sessions_refused_total",
                    "Sessions refused because the daemon's or the principal's limit of open sessions was reached, by reason",
                ),
                &["reason"],
            )
            .expect("metric"),
            tls_handshake_failures: IntCounterVec::new(
                Opts::new(
                    "mcp_guard_tls_handshake_failures_total",
                    "TLS handshakes on the HTTP front that failed or timed out, by reason",
                ),
                &["reason"],
            )
            .expect("metric"),
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "mcp_guard_auth_failures_total",
                    "Requests refused with HTTP 401 because the caller's bearer token was missing or invalid, by reason",
                ),
                &["reason"],
            )
            .expect("metric"),
            authentication_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "mcp_guard_authentication_duration_seconds",
                    "Time to check the bearer token of a request on the HTTP front (accepted or refused)",
                )
                .buckets(vec![
                    0.000_001, 0.000_005, 0.000_01, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001,
                    0.005,
                ]),
            )
            .expect("metric"),
            audit: crate::audit::AuditCounters::default(),
            registry,
        };
        metrics.register_all();
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Arc::new(metrics)
    }

    fn register_all(&self) {
        let collectors: [Box<dyn prometheus::core::Collector>; 22] = [
            Box::new(self.audit.records_written.clone()),
            Box::new(self.audit.failures.clone()),
            Box::new(self.audit.flush_failures.clone()),
            Box::new(self.audit.unflushed_bytes.clone()),
            Box::new(self.decisions.clone()),
            Box::new(self.request_duration.clone()),
            Box::new(self.active_sessions.clone()),
            Box::new(self.upstream_errors.clone()),
            Box::new(self.upstream_credentials_rejected.clone()),
            Box::new(self.notifications_withheld.clone()),
            Box::new(self.auth_failures.clone()),
            Box::new(self.authentication_duration.clone()),
            Box::new(self.sessions_refused.clone()),
            Box::new(self.tls_handshake_failures.clone()),
            Box::new(self.egress_attempts.clone()),
            Box::new(self.egress_events_lost.clone()),
            Box::new(self.egress_guarded_cgroups.clone()),
            Box::new(self.egress_allow_prefixes.clone()),
            Box::new(self.egress_sessions_opened.clone()),
            Box::new(self.egress_dns_resolutions.clone()),
            Box::new(self.policy_reloads.clone()),
            Box::new(self.build_info.clone()),
        ];
        for collector in collectors {
            self.registry
                .register(collector)
                .expect("metric names are unique");
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

/// Serves `/metrics` on `listener` for as long as the daemon runs, closing connections that
/// send no request head within `header_read_timeout`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    header_read_timeout: std::time::Duration,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    let forever = std::future::pending();
    crate::transport::serve::serve_until(
        listener,
        app,
        forever,
        header_read_timeout,
        std::time::Duration::ZERO,
    )
    .await;
}

/// Binds the metrics address (a clear error names it when taken).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_names_with_units() {
        let metrics = Metrics::new();
        metrics
            .egress_attempts
            .with_label_values(&["web", "refuse", "tcp"])
            .inc();
        let text = metrics.render();
        assert!(text.contains(
            "mcp_guard_egress_attempts_total{protocol=\"tcp\",server=\"web\",verdict=\"refuse\"} 1"
        ));
        assert!(text.contains("mcp_guard_build_info{version="));
    }
}
