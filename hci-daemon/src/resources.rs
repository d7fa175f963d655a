//! Typed resources over a [`StateStore`]: the daemon's one path to state.
//!
//! Each resource is one key, `/hci/v1/<kind, lower-case plural>/<name>`,
//! holding its JSON document. The store's modification revision *is* the
//! resource version: it is not stored in the document but set on every read,
//! so it can never be stale. Creates are conditional on absence, updates and
//! conditional deletes on the version the caller read (compare-and-swap), so
//! two writers never silently overwrite each other.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use hci_core::store::StateStore;
//! # async fn demo(store: Arc<dyn StateStore>) -> hci_core::Result<()> {
//! use hci_core::model::{ByteSize, Volume, VolumeSpec};
//! use hci_daemon::resources::ResourceStore;
//!
//! let resources = ResourceStore::new(store);
//! let created = resources.create(Volume::new("data", VolumeSpec::blank(ByteSize::gib(1)))).await?;
//! let mut v: Volume = resources.get("data").await?;
//! v.spec.size = ByteSize::gib(2);
//! let updated = resources.update(v).await?; // Conflict if someone changed it since `get`
//! assert!(updated.metadata.resource_version > created.metadata.resource_version);
//! # Ok(()) }
//! ```

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use hci_core::model::{Resource, ResourceRef, validate_refs};
use hci_core::store::{KeyValue, Precondition, PutOptions, StateStore, WatchEvent};
use hci_core::{Error, Result};
use serde_json::Value;

/// Root of every resource key.
pub const KEY_ROOT: &str = "/hci/v1/";

/// The key prefix of every resource of `kind` (e.g. `/hci/v1/volumes/`).
pub fn kind_prefix(kind: &str) -> String {
    format!("{KEY_ROOT}{}s/", kind.to_ascii_lowercase())
}

/// The key of the resource of `kind` named `name`.
pub fn resource_key(kind: &str, name: &str) -> String {
    format!("{}{name}", kind_prefix(kind))
}

/// Resources of one kind, read at one store revision.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceList<R> {
    /// The resources, sorted by name.
    pub items: Vec<R>,
    /// The store revision of the read; watch from `revision + 1` to follow on.
    pub revision: u64,
}

/// One change to a resource.
#[derive(Debug, Clone, PartialEq)]
pub enum ResourceEvent<R> {
    /// Created or updated: its new state.
    Put(R),
    /// Deleted.
    Delete {
        /// Its name.
        name: String,
        /// Store revision of the deletion.
        revision: u64,
    },
}

impl<R: Resource> ResourceEvent<R> {
    /// Name of the resource concerned.
    pub fn name(&self) -> &str {
        match self {
            ResourceEvent::Put(r) => r.name(),
            ResourceEvent::Delete { name, .. } => name,
        }
    }

    /// Store revision of the change.
    pub fn revision(&self) -> u64 {
        match self {
            ResourceEvent::Put(r) => r.metadata().resource_version,
            ResourceEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// A stream of changes to resources of one kind, in revision order.
pub type ResourceWatch<R> = Pin<Box<dyn Stream<Item = Result<ResourceEvent<R>>> + Send>>;

/// Create, read, update, delete and watch typed resources on a [`StateStore`].
#[derive(Clone)]
pub struct ResourceStore {
    store: Arc<dyn StateStore>,
    check_references: bool,
}

impl fmt::Debug for ResourceStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceStore")
            .field("store", &self.store)
            .field("check_references", &self.check_references)
            .finish()
    }
}

/// Re-labels a store error about a key as one about the resource.
fn about<R: Resource>(name: &str) -> impl FnOnce(Error) -> Error + '_ {
    move |e| match e {
        Error::NotFound { .. } => Error::not_found(R::KIND, name),
        Error::AlreadyExists { .. } => Error::already_exists(R::KIND, name),
        Error::Conflict {
            expected, actual, ..
        } => Error::Conflict {
            kind: R::KIND,
            name: name.to_string(),
            expected,
            actual,
        },
        e => e,
    }
}

fn decode<R: Resource>(kv: &KeyValue) -> Result<R> {
    let mut r: R = serde_json::from_slice(&kv.value).map_err(|e| Error::Corrupt {
        what: format!("stored document at {}", kv.key),
        source: Some(Box::new(e)),
    })?;
    r.metadata_mut().resource_version = kv.mod_revision;
    Ok(r)
}

fn encode<R: Resource>(r: &R) -> Result<Vec<u8>> {
    let mut r = r.clone();
    // The version lives in the store's revision, never in the document.
    r.metadata_mut().resource_version = 0;
    Ok(r.to_json()?.into_bytes())
}

/// The `spec` of a resource as a JSON value, to detect spec changes.
fn spec_of<R: Resource>(r: &R) -> Value {
    serde_json::to_value(r)
        .ok()
        .and_then(|mut v| v.get_mut("spec").map(Value::take))
        .unwrap_or(Value::Null)
}

impl ResourceStore {
    /// Resources on `store`, with reference checks on.
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        ResourceStore {
            store,
            check_references: true,
        }
    }

    /// Whether creates and updates refuse references to absent resources
    /// (a VM's disk naming a volume that does not exist). On by default.
    pub fn with_reference_checks(mut self, enabled: bool) -> Self {
        self.check_references = enabled;
        self
    }

    /// The underlying state store.
    pub fn state_store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// Validates `r`, and checks that `refs` exist.
    async fn validate<R: Resource>(&self, r: &R, refs: &[ResourceRef]) -> Result<()> {
        let mut errs = r.validate().err().unwrap_or_default();
        if self.check_references && !refs.is_empty() {
            let mut present = Vec::new();
            for rf in refs {
                if self
                    .store
                    .get(&resource_key(rf.kind, &rf.name))
                    .await?
                    .is_some()
                {
                    present.push((rf.kind.to_string(), rf.name.clone()));
                }
            }
            let lookup = |kind: &str, name: &str| {
                present.iter().any(|(k, n)| k == kind && n == name)
                    || !refs.iter().any(|rf| rf.kind == kind && rf.name == name)
            };
            if let Err(e) = validate_refs(r, &lookup) {
                errs.errors.extend(e.errors);
            }
        }
        errs.into_result().map_err(Error::InvalidSpec)
    }

    /// Creates `r`: sets its uid, creation time and generation 1, and returns
    /// it with its resource version. `AlreadyExists` if the name is taken.
    pub async fn create<R: Resource>(&self, mut r: R) -> Result<R> {
        self.validate(&r, &r.references()).await?;
        let now = chrono::Utc::now();
        let meta = r.metadata_mut();
        meta.uid = Some(uuid::Uuid::new_v4());
        meta.created_at = Some(now);
        meta.updated_at = Some(now);
        meta.generation = 1;
        let name = r.name().to_string();
        let options = PutOptions {
            precondition: Precondition::MustNotExist,
            lease: None,
        };
        let revision = self
            .store
            .put(&resource_key(R::KIND, &name), encode(&r)?, options)
            .await
            .map_err(about::<R>(&name))?;
        r.metadata_mut().resource_version = revision;
        tracing::debug!(kind = R::KIND, name, revision, "created");
        Ok(r)
    }

    /// Reads the resource named `name`, if it exists.
    pub async fn try_get<R: Resource>(&self, name: &str) -> Result<Option<R>> {
        match self.store.get(&resource_key(R::KIND, name)).await? {
            Some(kv) => decode(&kv).map(Some),
            None => Ok(None),
        }
    }

    /// Reads the resource named `name`; `NotFound` if absent.
    pub async fn get<R: Resource>(&self, name: &str) -> Result<R> {
        self.try_get(name)
            .await?
            .ok_or_else(|| Error::not_found(R::KIND, name))
    }

    /// Lists every resource of kind `R`.
    pub async fn list<R: Resource>(&self) -> Result<ResourceList<R>> {
        let list = self.store.list(&kind_prefix(R::KIND)).await?;
        let items = list.items.iter().map(decode).collect::<Result<_>>()?;
        Ok(ResourceList {
            items,
            revision: list.revision,
        })
    }

    /// Replaces a resource with `r`, if it still has `r`'s resource version
    /// (which must be set: `Conflict` otherwise names both versions).
    ///
    /// Keeps the stored uid and creation time, sets the update time and bumps
    /// the generation when the spec changed. The status is written as given:
    /// API handlers that must not let clients set it use
    /// [`ResourceStore::update_spec`].
    pub async fn update<R: Resource>(&self, r: R) -> Result<R> {
        let current: R = self.get(r.name()).await?;
        self.replace(current, r, false).await
    }

    /// Like [`ResourceStore::update`], but keeps the stored status.
    pub async fn update_spec<R: Resource>(&self, r: R) -> Result<R> {
        let current: R = self.get(r.name()).await?;
        self.replace(current, r, true).await
    }

    async fn replace<R: Resource>(&self, current: R, mut r: R, keep_status: bool) -> Result<R> {
        let name = r.name().to_string();
        let expected = r.metadata().resource_version;
        if expected == 0 {
            return Err(Error::invalid(
                "metadata.resourceVersion",
                "is required to update: read the resource first",
            ));
        }
        let actual = current.metadata().resource_version;
        if expected != actual {
            return Err(Error::Conflict {
                kind: R::KIND,
                name,
                expected,
                actual,
            });
        }
        if let (Some(theirs), Some(ours)) = (r.metadata().uid, current.metadata().uid)
            && theirs != ours
        {
            return Err(Error::invalid(
                "metadata.uid",
                format!("{theirs} does not match the stored resource ({ours}): it was re-created"),
            ));
        }
        // Only references that are new need to exist: a clone's source may
        // be gone by the time the clone is resized.
        let old_refs = current.references();
        let new_refs: Vec<ResourceRef> = r
            .references()
            .into_iter()
            .filter(|rf| {
                !old_refs
                    .iter()
                    .any(|o| o.kind == rf.kind && o.name == rf.name)
            })
            .collect();
        self.validate(&r, &new_refs).await?;
        if keep_status {
            let status = serde_json::to_value(&current)
                .ok()
                .and_then(|mut v| v.get_mut("status").map(Value::take));
            let mut doc =
                serde_json::to_value(&r).map_err(|e| Error::invalid(R::KIND, e.to_string()))?;
            if let Some(obj) = doc.as_object_mut() {
                match status {
                    Some(s) => obj.insert("status".to_string(), s),
                    None => obj.remove("status"),
                };
            }
            r = serde_json::from_value(doc).map_err(|e| Error::invalid(R::KIND, e.to_string()))?;
        }
        let spec_changed = spec_of(&r) != spec_of(&current);
        {
            let (cur, meta) = (current.metadata(), r.metadata_mut());
            meta.uid = cur.uid;
            meta.created_at = cur.created_at;
            meta.updated_at = Some(chrono::Utc::now());
            meta.generation = cur.generation + u64::from(spec_changed);
        }
        let options = PutOptions {
            precondition: Precondition::Revision(expected),
            lease: None,
        };
        let revision = self
            .store
            .put(&resource_key(R::KIND, &name), encode(&r)?, options)
            .await
            .map_err(about::<R>(&name))?;
        r.metadata_mut().resource_version = revision;
        tracing::debug!(kind = R::KIND, name, revision, "updated");
        Ok(r)
    }

    /// Read-modify-write: applies `change` to the current resource and
    /// stores it, retrying on concurrent changes. With `expected`, acts only
    /// on that version (`Conflict` otherwise, no retry). The status is kept
    /// as `change` leaves it.
    pub async fn modify<R, F>(&self, name: &str, expected: Option<u64>, mut change: F) -> Result<R>
    where
        R: Resource,
        F: FnMut(&mut R) -> Result<()> + Send,
    {
        const ATTEMPTS: usize = 16;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let current: R = self.get(name).await?;
            if let Some(expected) = expected
                && expected != current.metadata().resource_version
            {
                return Err(Error::Conflict {
                    kind: R::KIND,
                    name: name.to_string(),
                    expected,
                    actual: current.metadata().resource_version,
                });
            }
            let mut next = current.clone();
            change(&mut next)?;
            match self.replace(current, next, false).await {
                Err(e @ Error::Conflict { .. }) if expected.is_none() => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| Error::not_found(R::KIND, name)))
    }

    /// Deletes the resource named `name`, only if it has `resource_version`
    /// when one is given. Returns the revision of the deletion.
    pub async fn delete<R: Resource>(
        &self,
        name: &str,
        resource_version: Option<u64>,
    ) -> Result<u64> {
        let precondition = resource_version.map_or(Precondition::None, Precondition::Revision);
        let revision = self
            .store
            .delete(&resource_key(R::KIND, name), precondition)
            .await
            .map_err(about::<R>(name))?;
        tracing::debug!(kind = R::KIND, name, revision, "deleted");
        Ok(revision)
    }

    /// Follows changes to resources of kind `R` from `from_revision`
    /// (0 = from now on); see [`StateStore::watch`].
    pub async fn watch<R: Resource>(&self, from_revision: u64) -> Result<ResourceWatch<R>> {
        let prefix = kind_prefix(R::KIND);
        let events = self.store.watch(&prefix, from_revision).await?;
        let stream = events.map(move |event| match event? {
            WatchEvent::Put(kv) => decode(&kv).map(ResourceEvent::Put),
            WatchEvent::Delete { key, mod_revision } => Ok(ResourceEvent::Delete {
                name: key
                    .strip_prefix(prefix.as_str())
                    .unwrap_or(&key)
                    .to_string(),
                revision: mod_revision,
            }),
        });
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hci_core::memory::MemStateStore;
    use hci_core::model::{ByteSize, Snapshot, SnapshotSpec, Volume, VolumeSource, VolumeSpec};

    fn store() -> ResourceStore {
        ResourceStore::new(Arc::new(MemStateStore::new()))
    }

    fn volume(name: &str) -> Volume {
        Volume::new(name, VolumeSpec::blank(ByteSize::gib(1)))
    }

    #[test]
    fn keys() {
        assert_eq!(resource_key("Volume", "a"), "/hci/v1/volumes/a");
        assert_eq!(kind_prefix("VirtualMachine"), "/hci/v1/virtualmachines/");
    }

    #[tokio::test]
    async fn create_sets_identity_and_version() {
        let s = store();
        let v = s.create(volume("a")).await.expect("create");
        assert!(v.metadata.uid.is_some());
        assert!(v.metadata.created_at.is_some());
        assert_eq!(v.metadata.generation, 1);
        let got: Volume = s.get("a").await.expect("get");
        assert_eq!(got, v);
        assert!(matches!(
            s.create(volume("a")).await,
            Err(Error::AlreadyExists { kind: "Volume", .. })
        ));
    }

    #[tokio::test]
    async fn invalid_specs_name_every_field() {
        let s = store();
        let mut v = volume("Bad_Name");
        v.spec.size = ByteSize(0);
        match s.create(v).await {
            Err(Error::InvalidSpec(errs)) => {
                assert!(errs.has_path("metadata.name"));
                assert!(errs.has_path("spec.size"));
            }
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn references_must_exist_when_added() {
        let s = store();
        let snap = Snapshot::new(
            "s1",
            SnapshotSpec {
                volume: "missing".into(),
            },
        );
        match s.create(snap).await {
            Err(Error::InvalidSpec(errs)) => assert!(errs.has_path("spec.volume"), "{errs}"),
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
        s.create(volume("src")).await.expect("source");
        let mut clone = volume("clone");
        clone.spec.source = VolumeSource::Volume { name: "src".into() };
        let clone = s.create(clone).await.expect("clone");
        s.delete::<Volume>("src", None)
            .await
            .expect("delete source");
        // The existing reference is not re-checked on an unrelated change.
        let mut bigger = clone;
        bigger.spec.size = ByteSize::gib(2);
        s.update(bigger)
            .await
            .expect("resize a clone whose source is gone");
    }

    #[tokio::test]
    async fn update_is_compare_and_swap() {
        let s = store();
        let v1 = s.create(volume("a")).await.expect("create");
        let mut a = v1.clone();
        a.spec.size = ByteSize::gib(2);
        let v2 = s.update(a).await.expect("update");
        assert_eq!(v2.metadata.generation, 2);
        assert_eq!(v2.metadata.uid, v1.metadata.uid);
        let mut stale = v1.clone();
        stale.spec.size = ByteSize::gib(3);
        match s.update(stale).await {
            Err(Error::Conflict {
                expected, actual, ..
            }) => {
                assert_eq!(expected, v1.metadata.resource_version);
                assert_eq!(actual, v2.metadata.resource_version);
            }
            other => panic!("expected Conflict, got {other:?}"),
        }
        // A label change keeps the generation.
        let mut labelled = v2.clone();
        labelled
            .metadata
            .labels
            .insert("tier".into(), "gold".into());
        assert_eq!(
            s.update(labelled).await.expect("label").metadata.generation,
            2
        );
    }

    #[tokio::test]
    async fn update_spec_keeps_status() {
        let s = store();
        let mut v = s.create(volume("a")).await.expect("create");
        v.status = Some(Default::default());
        let v = s.update(v).await.expect("set status");
        let mut client = v.clone();
        client.status = None;
        let out = s.update_spec(client).await.expect("update spec");
        assert!(out.status.is_some());
    }

    #[tokio::test]
    async fn modify_retries_and_delete_checks_version() {
        let s = store();
        let v = s.create(volume("a")).await.expect("create");
        let out: Volume = s
            .modify("a", None, |v: &mut Volume| {
                v.spec.size = ByteSize::gib(4);
                Ok(())
            })
            .await
            .expect("modify");
        assert_eq!(out.spec.size, ByteSize::gib(4));
        assert!(matches!(
            s.delete::<Volume>("a", Some(v.metadata.resource_version))
                .await,
            Err(Error::Conflict { .. })
        ));
        s.delete::<Volume>("a", Some(out.metadata.resource_version))
            .await
            .expect("delete");
        assert!(matches!(
            s.get::<Volume>("a").await,
            Err(Error::NotFound { kind: "Volume", .. })
        ));
    }

    #[tokio::test]
    async fn watch_yields_typed_events() {
        let s = store();
        let mut w = s.watch::<Volume>(0).await.expect("watch");
        let v = s.create(volume("a")).await.expect("create");
        s.create(Snapshot::new("x", SnapshotSpec { volume: "a".into() }))
            .await
            .expect("other kind");
        s.delete::<Volume>("a", None).await.expect("delete");
        match w.next().await {
            Some(Ok(ResourceEvent::Put(got))) => assert_eq!(got, v),
            other => panic!("expected put, got {other:?}"),
        }
        match w.next().await {
            Some(Ok(ResourceEvent::Delete { name, .. })) => assert_eq!(name, "a"),
            other => panic!("expected delete, got {other:?}"),
        }
    }
}
