//! The i8042 keyboard controller, as far as "pulse the CPU reset line" goes.
//!
//! A guest writing 0xfe to port 0x64 asks for a reset; the VM manager turns it
//! into [`ExitReason::Reset`](hci_core::compute::ExitReason::Reset).

use std::fmt;
use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;

/// First port of the controller (data port 0x60; command/status is 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Ports covered: 0x60..=0x64.
pub const I8042_LEN: u64 = 5;

/// Calls back when the guest requests a reset.
#[derive(Clone)]
pub struct ResetTrigger(pub Arc<dyn Fn() + Send + Sync>);

impl fmt::Debug for ResetTrigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResetTrigger")
    }
}

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

/// The i8042 on the port bus.
#[derive(Debug)]
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// A controller that calls `on_reset` for a reset request.
    pub fn new(on_reset: ResetTrigger) -> Self {
        I8042(I8042Device::new(on_reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.0.read(offset as u8);
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data {
            let Ok(()) = self.0.write(offset as u8, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn fe_to_command_port_resets() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let mut dev = I8042::new(ResetTrigger(Arc::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        })));
        dev.write(0, &[0xfe]);
        dev.write(4, &[0x01]);
        dev.write(4, &[0xfe, 0xfe]);
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        dev.write(4, &[0xfe]);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        let mut b = [0xaa];
        dev.read(4, &mut b);
        assert_eq!(b, [0]);
    }
}
