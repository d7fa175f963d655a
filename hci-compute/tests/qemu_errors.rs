//! The QEMU backend beyond the conformance suite: firmware (SeaBIOS) boots
//! from a disk served over NBD and from a SATA image file, and bad inputs
//! — unsupported options, missing binary or firmware, QEMU crashing — that
//! must give clear errors or a stopped VM, never a hang.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hci_compute::qemu::QemuHypervisor;
use hci_compute::test_guests::Guest;
use hci_core::block::{BlockDevice, WriteFlags};
use hci_core::compute::{
    BootSource, DiskBackend, DiskBus, DiskConfig, ExitReason, VmConfig, VmHandle, VmState,
};
use hci_core::memory::MemBlockDevice;

const WAIT: Duration = Duration::from_secs(120);

fn hv() -> QemuHypervisor {
    let hv = QemuHypervisor::new();
    hv.resolve_binary()
        .expect("the QEMU tests need qemu-system-x86_64 (scripts/install-deps.sh installs it)");
    hv
}

/// A run directory of its own.
fn own(mut c: VmConfig) -> VmConfig {
    c.run_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("run-qemu")
        .join(format!("{}-{}", c.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&c.run_dir);
    std::fs::create_dir_all(&c.run_dir).expect("run dir");
    c
}

/// A 512-byte boot sector (built with gcc/ld) that prints a line on COM1 and
/// resets through the i8042.
fn boot_sector(dir: &Path) -> Vec<u8> {
    const SRC: &str = r#"
        .code16
        .globl _start
_start: cli
        xor %ax, %ax
        mov %ax, %ds
        mov $0x3f8, %dx
        mov $msg, %si
1:      lodsb
        test %al, %al
        jz 2f
        out %al, (%dx)
        jmp 1b
2:      mov $0xfe, %al
        out %al, $0x64
3:      hlt
        jmp 3b
msg:    .asciz "hello from the boot sector\r\n"
        .org 510
        .word 0xaa55
"#;
    std::fs::create_dir_all(dir).expect("dir");
    let (src, obj, bin) = (dir.join("mbr.S"), dir.join("mbr.o"), dir.join("mbr.bin"));
    std::fs::write(&src, SRC).expect("write mbr.S");
    let ok = Command::new("gcc")
        .args(["-m32", "-c", "-o"])
        .arg(&obj)
        .arg(&src)
        .status()
        .expect("run gcc");
    assert!(ok.success(), "gcc failed on the boot sector");
    let ok = Command::new("ld")
        .args([
            "-m",
            "elf_i386",
            "-Ttext",
            "0x7c00",
            "--oformat",
            "binary",
            "-e",
            "_start",
            "-o",
        ])
        .arg(&bin)
        .arg(&obj)
        .status()
        .expect("run ld");
    assert!(ok.success(), "ld failed on the boot sector");
    let b = std::fs::read(&bin).expect("read mbr.bin");
    assert_eq!(b.len(), 512);
    b
}

fn firmware_config(name: &str, disk: DiskConfig) -> VmConfig {
    own(VmConfig {
        name: name.into(),
        cpus: 1,
        memory: 64 << 20,
        boot: BootSource::Firmware { uefi: false },
        disks: vec![disk],
        nics: vec![],
        cloud_init_seed: None,
        run_dir: PathBuf::new(),
    })
}

async fn boots_and_resets(config: VmConfig) {
    let vm = hv().create_vm(config).await.expect("create");
    vm.start().await.expect("start");
    let reason = tokio::time::timeout(WAIT, vm.wait())
        .await
        .expect("the boot sector resets the VM")
        .expect("wait");
    let console = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
    assert!(
        console.contains("hello from the boot sector"),
        "console: {console:?}"
    );
    assert_eq!(reason, ExitReason::Reset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seabios_boots_a_disk_served_over_nbd() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mbr");
    let dev = Arc::new(MemBlockDevice::new(1 << 20));
    dev.write_at(&boot_sector(&dir), 0, WriteFlags::default())
        .await
        .expect("write the boot sector");
    boots_and_resets(firmware_config(
        "fw-nbd",
        DiskConfig {
            name: "root".into(),
            backend: DiskBackend::Device(dev as Arc<dyn BlockDevice>),
            bus: DiskBus::Virtio,
            read_only: false,
            boot_order: Some(1),
        },
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seabios_boots_a_sata_image_file() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mbr-sata");
    let mut img = boot_sector(&dir);
    img.resize(1 << 20, 0);
    let path = dir.join("disk.img");
    std::fs::write(&path, img).expect("write the image");
    let disk = DiskConfig {
        name: "root".into(),
        backend: DiskBackend::File(path),
        bus: DiskBus::Sata,
        read_only: false,
        boot_order: Some(1),
    };
    // QEMU's IDE/SATA disks cannot be read-only: refused up front, clearly.
    let ro = DiskConfig {
        read_only: true,
        ..disk.clone()
    };
    let err = hv()
        .create_vm(firmware_config("fw-sata-ro", ro))
        .await
        .expect_err("read-only SATA disk");
    assert!(err.to_string().contains("cannot be read-only"), "{err}");
    boots_and_resets(firmware_config("fw-sata", disk)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_options_fail_at_create_with_qemus_message() {
    for (extra, expect) in [
        (["-machine", "no-such-machine"], "unsupported machine type"),
        (["-device", "no-such-device"], "no-such-device"),
    ] {
        let hv = hv().with_extra_args(extra.iter().map(|s| s.to_string()).collect());
        let cfg = own(config("bad-opts", guest(Guest::Hello), 1, ""));
        let err = tokio::time::timeout(WAIT, hv.create_vm(cfg))
            .await
            .expect("create returns")
            .expect_err("QEMU refused the options");
        let msg = err.to_string();
        assert!(
            msg.contains("QEMU could not start VM bad-opts") && msg.contains(expect),
            "{msg}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_binary_firmware_and_files_are_clear_errors() {
    let cfg = || own(config("missing", guest(Guest::Hello), 1, ""));
    let err = QemuHypervisor::new()
        .with_binary("/nonexistent/qemu-system-x86_64")
        .create_vm(cfg())
        .await
        .expect_err("no binary");
    assert!(
        err.to_string().contains("/nonexistent/qemu-system-x86_64"),
        "{err}"
    );

    let mut uefi = cfg();
    uefi.boot = BootSource::Firmware { uefi: true };
    let err = hv()
        .with_ovmf(vec![(
            "/nonexistent/OVMF_CODE.fd".into(),
            "/nonexistent/OVMF_VARS.fd".into(),
        )])
        .create_vm(uefi)
        .await
        .expect_err("no OVMF");
    assert!(err.to_string().contains("ovmf"), "{err}");

    let mut c = cfg();
    c.disks.push(DiskConfig {
        name: "iso".into(),
        backend: DiskBackend::File("/nonexistent/debian.iso".into()),
        bus: DiskBus::Cdrom,
        read_only: true,
        boot_order: None,
    });
    let err = hv().create_vm(c).await.expect_err("no ISO");
    assert!(err.to_string().contains("/nonexistent/debian.iso"), "{err}");

    let mut c = cfg();
    c.cloud_init_seed = Some("/nonexistent/seed.img".into());
    let err = hv().create_vm(c).await.expect_err("no seed");
    assert!(err.to_string().contains("/nonexistent/seed.img"), "{err}");

    let mut c = cfg();
    c.memory = (64 << 20) + 1;
    assert!(
        hv().create_vm(c).await.is_err(),
        "memory not in MiB accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_qemu_stops_the_vm_with_its_reason() {
    let cfg = own(config("crash", guest(Guest::Spin), 1, "every=1000000"));
    let vm = hv().create_vm(cfg).await.expect("create");
    vm.start().await.expect("start");
    let pid = vm.pid().expect("pid");
    // SAFETY: kill(2) on our QEMU child; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGSEGV) }, 0);
    let reason = tokio::time::timeout(WAIT, vm.wait())
        .await
        .expect("the VM stops")
        .expect("wait");
    match &reason {
        ExitReason::VmmError(m) => assert!(m.contains("signal 11"), "{m}"),
        other => panic!("expected a VMM error, got {other:?}"),
    }
    assert_eq!(vm.state().await.expect("state"), VmState::Stopped(reason));
    assert!(vm.pause().await.is_err(), "paused a dead VM");
    assert!(vm.stats().await.is_ok(), "stats of a dead VM still answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_kills_qemu() {
    let cfg = own(config("dropped", guest(Guest::Spin), 1, "every=1000000"));
    let vm = hv().create_vm(cfg).await.expect("create");
    vm.start().await.expect("start");
    let pid = vm.pid().expect("pid");
    drop(vm);
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let mut gone = false;
    for _ in 0..500 {
        // A zombie until reaped counts as gone: its state is Z.
        let stat = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
        if stat.is_empty()
            || stat
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z'))
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "QEMU {pid} still runs after its handle was dropped");
}

/// A `DiskBackend::Replicated` disk: the backend opens the volume's engine
/// over the replica servers itself and SeaBIOS boots from it over NBD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seabios_boots_a_replicated_volume_the_backend_opens_itself() {
    use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("run-qemu")
        .join(format!("replicated-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let servers = ReplicaServers::start(&dir, 2, "qemu-replicated").await;
    // Put the boot sector on the volume with an engine of our own, then close it.
    let backend = &servers.backend;
    backend
        .create("boot", CreateVolume::new(1 << 20))
        .await
        .expect("create");
    let engine = backend
        .open_engine("boot", OpenVolume::default())
        .await
        .expect("open");
    engine
        .write_at(&boot_sector(&dir.join("mbr")), 0, WriteFlags::default())
        .await
        .expect("write the boot sector");
    engine.close().await.expect("close");
    drop(engine);

    boots_and_resets(firmware_config(
        "fw-replicated",
        DiskConfig {
            name: "root".into(),
            backend: DiskBackend::Replicated {
                volume: "boot".into(),
                replicas: servers.addrs.clone(),
                token_file: servers.token_file.clone(),
                key_file: None,
                control: None,
            },
            bus: DiskBus::Virtio,
            read_only: false,
            boot_order: Some(1),
        },
    ))
    .await;
}
