//! The VM controller: runs each `VirtualMachine` on this node's hypervisor
//! as its run strategy and power actions say, and reports what happens.
//!
//! | strategy | the VM runs… |
//! |---|---|
//! | `Always` | always: restarted whenever it stops |
//! | `RerunOnFailure` | until the guest powers off; restarted after a crash, a reboot (reset) or a lost VMM |
//! | `Manual` | only between `start` and `stop` actions |
//! | `Halted` | never |
//!
//! Power actions arrive as the `hci.dev/requested-action` annotation (see
//! [`REQUESTED_ACTION`]); the controller carries one out and clears it.
//! Restarts in quick succession back off (2 s doubling to 60 s) so a guest
//! that crashes at boot does not spin.
//!
//! Starting a VM: admission against the node's allocatable memory and CPUs,
//! every disk's volume must be ready and not attached read-write elsewhere,
//! the kernel resolved (`guest:NAME` builds one of hci-compute's test guests
//! with gcc), the volumes opened in-process and marked attached, each NIC a
//! TAP port on its network's bridge (hci-net), with the MAC from the spec or
//! derived from `vm/nic` names.
//!
//! Backends: `spec.backend: kvm` runs the VM on the node's hypervisor (hci's
//! own VMM, in-process or one `hci-vmm` process per VM); `qemu` runs it in
//! its own `qemu-system-x86_64` driven over QMP
//! ([`QemuHypervisor`](hci_compute::qemu::QemuHypervisor)), with
//! the VM's volumes served to QEMU over NBD and a cloud-init seed built from
//! `spec.cloudInit`; `auto` (the default) picks kvm for a direct kernel boot
//! with virtio devices only, qemu otherwise. With VMs in processes (the
//! default where `hci-vmm` is installed) a QEMU VM runs under its own
//! `hci-vmm` ([`ProcessHypervisor::with_qemu`](hci_compute::ProcessHypervisor::with_qemu)),
//! which opens its volumes and serves them to QEMU: it survives a daemon
//! restart and is adopted like a kvm VM. In-process mode, QEMU VMs die with
//! the daemon (QEMU is killed when the daemon exits, even by `kill -9`):
//! after a daemon restart they count as lost and start again as their run
//! strategy says; no QEMU process is left behind.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use hci_compute::qemu::seed::NoCloudSeed;
use hci_compute::test_guests::{self, Guest};
use hci_core::compute::{
    BootSource, DiskBackend, DiskBus, DiskConfig, ExitReason, Hypervisor, NicConfig, NicModel,
    VmConfig, VmHandle, VmState,
};
use hci_core::model::{
    BootSpec, ConditionStatus, DiskBus as ModelDiskBus, FirmwareKind, HypervisorBackend,
    MacAddress, NicModel as ModelNicModel, Resource, RunStrategy, VirtualMachine, VmPhase, Volume,
    VolumePhase, set_condition,
};
use hci_core::net::{NetworkBackend, PortConfig};
use hci_core::volume::{OpenVolume, VolumeBackend};
use hci_core::{Error, Result};
use uuid::Uuid;

mod migration;

pub use self::migration::MIGRATE_TO;
use super::volume::encryption_key;
use super::{Kick, Reconcile, Runtime, join_err, set_status};
use crate::api::{ConsoleIo, ConsoleProvider, REQUESTED_ACTION, REQUESTED_AT};

/// The kind events are recorded under.
const KIND: &str = "VirtualMachine";
/// A VM that ran at least this long before stopping restarts at once.
const STABLE_RUN: Duration = Duration::from_secs(10);
/// vCPUs per host CPU that admission allows in total.
const CPU_OVERCOMMIT: u32 = 8;
/// Longest a QEMU VM may take from spawning QEMU to running: past it the
/// start fails (QEMU is killed) instead of holding the reconcile.
const QEMU_START_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether `vm` runs on QEMU: `backend: qemu`, or `auto` for what hci's
/// own VMM cannot run (firmware boot, non-virtio disks or NICs).
pub(crate) fn uses_qemu(vm: &VirtualMachine) -> bool {
    match vm.spec.backend {
        HypervisorBackend::Kvm => false,
        HypervisorBackend::Qemu => true,
        HypervisorBackend::Auto => {
            !matches!(vm.spec.boot, BootSpec::Kernel(_))
                || vm.spec.disks.iter().any(|d| d.bus != ModelDiskBus::Virtio)
                || vm
                    .spec
                    .nics
                    .iter()
                    .any(|n| n.model != ModelNicModel::Virtio)
        }
    }
}

/// One VM this controller started.
#[derive(Debug)]
struct Instance {
    uid: Option<Uuid>,
    handle: Arc<dyn VmHandle>,
    cpus: u32,
    memory: u64,
    exit: Mutex<Option<ExitReason>>,
    /// The controller asked it to stop (so its exit is not a failure).
    stopping: AtomicBool,
    /// Its exit has been written to the VM's status.
    recorded: AtomicBool,
    started: Instant,
    exited: Mutex<Option<Instant>>,
    /// (network, port) of each NIC, detached when the VM stops.
    ports: Vec<(String, String)>,
    nics: Vec<NicConfig>,
    /// It dies with the daemon (QEMU run by the daemon itself; never adopted).
    qemu: bool,
}

impl Instance {
    fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn alive(&self) -> bool {
        self.exit_reason().is_none()
    }
}

/// The VM controller of a node; also serves VM consoles to the API.
#[derive(Debug)]
pub struct VmController {
    rt: Runtime,
    kick: Kick,
    vms: Mutex<HashMap<String, Arc<Instance>>>,
    /// VMs being evicted from this node (drain): not reconciled meanwhile.
    evicting: Mutex<BTreeSet<String>>,
    /// VMs a live migration from or to this node is moving: their
    /// migration task owns them, the reconcile leaves them alone.
    migrating: Mutex<BTreeSet<String>>,
    /// This controller (migration tasks outlive a reconcile).
    me: Weak<VmController>,
}

fn phase_after(reason: &ExitReason, strategy: RunStrategy, asked: bool) -> VmPhase {
    match reason {
        ExitReason::Crashed(_) | ExitReason::VmmError(_) if !asked => VmPhase::Failed,
        // A reset is a reboot: the VM comes back unless it should stay down.
        ExitReason::Reset
            if !asked && matches!(strategy, RunStrategy::Always | RunStrategy::RerunOnFailure) =>
        {
            VmPhase::Pending
        }
        _ => VmPhase::Stopped,
    }
}

/// Why a VM that should be running has no instance on this node.
fn lost_message(vm: &VirtualMachine) -> String {
    if uses_qemu(vm) {
        "the VM was lost: QEMU VMs stop with the daemon (daemon restart)".into()
    } else {
        "the VM was lost (daemon restart)".into()
    }
}

fn describe(reason: &ExitReason) -> String {
    match reason {
        ExitReason::Poweroff => "the guest powered off".into(),
        ExitReason::Reset => "the guest reset (rebooted)".into(),
        ExitReason::Killed => "killed".into(),
        ExitReason::Crashed(why) => format!("the guest crashed: {why}"),
        ExitReason::VmmError(why) => format!("the VMM failed: {why}"),
    }
}

impl VmController {
    pub(crate) fn new(rt: Runtime, kick: Kick) -> Arc<Self> {
        Arc::new_cyclic(|me| VmController {
            rt,
            kick,
            vms: Mutex::new(HashMap::new()),
            evicting: Mutex::new(BTreeSet::new()),
            migrating: Mutex::new(BTreeSet::new()),
            me: me.clone(),
        })
    }

    fn evicting(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.evicting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn migrating(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.migrating.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a live migration from or to this node is moving `name`.
    pub(crate) fn is_migrating(&self, name: &str) -> bool {
        self.migrating().contains(name)
    }

    /// Whether this node should run `vm`: always on a single node; in
    /// cluster mode when the scheduler placed it here (`status.node`) and
    /// it is not being evicted.
    fn runs_here(&self, vm: &VirtualMachine) -> bool {
        if self.rt.cluster.is_none() {
            return true;
        }
        vm.status_or_default().node.as_deref() == Some(self.rt.node.name.as_str())
            && !self.evicting().contains(vm.name())
    }

    /// A VM this node must not run: forgets it (an eviction in progress
    /// finishes by itself). An instance still running here was moved away
    /// behind this node's back (failover while this node was cut off): it is
    /// killed, and its volumes are left to the node that runs it now.
    async fn not_here(&self, name: &str) -> Result<Option<Duration>> {
        if self.evicting().contains(name) {
            return Ok(None);
        }
        let removed = self.map().remove(name);
        if let Some(inst) = removed {
            if inst.alive() {
                inst.stopping.store(true, Ordering::SeqCst);
                inst.handle.kill().await?;
                tracing::warn!(vm = name, "VM placed on another node: killed here");
                self.rt
                    .events
                    .warning(
                        KIND,
                        name,
                        "Superseded",
                        format!(
                            "node {} killed its instance: the VM was placed elsewhere",
                            self.rt.node.name
                        ),
                    )
                    .await;
            }
            self.detach_ports(&inst.ports, &inst.nics).await;
        } else if let Some(adopter) = self.rt.hypervisor.as_adopter() {
            // A VMM process left running across a daemon restart while the
            // VM was placed elsewhere (failover): end it.
            let run_dir = self.rt.run_dir.join(name);
            if run_dir.is_dir()
                && let Ok(Some(handle)) = adopter.adopt(name, &run_dir).await
            {
                tracing::warn!(vm = name, "VMM process of a VM placed elsewhere: killed");
                handle.kill().await?;
            }
        }
        Ok(None)
    }

    /// Marks `name` as being evicted; false if it already is.
    pub(crate) fn start_eviction(&self, name: &str) -> bool {
        self.evicting().insert(name.to_string())
    }

    /// Evicts a VM from this node (after [`start_eviction`](Self::start_eviction)):
    /// shuts it down cleanly (killed after the stop timeout), releases its
    /// NICs and volumes, and hands it back to the scheduler (`status.node`
    /// cleared, phase `Pending`).
    pub(crate) async fn evict(&self, name: &str, why: &str) -> Result<()> {
        let result = self.evict_inner(name, why).await;
        self.evicting().remove(name);
        self.kick.now(name);
        result
    }

    async fn evict_inner(&self, name: &str, why: &str) -> Result<()> {
        let node = self.rt.node.name.clone();
        if let Some(inst) = self.instance(name) {
            if inst.alive() {
                inst.stopping.store(true, Ordering::SeqCst);
                self.status(name, |v| v.status_mut().phase = VmPhase::Stopping)
                    .await?;
                if let Err(e) = inst.handle.shutdown(self.rt.stop_timeout).await {
                    tracing::warn!(vm = name, error = %e, "graceful stop failed; killing");
                    inst.handle.kill().await?;
                }
                let _ = inst.handle.wait().await;
            }
            self.map().remove(name);
            self.detach_ports(&inst.ports, &inst.nics).await;
        }
        let Some(vm) = self.rt.resources.try_get::<VirtualMachine>(name).await? else {
            return Ok(());
        };
        let volumes: Vec<String> = vm.spec.disks.iter().map(|d| d.volume.clone()).collect();
        self.mark_volumes(&volumes, None).await?;
        let message = format!("evicted from node {node} ({why}): waiting to be placed again");
        self.status(name, |v| {
            let status = v.status_mut();
            if status.node.as_deref() == Some(node.as_str()) {
                status.node = None;
            }
            if status.phase != VmPhase::Stopped {
                status.phase = VmPhase::Pending;
            }
            status.message = message.clone();
            set_condition(
                &mut status.conditions,
                "Ready",
                ConditionStatus::False,
                "Evicted",
                &message,
            );
        })
        .await?;
        self.rt.events.normal(KIND, name, "Evicted", message).await;
        Ok(())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Instance>>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn instance(&self, name: &str) -> Option<Arc<Instance>> {
        self.map().get(name).cloned()
    }

    /// Runs `f` with VM `name` paused if it runs here, and resumes it after
    /// (also when `f` fails): what happens to its volumes during `f` is one
    /// instant for the guest. Refused while the VM migrates.
    pub(crate) async fn while_paused<T>(
        &self,
        name: &str,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        if self.is_migrating(name) {
            return Err(Error::Unavailable {
                what: format!("VM {name:?} (it is migrating)"),
                source: None,
            });
        }
        let inst = self.instance(name).filter(|i| i.alive());
        let paused = match &inst {
            Some(i) if matches!(i.handle.state().await, Ok(VmState::Running)) => {
                i.handle.pause().await?;
                Some(i)
            }
            _ => None,
        };
        let r = f.await;
        if let Some(i) = paused
            && let Err(e) = i.handle.resume().await
        {
            tracing::error!(vm = name, error = %e, "cannot resume the VM after pausing it");
            if r.is_ok() {
                return Err(e);
            }
        }
        r
    }

    /// How many VMs run on this node now.
    pub fn running_count(&self) -> usize {
        self.map().values().filter(|i| i.alive()).count()
    }

    /// Names of the VMs running on this node now.
    pub fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .map()
            .iter()
            .filter(|(_, i)| i.alive())
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    /// Resource usage of every VM running on this node, by name.
    pub async fn stats(&self) -> Vec<(String, hci_core::compute::VmStats)> {
        let running: Vec<(String, Arc<Instance>)> = self
            .map()
            .iter()
            .filter(|(_, i)| i.alive())
            .map(|(n, i)| (n.clone(), i.clone()))
            .collect();
        let mut out = Vec::new();
        for (name, inst) in running {
            match inst.handle.stats().await {
                Ok(stats) => out.push((name, stats)),
                Err(e) => tracing::debug!(vm = name, error = %e, "no stats"),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Kills every VM that would not survive the daemon anyway (those of an
    /// in-process hypervisor); VMs in their own processes keep running and
    /// are adopted by the next daemon.
    pub async fn kill_all(&self) {
        let all: Vec<Arc<Instance>> = self.map().drain().map(|(_, i)| i).collect();
        let adoptable = self.rt.hypervisor.as_adopter().is_some();
        for inst in all {
            // QEMU VMs never outlive the daemon: end them here rather than
            // leave it to the kernel when the daemon exits.
            if (inst.qemu || !adoptable)
                && inst.alive()
                && let Err(e) = inst.handle.kill().await
            {
                tracing::warn!(vm = inst.handle.name(), error = %e, "cannot kill");
            }
        }
    }

    /// Sets `attached_to` of every volume in `volumes` to `vm` (or clears it).
    /// Attaching refuses a detached volume whose replicas a rebuild engine
    /// holds (phase `Rebuilding`, claimed in the same compare-and-swap way):
    /// the VM's engine would fence the rebuild's, or the other way round.
    async fn mark_volumes(&self, volumes: &[String], vm: Option<&str>) -> Result<()> {
        for v in volumes {
            let refused = AtomicBool::new(false);
            let result = set_status(&self.rt.resources, v, |vol: &mut Volume| {
                let st = vol.status_or_default();
                let rebuilding = st.phase == VolumePhase::Rebuilding && st.attached_to.is_none();
                refused.store(vm.is_some() && rebuilding, Ordering::Relaxed);
                if vm.is_some() && rebuilding {
                    return;
                }
                vol.status_mut().attached_to = vm.map(str::to_string);
                if matches!(
                    vol.status_mut().phase,
                    VolumePhase::Attached | VolumePhase::Detached
                ) {
                    vol.status_mut().phase = if vm.is_some() {
                        VolumePhase::Attached
                    } else {
                        VolumePhase::Detached
                    };
                }
            })
            .await;
            match result {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            if refused.load(Ordering::Relaxed) {
                return Err(Error::Busy {
                    kind: "volume",
                    name: v.clone(),
                    reason: "its replicas are being rebuilt".into(),
                });
            }
        }
        Ok(())
    }

    /// Clears `attached_to` on every volume attached to `vm`.
    async fn detach_all(&self, vm: &str) -> Result<()> {
        let attached: Vec<String> = self
            .rt
            .resources
            .list::<Volume>()
            .await?
            .items
            .into_iter()
            .filter(|v| v.status.as_ref().and_then(|s| s.attached_to.as_deref()) == Some(vm))
            .map(|v| v.name().to_string())
            .collect();
        self.mark_volumes(&attached, None).await
    }

    async fn status(
        &self,
        name: &str,
        change: impl Fn(&mut VirtualMachine) + Send + Sync,
    ) -> Result<()> {
        match set_status(&self.rt.resources, name, change).await {
            // Deleted meanwhile: the next reconcile cleans up.
            Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn waiting(&self, name: &str, reason: &str, message: String) -> Result<()> {
        self.rt.events.warning(KIND, name, reason, &message).await;
        self.status(name, |vm| {
            let status = vm.status_mut();
            status.phase = VmPhase::Pending;
            status.message = message.clone();
            set_condition(
                &mut status.conditions,
                "Ready",
                ConditionStatus::False,
                reason,
                &message,
            );
        })
        .await
    }

    /// Resolves a kernel path: `guest:NAME` builds a test guest.
    async fn kernel(&self, path: &str) -> Result<std::path::PathBuf> {
        let Some(guest) = path.strip_prefix("guest:") else {
            let p = std::path::PathBuf::from(path);
            if !p.is_file() {
                return Err(Error::invalid(
                    "spec.boot.path",
                    format!("{path:?} is not a file on node {}", self.rt.node.name),
                ));
            }
            return Ok(p);
        };
        let Some(guest) = Guest::ALL.into_iter().find(|g| g.name() == guest) else {
            let names: Vec<&str> = Guest::ALL.iter().map(|g| g.name()).collect();
            return Err(Error::invalid(
                "spec.boot.path",
                format!(
                    "there is no test guest {guest:?} (have: {})",
                    names.join(", ")
                ),
            ));
        };
        let dir = self.rt.guests_dir.clone();
        tokio::task::spawn_blocking(move || test_guests::build(guest, &dir))
            .await
            .map_err(join_err("kvm"))?
            .map_err(|e| Error::io(format!("build test guest {}", guest.name()), e))
    }

    /// Checks whether the VM can start now: `Ok(Some(wait))` if not yet.
    async fn admit(&self, vm: &VirtualMachine) -> Result<Option<Duration>> {
        let name = vm.name();
        let alloc = self.rt.node.allocatable;
        let (mut cpus, mut memory) = (0u32, 0u64);
        for (n, i) in self.map().iter() {
            if n != name && i.alive() {
                cpus += i.cpus;
                memory += i.memory;
            }
        }
        let want_mem = vm.spec.memory.0;
        if memory + want_mem > alloc.memory.0 || cpus + vm.spec.cpus > alloc.cpus * CPU_OVERCOMMIT {
            let message = format!(
                "node {} lacks room: the VM needs {} CPUs and {} of memory; {} CPUs (of {}) and {} (of {}) are in use",
                self.rt.node.name,
                vm.spec.cpus,
                vm.spec.memory,
                cpus,
                alloc.cpus * CPU_OVERCOMMIT,
                hci_core::model::ByteSize(memory),
                alloc.memory,
            );
            self.waiting(name, "Unschedulable", message).await?;
            return Ok(Some(Duration::from_secs(10)));
        }
        for disk in &vm.spec.disks {
            let vol: Option<Volume> = self.rt.resources.try_get(&disk.volume).await?;
            let problem = match &vol {
                None => Some(format!("volume {:?} does not exist", disk.volume)),
                Some(v) if !volume_usable(v, name) => Some(format!(
                    "volume {:?} is {} (waiting for it to be ready)",
                    disk.volume,
                    v.status_or_default().phase
                )),
                Some(v) => match v.status_or_default().attached_to.as_deref() {
                    Some(other) if other != name && !disk.read_only => Some(format!(
                        "volume {:?} is attached to VM {other:?}",
                        disk.volume
                    )),
                    _ => None,
                },
            };
            if let Some(message) = problem {
                self.waiting(name, "VolumeNotReady", message).await?;
                return Ok(Some(Duration::from_secs(1)));
            }
        }
        Ok(None)
    }

    /// Attaches the VM's NICs to their networks: the ports made, and the
    /// NIC configurations. Nothing stays attached on error.
    async fn attach_nics(
        &self,
        vm: &VirtualMachine,
    ) -> Result<(Vec<(String, String)>, Vec<NicConfig>)> {
        let mut ports = Vec::new();
        let mut nics = Vec::new();
        if let Some(backend) = &self.rt.networks {
            // The guest asks for an address as soon as it boots: give its
            // DHCP servers its name first.
            let mut networks: Vec<&str> = vm.spec.nics.iter().map(|n| n.network.as_str()).collect();
            networks.sort_unstable();
            networks.dedup();
            for net in networks {
                let names = super::network::dhcp_names(&self.rt.resources, net).await?;
                if let Err(e) = backend.set_dhcp_names(net, names).await {
                    tracing::warn!(vm = vm.name(), network = net, error = %e, "cannot give the DHCP server the VM's name");
                }
            }
        }
        for (i, nic) in vm.spec.nics.iter().enumerate() {
            let attached = async {
                let backend = self.rt.networks.as_ref().ok_or_else(|| {
                    Error::unsupported(
                        "NICs (spec.nics)",
                        format!(
                            "node {}: hci-daemon manages no networks here (it needs CAP_NET_ADMIN)",
                            self.rt.node.name
                        ),
                    )
                })?;
                let qemu = uses_qemu(vm);
                let model = match nic.model {
                    ModelNicModel::Virtio => NicModel::Virtio,
                    ModelNicModel::E1000 if qemu => NicModel::E1000,
                    ModelNicModel::E1000 => {
                        return Err(Error::unsupported(
                            "NIC model e1000",
                            "the kvm backend (virtio only)",
                        ));
                    }
                };
                let mac = vm.nic_mac(i).unwrap_or_else(|| {
                    MacAddress::from_name(&format!("{}/{}", vm.name(), nic.name))
                });
                let port = PortConfig {
                    name: format!("{}-{}", vm.name(), nic.name),
                    mac: mac.0,
                    queues: 1,
                };
                let tap = backend.attach_port(&nic.network, &port).await?;
                if qemu {
                    self.rt.qemu.register_tap(&tap);
                } else if let Some(taps) = &self.rt.taps {
                    taps.register(&tap);
                }
                Ok::<_, Error>((
                    (nic.network.clone(), port.name),
                    NicConfig {
                        name: nic.name.clone(),
                        tap: tap.ifname.clone(),
                        mac: mac.0,
                        model,
                        mtu: tap.mtu,
                    },
                ))
            }
            .await;
            match attached {
                Ok((port, config)) => {
                    ports.push(port);
                    nics.push(config);
                }
                Err(e) => {
                    self.detach_ports(&ports, &nics).await;
                    return Err(e);
                }
            }
        }
        Ok((ports, nics))
    }

    /// Detaches ports made by [`VmController::attach_nics`] (best effort).
    async fn detach_ports(&self, ports: &[(String, String)], nics: &[NicConfig]) {
        for nic in nics {
            if let Some(taps) = &self.rt.taps {
                taps.unregister(&nic.tap);
            }
            self.rt.qemu.unregister_tap(&nic.tap);
        }
        let Some(backend) = &self.rt.networks else {
            return;
        };
        for (network, port) in ports {
            match backend.detach_port(network, port).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(network, port, error = %e, "cannot detach a VM port"),
            }
        }
    }

    /// A replicated volume as a disk: handed to the VMM process (which runs
    /// its engine and answers on the engine socket), or opened here for an
    /// in-process VM (the daemon then answers on the engine socket).
    async fn replicated_disk(
        &self,
        vm: &VirtualMachine,
        vol: &Volume,
        read_only: bool,
        by_spec: bool,
    ) -> Result<DiskBackend> {
        let pool = self.rt.replicas.as_ref().ok_or_else(|| {
            Error::unsupported(
                format!("volume {:?} (replicated)", vol.name()),
                "this daemon (it serves no replica disks)",
            )
        })?;
        let addresses = super::replicas::placed(vol);
        if addresses.is_empty() {
            return Err(Error::Unavailable {
                what: format!("volume {:?} (its replicas are not placed yet)", vol.name()),
                source: None,
            });
        }
        let run_dir = self.rt.run_dir.join(vm.name());
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| Error::io(format!("create {}", run_dir.display()), e))?;
        let socket = super::volume::engine_socket(&self.rt, vm.name(), vol.name());
        let _ = std::fs::remove_file(&socket);
        let key_file: Option<std::path::PathBuf> = vol
            .spec
            .encryption
            .as_ref()
            .map(|e| e.key_file.clone().into());
        if by_spec {
            return Ok(DiskBackend::Replicated {
                volume: vol.name().to_string(),
                replicas: addresses,
                token_file: pool.token_file().to_path_buf(),
                key_file,
                control: Some(socket),
            });
        }
        // The same opener hci-vmm and the QEMU backend use.
        let opened = hci_compute::replicated::open(hci_compute::replicated::ReplicatedDisk {
            volume: vol.name(),
            replicas: &addresses,
            token_file: pool.token_file(),
            key_file: key_file.as_deref(),
            control: Some(&socket),
            read_only,
        })
        .await?;
        Ok(DiskBackend::Device(opened.engine))
    }

    /// Builds the hypervisor configuration, opening the VM's volumes (or,
    /// with `by_spec`, describing replicated ones for whoever runs the VM:
    /// a VMM process, QEMU's opener, a migration receiver).
    async fn config(
        &self,
        vm: &VirtualMachine,
        nics: Vec<NicConfig>,
        by_spec: bool,
    ) -> Result<VmConfig> {
        let qemu = uses_qemu(vm);
        // A VMM process opens volumes itself (and serves them to its QEMU
        // over NBD); a QEMU run by the daemon gets them from this process.
        let vmm_opens = self.rt.vm_processes && (!qemu || self.rt.qemu_processes.is_some());
        let boot = match &vm.spec.boot {
            BootSpec::Kernel(k) => {
                let initrd = match &k.initrd {
                    Some(i) if !std::path::Path::new(i).is_file() => {
                        return Err(Error::invalid(
                            "spec.boot.initrd",
                            format!("{i:?} is not a file on node {}", self.rt.node.name),
                        ));
                    }
                    other => other.as_ref().map(Into::into),
                };
                BootSource::Kernel {
                    kernel: self.kernel(&k.path).await?,
                    initrd,
                    cmdline: k.cmdline.clone(),
                }
            }
            BootSpec::Firmware(f) if qemu => {
                if f.secure_boot {
                    return Err(Error::unsupported(
                        "Secure Boot (spec.boot.secureBoot)",
                        "the qemu backend of this daemon",
                    ));
                }
                BootSource::Firmware {
                    uefi: f.kind == FirmwareKind::Uefi,
                }
            }
            BootSpec::Firmware(_) => {
                return Err(Error::unsupported(
                    "firmware boot",
                    "the kvm backend (direct kernel boot only; firmware needs the qemu backend)",
                ));
            }
        };
        let mut disks = Vec::new();
        for disk in &vm.spec.disks {
            let vol: Volume = self.rt.resources.get(&disk.volume).await?;
            let backend = if vol.spec.replicas > 1 {
                self.replicated_disk(vm, &vol, disk.read_only, by_spec || vmm_opens || qemu)
                    .await?
            } else if vmm_opens {
                // The VMM process opens the volume itself (reading the key
                // file of an encrypted one): let go of it.
                self.rt.volumes.release(&disk.volume)?;
                DiskBackend::Volume {
                    path: self.rt.volumes.root().join(&disk.volume),
                    key_file: vol
                        .spec
                        .encryption
                        .as_ref()
                        .map(|e| e.key_file.clone().into()),
                }
            } else {
                DiskBackend::Device(
                    self.rt
                        .volumes
                        .open(
                            &disk.volume,
                            OpenVolume {
                                read_only: disk.read_only,
                                encryption_key: encryption_key(&vol)?,
                            },
                        )
                        .await?,
                )
            };
            let bus = match disk.bus {
                ModelDiskBus::Virtio => DiskBus::Virtio,
                ModelDiskBus::Sata if qemu => DiskBus::Sata,
                ModelDiskBus::Scsi if qemu => DiskBus::Scsi,
                ModelDiskBus::Cdrom if qemu => DiskBus::Cdrom,
                other => {
                    return Err(Error::unsupported(
                        format!("disk bus {}", other.as_str()),
                        "the kvm backend (virtio only)",
                    ));
                }
            };
            disks.push(DiskConfig {
                name: disk.name.clone(),
                backend,
                bus,
                read_only: disk.read_only,
                boot_order: disk.boot_order,
            });
        }
        let run_dir = self.rt.run_dir.join(vm.name());
        let cloud_init_seed = match &vm.spec.cloud_init {
            Some(ci) if qemu => Some(self.seed(vm, ci, &run_dir)?),
            Some(_) => {
                return Err(Error::unsupported(
                    "cloud-init (spec.cloudInit)",
                    "the kvm backend (no seed disk; use backend qemu)",
                ));
            }
            None => None,
        };
        Ok(VmConfig {
            name: vm.name().to_string(),
            cpus: vm.spec.cpus,
            memory: vm.spec.memory.0,
            boot,
            disks,
            nics,
            cloud_init_seed,
            run_dir,
        })
    }

    /// Writes the VM's cloud-init NoCloud seed (`cidata` vfat image) into
    /// its run directory.
    fn seed(
        &self,
        vm: &VirtualMachine,
        ci: &hci_core::model::CloudInit,
        run_dir: &std::path::Path,
    ) -> Result<std::path::PathBuf> {
        let seed = NoCloudSeed {
            instance_id: vm
                .metadata
                .uid
                .map_or_else(|| vm.name().to_string(), |u| u.to_string()),
            hostname: Some(vm.name().to_string()),
            ssh_authorized_keys: ci.ssh_authorized_keys.clone(),
            user_data: ci.user_data.clone().unwrap_or_default(),
            network_config: ci.network_config.clone(),
        };
        std::fs::create_dir_all(run_dir)
            .map_err(|e| Error::io(format!("create {}", run_dir.display()), e))?;
        let path = run_dir.join("cidata.img");
        seed.write_vfat(&path)?;
        Ok(path)
    }

    /// The hypervisor that runs `vm`.
    fn hypervisor_for(&self, vm: &VirtualMachine) -> Arc<dyn Hypervisor> {
        if uses_qemu(vm) {
            match &self.rt.qemu_processes {
                Some(p) => p.clone(),
                None => self.rt.qemu.clone(),
            }
        } else {
            self.rt.hypervisor.clone()
        }
    }

    /// Starts the VM, or says why it cannot yet.
    async fn start(&self, vm: &VirtualMachine, restart: bool) -> Result<Option<Duration>> {
        let name = vm.name();
        if let Some(wait) = self.admit(vm).await? {
            return Ok(Some(wait));
        }
        let volumes: Vec<String> = vm.spec.disks.iter().map(|d| d.volume.clone()).collect();
        let (ports, nics) = match self.attach_nics(vm).await {
            Ok(attached) => attached,
            Err(e) => {
                self.start_failed(name, &e).await?;
                return Err(e);
            }
        };
        let nic_configs = nics.clone();
        // Attached before the VMM opens them: the volume controller keeps
        // its hands off attached volumes that a VMM process owns.
        self.mark_volumes(&volumes, Some(name)).await?;
        let qemu = uses_qemu(vm);
        let started = async {
            let config = self.config(vm, nics, false).await?;
            std::fs::create_dir_all(&config.run_dir)
                .map_err(|e| Error::io(format!("create {}", config.run_dir.display()), e))?;
            self.status(name, |v| v.status_mut().phase = VmPhase::Starting)
                .await?;
            let hypervisor = self.hypervisor_for(vm);
            let launch = async {
                let handle: Arc<dyn VmHandle> = Arc::from(hypervisor.create(config).await?);
                handle.start().await?;
                Ok::<_, Error>(handle)
            };
            if !qemu {
                return launch.await;
            }
            // Dropping the launch on a timeout kills the QEMU it spawned.
            tokio::time::timeout(QEMU_START_TIMEOUT, launch)
                .await
                .map_err(|_| Error::Unavailable {
                    what: format!(
                        "QEMU for VM {name:?} (not running {}s after it was spawned)",
                        QEMU_START_TIMEOUT.as_secs()
                    ),
                    source: None,
                })?
        }
        .await;
        let handle = match started {
            Ok(handle) => handle,
            Err(e) => {
                self.detach_ports(&ports, &nic_configs).await;
                self.mark_volumes(&volumes, None).await?;
                self.start_failed(name, &e).await?;
                return Err(e);
            }
        };
        let inst = Arc::new(Instance {
            uid: vm.metadata.uid,
            handle: handle.clone(),
            cpus: vm.spec.cpus,
            memory: vm.spec.memory.0,
            exit: Mutex::new(None),
            stopping: AtomicBool::new(false),
            recorded: AtomicBool::new(false),
            started: Instant::now(),
            exited: Mutex::new(None),
            ports,
            nics: nic_configs,
            qemu: qemu && self.rt.qemu_processes.is_none(),
        });
        self.track(name, inst);
        let node = self.rt.node.name.clone();
        let now = Utc::now();
        self.status(name, |v| {
            v.status_mut().phase = VmPhase::Running;
            v.status_mut().node = Some(node.clone());
            v.status_mut().started_at = Some(now);
            if restart {
                v.status_mut().restarts += 1;
            }
            v.status_mut().message.clear();
            set_condition(
                &mut v.status_mut().conditions,
                "Ready",
                ConditionStatus::True,
                "Running",
                "",
            );
        })
        .await?;
        tracing::info!(vm = name, "VM started");
        let how = if qemu && self.rt.qemu_processes.is_some() {
            "in QEMU, in its own hci-vmm process"
        } else if qemu {
            "in its own QEMU process (it stops with the daemon)"
        } else if self.rt.vm_processes {
            "in its own hci-vmm process"
        } else {
            "in the daemon"
        };
        let message = if restart {
            format!("restarted on node {node} {how}")
        } else {
            format!("started on node {node} {how}")
        };
        self.rt.events.normal(KIND, name, "Started", message).await;
        Ok(None)
    }

    /// Keeps `inst` as VM `name` and reconciles the VM when it stops.
    fn track(&self, name: &str, inst: Arc<Instance>) {
        self.map().insert(name.to_string(), inst.clone());
        let kick = self.kick.clone();
        let vm_name = name.to_string();
        tokio::spawn(async move {
            let reason = inst
                .handle
                .wait()
                .await
                .unwrap_or_else(|e| ExitReason::VmmError(e.to_string()));
            tracing::info!(vm = vm_name, ?reason, "VM stopped");
            *inst.exited.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            *inst.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
            kick.now(&vm_name);
        });
    }

    /// After a daemon restart: finds a VM the hypervisor still runs and
    /// takes it over. True if it did.
    async fn try_adopt(&self, vm: &VirtualMachine) -> Result<bool> {
        // QEMU VMs run by the daemon itself died with it: nothing to adopt.
        if uses_qemu(vm) && self.rt.qemu_processes.is_none() {
            return Ok(false);
        }
        let Some(adopter) = self.rt.hypervisor.as_adopter() else {
            return Ok(false);
        };
        let name = vm.name();
        let handle = match adopter.adopt(name, &self.rt.run_dir.join(name)).await {
            Ok(Some(handle)) => Arc::<dyn VmHandle>::from(handle),
            Ok(None) => return Ok(false),
            Err(e) => {
                tracing::warn!(vm = name, error = %e, "cannot adopt; treating the VM as lost");
                return Ok(false);
            }
        };
        let paused = matches!(handle.state().await, Ok(VmState::Paused));
        let inst = Arc::new(Instance {
            uid: vm.metadata.uid,
            handle,
            cpus: vm.spec.cpus,
            memory: vm.spec.memory.0,
            exit: Mutex::new(None),
            stopping: AtomicBool::new(false),
            recorded: AtomicBool::new(false),
            started: Instant::now(),
            exited: Mutex::new(None),
            ports: vm
                .spec
                .nics
                .iter()
                .map(|n| (n.network.clone(), format!("{name}-{}", n.name)))
                .collect(),
            nics: vec![],
            qemu: false,
        });
        self.track(name, inst);
        let volumes: Vec<String> = vm.spec.disks.iter().map(|d| d.volume.clone()).collect();
        self.mark_volumes(&volumes, Some(name)).await?;
        tracing::info!(vm = name, "VM re-adopted");
        // The event first: whoever sees the status sees the event too.
        self.rt
            .events
            .normal(
                KIND,
                name,
                "Adopted",
                "still running after a daemon restart: taken over",
            )
            .await;
        self.status(name, |v| {
            let status = v.status_mut();
            status.phase = if paused {
                VmPhase::Paused
            } else {
                VmPhase::Running
            };
            status.message = "re-adopted after a daemon restart".into();
        })
        .await?;
        Ok(true)
    }

    async fn start_failed(&self, name: &str, e: &Error) -> Result<()> {
        let message = format!("cannot start: {e}");
        self.rt
            .events
            .warning(KIND, name, "StartFailed", &message)
            .await;
        self.status(name, |v| {
            let status = v.status_mut();
            status.phase = VmPhase::Failed;
            status.message = message.clone();
            set_condition(
                &mut status.conditions,
                "Ready",
                ConditionStatus::False,
                "StartFailed",
                &message,
            );
        })
        .await
    }

    /// Asks a running VM to stop; its exit is recorded when it comes.
    async fn stop(&self, name: &str, inst: &Arc<Instance>) -> Result<()> {
        if inst.stopping.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.status(name, |v| v.status_mut().phase = VmPhase::Stopping)
            .await?;
        let timeout = self.rt.stop_timeout;
        self.rt
            .events
            .normal(
                KIND,
                name,
                "Stopping",
                format!(
                    "asked the guest to shut down (Ctrl-Alt-Del); killing it after {timeout:?}"
                ),
            )
            .await;
        let handle = inst.handle.clone();
        let vm = name.to_string();
        let timeout = self.rt.stop_timeout;
        tokio::spawn(async move {
            if let Err(e) = handle.shutdown(timeout).await {
                tracing::warn!(vm, error = %e, "graceful stop failed; killing");
                if let Err(e) = handle.kill().await {
                    tracing::error!(vm, error = %e, "cannot kill");
                }
            }
        });
        Ok(())
    }

    /// Writes an instance's exit into the VM's status, once.
    async fn record_exit(
        &self,
        vm: &VirtualMachine,
        inst: &Instance,
        reason: &ExitReason,
    ) -> Result<()> {
        if inst.recorded.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let asked = inst.stopping.load(Ordering::SeqCst);
        let phase = phase_after(reason, vm.spec.run_strategy, asked);
        let message = describe(reason);
        match reason {
            ExitReason::Crashed(_) | ExitReason::VmmError(_) => {
                self.rt
                    .events
                    .warning(KIND, vm.name(), "Crashed", &message)
                    .await
            }
            _ => {
                self.rt
                    .events
                    .normal(KIND, vm.name(), "Stopped", &message)
                    .await
            }
        }
        let volumes: Vec<String> = vm.spec.disks.iter().map(|d| d.volume.clone()).collect();
        self.detach_ports(&inst.ports, &inst.nics).await;
        self.mark_volumes(&volumes, None).await?;
        self.status(vm.name(), |v| {
            v.status_mut().phase = phase;
            v.status_mut().message = message.clone();
            set_condition(
                &mut v.status_mut().conditions,
                "Ready",
                ConditionStatus::False,
                "Stopped",
                &message,
            );
        })
        .await
    }

    /// Carries out a requested power action, then clears it.
    async fn act(&self, vm: &VirtualMachine, action: &str) -> Result<Option<Duration>> {
        let name = vm.name();
        let inst = self.instance(name).filter(|i| i.alive());
        let mut again = None;
        match (action, &inst) {
            ("pause", Some(i)) => {
                i.handle.pause().await?;
                self.status(name, |v| v.status_mut().phase = VmPhase::Paused)
                    .await?;
            }
            ("resume", Some(i)) => {
                i.handle.resume().await?;
                self.status(name, |v| v.status_mut().phase = VmPhase::Running)
                    .await?;
            }
            ("stop", Some(i)) => self.stop(name, i).await?,
            ("restart", Some(i)) => {
                i.stopping.store(true, Ordering::SeqCst);
                i.handle.kill().await?;
                i.handle.wait().await?;
                self.map().remove(name);
                again = self.start(vm, true).await?;
            }
            ("start" | "restart", None) => again = self.start(vm, false).await?,
            ("start", Some(_)) | ("stop", None) => {}
            ("pause" | "resume", None) => {
                let message = format!("cannot {action}: the VM is not running");
                self.status(name, |v| v.status_mut().message = message.clone())
                    .await?;
            }
            (other, _) => {
                let message = format!("unknown requested action {other:?} ignored");
                self.status(name, |v| v.status_mut().message = message.clone())
                    .await?;
            }
        }
        let at = vm.metadata.annotations.get(REQUESTED_AT).cloned();
        let cleared = self
            .rt
            .resources
            .modify::<VirtualMachine, _>(name, None, |v| {
                let annotations = &mut v.metadata.annotations;
                if annotations.get(REQUESTED_AT) == at.as_ref() {
                    annotations.remove(REQUESTED_ACTION);
                    annotations.remove(REQUESTED_AT);
                }
                Ok(())
            })
            .await;
        match cleared {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(again),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl Reconcile for VmController {
    type Kind = VirtualMachine;

    async fn reconcile(
        &self,
        name: &str,
        current: Option<VirtualMachine>,
    ) -> Result<Option<Duration>> {
        let existing = self.instance(name);
        let Some(vm) = current else {
            let removed = self.map().remove(name);
            if let Some(inst) = removed
                && inst.alive()
            {
                inst.stopping.store(true, Ordering::SeqCst);
                inst.handle.kill().await?;
                self.detach_ports(&inst.ports, &inst.nics).await;
                tracing::info!(vm = name, "VM deleted: killed");
            }
            self.detach_all(name).await?;
            return Ok(None);
        };
        // A VM deleted and re-created under the same name is another VM.
        if let Some(inst) = &existing
            && inst.uid != vm.metadata.uid
        {
            self.map().remove(name);
            if inst.alive() {
                inst.stopping.store(true, Ordering::SeqCst);
                inst.handle.kill().await?;
            }
            return Ok(Some(Duration::ZERO));
        }
        if self.migrating().contains(name) {
            return Ok(None);
        }
        if self.rt.cluster.is_some() && migration::pending_here(&vm, &self.rt.node.name) {
            self.start_receiving(&vm);
            return Ok(None);
        }
        if !self.runs_here(&vm) {
            return self.not_here(name).await;
        }
        if migration::orphaned_here(&vm, &self.rt.node.name) {
            // The migration task was lost with a daemon restart; the VM
            // stayed (a cancelled stream leaves the source running).
            self.fail_migration(
                name,
                "interrupted: the source node's daemon restarted during the migration",
            )
            .await;
        }
        let was_running = matches!(
            vm.status_or_default().phase,
            VmPhase::Running | VmPhase::Paused | VmPhase::Starting | VmPhase::Stopping
        );
        if existing.is_none() && was_running && self.try_adopt(&vm).await? {
            return Ok(Some(Duration::ZERO));
        }
        if let Some(action) = vm.metadata.annotations.get(REQUESTED_ACTION).cloned() {
            return self.act(&vm, &action).await;
        }
        if let Some(to) = vm.metadata.annotations.get(MIGRATE_TO).cloned() {
            return self.start_migration(&vm, &to).await;
        }
        let strategy = vm.spec.run_strategy;
        match &existing {
            Some(inst) if inst.alive() => {
                if strategy == RunStrategy::Halted {
                    self.stop(name, inst).await?;
                }
                return Ok(None);
            }
            Some(inst) => {
                if let Some(reason) = inst.exit_reason() {
                    self.record_exit(&vm, inst, &reason).await?;
                }
            }
            None => {}
        }
        // Not running. Read the status again: recording the exit changed it.
        let vm: VirtualMachine = self.rt.resources.get(name).await?;
        let status = vm.status_or_default();
        let phase = status.phase;
        let lost = matches!(
            phase,
            VmPhase::Running | VmPhase::Paused | VmPhase::Starting | VmPhase::Stopping
        ) && existing.is_none();
        if lost {
            self.rt
                .events
                .warning(KIND, name, "Lost", lost_message(&vm))
                .await;
        }
        let run = match strategy {
            RunStrategy::Always => true,
            RunStrategy::RerunOnFailure => phase != VmPhase::Stopped,
            RunStrategy::Manual | RunStrategy::Halted => false,
        };
        if !run {
            if lost || (strategy == RunStrategy::Halted && phase != VmPhase::Stopped) {
                self.status(name, |v| {
                    v.status_mut().phase = VmPhase::Stopped;
                    if lost {
                        v.status_mut().message = lost_message(&vm);
                    }
                })
                .await?;
            }
            return Ok(None);
        }
        let restart = existing.is_some() || lost || status.started_at.is_some();
        let exited = existing
            .as_ref()
            .and_then(|i| *i.exited.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(inst) = &existing
            && let Some(exited) = exited
        {
            let ran = exited.saturating_duration_since(inst.started);
            if ran < STABLE_RUN {
                let delay = Duration::from_secs(2u64 << status.restarts.min(5))
                    .min(Duration::from_secs(60));
                if exited.elapsed() < delay {
                    let message = format!(
                        "restarting {}s after it stopped: it ran only {} ms (crash-loop backoff)",
                        delay.as_secs(),
                        ran.as_millis()
                    );
                    self.status(name, |v| v.status_mut().message = message.clone())
                        .await?;
                    return Ok(Some(delay - exited.elapsed()));
                }
            }
        }
        self.start(&vm, restart).await
    }

    async fn sweep(&self, existing: &BTreeSet<String>) -> Result<()> {
        let gone: Vec<String> = self
            .map()
            .keys()
            .filter(|n| !existing.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.kick.now(&name);
        }
        Ok(())
    }
}

#[async_trait]
impl ConsoleProvider for VmController {
    async fn open(&self, vm: &str) -> Result<Box<dyn ConsoleIo>> {
        let inst = self.instance(vm).ok_or_else(|| Error::Unavailable {
            what: format!(
                "the console of VM {vm:?} (it has not run on this node since the daemon started)"
            ),
            source: None,
        })?;
        let console = inst.handle.console().await?;
        Ok(Box::new(tokio::io::join(console.output, console.input)))
    }
}

/// Whether VM `vm` may start on volume `v`: ready, or degraded (still
/// usable), or rebuilding in `vm`'s own engine (a rebuild of a detached
/// volume runs in an engine the VM's would fence).
fn volume_usable(v: &Volume, vm: &str) -> bool {
    let st = v.status_or_default();
    match st.phase {
        VolumePhase::Detached | VolumePhase::Attached | VolumePhase::Degraded => true,
        VolumePhase::Rebuilding => st.attached_to.as_deref() == Some(vm),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_map_to_phases() {
        use RunStrategy::*;
        assert_eq!(
            phase_after(&ExitReason::Poweroff, Always, false),
            VmPhase::Stopped
        );
        assert_eq!(
            phase_after(&ExitReason::Reset, RerunOnFailure, false),
            VmPhase::Pending
        );
        assert_eq!(
            phase_after(&ExitReason::Reset, Manual, false),
            VmPhase::Stopped
        );
        assert_eq!(
            phase_after(&ExitReason::Reset, Always, true),
            VmPhase::Stopped
        );
        assert_eq!(
            phase_after(&ExitReason::Crashed("triple fault".into()), Manual, false),
            VmPhase::Failed
        );
        assert_eq!(
            phase_after(&ExitReason::VmmError("x".into()), Always, true),
            VmPhase::Stopped
        );
    }
}
