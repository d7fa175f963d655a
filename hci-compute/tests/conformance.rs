//! hci-core's hypervisor conformance suite on the KVM VMM, with the test guests.

mod common;

use common::*;
use hci_compute::KvmHypervisor;
use hci_compute::test_guests::Guest;
use hci_core::compute::ExitReason;
use hci_core::testing::hypervisor::HypervisorFixture;

async fn fixture() -> HypervisorFixture {
    require_kvm();
    // Cases run in parallel: each fixture gets run directories of its own
    // (`config` empties the directory it is given).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    HypervisorFixture {
        hypervisor: Box::new(KvmHypervisor::new()),
        hello: config(&format!("conf-hello-{n}"), guest(Guest::Hello), 1, ""),
        hello_output: "hello from guest\n".into(),
        hello_exit: ExitReason::Reset,
        spin: config(
            &format!("conf-spin-{n}"),
            guest(Guest::Spin),
            1,
            "every=1000000",
        ),
    }
}

hci_core::hypervisor_conformance!(fixture);
