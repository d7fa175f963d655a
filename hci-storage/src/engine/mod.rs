//! The replicated engine: one [`ReplicatedVolume`] (a [`BlockDevice`]) over N
//! replicas on [`ReplicaNode`]s, and [`ReplicatedVolumeBackend`], a
//! [`hci_core::volume::VolumeBackend`] over a set of nodes.
//!
//! * Writes, zeroes, discards and flushes go to every writable replica in
//!   parallel and complete when all of them answered; a replica that errs or
//!   does not answer within [`EngineOptions::timeout`] is marked failed and
//!   dropped, and I/O continues while one healthy replica remains.
//! * Fencing: opening bumps the volume's generation on every replica, which
//!   then refuses older engines ([`Error::Fenced`]).
//! * Membership epochs: on open and whenever a replica is dropped, the
//!   survivors get a new epoch *before* the write that dropped it completes,
//!   so a replica that missed acknowledged writes has an older epoch and is
//!   never served from (it is reported [`ReplicaState::Stale`]).
//! * Snapshots are taken on every replica with writes quiesced.
//! * [`ReplicatedVolume::add_replica`] rebuilds a new or stale replica while
//!   the volume stays in use (see [`rebuild`]), at most
//!   [`EngineOptions::rebuild_rate`] bytes per second.
//! * Reads go to a healthy in-process replica when there is one (no network
//!   hop), else round-robin over the healthy ones.
//! * Keepalive: remote replicas are pinged every [`EngineOptions::keepalive`];
//!   one that does not answer within the timeout is failed even while idle.
//! * Crash consistency: opening marks the replicas in use; a clean
//!   [`ReplicatedVolume::close`] marks them clean. Opening after an unclean
//!   shutdown copies the differences between the healthy replicas from one of
//!   them (local first) to the others before any I/O, so writes that were in
//!   flight at the crash end up on all replicas or on none. Only regions in
//!   the replicas' dirty-region logs are compared (see [`dirty`]): a region
//!   is marked on every replica before a write to it is sent, and cleared
//!   lazily after a flush; replicas without a log are compared whole.

mod backend;
pub mod dirty;
pub mod rebuild;

pub use backend::ReplicatedVolumeBackend;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use hci_core::block::{BlockDevice, DeviceCaps, Extent, WriteFlags, ZeroFlags, check_range};
use hci_core::volume::{EncryptionKey, OpenVolume, SnapshotInfo};
use hci_core::{Error, Result};

use crate::replica::dirty::runs_of;
use crate::replica::{DirtyRegions, DirtyUpdate, ReplicaNode};

/// Tunables of the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Bound on any replica request; a replica slower than this is failed.
    /// A hung replica (or one whose link is cut) stalls I/O at most this long.
    pub timeout: Duration,
    /// Interval of keepalive pings to remote replicas (`None`: no pings). A
    /// replica that does not answer a ping within `timeout` is failed, so a
    /// dead link is noticed even while the volume is idle.
    pub keepalive: Option<Duration>,
    /// Most bytes per second a rebuild copies to the new replica (`None`:
    /// as fast as it goes).
    pub rebuild_rate: Option<u64>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            timeout: Duration::from_secs(3),
            keepalive: Some(Duration::from_secs(1)),
            rebuild_rate: None,
        }
    }
}

/// State of one replica in the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaState {
    /// In sync; serves reads and writes.
    Healthy,
    /// Receiving live writes while a rebuild copies the rest; no reads.
    Rebuilding,
    /// Missed writes (older membership epoch); needs a rebuild.
    Stale,
    /// Dropped after an error or timeout.
    Failed(String),
}

/// Overall state of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Robustness {
    /// Every replica is healthy.
    Healthy,
    /// At least one healthy replica, but not all.
    Degraded,
    /// No healthy replica: I/O fails.
    Faulted,
}

/// One replica's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// The node's label (address or path).
    pub node: String,
    /// Its state.
    pub state: ReplicaState,
}

/// What reconcile did when the engine opened the volume after an unclean
/// shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReconcileReport {
    /// True if some replica had no dirty-region log, so the whole volume was
    /// compared.
    pub full: bool,
    /// Bytes of the volume in dirty regions (the volume size if `full`).
    pub dirty_bytes: u64,
    /// Bytes compared, over every replica reconciled.
    pub bytes_scanned: u64,
    /// Bytes copied to replicas that differed.
    pub bytes_copied: u64,
}

/// The status of a volume and its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    /// Overall robustness.
    pub robustness: Robustness,
    /// Engine generation.
    pub generation: u64,
    /// Membership epoch.
    pub epoch: u64,
    /// Every replica.
    pub replicas: Vec<ReplicaStatus>,
}

#[derive(Debug)]
struct Member {
    node: Arc<dyn ReplicaNode>,
    dev: Mutex<Option<Arc<dyn BlockDevice>>>,
    state: Mutex<ReplicaState>,
}

impl Member {
    fn state(&self) -> ReplicaState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_state(&self, s: ReplicaState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    fn dev(&self) -> Option<Arc<dyn BlockDevice>> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A volume replicated synchronously over several replicas.
#[derive(Debug)]
pub struct ReplicatedVolume {
    name: String,
    generation: u64,
    read_only: bool,
    options: EngineOptions,
    key: Option<EncryptionKey>,
    size: AtomicU64,
    members: Mutex<Vec<Arc<Member>>>,
    /// Writes hold it shared; snapshots and rebuild copies hold it exclusively.
    quiesce: tokio::sync::RwLock<()>,
    epoch: tokio::sync::Mutex<u64>,
    fenced: AtomicBool,
    closed: AtomicBool,
    next_read: AtomicUsize,
    dirty: dirty::DirtyTracker,
    last_reconcile: Mutex<Option<ReconcileReport>>,
}

/// A replicated volume made ready by [`ReplicatedVolume::prepare`]: replicas
/// reached, size known, handles open — but no replica fenced yet, so the
/// engine that owns the volume now keeps working. [`PreparedVolume::activate`]
/// takes the volume over. Dropping it leaves the volume untouched.
#[derive(Debug)]
pub struct PreparedVolume {
    name: String,
    generation: u64,
    options: OpenVolume,
    engine: EngineOptions,
    size: u64,
    /// Newest membership epoch seen at prepare.
    epoch: u64,
    members: Vec<Arc<Member>>,
}

impl PreparedVolume {
    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The volume's size in bytes (as the replicas reported it at prepare).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The generation [`PreparedVolume::activate`] will fence with.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the engine will be read-only (then activating fences nobody).
    pub fn is_read_only(&self) -> bool {
        self.options.read_only
    }

    /// Takes the volume over: fences every replica with this generation
    /// (from then on the previous engine is refused with [`Error::Fenced`]),
    /// starts a new membership epoch, reconciles if the previous engine did
    /// not close cleanly and resets the dirty-region logs — the rest of
    /// [`ReplicatedVolume::open`]. Uses the fence state the replicas answer
    /// now, not the one read at prepare: a replica the previous engine
    /// dropped meanwhile (older epoch) is taken as stale, and a previous
    /// engine that closed cleanly spares the reconcile. Fails with
    /// [`Error::Fenced`] if a newer engine fenced the volume since prepare.
    pub async fn activate(self) -> Result<Arc<ReplicatedVolume>> {
        self.activate_after(None).await
    }

    /// [`PreparedVolume::activate`] after the previous engine, of generation
    /// `released`, was [released](ReplicatedVolume::release) (flushed, nothing
    /// in flight) and said so over a channel the caller trusts (the migration
    /// stream): when every replica still names that generation as the newest,
    /// the replicas are identical and no reconcile is needed, though the
    /// previous engine recorded no clean shutdown. This spares the hand-over
    /// the clean-shutdown write (an fsync on every replica) in its downtime.
    pub async fn activate_after_release(self, released: u64) -> Result<Arc<ReplicatedVolume>> {
        self.activate_after(Some(released)).await
    }

    async fn activate_after(self, released: Option<u64>) -> Result<Arc<ReplicatedVolume>> {
        let PreparedVolume {
            name,
            generation,
            options,
            engine,
            size,
            epoch,
            members,
        } = self;
        let read_only = options.read_only;
        let vol = Arc::new(ReplicatedVolume {
            name: name.clone(),
            generation,
            read_only,
            options: engine,
            key: options.encryption_key,
            size: AtomicU64::new(size),
            members: Mutex::new(members),
            quiesce: tokio::sync::RwLock::new(()),
            epoch: tokio::sync::Mutex::new(epoch),
            fenced: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            next_read: AtomicUsize::new(0),
            dirty: dirty::DirtyTracker::new(size),
            last_reconcile: Mutex::new(None),
        });
        if !read_only {
            let t = vol.options.timeout;
            let healthy = vol.healthy();
            let name = name.as_str();
            // An engine opened since prepare may hold this very generation
            // (it read the same fence state): refuse rather than share it.
            let seen =
                futures::future::join_all(healthy.iter().map(|m| async move {
                    tokio::time::timeout(t, m.node.fence_state(name)).await
                }))
                .await;
            if let Some(current) = seen
                .iter()
                .filter_map(|r| r.as_ref().ok()?.as_ref().ok())
                .map(|st| st.generation)
                .find(|&g| g >= generation)
            {
                return Err(Error::Fenced {
                    what: format!("volume {name}"),
                    ours: generation,
                    current,
                });
            }
            let fresh = futures::future::join_all(healthy.iter().map(|m| async move {
                tokio::time::timeout(t, m.node.fence(name, generation)).await
            }))
            .await;
            let mut now = Vec::new();
            for (m, r) in healthy.iter().zip(fresh) {
                match r {
                    Ok(Ok(st)) => now.push((m, st)),
                    Ok(Err(e @ Error::Fenced { .. })) => return Err(e),
                    Ok(Err(e)) => m.set_state(ReplicaState::Failed(e.to_string())),
                    Err(_) => m.set_state(ReplicaState::Failed("fence timed out".into())),
                }
            }
            // The previous engine may have dropped a replica since prepare.
            let newest = now
                .iter()
                .map(|(_, st)| st.epoch)
                .max()
                .unwrap_or(epoch)
                .max(epoch);
            for (m, st) in &now {
                if st.epoch < newest {
                    m.set_state(ReplicaState::Stale);
                    m.dev.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
            }
            *vol.epoch.lock().await = newest;
            // `fence` answers the state before our generation was recorded
            // only in its other fields; the generation seen before is in `seen`.
            let released_last = released.is_some_and(|g| {
                seen.iter()
                    .filter_map(|r| r.as_ref().ok()?.as_ref().ok())
                    .all(|st| st.generation == g)
            });
            let unclean = !released_last
                && now
                    .iter()
                    .any(|(m, st)| m.state() == ReplicaState::Healthy && !st.clean);
            if vol.healthy().is_empty() {
                return Err(faulted(name));
            }
            let all_healthy = vol.all().iter().all(|m| m.state() == ReplicaState::Healthy);
            if released_last && all_healthy && now.iter().all(|(_, st)| !st.clean) {
                // A hand-over with every replica in step: they already hold
                // this epoch and are marked in use, and the previous engine's
                // dirty-region log stays (a crash reconcile compares those
                // regions too: more, never less). Nothing else to write, so
                // the switch-over waits for the fence alone.
            } else {
                let reset = DirtyUpdate::Reset {
                    region_size: vol.dirty.region_size(),
                };
                vol.new_epoch().await?;
                if unclean {
                    vol.reconcile().await?;
                }
                // A fresh, empty dirty-region log on every replica in the set.
                vol.update_dirty_everywhere(reset).await?;
            }
            if let Some(every) = vol.options.keepalive {
                tokio::spawn(keepalive(Arc::downgrade(&vol), every));
            }
        }
        tracing::info!(volume = %name, generation, "replicated volume opened");
        Ok(vol)
    }
}

/// Errors that depend on the request, not on the replica: every replica would
/// answer the same, so they go back to the caller and fail no replica.
fn is_request_error(e: &Error) -> bool {
    matches!(
        e,
        Error::OutOfRange { .. }
            | Error::ReadOnly { .. }
            | Error::Invalid { .. }
            | Error::Fenced { .. }
            | Error::NotFound { .. }
            | Error::AlreadyExists { .. }
    )
}

fn faulted(name: &str) -> Error {
    Error::Unavailable {
        what: format!("volume {name}"),
        source: Some("no healthy replica is left".into()),
    }
}

impl ReplicatedVolume {
    /// Opens `name` on `nodes`: fences older engines (unless read-only), skips
    /// unreachable and stale replicas, and starts a new membership epoch.
    /// The same as [`ReplicatedVolume::prepare`] then
    /// [`PreparedVolume::activate`].
    pub async fn open(
        name: &str,
        nodes: &[Arc<dyn ReplicaNode>],
        options: OpenVolume,
        engine: EngineOptions,
    ) -> Result<Arc<ReplicatedVolume>> {
        Self::prepare(name, nodes, options, engine)
            .await?
            .activate()
            .await
    }

    /// The first half of [`ReplicatedVolume::open`], for a hand-over (live
    /// migration): connects to every replica, reads its fence state and the
    /// volume's size and opens a handle on it for the next generation, but
    /// fences nobody — another engine may keep writing until
    /// [`PreparedVolume::activate`]. The prepared volume does no I/O.
    pub async fn prepare(
        name: &str,
        nodes: &[Arc<dyn ReplicaNode>],
        options: OpenVolume,
        engine: EngineOptions,
    ) -> Result<PreparedVolume> {
        if nodes.is_empty() {
            return Err(Error::invalid("replica set", "is empty"));
        }
        let t = engine.timeout;
        let states = futures::future::join_all(nodes.iter().map(|n| async move {
            let st = tokio::time::timeout(t, n.fence_state(name)).await;
            let info = tokio::time::timeout(t, n.backend().info(name)).await;
            match (st, info) {
                (Ok(Ok(st)), Ok(Ok(_))) => Ok(st),
                (Ok(Err(e)), _) | (_, Ok(Err(e))) => Err(e),
                _ => Err(Error::Unavailable {
                    what: n.label(),
                    source: Some("timed out".into()),
                }),
            }
        }))
        .await;
        if states.iter().all(|s| s.is_err()) {
            return Err(
                if states
                    .iter()
                    .any(|s| s.as_ref().is_err_and(|e| e.is_not_found()))
                {
                    Error::not_found("volume", name)
                } else {
                    faulted(name)
                },
            );
        }
        let max_gen = states
            .iter()
            .filter_map(|s| s.as_ref().ok())
            .map(|s| s.generation)
            .max()
            .unwrap_or(0);
        let max_epoch = states
            .iter()
            .filter_map(|s| s.as_ref().ok())
            .map(|s| s.epoch)
            .max()
            .unwrap_or(0);
        let generation = if options.read_only {
            max_gen
        } else {
            max_gen + 1
        };
        let mut members = Vec::new();
        let mut size = u64::MAX;
        for (node, st) in nodes.iter().zip(&states) {
            let m = Member {
                node: node.clone(),
                dev: Mutex::new(None),
                state: Mutex::new(ReplicaState::Healthy),
            };
            match st {
                Err(e) => m.set_state(ReplicaState::Failed(e.to_string())),
                Ok(st) if st.epoch < max_epoch => m.set_state(ReplicaState::Stale),
                Ok(_) => {
                    match tokio::time::timeout(
                        t,
                        node.open_fenced(name, generation, options.clone()),
                    )
                    .await
                    {
                        Ok(Ok(dev)) => {
                            size = size.min(dev.size());
                            *m.dev.lock().unwrap_or_else(|e| e.into_inner()) = Some(dev);
                        }
                        Ok(Err(e))
                            if is_request_error(&e) || matches!(e, Error::Corrupt { .. }) =>
                        {
                            return Err(e);
                        }
                        Ok(Err(e)) => m.set_state(ReplicaState::Failed(e.to_string())),
                        Err(_) => m.set_state(ReplicaState::Failed("open timed out".into())),
                    }
                }
            }
            members.push(Arc::new(m));
        }
        if !members.iter().any(|m| m.state() == ReplicaState::Healthy) {
            return Err(faulted(name));
        }
        Ok(PreparedVolume {
            name: name.to_string(),
            generation,
            options,
            engine,
            size,
            epoch: max_epoch,
            members,
        })
    }

    /// After an unclean shutdown (an engine crash), writes that were in flight
    /// may have reached some healthy replicas and not others. None of them was
    /// acknowledged as durable, so either version is correct, but every replica
    /// must hold the same one: copy the differences from one healthy replica
    /// (local first) to the others. Only the regions in the replicas'
    /// dirty-region logs are compared (all of them if a replica has no log),
    /// and of those only allocated data.
    async fn reconcile(&self) -> Result<()> {
        let mut healthy: Vec<_> = self
            .healthy()
            .into_iter()
            .filter_map(|m| m.dev().map(|d| (m, d)))
            .collect();
        healthy.sort_by_key(|(m, _)| !m.node.is_local());
        let Some(((src_m, src), rest)) = healthy.split_first() else {
            return Err(faulted(&self.name));
        };
        let t = self.options.timeout;
        let logs = futures::future::join_all(
            healthy
                .iter()
                .map(|(m, _)| tokio::time::timeout(t, m.node.dirty_regions(&self.name))),
        )
        .await;
        let size = self.size();
        let mut full = false;
        let mut ranges = Vec::new();
        for r in logs {
            match r {
                Ok(Ok(Some(d))) => ranges.extend(d.byte_ranges()),
                _ => full = true,
            }
        }
        let ranges: Vec<(u64, u64)> = if full {
            vec![(0, size)]
        } else {
            dirty::merge_ranges(ranges)
                .into_iter()
                .filter(|&(o, _)| o < size)
                .map(|(o, l)| (o, l.min(size - o)))
                .collect()
        };
        let progress = rebuild::RebuildProgress::default();
        let mut dropped = false;
        for (m, d) in rest {
            let r = rebuild::sync_ranges(&**src, &**d, &ranges, None, &progress, None).await;
            if let Err(e) = r {
                self.fail(m, format!("reconcile after an unclean shutdown: {e}"));
                dropped = true;
            }
        }
        if dropped {
            self.new_epoch().await?;
        }
        let report = ReconcileReport {
            full,
            dirty_bytes: ranges.iter().map(|&(_, l)| l).sum(),
            bytes_scanned: progress.done.load(Ordering::Relaxed),
            bytes_copied: progress.sent.load(Ordering::Relaxed),
        };
        *self
            .last_reconcile
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(report);
        tracing::info!(
            volume = %self.name,
            source = %src_m.node.label(),
            full,
            dirty = report.dirty_bytes,
            scanned = report.bytes_scanned,
            copied = report.bytes_copied,
            "replicas reconciled after an unclean shutdown"
        );
        Ok(())
    }

    /// What reconcile did at open (`None` if the last shutdown was clean).
    pub fn last_reconcile(&self) -> Option<ReconcileReport> {
        *self
            .last_reconcile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a dirty-region log change to every writable replica (healthy or
    /// rebuilding); one that fails is dropped, like after a failed write.
    async fn update_dirty_everywhere(&self, update: DirtyUpdate) -> Result<()> {
        let targets: Vec<Arc<Member>> = self
            .all()
            .into_iter()
            .filter(|m| matches!(m.state(), ReplicaState::Healthy | ReplicaState::Rebuilding))
            .collect();
        let t = self.options.timeout;
        let name = &self.name;
        let generation = self.generation;
        let rs =
            futures::future::join_all(
                targets.iter().map(|m| {
                    let u = update.clone();
                    async move {
                        tokio::time::timeout(t, m.node.update_dirty(name, generation, u)).await
                    }
                }),
            )
            .await;
        let mut dropped_healthy = false;
        for (m, r) in targets.iter().zip(rs) {
            let was_healthy = m.state() == ReplicaState::Healthy;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e @ Error::Fenced { .. })) => {
                    self.fenced.store(true, Ordering::SeqCst);
                    return Err(e);
                }
                Ok(Err(e)) => {
                    self.fail(m, format!("dirty-region log: {e}"));
                    dropped_healthy |= was_healthy;
                }
                Err(_) => {
                    self.fail(m, format!("dirty-region log: no answer within {t:?}"));
                    dropped_healthy |= was_healthy;
                }
            }
        }
        if dropped_healthy {
            self.new_epoch().await?;
        }
        if self.healthy().is_empty() {
            return Err(faulted(&self.name));
        }
        Ok(())
    }

    /// Enters the regions of `[offset, offset + len)` for a mutation: marks
    /// those not marked yet on every writable replica first (together with
    /// any other regions waiting for a mark).
    async fn enter_dirty(&self, offset: u64, len: u64) -> Result<dirty::DirtyGuard<'_>> {
        self.check_fenced()?;
        let regions = self.dirty.regions(offset, len);
        if !self.dirty.try_enter(&regions) {
            self.dirty.want(&regions);
            let _log = self.dirty.log_lock.lock().await;
            let wanted = self.dirty.take_wanted(&regions);
            if !wanted.is_empty() {
                self.update_dirty_everywhere(DirtyUpdate::Mark(DirtyRegions {
                    region_size: self.dirty.region_size(),
                    runs: runs_of(wanted.clone()),
                }))
                .await?;
                self.dirty.set_marked(&wanted);
            }
            // No clear can run while the log lock is held.
            if !self.dirty.try_enter(&regions) {
                return Err(Error::Backend {
                    backend: "replicated engine",
                    message: "a dirty region was not marked".into(),
                    source: None,
                });
            }
        }
        Ok(dirty::DirtyGuard {
            tracker: &self.dirty,
            regions,
        })
    }

    /// After a flush that started at `point`: clears the regions it made
    /// clean on every writable replica, at most every
    /// [`dirty::CLEAR_EVERY`]. Best effort: a clear that does not reach a
    /// replica leaves regions marked there (more to compare after a crash,
    /// never less).
    async fn clear_dirty_after_flush(&self, point: u64) {
        if !self.dirty.clear_due() {
            return;
        }
        let Ok(_log) = self.dirty.log_lock.try_lock() else {
            return;
        };
        let clean = self.dirty.take_clearable(point);
        if clean.is_empty() {
            return;
        }
        let update = DirtyUpdate::Clear(DirtyRegions {
            region_size: self.dirty.region_size(),
            runs: runs_of(clean),
        });
        let t = self.options.timeout;
        for m in self
            .all()
            .into_iter()
            .filter(|m| matches!(m.state(), ReplicaState::Healthy | ReplicaState::Rebuilding))
        {
            let r = tokio::time::timeout(
                t,
                m.node
                    .update_dirty(&self.name, self.generation, update.clone()),
            )
            .await;
            if !matches!(r, Ok(Ok(()))) {
                tracing::warn!(volume = %self.name, replica = %m.node.label(), "could not clear dirty regions");
            }
        }
    }

    /// Hands the volume over (live migration): waits for the requests in
    /// flight and refuses further I/O, like [`ReplicatedVolume::close`] but
    /// without a flush or a clean-shutdown record — the next engine, told
    /// this engine's [generation](ReplicatedVolume::generation) by the
    /// caller, activates with [`PreparedVolume::activate_after_release`] and
    /// needs no reconcile.
    ///
    /// No flush is needed: every write was acknowledged by every writable
    /// replica, so the replicas hold the same data, and the next engine's
    /// flushes sync the same files on the same replicas (durability asked
    /// for by a guest flush that completed here is already there). Until
    /// then, this engine's dirty-region marks stay on the replicas, so a
    /// crash of a replica server before the next flush is reconciled as
    /// before. This keeps the hand-over's downtime free of disk syncs.
    pub async fn release(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _q = self.quiesce.write().await;
        self.check_fenced()?;
        self.closed.store(true, Ordering::SeqCst);
        tracing::info!(volume = %self.name, generation = self.generation, "replicated volume released");
        Ok(())
    }

    /// Flushes every replica, records a clean shutdown on them (so the next
    /// open need not reconcile) and refuses further I/O.
    pub async fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _q = self.quiesce.write().await;
        self.fan_out(|d| async move { d.flush().await }).await?;
        self.closed.store(true, Ordering::SeqCst);
        let t = self.options.timeout;
        let healthy = self.healthy();
        let rs = futures::future::join_all(healthy.iter().map(|m| async move {
            tokio::time::timeout(t, m.node.mark_clean(&self.name, self.generation)).await
        }))
        .await;
        for (m, r) in healthy.iter().zip(rs) {
            if !matches!(r, Ok(Ok(()))) {
                tracing::warn!(volume = %self.name, replica = %m.node.label(), "could not record a clean shutdown");
            }
        }
        Ok(())
    }

    /// Pings every remote replica once; one that does not answer in time is failed.
    async fn ping_replicas(&self) {
        let t = self.options.timeout;
        let targets: Vec<_> = self
            .all()
            .into_iter()
            .filter(|m| !m.node.is_local())
            .filter(|m| matches!(m.state(), ReplicaState::Healthy | ReplicaState::Rebuilding))
            .collect();
        let rs = futures::future::join_all(
            targets
                .iter()
                .map(|m| async move { tokio::time::timeout(t, m.node.ping()).await }),
        )
        .await;
        let mut dropped_healthy = false;
        for (m, r) in targets.iter().zip(rs) {
            let why = match r {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => format!("keepalive: {e}"),
                Err(_) => format!("keepalive: no answer within {t:?}"),
            };
            dropped_healthy |= m.state() == ReplicaState::Healthy;
            self.fail(m, why);
        }
        if dropped_healthy {
            let _ = self.new_epoch().await;
        }
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This engine's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The key the volume was opened with.
    pub fn key(&self) -> Option<&EncryptionKey> {
        self.key.as_ref()
    }

    /// The engine's options.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::SeqCst);
    }

    fn all(&self) -> Vec<Arc<Member>> {
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn healthy(&self) -> Vec<Arc<Member>> {
        self.all()
            .into_iter()
            .filter(|m| m.state() == ReplicaState::Healthy)
            .collect()
    }

    /// Healthy nodes, local ones first.
    pub fn healthy_nodes(&self) -> Vec<Arc<dyn ReplicaNode>> {
        let mut v: Vec<_> = self.healthy().into_iter().map(|m| m.node.clone()).collect();
        v.sort_by_key(|n| !n.is_local());
        v
    }

    /// Overall and per-replica state.
    pub async fn status(&self) -> VolumeStatus {
        let replicas: Vec<ReplicaStatus> = self
            .all()
            .iter()
            .map(|m| ReplicaStatus {
                node: m.node.label(),
                state: m.state(),
            })
            .collect();
        let healthy = replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Healthy)
            .count();
        let robustness = if healthy == 0 {
            Robustness::Faulted
        } else if healthy == replicas.len() {
            Robustness::Healthy
        } else {
            Robustness::Degraded
        };
        VolumeStatus {
            robustness,
            generation: self.generation,
            epoch: *self.epoch.lock().await,
            replicas,
        }
    }

    /// Starts a new membership epoch on every healthy replica; replicas that
    /// cannot record it are failed (and the epoch retried without them).
    async fn new_epoch(&self) -> Result<()> {
        let mut epoch = self.epoch.lock().await;
        loop {
            let next = *epoch + 1;
            let healthy = self.healthy();
            if healthy.is_empty() {
                return Err(faulted(&self.name));
            }
            let t = self.options.timeout;
            let rs = futures::future::join_all(healthy.iter().map(|m| async move {
                tokio::time::timeout(t, m.node.set_epoch(&self.name, self.generation, next)).await
            }))
            .await;
            let mut failed = false;
            for (m, r) in healthy.iter().zip(rs) {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e @ Error::Fenced { .. })) => {
                        self.fenced.store(true, Ordering::SeqCst);
                        return Err(e);
                    }
                    Ok(Err(e)) => {
                        self.fail(m, e.to_string());
                        failed = true;
                    }
                    Err(_) => {
                        self.fail(m, "epoch update timed out".into());
                        failed = true;
                    }
                }
            }
            *epoch = next;
            if !failed {
                return Ok(());
            }
        }
    }

    fn fail(&self, m: &Member, why: String) {
        tracing::warn!(volume = %self.name, replica = %m.node.label(), reason = %why, "replica failed");
        m.set_state(ReplicaState::Failed(why));
        m.dev.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn check_fenced(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                what: format!("volume {}", self.name),
                source: Some("the engine was closed".into()),
            });
        }
        if self.fenced.load(Ordering::SeqCst) {
            return Err(Error::Fenced {
                what: format!("volume {}", self.name),
                ours: self.generation,
                current: self.generation + 1,
            });
        }
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                what: format!("volume {}", self.name),
            });
        }
        Ok(())
    }

    /// Sends one mutation to every writable replica (healthy or rebuilding).
    async fn fan_out<F, Fut>(&self, f: F) -> Result<()>
    where
        F: Fn(Arc<dyn BlockDevice>) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        self.check_fenced()?;
        let targets: Vec<(Arc<Member>, Arc<dyn BlockDevice>)> = self
            .all()
            .into_iter()
            .filter(|m| matches!(m.state(), ReplicaState::Healthy | ReplicaState::Rebuilding))
            .filter_map(|m| m.dev().map(|d| (m, d)))
            .collect();
        // Remote replicas first: their requests are queued for sending before
        // a local replica does its (synchronous) part.
        let mut targets = targets;
        targets.sort_by_key(|(m, _)| m.node.is_local());
        if !targets
            .iter()
            .any(|(m, _)| m.state() == ReplicaState::Healthy)
        {
            return Err(faulted(&self.name));
        }
        let t = self.options.timeout;
        let rs = futures::future::join_all(
            targets
                .iter()
                .map(|(_, d)| tokio::time::timeout(t, f(d.clone()))),
        )
        .await;
        let mut fenced_err = None;
        let mut refused: Vec<(&Arc<Member>, bool, Error)> = Vec::new();
        let mut dropped_healthy = false;
        let mut ok_healthy = false;
        for ((m, _), r) in targets.iter().zip(rs) {
            let was_healthy = m.state() == ReplicaState::Healthy;
            match r {
                Ok(Ok(())) => ok_healthy |= was_healthy,
                Ok(Err(e @ Error::Fenced { .. })) => {
                    self.fenced.store(true, Ordering::SeqCst);
                    fenced_err.get_or_insert(e);
                }
                Ok(Err(e)) if is_request_error(&e) => refused.push((m, was_healthy, e)),
                Ok(Err(e)) => {
                    self.fail(m, e.to_string());
                    dropped_healthy |= was_healthy;
                }
                Err(_) => {
                    self.fail(m, format!("no answer within {t:?}"));
                    dropped_healthy |= was_healthy;
                }
            }
        }
        if let Some(e) = fenced_err {
            return Err(e);
        }
        if !refused.is_empty() {
            if !ok_healthy {
                // No healthy replica took it: the request's own fault.
                return Err(refused.swap_remove(0).2);
            }
            // A healthy replica applied what these refused: they diverged
            // (a garbled reply, a replica that lost the volume…), so they
            // are failed and rebuilt, and the caller gets its success.
            for (m, was_healthy, e) in refused {
                self.fail(m, format!("refused a write a healthy replica applied: {e}"));
                dropped_healthy |= was_healthy;
            }
        }
        if dropped_healthy {
            // The survivors must know they are the only current replicas
            // before this write is acknowledged.
            self.new_epoch().await?;
        }
        if !ok_healthy || self.healthy().is_empty() {
            return Err(faulted(&self.name));
        }
        Ok(())
    }

    /// The replica to read from: a healthy local one if there is one (no
    /// network hop), else the healthy ones in turn; never one in `skip`
    /// (replicas that already refused this request).
    fn pick_reader(
        &self,
        skip: &[(Arc<Member>, Error)],
    ) -> Result<(Arc<Member>, Arc<dyn BlockDevice>)> {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let healthy = || {
            members
                .iter()
                .filter(|m| m.state() == ReplicaState::Healthy)
                .filter(|m| !skip.iter().any(|(s, _)| Arc::ptr_eq(s, m)))
                .filter_map(|m| m.dev().map(|d| (m, d)))
        };
        if let Some((m, d)) = healthy().find(|(m, _)| m.node.is_local()) {
            return Ok((m.clone(), d));
        }
        let n = healthy().count();
        if n == 0 {
            return Err(faulted(&self.name));
        }
        let i = self.next_read.fetch_add(1, Ordering::Relaxed) % n;
        healthy()
            .nth(i)
            .map(|(m, d)| (m.clone(), d))
            .ok_or_else(|| faulted(&self.name))
    }

    /// A read-type request failed on replica `m` (`None`: it did not answer
    /// in time). `Err` ends the request (this engine is fenced); `Ok` means
    /// try another healthy replica. A request-type error (out of range,
    /// invalid, not found…) is not trusted from one replica alone: the
    /// engine checked the request itself, so the replica is set aside in
    /// `refused` and the request goes to the next one — only if every
    /// healthy replica refuses it does the error reach the caller.
    async fn read_failed(
        &self,
        m: Arc<Member>,
        why: Option<Error>,
        refused: &mut Vec<(Arc<Member>, Error)>,
    ) -> Result<()> {
        match why {
            Some(e @ Error::Fenced { .. }) => {
                self.fenced.store(true, Ordering::SeqCst);
                return Err(e);
            }
            Some(e) if is_request_error(&e) => {
                tracing::debug!(volume = %self.name, replica = %m.node.label(), error = %e, "a replica refused a read; trying another");
                refused.push((m, e));
                return Ok(());
            }
            Some(e) => self.fail(&m, e.to_string()),
            None => self.fail(&m, format!("no answer within {:?}", self.options.timeout)),
        }
        self.new_epoch().await
    }

    /// A read-type request succeeded after some replicas refused it: a
    /// healthy peer served the very same request, so their refusal was
    /// their own fault (a garbled reply, a replica that lost the volume or
    /// is shorter than it): fail them, to be rebuilt.
    async fn fail_refusers(&self, refused: Vec<(Arc<Member>, Error)>) {
        if refused.is_empty() {
            return;
        }
        for (m, e) in &refused {
            self.fail(m, format!("refused a read a healthy replica served: {e}"));
        }
        // The data read is good either way; a failed epoch update fails the
        // replicas that missed it, and the next request sees that.
        let _ = self.new_epoch().await;
    }

    /// Runs a read-type request on one healthy replica (local first, then
    /// round-robin), failing over to the next on replica errors.
    async fn read_one<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(Arc<dyn BlockDevice>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.check_fenced()?;
        let mut refused = Vec::new();
        loop {
            let (m, d) = match self.pick_reader(&refused) {
                Ok(p) => p,
                Err(e) => return Err(refused.into_iter().next().map_or(e, |(_, e)| e)),
            };
            let why = match tokio::time::timeout(self.options.timeout, f(d)).await {
                Ok(Ok(v)) => {
                    self.fail_refusers(refused).await;
                    return Ok(v);
                }
                Ok(Err(e)) => Some(e),
                Err(_) => None,
            };
            self.read_failed(m, why, &mut refused).await?;
        }
    }

    /// Takes snapshot `snapshot` on every healthy replica with writes
    /// quiesced. A replica being rebuilt is failed (its rebuild restarts).
    pub async fn snapshot(&self, snapshot: &str) -> Result<SnapshotInfo> {
        let _q = self.quiesce.write().await;
        self.check_fenced()?;
        for m in self.all() {
            if m.state() == ReplicaState::Rebuilding {
                self.fail(&m, "a snapshot was taken during its rebuild".into());
            }
        }
        let healthy = self.healthy();
        let t = self.options.timeout;
        let name = &self.name;
        let rs = futures::future::join_all(healthy.iter().map(|m| async move {
            if let Some(d) = m.dev() {
                tokio::time::timeout(t, d.flush())
                    .await
                    .map_err(|_| Error::Unavailable {
                        what: m.node.label(),
                        source: Some("flush timed out".into()),
                    })??;
            }
            tokio::time::timeout(t, m.node.backend().snapshot(name, snapshot))
                .await
                .map_err(|_| Error::Unavailable {
                    what: m.node.label(),
                    source: Some("snapshot timed out".into()),
                })?
        }))
        .await;
        let mut info = None;
        let mut request_err = None;
        let mut dropped = false;
        for (m, r) in healthy.iter().zip(rs) {
            match r {
                Ok(i) => {
                    info.get_or_insert(i);
                }
                Err(e) if is_request_error(&e) => {
                    request_err.get_or_insert(e);
                }
                Err(e) => {
                    self.fail(m, e.to_string());
                    dropped = true;
                }
            }
        }
        if dropped {
            self.new_epoch().await?;
        }
        if let Some(e) = request_err {
            return Err(e);
        }
        info.ok_or_else(|| faulted(&self.name))
    }
}

/// Pings the remote replicas of `vol` every `every` until it is dropped or closed.
async fn keepalive(vol: std::sync::Weak<ReplicatedVolume>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(v) = vol.upgrade() else { return };
        if v.closed.load(Ordering::SeqCst) || v.fenced.load(Ordering::SeqCst) {
            return;
        }
        v.ping_replicas().await;
    }
}

#[async_trait]
impl BlockDevice for ReplicatedVolume {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn capabilities(&self) -> DeviceCaps {
        DeviceCaps {
            discard: true,
            write_zeroes: true,
            block_status: true,
            shared_flush: true,
        }
    }

    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        self.check_fenced()?;
        let mut refused = Vec::new();
        loop {
            let (m, d) = match self.pick_reader(&refused) {
                Ok(p) => p,
                Err(e) => return Err(refused.into_iter().next().map_or(e, |(_, e)| e)),
            };
            // Straight into the caller's buffer: a failed attempt is simply
            // overwritten by the next replica's answer.
            let why = match tokio::time::timeout(self.options.timeout, d.read_at(buf, offset)).await
            {
                Ok(Ok(())) => {
                    self.fail_refusers(refused).await;
                    return Ok(());
                }
                Ok(Err(e)) => Some(e),
                Err(_) => None,
            };
            self.read_failed(m, why, &mut refused).await?;
        }
    }

    async fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.size())?;
        let _q = self.quiesce.read().await;
        let _d = self.enter_dirty(offset, buf.len() as u64).await?;
        self.fan_out(|d| async move { d.write_at(buf, offset, flags).await })
            .await
    }

    async fn flush(&self) -> Result<()> {
        if self.read_only {
            return self.read_one(|d| async move { d.flush().await }).await;
        }
        let point = self.dirty.flush_point();
        self.fan_out(|d| async move { d.flush().await }).await?;
        self.clear_dirty_after_flush(point).await;
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size())?;
        let _q = self.quiesce.read().await;
        let _d = self.enter_dirty(offset, len).await?;
        self.fan_out(|d| async move { d.discard(offset, len).await })
            .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size())?;
        let _q = self.quiesce.read().await;
        let _d = self.enter_dirty(offset, len).await?;
        self.fan_out(|d| async move { d.write_zeroes(offset, len, flags).await })
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        if len == 0 {
            return Err(Error::invalid("block status length", "must not be 0"));
        }
        check_range(offset, len, self.size())?;
        self.read_one(|d| async move { d.block_status(offset, len).await })
            .await
    }
}
