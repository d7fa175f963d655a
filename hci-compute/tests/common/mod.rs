//! Shared helpers for the KVM and QEMU integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hci_compute::test_guests::{self, Guest};
use hci_compute::{KvmHypervisor, KvmVm};
use hci_core::block::BlockDevice;
use hci_core::compute::{BootSource, DiskBackend, DiskBus, DiskConfig, VmConfig};

/// Fails loudly when KVM is missing: these tests must never pass by not running.
pub fn require_kvm() {
    assert!(
        KvmHypervisor::available(),
        "/dev/kvm cannot be opened: the KVM integration tests need KVM (run as root on a KVM host)"
    );
}

/// Builds a test guest into the target's temp dir.
pub fn guest(g: Guest) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guests");
    std::fs::create_dir_all(&dir).expect("create the guest build dir");
    test_guests::build(g, &dir).expect("build the test guest with gcc")
}

/// A fresh run directory for VM `name` (the console log goes there).
pub fn run_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("run")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the run dir");
    dir
}

/// A VM configuration booting `kernel`.
pub fn config(name: &str, kernel: PathBuf, cpus: u32, cmdline: &str) -> VmConfig {
    VmConfig {
        name: name.into(),
        cpus,
        memory: 64 << 20,
        boot: BootSource::Kernel {
            kernel,
            initrd: None,
            cmdline: cmdline.into(),
        },
        disks: vec![],
        nics: vec![],
        cloud_init_seed: None,
        run_dir: run_dir(name),
    }
}

/// A virtio disk backed by `dev`.
pub fn disk(name: &str, dev: Arc<dyn BlockDevice>) -> DiskConfig {
    DiskConfig {
        name: name.into(),
        backend: DiskBackend::Device(dev),
        bus: DiskBus::Virtio,
        read_only: false,
        boot_order: None,
    }
}

/// A virtio disk on the replicated volume `volume` (replica servers at
/// `replicas`), which the backend opens (and hands over in a migration).
pub fn replicated_disk(
    name: &str,
    volume: &str,
    replicas: Vec<String>,
    token_file: PathBuf,
) -> DiskConfig {
    DiskConfig {
        name: name.into(),
        backend: DiskBackend::Replicated {
            volume: volume.into(),
            replicas,
            token_file,
            key_file: None,
            control: None,
        },
        bus: DiskBus::Virtio,
        read_only: false,
        boot_order: None,
    }
}

/// Creates a VM from `config` on the KVM backend.
pub async fn create(config: VmConfig) -> KvmVm {
    require_kvm();
    KvmHypervisor::new()
        .create_vm(config)
        .await
        .expect("create the VM")
}

/// Waits until the console shows `needle`, with a generous timeout for loaded machines.
pub fn wait_console(vm: &KvmVm, needle: &str) {
    assert!(
        vm.console_hub()
            .wait_for(needle.as_bytes(), Duration::from_secs(20)),
        "console never showed {needle:?}; got {:?}",
        String::from_utf8_lossy(&vm.console_hub().history())
    );
}

/// Debian's cloud kernel and its module directory.
pub fn debian_cloud_kernel() -> (PathBuf, PathBuf) {
    let kernel = std::fs::read_dir("/boot")
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .max()
        .expect(
            "no /boot/vmlinuz-*-cloud-amd64: install the Debian package linux-image-cloud-amd64 \
             (scripts/install-deps.sh does)",
        );
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .expect("kernel version")
        .to_string();
    let modules = PathBuf::from("/lib/modules").join(version);
    assert!(
        modules.join("modules.dep").is_file(),
        "{} has no modules.dep",
        modules.display()
    );
    (kernel, modules)
}

/// Appends one `newc` cpio entry.
pub fn cpio_entry(
    out: &mut Vec<u8>,
    ino: u32,
    name: &str,
    mode: u32,
    rdev: (u32, u32),
    data: &[u8],
) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        u32::try_from(data.len()).expect("file under 4 GiB"),
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// `n` replica servers on loopback with their replicas under `dir`, sharing
/// `token` (also written to `dir/token`), and a backend over all of them.
pub struct ReplicaServers {
    /// Their `HOST:PORT` addresses.
    pub addrs: Vec<String>,
    /// The file holding the token.
    pub token_file: PathBuf,
    /// A backend with one replica on each.
    pub backend: hci_storage::engine::ReplicatedVolumeBackend,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ReplicaServers {
    /// Starts them.
    pub async fn start(dir: &std::path::Path, n: usize, token: &str) -> ReplicaServers {
        use hci_storage::engine::{EngineOptions, ReplicatedVolumeBackend};
        use hci_storage::replica::ReplicaNode;
        use hci_storage::replica::client::{RemoteNode, ServerAddr};
        use hci_storage::replica::server::ReplicaServer;

        let token_file = dir.join("token");
        std::fs::write(&token_file, token).expect("token");
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..n {
            let server =
                ReplicaServer::new(dir.join(format!("replica{i}")), token).expect("server");
            let (addr, task) = server.spawn("127.0.0.1:0").await.expect("listen");
            addrs.push(addr.to_string());
            tasks.push(task);
        }
        let nodes: Vec<Arc<dyn ReplicaNode>> = addrs
            .iter()
            .map(|a| {
                Arc::new(RemoteNode::new(ServerAddr::new(a.clone(), token))) as Arc<dyn ReplicaNode>
            })
            .collect();
        let backend =
            ReplicatedVolumeBackend::new(nodes, EngineOptions::default()).expect("backend");
        ReplicaServers {
            addrs,
            token_file,
            backend,
            tasks,
        }
    }
}

impl Drop for ReplicaServers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A pool in `dir` with a released `size`-byte volume `name`, and a virtio
/// disk naming it by path (opened by whoever runs the VM).
pub async fn released_volume(
    dir: &std::path::Path,
    name: &str,
    size: u64,
) -> (hci_storage::local::LocalVolumeBackend, DiskConfig) {
    use hci_core::volume::{CreateVolume, VolumeBackend};
    let pool = hci_storage::local::LocalVolumeBackend::new(dir).expect("pool");
    pool.create(name, CreateVolume::new(size))
        .await
        .expect("create");
    pool.release(name).expect("release");
    let disk = DiskConfig {
        name: name.into(),
        backend: DiskBackend::Volume {
            path: dir.join(name),
            key_file: None,
        },
        bus: DiskBus::Virtio,
        read_only: false,
        boot_order: None,
    };
    (pool, disk)
}
