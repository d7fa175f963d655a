//! Detects a paravirtual KVM (`kvm_pvm`), on which guest CPL0 code is
//! emulated and real Linux guests do not boot in useful time: tests that need
//! hardware virtualization are then marked ignored (with the reason shown).

fn main() {
    println!("cargo:rustc-check-cfg=cfg(kvm_pvm)");
    println!("cargo:rerun-if-changed=build.rs");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        println!("cargo:rustc-cfg=kvm_pvm");
    }
}
