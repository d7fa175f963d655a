//! [`ProcessHypervisor`]: one `hci-vmm` process per VM, driven over its API
//! socket, so VMs outlive the program that started them (a daemon can
//! restart without touching its guests, then [adopt](Adopt) them again).
//!
//! Each VM's files live in its [`VmConfig::run_dir`]: `api.sock` (the
//! control socket), `exit.json` (how it ended, written by the process),
//! `vmm.log` (the process's stderr) and `console.log`.
//!
//! Only path-based disks can cross the process boundary:
//! [`DiskBackend::Volume`] (or [`DiskBackend::File`] with a directory) is an
//! hci-storage local volume, opened by the VMM process (which then owns it;
//! an encrypted volume's key file is read there); a regular file is a raw
//! disk image.
//!
//! NICs: a TAP registered with [`ProcessHypervisor::register_tap`] (its
//! queue descriptor, e.g. from hci-net's `attach_port`) is inherited by the
//! VMM process (`--net tap=NAME,fd=N`); others are attached by name there.
//!
//! QEMU VMs ([`ProcessHypervisor::with_qemu`]): the same `hci-vmm` process
//! runs the [`QemuHypervisor`](crate::qemu::QemuHypervisor) instead of the
//! KVM VMM (`hci-vmm --qemu-config FILE`, the [`QemuProcessConfig`] as
//! JSON). It opens the VM's volumes, serves them to its QEMU over NBD,
//! answers their control sockets and the same API socket, so a QEMU VM
//! outlives the daemon too and is adopted the same way. QEMU dies with
//! its `hci-vmm`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hci_core::compute::{
    Adopt, BootSource, DiskBackend, DiskBus, Hypervisor, HypervisorKind, ReceiveMigration,
    RestoreVm, VmConfig, VmHandle,
};
use hci_core::{Error, Result};

pub use crate::sys::adopt_inherited_fd;

use crate::hypervisor::TapRegistry;
use crate::vmm_api::{RemoteVm, Request, VmmClient};
use hci_core::net::TapHandle;
use std::os::fd::{AsRawFd, RawFd};

/// How long `create` waits for a new VMM process's socket.
const STARTUP: Duration = Duration::from_secs(20);

/// Runs each VM in its own `hci-vmm` process.
#[derive(Debug, Clone)]
pub struct ProcessHypervisor {
    vmm: PathBuf,
    taps: TapRegistry,
    #[cfg(feature = "qemu")]
    qemu: Option<crate::qemu::QemuOptions>,
}

/// What `hci-vmm --qemu-config FILE` reads: a QEMU VM to run.
#[cfg(feature = "qemu")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QemuProcessConfig {
    /// The VM (no in-process devices: volumes by path or by replicas).
    pub config: VmConfig,
    /// The QEMU settings.
    pub qemu: crate::qemu::QemuOptions,
    /// TAP queue descriptors the process inherits.
    pub taps: Vec<InheritedTap>,
}

/// A TAP queue descriptor handed to a VMM process.
#[cfg(feature = "qemu")]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InheritedTap {
    /// The TAP's interface name.
    pub ifname: String,
    /// The descriptor number in the VMM process.
    pub fd: RawFd,
}

/// The file holding a QEMU VM's [`QemuProcessConfig`] in its run directory.
#[cfg(feature = "qemu")]
pub const QEMU_CONFIG_FILE: &str = "qemu-vm.json";

/// The program `name` next to the current executable, else the first on
/// `PATH`; `None` if there is none.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)));
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside.into_iter().chain(on_path).find(|p| p.is_file())
}

/// The `hci-vmm` next to the current executable, else the one on `PATH`.
fn default_vmm() -> PathBuf {
    ProcessHypervisor::find_vmm().unwrap_or_else(|| PathBuf::from("hci-vmm"))
}

fn files(run_dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        run_dir.join("api.sock"),
        run_dir.join("exit.json"),
        run_dir.join("vmm.log"),
    )
}

impl Default for ProcessHypervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessHypervisor {
    /// Uses the `hci-vmm` next to the current executable (or on `PATH`).
    pub fn new() -> Self {
        Self::with_vmm(default_vmm())
    }

    /// The `hci-vmm` binary next to the current executable, else the first
    /// on `PATH`; `None` if there is none.
    pub fn find_vmm() -> Option<PathBuf> {
        find_program("hci-vmm")
    }

    /// Uses the `hci-vmm` binary at `path`.
    pub fn with_vmm(path: impl Into<PathBuf>) -> Self {
        ProcessHypervisor {
            vmm: path.into(),
            taps: TapRegistry::default(),
            #[cfg(feature = "qemu")]
            qemu: None,
        }
    }

    /// Runs QEMU VMs instead, with `qemu`'s settings, each in its own
    /// `hci-vmm` process (see the module documentation); TAPs registered
    /// with `qemu` are handed over too (the registry is shared).
    #[cfg(feature = "qemu")]
    pub fn with_qemu(mut self, qemu: &crate::qemu::QemuHypervisor) -> Self {
        self.qemu = Some(qemu.options().clone());
        self.taps = qemu.taps().clone();
        self
    }

    /// Whether this runs QEMU VMs.
    pub fn runs_qemu(&self) -> bool {
        #[cfg(feature = "qemu")]
        return self.qemu.is_some();
        #[cfg(not(feature = "qemu"))]
        false
    }

    /// Hands over the queue descriptor of a TAP: a NIC whose `tap` is
    /// `tap.ifname` gets it in its VMM process (inherited at spawn).
    pub fn register_tap(&self, tap: &TapHandle) {
        self.taps.register(tap);
    }

    /// Forgets TAP `ifname` (running VMs keep their descriptor).
    pub fn unregister_tap(&self, ifname: &str) {
        self.taps.unregister(ifname);
    }

    /// The TAP registry (shared with clones of `self`).
    pub fn taps(&self) -> &TapRegistry {
        &self.taps
    }

    /// The command line for `config` and the descriptors the process inherits.
    fn command_line(&self, config: &VmConfig) -> Result<(Vec<String>, Vec<RawFd>)> {
        #[cfg(feature = "qemu")]
        if let Some(qemu) = &self.qemu {
            return self.qemu_command_line(config, qemu);
        }
        let mut args = Self::args(config)?;
        let mut fds = Vec::new();
        for n in &config.nics {
            if let Some(fd) = self.taps.queue(&n.tap, &n.name)? {
                let raw = fd.as_raw_fd();
                let spec = format!("tap={},", n.tap);
                if let Some(arg) = args.iter_mut().find(|a| a.starts_with(&spec)) {
                    arg.push_str(&format!(",fd={raw}"));
                    fds.push(raw);
                }
            }
        }
        Ok((args, fds))
    }

    /// The command line of `hci-vmm` for `config`.
    pub fn args(config: &VmConfig) -> Result<Vec<String>> {
        if config.memory == 0 {
            return Err(Error::invalid("memory", "must not be zero"));
        }
        if config.cpus == 0 {
            return Err(Error::invalid("cpus", "must be at least 1"));
        }
        let BootSource::Kernel {
            kernel,
            initrd,
            cmdline,
        } = &config.boot
        else {
            return Err(Error::unsupported(
                "firmware boot",
                "hci-vmm (direct kernel boot only)",
            ));
        };
        let (socket, exit, _) = files(&config.run_dir);
        let mut args = vec![
            "--name".to_string(),
            config.name.clone(),
            "--kernel".into(),
            kernel.display().to_string(),
            "--cmdline".into(),
            cmdline.clone(),
            "--cpus".into(),
            config.cpus.to_string(),
            "--memory".into(),
            config.memory.to_string(),
            "--serial".into(),
            format!("file={}", config.run_dir.join("console.log").display()),
            "--api-socket".into(),
            socket.display().to_string(),
            "--exit-file".into(),
            exit.display().to_string(),
            "--wait-start".into(),
        ];
        if let Some(initrd) = initrd {
            args.push("--initrd".into());
            args.push(initrd.display().to_string());
        }
        for d in &config.disks {
            if d.bus != DiskBus::Virtio {
                return Err(Error::unsupported(
                    format!("disk bus {:?} (disk {})", d.bus, d.name),
                    "hci-vmm (virtio only)",
                ));
            }
            let mut spec = match &d.backend {
                DiskBackend::File(path) => {
                    let kind = if path.is_dir() { "path" } else { "file" };
                    format!("{kind}={},name={}", path.display(), d.name)
                }
                DiskBackend::Volume { path, key_file } => {
                    let mut s = format!("path={},name={}", path.display(), d.name);
                    if let Some(k) = key_file {
                        s.push_str(&format!(",key-file={}", k.display()));
                    }
                    s
                }
                DiskBackend::Replicated {
                    volume,
                    replicas,
                    token_file,
                    key_file,
                    control,
                } => {
                    let mut s = format!(
                        "replicas={},volume={volume},token-file={},name={}",
                        replicas.join("+"),
                        token_file.display(),
                        d.name
                    );
                    if let Some(k) = key_file {
                        s.push_str(&format!(",key-file={}", k.display()));
                    }
                    if let Some(c) = control {
                        s.push_str(&format!(",control={}", c.display()));
                    }
                    s
                }
                _ => {
                    return Err(Error::unsupported(
                        format!(
                            "disk {}: in-process devices and NBD exports cannot be handed to a VMM process",
                            d.name
                        ),
                        "the process hypervisor (give a volume directory or a raw file)",
                    ));
                }
            };
            if d.read_only {
                spec.push_str(",readonly");
            }
            args.push("--disk".into());
            args.push(spec);
        }
        for n in &config.nics {
            let mac: Vec<String> = n.mac.iter().map(|b| format!("{b:02x}")).collect();
            args.push("--net".into());
            args.push(format!(
                "tap={},mac={},name={}",
                n.tap,
                mac.join(":"),
                n.name
            ));
        }
        if config.cloud_init_seed.is_some() {
            return Err(Error::unsupported("cloud-init seeds", "hci-vmm"));
        }
        Ok(args)
    }
}

#[cfg(feature = "qemu")]
impl ProcessHypervisor {
    /// Writes `config` for `hci-vmm --qemu-config` into its run directory;
    /// the command line and the TAP descriptors the process inherits.
    fn qemu_command_line(
        &self,
        config: &VmConfig,
        qemu: &crate::qemu::QemuOptions,
    ) -> Result<(Vec<String>, Vec<RawFd>)> {
        if let Some(d) = config
            .disks
            .iter()
            .find(|d| matches!(d.backend, DiskBackend::Device(_)))
        {
            return Err(Error::unsupported(
                format!(
                    "disk {}: an in-process device cannot be handed to a VMM process",
                    d.name
                ),
                "the process hypervisor (give a volume, a replicated volume, a file or an NBD export)",
            ));
        }
        let mut taps = Vec::new();
        for n in &config.nics {
            if let Some(fd) = self.taps.queue(&n.tap, &n.name)? {
                taps.push(InheritedTap {
                    ifname: n.tap.clone(),
                    fd: fd.as_raw_fd(),
                });
            }
        }
        let fds = taps.iter().map(|t| t.fd).collect();
        let file = config.run_dir.join(QEMU_CONFIG_FILE);
        let spec = QemuProcessConfig {
            config: config.clone(),
            qemu: qemu.clone(),
            taps,
        };
        let json = serde_json::to_vec_pretty(&spec)
            .map_err(|e| Error::invalid("QEMU VM configuration", e.to_string()))?;
        std::fs::create_dir_all(&config.run_dir)
            .map_err(|e| Error::io(format!("create {}", config.run_dir.display()), e))?;
        std::fs::write(&file, json)
            .map_err(|e| Error::io(format!("write {}", file.display()), e))?;
        let (socket, exit, _) = files(&config.run_dir);
        let args = vec![
            "--name".to_string(),
            config.name.clone(),
            "--qemu-config".into(),
            file.display().to_string(),
            "--api-socket".into(),
            socket.display().to_string(),
            "--exit-file".into(),
            exit.display().to_string(),
            "--wait-start".into(),
        ];
        Ok((args, fds))
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

#[async_trait]
impl Hypervisor for ProcessHypervisor {
    fn kind(&self) -> HypervisorKind {
        if self.runs_qemu() {
            HypervisorKind::Qemu
        } else {
            HypervisorKind::Kvm
        }
    }

    async fn create(&self, config: VmConfig) -> Result<Box<dyn VmHandle>> {
        self.spawn(config, &[], None).await
    }

    fn as_adopter(&self) -> Option<&dyn Adopt> {
        Some(self)
    }

    fn as_restorer(&self) -> Option<&dyn RestoreVm> {
        // QEMU VMs are not saved to files (`Snapshottable`).
        (!self.runs_qemu()).then_some(self as &dyn RestoreVm)
    }

    fn as_migration_receiver(&self) -> Option<&dyn ReceiveMigration> {
        Some(self)
    }
}

/// Kills a VMM process unless disarmed (a `receive` dropped while waiting).
struct KillUnlessDisarmed(Option<u32>);

impl Drop for KillUnlessDisarmed {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            crate::sys::kill_process(pid);
        }
    }
}

impl ProcessHypervisor {
    /// Starts `hci-vmm` for `config` with `extra` arguments (and `token` in
    /// its environment); waits up to `startup` (forever: `None`) for its
    /// API socket.
    async fn spawn(
        &self,
        config: VmConfig,
        extra: &[String],
        token: Option<&str>,
    ) -> Result<Box<dyn VmHandle>> {
        let (mut args, fds) = self.command_line(&config)?;
        args.extend_from_slice(extra);
        let startup = if token.is_some() { None } else { Some(STARTUP) };
        std::fs::create_dir_all(&config.run_dir)
            .map_err(|e| Error::io(format!("create {}", config.run_dir.display()), e))?;
        let (socket, exit, log) = files(&config.run_dir);
        let _ = std::fs::remove_file(&exit);
        let _ = std::fs::remove_file(&socket);
        let log_file = std::fs::File::create(&log)
            .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let mut cmd = tokio::process::Command::new(&self.vmm);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            // Its own process group: a terminal's Ctrl-C to the caller does
            // not reach the VM, and the VM outlives the caller.
            .process_group(0)
            .kill_on_drop(false);
        crate::sys::inherit_fds(&mut cmd, fds);
        if let Some(token) = token {
            cmd.env("HCI_MIGRATION_TOKEN", token);
        }
        let mut child = cmd.spawn().map_err(|e| {
            Error::io(
                format!("start {} (is hci-vmm installed?)", self.vmm.display()),
                e,
            )
        })?;
        let deadline = startup.map(|s| Instant::now() + s);
        let mut guard = KillUnlessDisarmed(child.id());
        let client = VmmClient::new(&socket);
        loop {
            if socket.exists() && client.call(&Request::State).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let why = match crate::vmm_api::read_exit_file(&exit) {
                    Some(hci_core::compute::ExitReason::VmmError(e)) => e,
                    _ => log_tail(&log),
                };
                return Err(Error::Backend {
                    backend: "hci-vmm",
                    message: format!("the VMM exited at start ({status}): {why}"),
                    source: None,
                });
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                let _ = child.start_kill();
                return Err(Error::Backend {
                    backend: "hci-vmm",
                    message: format!("the VMM did not open its socket: {}", log_tail(&log)),
                    source: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        guard.0 = None;
        // Reap it when it ends (if this process is still there then).
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(Box::new(RemoteVm::new(config.name, socket, exit)))
    }
}

#[async_trait]
impl RestoreVm for ProcessHypervisor {
    /// Starts a VMM process that restores `path` (`hci-vmm --restore`); the
    /// VM comes back paused.
    async fn restore(&self, config: VmConfig, path: &Path) -> Result<Box<dyn VmHandle>> {
        self.spawn(
            config,
            &["--restore".into(), path.display().to_string()],
            None,
        )
        .await
    }
}

#[async_trait]
impl ReceiveMigration for ProcessHypervisor {
    /// Starts a VMM process listening on `listen` (`hci-vmm --incoming`);
    /// returns once the migrated VM runs there. Dropping the future kills
    /// that process.
    async fn receive(
        &self,
        config: VmConfig,
        listen: &str,
        token: &str,
    ) -> Result<Box<dyn VmHandle>> {
        self.spawn(
            config,
            &["--incoming".into(), listen.to_string()],
            Some(token),
        )
        .await
    }
}

#[async_trait]
impl Adopt for ProcessHypervisor {
    async fn adopt(&self, name: &str, run_dir: &Path) -> Result<Option<Box<dyn VmHandle>>> {
        let (socket, exit, _) = files(run_dir);
        let client = VmmClient::new(&socket);
        match client.call(&Request::Info).await {
            Ok(info) if info.name.as_deref() == Some(name) => {
                Ok(Some(Box::new(RemoteVm::new(name, socket, exit))))
            }
            Ok(info) => Err(Error::invalid(
                format!("VM {name:?}"),
                format!(
                    "the VMM at {} runs {:?}",
                    socket.display(),
                    info.name.unwrap_or_default()
                ),
            )),
            Err(Error::Unavailable { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
