//! What can stop `policy suggest`.

use std::io;
use std::path::PathBuf;

use crate::policy::PolicyError;

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    /// The audit arguments name no readable log (a directory without `*.jsonl`, say).
    #[error("finding the audit log's files: {0}")]
    AuditFiles(#[source] io::Error),

    #[error("{}: cannot read: {source}", path.display())]
    AuditRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Nothing to learn from: the suggestion would allow nothing at all.
    #[error(
        "no call or egress records of any server in {files}: run the servers in learn mode \
         (\"mode\": \"learn\") through the workflow first"
    )]
    NothingObserved { files: String },

    /// The policy in force (`--policy`) could not be loaded.
    #[error(transparent)]
    Policy(#[from] PolicyError),

    /// The suggestion does not compile. Learned rules are built to be valid, so this is a bug,
    /// or a policy in force whose kept parts stopped being valid.
    #[error("the suggested policy is not valid: {0}")]
    Suggestion(#[source] PolicyError),

    #[error("{}: cannot write the suggested policy: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("writing the output: {0}")]
    Output(#[from] io::Error),

    #[error("serialising: {0}")]
    Json(#[from] serde_json::Error),
}
