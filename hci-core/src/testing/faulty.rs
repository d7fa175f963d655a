//! Fault-injecting wrappers for failure tests.
//!
//! [`FaultyBlockDevice`] wraps any [`BlockDevice`]: it can fail the next N
//! reads, writes or flushes, fail everything (a dead disk), and *crash*:
//! [`FaultyBlockDevice::crash`] rolls back every write not yet made durable by
//! a flush or FUA, which is the worst a power cut may do. [`FaultyStateStore`]
//! makes any [`StateStore`] unavailable for N calls or until told otherwise.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::block::{BlockDevice, DeviceCaps, Extent, WriteFlags, ZeroFlags};
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

/// A [`BlockDevice`] wrapper that injects I/O errors and simulates crashes.
#[derive(Debug)]
pub struct FaultyBlockDevice<D> {
    inner: D,
    fail_reads: AtomicU32,
    fail_writes: AtomicU32,
    fail_flushes: AtomicU32,
    dead: AtomicBool,
    /// Content overwritten since the last flush: (offset, old bytes), oldest first.
    undo: Mutex<Vec<(u64, Vec<u8>)>>,
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
            undo: Mutex::new(Vec::new()),
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

    /// Simulates a power cut: every write since the last successful flush (and not
    /// written with FUA) is rolled back. Returns how many writes were lost.
    pub async fn crash(&self) -> Result<usize> {
        let undo = std::mem::take(&mut *self.undo_log());
        let lost = undo.len();
        for (off, old) in undo.into_iter().rev() {
            self.inner
                .write_at(&old, off, WriteFlags::default())
                .await?;
        }
        self.inner.flush().await?;
        Ok(lost)
    }

    fn undo_log(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Vec<u8>)>> {
        self.undo.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, counter: &AtomicU32, what: &str) -> Result<()> {
        if self.dead.load(Ordering::SeqCst) || take(counter) {
            return Err(injected(what));
        }
        Ok(())
    }

    /// Remembers the old content of a range about to be overwritten without FUA.
    async fn remember(&self, offset: u64, len: u64, durable: bool) -> Result<()> {
        if durable || len == 0 {
            return Ok(());
        }
        let mut old = vec![0u8; len as usize];
        self.inner.read_at(&mut old, offset).await?;
        self.undo_log().push((offset, old));
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
        crate::block::check_range(offset, buf.len() as u64, self.size())?;
        self.remember(offset, buf.len() as u64, flags.fua).await?;
        self.inner.write_at(buf, offset, flags).await
    }

    async fn flush(&self) -> Result<()> {
        self.check(&self.fail_flushes, "flush")?;
        self.inner.flush().await?;
        self.undo_log().clear();
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(&self.fail_writes, "discard")?;
        crate::block::check_range(offset, len, self.size())?;
        self.remember(offset, len, false).await?;
        self.inner.discard(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check(&self.fail_writes, "write_zeroes")?;
        crate::block::check_range(offset, len, self.size())?;
        self.remember(offset, len, flags.fua).await?;
        self.inner.write_zeroes(offset, len, flags).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(&self.fail_reads, "block_status")?;
        self.inner.block_status(offset, len).await
    }
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
