//! The Model Context Protocol as mcp-guard sees it: JSON-RPC messages and protocol revisions.
pub mod jsonrpc;
pub mod revision;
