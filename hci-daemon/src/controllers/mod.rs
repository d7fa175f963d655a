//! Controllers: level-triggered reconcilers that turn desired state (the
//! resources in the store) into actual state (volumes, snapshots, running
//! VMs) on this node.
//!
//! Every controller follows one loop ([`run`]):
//!
//! 1. list every resource of its kind and queue each name, then give the
//!    controller a chance to remove what no resource asks for any more
//!    ([`Reconcile::sweep`]);
//! 2. watch from the list's revision and queue the name of every change;
//! 3. relist every [`RESYNC`] (and whenever the watch breaks), so a lost
//!    event or a change made behind the daemon's back is repaired anyway.
//!
//! A worker takes names off the queue (collapsing duplicates), reads the
//! current resource and calls [`Reconcile::reconcile`] with it. Reconcilers
//! are idempotent: they compare what is with what should be and act on the
//! difference, so running one twice is harmless. An error is logged,
//! recorded in the resource's status where there is one, and retried with
//! exponential backoff (100 ms doubling up to 30 s) per name.
//!
//! The controllers of one node share a [`Node`](hci_core::model::Node)
//! identity and a data directory; see [`Controllers::start`].

pub mod backup;
mod image;
mod network;
mod node;
mod repair;
pub mod replicas;
pub mod schedule;
pub mod scheduler;
mod snapshot;
mod vm;
mod vmsnapshot;
mod volume;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::events::EventRecorder;
use async_trait::async_trait;
use futures::StreamExt;
use hci_compute::ProcessHypervisor;
use hci_compute::TapRegistry;
use hci_compute::qemu::QemuHypervisor;
use hci_core::compute::Hypervisor;
use hci_core::model::Resource;
use hci_core::{Error, Result};
use hci_net::LinuxBridgeBackend;
use hci_storage::local::LocalVolumeBackend;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

pub use self::network::resolve as resolve_network;
pub use self::node::{ClusterOptions, NodeInfo};
pub use self::vm::{MIGRATE_TO, VmController};
use crate::resources::ResourceStore;

/// How often every controller relists its kind even without changes.
pub const RESYNC: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Queues a resource name for its controller.
#[derive(Debug, Clone)]
pub struct Kick(mpsc::UnboundedSender<String>);

impl Kick {
    /// Reconciles `name` as soon as possible.
    pub fn now(&self, name: &str) {
        // The receiver only goes away when the controller stops.
        let _ = self.0.send(name.to_string());
    }

    /// Reconciles `name` after `delay`.
    pub fn after(&self, name: &str, delay: Duration) {
        let tx = self.0.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(name);
        });
    }
}

/// One controller: reconciles resources of kind [`Reconcile::Kind`].
#[async_trait]
pub trait Reconcile: Send + Sync + 'static {
    /// The kind this controller owns.
    type Kind: Resource;

    /// Brings the world in line with `current` (the resource named `name`,
    /// `None` once deleted). Returns when to look again, if the controller
    /// waits for something it is not told about.
    async fn reconcile(&self, name: &str, current: Option<Self::Kind>) -> Result<Option<Duration>>;

    /// Called after each full list with every existing name: removes what
    /// belongs to resources that no longer exist (their delete events may
    /// have been missed while the daemon was down).
    async fn sweep(&self, _existing: &BTreeSet<String>) -> Result<()> {
        Ok(())
    }
}

/// Runs `ctl` until the task is aborted; see the module docs.
pub async fn run<C: Reconcile>(
    ctl: Arc<C>,
    resources: ResourceStore,
    kick: Kick,
    queue: mpsc::UnboundedReceiver<String>,
) {
    let kind = <C::Kind as Resource>::KIND;
    let worker = tokio::spawn(work(ctl.clone(), resources.clone(), kick.clone(), queue));
    // The worker stops with this task (Controllers::shutdown aborts it).
    let _stop_worker = AbortOnDrop(worker.abort_handle());
    let mut failures = 0u32;
    loop {
        let list = match resources.list::<C::Kind>().await {
            Ok(list) => list,
            Err(e) => {
                failures += 1;
                let delay = backoff(failures);
                tracing::warn!(kind, error = %e, ?delay, "cannot list; retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        failures = 0;
        let names: BTreeSet<String> = list.items.iter().map(|r| r.name().to_string()).collect();
        for name in &names {
            kick.now(name);
        }
        if let Err(e) = ctl.sweep(&names).await {
            tracing::warn!(kind, error = %e, "sweep failed; retrying at the next resync");
        }
        let mut watch = match resources.watch::<C::Kind>(list.revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(kind, error = %e, "cannot watch; relisting");
                tokio::time::sleep(BACKOFF_MIN).await;
                continue;
            }
        };
        let resync = tokio::time::sleep(RESYNC);
        tokio::pin!(resync);
        loop {
            tokio::select! {
                event = watch.next() => match event {
                    Some(Ok(event)) => kick.now(event.name()),
                    Some(Err(e)) => {
                        tracing::debug!(kind, error = %e, "watch broke; relisting");
                        break;
                    }
                    None => break,
                },
                () = &mut resync => break,
            }
        }
        if worker.is_finished() {
            tracing::error!(kind, "controller worker ended");
            return;
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn work<C: Reconcile>(
    ctl: Arc<C>,
    resources: ResourceStore,
    kick: Kick,
    mut queue: mpsc::UnboundedReceiver<String>,
) {
    let kind = <C::Kind as Resource>::KIND;
    let mut failures: HashMap<String, u32> = HashMap::new();
    while let Some(first) = queue.recv().await {
        let mut batch = BTreeSet::from([first]);
        while let Ok(name) = queue.try_recv() {
            batch.insert(name);
        }
        for name in batch {
            let result = match resources.try_get::<C::Kind>(&name).await {
                Ok(current) => ctl.reconcile(&name, current).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(again) => {
                    failures.remove(&name);
                    if let Some(delay) = again {
                        kick.after(&name, delay);
                    }
                }
                Err(e) => {
                    let n = failures.entry(name.clone()).or_insert(0);
                    *n += 1;
                    let delay = backoff(*n);
                    tracing::warn!(kind, name, error = %e, ?delay, "reconcile failed; retrying");
                    kick.after(&name, delay);
                }
            }
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    (BACKOFF_MIN * factor).min(BACKOFF_MAX)
}

/// Everything the controllers of one node share.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The resources.
    pub resources: ResourceStore,
    /// This node.
    pub node: NodeInfo,
    /// Volumes of this node's storage pool.
    pub volumes: Arc<LocalVolumeBackend>,
    /// Imported images (volumes are cloned from them).
    pub images: Arc<LocalVolumeBackend>,
    /// The hypervisor VMs run on.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// The hypervisor of VMs with `backend: qemu` (or `auto` needing it):
    /// one QEMU process per VM, killed with the daemon — unless
    /// [`qemu_processes`](Self::qemu_processes) runs them.
    pub qemu: Arc<QemuHypervisor>,
    /// QEMU VMs in their own `hci-vmm` processes (with [`qemu`](Self::qemu)'s
    /// settings and TAP registry): they survive a daemon restart and are
    /// adopted like the others. Set with [`vm_processes`](Self::vm_processes).
    pub qemu_processes: Option<Arc<ProcessHypervisor>>,
    /// Runtime files of VMs (one directory each).
    pub run_dir: PathBuf,
    /// Where built-in test guests (`guest:NAME` kernels) are built.
    pub guests_dir: PathBuf,
    /// How long a graceful VM stop waits before killing the VM.
    pub stop_timeout: Duration,
    /// This node's networks (`None` without CAP_NET_ADMIN: networks are
    /// reported not ready and VMs with NICs do not start).
    pub networks: Option<Arc<LinuxBridgeBackend>>,
    /// The hypervisor's TAP registry: the TAP queues that hci-net keeps
    /// open are handed to it before a VM with NICs starts (the in-process
    /// VMM uses them directly, a VMM process inherits them).
    pub taps: Option<TapRegistry>,
    /// VMs run in their own processes (`hci-vmm`): their volumes are handed
    /// over by path and released by the daemon while attached, and VMs
    /// survive a daemon restart.
    pub vm_processes: bool,
    /// Where controllers record what they did ([`crate::events`]).
    pub events: EventRecorder,
    /// Open backup repositories, per `BackupTarget`.
    pub backups: Arc<backup::BackupRepos>,
    /// This node's replica servers (`None`: no replicated volumes here).
    pub replicas: Option<Arc<replicas::ReplicaPool>>,
    /// Cluster mode (a shared etcd store): liveness lease, leader election,
    /// scheduling; VMs run only where the scheduler placed them. `None`
    /// (the default) runs every VM on this node.
    pub cluster: Option<ClusterOptions>,
}

impl Runtime {
    /// A runtime keeping everything under `data_dir` (`volumes/`, `images/`,
    /// `run/`, `guests/`), running VMs on `hypervisor`.
    pub fn new(
        resources: ResourceStore,
        data_dir: &std::path::Path,
        node: NodeInfo,
        hypervisor: Arc<dyn Hypervisor>,
    ) -> Result<Self> {
        let volumes = Arc::new(LocalVolumeBackend::new(data_dir.join("volumes"))?);
        let images = Arc::new(LocalVolumeBackend::new(data_dir.join("images"))?);
        Ok(Runtime {
            volumes,
            images,
            hypervisor,
            qemu: Arc::new(QemuHypervisor::new()),
            qemu_processes: None,
            run_dir: data_dir.join("run"),
            guests_dir: data_dir.join("guests"),
            stop_timeout: Duration::from_secs(30),
            networks: None,
            taps: None,
            vm_processes: false,
            backups: Arc::default(),
            replicas: None,
            cluster: None,
            events: EventRecorder::new(resources.state_store().clone(), node.name.clone()),
            resources,
            node,
        })
    }
}

/// The running controllers of a node. Dropping it stops them (VMs run by an
/// in-process hypervisor stop with it).
#[derive(Debug)]
pub struct Controllers {
    tasks: JoinSet<()>,
    vms: Arc<VmController>,
    rt: Runtime,
}

impl Controllers {
    /// Registers the node and starts the volume, snapshot, image, network,
    /// VM, backup target, backup, schedule and VM snapshot controllers.
    pub async fn start(rt: Runtime) -> Result<Self> {
        node::register(&rt).await?;
        let mut tasks = JoinSet::new();
        let (kick, queue) = channel();
        let volumes = Arc::new(volume::VolumeController::new(rt.clone()));
        tasks.spawn(run(volumes, rt.resources.clone(), kick, queue));
        let (kick, queue) = channel();
        let snapshots = Arc::new(snapshot::SnapshotController::new(rt.clone()));
        tasks.spawn(run(snapshots, rt.resources.clone(), kick, queue));
        let (kick, queue) = channel();
        let images = Arc::new(image::ImageController::new(rt.clone()));
        tasks.spawn(run(images, rt.resources.clone(), kick, queue));
        let (kick, queue) = channel();
        let networks = Arc::new(network::NetworkController::new(rt.clone()));
        tasks.spawn(run(networks, rt.resources.clone(), kick, queue));
        let (kick, queue) = channel();
        let vms = VmController::new(rt.clone(), kick.clone());
        tasks.spawn(run(vms.clone(), rt.resources.clone(), kick, queue));
        tasks.spawn(node::heartbeat(rt.clone(), vms.clone()));
        if let Some(options) = rt.cluster {
            let (lease, lease_cell) = tokio::sync::watch::channel(None);
            tasks.spawn(node::liveness(rt.clone(), vms.clone(), options, lease));
            tasks.spawn(node::drainer(rt.clone(), vms.clone(), options));
            tasks.spawn(scheduler::lead(rt.clone(), options, lease_cell));
        }
        let (kick, queue) = channel();
        let targets = Arc::new(backup::BackupTargetController::new(rt.clone()));
        tasks.spawn(run(targets, rt.resources.clone(), kick, queue));
        let (kick, queue) = channel();
        let backups = Arc::new(backup::BackupController::new(rt.clone(), kick.clone()));
        tasks.spawn(run(backups, rt.resources.clone(), kick, queue));
        let (kick, queue) = channel();
        let schedules = Arc::new(schedule::ScheduleController::new(rt.clone()));
        tasks.spawn(run(schedules, rt.resources.clone(), kick, queue));
        let (kick, queue) = channel();
        let vm_snapshots = Arc::new(vmsnapshot::VmSnapshotController::new(
            rt.clone(),
            vms.clone(),
        ));
        tasks.spawn(run(vm_snapshots, rt.resources.clone(), kick, queue));
        let rt = rt.clone();
        Ok(Controllers { tasks, vms, rt })
    }

    /// What the controllers share (the pools, the node).
    pub fn runtime(&self) -> &Runtime {
        &self.rt
    }

    /// The VM controller (console access, running VMs).
    pub fn vms(&self) -> &Arc<VmController> {
        &self.vms
    }

    /// Stops every controller; in-process VMs are killed.
    pub async fn shutdown(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.vms.kill_all().await;
    }
}

/// A free TCP address on IP `host` (for `what`, in errors): the kernel picks
/// the port.
pub(crate) fn free_address(host: &str, what: &str) -> Result<std::net::SocketAddr> {
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| Error::invalid("node address", format!("{host:?} is not an IP address")))?;
    let listener = std::net::TcpListener::bind((ip, 0))
        .map_err(|e| Error::io(format!("bind a {what} port on {host}"), e))?;
    listener
        .local_addr()
        .map_err(|e| Error::io(format!("read the {what} port"), e))
}

/// Turns a failed blocking task (a panic or a cancelled runtime) of
/// `backend` into an error.
pub(crate) fn join_err(
    backend: &'static str,
) -> impl Fn(tokio::task::JoinError) -> hci_core::Error {
    move |e| hci_core::Error::Backend {
        backend,
        message: e.to_string(),
        source: None,
    }
}

/// Applies `change` to the resource named `name` and stores it, unless
/// that changes nothing (so controllers do not wake themselves up forever).
pub(crate) async fn set_status<R>(
    resources: &ResourceStore,
    name: &str,
    change: impl Fn(&mut R) + Send + Sync,
) -> Result<()>
where
    R: Resource + PartialEq,
{
    let current: R = resources.get(name).await?;
    let mut next = current.clone();
    change(&mut next);
    if next != current {
        resources
            .modify::<R, _>(name, None, |r| {
                change(r);
                Ok(())
            })
            .await?;
    }
    Ok(())
}

fn channel() -> (Kick, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Kick(tx), rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(30), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
