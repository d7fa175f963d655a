//! The embedded state store: [`StateStore`] on one redb file.
//!
//! Five tables hold the state: `kv` (key → create/mod revision, lease, value),
//! `meta` (the global revision, the compaction point, the next lease id), `log`
//! (revision → change, bounded to the last [`RedbOptions::history`]
//! revisions), `leases` (id → TTL and wall-clock deadline) and `lease_keys`
//! (lease, key) so an expiring lease finds its keys without a scan.
//!
//! Every revision is exactly one change and one log entry, so a watcher can
//! tell from revision numbers alone whether it missed something. Writes commit
//! one redb transaction each (durable on return) on a blocking thread, then
//! publish their events on a broadcast channel while still holding the write
//! lock, so live events arrive in revision order. A watch subscribes before
//! reading the log, then follows the broadcast, dropping revisions it has
//! already delivered and re-reading the log whenever it sees a gap (lag).
//!
//! Lease deadlines are wall-clock instants stored with the lease, so they
//! survive a restart; a background task revokes leases whose deadline passed
//! and deletes their keys, emitting delete events.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use hci_core::store::{
    KeyValue, LeaseId, ListResult, Precondition, PutOptions, StateStore, WatchEvent, WatchStream,
};
use hci_core::{Error, Result};
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use tokio::sync::{Notify, broadcast};

use super::codec::{decode_event, decode_kv, encode_event, encode_kv};

const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
/// Lease id → (TTL in ms, deadline in ms since the Unix epoch).
const LEASES: TableDefinition<'_, i64, (u64, u64)> = TableDefinition::new("leases");
const LEASE_KEYS: TableDefinition<'_, (i64, &str), ()> = TableDefinition::new("lease_keys");

const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";
const META_NEXT_LEASE: &str = "next_lease";

/// Log entries a catching-up watcher reads per transaction.
const LOG_CHUNK: usize = 1024;

/// Tuning of a [`RedbStateStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedbOptions {
    /// How many of the latest revisions the change log keeps for watches;
    /// older ones are compacted ([`Error::Compacted`]).
    pub history: u64,
    /// Capacity of the live-event channel per watcher before it falls back to
    /// re-reading the log.
    pub event_buffer: usize,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            history: 100_000,
            event_buffer: 4096,
        }
    }
}

/// [`StateStore`] on a single redb file: durable, revisioned, watchable, with leases.
///
/// Cheap to clone (a handle). Opening needs a Tokio runtime: lease expiry runs
/// as a background task that ends when the last handle is dropped.
///
/// ```no_run
/// # async fn demo() -> hci_core::Result<()> {
/// use hci_core::store::{PutOptions, StateStore};
/// use hci_daemon::store::RedbStateStore;
///
/// let store = RedbStateStore::open("/var/lib/hci/state.redb").await?;
/// let rev = store.put("/hci/v1/volumes/data", b"{}".to_vec(), PutOptions::default()).await?;
/// assert_eq!(store.get("/hci/v1/volumes/data").await?.map(|kv| kv.mod_revision), Some(rev));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedbStateStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    options: RedbOptions,
    events: broadcast::Sender<Arc<WatchEvent>>,
    /// Serializes write transactions with the publication of their events.
    write_lock: Mutex<()>,
    /// Puts and deletes waiting for the next group commit.
    queue: Mutex<Vec<Queued>>,
    /// Mirror of the `leases` table's deadlines, for the expiry task.
    lease_deadlines: Mutex<HashMap<LeaseId, u64>>,
    lease_wake: Arc<Notify>,
    shutdown: Arc<Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.notify_one();
    }
}

impl fmt::Debug for RedbStateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStateStore")
            .field("path", &self.inner.path)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

fn db_err(e: impl Into<redb::Error>) -> Error {
    let e: redb::Error = e.into();
    match e {
        redb::Error::DatabaseAlreadyOpen => Error::Busy {
            kind: "state store",
            name: String::new(),
            reason: "the database is open in another process or handle".to_string(),
        },
        redb::Error::Corrupted(_) => Error::Corrupt {
            what: "state store".to_string(),
            source: Some(Box::new(e)),
        },
        e => Error::Backend {
            backend: "redb",
            message: "state store operation failed".to_string(),
            source: Some(Box::new(e)),
        },
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lease_not_found(lease: LeaseId) -> Error {
    Error::not_found("lease", lease.to_string())
}

impl RedbStateStore {
    /// Opens (or creates) the store at `path` with default options.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, RedbOptions::default()).await
    }

    /// Opens (or creates) the store at `path`.
    pub async fn open_with(path: impl AsRef<Path>, options: RedbOptions) -> Result<Self> {
        if options.history == 0 {
            return Err(Error::invalid(
                "store history",
                "must keep at least one revision",
            ));
        }
        let path = path.as_ref().to_path_buf();
        let open_path = path.clone();
        let (db, deadlines) = tokio::task::spawn_blocking(move || open_db(&open_path))
            .await
            .map_err(join_err)??;
        let (events, _) = broadcast::channel(options.event_buffer.max(16));
        let inner = Arc::new(Inner {
            db,
            path,
            options,
            events,
            write_lock: Mutex::new(()),
            queue: Mutex::new(Vec::new()),
            lease_deadlines: Mutex::new(deadlines),
            lease_wake: Arc::new(Notify::new()),
            shutdown: Arc::new(Notify::new()),
        });
        tokio::spawn(lease_reaper(
            Arc::downgrade(&inner),
            inner.lease_wake.clone(),
            inner.shutdown.clone(),
        ));
        tracing::debug!(path = %inner.path.display(), "opened redb state store");
        Ok(RedbStateStore { inner })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(join_err)?
    }
}

fn join_err(e: tokio::task::JoinError) -> Error {
    Error::Backend {
        backend: "redb",
        message: "state store worker thread failed".to_string(),
        source: Some(Box::new(e)),
    }
}

/// Opens the database, creates missing tables, loads lease deadlines.
fn open_db(path: &Path) -> Result<(Database, HashMap<LeaseId, u64>)> {
    let db = Database::create(path).map_err(db_err)?;
    let txn = db.begin_write().map_err(db_err)?;
    let mut deadlines = HashMap::new();
    {
        txn.open_table(KV).map_err(db_err)?;
        txn.open_table(META).map_err(db_err)?;
        txn.open_table(LOG).map_err(db_err)?;
        txn.open_table(LEASE_KEYS).map_err(db_err)?;
        let leases = txn.open_table(LEASES).map_err(db_err)?;
        for entry in leases.iter().map_err(db_err)? {
            let (id, lease) = entry.map_err(db_err)?;
            deadlines.insert(id.value(), lease.value().1);
        }
    }
    txn.commit().map_err(db_err)?;
    Ok((db, deadlines))
}

/// The tables of one write transaction plus the changes it made.
struct Tx<'t> {
    kv: Table<'t, &'static str, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
    log: Table<'t, u64, &'static [u8]>,
    leases: Table<'t, i64, (u64, u64)>,
    lease_keys: Table<'t, (i64, &'static str), ()>,
    revision: u64,
    start_revision: u64,
    events: Vec<WatchEvent>,
    /// Lease deadline changes to mirror after commit (`None` = removed).
    lease_changes: Vec<(LeaseId, Option<u64>)>,
}

impl<'t> Tx<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self> {
        let meta = txn.open_table(META).map_err(db_err)?;
        let revision = meta
            .get(META_REVISION)
            .map_err(db_err)?
            .map_or(0, |v| v.value());
        Ok(Tx {
            kv: txn.open_table(KV).map_err(db_err)?,
            meta,
            log: txn.open_table(LOG).map_err(db_err)?,
            leases: txn.open_table(LEASES).map_err(db_err)?,
            lease_keys: txn.open_table(LEASE_KEYS).map_err(db_err)?,
            revision,
            start_revision: revision,
            events: Vec::new(),
            lease_changes: Vec::new(),
        })
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        match self.kv.get(key).map_err(db_err)? {
            Some(v) => decode_kv(key, v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn meta(&self, name: &str) -> Result<u64> {
        Ok(self
            .meta
            .get(name)
            .map_err(db_err)?
            .map_or(0, |v| v.value()))
    }

    /// Records one change at the next revision.
    fn record(&mut self, event: WatchEvent) -> Result<()> {
        self.log
            .insert(event.revision(), encode_event(&event).as_slice())
            .map_err(db_err)?;
        self.events.push(event);
        Ok(())
    }

    fn put(&mut self, key: &str, value: Vec<u8>, options: PutOptions) -> Result<u64> {
        let old = self.get(key)?;
        check(key, old.as_ref(), options.precondition)?;
        if let Some(lease) = options.lease
            && self.leases.get(lease).map_err(db_err)?.is_none()
        {
            return Err(lease_not_found(lease));
        }
        self.revision += 1;
        let revision = self.revision;
        let create_revision = old.as_ref().map_or(revision, |kv| kv.create_revision);
        if let Some(old_lease) = old.as_ref().and_then(|kv| kv.lease)
            && Some(old_lease) != options.lease
        {
            self.lease_keys.remove((old_lease, key)).map_err(db_err)?;
        }
        if let Some(lease) = options.lease {
            self.lease_keys.insert((lease, key), ()).map_err(db_err)?;
        }
        self.kv
            .insert(
                key,
                encode_kv(create_revision, revision, options.lease, &value).as_slice(),
            )
            .map_err(db_err)?;
        self.record(WatchEvent::Put(KeyValue {
            key: key.to_string(),
            value,
            create_revision,
            mod_revision: revision,
            lease: options.lease,
        }))?;
        Ok(revision)
    }

    fn delete(&mut self, key: &str, precondition: Precondition) -> Result<u64> {
        if precondition == Precondition::MustNotExist {
            return Err(Error::invalid(
                "delete precondition",
                "MustNotExist cannot apply to a delete",
            ));
        }
        let old = self.get(key)?;
        check(key, old.as_ref(), precondition)?;
        let Some(old) = old else {
            return Err(Error::not_found("key", key));
        };
        self.remove(&old)
    }

    fn remove(&mut self, old: &KeyValue) -> Result<u64> {
        self.revision += 1;
        let revision = self.revision;
        self.kv.remove(old.key.as_str()).map_err(db_err)?;
        if let Some(lease) = old.lease {
            self.lease_keys
                .remove((lease, old.key.as_str()))
                .map_err(db_err)?;
        }
        self.record(WatchEvent::Delete {
            key: old.key.clone(),
            mod_revision: revision,
        })?;
        Ok(revision)
    }

    fn grant_lease(&mut self, ttl: Duration) -> Result<LeaseId> {
        let id = self.meta(META_NEXT_LEASE)?.max(1);
        self.meta.insert(META_NEXT_LEASE, id + 1).map_err(db_err)?;
        let id = LeaseId::try_from(id).map_err(|_| Error::Backend {
            backend: "redb",
            message: "lease ids exhausted".to_string(),
            source: None,
        })?;
        let ttl = duration_ms(ttl);
        let deadline = now_ms().saturating_add(ttl);
        self.leases.insert(id, (ttl, deadline)).map_err(db_err)?;
        self.lease_changes.push((id, Some(deadline)));
        Ok(id)
    }

    /// The lease's (TTL, deadline), if it exists.
    fn lease(&self, lease: LeaseId) -> Result<Option<(u64, u64)>> {
        Ok(self.leases.get(lease).map_err(db_err)?.map(|v| v.value()))
    }

    fn keep_alive(&mut self, lease: LeaseId) -> Result<bool> {
        let Some((ttl, deadline)) = self.lease(lease)? else {
            return Ok(false);
        };
        let now = now_ms();
        if deadline <= now {
            self.revoke(lease)?;
            return Ok(false);
        }
        let deadline = now.saturating_add(ttl);
        self.leases.insert(lease, (ttl, deadline)).map_err(db_err)?;
        self.lease_changes.push((lease, Some(deadline)));
        Ok(true)
    }

    /// Removes the lease and deletes its keys; false if it did not exist.
    fn revoke(&mut self, lease: LeaseId) -> Result<bool> {
        if self.leases.remove(lease).map_err(db_err)?.is_none() {
            return Ok(false);
        }
        self.lease_changes.push((lease, None));
        let mut keys = Vec::new();
        for entry in self.lease_keys.range((lease, "")..).map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            let (id, key) = k.value();
            if id != lease {
                break;
            }
            keys.push(key.to_string());
        }
        for key in keys {
            if let Some(kv) = self.get(&key)? {
                self.remove(&kv)?;
            }
        }
        Ok(true)
    }

    /// Stores the revision and trims the change log to the history bound.
    fn finish(&mut self, history: u64) -> Result<()> {
        if self.revision == self.start_revision {
            return Ok(());
        }
        self.meta
            .insert(META_REVISION, self.revision)
            .map_err(db_err)?;
        let compacted = self.meta(META_COMPACTED)?;
        let keep_from = self.revision.saturating_sub(history);
        if keep_from > compacted {
            for revision in compacted + 1..=keep_from {
                self.log.remove(revision).map_err(db_err)?;
            }
            self.meta
                .insert(META_COMPACTED, keep_from)
                .map_err(db_err)?;
        }
        Ok(())
    }
}

/// A grouped write.
type Op = Box<dyn FnOnce(&mut Tx<'_>) -> Result<u64> + Send>;

/// A write waiting for its group commit, and where its answer goes.
struct Queued {
    op: Op,
    done: std::sync::mpsc::SyncSender<Result<u64>>,
}

/// Errors a put or delete returns before changing anything.
fn is_precondition(e: &Error) -> bool {
    matches!(
        e,
        Error::AlreadyExists { .. }
            | Error::NotFound { .. }
            | Error::Conflict { .. }
            | Error::Invalid { .. }
    )
}

/// Checks a write precondition against the key's current record.
fn check(key: &str, current: Option<&KeyValue>, precondition: Precondition) -> Result<()> {
    match (precondition, current) {
        (Precondition::None, _) => Ok(()),
        (Precondition::MustNotExist, None) => Ok(()),
        (Precondition::MustNotExist, Some(_)) => Err(Error::already_exists("key", key)),
        (Precondition::Revision(_), None) => Err(Error::not_found("key", key)),
        (Precondition::Revision(expected), Some(kv)) if kv.mod_revision == expected => Ok(()),
        (Precondition::Revision(expected), Some(kv)) => Err(Error::Conflict {
            kind: "key",
            name: key.to_string(),
            expected,
            actual: kv.mod_revision,
        }),
    }
}

/// What a catching-up watcher read from the log.
struct LogRead {
    events: Vec<WatchEvent>,
    /// The store revision at the time of the read.
    revision: u64,
}

impl Inner {
    /// Runs `f` in one write transaction, commits, then publishes its events.
    fn write<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let _guard = lock(&self.write_lock);
        self.write_locked(f)
    }

    /// Runs `op` (a put or delete) in the next group commit: writers that
    /// arrive while a commit is running share the following one, so N
    /// concurrent writes cost one fsync rather than N. Each op's own
    /// precondition failure is its own; any other error fails the group.
    fn write_grouped(&self, op: Op) -> Result<u64> {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        lock(&self.queue).push(Queued { op, done });
        {
            let _guard = lock(&self.write_lock);
            let batch = std::mem::take(&mut *lock(&self.queue));
            if !batch.is_empty() {
                self.commit_group(batch);
            }
        }
        result.recv().unwrap_or_else(|_| {
            Err(Error::Backend {
                backend: "redb",
                message: "a group commit ended without an answer".into(),
                source: None,
            })
        })
    }

    /// Commits `batch` in one transaction (the write lock is held).
    fn commit_group(&self, batch: Vec<Queued>) {
        let mut replies = Vec::with_capacity(batch.len());
        let committed = self.write_locked(|tx| {
            for q in batch {
                let r = (q.op)(tx);
                match r {
                    Err(e) if !is_precondition(&e) => {
                        replies.push((q.done, None));
                        return Err(e);
                    }
                    r => replies.push((q.done, Some(r))),
                }
            }
            Ok(())
        });
        let failed = committed.err().map(|e| e.to_string());
        for (done, r) in replies {
            let r = match (&failed, r) {
                (None, Some(r)) => r,
                (failed, _) => Err(Error::Backend {
                    backend: "redb",
                    message: format!(
                        "the write was not committed: {}",
                        failed.as_deref().unwrap_or("the group failed")
                    ),
                    source: None,
                }),
            };
            let _ = done.send(r);
        }
    }

    fn write_locked<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let (out, events, lease_changes) = {
            let mut tx = Tx::open(&txn)?;
            let out = match f(&mut tx) {
                Ok(out) => out,
                Err(e) => {
                    drop(tx);
                    txn.abort().map_err(db_err)?;
                    return Err(e);
                }
            };
            tx.finish(self.options.history)?;
            (out, tx.events, tx.lease_changes)
        };
        txn.commit().map_err(db_err)?;
        if !lease_changes.is_empty() {
            let mut deadlines = lock(&self.lease_deadlines);
            for (lease, deadline) in lease_changes {
                match deadline {
                    Some(d) => deadlines.insert(lease, d),
                    None => deadlines.remove(&lease),
                };
            }
        }
        for event in events {
            // No receiver is fine: nobody is watching.
            let _ = self.events.send(Arc::new(event));
        }
        Ok(out)
    }

    fn read_meta(&self, txn: &redb::ReadTransaction, name: &str) -> Result<u64> {
        let meta = txn.open_table(META).map_err(db_err)?;
        Ok(meta.get(name).map_err(db_err)?.map_or(0, |v| v.value()))
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let kv = txn.open_table(KV).map_err(db_err)?;
        match kv.get(key).map_err(db_err)? {
            Some(v) => decode_kv(key, v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn list(&self, prefix: &str) -> Result<ListResult> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let revision = self.read_meta(&txn, META_REVISION)?;
        let kv = txn.open_table(KV).map_err(db_err)?;
        let mut items = Vec::new();
        for entry in kv.range(prefix..).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            items.push(decode_kv(key, v.value())?);
        }
        Ok(ListResult { items, revision })
    }

    fn current_revision(&self) -> Result<u64> {
        let txn = self.db.begin_read().map_err(db_err)?;
        self.read_meta(&txn, META_REVISION)
    }

    /// Reads up to [`LOG_CHUNK`] log entries from revision `from` on.
    fn read_log(&self, from: u64) -> Result<LogRead> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let revision = self.read_meta(&txn, META_REVISION)?;
        let compacted = self.read_meta(&txn, META_COMPACTED)?;
        if from <= compacted {
            return Err(Error::Compacted {
                requested: from,
                oldest: compacted + 1,
            });
        }
        let log = txn.open_table(LOG).map_err(db_err)?;
        let mut events = Vec::new();
        for entry in log.range(from..).map_err(db_err)?.take(LOG_CHUNK) {
            let (rev, bytes) = entry.map_err(db_err)?;
            events.push(decode_event(rev.value(), bytes.value())?);
        }
        Ok(LogRead { events, revision })
    }

    /// Revokes every lease whose deadline has passed.
    fn expire_due_leases(&self) -> Result<()> {
        let now = now_ms();
        let due: Vec<LeaseId> = lock(&self.lease_deadlines)
            .iter()
            .filter(|&(_, &deadline)| deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            for lease in due {
                // Re-check inside the transaction: a keep-alive may have won.
                match tx.lease(lease)? {
                    Some((_, deadline)) if deadline <= now => {
                        tracing::debug!(lease, "lease expired");
                        tx.revoke(lease)?;
                    }
                    Some(_) => {}
                    None => tx.lease_changes.push((lease, None)),
                }
            }
            Ok(())
        })
    }

    fn next_lease_deadline(&self) -> Option<u64> {
        lock(&self.lease_deadlines).values().copied().min()
    }
}

/// Expires leases as their deadlines pass, until the store is dropped.
async fn lease_reaper(inner: Weak<Inner>, wake: Arc<Notify>, shutdown: Arc<Notify>) {
    const IDLE: Duration = Duration::from_secs(3600);
    const RETRY: Duration = Duration::from_secs(1);
    loop {
        let wait = {
            let Some(store) = inner.upgrade() else { return };
            match store.next_lease_deadline() {
                Some(deadline) if deadline <= now_ms() => {
                    let result =
                        tokio::task::spawn_blocking(move || store.expire_due_leases()).await;
                    match result {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => tracing::warn!(error = %e, "failed to expire leases"),
                        Err(e) => tracing::warn!(error = %e, "lease expiry task failed"),
                    }
                    RETRY
                }
                Some(deadline) => Duration::from_millis(deadline - now_ms()).min(IDLE),
                None => IDLE,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = wake.notified() => {}
            () = shutdown.notified() => return,
        }
    }
}

/// State of one watch stream.
struct Watcher {
    inner: Weak<Inner>,
    rx: broadcast::Receiver<Arc<WatchEvent>>,
    prefix: String,
    /// Events with a lower revision are not delivered (`from_revision`).
    from: u64,
    /// The next global revision this watcher has not yet seen.
    next: u64,
    /// True while the watcher must read the log rather than the channel.
    catching_up: bool,
    pending: VecDeque<WatchEvent>,
    done: bool,
}

impl Watcher {
    fn accept(&mut self, event: &WatchEvent) {
        let revision = event.revision();
        if revision < self.next {
            return;
        }
        self.next = revision + 1;
        if revision >= self.from && event.key().starts_with(self.prefix.as_str()) {
            self.pending.push_back(event.clone());
        }
    }

    async fn catch_up(&mut self) -> Result<()> {
        let Some(inner) = self.inner.upgrade() else {
            self.done = true;
            return Ok(());
        };
        let from = self.next;
        let read = tokio::task::spawn_blocking(move || inner.read_log(from))
            .await
            .map_err(join_err)??;
        let complete = read.events.len() < LOG_CHUNK;
        for event in &read.events {
            self.accept(event);
        }
        if complete {
            // Everything up to the revision read is now delivered (or filtered).
            self.next = self.next.max(read.revision + 1);
            self.catching_up = false;
        }
        Ok(())
    }

    /// Produces the next event, or `None` when the store is gone.
    async fn next_item(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            if self.catching_up {
                if let Err(e) = self.catch_up().await {
                    self.done = true;
                    return Some(Err(e));
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(event) if event.revision() > self.next => self.catching_up = true,
                Ok(event) => self.accept(&event),
                Err(broadcast::error::RecvError::Lagged(_)) => self.catching_up = true,
                Err(broadcast::error::RecvError::Closed) => self.done = true,
            }
        }
    }
}

#[async_trait]
impl StateStore for RedbStateStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_string();
        self.blocking(move |inner| inner.get(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<ListResult> {
        let prefix = prefix.to_string();
        self.blocking(move |inner| inner.list(&prefix)).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, options: PutOptions) -> Result<u64> {
        if key.is_empty() {
            return Err(Error::invalid("key", "must not be empty"));
        }
        let key = key.to_string();
        self.blocking(move |inner| {
            inner.write_grouped(Box::new(move |tx| tx.put(&key, value, options)))
        })
        .await
    }

    async fn delete(&self, key: &str, precondition: Precondition) -> Result<u64> {
        let key = key.to_string();
        self.blocking(move |inner| {
            inner.write_grouped(Box::new(move |tx| tx.delete(&key, precondition)))
        })
        .await
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream> {
        // Subscribe first: every change committed after the log read below
        // is then guaranteed to reach this receiver.
        let rx = self.inner.events.subscribe();
        let (next, catching_up) = if from_revision == 0 {
            (self.current_revision().await? + 1, false)
        } else {
            let compacted = self
                .blocking(|inner| {
                    let txn = inner.db.begin_read().map_err(db_err)?;
                    inner.read_meta(&txn, META_COMPACTED)
                })
                .await?;
            if from_revision <= compacted {
                return Err(Error::Compacted {
                    requested: from_revision,
                    oldest: compacted + 1,
                });
            }
            (from_revision, true)
        };
        let watcher = Watcher {
            inner: Arc::downgrade(&self.inner),
            rx,
            prefix: prefix.to_string(),
            from: from_revision,
            next,
            catching_up,
            pending: VecDeque::new(),
            done: false,
        };
        let stream = futures::stream::unfold(watcher, |mut w| async move {
            w.next_item().await.map(|item| (item, w))
        });
        Ok(Box::pin(stream))
    }

    async fn current_revision(&self) -> Result<u64> {
        self.blocking(Inner::current_revision).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(Error::invalid("lease TTL", "must be positive"));
        }
        let id = self
            .blocking(move |inner| inner.write(|tx| tx.grant_lease(ttl)))
            .await?;
        self.inner.lease_wake.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let alive = self
            .blocking(move |inner| inner.write(|tx| tx.keep_alive(lease)))
            .await?;
        if alive {
            Ok(())
        } else {
            Err(lease_not_found(lease))
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let existed = self
            .blocking(move |inner| inner.write(|tx| tx.revoke(lease)))
            .await?;
        if existed {
            Ok(())
        } else {
            Err(lease_not_found(lease))
        }
    }
}
