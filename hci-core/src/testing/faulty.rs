//! Fault-injecting wrappers for failure tests.
//!
//! [`FaultyBlockDevice`] wraps any [`BlockDevice`]: it can fail the next N
//! reads, writes or flushes, fail everything (a dead disk), die part-way through
//! a write after a byte budget (a torn write), and *crash*:
//! [`FaultyBlockDevice::crash`] rolls back every write not yet made durable by
//! a flush or FUA, which is the worst a power cut may do. [`FaultyStateStore`]
//! makes any [`StateStore`] unavailable for N calls or until told otherwise.
//!
//! ```
//! # use hci_core::block::{BlockDevice, WriteFlags};
//! # use hci_core::memory::MemBlockDevice;
//! # use hci_core::testing::faulty::FaultyBlockDevice;
//! # tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(async {
//! let dev = FaultyBlockDevice::new(MemBlockDevice::new(1 << 20));
//! dev.write_at(b"durable", 0, WriteFlags::default()).await?;
//! dev.flush().await?;
//! dev.write_at(b"lost!!!", 0, WriteFlags::default()).await?;
//! assert_eq!(dev.crash().await?, 1);
//! let mut buf = [0u8; 7];
//! dev.read_at(&mut buf, 0).await?;
//! assert_eq!(&buf, b"durable");
//! # Ok::<(), hci_core::Error>(()) }).expect("example");
//! ```

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::block::{
    BlockDevice, ByteRange, DeviceCaps, Extent, WriteFlags, ZeroFlags, check_range,
};
use crate::error::{Error, Result};
use crate::store::{
    KeyValue, LeaseId, ListResult, Precondition, PutOptions, StateStore, WatchStream,
};

fn injected(what: &str) -> Error {
    Error::io(
        format!("{what} (injected fault)"),
        io::Error::other("injected fault"),
    )
}

/// Takes one from a countdown; true if a fault should fire.
fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// No write budget: writes never run out.
const UNLIMITED: u64 = u64::MAX;

/// One change since the last flush, as the crash log sees it.
#[derive(Debug)]
enum Logged {
    /// A volatile change: the bytes it overwrote, to put back on a crash.
    Volatile { offset: u64, old: Vec<u8> },
    /// A FUA change: durable at once, so older volatile changes must not be
    /// rolled back over it.
    Durable { offset: u64, len: u64 },
}

/// A [`BlockDevice`] wrapper that injects I/O errors and simulates crashes.
///
/// Injected errors are [`Error::Io`]; a failed request changes nothing (except
/// the torn write of [`FaultyBlockDevice::fail_writes_after_bytes`]).
#[derive(Debug)]
pub struct FaultyBlockDevice<D> {
    inner: D,
    fail_reads: AtomicU32,
    fail_writes: AtomicU32,
    fail_flushes: AtomicU32,
    dead: AtomicBool,
    /// Bytes `write_at` may still write, or [`UNLIMITED`].
    write_budget: AtomicU64,
    /// Changes since the last flush, oldest first.
    log: Mutex<Vec<Logged>>,
}

impl<D: BlockDevice> FaultyBlockDevice<D> {
    /// Wraps `inner`; no faults until asked.
    pub fn new(inner: D) -> Self {
        FaultyBlockDevice {
            inner,
            fail_reads: AtomicU32::new(0),
            fail_writes: AtomicU32::new(0),
            fail_flushes: AtomicU32::new(0),
            dead: AtomicBool::new(false),
            write_budget: AtomicU64::new(UNLIMITED),
            log: Mutex::new(Vec::new()),
        }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Fails the next `n` reads.
    pub fn fail_next_reads(&self, n: u32) {
        self.fail_reads.store(n, Ordering::SeqCst);
    }

    /// Fails the next `n` writes (write, discard, write-zeroes); failed writes change nothing.
    pub fn fail_next_writes(&self, n: u32) {
        self.fail_writes.store(n, Ordering::SeqCst);
    }

    /// Fails the next `n` flushes.
    pub fn fail_next_flushes(&self, n: u32) {
        self.fail_flushes.store(n, Ordering::SeqCst);
    }

    /// Fails every request from now on (`true`) or heals the device (`false`).
    pub fn set_dead(&self, dead: bool) {
        self.dead.store(dead, Ordering::SeqCst);
    }

    /// Lets `write_at` write `bytes` more bytes, then dies: the write that crosses
    /// the budget lands only up to it (a torn write) and fails, and every later
    /// non-empty write fails, until [`FaultyBlockDevice::clear_faults`].
    pub fn fail_writes_after_bytes(&self, bytes: u64) {
        self.write_budget
            .store(bytes.min(UNLIMITED - 1), Ordering::SeqCst);
    }

    /// Removes every programmed fault (the crash log is kept).
    pub fn clear_faults(&self) {
        self.fail_reads.store(0, Ordering::SeqCst);
        self.fail_writes.store(0, Ordering::SeqCst);
        self.fail_flushes.store(0, Ordering::SeqCst);
        self.dead.store(false, Ordering::SeqCst);
        self.write_budget.store(UNLIMITED, Ordering::SeqCst);
    }

    /// Simulates a power cut: every change since the last successful flush that
    /// was not written with FUA is rolled back (FUA changes stay, even over older
    /// volatile ones). Returns how many changes were lost.
    pub async fn crash(&self) -> Result<usize> {
        let log = std::mem::take(&mut *self.log());
        let mut durable: Vec<ByteRange> = Vec::new();
        let mut lost = 0;
        for entry in log.into_iter().rev() {
            match entry {
                Logged::Durable { offset, len } => durable.push(ByteRange::new(offset, len)),
                Logged::Volatile { offset, old } => {
                    lost += 1;
                    let whole = ByteRange::new(offset, old.len() as u64);
                    for piece in subtract(whole, &durable) {
                        let at = (piece.offset - offset) as usize;
                        self.inner
                            .write_at(
                                &old[at..at + piece.len as usize],
                                piece.offset,
                                WriteFlags::default(),
                            )
                            .await?;
                    }
                }
            }
        }
        self.inner.flush().await?;
        Ok(lost)
    }

    /// Changes a crash would roll back now.
    pub fn unflushed_changes(&self) -> usize {
        self.log()
            .iter()
            .filter(|e| matches!(e, Logged::Volatile { .. }))
            .count()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Vec<Logged>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes up to `len` bytes from the write budget; returns how many were granted.
    fn reserve(&self, len: u64) -> u64 {
        let mut granted = len;
        // `None` (no budget set) leaves the value alone and grants everything.
        let _ = self
            .write_budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                if b == UNLIMITED {
                    granted = len;
                    None
                } else {
                    granted = len.min(b);
                    Some(b - granted)
                }
            });
        granted
    }

    fn check(&self, counter: &AtomicU32, what: &str) -> Result<()> {
        if self.dead.load(Ordering::SeqCst) || take(counter) {
            return Err(injected(what));
        }
        Ok(())
    }

    /// Logs a change about to be made: the old content for a volatile one, the
    /// range for a durable (FUA) one.
    async fn remember(&self, offset: u64, len: u64, durable: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if durable {
            self.log().push(Logged::Durable { offset, len });
            return Ok(());
        }
        let mut old = vec![0u8; len as usize];
        self.inner.read_at(&mut old, offset).await?;
        self.log().push(Logged::Volatile { offset, old });
        Ok(())
    }
}

#[async_trait]
impl<D: BlockDevice> BlockDevice for FaultyBlockDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn capabilities(&self) -> DeviceCaps {
        self.inner.capabilities()
    }

    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(&self.fail_reads, "read")?;
        self.inner.read_at(buf, offset).await
    }

    async fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<()> {
        self.check(&self.fail_writes, "write")?;
        check_range(offset, buf.len() as u64, self.size())?;
        let granted = self.reserve(buf.len() as u64) as usize;
        let part = &buf[..granted];
        self.remember(offset, part.len() as u64, flags.fua).await?;
        if !part.is_empty() {
            self.inner.write_at(part, offset, flags).await?;
        }
        if granted < buf.len() {
            return Err(injected("write (the device died part-way through)"));
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.check(&self.fail_flushes, "flush")?;
        self.inner.flush().await?;
        self.log().clear();
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(&self.fail_writes, "discard")?;
        check_range(offset, len, self.size())?;
        self.remember(offset, len, false).await?;
        self.inner.discard(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check(&self.fail_writes, "write_zeroes")?;
        check_range(offset, len, self.size())?;
        self.remember(offset, len, flags.fua).await?;
        self.inner.write_zeroes(offset, len, flags).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(&self.fail_reads, "block_status")?;
        self.inner.block_status(offset, len).await
    }
}

/// The parts of `range` that no range in `holes` covers, in order.
fn subtract(range: ByteRange, holes: &[ByteRange]) -> Vec<ByteRange> {
    let mut pieces = vec![range];
    for h in holes {
        pieces = pieces
            .into_iter()
            .flat_map(|p| {
                let mut out = Vec::with_capacity(2);
                if h.end() <= p.offset || p.end() <= h.offset {
                    out.push(p);
                } else {
                    if p.offset < h.offset {
                        out.push(ByteRange::new(p.offset, h.offset - p.offset));
                    }
                    if h.end() < p.end() {
                        out.push(ByteRange::new(h.end(), p.end() - h.end()));
                    }
                }
                out
            })
            .collect();
    }
    pieces
}

/// A [`StateStore`] wrapper that makes the store unavailable on demand.
#[derive(Debug)]
pub struct FaultyStateStore<S> {
    inner: S,
    fail_next: AtomicU32,
    down: AtomicBool,
}

impl<S: StateStore> FaultyStateStore<S> {
    /// Wraps `inner`; no faults until asked.
    pub fn new(inner: S) -> Self {
        FaultyStateStore {
            inner,
            fail_next: AtomicU32::new(0),
            down: AtomicBool::new(false),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Fails the next `n` calls with [`Error::Unavailable`].
    pub fn fail_next(&self, n: u32) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Fails every call (`true`) until healed (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) || take(&self.fail_next) {
            return Err(Error::Unavailable {
                what: "state store (injected fault)".into(),
                source: None,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl<S: StateStore> StateStore for FaultyStateStore<S> {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.check()?;
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<ListResult> {
        self.check()?;
        self.inner.list(prefix).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, options: PutOptions) -> Result<u64> {
        self.check()?;
        self.inner.put(key, value, options).await
    }

    async fn delete(&self, key: &str, precondition: Precondition) -> Result<u64> {
        self.check()?;
        self.inner.delete(key, precondition).await
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream> {
        self.check()?;
        self.inner.watch(prefix, from_revision).await
    }

    async fn current_revision(&self) -> Result<u64> {
        self.check()?;
        self.inner.current_revision().await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.check()?;
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.check()?;
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.check()?;
        self.inner.revoke_lease(lease).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemBlockDevice, MemStateStore};

    #[tokio::test]
    async fn faults_fire_once_and_crash_loses_only_unflushed_writes() {
        let d = FaultyBlockDevice::new(MemBlockDevice::new(1 << 20));
        d.write_at(&[1; 4096], 0, WriteFlags::default())
            .await
            .expect("write");
        d.flush().await.expect("flush");
        d.write_at(&[2; 4096], 0, WriteFlags::default())
            .await
            .expect("write");
        d.write_at(&[3; 4096], 8192, WriteFlags::FUA)
            .await
            .expect("fua write");
        d.write_at(&[4; 100], 50, WriteFlags::default())
            .await
            .expect("write");
        assert_eq!(d.crash().await.expect("crash"), 2);
        let mut b = vec![0u8; 4096];
        d.read_at(&mut b, 0).await.expect("read");
        assert!(
            b.iter().all(|&x| x == 1),
            "unflushed writes survived the crash"
        );
        d.read_at(&mut b, 8192).await.expect("read");
        assert!(b.iter().all(|&x| x == 3), "a FUA write was lost");

        d.fail_next_writes(1);
        assert!(
            d.write_at(&[9; 10], 0, WriteFlags::default())
                .await
                .is_err()
        );
        d.write_at(&[9; 10], 0, WriteFlags::default())
            .await
            .expect("second write");
        d.set_dead(true);
        assert!(d.read_at(&mut b, 0).await.is_err());
        d.set_dead(false);
        d.fail_next_flushes(1);
        assert!(d.flush().await.is_err());
    }

    async fn read(d: &impl BlockDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        d.read_at(&mut b, offset).await.expect("read");
        b
    }

    #[tokio::test]
    async fn a_fua_write_survives_a_crash_over_older_volatile_writes() {
        let d = FaultyBlockDevice::new(MemBlockDevice::new(1 << 20));
        d.write_at(&[1; 8192], 0, WriteFlags::default())
            .await
            .expect("volatile write");
        d.write_at(&[2; 100], 4000, WriteFlags::FUA)
            .await
            .expect("FUA write over it");
        d.write_at(&[3; 10], 4050, WriteFlags::default())
            .await
            .expect("volatile write over the FUA one");
        assert_eq!(d.unflushed_changes(), 2);
        assert_eq!(d.crash().await.expect("crash"), 2);
        let got = read(&d, 0, 8192).await;
        assert!(
            got[..4000].iter().all(|&b| b == 0),
            "volatile data survived"
        );
        assert!(
            got[4000..4100].iter().all(|&b| b == 2),
            "the FUA write was lost or the later volatile one survived"
        );
        assert!(
            got[4100..].iter().all(|&b| b == 0),
            "volatile data survived"
        );
        assert_eq!(d.unflushed_changes(), 0);
    }

    #[tokio::test]
    async fn a_byte_budget_tears_the_write_that_crosses_it() {
        let d = FaultyBlockDevice::new(MemBlockDevice::new(1 << 20));
        d.fail_writes_after_bytes(6000);
        d.write_at(&[1; 4096], 0, WriteFlags::default())
            .await
            .expect("within budget");
        let e = d
            .write_at(&[2; 4096], 4096, WriteFlags::default())
            .await
            .expect_err("the write crossing the budget must fail");
        assert!(matches!(e, Error::Io { .. }), "{e}");
        let got = read(&d, 4096, 4096).await;
        assert!(
            got[..1904].iter().all(|&b| b == 2),
            "the torn prefix is missing"
        );
        assert!(
            got[1904..].iter().all(|&b| b == 0),
            "more than the budget landed"
        );
        assert!(
            d.write_at(&[3; 1], 0, WriteFlags::default()).await.is_err(),
            "a dead device accepted a write"
        );
        d.write_at(&[], 0, WriteFlags::default())
            .await
            .expect("an empty write needs no budget");
        d.clear_faults();
        d.write_at(&[3; 1], 0, WriteFlags::default())
            .await
            .expect("healed");
        // The torn write is unflushed: a crash takes it back too.
        d.crash().await.expect("crash");
        assert!(read(&d, 0, 12288).await.iter().all(|&b| b == 0));
    }

    #[test]
    fn subtracting_ranges() {
        let r = ByteRange::new;
        assert_eq!(subtract(r(0, 100), &[]), vec![r(0, 100)]);
        assert_eq!(subtract(r(0, 100), &[r(10, 10)]), vec![r(0, 10), r(20, 80)]);
        assert_eq!(subtract(r(0, 100), &[r(0, 100)]), vec![]);
        assert_eq!(
            subtract(r(10, 100), &[r(0, 20), r(100, 50), r(50, 1)]),
            vec![r(20, 30), r(51, 49)]
        );
    }

    #[tokio::test]
    async fn store_faults() {
        let s = FaultyStateStore::new(MemStateStore::new());
        s.fail_next(2);
        assert!(s.get("/a").await.is_err_and(|e| e.is_retryable()));
        assert!(s.current_revision().await.is_err());
        assert!(s.get("/a").await.is_ok());
        s.set_down(true);
        assert!(s.put("/a", vec![], PutOptions::default()).await.is_err());
    }
}
