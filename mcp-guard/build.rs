// Builds the kernel programs (mcp-guard-ebpf) for bpfel with the nightly toolchain and
// bpf-linker; `cargo xtask setup` installs both. The object lands in OUT_DIR/mcp-guard.
fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "mcp-guard-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../mcp-guard-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
