pub fn kernel_object() -> &'static [u8] { aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mcp-guard")) }
