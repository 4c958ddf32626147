//! Least privilege from observation: what learn-mode (or any) audit logs show was used, and
//! the minimal policy that allows exactly that (`mcp-guard policy suggest`).
//!
//! `shape` summarises tool arguments into bounded values as calls pass in learn mode;
//! `observe` reads audit logs back into per-server, per-caller usage; `constraints` narrows
//! observed argument shapes into JSON Schema; `suggest` turns usage into a policy; `scope`
//! reports exposed versus used surface; `command` is the CLI around them.

pub mod command;
pub mod constraints;
mod error;
pub mod observe;
pub mod scope;
pub mod shape;
pub mod suggest;

pub use error::LearnError;
