//! Boots Debian's cloud kernel with a busybox initramfs on the KVM VMM.
//!
//! Needs hardware virtualization: under `kvm_pvm` (detected by build.rs) guest
//! CPL0 code is emulated at ~1 µs per instruction and the test is ignored with
//! that reason. Needs the Debian packages `linux-image-cloud-amd64` and
//! `busybox-static` (scripts/install-deps.sh installs them).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use hci_core::compute::{BootSource, ExitReason, VmHandle};

/// Appends one `newc` cpio entry.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
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

/// An initramfs whose /init prints a marker and reboots (i8042 reset with `reboot=k`).
fn initramfs(busybox: &Path, dir: &Path) -> PathBuf {
    let bb = std::fs::read(busybox).expect("read busybox");
    let init = b"#!/bin/busybox sh\n/bin/busybox echo HCI-LINUX-BOOT-OK\n/bin/busybox reboot -f\n";
    let mut c = Vec::new();
    cpio_entry(&mut c, 1, "bin", 0o040755, (0, 0), &[]);
    cpio_entry(&mut c, 2, "dev", 0o040755, (0, 0), &[]);
    cpio_entry(&mut c, 3, "dev/console", 0o020600, (5, 1), &[]);
    cpio_entry(&mut c, 4, "bin/busybox", 0o100755, (0, 0), &bb);
    cpio_entry(&mut c, 5, "init", 0o100755, (0, 0), init);
    cpio_entry(&mut c, 0, "TRAILER!!!", 0, (0, 0), &[]);
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, c).expect("write initramfs");
    path
}

fn debian_cloud_kernel() -> Option<PathBuf> {
    std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    kvm_pvm,
    ignore = "kvm_pvm: guest CPL0 code is emulated (~1 µs/instruction), Linux does not boot in useful time; runs on hosts with hardware virtualization"
)]
async fn debian_cloud_kernel_boots_to_init_and_reboots() {
    let kernel = debian_cloud_kernel()
        .expect("no /boot/vmlinuz-*-cloud-amd64: apt-get install linux-image-cloud-amd64");
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "no /bin/busybox: apt-get install busybox-static"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let initrd = initramfs(busybox, dir.path());
    let mut cfg = config("linux", kernel, 2, "");
    cfg.memory = 256 << 20;
    cfg.boot = BootSource::Kernel {
        kernel: match cfg.boot {
            BootSource::Kernel { kernel, .. } => kernel,
            BootSource::Firmware { .. } => unreachable!("config() boots a kernel"),
        },
        initrd: Some(initrd),
        cmdline: "console=ttyS0 reboot=k panic=-1 rdinit=/init".into(),
    };
    let vm = create(cfg).await;
    vm.start().await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(120), vm.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "Linux did not finish; console: {}",
                String::from_utf8_lossy(&vm.console_hub().history())
            )
        })
        .unwrap();
    let console = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
    assert!(console.contains("HCI-LINUX-BOOT-OK"), "{console}");
    assert_eq!(reason, ExitReason::Reset, "{console}");
}
