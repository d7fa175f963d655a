//! An in-memory [`StateStore`] with etcd semantics.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::store::{
    KeyValue, LeaseId, ListResult, Precondition, PutOptions, StateStore, WatchEvent, WatchStream,
};

/// How many past changes are kept for watches that start in the past.
const DEFAULT_HISTORY: usize = 100_000;
/// Live events buffered per watcher before it is cut off as too slow.
const WATCH_BUFFER: usize = 16_384;

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

#[derive(Debug)]
struct Inner {
    kv: BTreeMap<String, KeyValue>,
    revision: u64,
    history: VecDeque<WatchEvent>,
    history_cap: usize,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    events: broadcast::Sender<WatchEvent>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Records a change: bumps nothing (the caller did), keeps history, tells watchers.
    fn emit(&mut self, events: &broadcast::Sender<WatchEvent>, ev: WatchEvent) {
        if self.history.len() == self.history_cap {
            self.history.pop_front();
        }
        self.history.push_back(ev.clone());
        // No receivers is fine.
        let _ = events.send(ev);
    }

    fn oldest_available(&self) -> u64 {
        self.history
            .front()
            .map(WatchEvent::revision)
            .unwrap_or(self.revision + 1)
    }

    fn remove_key(&mut self, events: &broadcast::Sender<WatchEvent>, key: &str) -> u64 {
        if let Some(old) = self.kv.remove(key)
            && let Some(l) = old.lease.and_then(|l| self.leases.get_mut(&l))
        {
            l.keys.remove(key);
        }
        self.revision += 1;
        let rev = self.revision;
        self.emit(
            events,
            WatchEvent::Delete {
                key: key.to_string(),
                mod_revision: rev,
            },
        );
        rev
    }

    fn expire(&mut self, events: &broadcast::Sender<WatchEvent>, id: LeaseId) {
        if let Some(lease) = self.leases.remove(&id) {
            for key in lease.keys {
                if self.kv.get(&key).and_then(|kv| kv.lease) == Some(id) {
                    self.remove_key(events, &key);
                }
            }
        }
    }

    fn expire_due(&mut self, events: &broadcast::Sender<WatchEvent>) {
        let now = Instant::now();
        let due: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.expire(events, id);
        }
    }
}

/// State held in memory with etcd semantics: the reference [`StateStore`].
///
/// One global revision, compare-and-swap on modification revisions, watches that
/// replay the last 100,000 changes and then follow live ones, and leases that
/// delete their keys on expiry. Leases need a Tokio runtime (expiry timers).
#[derive(Debug, Clone)]
pub struct MemStateStore {
    shared: Arc<Shared>,
}

impl Default for MemStateStore {
    fn default() -> Self {
        Self::with_history(DEFAULT_HISTORY)
    }
}

impl MemStateStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store keeping `history` past changes for watches (at least 1).
    pub fn with_history(history: usize) -> Self {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        MemStateStore {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    kv: BTreeMap::new(),
                    revision: 0,
                    history: VecDeque::new(),
                    history_cap: history.max(1),
                    leases: HashMap::new(),
                    next_lease: 1,
                }),
                events,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut g = self.shared.lock();
        g.expire_due(&self.shared.events);
        g
    }
}

/// Expires lease `id` at its deadline unless it was renewed or revoked.
async fn lease_timer(shared: Weak<Shared>, id: LeaseId) {
    loop {
        let deadline = {
            let Some(s) = shared.upgrade() else { return };
            let g = s.lock();
            match g.leases.get(&id) {
                Some(l) => l.deadline,
                None => return,
            }
        };
        tokio::time::sleep_until(deadline).await;
        let Some(s) = shared.upgrade() else { return };
        let mut g = s.lock();
        match g.leases.get(&id) {
            Some(l) if l.deadline <= Instant::now() => {
                g.expire(&s.events, id);
                return;
            }
            Some(_) => continue,
            None => return,
        }
    }
}

fn conflict(key: &str, expected: u64, actual: u64) -> Error {
    Error::Conflict {
        kind: "key",
        name: key.to_string(),
        expected,
        actual,
    }
}

#[async_trait]
impl StateStore for MemStateStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(self.lock().kv.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<ListResult> {
        let g = self.lock();
        let items =
            g.kv.range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v.clone())
                .collect();
        Ok(ListResult {
            items,
            revision: g.revision,
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, options: PutOptions) -> Result<u64> {
        if key.is_empty() {
            return Err(Error::invalid("key", "must not be empty"));
        }
        let mut g = self.lock();
        let existing = g.kv.get(key).cloned();
        match (options.precondition, &existing) {
            (Precondition::None, _) => {}
            (Precondition::MustNotExist, Some(_)) => return Err(Error::already_exists("key", key)),
            (Precondition::MustNotExist, None) => {}
            (Precondition::Revision(_), None) => return Err(Error::not_found("key", key)),
            (Precondition::Revision(r), Some(kv)) if kv.mod_revision != r => {
                return Err(conflict(key, r, kv.mod_revision));
            }
            (Precondition::Revision(_), Some(_)) => {}
        }
        if let Some(id) = options.lease
            && !g.leases.contains_key(&id)
        {
            return Err(Error::not_found("lease", id.to_string()));
        }
        if let Some(old) = existing.as_ref().and_then(|kv| kv.lease)
            && let Some(l) = g.leases.get_mut(&old)
        {
            l.keys.remove(key);
        }
        if let Some(id) = options.lease
            && let Some(l) = g.leases.get_mut(&id)
        {
            l.keys.insert(key.to_string());
        }
        g.revision += 1;
        let rev = g.revision;
        let kv = KeyValue {
            key: key.to_string(),
            value,
            create_revision: existing.map(|e| e.create_revision).unwrap_or(rev),
            mod_revision: rev,
            lease: options.lease,
        };
        g.kv.insert(key.to_string(), kv.clone());
        g.emit(&self.shared.events, WatchEvent::Put(kv));
        Ok(rev)
    }

    async fn delete(&self, key: &str, precondition: Precondition) -> Result<u64> {
        let mut g = self.lock();
        let Some(kv) = g.kv.get(key) else {
            return Err(Error::not_found("key", key));
        };
        match precondition {
            Precondition::None => {}
            Precondition::MustNotExist => {
                return Err(Error::invalid(
                    "delete precondition",
                    "MustNotExist makes no sense",
                ));
            }
            Precondition::Revision(r) if kv.mod_revision != r => {
                return Err(conflict(key, r, kv.mod_revision));
            }
            Precondition::Revision(_) => {}
        }
        Ok(g.remove_key(&self.shared.events, key))
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream> {
        let g = self.lock();
        // Subscribe under the lock: every change after this point reaches `rx`, every
        // change before it is in the history.
        let rx = self.shared.events.subscribe();
        let mut replay = VecDeque::new();
        if from_revision != 0 && from_revision <= g.revision {
            let oldest = g.oldest_available();
            if from_revision < oldest {
                return Err(Error::Compacted {
                    requested: from_revision,
                    oldest,
                });
            }
            replay.extend(
                g.history
                    .iter()
                    .filter(|e| e.revision() >= from_revision && e.key().starts_with(prefix))
                    .cloned(),
            );
        }
        let start = if from_revision == 0 {
            g.revision + 1
        } else {
            from_revision
        };
        drop(g);
        let state = (replay, rx, prefix.to_string(), start, false);
        let stream = futures::stream::unfold(
            state,
            |(mut replay, mut rx, prefix, start, done)| async move {
                if done {
                    return None;
                }
                if let Some(ev) = replay.pop_front() {
                    return Some((Ok(ev), (replay, rx, prefix, start, false)));
                }
                loop {
                    match rx.recv().await {
                        Ok(ev) if ev.revision() >= start && ev.key().starts_with(&prefix) => {
                            return Some((Ok(ev), (replay, rx, prefix, start, false)));
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let err = Error::Unavailable {
                                what: "watch (the watcher fell too far behind)".into(),
                                source: None,
                            };
                            return Some((Err(err), (replay, rx, prefix, start, true)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }

    async fn current_revision(&self) -> Result<u64> {
        Ok(self.lock().revision)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(Error::invalid("lease TTL", "must be greater than 0"));
        }
        let id = {
            let mut g = self.lock();
            let id = g.next_lease;
            g.next_lease += 1;
            g.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: BTreeSet::new(),
                },
            );
            id
        };
        tokio::spawn(lease_timer(Arc::downgrade(&self.shared), id));
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut g = self.lock();
        let l = g
            .leases
            .get_mut(&lease)
            .ok_or_else(|| Error::not_found("lease", lease.to_string()))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let mut g = self.lock();
        if !g.leases.contains_key(&lease) {
            return Err(Error::not_found("lease", lease.to_string()));
        }
        g.expire(&self.shared.events, lease);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    async fn put(s: &MemStateStore, key: &str) -> u64 {
        s.put(key, b"v".to_vec(), PutOptions::default())
            .await
            .expect("put")
    }

    #[tokio::test]
    async fn watching_compacted_history_fails_and_the_rest_replays() {
        let s = MemStateStore::with_history(3);
        for i in 0..5 {
            put(&s, &format!("/k{i}")).await;
        }
        match s.watch("/", 2).await {
            Err(Error::Compacted { requested, oldest }) => assert_eq!((requested, oldest), (2, 3)),
            Err(e) => panic!("expected Compacted, got {e}"),
            Ok(_) => panic!("expected Compacted, got a stream"),
        }
        let mut w = s.watch("/", 3).await.expect("watch from the oldest kept");
        for rev in 3..=5 {
            let ev = w.next().await.expect("event").expect("ok");
            assert_eq!(ev.revision(), rev);
        }
        // A revision in the future is not compacted: the watch waits for it.
        let mut w = s.watch("/", 7).await.expect("watch from the future");
        put(&s, "/k5").await;
        put(&s, "/k6").await;
        let ev = w.next().await.expect("event").expect("ok");
        assert_eq!((ev.key(), ev.revision()), ("/k6", 7));
    }

    #[tokio::test]
    async fn rewriting_a_key_without_its_lease_detaches_it() {
        let s = MemStateStore::new();
        let lease = s.grant_lease(Duration::from_secs(60)).await.expect("grant");
        let with_lease = PutOptions {
            precondition: Precondition::None,
            lease: Some(lease),
        };
        s.put("/a", b"1".to_vec(), with_lease).await.expect("put");
        s.put("/b", b"1".to_vec(), with_lease).await.expect("put");
        put(&s, "/a").await;
        s.revoke_lease(lease).await.expect("revoke");
        assert!(
            s.get("/a").await.expect("get").is_some(),
            "detached key deleted"
        );
        assert!(s.get("/b").await.expect("get").is_none(), "leased key kept");
        assert_eq!(s.current_revision().await.expect("rev"), 4);
    }

    #[tokio::test]
    async fn delete_refuses_must_not_exist() {
        let s = MemStateStore::new();
        put(&s, "/a").await;
        assert!(matches!(
            s.delete("/a", Precondition::MustNotExist).await,
            Err(Error::Invalid { .. })
        ));
        assert!(s.get("/a").await.expect("get").is_some());
    }
}
