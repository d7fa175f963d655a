//! The state-store contract: where desired and observed state lives.
//!
//! Modelled on etcd's v3 key-value API so that the embedded store (redb) and
//! the cluster store (etcd) behave the same: every change bumps one global,
//! monotonic *revision*; every key remembers the revision that created it and
//! the one that last modified it; writes can be conditional on the
//! modification revision (compare-and-swap); watches replay every change after
//! a given revision and then follow live changes; leases expire keys whose
//! owner stopped renewing them (node liveness, leader election).

use std::fmt::Debug;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

use crate::error::Result;

/// A lease identifier (0 is never a valid lease).
pub type LeaseId = i64;

/// A stored key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value (serialized resource, usually JSON).
    pub value: Vec<u8>,
    /// Revision at which the key was created.
    pub create_revision: u64,
    /// Revision of the last change; this is the resource version.
    pub mod_revision: u64,
    /// Lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A condition a write must satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precondition {
    /// Write unconditionally.
    #[default]
    None,
    /// The key must not exist (create).
    MustNotExist,
    /// The key must exist with this modification revision (update / delete CAS).
    Revision(u64),
}

/// Options for [`StateStore::put`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// Condition to check atomically with the write.
    pub precondition: Precondition,
    /// Attach the key to a lease: it is deleted when the lease expires.
    pub lease: Option<LeaseId>,
}

/// The result of [`StateStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListResult {
    /// Matching keys, sorted by key.
    pub items: Vec<KeyValue>,
    /// The store revision the list was read at; watch from `revision + 1` to
    /// follow changes without missing any.
    pub revision: u64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or updated.
    Put(KeyValue),
    /// The key was deleted (explicitly or by lease expiry).
    Delete {
        /// The deleted key.
        key: String,
        /// Revision of the deletion.
        mod_revision: u64,
    },
}

impl WatchEvent {
    /// The key the event concerns.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision at which the change happened.
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// A stream of changes in revision order. An `Err` item ends the stream.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send>>;

/// A transactional key-value store with revisions, watches and leases.
#[async_trait]
pub trait StateStore: Send + Sync + Debug {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Reads every key starting with `prefix`, sorted, at one consistent revision.
    async fn list(&self, prefix: &str) -> Result<ListResult>;

    /// Writes a key if the precondition holds; returns the new modification revision.
    /// A failed precondition is [`crate::Error::Conflict`] (or `AlreadyExists` for
    /// `MustNotExist`, `NotFound` for `Revision` on an absent key).
    async fn put(&self, key: &str, value: Vec<u8>, options: PutOptions) -> Result<u64>;

    /// Deletes a key if the precondition holds; returns the deletion's revision.
    /// Deleting an absent key without precondition is `NotFound`.
    async fn delete(&self, key: &str, precondition: Precondition) -> Result<u64>;

    /// Streams every change to keys under `prefix` with revision ≥ `from_revision`
    /// (0 = from now on). Asking for compacted history fails with
    /// [`crate::Error::Compacted`].
    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream>;

    /// The store's current revision.
    async fn current_revision(&self) -> Result<u64>;

    /// Grants a lease that expires `ttl` after its last renewal.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews a lease. An expired or unknown lease is `NotFound`.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// Revokes a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;
}
