//! UEFI boots on the QEMU backend: OVMF (Debian's `ovmf`, installed by
//! scripts/install-deps.sh) loads a UEFI application from the VM's disk —
//! a FAT filesystem without a partition table holding
//! `EFI/BOOT/BOOTX64.EFI`, the removable-media boot path, on an hci block
//! device QEMU reads over NBD — and runs it. The application (a PE32+
//! built here from a few lines of assembly with gcc and GNU ld's `i386pep`
//! emulation) prints through the firmware's `ConOut`, which OVMF sends to
//! the serial port, and resets through `ResetSystem`: the console shows its
//! line followed by the firmware vendor OVMF handed it in the system table,
//! and the VM ends with a reset (`-no-reboot`).
//!
//! Skipped, with a message, where OVMF is not installed. Under TCG OVMF
//! takes a few seconds to reach the boot manager.

use std::io::{Cursor, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hci_compute::qemu::{OVMF_CANDIDATES, QemuHypervisor};
use hci_core::block::{BlockDevice, WriteFlags};
use hci_core::compute::{
    BootSource, DiskBackend, DiskBus, DiskConfig, ExitReason, VmConfig, VmHandle,
};
use hci_core::memory::MemBlockDevice;

/// Generous: OVMF under TCG on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(180);
const HELLO: &str = "hello from a UEFI application, firmware: ";

/// Whether one of the backend's OVMF (code, variables) pairs is installed.
fn ovmf_installed() -> bool {
    OVMF_CANDIDATES
        .iter()
        .any(|(code, vars)| Path::new(code).is_file() && Path::new(vars).is_file())
}

/// A UEFI application: `efi_main(ImageHandle, SystemTable)` (Microsoft x64
/// ABI) prints [`HELLO`] and `SystemTable->FirmwareVendor` through
/// `ConOut->OutputString`, then `RuntimeServices->ResetSystem(EfiResetCold)`.
/// Position-independent, so no relocations are needed wherever OVMF loads it.
fn uefi_app(dir: &Path) -> Vec<u8> {
    // Offsets (UEFI 2.x, x86-64): EFI_SYSTEM_TABLE.FirmwareVendor 24,
    // .ConOut 64, .RuntimeServices 88; OutputString 8 in the text output
    // protocol; ResetSystem 104 in EFI_RUNTIME_SERVICES. The strings stay
    // in .text: the image has a single loaded section.
    let src = format!(
        r#"
        .text
        .globl efi_main
efi_main:
        push %rbx
        sub $32, %rsp
        mov %rdx, %rbx
        mov 64(%rbx), %rcx
        lea msg(%rip), %rdx
        call *8(%rcx)
        mov 64(%rbx), %rcx
        mov 24(%rbx), %rdx
        call *8(%rcx)
        mov 64(%rbx), %rcx
        lea crlf(%rip), %rdx
        call *8(%rcx)
        mov 88(%rbx), %rax
        xor %ecx, %ecx
        xor %edx, %edx
        xor %r8d, %r8d
        xor %r9d, %r9d
        call *104(%rax)
1:      hlt
        jmp 1b
        .balign 2
msg:    .string16 "{HELLO}"
crlf:   .string16 "\r\n"
"#
    );
    std::fs::create_dir_all(dir).expect("dir");
    let (s, obj, efi) = (
        dir.join("hello.S"),
        dir.join("hello.o"),
        dir.join("hello.efi"),
    );
    std::fs::write(&s, src).expect("write hello.S");
    let ok = Command::new("gcc")
        .args(["-c", "-o"])
        .arg(&obj)
        .arg(&s)
        .status()
        .expect("run gcc");
    assert!(ok.success(), "gcc failed on the UEFI application");
    // Subsystem 10: EFI application.
    let ok = Command::new("ld")
        .args(["-m", "i386pep", "--subsystem", "10", "-e", "efi_main", "-o"])
        .arg(&efi)
        .arg(&obj)
        .status()
        .expect("run ld");
    assert!(
        ok.success(),
        "ld -m i386pep failed (GNU ld needs its PE emulation)"
    );
    let b = std::fs::read(&efi).expect("read hello.efi");
    assert_eq!(&b[..2], b"MZ", "not a PE image");
    b
}

/// A FAT image (no partition table: OVMF mounts the whole disk) with
/// `app` as `EFI/BOOT/BOOTX64.EFI`.
fn esp_image(app: &[u8]) -> Vec<u8> {
    let mut img = Cursor::new(vec![0u8; 4 << 20]);
    fatfs::format_volume(
        &mut img,
        fatfs::FormatVolumeOptions::new().volume_label(*b"HCI-ESP    "),
    )
    .expect("format FAT");
    img.seek(SeekFrom::Start(0)).expect("rewind");
    {
        let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).expect("open FAT");
        {
            let boot = fs
                .root_dir()
                .create_dir("EFI")
                .and_then(|d| d.create_dir("BOOT"))
                .expect("mkdir EFI/BOOT");
            let mut f = boot.create_file("BOOTX64.EFI").expect("create BOOTX64.EFI");
            f.truncate().expect("truncate");
            f.write_all(app).expect("write BOOTX64.EFI");
            f.flush().expect("flush");
        }
        fs.unmount().expect("unmount");
    }
    img.into_inner()
}

fn uefi_config(name: &str, disk: DiskConfig) -> VmConfig {
    let run_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("run-qemu")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).expect("run dir");
    VmConfig {
        name: name.into(),
        cpus: 1,
        memory: 128 << 20,
        boot: BootSource::Firmware { uefi: true },
        disks: vec![disk],
        nics: vec![],
        cloud_init_seed: None,
        run_dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ovmf_runs_a_uefi_application_from_a_disk_served_over_nbd() {
    if !ovmf_installed() {
        eprintln!(
            "SKIPPED: no OVMF ({OVMF_CANDIDATES:?}): install the Debian package ovmf \
             (scripts/install-deps.sh does)"
        );
        return;
    }
    let hv = QemuHypervisor::new();
    hv.resolve_binary()
        .expect("the QEMU tests need qemu-system-x86_64 (scripts/install-deps.sh installs it)");

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("uefi-app");
    let img = esp_image(&uefi_app(&dir));
    let dev = Arc::new(MemBlockDevice::new(img.len() as u64));
    dev.write_at(&img, 0, WriteFlags::default())
        .await
        .expect("write the FAT image");
    let config = uefi_config(
        "uefi-nbd",
        DiskConfig {
            name: "esp".into(),
            backend: DiskBackend::Device(dev as Arc<dyn BlockDevice>),
            bus: DiskBus::Virtio,
            read_only: false,
            boot_order: Some(1),
        },
    );
    let vars = config.run_dir.join("OVMF_VARS.fd");

    let vm = hv.create_vm(config).await.expect("create");
    // The VM writes to a copy of the variable store of its own.
    assert!(vars.is_file(), "no per-VM {}", vars.display());
    vm.start().await.expect("start");
    let reason = tokio::time::timeout(WAIT, vm.wait())
        .await
        .expect("the UEFI application resets the VM")
        .expect("wait");
    let console = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
    // OVMF's own line, then ours with the vendor from the system table.
    assert!(console.contains("BdsDxe: starting"), "console: {console:?}");
    assert!(
        console.contains(&format!("{HELLO}EDK II")),
        "console: {console:?}"
    );
    assert_eq!(reason, ExitReason::Reset, "console: {console:?}");
}
