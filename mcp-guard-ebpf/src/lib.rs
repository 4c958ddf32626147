#![no_std]
//! Empty library target: lets `mcp-guard` list this crate as a build dependency so cargo
//! rebuilds the daemon when the kernel programs change. The programs are in `main.rs`.
