//! The `kvm` backend of hci-core's [`Hypervisor`] trait.
//!
//! [`KvmHypervisor`] turns a [`VmConfig`] into a [`KvmVm`], which implements
//! [`VmHandle`] over the synchronous [`Vm`] manager (blocking steps run on
//! tokio's blocking pool).
//!
//! Not yet supported (refused with [`Error::Unsupported`] at `create`):
//! firmware boot, NICs (virtio-net), disk backends other than an in-process
//! [`BlockDevice`](hci_core::block::BlockDevice), non-virtio disk buses and
//! cloud-init seeds.
//!
//! Graceful shutdown: the VMM has no ACPI and no i8042 keyboard path yet, so
//! [`VmHandle::shutdown`] cannot ask the guest to power off; it waits up to the
//! timeout for the guest to stop by itself (reset, power-off) and kills it after.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use hci_core::compute::{
    BootSource, Console, DiskBackend, DiskBus, ExitReason, Hypervisor, HypervisorKind, VmConfig,
    VmHandle, VmState, VmStats,
};
use hci_core::{Error, Result};

use crate::console::ConsoleHub;
use crate::devices::virtio::block::Executor;
use crate::memory;
use crate::sys;
use crate::vm::{DiskSpec, Vm, VmSpec};

/// hci's own KVM VMM as a [`Hypervisor`].
#[derive(Debug, Default, Clone)]
pub struct KvmHypervisor {}

impl KvmHypervisor {
    /// The backend (nothing is opened until a VM is created).
    pub fn new() -> Self {
        KvmHypervisor {}
    }

    /// Whether `/dev/kvm` can be opened here.
    pub fn available() -> bool {
        crate::kvm::System::open().is_ok()
    }

    /// Like [`Hypervisor::create`], returning the concrete handle.
    pub async fn create_vm(&self, config: VmConfig) -> Result<KvmVm> {
        let spec = spec_from_config(config)?;
        let executor = Executor::current();
        let vm = blocking(move || Vm::new(spec, executor).map_err(Error::from)).await?;
        Ok(KvmVm { vm })
    }
}

fn unsupported(what: &str) -> Error {
    Error::unsupported(what, "the kvm hypervisor")
}

/// Checks a [`VmConfig`] and turns it into a [`VmSpec`].
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
    if !config.nics.is_empty() {
        return Err(unsupported("NICs (virtio-net)"));
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
        let DiskBackend::Device(device) = d.backend else {
            return Err(unsupported(&format!(
                "non-device disk backends (disk {})",
                d.name
            )));
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
        console_log,
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
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
}

/// A VM of the KVM VMM.
#[derive(Debug, Clone)]
pub struct KvmVm {
    vm: Vm,
}

impl KvmVm {
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
        let starts: Vec<u64> = memory::host_ranges(self.vm.memory())
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        sys::mapping_rss(&starts)
    }
}

#[async_trait]
impl VmHandle for KvmVm {
    fn name(&self) -> &str {
        self.vm.name()
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
        // No ACPI or keyboard path to ask the guest: give it `timeout` to stop by itself.
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
            nics: Vec::new(),
        })
    }
}
