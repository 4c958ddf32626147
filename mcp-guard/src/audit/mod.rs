//! The tamper-evident audit log: an append-only file of JSON lines, one record per decision,
//! outcome, session event, policy event and network connection, chained by SHA-256.
//!
//! - [`record`]: what a record says ([`AuditRecord`]);
//! - [`arguments`]: what a record keeps of a call's arguments (a digest, or redacted values);
//! - `chain`: how a record becomes a line and how a line is checked (the format's details);
//! - [`AuditLog`]: the writer (group commit, fsync, rotation, failure handling);
//! - [`verify()`]: `mcp-guard audit verify`, the first place a chain breaks;
//! - [`trace()`]: `mcp-guard audit trace`, what an instruction, session or trace caused.
//!
//! The files of one log are `<path>.1`, `<path>.2`, ... (rotated, oldest first) and `<path>`
//! (live); the chain runs through them in that order, `seq` counting on from file to file.

pub mod arguments;
mod chain;
pub mod command;
mod error;
pub mod files;
pub mod record;
pub mod trace;
pub mod verify;
mod writer;

#[cfg(test)]
mod tests;

pub use arguments::{REDACTED, arguments_digest, redact};
pub use error::AuditError;
pub use files::chain_order;
pub use record::{
    Attribution, AuditDecision, AuditRecord, GENESIS_PREV, Latency, Outcome, OutcomeKind, Protocol,
    RecordKind, Reference, StoredRecord, ToolSeen, Verdict,
};
pub use trace::{TraceQuery, TraceReport, trace};
pub use verify::{ChainBreak, VerifyOptions, VerifySummary, verify};
pub use writer::{AuditCounters, AuditLog};
