//! Backups: the `BackupTarget` controller (opens, and on first use
//! initializes, the repository; reports `Available`; collects garbage
//! hourly), the `Backup` controller (snapshots the volume — or every volume
//! of a VM — and backs it up incrementally from the previous backup of the
//! same source to the same target, with progress in the status), and the
//! restore of a volume from a backup (called by the volume controller for
//! volumes whose source is a `Backup`).
//!
//! Each backup keeps an internal pool snapshot `hci.backup-<name>` of each
//! volume it read: the next backup of the source reads only the blocks
//! changed since it. Once a newer backup completes, the older one's
//! snapshots go. Deleting a `Backup` deletes it from the target (space is
//! reclaimed by the target's next garbage collection).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use hci_backup::job::{CancelToken, Job, JobProgress};
use hci_backup::vm::{VmBackupRequest, VmManifest, VmVolumeRequest};
use hci_backup::{GcOptions, ObjectStoreTarget, Repository, S3Config, read_key_file};
use hci_core::backup::{BackupEngine, VolumeBackupRequest};
use hci_core::model::{
    Backup, BackupPhase, BackupSource, BackupTarget, BackupTargetSpec, ByteSize, ConditionStatus,
    Resource, VirtualMachine, Volume, VolumeSource, set_condition,
};
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend, VolumeInfo};
use hci_core::{Error, Result};
use tokio::sync::watch;

use super::{Kick, Reconcile, Runtime, set_status};
use crate::resources::ResourceStore;

/// Annotation on a volume restored from a whole-VM backup: which of the
/// VM's volumes (by its name at backup time) it restores.
pub const RESTORE_VOLUME_ANNOTATION: &str = "hci.dev/restore-volume";
/// Metadata key naming the `Backup` resource a target backup belongs to.
const RESOURCE_KEY: &str = "hci.backup-resource";
/// How often a target is checked (and garbage-collected when due).
const TARGET_RECHECK: Duration = Duration::from_secs(300);
const GC_EVERY: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// The internal pool snapshot a backup keeps as the next one's base.
fn snapshot_name(backup: &str) -> String {
    format!("hci.backup-{backup}")
}

/// Opens repositories of `BackupTarget`s, caching them per target spec.
#[derive(Debug, Default)]
pub struct BackupRepos {
    open: Mutex<HashMap<String, (BackupTargetSpec, Arc<Repository>)>>,
}

fn object_target(spec: &BackupTargetSpec) -> Result<ObjectStoreTarget> {
    if spec.url.starts_with("file://") {
        return hci_backup::open_target(&spec.url);
    }
    let rest = spec
        .url
        .strip_prefix("s3://")
        .ok_or_else(|| Error::invalid("spec.url", "must start with s3:// or file://"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let mut cfg = S3Config {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        endpoint: spec.endpoint.clone(),
        region: spec.region.clone(),
        virtual_hosted: !spec.path_style && spec.endpoint.is_none(),
        ..Default::default()
    };
    if let Some(f) = &spec.credentials_file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Error::io(format!("read credentials file {f}"), e))?;
        let (id, secret) = text.trim().split_once(':').ok_or_else(|| {
            Error::invalid(
                format!("credentials file {f}"),
                "must hold ACCESS_KEY_ID:SECRET_ACCESS_KEY",
            )
        })?;
        cfg.access_key_id = Some(id.to_string());
        cfg.secret_access_key = Some(secret.to_string());
    }
    ObjectStoreTarget::s3(&cfg)
}

/// Opens the repository of a target spec, initializing an empty target.
async fn open_spec(name: &str, spec: &BackupTargetSpec) -> Result<Repository> {
    let store: Arc<dyn hci_core::backup::BackupTarget> = Arc::new(object_target(spec)?);
    let key = spec
        .encryption_key_file
        .as_deref()
        .map(|f| read_key_file(std::path::Path::new(f)))
        .transpose()?;
    let repo = match Repository::open(store.clone(), key.as_ref()).await {
        Ok(r) => r,
        Err(Error::NotFound { .. }) => {
            match Repository::init(store.clone(), key.as_ref()).await {
                Ok(r) => {
                    tracing::info!(
                        target = name,
                        url = spec.url,
                        "backup repository initialized"
                    );
                    r
                }
                // Another node initialized it meanwhile.
                Err(Error::AlreadyExists { .. }) => Repository::open(store, key.as_ref()).await?,
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    Ok(repo)
}

/// Opens the repository of `BackupTarget` `target` (initializing an empty
/// target), without caching.
pub async fn open_repository(resources: &ResourceStore, target: &str) -> Result<Repository> {
    let t: BackupTarget = resources.get(target).await?;
    open_spec(target, &t.spec).await
}

impl BackupRepos {
    /// The repository of target `name`, initialized on first use.
    pub async fn repo(&self, rt: &Runtime, name: &str) -> Result<Arc<Repository>> {
        let target: BackupTarget = rt.resources.get(name).await?;
        if let Ok(open) = self.open.lock()
            && let Some((spec, repo)) = open.get(name)
            && *spec == target.spec
        {
            return Ok(repo.clone());
        }
        let spec = target.spec.clone();
        let repo = Arc::new(open_spec(name, &spec).await?);
        if let Ok(mut open) = self.open.lock() {
            open.insert(name.to_string(), (spec, repo.clone()));
        }
        Ok(repo)
    }

    fn forget(&self, name: &str) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(name);
        }
    }
}

/// Reports whether each `BackupTarget` can be used.
pub(crate) struct BackupTargetController {
    rt: Runtime,
    last_gc: Mutex<HashMap<String, chrono::DateTime<Utc>>>,
}

impl BackupTargetController {
    pub(crate) fn new(rt: Runtime) -> Self {
        BackupTargetController {
            rt,
            last_gc: Mutex::new(HashMap::new()),
        }
    }

    fn gc_due(&self, name: &str) -> bool {
        let now = Utc::now();
        let Ok(mut m) = self.last_gc.lock() else {
            return false;
        };
        match m.get(name) {
            Some(t) if now - *t < GC_EVERY => false,
            _ => {
                m.insert(name.to_string(), now);
                true
            }
        }
    }
}

#[async_trait]
impl Reconcile for BackupTargetController {
    type Kind = BackupTarget;

    async fn reconcile(
        &self,
        name: &str,
        current: Option<BackupTarget>,
    ) -> Result<Option<Duration>> {
        let Some(_) = current else {
            self.rt.backups.forget(name);
            return Ok(None);
        };
        let checked = async {
            let repo = self.rt.backups.repo(&self.rt, name).await?;
            // One cheap request proves the target answers now.
            repo.target().head("config").await?;
            Ok::<_, Error>(repo)
        }
        .await;
        match checked {
            Ok(repo) => {
                set_status(&self.rt.resources, name, |t: &mut BackupTarget| {
                    let st = t.status_mut();
                    if set_condition(
                        &mut st.conditions,
                        "Available",
                        ConditionStatus::True,
                        "Reachable",
                        "",
                    ) || st.last_checked.is_none()
                    {
                        st.last_checked = Some(Utc::now());
                    }
                })
                .await?;
                if self.gc_due(name) {
                    tokio::spawn(async move {
                        match repo.gc(GcOptions::default()).await {
                            Ok(r) => tracing::info!(?r, "backup target garbage-collected"),
                            Err(e) => tracing::warn!(error = %e, "backup target GC failed"),
                        }
                    });
                }
                Ok(Some(TARGET_RECHECK))
            }
            Err(e) => {
                self.rt.backups.forget(name);
                let message = e.to_string();
                set_status(&self.rt.resources, name, |t: &mut BackupTarget| {
                    set_condition(
                        &mut t.status_mut().conditions,
                        "Available",
                        ConditionStatus::False,
                        "Unreachable",
                        &message,
                    );
                })
                .await?;
                Err(e)
            }
        }
    }
}

/// What the controller remembers of a backup it has seen.
#[derive(Debug, Clone)]
struct Known {
    target: String,
    backup_id: Option<String>,
    vm: bool,
    volumes: Vec<String>,
    cancel: Option<CancelToken>,
}

/// Takes `Backup`s.
pub(crate) struct BackupController {
    rt: Runtime,
    kick: Kick,
    known: Arc<Mutex<HashMap<String, Known>>>,
    swept: std::sync::atomic::AtomicBool,
}

impl BackupController {
    pub(crate) fn new(rt: Runtime, kick: Kick) -> Self {
        BackupController {
            rt,
            kick,
            known: Arc::new(Mutex::new(HashMap::new())),
            swept: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn remember(&self, name: &str, k: Known) {
        if let Ok(mut m) = self.known.lock() {
            m.insert(name.to_string(), k);
        }
    }

    fn running(&self, name: &str) -> bool {
        self.known
            .lock()
            .is_ok_and(|m| m.get(name).is_some_and(|k| k.cancel.is_some()))
    }

    /// Removes a deleted backup from its target, and its base snapshots.
    async fn forget(&self, name: &str) -> Result<()> {
        let Some(k) = self.known.lock().ok().and_then(|mut m| m.remove(name)) else {
            return Ok(());
        };
        if let Some(c) = &k.cancel {
            c.cancel();
        }
        for v in &k.volumes {
            drop_snapshot(&self.rt, v, &snapshot_name(name)).await;
        }
        if let Some(id) = &k.backup_id {
            let repo = self.rt.backups.repo(&self.rt, &k.target).await?;
            let r = if k.vm {
                repo.delete_vm_backup(id).await
            } else {
                repo.delete(id).await
            };
            match r {
                Ok(()) | Err(Error::NotFound { .. }) => {
                    tracing::info!(backup = name, id, "backup deleted from its target");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The volumes a backup reads, with their specs.
    async fn source_volumes(&self, b: &Backup) -> Result<(Option<VirtualMachine>, Vec<Volume>)> {
        match &b.spec.source {
            BackupSource::Volume { name } => Ok((None, vec![self.rt.resources.get(name).await?])),
            BackupSource::VirtualMachine { name } => {
                let vm: VirtualMachine = self.rt.resources.get(name).await?;
                let mut vols = Vec::new();
                for d in &vm.spec.disks {
                    if !vols.iter().any(|v: &Volume| v.name() == d.volume) {
                        vols.push(self.rt.resources.get(&d.volume).await?);
                    }
                }
                Ok((Some(vm), vols))
            }
        }
    }

    /// The newest completed backup of the same source to the same target
    /// whose base snapshots still exist.
    async fn previous(&self, b: &Backup, volumes: &[Volume]) -> Result<Option<Backup>> {
        if !b.spec.incremental {
            return Ok(None);
        }
        let mut prev: Vec<Backup> = self
            .rt
            .resources
            .list::<Backup>()
            .await?
            .items
            .into_iter()
            .filter(|p| {
                p.name() != b.name()
                    && p.spec.source == b.spec.source
                    && p.spec.target == b.spec.target
                    && p.status_or_default().phase == BackupPhase::Completed
                    && p.status_or_default().backup_id.is_some()
            })
            .collect();
        prev.sort_by_key(|p| p.status_or_default().completed_at);
        while let Some(p) = prev.pop() {
            let snap = snapshot_name(p.name());
            let mut all = true;
            for v in volumes {
                let (backend, _) = super::replicas::backend_for(&self.rt, v)?;
                let snaps = backend.list_snapshots(v.name()).await?;
                all &= snaps.iter().any(|s| s.name == snap);
            }
            if all {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    async fn start(&self, name: &str, b: Backup) -> Result<()> {
        let (vm, volumes) = self.source_volumes(&b).await?;
        let repo = self.rt.backups.repo(&self.rt, &b.spec.target).await?;
        let prev = self.previous(&b, &volumes).await?;
        let snap = snapshot_name(name);
        for v in &volumes {
            let (backend, _) = super::replicas::backend_for(&self.rt, v)?;
            let snaps = backend.list_snapshots(v.name()).await?;
            if !snaps.iter().any(|s| s.name == snap) {
                super::replicas::take_snapshot(&self.rt, v, &snap).await?;
            }
        }
        let cancel = CancelToken::new();
        self.remember(
            name,
            Known {
                target: b.spec.target.clone(),
                backup_id: None,
                vm: vm.is_some(),
                volumes: volumes.iter().map(|v| v.name().to_string()).collect(),
                cancel: Some(cancel.clone()),
            },
        );
        set_status(&self.rt.resources, name, |x: &mut Backup| {
            let st = x.status_mut();
            st.phase = BackupPhase::InProgress;
            st.message.clear();
        })
        .await?;
        let (tx, rx) = watch::channel(JobProgress::default());
        let last = rx.clone();
        let job = Job::new().with_cancel(cancel).with_progress(tx);
        let rt = self.rt.clone();
        let name = name.to_string();
        let known = self.known.clone();
        let kick = self.kick.clone();
        tokio::spawn(report_progress(rt.clone(), name.clone(), rx));
        tokio::spawn(async move {
            let result = run_backup(&rt, &repo, &b, vm, &volumes, prev.as_ref(), &job, last).await;
            let (id, read, added, vm_backup) = match result {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(backup = name, error = %e, "backup failed");
                    for v in &volumes {
                        drop_snapshot(&rt, v.name(), &snapshot_name(&name)).await;
                    }
                    // The status first: until it says Failed, the entry
                    // below keeps reconciles from starting the backup again.
                    let message = e.to_string();
                    let _ = set_status(&rt.resources, &name, |x: &mut Backup| {
                        x.status_mut().phase = BackupPhase::Failed;
                        x.status_mut().message = message.clone();
                    })
                    .await;
                    if let Ok(mut m) = known.lock() {
                        m.remove(&name);
                    }
                    return;
                }
            };
            // The previous backup's snapshots are no base any more (gone
            // before the status says Completed).
            if let Some(p) = &prev {
                for v in &volumes {
                    drop_snapshot(&rt, v.name(), &snapshot_name(p.name())).await;
                }
            }
            let done = set_status(&rt.resources, &name, |x: &mut Backup| {
                let st = x.status_mut();
                st.phase = BackupPhase::Completed;
                st.backup_id = Some(id.clone());
                st.progress = 100;
                st.read = read.map(ByteSize);
                st.added = Some(ByteSize(added));
                st.completed_at = Some(Utc::now());
                st.message.clear();
            })
            .await;
            if let Err(e) = done {
                tracing::warn!(backup = name, error = %e, "cannot record a finished backup");
            }
            // Only now (the status says Completed) may reconciles run again.
            if let Ok(mut m) = known.lock()
                && let Some(k) = m.get_mut(&name)
            {
                k.backup_id = Some(id.clone());
                k.vm = vm_backup;
                k.cancel = None;
            }
            tracing::info!(backup = name, id, added, "backup completed");
            kick.now(&name);
        });
        Ok(())
    }
}

async fn drop_snapshot(rt: &Runtime, volume: &str, snap: &str) {
    let backend = match super::replicas::backend_named(rt, volume).await {
        Ok((b, _)) => b,
        Err(e) => {
            tracing::warn!(volume, snapshot = snap, error = %e, "cannot remove a backup snapshot");
            return;
        }
    };
    match backend.delete_snapshot(volume, snap).await {
        Ok(()) | Err(Error::NotFound { .. }) => {}
        Err(e) => {
            tracing::warn!(volume, snapshot = snap, error = %e, "cannot remove a backup snapshot")
        }
    }
}

/// Copies progress into the backup's status as it moves by whole percents.
async fn report_progress(rt: Runtime, name: String, mut rx: watch::Receiver<JobProgress>) {
    let mut last = 0u8;
    while rx.changed().await.is_ok() {
        let p = rx.borrow_and_update().clone();
        let pct = (p.fraction() * 100.0) as u8;
        if pct == last || pct >= 100 {
            continue;
        }
        last = pct;
        let _ = set_status(&rt.resources, &name, |x: &mut Backup| {
            let st = x.status_mut();
            if st.phase == BackupPhase::InProgress {
                st.progress = pct;
                st.read = Some(ByteSize(p.done_bytes));
            }
        })
        .await;
    }
}

/// Backs up, returning (target id, bytes read, bytes added, whole VM?).
#[allow(clippy::too_many_arguments)]
async fn run_backup(
    rt: &Runtime,
    repo: &Repository,
    b: &Backup,
    vm: Option<VirtualMachine>,
    volumes: &[Volume],
    prev: Option<&Backup>,
    job: &Job,
    progress: watch::Receiver<JobProgress>,
) -> Result<(String, Option<u64>, u64, bool)> {
    let snap = snapshot_name(b.name());
    // Each volume wherever it lives: the local pool or its replicas.
    let mut backends: HashMap<String, Arc<dyn VolumeBackend>> = HashMap::new();
    for v in volumes {
        let (backend, _) = super::replicas::backend_for(rt, v)?;
        backends.insert(v.name().to_string(), backend);
    }
    let backend_of = |name: &str| {
        backends
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found("volume of the backup", name))
    };
    let prev_id = prev.and_then(|p| p.status_or_default().backup_id);
    let metadata = vec![(RESOURCE_KEY.to_string(), b.name().to_string())];
    match vm {
        None => {
            let v = volumes
                .first()
                .ok_or_else(|| Error::invalid("backup source", "no volume"))?;
            let info = repo
                .backup_with(
                    backend_of(v.name())?,
                    VolumeBackupRequest {
                        volume: v.name().to_string(),
                        snapshot: snap,
                        base: prev_id,
                        metadata,
                    },
                    job,
                )
                .await?;
            let read = progress.borrow().done_bytes;
            Ok((info.id, Some(read), info.added_bytes, false))
        }
        Some(vm) => {
            let base: Option<VmManifest> = match &prev_id {
                Some(id) => repo.load_vm_backup(id).await.ok(),
                None => None,
            };
            let req = VmBackupRequest {
                vm_name: vm.name().to_string(),
                vm: vm.spec.clone(),
                volumes: volumes
                    .iter()
                    .map(|v| VmVolumeRequest {
                        volume: v.name().to_string(),
                        spec: v.spec.clone(),
                        snapshot: snap.clone(),
                        base: base.as_ref().and_then(|m| {
                            m.volumes
                                .iter()
                                .find(|x| x.volume == v.name())
                                .map(|x| x.backup.clone())
                        }),
                    })
                    .collect(),
            };
            let m = repo.backup_vm_from(&backend_of, req, job).await?;
            Ok((m.id, None, m.added_bytes, true))
        }
    }
}

#[async_trait]
impl Reconcile for BackupController {
    type Kind = Backup;

    async fn reconcile(&self, name: &str, current: Option<Backup>) -> Result<Option<Duration>> {
        let Some(b) = current else {
            self.forget(name).await?;
            return Ok(None);
        };
        let status = b.status_or_default();
        match status.phase {
            BackupPhase::Completed => {
                let mut volumes = Vec::new();
                if let Ok((_, vols)) = self.source_volumes(&b).await {
                    volumes = vols.iter().map(|v| v.name().to_string()).collect();
                }
                self.remember(
                    name,
                    Known {
                        target: b.spec.target.clone(),
                        backup_id: status.backup_id.clone(),
                        vm: matches!(b.spec.source, BackupSource::VirtualMachine { .. }),
                        volumes,
                        cancel: None,
                    },
                );
                Ok(None)
            }
            BackupPhase::Failed => Ok(None),
            BackupPhase::Pending | BackupPhase::InProgress => {
                if self.running(name) {
                    return Ok(None);
                }
                // A run that just ended wrote its phase before it stopped
                // counting as running: read again so it is not restarted.
                let Some(b) = self.rt.resources.try_get::<Backup>(name).await? else {
                    return Ok(None);
                };
                if !matches!(
                    b.status_or_default().phase,
                    BackupPhase::Pending | BackupPhase::InProgress
                ) {
                    return Ok(Some(Duration::ZERO));
                }
                if let Err(e) = self.start(name, b).await {
                    if let Ok(mut m) = self.known.lock() {
                        m.remove(name);
                    }
                    let message = e.to_string();
                    set_status(&self.rt.resources, name, |x: &mut Backup| {
                        x.status_mut().phase = BackupPhase::Pending;
                        x.status_mut().message = message.clone();
                    })
                    .await?;
                    return Err(e);
                }
                Ok(None)
            }
        }
    }

    /// Once per daemon start: backups on the targets whose resource is gone
    /// (deleted while the daemon was down) are deleted.
    async fn sweep(&self, existing: &BTreeSet<String>) -> Result<()> {
        if self.swept.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Ok(());
        }
        for t in self.rt.resources.list::<BackupTarget>().await?.items {
            let Ok(repo) = self.rt.backups.repo(&self.rt, t.name()).await else {
                continue;
            };
            let owner = |meta: &[(String, String)]| {
                meta.iter()
                    .find(|(k, _)| k == RESOURCE_KEY)
                    .map(|(_, v)| v.clone())
            };
            let vms = repo.list_vm_backups().await?;
            let mut in_vm = BTreeSet::new();
            for m in &vms {
                let first = m.volumes.first().map(|v| v.backup.clone());
                in_vm.extend(m.volumes.iter().map(|v| v.backup.clone()));
                let Some(first) = first else { continue };
                let Ok(list) = repo.list().await else {
                    continue;
                };
                let o = list
                    .iter()
                    .find(|b| b.id == first)
                    .and_then(|b| owner(&b.metadata));
                if let Some(o) = o
                    && !existing.contains(&o)
                {
                    tracing::info!(
                        backup = o,
                        id = m.id,
                        "deleting the VM backup of a deleted resource"
                    );
                    repo.delete_vm_backup(&m.id).await?;
                }
            }
            for b in repo.list().await? {
                if in_vm.contains(&b.id) {
                    continue;
                }
                if let Some(o) = owner(&b.metadata)
                    && !existing.contains(&o)
                {
                    tracing::info!(
                        backup = o,
                        id = b.id,
                        "deleting the backup of a deleted resource"
                    );
                    match repo.delete(&b.id).await {
                        Ok(()) | Err(Error::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }
}

/// Restores the content of pool volume `name` (not created yet) from the
/// backup `vol.spec.source` names.
pub(crate) async fn restore_volume(
    rt: &Runtime,
    name: &str,
    backup: &str,
    vol: &Volume,
    key: Option<hci_core::volume::EncryptionKey>,
    job: Job,
    pool: Arc<dyn VolumeBackend>,
) -> Result<VolumeInfo> {
    let b: Backup = rt.resources.get(backup).await?;
    let st = b.status_or_default();
    let id = match (st.phase, st.backup_id) {
        (BackupPhase::Completed, Some(id)) => id,
        _ => {
            return Err(Error::Unavailable {
                what: format!("backup {backup:?} (not completed yet)"),
                source: None,
            });
        }
    };
    let repo = rt.backups.repo(rt, &b.spec.target).await?;
    let volume_backup = match &b.spec.source {
        BackupSource::Volume { .. } => id,
        BackupSource::VirtualMachine { name: vm } => {
            let member = vol
                .metadata
                .annotations
                .get(RESTORE_VOLUME_ANNOTATION)
                .ok_or_else(|| {
                    Error::invalid(
                        "metadata.annotations",
                        format!(
                            "restoring a volume from VM {vm:?}'s backup needs \
                             {RESTORE_VOLUME_ANNOTATION} naming which of its volumes"
                        ),
                    )
                })?;
            let m = repo.load_vm_backup(&id).await?;
            m.volumes
                .iter()
                .find(|v| &v.volume == member)
                .map(|v| v.backup.clone())
                .ok_or_else(|| {
                    Error::invalid(
                        format!("annotation {RESTORE_VOLUME_ANNOTATION}"),
                        format!("VM backup {backup:?} has no volume {member:?}"),
                    )
                })?
        }
    };
    let info = repo
        .list()
        .await?
        .into_iter()
        .find(|i| i.id == volume_backup)
        .ok_or_else(|| Error::not_found("backup on the target", volume_backup.clone()))?;
    let size = vol.spec.size.0.max(info.size);
    pool.create(
        name,
        CreateVolume {
            size,
            encryption_key: key,
        },
    )
    .await?;
    let restored = async {
        let dev = pool.open(name, OpenVolume::default()).await?;
        repo.restore_with(&volume_backup, dev, &job).await
    }
    .await;
    if let Err(e) = restored {
        if let Err(e) = pool.delete(name).await {
            tracing::warn!(volume = name, error = %e, "cannot remove a failed restore");
        }
        return Err(e);
    }
    tracing::info!(volume = name, backup, "volume restored from backup");
    pool.info(name).await
}

/// The VM and volumes that restoring the whole-VM backup `backup` as
/// `new_name` creates: volumes `<new_name>-<volume>` whose source is the
/// backup (the volume controller restores each), and the VM on them.
pub async fn vm_restore_plan(
    resources: &ResourceStore,
    backup: &Backup,
    new_name: &str,
) -> Result<(VirtualMachine, Vec<Volume>)> {
    let st = backup.status_or_default();
    let id = match (st.phase, st.backup_id) {
        (BackupPhase::Completed, Some(id)) => id,
        _ => {
            return Err(Error::Unavailable {
                what: format!("backup {:?} (not completed yet)", backup.name()),
                source: None,
            });
        }
    };
    let repo = open_repository(resources, &backup.spec.target).await?;
    let m = repo.load_vm_backup(&id).await?;
    let plan = m.restore_plan(new_name);
    let volumes = plan
        .volumes
        .into_iter()
        .zip(&m.volumes)
        .map(|((mut v, _), old)| {
            v.spec.source = VolumeSource::Backup {
                name: backup.name().to_string(),
            };
            v.metadata
                .annotations
                .insert(RESTORE_VOLUME_ANNOTATION.into(), old.volume.clone());
            v
        })
        .collect();
    Ok((plan.vm, volumes))
}
