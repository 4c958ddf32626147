//! mcp-guard: the enforcement layer for the Model Context Protocol.
//!
//! The modules follow the pipeline: `policy` (what is allowed), `egress` (kernel confinement of
//! the MCP server processes), `control` (the local socket other fronts use to place their
//! children), `metrics`, and `daemon` (wiring, signals, reload).
pub mod cli;
pub mod control;
pub mod daemon;
pub mod egress;
pub mod logging;
pub mod metrics;
pub mod policy;
