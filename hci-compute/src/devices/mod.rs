//! Emulated devices and the buses vCPU exits are dispatched on.
//!
//! Devices never touch KVM: interrupts are `EventFd`s
//! that the VM manager wires to KVM irqfds, and queue notifications are
//! eventfds it wires to KVM ioeventfds.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

pub use self::bus::{Bus, BusDevice};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: writing the eventfd raises it (KVM irqfd).
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
