//! Fronts agents connect to: Streamable HTTP (`http`, over TLS with `tls`, behind proxies
//! with `forwarded`) and stdio (`stdio`).
pub mod forwarded;
pub mod http;
pub mod serve;
pub mod stdio;
pub mod tls;
