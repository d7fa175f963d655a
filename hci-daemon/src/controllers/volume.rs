//! The volume controller: creates each `Volume` (blank, cloned from a
//! snapshot or another volume, from an imported image, or restored from a
//! backup), grows it when its spec grows, reports size, allocation and
//! health in its status, and deletes it once the resource is gone.
//!
//! A volume with `replicas: 1` lives in the node's local pool, where clones
//! of local volumes share their source's blocks (O(1)). `replicas > 1`
//! volumes live on replica servers (see [`super::replicas`]); a clone whose
//! source or destination is replicated is a copy of the source's allocated
//! blocks, and a copy cut short (a daemon crash) is started over.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hci_backup::job::{CancelToken, Job, JobProgress};
use hci_core::block::BlockDevice;
use hci_core::model::{
    ByteSize, ConditionStatus, Image, ImagePhase, Node, ReplicaStatus, Resource, Snapshot,
    SnapshotPhase, Volume, VolumePhase, VolumeSource, set_condition,
};
use hci_core::volume::{CreateVolume, EncryptionKey, OpenVolume, VolumeBackend, VolumeInfo};
use hci_core::{Error, Result};
use hci_storage::local::control::ControlClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::repair;
use super::replicas::{self, ReplicaPool};
use super::{Reconcile, Runtime, join_err, set_status};

/// Prefix of the snapshots the controller takes for its own use (clones of
/// a volume's current content). DNS-1123 labels have no dots, so these never
/// collide with `Snapshot` resources.
const INTERNAL_SNAPSHOT: &str = "hci.clone-";

/// Reads the volume key named by a volume's `spec.encryption.keyFile`.
pub(crate) fn encryption_key(volume: &Volume) -> Result<Option<EncryptionKey>> {
    let Some(enc) = &volume.spec.encryption else {
        return Ok(None);
    };
    let bytes = std::fs::read(&enc.key_file)
        .map_err(|e| Error::io(format!("read the key file {}", enc.key_file), e))?;
    Ok(Some(EncryptionKey::new(bytes)))
}

pub(crate) struct VolumeController {
    rt: Runtime,
    /// Restores from backups running in the background, by volume.
    restores: Mutex<HashMap<String, Restore>>,
    /// Rebuilds of detached replicated volumes' replicas, by volume.
    rebuilds: Mutex<HashMap<String, DetachedRebuild>>,
}

/// Replicas of a detached volume being rebuilt by an engine of this daemon.
struct DetachedRebuild {
    task: JoinHandle<Result<()>>,
    progress: Arc<hci_storage::engine::rebuild::RebuildProgress>,
    replicas: Vec<String>,
}

/// A volume being filled from a backup by a task of its own, so a large
/// restore never holds up the other volumes' reconciles.
struct Restore {
    task: JoinHandle<Result<VolumeInfo>>,
    progress: watch::Receiver<JobProgress>,
    cancel: CancelToken,
}

/// Where a restore from a backup stands.
enum Fill {
    /// Still copying: percent done.
    Running(u8),
    /// The pool volume is complete.
    Done,
}

impl VolumeController {
    pub(crate) fn new(rt: Runtime) -> Self {
        VolumeController {
            rt,
            restores: Mutex::new(HashMap::new()),
            rebuilds: Mutex::new(HashMap::new()),
        }
    }

    /// Marker of an unfinished restore: it survives a daemon restart, so a
    /// restore cut short starts over instead of passing as complete. (VM
    /// names have no dots, so `.restoring` never collides with a VM's run
    /// directory.)
    fn restore_marker(&self, name: &str) -> PathBuf {
        self.rt.run_dir.join(".restoring").join(name)
    }

    /// Drives the restore of `vol` from `backup`: starts it, reports its
    /// progress, and collects its result.
    async fn restore(
        &self,
        vol: &Volume,
        backup: &str,
        pool: Arc<dyn VolumeBackend>,
    ) -> Result<Fill> {
        let name = vol.name();
        let marker = self.restore_marker(name);
        let finished = {
            let mut restores = self.restores.lock().unwrap_or_else(|e| e.into_inner());
            match restores.get(name) {
                Some(r) if !r.task.is_finished() => {
                    let pct = (r.progress.borrow().fraction() * 100.0) as u8;
                    return Ok(Fill::Running(pct.min(99)));
                }
                Some(_) => restores.remove(name),
                None => None,
            }
        };
        if let Some(r) = finished {
            let result = r.task.await.map_err(join_err("restore"))?;
            // Done, or failed and its partial volume deleted: either way over.
            if let Err(e) = std::fs::remove_file(&marker)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(Error::io(format!("remove {}", marker.display()), e));
            }
            let info = result?;
            self.rt
                .events
                .normal(
                    "Volume",
                    name,
                    "Restored",
                    format!("{} bytes from backup {backup}", info.size),
                )
                .await;
            return Ok(Fill::Done);
        }
        if marker.exists() {
            // A restore cut short (the daemon stopped): start over.
            tracing::warn!(volume = name, "restarting a restore that did not finish");
            match pool.delete(name).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        } else {
            let st = vol.status_or_default();
            if st.attached_to.is_some() {
                return Ok(Fill::Done);
            }
            match pool.info(name).await {
                Ok(_) => return Ok(Fill::Done),
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let key = encryption_key(vol)?;
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        std::fs::write(&marker, backup)
            .map_err(|e| Error::io(format!("write {}", marker.display()), e))?;
        let (tx, progress) = watch::channel(JobProgress::default());
        let cancel = CancelToken::new();
        let job = Job::new().with_progress(tx).with_cancel(cancel.clone());
        let (rt, vol, owned_name, backup) = (
            self.rt.clone(),
            vol.clone(),
            name.to_string(),
            backup.to_string(),
        );
        let task = tokio::spawn(async move {
            super::backup::restore_volume(&rt, &owned_name, &backup, &vol, key, job, pool).await
        });
        tracing::info!(volume = name, "restore from backup started");
        self.restores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                name.to_string(),
                Restore {
                    task,
                    progress,
                    cancel,
                },
            );
        Ok(Fill::Running(0))
    }

    /// Reports a restore in progress; asks to be called again shortly.
    async fn restoring(&self, name: &str, backup: &str, pct: u8) -> Result<Option<Duration>> {
        let message = format!("{pct}% restored from backup {backup}");
        set_status(&self.rt.resources, name, |v: &mut Volume| {
            v.status_mut().phase = VolumePhase::Creating;
            v.status_mut().progress = Some(pct);
            set_condition(
                &mut v.status_mut().conditions,
                "Ready",
                ConditionStatus::False,
                "Restoring",
                &message,
            );
        })
        .await?;
        Ok(Some(Duration::from_secs(1)))
    }

    /// Stops a running restore of `name` (its volume resource is gone).
    async fn cancel_restore(&self, name: &str) {
        let running = self
            .restores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(r) = running {
            r.cancel.cancel();
            let _ = r.task.await;
            tracing::info!(volume = name, "restore cancelled");
        }
        let _ = std::fs::remove_file(self.restore_marker(name));
    }

    /// A replicated volume: places its replicas (once), creates them, and
    /// reports their health — from the engine of the VM using it when
    /// attached (through its control socket), by asking each replica server
    /// otherwise.
    async fn reconcile_replicated(
        &self,
        vol: &Volume,
        pool: &Arc<ReplicaPool>,
    ) -> Result<Option<Duration>> {
        let name = vol.name();
        let want = usize::from(vol.spec.replicas);
        let status = vol.status_or_default();
        let mut placement: Vec<(String, String)> = status
            .replicas
            .iter()
            .filter_map(|r| r.address.clone().map(|a| (r.node.clone(), a)))
            .collect();
        if placement.is_empty() {
            let nodes = self.rt.resources.list::<Node>().await?.items;
            let candidates = replicas::candidates(&nodes, &self.rt.node.name, &pool.addresses());
            let mut used = std::collections::BTreeMap::new();
            for v in self.rt.resources.list::<Volume>().await?.items {
                for r in v.status_or_default().replicas {
                    *used.entry(r.node).or_insert(0usize) += 1;
                }
            }
            placement = replicas::place(want, &candidates, &used);
            if placement.is_empty() {
                return self
                    .create_failed(
                        name,
                        Error::Unavailable {
                            what: "replica servers (no node serves a replica disk)".into(),
                            source: None,
                        },
                    )
                    .await;
            }
            // Record where the replicas go before making them, so a crash
            // in between never leaves replicas nobody knows about.
            // The first to record a placement owns the volume (in cluster
            // mode every node's controller sees it): claim, then check.
            let st = replicas::statuses(&placement);
            set_status(&self.rt.resources, name, |v: &mut Volume| {
                if replicas::placed(v).is_empty() {
                    v.status_mut().phase = VolumePhase::Creating;
                    v.status_mut().replicas = st.clone();
                }
            })
            .await?;
            let now: Volume = self.rt.resources.get(name).await?;
            let mine: Vec<String> = placement.iter().map(|p| p.1.clone()).collect();
            if replicas::placed(&now) != mine {
                return Ok(None);
            }
        }
        // Replicas on nodes lost for longer than the grace go elsewhere.
        let placement = repair::replace_lost(&self.rt, pool, vol, placement).await?;
        let addresses: Vec<String> = placement.iter().map(|p| p.1.clone()).collect();
        let backend = Arc::new(pool.backend(&addresses)?);
        if let VolumeSource::Backup { name: backup } = &vol.spec.source {
            match self.restore(vol, backup, backend.clone()).await {
                Ok(Fill::Running(pct)) => return self.restoring(name, backup, pct).await,
                Ok(Fill::Done) => {}
                Err(e) => return self.create_failed(name, e).await,
            }
        }
        let attached_to = status.attached_to.clone();
        let engine_here = match &attached_to {
            Some(_) if self.rt.cluster.is_some() => repair::engine_here(&self.rt, vol).await?,
            Some(_) => true,
            None => false,
        };
        let (size, allocated, health, robustness) = if let (Some(vm), true) =
            (&attached_to, engine_here)
        {
            // The VM's engine owns the volume (opening it here would fence it).
            let socket = engine_socket(&self.rt, vm, name);
            let reply = tokio::task::spawn_blocking(move || {
                hci_storage::control::call(&socket, &hci_storage::control::ControlRequest::Status)
            })
            .await
            .map_err(join_err("engine control"))?;
            let view = match reply {
                Ok(r) => r.status,
                // Starting or stopping: ask again shortly.
                Err(_) => return Ok(Some(Duration::from_secs(2))),
            };
            let Some(view) = view else {
                return Ok(Some(Duration::from_secs(2)));
            };
            // Replicas the engine lost or lacks are added back (rebuilt).
            let socket = engine_socket(&self.rt, vm, name);
            if repair::engine_repair(pool, name, &socket, &view, &placement).await {
                return Ok(Some(Duration::from_secs(1)));
            }
            let health: Vec<(String, bool, Option<u8>)> = addresses
                .iter()
                .map(|a| {
                    let r = view.replicas.iter().find(|r| &r.node == a);
                    let pct = r
                        .and_then(|r| r.rebuild.as_ref())
                        .filter(|b| !b.finished)
                        .map(|b| (b.done.saturating_mul(100) / b.total.max(1)).min(99) as u8);
                    (a.clone(), r.is_some_and(|r| r.state == "healthy"), pct)
                })
                .collect();
            (
                view.size,
                status.allocated.map(|a| a.0),
                health,
                view.robustness,
            )
        } else if attached_to.is_some() {
            // Attached to a VM whose node is lost: its engine is out of
            // reach (and fenced once the VM moves). Report what the replica
            // servers hold; repairs wait for the VM's next engine.
            let current = repair::current(&repair::probe(pool, name, &addresses).await);
            let health: Vec<(String, bool, Option<u8>)> = addresses
                .iter()
                .zip(current)
                .map(|(a, ok)| (a.clone(), ok, None))
                .collect();
            let robustness = match health.iter().filter(|h| h.1).count() {
                0 => "faulted",
                n if n == health.len() => "healthy",
                _ => "degraded",
            };
            (
                status.size.map_or(vol.spec.size.0, |s| s.0),
                status.allocated.map(|a| a.0),
                health,
                robustness.to_string(),
            )
        } else {
            self.unfinished_fill(name, &*backend).await?;
            let info = match backend.info(name).await {
                Ok(info) => info,
                Err(Error::NotFound { .. }) => match self.create_replicated(vol, &backend).await {
                    Ok(info) => {
                        tracing::info!(volume = name, replicas = addresses.len(), "created");
                        self.rt
                            .events
                            .normal(
                                "Volume",
                                name,
                                "Created",
                                format!("{} bytes on {} replicas", info.size, addresses.len()),
                            )
                            .await;
                        info
                    }
                    Err(e) => return self.create_failed(name, e).await,
                },
                Err(e) => return Err(e),
            };
            let info = if vol.spec.size.0 > info.size {
                let grown = backend.expand(name, vol.spec.size.0).await?;
                self.rt
                    .events
                    .normal(
                        "Volume",
                        name,
                        "Expanded",
                        format!("to {} bytes", grown.size),
                    )
                    .await;
                grown
            } else {
                info
            };
            let health = self.detached_health(vol, pool, &addresses).await?;
            let robustness = match health.iter().filter(|h| h.1).count() {
                0 => "faulted",
                n if n == health.len() => "healthy",
                _ => "degraded",
            };
            (
                info.size,
                Some(info.allocated),
                health,
                robustness.to_string(),
            )
        };
        let healthy = health.iter().filter(|h| h.1).count();
        let shrink = vol.spec.size.0 < size;
        set_status(&self.rt.resources, name, |v: &mut Volume| {
            let st = v.status_mut();
            st.size = Some(ByteSize(size));
            st.allocated = allocated.map(ByteSize);
            st.progress = None;
            st.replicas = placement
                .iter()
                .zip(&health)
                .map(|((node, address), (_, ok, pct))| ReplicaStatus {
                    node: node.clone(),
                    healthy: *ok,
                    rebuild_percent: *pct,
                    address: Some(address.clone()),
                })
                .collect();
            let rebuilding = st.replicas.iter().any(|r| r.rebuild_percent.is_some());
            st.phase = match (robustness.as_str(), &st.attached_to) {
                ("faulted", _) => VolumePhase::Failed,
                _ if rebuilding => VolumePhase::Rebuilding,
                ("degraded", _) => VolumePhase::Degraded,
                (_, Some(_)) => VolumePhase::Attached,
                (_, None) => VolumePhase::Detached,
            };
            let (ready, reason, message) = if shrink {
                (
                    ConditionStatus::False,
                    "ShrinkRefused",
                    format!(
                        "spec.size {} is below the current size {}: volumes never shrink",
                        vol.spec.size,
                        ByteSize(size)
                    ),
                )
            } else if healthy == 0 {
                (
                    ConditionStatus::False,
                    "Faulted",
                    "no replica answers".to_string(),
                )
            } else {
                (ConditionStatus::True, "Created", String::new())
            };
            set_condition(&mut st.conditions, "Ready", ready, reason, &message);
            let (replicated, reason, message) = if healthy == want {
                (
                    ConditionStatus::True,
                    "AllReplicasHealthy",
                    format!("{healthy} replicas"),
                )
            } else if placement.len() < want {
                (
                    ConditionStatus::False,
                    "NotEnoughDisks",
                    format!(
                        "{want} replicas requested, {} placed: too few nodes and disks serve replicas",
                        placement.len()
                    ),
                )
            } else {
                (
                    ConditionStatus::False,
                    "ReplicaFailed",
                    format!("{healthy} of {want} replicas healthy"),
                )
            };
            set_condition(&mut st.conditions, "Replicated", replicated, reason, &message);
        })
        .await?;
        // Watch health while the volume is in use or not whole; closely
        // while a replica rebuilds.
        if health.iter().any(|h| h.2.is_some()) {
            return Ok(Some(Duration::from_secs(1)));
        }
        Ok((attached_to.is_some() || healthy < want).then_some(Duration::from_secs(10)))
    }

    /// Health of a detached replicated volume's replicas (current: at the
    /// highest membership epoch), rebuilding the stale or missing ones whose
    /// servers answer, in the background, from a current one.
    async fn detached_health(
        &self,
        vol: &Volume,
        pool: &Arc<ReplicaPool>,
        addresses: &[String],
    ) -> Result<Vec<(String, bool, Option<u8>)>> {
        enum Running {
            Busy(u8, Vec<String>),
            Done(DetachedRebuild),
            Idle,
        }
        let name = vol.name();
        let running = {
            let mut rebuilds = self.rebuilds.lock().unwrap_or_else(|e| e.into_inner());
            match rebuilds.get(name) {
                Some(r) if !r.task.is_finished() => {
                    Running::Busy(repair::percent(&r.progress), r.replicas.clone())
                }
                Some(_) => rebuilds.remove(name).map_or(Running::Idle, Running::Done),
                None => Running::Idle,
            }
        };
        if let Running::Done(r) = running {
            let what = r.replicas.join(", ");
            match r.task.await.map_err(join_err("rebuild"))? {
                Ok(()) => {
                    self.rt
                        .events
                        .normal(
                            "Volume",
                            name,
                            "Rebuilt",
                            format!("replicas {what} rebuilt"),
                        )
                        .await;
                }
                Err(e) => {
                    self.rt
                        .events
                        .warning(
                            "Volume",
                            name,
                            "RebuildFailed",
                            format!("replicas {what}: {e}"),
                        )
                        .await;
                }
            }
        } else if let Running::Busy(pct, replicas) = running {
            let current = repair::current(&repair::probe(pool, name, addresses).await);
            return Ok(addresses
                .iter()
                .zip(current)
                .map(|(a, ok)| {
                    let busy = replicas.contains(a);
                    (a.clone(), ok && !busy, busy.then_some(pct))
                })
                .collect());
        }
        let probes = repair::probe(pool, name, addresses).await;
        let current = repair::current(&probes);
        let need: Vec<String> = addresses
            .iter()
            .zip(&probes)
            .zip(&current)
            .filter(|((_, p), ok)| !**ok && !matches!(p, repair::Probe::Down))
            .map(|((a, _), _)| a.clone())
            .collect();
        if !need.is_empty() && current.iter().any(|c| *c) {
            // Claim the volume while it is detached: phase Rebuilding,
            // written only if no VM attached it meanwhile (a VM's attach
            // refuses a claimed volume), so this engine and a VM's never
            // fence each other.
            let claimed = std::sync::atomic::AtomicBool::new(false);
            set_status(&self.rt.resources, name, |v: &mut Volume| {
                let free = v.status_or_default().attached_to.is_none();
                claimed.store(free, std::sync::atomic::Ordering::Relaxed);
                if free {
                    v.status_mut().phase = VolumePhase::Rebuilding;
                }
            })
            .await?;
            if claimed.load(std::sync::atomic::Ordering::Relaxed) {
                let progress = Arc::new(hci_storage::engine::rebuild::RebuildProgress::default());
                let task = tokio::spawn(repair::rebuild_detached(
                    pool.clone(),
                    name.to_string(),
                    addresses.to_vec(),
                    need.clone(),
                    encryption_key(vol)?,
                    progress.clone(),
                ));
                tracing::info!(volume = name, replicas = ?need, "rebuilding replicas of a detached volume");
                self.rebuilds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        name.to_string(),
                        DetachedRebuild {
                            task,
                            progress,
                            replicas: need.clone(),
                        },
                    );
                return Ok(addresses
                    .iter()
                    .zip(current)
                    .map(|(a, ok)| (a.clone(), ok, need.contains(a).then_some(0)))
                    .collect());
            }
        }
        Ok(addresses
            .iter()
            .zip(current)
            .map(|(a, ok)| (a.clone(), ok, None))
            .collect())
    }

    /// Creates a replicated volume's replicas, filled from its source.
    async fn create_replicated(
        &self,
        vol: &Volume,
        backend: &hci_storage::engine::ReplicatedVolumeBackend,
    ) -> Result<VolumeInfo> {
        let name = vol.name();
        let key = encryption_key(vol)?;
        let source = match &vol.spec.source {
            VolumeSource::Blank => None,
            VolumeSource::Image { name: image } => {
                let img: Image = self.rt.resources.get(image).await?;
                if img.status_or_default().phase != ImagePhase::Ready {
                    return Err(Error::Unavailable {
                        what: format!("image {image:?} (not imported yet)"),
                        source: None,
                    });
                }
                let dev = self
                    .rt
                    .images
                    .open_snapshot(image, super::image::BASE_SNAPSHOT, OpenVolume::default())
                    .await?;
                Some(CopySource {
                    dev,
                    temporary: None,
                })
            }
            VolumeSource::Snapshot { .. } | VolumeSource::Volume { .. } => {
                self.clone_source(vol, false).await?
            }
            other => {
                return Err(Error::unsupported(
                    format!("replicated volumes from a {}", source_kind(other)),
                    "this daemon",
                ));
            }
        };
        let size = source
            .as_ref()
            .map_or(vol.spec.size.0, |s| s.dev.size().max(vol.spec.size.0));
        let created = backend
            .create(
                name,
                CreateVolume {
                    size,
                    encryption_key: key.clone(),
                },
            )
            .await;
        let Some(source) = source else {
            return created;
        };
        let info = match created {
            Ok(info) => info,
            Err(e) => {
                source.release().await;
                return Err(e);
            }
        };
        let filled = async {
            let dst = backend
                .open_engine(
                    name,
                    OpenVolume {
                        read_only: false,
                        encryption_key: key,
                    },
                )
                .await?;
            let copied = copy_into(&*source.dev, &*dst).await;
            // Closed cleanly, the next engine skips the crash reconcile.
            let closed = dst.close().await;
            copied.and(closed)
        };
        let filled = self.filling(name, filled).await;
        source.release().await;
        if let Err(e) = filled {
            let _ = backend.delete(name).await;
            return Err(e);
        }
        Ok(info)
    }

    /// The data a clone of `vol` copies: a snapshot of its source volume,
    /// opened from wherever that volume lives. With `replicated_only`,
    /// `None` unless the source is a replicated volume (a local source
    /// clones in the pool, sharing its blocks).
    async fn clone_source(
        &self,
        vol: &Volume,
        replicated_only: bool,
    ) -> Result<Option<CopySource>> {
        let (source, snapshot, temporary) = match &vol.spec.source {
            VolumeSource::Snapshot { name: snap } => {
                let s: Snapshot = self.rt.resources.get(snap).await?;
                if s.status_or_default().phase != SnapshotPhase::Ready {
                    return Err(Error::Unavailable {
                        what: format!("snapshot {snap:?} (not taken yet)"),
                        source: None,
                    });
                }
                let source: Volume = self.rt.resources.get(&s.spec.volume).await?;
                (source, snap.clone(), false)
            }
            VolumeSource::Volume { name: source } => {
                let source: Volume = self.rt.resources.get(source).await?;
                let tmp = format!(
                    "{INTERNAL_SNAPSHOT}{}",
                    vol.metadata.uid.map(|u| u.to_string()).unwrap_or_default()
                );
                (source, tmp, true)
            }
            _ => return Ok(None),
        };
        if replicated_only && source.spec.replicas <= 1 {
            return Ok(None);
        }
        if matches!(
            source.status_or_default().phase,
            VolumePhase::Pending | VolumePhase::Creating
        ) {
            return Err(Error::Unavailable {
                what: format!("volume {:?} (not created yet)", source.name()),
                source: None,
            });
        }
        let (backend, _) = replicas::backend_for(&self.rt, &source)?;
        if temporary {
            // Left by a copy cut short: taken again, of the content now.
            match backend.delete_snapshot(source.name(), &snapshot).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            replicas::take_snapshot(&self.rt, &source, &snapshot).await?;
        }
        let opened = backend
            .open_snapshot(
                source.name(),
                &snapshot,
                OpenVolume {
                    read_only: true,
                    encryption_key: encryption_key(&source)?,
                },
            )
            .await;
        let temporary = temporary.then(|| (backend, source.name().to_string(), snapshot));
        match opened {
            Ok(dev) => Ok(Some(CopySource { dev, temporary })),
            Err(e) => {
                CopySource::remove_temporary(temporary).await;
                Err(e)
            }
        }
    }

    /// Runs `fill` (the copy into new volume `name`) under a marker that
    /// survives a daemon crash, so a copy cut short is deleted and started
    /// over rather than passing as complete (see [`Self::unfinished_fill`]).
    async fn filling(&self, name: &str, fill: impl Future<Output = Result<()>>) -> Result<()> {
        let marker = self.fill_marker(name);
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        std::fs::write(&marker, b"")
            .map_err(|e| Error::io(format!("write {}", marker.display()), e))?;
        let r = fill.await;
        if r.is_ok() {
            std::fs::remove_file(&marker)
                .map_err(|e| Error::io(format!("remove {}", marker.display()), e))?;
        }
        r
    }

    fn fill_marker(&self, name: &str) -> PathBuf {
        self.rt.run_dir.join(".filling").join(name)
    }

    /// Deletes volume `name` from `backend` if a copy into it was cut
    /// short, so that it is created again.
    async fn unfinished_fill(&self, name: &str, backend: &dyn VolumeBackend) -> Result<()> {
        let marker = self.fill_marker(name);
        if !marker.exists() {
            return Ok(());
        }
        tracing::warn!(
            volume = name,
            "a copy into the volume did not finish: starting over"
        );
        match backend.delete(name).await {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        std::fs::remove_file(&marker)
            .map_err(|e| Error::io(format!("remove {}", marker.display()), e))
    }

    /// Records a failed create: waiting for a source that is not ready
    /// yet (retried shortly), or failed for good.
    async fn create_failed(&self, name: &str, e: Error) -> Result<Option<Duration>> {
        if let Error::Unavailable { what, .. } = &e {
            // Its source is not ready yet (an image importing).
            let message = format!("waiting for {what}");
            set_status(&self.rt.resources, name, |v: &mut Volume| {
                v.status_mut().phase = VolumePhase::Pending;
                set_condition(
                    &mut v.status_mut().conditions,
                    "Ready",
                    ConditionStatus::False,
                    "WaitingForSource",
                    &message,
                );
            })
            .await?;
            return Ok(Some(Duration::from_secs(1)));
        }
        let message = e.to_string();
        self.rt
            .events
            .warning("Volume", name, "CreateFailed", &message)
            .await;
        set_status(&self.rt.resources, name, |v: &mut Volume| {
            v.status_mut().phase = VolumePhase::Failed;
            v.status_mut().progress = None;
            set_condition(
                &mut v.status_mut().conditions,
                "Ready",
                ConditionStatus::False,
                "CreateFailed",
                &message,
            );
        })
        .await?;
        Err(e)
    }

    /// Creates pool volume `name` from the volume's source.
    async fn create(&self, vol: &Volume) -> Result<VolumeInfo> {
        let name = vol.name();
        let pool = &self.rt.volumes;
        let key = encryption_key(vol)?;
        if let Some(source) = self.clone_source(vol, true).await? {
            // A replicated source: copied.
            let size = source.dev.size().max(vol.spec.size.0);
            let created = pool
                .create(
                    name,
                    CreateVolume {
                        size,
                        encryption_key: key.clone(),
                    },
                )
                .await;
            let filled = match created {
                Ok(_) => {
                    let fill = async {
                        let dst = pool
                            .open(
                                name,
                                OpenVolume {
                                    read_only: false,
                                    encryption_key: key,
                                },
                            )
                            .await?;
                        copy_into(&*source.dev, &*dst).await
                    };
                    let filled = self.filling(name, fill).await;
                    if filled.is_err() {
                        let _ = pool.delete(name).await;
                    }
                    filled
                }
                Err(e) => Err(e),
            };
            source.release().await;
            filled?;
            return pool.info(name).await;
        }
        match &vol.spec.source {
            VolumeSource::Blank => {
                pool.create(
                    name,
                    CreateVolume {
                        size: vol.spec.size.0,
                        encryption_key: key,
                    },
                )
                .await
            }
            VolumeSource::Snapshot { name: snap } => {
                let snapshot: Snapshot = self.rt.resources.get(snap).await?;
                if snapshot.status_or_default().phase != SnapshotPhase::Ready {
                    return Err(Error::Unavailable {
                        what: format!("snapshot {snap:?} (not taken yet)"),
                        source: None,
                    });
                }
                pool.clone_snapshot(&snapshot.spec.volume, snap, name).await
            }
            VolumeSource::Volume { name: source } => {
                let tmp = format!(
                    "{INTERNAL_SNAPSHOT}{}",
                    vol.metadata.uid.map(|u| u.to_string()).unwrap_or_default()
                );
                pool.snapshot(source, &tmp).await?;
                let cloned = pool.clone_snapshot(source, &tmp, name).await;
                if let Err(e) = pool.delete_snapshot(source, &tmp).await {
                    tracing::warn!(volume = source, snapshot = tmp, error = %e, "cannot remove a clone's temporary snapshot");
                }
                cloned
            }
            VolumeSource::Image { name: image } => {
                let img: Image = self.rt.resources.get(image).await?;
                if img.status_or_default().phase != ImagePhase::Ready {
                    return Err(Error::Unavailable {
                        what: format!("image {image:?} (not imported yet)"),
                        source: None,
                    });
                }
                if key.is_some() {
                    return Err(Error::unsupported(
                        "encrypting a volume created from an image",
                        "the local pool (images are stored unencrypted)",
                    ));
                }
                let base = self.rt.images.replica(image)?;
                let dest = pool.root().join(name);
                tokio::task::spawn_blocking(move || {
                    base.clone_snapshot(super::image::BASE_SNAPSHOT, &dest)
                        .map(|_| ())
                })
                .await
                .map_err(join_err("local"))??;
                pool.info(name).await
            }
            // Restores run in the background: see `restore`.
            VolumeSource::Backup { name: backup } => Err(Error::invalid(
                "spec.source",
                format!("backup {backup:?} is restored in the background, not created"),
            )),
        }
    }
}

/// The control socket of the engine a VM's process runs for `volume`.
pub(crate) fn engine_socket(rt: &Runtime, vm: &str, volume: &str) -> PathBuf {
    rt.run_dir.join(vm).join(format!("{volume}.engine.sock"))
}

fn source_kind(s: &VolumeSource) -> &'static str {
    match s {
        VolumeSource::Blank => "blank volume",
        VolumeSource::Image { .. } => "image",
        VolumeSource::Snapshot { .. } => "snapshot",
        VolumeSource::Volume { .. } => "volume",
        VolumeSource::Backup { .. } => "backup",
    }
}

/// Copies the allocated extents of `src` to `dst` (same size or larger),
/// a MiB at a time.
/// A clone's source that is copied, not shared: an open snapshot, and the
/// snapshot taken for the clone (removed once copied), if any.
struct CopySource {
    dev: Arc<dyn BlockDevice>,
    temporary: Option<(Arc<dyn VolumeBackend>, String, String)>,
}

impl CopySource {
    /// Closes the source and removes its temporary snapshot.
    async fn release(self) {
        drop(self.dev);
        Self::remove_temporary(self.temporary).await;
    }

    async fn remove_temporary(temporary: Option<(Arc<dyn VolumeBackend>, String, String)>) {
        if let Some((backend, volume, snap)) = temporary
            && let Err(e) = backend.delete_snapshot(&volume, &snap).await
        {
            tracing::warn!(volume, snapshot = snap, error = %e, "cannot remove a clone's temporary snapshot");
        }
    }
}

/// Copies `src`'s allocated blocks into `dst` and flushes them.
async fn copy_into(src: &dyn BlockDevice, dst: &dyn BlockDevice) -> Result<()> {
    copy_allocated(src, dst).await?;
    dst.flush().await
}

async fn copy_allocated(src: &dyn BlockDevice, dst: &dyn BlockDevice) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let size = src.size();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let extents = src.block_status(pos, size - pos).await?;
        let next = extents.last().map_or(pos, hci_core::block::Extent::end);
        if next <= pos {
            return Err(Error::invalid("block status", "made no progress"));
        }
        for e in extents
            .iter()
            .filter(|e| e.kind == hci_core::block::ExtentKind::Data)
        {
            let mut off = e.offset;
            while off < e.end() {
                let n = (e.end() - off).min(CHUNK) as usize;
                src.read_at(&mut buf[..n], off).await?;
                dst.write_at(&buf[..n], off, Default::default()).await?;
                off += n as u64;
            }
        }
        pos = next;
    }
    Ok(())
}

#[async_trait]
impl Reconcile for VolumeController {
    type Kind = Volume;

    async fn reconcile(&self, name: &str, current: Option<Volume>) -> Result<Option<Duration>> {
        let pool = &self.rt.volumes;
        let Some(vol) = current else {
            if let Some(replicas) = &self.rt.replicas {
                replicas.remove_local(name).await;
            }
            self.cancel_restore(name).await;
            return match pool.delete(name).await {
                Ok(()) => {
                    tracing::info!(volume = name, "deleted");
                    Ok(None)
                }
                Err(Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            };
        };
        // Cluster mode: one node looks after a volume (`repair::handler`:
        // the node of the VM using it, else its first replica's node, else
        // the leader); the others look again now and then, as that changes.
        if let Some(cluster) = &self.rt.cluster {
            let st = vol.status_or_default();
            if !st.replicas.is_empty() || st.attached_to.is_some() {
                let store = self.rt.resources.state_store();
                let alive = super::scheduler::alive_nodes(&**store).await?;
                let me = self.rt.node.name.as_str();
                if repair::handler(&self.rt, &vol, &alive).await?.as_deref() != Some(me) {
                    return Ok(Some(cluster.lease_ttl));
                }
                // A local volume of a lost node (the leader looks after it).
                if vol.spec.replicas <= 1 && st.replicas.first().is_some_and(|r| r.node != me) {
                    repair::mark_node_lost(&self.rt, &vol).await?;
                    return Ok(Some(cluster.lease_ttl));
                }
            }
        }
        if vol.spec.replicas > 1 {
            return match &self.rt.replicas {
                Some(replicas) => self.reconcile_replicated(&vol, replicas).await,
                None => {
                    self.create_failed(
                        name,
                        Error::unsupported(
                            "replicated volumes (spec.replicas > 1)",
                            "this daemon (it serves no replica disks)",
                        ),
                    )
                    .await
                }
            };
        }
        if let VolumeSource::Backup { name: backup } = &vol.spec.source {
            match self.restore(&vol, backup, self.rt.volumes.clone()).await {
                Ok(Fill::Running(pct)) => return self.restoring(name, backup, pct).await,
                Ok(Fill::Done) => {}
                Err(e) => return self.create_failed(name, e).await,
            }
        }
        // A VMM process owns an attached volume (and its lock): talk to it
        // through the volume's control socket, never open it here (that
        // would take the lock from a VMM still starting).
        let owner = (self.rt.vm_processes && vol.status_or_default().attached_to.is_some())
            .then(|| ControlClient::new(&pool.root().join(name)));
        let info = if let Some(owner) = &owner {
            match owner.info().await {
                Ok(info) => info,
                // Starting or stopping: ask again shortly.
                Err(Error::Unavailable { .. }) => return Ok(Some(Duration::from_secs(2))),
                Err(e) => return Err(e),
            }
        } else {
            self.unfinished_fill(name, &**pool).await?;
            match pool.info(name).await {
                Ok(info) => info,
                Err(Error::NotFound { .. }) => {
                    set_status(&self.rt.resources, name, |v: &mut Volume| {
                        v.status_mut().phase = VolumePhase::Creating;
                    })
                    .await?;
                    match self.create(&vol).await {
                        Ok(info) => {
                            tracing::info!(volume = name, size = info.size, "created");
                            self.rt
                                .events
                                .normal("Volume", name, "Created", format!("{} bytes", info.size))
                                .await;
                            info
                        }
                        Err(e) => return self.create_failed(name, e).await,
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let info = if vol.spec.size.0 > info.size {
            let grown = match &owner {
                Some(owner) => owner.expand(vol.spec.size.0).await?,
                None => pool.expand(name, vol.spec.size.0).await?,
            };
            tracing::info!(volume = name, size = grown.size, "expanded");
            let online = if owner.is_some() {
                " online, through the VM process that owns it"
            } else {
                ""
            };
            self.rt
                .events
                .normal(
                    "Volume",
                    name,
                    "Expanded",
                    format!("to {} bytes{online}", grown.size),
                )
                .await;
            grown
        } else {
            info
        };
        let shrink = vol.spec.size.0 < info.size;
        let node = self.rt.node.name.clone();
        let wanted_replicas = vol.spec.replicas;
        let cluster = self.rt.cluster.is_some();
        set_status(&self.rt.resources, name, |v: &mut Volume| {
            let status = v.status_mut();
            status.size = Some(ByteSize(info.size));
            status.allocated = Some(ByteSize(info.allocated));
            status.progress = None;
            // Cluster mode: another node took the volume first; keep its claim.
            if !cluster || status.replicas.first().is_none_or(|r| r.node == node) {
                status.replicas = vec![ReplicaStatus {
                    node: node.clone(),
                    healthy: true,
                    rebuild_percent: None,
                    address: None,
                }];
            }
            status.phase = if status.attached_to.is_some() {
                VolumePhase::Attached
            } else {
                VolumePhase::Detached
            };
            let (ready, reason, message) = if shrink {
                (
                    ConditionStatus::False,
                    "ShrinkRefused",
                    format!(
                        "spec.size {} is below the current size {}: volumes never shrink",
                        vol.spec.size,
                        ByteSize(info.size)
                    ),
                )
            } else {
                (ConditionStatus::True, "Created", String::new())
            };
            set_condition(&mut status.conditions, "Ready", ready, reason, &message);
            if wanted_replicas > 1 {
                set_condition(
                    &mut status.conditions,
                    "Replicated",
                    ConditionStatus::False,
                    "SingleNode",
                    &format!(
                        "{wanted_replicas} replicas requested; one local replica until replication is wired into the daemon"
                    ),
                );
            }
        })
        .await?;
        Ok(None)
    }

    async fn sweep(&self, existing: &BTreeSet<String>) -> Result<()> {
        if let Some(replicas) = &self.rt.replicas {
            // In a cluster, also the replicas of volumes placed elsewhere
            // now (moved off this node while it was lost).
            let keep = if self.rt.cluster.is_some() {
                let volumes = self.rt.resources.list::<Volume>().await?.items;
                repair::replicas_to_keep(&volumes, &replicas.addresses())
            } else {
                existing.clone()
            };
            replicas.sweep(&keep).await;
        }
        for info in self.rt.volumes.list().await? {
            if !existing.contains(&info.name) {
                tracing::info!(
                    volume = info.name,
                    "removing a volume whose resource is gone"
                );
                if let Err(e) = self.rt.volumes.delete(&info.name).await {
                    tracing::warn!(volume = info.name, error = %e, "cannot remove an orphaned volume");
                }
            }
        }
        Ok(())
    }
}
