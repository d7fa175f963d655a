//! The COM1 16550 UART (vm-superio), wired to a [`ConsoleHub`].

use std::sync::{Arc, Mutex};

use vm_superio::Serial;
use vm_superio::serial::NoEvents;

use super::{BusDevice, IrqLine};
use crate::console::{ConsoleHub, HubWriter};

/// COM1 base port.
pub const COM1_BASE: u64 = 0x3f8;
/// Ports covered by the UART.
pub const COM1_LEN: u64 = 8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

/// A 16550 UART.
#[derive(Debug)]
pub struct SerialDevice(Serial<IrqLine, NoEvents, HubWriter>);

impl SerialDevice {
    /// A UART writing to `hub` and raising `irq`; guest input from the hub
    /// is queued into its receive FIFO.
    pub fn new(irq: IrqLine, hub: &Arc<ConsoleHub>) -> Arc<Mutex<Self>> {
        let dev = Arc::new(Mutex::new(SerialDevice(Serial::new(
            irq,
            HubWriter(Arc::clone(hub)),
        ))));
        let weak = Arc::downgrade(&dev);
        hub.set_input(Box::new(move |bytes| {
            let Some(dev) = weak.upgrade() else {
                return bytes.len();
            };
            let mut dev = dev.lock().unwrap_or_else(|p| p.into_inner());
            let room = dev.0.fifo_capacity().min(bytes.len());
            dev.0.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
        }));
        dev
    }
}

/// The UART's registers and receive FIFO, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// The UART's state.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.0.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Loads a state from [`SerialDevice::snapshot`] (raising the interrupt
    /// it had pending).
    pub fn restore(&mut self, snap: &SerialSnapshot) -> std::io::Result<()> {
        let [dll, dlm, ier, iir, lcr, lsr, mcr, msr, scr] = snap.registers;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlm,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: snap.in_buffer.clone(),
        };
        let irq = IrqLine(self.0.interrupt_evt().0.try_clone()?);
        let out = self.0.writer().clone();
        self.0 = Serial::from_state(&state, irq, NoEvents, out)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [b] = data {
            *b = self.0.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [b] = data {
            // An interrupt that cannot be raised is not the guest's problem to see.
            let _ = self.0.write(offset as u8, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn transmit_reaches_the_hub_and_input_the_fifo() {
        let hub = ConsoleHub::new(None);
        let irq = IrqLine(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let dev = SerialDevice::new(irq, &hub);
        for b in b"hi" {
            dev.lock().unwrap().write(0, &[*b]);
        }
        assert_eq!(hub.history(), b"hi");
        let (_r, _w) = hub.subscribe();
        assert_eq!(hub.input(b"x"), 1);
        let mut lsr = [0u8];
        dev.lock().unwrap().read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rx = [0u8];
        dev.lock().unwrap().read(0, &mut rx);
        assert_eq!(rx, *b"x");
    }

    #[test]
    fn state_survives_a_snapshot_round_trip() {
        let hub = ConsoleHub::new(None);
        let irq = IrqLine(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let dev = SerialDevice::new(irq, &hub);
        dev.lock().unwrap().write(3, &[0x03]); // LCR: 8N1
        dev.lock().unwrap().write(7, &[0x5a]); // scratch
        let (_r, _w) = hub.subscribe();
        assert_eq!(hub.input(b"ab"), 2);
        let snap = dev.lock().unwrap().snapshot();
        assert_eq!(snap.in_buffer, b"ab");
        let hub2 = ConsoleHub::new(None);
        let dev2 = SerialDevice::new(IrqLine(EventFd::new(libc::EFD_NONBLOCK).unwrap()), &hub2);
        dev2.lock().unwrap().restore(&snap).unwrap();
        assert_eq!(dev2.lock().unwrap().snapshot(), snap);
        let mut b = [0u8];
        dev2.lock().unwrap().read(7, &mut b);
        assert_eq!(b, [0x5a]);
        dev2.lock().unwrap().read(0, &mut b);
        assert_eq!(b, *b"a");
    }
}
