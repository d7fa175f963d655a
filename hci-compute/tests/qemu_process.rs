//! QEMU VMs in their own `hci-vmm` processes (`ProcessHypervisor::with_qemu`):
//! hci-core's hypervisor suite, adoption after the caller is gone, and a
//! local volume owned (and snapshotted online) by the VM's process.
//! Needs `qemu-system-x86_64` (Debian qemu-system-x86) and gcc.

mod common;

use std::time::Duration;

use common::*;
use hci_compute::ProcessHypervisor;
use hci_compute::qemu::QemuHypervisor;
use hci_compute::test_guests::Guest;
use hci_core::compute::{ExitReason, Hypervisor, VmConfig, VmState};
use hci_core::testing::hypervisor::HypervisorFixture;

const VMM: &str = env!("CARGO_BIN_EXE_hci-vmm");

/// A run directory of its own per fixture (cases run in parallel).
fn unique(mut c: VmConfig) -> VmConfig {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    c.run_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("run-qproc")
        .join(format!("{}-{}-{n}", c.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&c.run_dir);
    std::fs::create_dir_all(&c.run_dir).expect("create the run dir");
    c
}

fn hypervisor() -> ProcessHypervisor {
    let qemu = QemuHypervisor::new();
    qemu.resolve_binary()
        .expect("the QEMU tests need qemu-system-x86_64 (scripts/install-deps.sh installs it)");
    ProcessHypervisor::with_vmm(VMM).with_qemu(&qemu)
}

async fn fixture() -> HypervisorFixture {
    HypervisorFixture {
        hypervisor: Box::new(hypervisor()),
        hello: unique(config("qproc-hello", guest(Guest::Hello), 1, "")),
        hello_output: "hello from guest\n".into(),
        hello_exit: ExitReason::Reset,
        spin: unique(config("qproc-spin", guest(Guest::Spin), 1, "every=1000000")),
    }
}

hci_core::hypervisor_conformance!(fixture);

/// Waits until `cond` holds, panicking with `what` after `within`.
async fn until(within: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !cond().await {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The caller (a daemon) goes away; the QEMU VM keeps running in its
/// process and a new hypervisor adopts it: state, pause/resume, console
/// history, kill, the recorded exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_vms_outlive_their_hypervisor_and_are_adopted() {
    let cfg = unique(config("qadopt", guest(Guest::Spin), 1, "every=1000000"));
    let run_dir = cfg.run_dir.clone();
    assert_eq!(hypervisor().kind(), hci_core::compute::HypervisorKind::Qemu);
    {
        let hv = hypervisor();
        let vm = hv.create(cfg).await.expect("create");
        vm.start().await.expect("start");
    }
    let hv = hypervisor();
    let adopter = hv.as_adopter().expect("adopts");
    let vm = adopter
        .adopt("qadopt", &run_dir)
        .await
        .expect("adopt")
        .expect("still running");
    assert_eq!(vm.state().await.expect("state"), VmState::Running);
    vm.pause().await.expect("pause");
    assert_eq!(vm.state().await.expect("state"), VmState::Paused);
    vm.resume().await.expect("resume");
    assert_eq!(vm.state().await.expect("state"), VmState::Running);
    // The guest printed before we adopted it: the history is still there.
    let mut console = vm.console().await.expect("console");
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("spinning") {
            match console.output.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("console output in time");
    assert!(
        String::from_utf8_lossy(&seen).contains("spinning"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    vm.kill().await.expect("kill");
    assert_eq!(vm.wait().await.expect("wait"), ExitReason::Killed);
    until(
        Duration::from_secs(20),
        "the VMM never exited",
        async || {
            adopter
                .adopt("qadopt", &run_dir)
                .await
                .expect("adopt")
                .is_none()
        },
    )
    .await;
    assert_eq!(
        hci_compute::vmm_api::read_exit_file(&run_dir.join("exit.json")),
        Some(ExitReason::Killed)
    );
    assert!(
        !run_dir.join("api.sock").exists(),
        "the VMM removes its socket on exit"
    );
}

/// A local volume of a QEMU VM is opened by the VM's process, which
/// answers its control socket: the pool snapshots it online, and gets it
/// back (the snapshot kept) once the VM is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_vms_volume_is_owned_by_its_process_and_snapshotted_online() {
    use hci_core::volume::VolumeBackend;
    let pool_dir = tempfile::tempdir().expect("tempdir");
    let (pool, disk) = released_volume(pool_dir.path(), "root", 16 << 20).await;
    let mut cfg = unique(config("qvol", guest(Guest::Spin), 1, "every=1000000"));
    cfg.disks.push(disk);
    let run_dir = cfg.run_dir.clone();
    let vm = hypervisor().create(cfg).await.expect("create");
    vm.start().await.expect("start");
    assert!(
        run_dir.join("nbd.sock").exists(),
        "the VM's process serves its disk to QEMU over NBD"
    );
    assert!(pool_dir.path().join("root/control.sock").exists());
    let snap = pool.snapshot("root", "s1").await.expect("online snapshot");
    assert_eq!(snap.name, "s1");
    assert_eq!(pool.info("root").await.expect("info").snapshots, 1);
    vm.kill().await.expect("kill");
    assert_eq!(vm.wait().await.expect("wait"), ExitReason::Killed);
    until(
        Duration::from_secs(20),
        "the VMM never let go of the volume",
        async || !pool_dir.path().join("root/control.sock").exists(),
    )
    .await;
    let snaps = loop {
        match pool.list_snapshots("root").await {
            Ok(s) => break s,
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("list: {e}"),
        }
    };
    assert_eq!(snaps.len(), 1);
}

/// In-process devices cannot cross into a VMM process: a clear refusal.
#[tokio::test]
async fn in_process_devices_are_refused() {
    let mut cfg = unique(config("qdev", guest(Guest::Hello), 1, ""));
    cfg.disks.push(hci_core::compute::DiskConfig {
        name: "mem".into(),
        backend: hci_core::compute::DiskBackend::Device(std::sync::Arc::new(
            hci_storage::raw::RawFileDevice::open(&std::path::PathBuf::from("/dev/null"), true)
                .expect("open /dev/null"),
        )),
        bus: hci_core::compute::DiskBus::Virtio,
        read_only: true,
        boot_order: None,
    });
    let e = hypervisor().create(cfg).await.expect_err("refused");
    assert!(e.to_string().contains("in-process device"), "{e}");
}

/// The fencing watchdog covers QEMU VMs too: once a newer engine takes
/// their replicated volume over, the VM's process stops the guest (exit
/// reason "fenced") instead of leaving it on a disk that refuses writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_qemu_vm_is_stopped() {
    use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};

    let dir = tempfile::tempdir().expect("temp dir");
    let servers = ReplicaServers::start(dir.path(), 2, "qemu-fence").await;
    let backend = &servers.backend;
    backend
        .create("qfv", CreateVolume::new(4 << 20))
        .await
        .expect("create");
    let mut cfg = unique(config("qfenced", guest(Guest::Spin), 1, "every=1000000"));
    cfg.disks.push(replicated_disk(
        "data",
        "qfv",
        servers.addrs.clone(),
        servers.token_file.clone(),
    ));
    let run_dir = cfg.run_dir.clone();
    let vm = hypervisor().create(cfg).await.expect("create");
    vm.start().await.expect("start");
    assert_eq!(vm.state().await.expect("state"), VmState::Running);

    // Another engine takes the volume over (generation + 1).
    let engine = backend
        .open_engine("qfv", OpenVolume::default())
        .await
        .expect("open a newer engine");
    // `wait` says why: the process records "fenced" before the kill.
    let reason = tokio::time::timeout(Duration::from_secs(30), vm.wait())
        .await
        .expect("the fenced VM stops within 30 s")
        .expect("wait");
    assert!(
        matches!(&reason, ExitReason::VmmError(why) if why.contains("fenced")),
        "{reason:?}"
    );
    let exit = std::fs::read_to_string(run_dir.join("exit.json")).unwrap_or_default();
    assert!(exit.contains("fenced"), "exit file: {exit}");
    let log = std::fs::read_to_string(run_dir.join("vmm.log")).unwrap_or_default();
    assert!(log.contains("fenced"), "{log}");
    engine.close().await.expect("close");
}
