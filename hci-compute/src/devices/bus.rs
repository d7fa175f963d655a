//! Address → device dispatch for port I/O and MMIO exits.

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::error::{Result, VmmError};

/// A device reachable through a bus window.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` into the device window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` into the device window.
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Window {
    base: u64,
    len: u64,
    name: &'static str,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping device windows; fixed once the VM runs.
#[derive(Default)]
pub struct Bus {
    windows: Vec<Window>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut l = f.debug_list();
        for w in &self.windows {
            l.entry(&format_args!("{}@{:#x}+{:#x}", w.name, w.base, w.len));
        }
        l.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<()> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| VmmError::Device {
                device: name.into(),
                reason: format!("bad window {base:#x}+{len:#x}"),
            })?;
        if let Some(w) = self
            .windows
            .iter()
            .find(|w| base < w.base + w.len && w.base < end)
        {
            return Err(VmmError::Device {
                device: name.into(),
                reason: format!("window overlaps {}", w.name),
            });
        }
        let at = self.windows.partition_point(|w| w.base < base);
        self.windows.insert(
            at,
            Window {
                base,
                len,
                name,
                device,
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(&Window, u64)> {
        let i = self
            .windows
            .partition_point(|w| w.base <= addr)
            .checked_sub(1)?;
        let w = &self.windows[i];
        let offset = addr - w.base;
        (offset.checked_add(len as u64)? <= w.len).then_some((w, offset))
    }

    /// Dispatches a read; unclaimed addresses read as all ones. Returns whether a device took it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((w, offset)) => {
                w.device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; unclaimed writes are dropped. Returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((w, offset)) => {
                w.device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_window() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert("echo", 0x100, 0x10, dev.clone()).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        assert!(!bus.read(0x10f, &mut b), "straddles the end");
        assert_eq!(b, [0xff, 0xff]);
        assert!(!bus.read(0xff, &mut [0u8; 1]));
        assert!(bus.write(0x10f, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(0xf, vec![9])]);
    }

    #[test]
    fn overlaps_are_refused() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert("a", 0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert("b", 0x108, 0x10, dev.clone()).is_err());
        assert!(bus.insert("c", 0xf8, 0x10, dev.clone()).is_err());
        assert!(bus.insert("d", 0, 0, dev.clone()).is_err());
        assert!(bus.insert("e", u64::MAX, 2, dev.clone()).is_err());
        bus.insert("f", 0x110, 0x10, dev).unwrap();
    }
}
