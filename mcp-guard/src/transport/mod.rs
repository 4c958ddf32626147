//! Fronts agents connect to: Streamable HTTP (`http`, over TLS with `tls`) and stdio
//! (`stdio`).
pub mod http;
pub mod serve;
pub mod stdio;
pub mod tls;
