//! The i8042 PS/2 controller with a keyboard behind it.
//!
//! Two jobs: the guest's way to reset the machine (0xfe, "pulse output line
//! 0", or clearing bit 0 of the output port — the VM manager turns it into
//! [`ExitReason::Reset`](hci_core::compute::ExitReason::Reset)), and the
//! host's way to ask a guest to shut down: [`I8042::ctrl_alt_del`] queues the
//! key presses and raises IRQ 1, which a Linux guest answers by rebooting
//! (Firecracker's `SendCtrlAltDel`).
//!
//! Emulated: the controller commands Linux's i8042 driver issues at probe
//! (read/write the command byte, self-tests, enable/disable, output port),
//! the keyboard commands atkbd sends (reset, identify, LEDs, typematic rate,
//! scan-code set, enable/disable scanning, echo), a 16-byte output buffer,
//! and translation: with bit 6 of the command byte set the keyboard speaks
//! scan-code set 1, otherwise set 2 (the default, as on Firecracker). There is
//! no mouse (aux) port; boot Linux with `i8042.noaux` to skip probing it.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use super::{BusDevice, IrqLine};

/// First port of the controller (data port 0x60; command/status is 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Ports covered: 0x60..=0x64.
pub const I8042_LEN: u64 = 5;
/// The keyboard's interrupt line.
pub const KBD_IRQ: u32 = 1;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

// Status register bits.
const SR_OUTPUT_FULL: u8 = 0x01;
const SR_SYSTEM: u8 = 0x04;
const SR_LAST_WAS_COMMAND: u8 = 0x08;
const SR_UNLOCKED: u8 = 0x10;

// Command byte ("CTR") bits.
const CB_KBD_INT: u8 = 0x01;
const CB_SYSTEM: u8 = 0x04;
const CB_KBD_DISABLED: u8 = 0x10;
const CB_AUX_DISABLED: u8 = 0x20;
const CB_TRANSLATE: u8 = 0x40;

// Replies.
const ACK: u8 = 0xfa;
const SELF_TEST_OK: u8 = 0x55;
const BAT_OK: u8 = 0xaa;

/// Bytes the output buffer holds (as Firecracker's).
const BUFFER: usize = 16;

/// Ctrl, Alt and Delete pressed then released, scan-code set 2.
const CTRL_ALT_DEL_SET2: &[u8] = &[
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
/// The same in set 1 (what a translating controller delivers).
const CTRL_ALT_DEL_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// Calls back when the guest requests a reset.
#[derive(Clone)]
pub struct ResetTrigger(pub Arc<dyn Fn() + Send + Sync>);

impl fmt::Debug for ResetTrigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResetTrigger")
    }
}

/// What a controller command wants as its parameter (the next data byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Pending {
    None,
    /// 0x60: the new command byte.
    CommandByte,
    /// 0xd1: the new output port.
    OutputPort,
    /// 0xd2: a byte to place in the buffer as if the keyboard sent it.
    KeyboardEcho,
    /// 0xd3/0xd4: a byte for the aux port, which does not exist.
    Aux,
    /// A keyboard command's parameter (LEDs, typematic rate, scan-code set).
    KeyboardParam(u8),
}

/// The controller and its keyboard.
#[derive(Debug)]
pub struct I8042 {
    reset: ResetTrigger,
    irq: Option<IrqLine>,
    command_byte: u8,
    output_port: u8,
    status: u8,
    pending: Pending,
    scanning: bool,
    buffer: VecDeque<u8>,
}

/// The keyboard buffer has no room for a key sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the guest's keyboard buffer is full (the guest is not reading its keyboard)")]
pub struct KeyboardBusy;

/// The controller's state, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042Snapshot {
    command_byte: u8,
    output_port: u8,
    status: u8,
    pending: Pending,
    scanning: bool,
    buffer: Vec<u8>,
}

impl I8042 {
    /// The controller's state.
    pub fn snapshot(&self) -> I8042Snapshot {
        I8042Snapshot {
            command_byte: self.command_byte,
            output_port: self.output_port,
            status: self.status,
            pending: self.pending,
            scanning: self.scanning,
            buffer: self.buffer.iter().copied().collect(),
        }
    }

    /// Loads a state from [`I8042::snapshot`].
    pub fn restore(&mut self, s: &I8042Snapshot) {
        self.command_byte = s.command_byte;
        self.output_port = s.output_port;
        self.status = s.status;
        self.pending = s.pending;
        self.scanning = s.scanning;
        self.buffer = s.buffer.iter().copied().take(BUFFER).collect();
    }

    /// A controller that calls `on_reset` for a reset request and raises
    /// `irq` (IRQ 1) when it has data for the guest.
    pub fn new(on_reset: ResetTrigger, irq: Option<IrqLine>) -> Self {
        I8042 {
            reset: on_reset,
            irq,
            command_byte: CB_KBD_INT | CB_SYSTEM,
            output_port: 0x01,
            status: SR_SYSTEM | SR_UNLOCKED,
            pending: Pending::None,
            scanning: true,
            buffer: VecDeque::with_capacity(BUFFER),
        }
    }

    /// Presses and releases Ctrl-Alt-Del. Linux guests reboot (or power off,
    /// per their `ctrl-alt-del` setting); a disabled keyboard ignores it.
    pub fn ctrl_alt_del(&mut self) -> Result<(), KeyboardBusy> {
        if !self.scanning || self.command_byte & CB_KBD_DISABLED != 0 {
            return Ok(());
        }
        let keys = if self.command_byte & CB_TRANSLATE != 0 {
            CTRL_ALT_DEL_SET1
        } else {
            CTRL_ALT_DEL_SET2
        };
        if self.buffer.len() + keys.len() > BUFFER {
            return Err(KeyboardBusy);
        }
        self.buffer.extend(keys);
        self.interrupt();
        Ok(())
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.buffer.len() < BUFFER {
                self.buffer.push_back(b);
            }
        }
        self.interrupt();
    }

    fn interrupt(&self) {
        if self.command_byte & CB_KBD_INT != 0
            && !self.buffer.is_empty()
            && let Some(irq) = &self.irq
        {
            // An interrupt that cannot be raised is not the guest's problem to see.
            let _ = irq.0.write(1);
        }
    }

    fn status(&self) -> u8 {
        let full = if self.buffer.is_empty() {
            0
        } else {
            SR_OUTPUT_FULL
        };
        self.status | full
    }

    fn read_data(&mut self) -> u8 {
        let v = self.buffer.pop_front().unwrap_or(0);
        self.interrupt();
        v
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SR_LAST_WAS_COMMAND;
        self.pending = Pending::None;
        match cmd {
            0x20 => self.push(&[self.command_byte]),
            0x60 => self.pending = Pending::CommandByte,
            0xa7 => self.command_byte |= CB_AUX_DISABLED,
            0xa8 => self.command_byte &= !CB_AUX_DISABLED,
            // Aux interface test: "clock line stuck low", i.e. no mouse.
            0xa9 => self.push(&[0x01]),
            0xaa => {
                self.status |= SR_SYSTEM;
                self.push(&[SELF_TEST_OK]);
            }
            0xab => self.push(&[0x00]),
            0xad => self.command_byte |= CB_KBD_DISABLED,
            0xae => self.command_byte &= !CB_KBD_DISABLED,
            0xc0 => self.push(&[0x00]),
            0xd0 => self.push(&[self.output_port]),
            0xd1 => self.pending = Pending::OutputPort,
            0xd2 => self.pending = Pending::KeyboardEcho,
            0xd3 | 0xd4 => self.pending = Pending::Aux,
            // Pulse output lines; line 0 (bit clear) is the CPU reset.
            0xf0..=0xff if cmd & 1 == 0 => (self.reset.0)(),
            _ => {}
        }
    }

    fn write_data(&mut self, v: u8) {
        self.status &= !SR_LAST_WAS_COMMAND;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::CommandByte => {
                self.command_byte = v;
                self.status = (self.status & !SR_SYSTEM) | (v & CB_SYSTEM);
            }
            Pending::OutputPort => {
                self.output_port = v;
                if v & 1 == 0 {
                    (self.reset.0)();
                }
            }
            Pending::KeyboardEcho => self.push(&[v]),
            Pending::Aux => {}
            Pending::KeyboardParam(cmd) => self.keyboard_param(cmd, v),
            Pending::None => self.keyboard_command(v),
        }
    }

    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            // Set LEDs, typematic rate, scan-code set: a parameter follows.
            0xed | 0xf3 | 0xf0 => {
                self.pending = Pending::KeyboardParam(cmd);
                self.push(&[ACK]);
            }
            0xee => self.push(&[0xee]),
            // Identify: an MF2 keyboard (translated ID when translating).
            0xf2 => {
                let id = if self.command_byte & CB_TRANSLATE != 0 {
                    0x41
                } else {
                    0x83
                };
                self.push(&[ACK, 0xab, id]);
            }
            0xf4 => {
                self.scanning = true;
                self.push(&[ACK]);
            }
            0xf5 => {
                self.scanning = false;
                self.push(&[ACK]);
            }
            0xf6 => {
                self.scanning = true;
                self.push(&[ACK]);
            }
            0xff => {
                self.scanning = true;
                self.push(&[ACK, BAT_OK]);
            }
            _ => self.push(&[ACK]),
        }
    }

    fn keyboard_param(&mut self, cmd: u8, v: u8) {
        if cmd == 0xf0 && v == 0 {
            // "Which set?": set 2 (as seen through translation, 0x41).
            let set = if self.command_byte & CB_TRANSLATE != 0 {
                0x41
            } else {
                0x02
            };
            self.push(&[ACK, set]);
        } else {
            self.push(&[ACK]);
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            DATA => self.read_data(),
            COMMAND => self.status(),
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            return;
        };
        match offset {
            DATA => self.write_data(*value),
            COMMAND => self.command(*value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vmm_sys_util::eventfd::EventFd;

    fn device() -> (I8042, Arc<AtomicUsize>, Arc<EventFd>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq_read = Arc::new(irq.try_clone().unwrap());
        let dev = I8042::new(
            ResetTrigger(Arc::new(move || {
                h.fetch_add(1, Ordering::SeqCst);
            })),
            Some(IrqLine(irq)),
        );
        (dev, hits, irq_read)
    }

    fn inb(dev: &mut I8042, port: u64) -> u8 {
        let mut b = [0];
        dev.read(port, &mut b);
        b[0]
    }

    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        while inb(dev, COMMAND) & SR_OUTPUT_FULL != 0 {
            out.push(inb(dev, DATA));
        }
        out
    }

    #[test]
    fn state_survives_a_snapshot_round_trip() {
        let (mut dev, _, _) = device();
        dev.ctrl_alt_del().unwrap();
        // Half-way through a command that takes a parameter.
        dev.write(COMMAND, &[0x60]);
        let snap = dev.snapshot();
        let (mut other, _, _) = device();
        other.restore(&snap);
        assert_eq!(other.snapshot(), snap);
        let json = serde_json::to_string(&snap).unwrap();
        assert_eq!(serde_json::from_str::<I8042Snapshot>(&json).unwrap(), snap);
        assert_eq!(drain(&mut other), drain(&mut dev));
    }

    #[test]
    fn fe_to_command_port_resets() {
        let (mut dev, hits, _) = device();
        dev.write(DATA, &[0xfe]);
        assert_eq!(
            drain(&mut dev),
            [ACK],
            "0xfe on the data port is a keyboard command"
        );
        dev.write(COMMAND, &[0x01]);
        dev.write(COMMAND, &[0xfe, 0xfe]);
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        dev.write(COMMAND, &[0xfe]);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // Output port with bit 0 clear resets too.
        dev.write(COMMAND, &[0xd1]);
        dev.write(DATA, &[0x00]);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn linux_probe_sequence() {
        let (mut dev, _, _) = device();
        assert!(drain(&mut dev).is_empty());
        dev.write(COMMAND, &[0xaa]);
        assert_eq!(drain(&mut dev), [SELF_TEST_OK]);
        dev.write(COMMAND, &[0x20]);
        let ctr = drain(&mut dev);
        assert_eq!(ctr, [CB_KBD_INT | CB_SYSTEM]);
        dev.write(COMMAND, &[0x60]);
        dev.write(DATA, &[ctr[0] | CB_TRANSLATE]);
        dev.write(COMMAND, &[0x20]);
        assert_eq!(drain(&mut dev), [CB_KBD_INT | CB_SYSTEM | CB_TRANSLATE]);
        dev.write(COMMAND, &[0xab]);
        assert_eq!(drain(&mut dev), [0x00]);
        // Keyboard: reset, identify, LEDs with their parameter.
        dev.write(DATA, &[0xff]);
        assert_eq!(drain(&mut dev), [ACK, BAT_OK]);
        dev.write(DATA, &[0xf2]);
        assert_eq!(drain(&mut dev), [ACK, 0xab, 0x41]);
        dev.write(DATA, &[0xed]);
        dev.write(DATA, &[0x07]);
        assert_eq!(drain(&mut dev), [ACK, ACK]);
        dev.write(DATA, &[0xf0]);
        dev.write(DATA, &[0x00]);
        assert_eq!(drain(&mut dev), [ACK, ACK, 0x41]);
    }

    #[test]
    fn ctrl_alt_del_speaks_the_guests_scan_code_set_and_interrupts() {
        let (mut dev, _, irq) = device();
        dev.ctrl_alt_del().unwrap();
        assert!(irq.read().unwrap() >= 1, "IRQ 1 raised");
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL_SET2);
        dev.write(COMMAND, &[0x60]);
        dev.write(DATA, &[CB_KBD_INT | CB_SYSTEM | CB_TRANSLATE]);
        dev.ctrl_alt_del().unwrap();
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL_SET1);
    }

    #[test]
    fn a_guest_that_never_reads_fills_the_buffer_and_then_refuses() {
        let (mut dev, _, _) = device();
        dev.ctrl_alt_del().unwrap();
        assert_eq!(dev.ctrl_alt_del(), Err(KeyboardBusy));
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL_SET2);
        dev.ctrl_alt_del().unwrap();
    }

    #[test]
    fn disabled_keyboard_or_scanning_drops_keys() {
        let (mut dev, _, _) = device();
        dev.write(DATA, &[0xf5]);
        assert_eq!(drain(&mut dev), [ACK]);
        dev.ctrl_alt_del().unwrap();
        assert!(drain(&mut dev).is_empty());
        dev.write(DATA, &[0xf4]);
        drain(&mut dev);
        dev.write(COMMAND, &[0xad]);
        dev.ctrl_alt_del().unwrap();
        assert!(drain(&mut dev).is_empty());
        dev.write(COMMAND, &[0xae]);
        dev.ctrl_alt_del().unwrap();
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL_SET2);
    }

    proptest! {
        /// Any sequence of port accesses leaves the buffer bounded and never panics.
        #[test]
        fn arbitrary_port_traffic_is_harmless(ops in proptest::collection::vec((0u64..6, any::<u8>(), any::<bool>()), 0..200)) {
            let (mut dev, _, _) = device();
            for (port, value, write) in ops {
                if write {
                    dev.write(port, &[value]);
                } else {
                    inb(&mut dev, port);
                }
                let _ = dev.ctrl_alt_del();
                prop_assert!(dev.buffer.len() <= BUFFER);
            }
        }
    }
}
