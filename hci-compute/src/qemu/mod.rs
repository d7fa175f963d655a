//! The `qemu` backend of hci-core's [`Hypervisor`]: one `qemu-system-x86_64`
//! process per VM, driven over QMP.
//!
//! For what hci's own VMM does not do: any guest OS from a disk image or ISO
//! with firmware (SeaBIOS, or OVMF for UEFI where installed), and real Linux
//! guests on hosts whose KVM is paravirtual (`kvm_pvm`, where guest kernel
//! code is emulated one instruction at a time): there QEMU runs under TCG.
//!
//! - [`QemuHypervisor::create`] checks the [`VmConfig`], serves the VM's
//!   in-process disks (opened [`BlockDevice`](hci_core::block::BlockDevice)s,
//!   replicated volumes included, and local volume directories) from an
//!   hci-storage NBD server on a unix socket in the run directory, spawns
//!   QEMU paused (`-S`) with a generated command line ([`cmdline`]),
//!   connects to QMP ([`qmp`]) and the serial console, and returns a
//!   [`QemuVm`]. Bad options and missing files fail here with QEMU's own
//!   message.
//! - [`QemuVm`]: start (`cont`), pause/resume (`stop`/`cont`), graceful
//!   shutdown (`system_powerdown`, then kill after the timeout), kill,
//!   console (history + live), exit reasons from the QMP `SHUTDOWN` event
//!   and the process's exit; a QEMU that crashes or is killed by someone
//!   else ends the VM with [`ExitReason::VmmError`](hci_core::compute::ExitReason::VmmError) carrying its log tail.
//! - [`seed`]: cloud-init NoCloud `cidata` seed images (vfat), written in Rust.
//! - Live migration: [`QemuVm`] is
//!   [`Migratable`](hci_core::compute::Migratable) (QMP `migrate`) and
//!   [`QemuHypervisor`] is [`ReceiveMigration`](hci_core::compute::ReceiveMigration)
//!   (a QEMU started with `-incoming`; see [`QemuHypervisor::prepare_incoming`]).
//!   The stream is not authenticated and disks are not moved.
//!
//! NICs: a [`NicConfig`](hci_core::compute::NicConfig)'s TAP is attached by
//! name, or through its queue descriptor when one was registered with
//! [`QemuHypervisor::register_tap`] (hci-net's `LinuxBridgeBackend` keeps
//! the single queue of the TAPs it creates): QEMU inherits it (`fd=N`).
//!
//! QEMU processes die with the handle: dropping the last [`QemuVm`] clone
//! kills it, and so does the death of the thread that spawned it
//! (`PR_SET_PDEATHSIG`), so a crashed test or daemon never leaves a guest
//! spinning. For VMs that outlive their caller and are adopted again, run
//! this backend inside `hci-vmm` processes:
//! [`ProcessHypervisor::with_qemu`](crate::process::ProcessHypervisor::with_qemu).

pub mod cmdline;
mod migrate;
pub mod qmp;
mod replicated;
pub mod seed;
mod vm;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use hci_core::compute::{
    BootSource, DiskBackend, DiskBus, Hypervisor, HypervisorKind, VmConfig, VmHandle,
};
use hci_core::net::TapHandle;
use hci_core::{Error, Result};

use crate::hypervisor::{TapRegistry, open_volume};
pub use cmdline::Accel;
use cmdline::{Boot, DiskArg, DiskSource, LaunchSpec, NicArg, TapArg};
pub use vm::QemuVm;

/// The QEMU binary looked up on `PATH` by default.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";

/// Where OVMF is looked for (Debian's `ovmf` package), code and variables.
pub const OVMF_CANDIDATES: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
];

/// Smallest guest RAM accepted, bytes.
pub const MIN_MEMORY: u64 = 16 << 20;

/// Whether the host's KVM is the paravirtual `kvm_pvm` (guest CPL0 code emulated).
pub fn kvm_is_paravirtual() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The acceleration to use here: KVM when `/dev/kvm` opens and is not
/// `kvm_pvm`, TCG otherwise.
pub fn detect_accel() -> Accel {
    let kvm_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm_usable && !kvm_is_paravirtual() {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// QEMU as a [`Hypervisor`].
///
/// ```no_run
/// # async fn demo() -> hci_core::Result<()> {
/// use hci_compute::qemu::QemuHypervisor;
/// use hci_core::compute::{BootSource, Hypervisor, VmConfig};
///
/// let vm = QemuHypervisor::new()
///     .create(VmConfig {
///         name: "linux".into(),
///         cpus: 1,
///         memory: 512 << 20,
///         boot: BootSource::Kernel {
///             kernel: "/boot/vmlinuz".into(),
///             initrd: Some("/boot/initrd.img".into()),
///             cmdline: "console=ttyS0".into(),
///         },
///         disks: vec![],
///         nics: vec![],
///         cloud_init_seed: None,
///         run_dir: "/run/hci/linux".into(),
///     })
///     .await?;
/// vm.start().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct QemuHypervisor {
    options: QemuOptions,
    taps: TapRegistry,
    volume_control: bool,
}

/// A [`QemuHypervisor`]'s settings, serializable: a VMM process running a
/// QEMU VM ([`ProcessHypervisor::with_qemu`](crate::process::ProcessHypervisor::with_qemu))
/// gets them from its parent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QemuOptions {
    /// The QEMU binary (a path, or a name looked up on `PATH`).
    pub binary: PathBuf,
    /// Forced acceleration; detected per VM when `None`.
    pub accel: Option<Accel>,
    /// Appended to every VM's command line.
    pub extra_args: Vec<String>,
    /// OVMF (code, variables) pairs looked for, in order.
    pub ovmf: Vec<(PathBuf, PathBuf)>,
}

impl Default for QemuOptions {
    fn default() -> Self {
        QemuOptions {
            binary: DEFAULT_BINARY.into(),
            accel: None,
            extra_args: Vec::new(),
            ovmf: OVMF_CANDIDATES
                .iter()
                .map(|(c, v)| (PathBuf::from(c), PathBuf::from(v)))
                .collect(),
        }
    }
}

impl Default for QemuHypervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl QemuHypervisor {
    /// `qemu-system-x86_64` from `PATH`, acceleration detected per VM.
    pub fn new() -> Self {
        Self::from_options(QemuOptions::default())
    }

    /// A hypervisor with these settings.
    pub fn from_options(options: QemuOptions) -> Self {
        QemuHypervisor {
            options,
            taps: TapRegistry::default(),
            volume_control: false,
        }
    }

    /// Its settings.
    pub fn options(&self) -> &QemuOptions {
        &self.options
    }

    /// Uses the QEMU binary at `path` (or a name looked up on `PATH`).
    pub fn with_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.options.binary = path.into();
        self
    }

    /// Forces an acceleration instead of detecting it ([`detect_accel`]).
    pub fn with_accel(mut self, accel: Accel) -> Self {
        self.options.accel = Some(accel);
        self
    }

    /// Appends `args` to every VM's command line (expert use).
    pub fn with_extra_args(mut self, args: Vec<String>) -> Self {
        self.options.extra_args = args;
        self
    }

    /// Looks for OVMF (UEFI) firmware as these (code, variables) pairs, in order.
    pub fn with_ovmf(mut self, candidates: Vec<(PathBuf, PathBuf)>) -> Self {
        self.options.ovmf = candidates;
        self
    }

    /// Whether local volumes ([`DiskBackend::Volume`]) serve
    /// `hci_storage::local::control` on their control socket while a VM has
    /// them open, so other processes can snapshot, grow or back them up
    /// (off by default; `hci-vmm` turns it on). They are then closed
    /// cleanly when the VM's QEMU is gone.
    pub fn with_volume_control_sockets(mut self, on: bool) -> Self {
        self.volume_control = on;
        self
    }

    /// The TAP registry (shared with clones of `self`).
    pub fn taps(&self) -> &TapRegistry {
        &self.taps
    }

    /// Hands over the queue descriptors of a TAP (e.g. from
    /// `NetworkBackend::attach_port`): a NIC on `tap.ifname` then passes it
    /// to QEMU instead of attaching by name.
    pub fn register_tap(&self, tap: &TapHandle) {
        self.taps.register(tap);
    }

    /// Forgets TAP `ifname` (running VMs keep theirs).
    pub fn unregister_tap(&self, ifname: &str) {
        self.taps.unregister(ifname);
    }

    /// The acceleration VMs get.
    pub fn accel(&self) -> Accel {
        self.options.accel.unwrap_or_else(detect_accel)
    }

    /// The QEMU binary, resolved on `PATH`; a clear error when absent.
    pub fn resolve_binary(&self) -> Result<PathBuf> {
        let binary = &self.options.binary;
        if binary.components().count() > 1 {
            return if binary.is_file() {
                Ok(binary.clone())
            } else {
                Err(missing_qemu(&binary.display().to_string()))
            };
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(binary))
            .find(|p| p.is_file())
            .ok_or_else(|| missing_qemu(&binary.display().to_string()))
    }

    fn find_ovmf(&self) -> Result<(PathBuf, PathBuf)> {
        self.options
            .ovmf
            .iter()
            .find(|(c, v)| c.is_file() && v.is_file())
            .cloned()
            .ok_or_else(|| Error::Unavailable {
                what: format!(
                    "UEFI firmware OVMF (none of {} exists: install the Debian package ovmf, or boot with BIOS)",
                    self.options
                        .ovmf
                        .iter()
                        .map(|(c, _)| c.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                source: None,
            })
    }

    /// Like [`Hypervisor::create`], returning the concrete handle.
    pub async fn create_vm(&self, config: VmConfig) -> Result<QemuVm> {
        self.launch(config, self.options.extra_args.clone(), false)
            .await
    }

    /// Opens replicated volumes, checks the config and starts QEMU with `extra`.
    async fn launch(
        &self,
        mut config: VmConfig,
        extra: Vec<String>,
        incoming: bool,
    ) -> Result<QemuVm> {
        let binary = self.resolve_binary()?;
        if incoming
            && let Some(d) = config
                .disks
                .iter()
                .find(|d| matches!(d.backend, DiskBackend::Volume { .. }))
        {
            return Err(Error::unsupported(
                format!(
                    "live migration of a QEMU VM with the local volume of disk {} (only replicated volumes are handed over)",
                    d.name
                ),
                "the qemu hypervisor",
            ));
        }
        let engines = replicated::open_all(&mut config, incoming, self.volume_control).await?;
        let plan = match self.plan(&config) {
            Ok(p) => p,
            Err(e) => {
                engines.close().await;
                return Err(e);
            }
        };
        vm::launch(binary, plan, self.accel(), extra, engines).await
    }

    /// Checks `config` and resolves it into what [`vm::launch`] needs.
    fn plan(&self, config: &VmConfig) -> Result<Plan> {
        if config.name.is_empty() {
            return Err(Error::invalid("vm name", "must not be empty"));
        }
        if config.cpus == 0 {
            return Err(Error::invalid("cpus", "must be at least 1"));
        }
        if config.cpus > 255 {
            return Err(Error::invalid("cpus", "must be at most 255"));
        }
        if config.memory < MIN_MEMORY {
            return Err(Error::invalid(
                "memory",
                format!("must be at least {MIN_MEMORY} bytes"),
            ));
        }
        if !config.memory.is_multiple_of(1 << 20) {
            return Err(Error::invalid("memory", "must be a whole number of MiB"));
        }
        if !config.run_dir.is_dir() {
            return Err(Error::invalid(
                "run_dir",
                format!("{} is not a directory", config.run_dir.display()),
            ));
        }
        // Unix socket paths are limited to 107 bytes.
        let longest = config.run_dir.join("console.sock");
        if longest.as_os_str().len() > 100 {
            return Err(Error::invalid(
                "run_dir",
                format!(
                    "{} is too long for unix socket paths (at most 88 bytes)",
                    config.run_dir.display()
                ),
            ));
        }
        let boot = match &config.boot {
            BootSource::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                readable("kernel", kernel)?;
                if let Some(i) = initrd {
                    readable("initrd", i)?;
                }
                Boot::Kernel {
                    kernel: kernel.clone(),
                    initrd: initrd.clone(),
                    cmdline: cmdline.clone(),
                }
            }
            BootSource::Firmware { uefi: false } => Boot::Bios,
            BootSource::Firmware { uefi: true } => {
                let (code, vars_template) = self.find_ovmf()?;
                let vars = config.run_dir.join("OVMF_VARS.fd");
                if !vars.exists() {
                    std::fs::copy(&vars_template, &vars).map_err(|e| {
                        Error::io(
                            format!("copy {} to {}", vars_template.display(), vars.display()),
                            e,
                        )
                    })?;
                }
                Boot::Uefi { code, vars }
            }
        };
        let nbd_socket = config.run_dir.join("nbd.sock");
        let mut exports = Vec::new();
        let mut disks = Vec::new();
        for d in &config.disks {
            if d.name.is_empty() || disks.iter().any(|o: &DiskArg| o.name == d.name) {
                return Err(Error::invalid(
                    "disk name",
                    format!("{:?} is empty or used twice", d.name),
                ));
            }
            if d.bus == DiskBus::Cdrom && !d.read_only {
                return Err(Error::invalid(
                    "disk",
                    format!("CD-ROM {} must be read-only", d.name),
                ));
            }
            if d.bus == DiskBus::Sata && d.read_only {
                return Err(Error::invalid(
                    "disk",
                    format!(
                        "SATA disk {} cannot be read-only in QEMU (use virtio, SCSI or a CD-ROM)",
                        d.name
                    ),
                ));
            }
            let source = match &d.backend {
                DiskBackend::Device(dev) => {
                    exports.push((d.name.clone(), dev.clone(), d.read_only));
                    DiskSource::NbdUnix {
                        socket: nbd_socket.clone(),
                        export: d.name.clone(),
                    }
                }
                DiskBackend::Volume { path, key_file } => {
                    let dev = open_volume(path, key_file.as_deref(), d.read_only)?;
                    exports.push((d.name.clone(), dev, d.read_only));
                    DiskSource::NbdUnix {
                        socket: nbd_socket.clone(),
                        export: d.name.clone(),
                    }
                }
                DiskBackend::Nbd(uri) => parse_nbd_uri(uri)?,
                DiskBackend::Replicated { .. } => {
                    // `replicated::open_all` turned these into devices.
                    return Err(Error::invalid(
                        "disk",
                        format!("replicated disk {} was not opened", d.name),
                    ));
                }
                DiskBackend::File(path) => {
                    readable(&format!("disk {}", d.name), path)?;
                    DiskSource::File(path.clone())
                }
            };
            disks.push(DiskArg {
                name: d.name.clone(),
                source,
                bus: d.bus,
                read_only: d.read_only,
                boot_order: d.boot_order,
                serial: Some(d.name.chars().take(20).collect()),
            });
        }
        if let Some(seed) = &config.cloud_init_seed {
            readable("cloud-init seed", seed)?;
            disks.push(DiskArg {
                name: "cidata".into(),
                source: DiskSource::File(seed.clone()),
                bus: DiskBus::Virtio,
                read_only: true,
                boot_order: None,
                serial: Some("cidata".into()),
            });
        }
        let mut nics = Vec::new();
        let mut fds = Vec::new();
        for n in &config.nics {
            if n.name.is_empty() || nics.iter().any(|o: &NicArg| o.name == n.name) {
                return Err(Error::invalid(
                    "NIC name",
                    format!("{:?} is empty or used twice", n.name),
                ));
            }
            if n.tap.is_empty() || n.tap.len() >= 16 || n.tap.contains(['/', '\0', ' ', ',']) {
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
            let tap = match self.taps.queue(&n.tap, &n.name)? {
                Some(fd) => {
                    let raw = fd.as_raw_fd();
                    fds.push(fd);
                    TapArg::Fd(raw)
                }
                None => TapArg::Name(n.tap.clone()),
            };
            nics.push(NicArg {
                name: n.name.clone(),
                tap,
                mac: n.mac,
                model: n.model,
                mtu: n.mtu,
            });
        }
        Ok(Plan {
            spec: LaunchSpec {
                name: config.name.clone(),
                cpus: config.cpus,
                memory_mib: config.memory >> 20,
                accel: Accel::Tcg, // set by launch
                boot,
                disks,
                nics,
                qmp_socket: config.run_dir.join("qmp.sock"),
                console_socket: config.run_dir.join("console.sock"),
                extra: Vec::new(),
            },
            exports,
            nbd_socket,
            fds,
            run_dir: config.run_dir.clone(),
            memory: config.memory,
            nic_taps: config
                .nics
                .iter()
                .map(|n| (n.name.clone(), n.tap.clone()))
                .collect(),
        })
    }
}

/// A checked configuration: the command line to be, the devices to serve
/// over NBD and the descriptors QEMU inherits.
struct Plan {
    spec: LaunchSpec,
    exports: Vec<(String, Arc<dyn hci_core::block::BlockDevice>, bool)>,
    nbd_socket: PathBuf,
    fds: Vec<Arc<OwnedFd>>,
    run_dir: PathBuf,
    memory: u64,
    nic_taps: Vec<(String, String)>,
}

fn missing_qemu(what: &str) -> Error {
    Error::Unavailable {
        what: format!("QEMU binary {what} (install the Debian package qemu-system-x86)"),
        source: None,
    }
}

fn readable(what: &str, path: &Path) -> Result<()> {
    if path.is_file() || path.metadata().is_ok_and(|m| !m.is_dir()) {
        Ok(())
    } else {
        Err(Error::invalid(
            what,
            format!("{} is not a readable file", path.display()),
        ))
    }
}

/// Parses `nbd+unix:///EXPORT?socket=PATH` and `nbd://HOST[:PORT]/EXPORT`.
pub fn parse_nbd_uri(uri: &str) -> Result<DiskSource> {
    let bad = |why: &str| Error::invalid("NBD URI", format!("{uri:?}: {why}"));
    if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let rest = rest
            .strip_prefix('/')
            .ok_or_else(|| bad("expected nbd+unix:///EXPORT?socket=PATH"))?;
        let (export, query) = rest
            .split_once('?')
            .ok_or_else(|| bad("no ?socket= given"))?;
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("no socket= given"))?;
        return Ok(DiskSource::NbdUnix {
            socket: socket.into(),
            export: export.to_string(),
        });
    }
    if let Some(rest) = uri.strip_prefix("nbd://") {
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, p) = h.split_once(']').ok_or_else(|| bad("unclosed [ in host"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None => 10809,
        };
        return Ok(DiskSource::NbdTcp {
            host,
            port,
            export: export.to_string(),
        });
    }
    Err(bad("only nbd:// and nbd+unix:// are supported"))
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    async fn create(&self, config: VmConfig) -> Result<Box<dyn VmHandle>> {
        Ok(Box::new(self.create_vm(config).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_uris() {
        assert_eq!(
            parse_nbd_uri("nbd+unix:///root?socket=/run/x.sock").unwrap(),
            DiskSource::NbdUnix {
                socket: "/run/x.sock".into(),
                export: "root".into()
            }
        );
        assert_eq!(
            parse_nbd_uri("nbd://10.0.0.1:1234/data").unwrap(),
            DiskSource::NbdTcp {
                host: "10.0.0.1".into(),
                port: 1234,
                export: "data".into()
            }
        );
        assert_eq!(
            parse_nbd_uri("nbd://[::1]/x").unwrap(),
            DiskSource::NbdTcp {
                host: "::1".into(),
                port: 10809,
                export: "x".into()
            }
        );
        for bad in [
            "http://x",
            "nbd+unix:///x",
            "nbd+unix://x?socket=/s",
            "nbd://:5/x",
            "nbd://h:port/x",
            "nbd://[::1/x",
        ] {
            assert!(parse_nbd_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_binary_and_firmware_are_clear_errors() {
        let e = QemuHypervisor::new()
            .with_binary("/nonexistent/qemu")
            .resolve_binary()
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/qemu"), "{e}");
        let e = QemuHypervisor::new()
            .with_binary("hci-no-such-qemu")
            .resolve_binary()
            .unwrap_err();
        assert!(format!("{e:?}").contains("qemu-system-x86"), "{e:?}");
        let e = QemuHypervisor::new()
            .with_ovmf(vec![("/nope/CODE.fd".into(), "/nope/VARS.fd".into())])
            .find_ovmf()
            .unwrap_err();
        assert!(format!("{e:?}").contains("ovmf"), "{e:?}");
    }
}
