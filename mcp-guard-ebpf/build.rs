// Rebuild the kernel object when the linker changes (a new nightly LLVM means a new bpf-linker).
fn main() {
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
