//! hci-core's hypervisor conformance suite on the QEMU backend, with the
//! same PVH test guests as the KVM VMM (QEMU boots them with `-kernel`).
//! Needs `qemu-system-x86_64` (Debian qemu-system-x86) and gcc; runs under
//! TCG where KVM is paravirtual (`kvm_pvm`), KVM elsewhere.

mod common;

use common::*;
use hci_compute::qemu::QemuHypervisor;
use hci_compute::test_guests::Guest;
use hci_core::compute::{ExitReason, VmConfig};
use hci_core::testing::hypervisor::HypervisorFixture;

/// A run directory of its own per fixture (cases run in parallel threads).
fn unique(mut c: VmConfig) -> VmConfig {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    c.run_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("run-qemu")
        .join(format!("{}-{}-{n}", c.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&c.run_dir);
    std::fs::create_dir_all(&c.run_dir).expect("create the run dir");
    c
}

async fn fixture() -> HypervisorFixture {
    let hv = QemuHypervisor::new();
    hv.resolve_binary()
        .expect("the QEMU tests need qemu-system-x86_64 (scripts/install-deps.sh installs it)");
    HypervisorFixture {
        hypervisor: Box::new(hv),
        hello: unique(config("qconf-hello", guest(Guest::Hello), 1, "")),
        hello_output: "hello from guest\n".into(),
        hello_exit: ExitReason::Reset,
        spin: unique(config("qconf-spin", guest(Guest::Spin), 1, "every=1000000")),
    }
}

hci_core::hypervisor_conformance!(fixture);
