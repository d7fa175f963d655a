//! The compute contract: hypervisors that run virtual machines.
//!
//! A [`Hypervisor`] turns a resolved [`VmConfig`] (volumes already opened,
//! TAP devices already created) into a [`VmHandle`]. Abilities that not every
//! backend has are separate traits — [`Snapshottable`] and [`Migratable`] on a
//! VM, [`RestoreVm`] and [`ReceiveMigration`] on a hypervisor — so a backend
//! either implements them or does not; nothing fails at run time with
//! "not implemented". A handle advertises them through
//! [`VmHandle::as_snapshottable`] / [`VmHandle::as_migratable`].

use std::fmt::{self, Debug};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::block::BlockDevice;
use crate::error::Result;

/// How the guest starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootSource {
    /// Direct kernel boot: Linux bzImage or a PVH ELF (vmlinux, test guests).
    Kernel {
        /// Kernel image.
        kernel: PathBuf,
        /// Optional initrd.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
    /// Firmware (BIOS/UEFI) booting from the disks by boot order.
    Firmware {
        /// Use UEFI rather than BIOS.
        uefi: bool,
    },
}

/// Where a disk's data comes from. Serializable (to hand a configuration to
/// a VMM process) except [`DiskBackend::Device`], which lives in one process.
#[derive(Clone, Serialize, Deserialize)]
pub enum DiskBackend {
    /// An opened block device (local or replicated volume), served in-process.
    #[serde(skip)]
    Device(Arc<dyn BlockDevice>),
    /// An NBD export (`nbd+unix:///export?socket=/path` or `nbd://host:port/export`).
    Nbd(String),
    /// A raw file or ISO on the host.
    File(PathBuf),
    /// A local hci-storage volume directory, opened by whoever runs the VM
    /// (the hypervisor in-process, or a VMM process), with the file holding
    /// its encryption key when it is encrypted.
    Volume {
        /// The volume's directory.
        path: PathBuf,
        /// Its key file, for an encrypted volume.
        key_file: Option<PathBuf>,
    },
    /// A replicated hci-storage volume, opened by whoever runs the VM: an
    /// engine over the replica servers that hold its replicas.
    Replicated {
        /// The volume's name on the replica servers.
        volume: String,
        /// The replica servers holding it (`HOST:PORT`).
        replicas: Vec<String>,
        /// File holding the replica servers' token.
        token_file: PathBuf,
        /// Its key file, for an encrypted volume.
        key_file: Option<PathBuf>,
        /// Unix socket on which the engine's owner answers status and
        /// replica add/remove requests (`hci_storage::control`).
        control: Option<PathBuf>,
    },
}

impl Debug for DiskBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskBackend::Device(d) => f.debug_tuple("Device").field(&d.size()).finish(),
            DiskBackend::Nbd(u) => f.debug_tuple("Nbd").field(u).finish(),
            DiskBackend::File(p) => f.debug_tuple("File").field(p).finish(),
            DiskBackend::Volume { path, key_file } => f
                .debug_struct("Volume")
                .field("path", path)
                .field("encrypted", &key_file.is_some())
                .finish(),
            DiskBackend::Replicated {
                volume,
                replicas,
                key_file,
                ..
            } => f
                .debug_struct("Replicated")
                .field("volume", volume)
                .field("replicas", replicas)
                .field("encrypted", &key_file.is_some())
                .finish(),
        }
    }
}

/// Bus a disk is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DiskBus {
    /// virtio-blk.
    #[default]
    Virtio,
    /// SATA (AHCI) — QEMU backend only.
    Sata,
    /// SCSI (virtio-scsi) — QEMU backend only.
    Scsi,
    /// CD-ROM — QEMU backend only.
    Cdrom,
}

/// One disk of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Disk name (unique in the VM), e.g. `root`.
    pub name: String,
    /// Data source.
    pub backend: DiskBackend,
    /// Bus.
    pub bus: DiskBus,
    /// Guest sees the disk as read-only.
    pub read_only: bool,
    /// Firmware boot order (1 = first), if bootable.
    pub boot_order: Option<u32>,
}

/// NIC device model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum NicModel {
    /// virtio-net.
    #[default]
    Virtio,
    /// Emulated Intel e1000 — QEMU backend only.
    E1000,
}

/// One NIC of a VM, backed by a host TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    /// NIC name (unique in the VM).
    pub name: String,
    /// Host TAP interface name.
    pub tap: String,
    /// Guest MAC address.
    pub mac: [u8; 6],
    /// Device model.
    pub model: NicModel,
    /// MTU the guest should use.
    pub mtu: u16,
}

/// A fully resolved VM configuration, ready for a hypervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    /// VM name (a DNS-1123 label).
    pub name: String,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Boot method.
    pub boot: BootSource,
    /// Disks in attachment order.
    pub disks: Vec<DiskConfig>,
    /// NICs in attachment order.
    pub nics: Vec<NicConfig>,
    /// A read-only cloud-init (NoCloud `cidata`) seed image, if any.
    pub cloud_init_seed: Option<PathBuf>,
    /// Working directory for the VM's runtime files (sockets, logs).
    pub run_dir: PathBuf,
}

/// Which backend a hypervisor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HypervisorKind {
    /// hci's own KVM VMM.
    Kvm,
    /// QEMU driven over QMP.
    Qemu,
}

/// Runtime state of a VM as its hypervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// Created, not yet started.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs paused; state retained.
    Paused,
    /// The guest is gone.
    Stopped(ExitReason),
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off.
    Poweroff,
    /// The guest asked for a reset/reboot.
    Reset,
    /// Stopped by [`VmHandle::kill`] or a host signal.
    Killed,
    /// The guest crashed (triple fault, internal error), with a description.
    Crashed(String),
    /// The VMM failed, with a description.
    VmmError(String),
}

/// Resource usage of a running VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmStats {
    /// Time the VM has existed.
    pub uptime: Duration,
    /// Total guest CPU time across vCPUs.
    pub cpu_time: Duration,
    /// Resident memory of the VMM process, bytes.
    pub rss_bytes: u64,
    /// Guest memory size, bytes.
    pub memory_bytes: u64,
    /// Per-disk (name, bytes read, bytes written).
    pub disks: Vec<(String, u64, u64)>,
    /// Per-NIC (name, bytes received, bytes sent).
    pub nics: Vec<(String, u64, u64)>,
}

/// A bidirectional serial console.
pub struct Console {
    /// Guest output.
    pub output: Pin<Box<dyn AsyncRead + Send>>,
    /// Guest input.
    pub input: Pin<Box<dyn AsyncWrite + Send>>,
}

impl Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

/// A hypervisor backend.
#[async_trait]
pub trait Hypervisor: Send + Sync + Debug {
    /// Which backend this is.
    fn kind(&self) -> HypervisorKind;

    /// Creates a VM (not yet running) from a resolved configuration.
    async fn create(&self, config: VmConfig) -> Result<Box<dyn VmHandle>>;

    /// This backend's ability to find its VMs again after the caller
    /// restarted, if it has one (VMs in their own processes do; VMs inside
    /// the caller's process die with it).
    fn as_adopter(&self) -> Option<&dyn Adopt> {
        None
    }

    /// This backend's ability to restore VMs saved by
    /// [`Snapshottable::save`], if it has one.
    fn as_restorer(&self) -> Option<&dyn RestoreVm> {
        None
    }

    /// This backend's ability to receive live migrations, if it has one.
    fn as_migration_receiver(&self) -> Option<&dyn ReceiveMigration> {
        None
    }
}

/// Finds VMs started earlier, by this or a previous process, so a daemon can
/// restart without touching its guests.
#[async_trait]
pub trait Adopt: Send + Sync {
    /// Reconnects to VM `name`, created with `run_dir` as its
    /// [`VmConfig::run_dir`]. `Ok(None)` if it no longer runs.
    async fn adopt(&self, name: &str, run_dir: &Path) -> Result<Option<Box<dyn VmHandle>>>;
}

/// A VM managed by a hypervisor.
#[async_trait]
pub trait VmHandle: Send + Sync + Debug {
    /// The VM's name.
    fn name(&self) -> &str;

    /// Starts (boots) the VM.
    async fn start(&self) -> Result<()>;

    /// Pauses every vCPU.
    async fn pause(&self) -> Result<()>;

    /// Resumes paused vCPUs.
    async fn resume(&self) -> Result<()>;

    /// Asks the guest to power off (ACPI) and waits up to `timeout`; kills it after.
    async fn shutdown(&self, timeout: Duration) -> Result<ExitReason>;

    /// Stops the VM at once.
    async fn kill(&self) -> Result<()>;

    /// Current state.
    async fn state(&self) -> Result<VmState>;

    /// Waits until the VM stops.
    async fn wait(&self) -> Result<ExitReason>;

    /// Attaches to the serial console. Output starts with recent history.
    async fn console(&self) -> Result<Console>;

    /// Resource usage.
    async fn stats(&self) -> Result<VmStats>;

    /// This VM's snapshot ability, if the backend has one.
    fn as_snapshottable(&self) -> Option<&dyn Snapshottable> {
        None
    }

    /// This VM's live-migration ability, if the backend has one.
    fn as_migratable(&self) -> Option<&dyn Migratable> {
        None
    }
}

/// Saving a paused VM's complete state to a file.
#[async_trait]
pub trait Snapshottable: Send + Sync {
    /// Writes vCPU, device and memory state to `path` (the VM must be paused).
    async fn save(&self, path: &Path) -> Result<()>;
}

/// Restoring a VM saved by [`Snapshottable::save`].
#[async_trait]
pub trait RestoreVm: Send + Sync {
    /// Creates a paused VM from `config` (same shape as when saved) and the state in `path`.
    async fn restore(&self, config: VmConfig, path: &Path) -> Result<Box<dyn VmHandle>>;
}

/// Options for a live migration.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    /// Largest acceptable pause of the guest.
    pub max_downtime: Duration,
    /// Give up (source keeps running) after this long.
    pub timeout: Duration,
    /// Shared secret the target checks.
    pub token: String,
    /// Stops the migration if it arrives before the switch-over: the VM
    /// keeps running on the source and `migrate` returns
    /// [`Error::Cancelled`](crate::Error::Cancelled). Once the switch-over
    /// has begun (the source paused the guest for the last pass) a cancel
    /// has no effect and the migration completes, so the caller always
    /// learns where the guest runs from the result. Dropping the `migrate`
    /// future also cancels, without that answer.
    pub cancel: crate::CancelToken,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            max_downtime: Duration::from_millis(50),
            timeout: Duration::from_secs(600),
            token: String::new(),
            cancel: crate::CancelToken::new(),
        }
    }
}

/// Progress of a live migration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationProgress {
    /// Pre-copy pass number (1 = the full pass).
    pub iteration: u32,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Dirty bytes still to send.
    pub bytes_remaining: u64,
    /// Current dirty rate, bytes/s.
    pub dirty_rate: f64,
    /// Measured downtime once finished.
    pub downtime: Option<Duration>,
}

/// Moving a running VM to another VMM.
#[async_trait]
pub trait Migratable: Send + Sync {
    /// Migrates to the VMM listening at `target` (`host:port`), reporting progress.
    /// On error or cancel the source keeps running.
    async fn migrate(
        &self,
        target: &str,
        options: MigrationOptions,
        progress: watch::Sender<MigrationProgress>,
    ) -> Result<MigrationProgress>;
}

/// Receiving a live migration.
#[async_trait]
pub trait ReceiveMigration: Send + Sync {
    /// Listens on `listen` (`host:port`) for one incoming migration of a VM shaped
    /// like `config`; returns the running VM once switched over.
    async fn receive(
        &self,
        config: VmConfig,
        listen: &str,
        token: &str,
    ) -> Result<Box<dyn VmHandle>>;
}
