//! The Model Context Protocol as mcp-guard sees it: JSON-RPC messages, the lines that carry
//! them over stdio, and protocol revisions.
pub mod jsonrpc;
pub mod lines;
pub mod revision;
