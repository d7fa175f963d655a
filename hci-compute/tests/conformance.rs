//! hci-core's hypervisor conformance suite on the KVM VMM, with the test guests.

mod common;

use common::*;
use hci_compute::KvmHypervisor;
use hci_compute::test_guests::Guest;
use hci_core::compute::ExitReason;
use hci_core::testing::hypervisor::HypervisorFixture;

async fn fixture() -> HypervisorFixture {
    require_kvm();
    HypervisorFixture {
        hypervisor: Box::new(KvmHypervisor::new()),
        hello: config("conf-hello", guest(Guest::Hello), 1, ""),
        hello_output: "hello from guest\n".into(),
        hello_exit: ExitReason::Reset,
        spin: config("conf-spin", guest(Guest::Spin), 1, "every=1000000"),
    }
}

hci_core::hypervisor_conformance!(fixture);
