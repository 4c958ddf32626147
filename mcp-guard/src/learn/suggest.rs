//! `mcp-guard policy suggest`.

use crate::cli::SuggestArgs;

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("policy suggest is being written")]
    NotYet,
}

pub fn run(args: &SuggestArgs) -> Result<(), LearnError> {
    let _ = args;
    Err(LearnError::NotYet)
}
