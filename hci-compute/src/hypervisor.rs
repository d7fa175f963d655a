//! The `kvm` backend of hci-core's [`Hypervisor`] trait.
//!
//! [`KvmHypervisor`] turns a [`VmConfig`] into a [`KvmVm`], which implements
//! [`VmHandle`] over the synchronous [`Vm`] manager (blocking steps run on
//! tokio's blocking pool).
//!
//! NICs become virtio-net devices on their TAP. A
//! [`NicConfig`](hci_core::compute::NicConfig) names the TAP (`tap`); the VMM
//! attaches to it by name in its own network namespace, unless the TAP's queue
//! descriptor was handed over first with [`KvmHypervisor::register_tap`]
//! (needed when the port's owner, e.g. hci-net's `LinuxBridgeBackend`, keeps
//! the single queue of the TAP attached, or when the TAP lives in another
//! namespace). Every VM also gets a virtio-rng entropy device unless
//! [`KvmHypervisor::with_entropy`] turns it off.
//!
//! Disks: an in-process [`BlockDevice`](hci_core::block::BlockDevice), or a
//! local or replicated volume, which this process opens itself as a
//! [`HandoverDisk`] so a live migration can hand it over.
//!
//! Not yet supported (refused with [`Error::Unsupported`] at `create`):
//! firmware boot, NBD and raw-file disk backends, non-virtio disk buses and
//! NIC models, multi-queue TAP descriptors, and cloud-init seeds.
//!
//! Graceful shutdown: [`VmHandle::shutdown`] presses Ctrl-Alt-Del on the
//! guest's i8042 keyboard (as Firecracker does; there is no ACPI), waits up
//! to the timeout for the guest to stop (a Linux guest reboots, which ends
//! the VM with [`ExitReason::Reset`]) and kills it after.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hci_core::compute::{
    BootSource, Console, DiskBackend, DiskBus, ExitReason, Hypervisor, HypervisorKind, NicModel,
    VmConfig, VmHandle, VmState, VmStats,
};
use hci_core::net::TapHandle;
use hci_core::{Error, Result};

use crate::console::ConsoleHub;
use crate::devices::virtio::block::Executor;
use crate::devices::virtio::net::TapSource;
use crate::handover::HandoverDisk;
use crate::memory::{self, MemoryBacking};
use crate::sys;
use crate::vm::{DiskSpec, NicSpec, Vm, VmSpec};

/// TAP queue descriptors handed over by interface name (e.g. from
/// `NetworkBackend::attach_port`, whose backend keeps the TAP's single queue
/// attached): a NIC whose `tap` names a registered TAP uses its descriptor
/// instead of attaching by name. Clones share the registry.
#[derive(Debug, Clone, Default)]
pub struct TapRegistry(Arc<Mutex<HashMap<String, Vec<Arc<OwnedFd>>>>>);

impl TapRegistry {
    /// Registers `tap`'s descriptors under its name (replacing earlier ones).
    pub fn register(&self, tap: &TapHandle) {
        self.lock().insert(tap.ifname.clone(), tap.fds.clone());
    }

    /// Forgets TAP `ifname` (running VMs keep their descriptors).
    pub fn unregister(&self, ifname: &str) {
        self.lock().remove(ifname);
    }

    /// The single queue descriptor registered for `ifname` for NIC `nic`:
    /// `None` when nothing is registered, an error for multi-queue TAPs.
    pub fn queue(&self, ifname: &str, nic: &str) -> Result<Option<Arc<OwnedFd>>> {
        match self.lock().get(ifname).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([fd]) => Ok(Some(Arc::clone(fd))),
            Some(fds) => Err(unsupported(&format!(
                "{} TAP queue descriptors for NIC {nic} (one queue per NIC)",
                fds.len(),
            ))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Arc<OwnedFd>>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// hci's own KVM VMM as a [`Hypervisor`].
#[derive(Debug, Clone)]
pub struct KvmHypervisor {
    entropy: bool,
    memory_backing: MemoryBacking,
    taps: TapRegistry,
    volume_control: bool,
}

impl Default for KvmHypervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl KvmHypervisor {
    /// The backend (nothing is opened until a VM is created).
    pub fn new() -> Self {
        KvmHypervisor {
            entropy: true,
            memory_backing: MemoryBacking::Anonymous,
            taps: TapRegistry::default(),
            volume_control: false,
        }
    }

    /// Whether local volumes ([`DiskBackend::Volume`]) this process opens
    /// serve `hci_storage::local::control` on their control socket while
    /// open, so other processes can snapshot them (off by default; `hci-vmm`
    /// turns it on).
    pub fn with_volume_control_sockets(mut self, on: bool) -> Self {
        self.volume_control = on;
        self
    }

    /// Opens (or, with `prepare`, prepares to take over in a live
    /// migration) the volumes of `config`'s [`DiskBackend::Volume`] and
    /// [`DiskBackend::Replicated`] disks as [`HandoverDisk`]s, replacing
    /// them with the opened devices (see [`crate::handover::open_config_disks`]).
    pub async fn open_disks(
        &self,
        config: &mut VmConfig,
        prepare: bool,
    ) -> Result<Vec<Arc<HandoverDisk>>> {
        crate::handover::open_config_disks(config, prepare, self.volume_control, true).await
    }

    /// What backs the guest RAM of VMs this creates (anonymous memory by
    /// default; see [`MemoryBacking`] for memfd, huge pages and files).
    pub fn with_memory_backing(mut self, backing: MemoryBacking) -> Self {
        self.memory_backing = backing;
        self
    }

    /// Whether VMs get a virtio-rng entropy device (on by default).
    pub fn with_entropy(mut self, entropy: bool) -> Self {
        self.entropy = entropy;
        self
    }

    /// Hands over the queue descriptors of a TAP (e.g. from
    /// `NetworkBackend::attach_port`): a NIC whose `tap` is `tap.ifname` then
    /// uses them (duplicated) instead of attaching by name. Replaces an
    /// earlier registration of the same name; shared by clones of `self`.
    pub fn register_tap(&self, tap: &TapHandle) {
        self.taps.register(tap);
    }

    /// Forgets the descriptors registered for TAP `ifname` (running VMs keep theirs).
    pub fn unregister_tap(&self, ifname: &str) {
        self.taps.unregister(ifname);
    }

    /// The TAP registry (shared with clones of `self`).
    pub fn taps(&self) -> &TapRegistry {
        &self.taps
    }

    /// What backs guest RAM of VMs this hypervisor creates.
    pub(crate) fn memory_backing(&self) -> &MemoryBacking {
        &self.memory_backing
    }

    /// Turns `config` into a [`VmSpec`] with this backend's settings and TAPs.
    pub fn spec(&self, config: VmConfig) -> Result<VmSpec> {
        let mut spec = spec_from_config(config)?;
        spec.entropy = self.entropy;
        spec.memory_backing = self.memory_backing.clone();
        for nic in &mut spec.nics {
            let TapSource::Name(ifname) = &nic.tap else {
                continue;
            };
            if let Some(fd) = self.taps.queue(ifname, &nic.name)? {
                nic.tap = TapSource::Fd(fd);
            }
        }
        Ok(spec)
    }

    /// Whether `/dev/kvm` can be opened here.
    pub fn available() -> bool {
        crate::kvm::System::open().is_ok()
    }

    /// Like [`Hypervisor::create`], returning the concrete handle.
    /// Volumes ([`DiskBackend::Volume`], [`DiskBackend::Replicated`]) are
    /// opened here as [`HandoverDisk`]s, so the VM can migrate with them.
    pub async fn create_vm(&self, mut config: VmConfig) -> Result<KvmVm> {
        let disks = self.open_disks(&mut config, false).await?;
        let built = match self.spec(config) {
            Ok(spec) => {
                let executor = Executor::current();
                blocking(move || Vm::new(spec, executor).map_err(Error::from)).await
            }
            Err(e) => Err(e),
        };
        match built {
            Ok(vm) => Ok(KvmVm::new(vm, disks)),
            Err(e) => {
                close_all(&disks).await;
                Err(e)
            }
        }
    }
}

fn unsupported(what: &str) -> Error {
    Error::unsupported(what, "the kvm hypervisor")
}

/// Checks a [`VmConfig`] and turns it into a [`VmSpec`] (NICs attach to
/// their TAP by name, entropy device on).
pub fn spec_from_config(config: VmConfig) -> Result<VmSpec> {
    if config.name.is_empty() {
        return Err(Error::invalid("vm name", "must not be empty"));
    }
    if config.cpus == 0 {
        return Err(Error::invalid("cpus", "must be at least 1"));
    }
    if config.memory == 0 {
        return Err(Error::invalid("memory", "must be greater than 0"));
    }
    if config.memory < memory::MIN_MEMORY {
        return Err(Error::invalid(
            "memory",
            format!("must be at least {} bytes", memory::MIN_MEMORY),
        ));
    }
    let BootSource::Kernel {
        kernel,
        initrd,
        cmdline,
    } = config.boot
    else {
        return Err(unsupported("firmware boot"));
    };
    if !kernel.is_file() {
        return Err(Error::invalid(
            "kernel",
            format!("{} is not a readable file", kernel.display()),
        ));
    }
    let mut nics: Vec<NicSpec> = Vec::new();
    for n in config.nics {
        if n.model != NicModel::Virtio {
            return Err(unsupported(&format!(
                "NIC model {:?} (NIC {})",
                n.model, n.name
            )));
        }
        if n.name.is_empty() || nics.iter().any(|o| o.name == n.name) {
            return Err(Error::invalid(
                "NIC name",
                format!("{:?} is empty or used twice", n.name),
            ));
        }
        if n.tap.is_empty() || n.tap.len() >= 16 || n.tap.contains(['/', '\0', ' ']) {
            return Err(Error::invalid(
                "NIC TAP",
                format!("{:?} (NIC {}) is not an interface name", n.tap, n.name),
            ));
        }
        if n.mac[0] & 1 != 0 || n.mac == [0; 6] {
            return Err(Error::invalid(
                "NIC MAC",
                format!("NIC {} needs a unicast MAC address", n.name),
            ));
        }
        if n.mtu != 0 && n.mtu < 68 {
            return Err(Error::invalid(
                "NIC MTU",
                format!("{} (NIC {}) is below 68", n.mtu, n.name),
            ));
        }
        nics.push(NicSpec {
            name: n.name,
            mac: n.mac,
            mtu: n.mtu,
            tap: TapSource::Name(n.tap),
        });
    }
    if config.cloud_init_seed.is_some() {
        return Err(unsupported("cloud-init seed images"));
    }
    let mut disks = Vec::new();
    for d in config.disks {
        if d.bus != DiskBus::Virtio {
            return Err(unsupported(&format!(
                "disk bus {:?} (disk {})",
                d.bus, d.name
            )));
        }
        let device = match d.backend {
            DiskBackend::Device(device) => device,
            DiskBackend::Volume { path, key_file } => {
                open_volume(&path, key_file.as_deref(), d.read_only)?
            }
            _ => {
                return Err(unsupported(&format!(
                    "disk {}: NBD exports and raw files (give an opened device or a volume)",
                    d.name
                )));
            }
        };
        disks.push(DiskSpec {
            name: d.name,
            device,
            read_only: d.read_only,
        });
    }
    let console_log: Option<PathBuf> = config
        .run_dir
        .is_dir()
        .then(|| config.run_dir.join("console.log"));
    Ok(VmSpec {
        name: config.name,
        cpus: config.cpus,
        memory: config.memory,
        kernel,
        initrd,
        cmdline,
        disks,
        nics,
        entropy: true,
        memory_backing: MemoryBacking::Anonymous,
        console_log,
    })
}

/// Opens the local hci-storage volume at `path` (decrypting with the key in
/// `key_file`) as a block device; the caller's process then owns it.
pub fn open_volume(
    path: &std::path::Path,
    key_file: Option<&std::path::Path>,
    read_only: bool,
) -> Result<Arc<dyn hci_core::block::BlockDevice>> {
    let replica = open_replica(path, key_file)?;
    Ok(Arc::new(hci_storage::local::ReplicaDevice::new(
        replica, read_only,
    )))
}

/// Opens (and locks) the local hci-storage volume at `path`, decrypting
/// with the key in `key_file`; refuses an encrypted volume without one.
pub fn open_replica(
    path: &std::path::Path,
    key_file: Option<&std::path::Path>,
) -> Result<Arc<hci_storage::local::Replica>> {
    let key = match key_file {
        Some(f) => Some(hci_core::volume::EncryptionKey::new(
            std::fs::read(f).map_err(|e| {
                Error::io(
                    format!(
                        "read the key file {} of volume {}",
                        f.display(),
                        path.display()
                    ),
                    e,
                )
            })?,
        )),
        None => None,
    };
    let replica = hci_storage::local::Replica::open(path, key.as_ref())?;
    if replica.is_encrypted() && key.is_none() {
        return Err(Error::invalid(
            format!("volume {}", path.display()),
            "is encrypted: give its key file",
        ));
    }
    Ok(replica)
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Backend {
            backend: "kvm",
            message: "a VMM task failed".into(),
            source: Some(Box::new(e)),
        })?
}

#[async_trait]
impl Hypervisor for KvmHypervisor {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Kvm
    }

    async fn create(&self, config: VmConfig) -> Result<Box<dyn VmHandle>> {
        Ok(Box::new(self.create_vm(config).await?))
    }

    fn as_restorer(&self) -> Option<&dyn hci_core::compute::RestoreVm> {
        Some(self)
    }

    fn as_migration_receiver(&self) -> Option<&dyn hci_core::compute::ReceiveMigration> {
        Some(self)
    }
}

/// Closes every disk (best effort).
pub(crate) async fn close_all(disks: &[Arc<HandoverDisk>]) {
    for d in disks {
        if let Err(e) = d.close().await {
            tracing::warn!(disk = d.name(), error = %e, "closing a disk");
        }
    }
}

/// A VM of the KVM VMM.
#[derive(Debug, Clone)]
pub struct KvmVm {
    vm: Vm,
    disks: Vec<Arc<HandoverDisk>>,
}

impl KvmVm {
    /// Wraps a VM manager and the volumes it owns.
    pub(crate) fn new(vm: Vm, disks: Vec<Arc<HandoverDisk>>) -> Self {
        KvmVm { vm, disks }
    }

    /// The volumes this VM opened itself (from [`DiskBackend::Volume`] and
    /// [`DiskBackend::Replicated`] disks): a live migration hands them over;
    /// close them ([`HandoverDisk::close`]) once the VM is gone.
    pub fn handover_disks(&self) -> &[Arc<HandoverDisk>] {
        &self.disks
    }

    /// The underlying VM manager (console hub, timings, vCPU usage).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The serial console hub (history, waiting for output).
    pub fn console_hub(&self) -> &std::sync::Arc<ConsoleHub> {
        self.vm.console()
    }

    /// Resident bytes of guest RAM (pages the guest or VMM touched).
    pub fn guest_rss_bytes(&self) -> u64 {
        sys::mapping_rss(&memory::host_ranges(self.vm.memory()))
    }
}

#[async_trait]
impl VmHandle for KvmVm {
    fn name(&self) -> &str {
        self.vm.name()
    }

    fn as_snapshottable(&self) -> Option<&dyn hci_core::compute::Snapshottable> {
        Some(self)
    }

    fn as_migratable(&self) -> Option<&dyn hci_core::compute::Migratable> {
        Some(self)
    }

    async fn start(&self) -> Result<()> {
        let vm = self.vm.clone();
        blocking(move || vm.start().map_err(Error::from)).await
    }

    async fn pause(&self) -> Result<()> {
        let vm = self.vm.clone();
        blocking(move || vm.pause().map_err(Error::from)).await
    }

    async fn resume(&self) -> Result<()> {
        let vm = self.vm.clone();
        blocking(move || vm.resume().map_err(Error::from)).await
    }

    async fn shutdown(&self, timeout: Duration) -> Result<ExitReason> {
        // Ask through the keyboard (a paused or stopped VM cannot be asked;
        // a full keyboard buffer means the guest is not listening), then
        // give the guest `timeout` to stop.
        if self.vm.state() == VmState::Running
            && let Err(e) = self.vm.send_ctrl_alt_del()
        {
            tracing::info!(vm = %self.vm.name(), error = %e, "cannot ask the guest to shut down");
        }
        if let Ok(reason) = tokio::time::timeout(timeout, self.wait()).await {
            return reason;
        }
        self.kill().await?;
        self.wait().await
    }

    async fn kill(&self) -> Result<()> {
        let vm = self.vm.clone();
        blocking(move || {
            vm.kill();
            Ok(())
        })
        .await
    }

    async fn state(&self) -> Result<VmState> {
        Ok(self.vm.state())
    }

    async fn wait(&self) -> Result<ExitReason> {
        let mut rx = self.vm.subscribe();
        let state = rx
            .wait_for(|s| matches!(s, VmState::Stopped(_)))
            .await
            .map_err(|_| Error::Backend {
                backend: "kvm",
                message: "the VM vanished".into(),
                source: None,
            })?;
        match &*state {
            VmState::Stopped(r) => Ok(r.clone()),
            _ => Err(Error::Backend {
                backend: "kvm",
                message: "unexpected VM state".into(),
                source: None,
            }),
        }
    }

    async fn console(&self) -> Result<Console> {
        let (output, input) = self.vm.console().subscribe();
        Ok(Console {
            output: Box::pin(output),
            input: Box::pin(input),
        })
    }

    async fn stats(&self) -> Result<VmStats> {
        let (cpu_time, _exits) = self.vm.vcpu_usage();
        let disks = self
            .vm
            .disk_counters()
            .iter()
            .map(|(name, c)| {
                (
                    name.clone(),
                    c.read_bytes.load(Ordering::Relaxed),
                    c.write_bytes.load(Ordering::Relaxed),
                )
            })
            .collect();
        Ok(VmStats {
            uptime: self
                .vm
                .started_at()
                .map(|t| t.elapsed())
                .unwrap_or_default(),
            cpu_time,
            rss_bytes: sys::process_rss(),
            memory_bytes: self.vm.memory_size(),
            disks,
            nics: self
                .vm
                .nic_counters()
                .iter()
                .map(|(name, c)| {
                    (
                        name.clone(),
                        c.rx_bytes.load(Ordering::Relaxed),
                        c.tx_bytes.load(Ordering::Relaxed),
                    )
                })
                .collect(),
        })
    }
}
