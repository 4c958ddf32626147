use std::path::PathBuf;
use std::sync::Arc;

/// Why the audit log could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file or directory of the log could not be created, read or inspected.
    #[error("audit log: {what} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "creating the directory".
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The record the chain would continue from is damaged, so appending would extend a
    /// chain that no longer verifies. Nothing is written until an operator looks.
    #[error(
        "audit log {}:{line}: {problem}; refusing to continue the chain from it: check the \
         log with `mcp-guard audit verify`, then cut the damaged line or move the file aside",
        path.display()
    )]
    Damaged {
        path: PathBuf,
        /// 1-based line number of the damaged record.
        line: u64,
        problem: String,
    },

    /// Another writer (another process, or another [`super::AuditLog`] of this one) holds the
    /// log: two writers would fork the chain.
    #[error(
        "audit log {}: another process is writing it (it holds {}.lock): only one writer may \
         extend a chain",
        path.display(),
        path.display()
    )]
    InUse { path: PathBuf },

    /// Writing or flushing records failed (disk full, permissions, I/O error). The records
    /// of the failed write are not in the log; later appends try again.
    #[error("audit log {}: writing records failed: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The append committing this record's group stopped before answering (it panicked).
    #[error("the audit log writer has stopped")]
    Closed,
}
