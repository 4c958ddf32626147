//! Least privilege from observation: what learn-mode (or any) audit logs show was used, and
//! the minimal policy that allows exactly that (`mcp-guard policy suggest`).
//!
//! `shape` summarises tool arguments into bounded values as calls pass in learn mode;
//! `observe` reads audit logs back into per-server, per-principal usage; `suggest` turns usage
//! into a policy; `scope` reports exposed versus used surface.

pub mod observe;
pub mod scope;
pub mod shape;
pub mod suggest;
