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
//! Then a real Linux through UEFI: Debian's cloud kernel (an EFI-stub PE)
//! on a FAT disk with a `startup.nsh` that OVMF's UEFI shell runs (no
//! `BOOTX64.EFI` there, so the boot manager falls through to the shell),
//! giving the kernel its command line and an initramfs from the same disk.
//! Its `/init` (a few lines of assembly) mounts sysfs, prints whether
//! `/sys/firmware/efi` exists — the kernel's own word that it was booted by
//! UEFI — and reboots.
//!
//! Skipped, with a message, where OVMF is not installed. Under TCG OVMF
//! takes a few seconds to reach the boot manager, the shell counts down
//! five before `startup.nsh`, and the kernel boots in a few more.

mod common;

use std::io::{Cursor, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{cpio_entry, debian_cloud_kernel};
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
    fat_image(&[("EFI/BOOT/BOOTX64.EFI", app)])
}

/// A FAT image holding `files` (paths with `/`; directories are created).
fn fat_image(files: &[(&str, &[u8])]) -> Vec<u8> {
    let payload: usize = files.iter().map(|(_, d)| d.len()).sum();
    let mut img = Cursor::new(vec![0u8; (payload + (4 << 20)).next_multiple_of(1 << 20)]);
    fatfs::format_volume(
        &mut img,
        fatfs::FormatVolumeOptions::new().volume_label(*b"HCI-ESP    "),
    )
    .expect("format FAT");
    img.seek(SeekFrom::Start(0)).expect("rewind");
    {
        let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).expect("open FAT");
        for (path, data) in files {
            let (dirs, name) = path.rsplit_once('/').unwrap_or(("", path));
            let mut dir = fs.root_dir();
            for d in dirs.split('/').filter(|d| !d.is_empty()) {
                dir = dir.create_dir(d).expect("mkdir");
            }
            let mut f = dir.create_file(name).expect("create a file");
            f.truncate().expect("truncate");
            f.write_all(data).expect("write a file");
            f.flush().expect("flush");
        }
        fs.unmount().expect("unmount");
    }
    img.into_inner()
}

fn uefi_config(name: &str, memory_mib: u64, disk: DiskConfig) -> VmConfig {
    let run_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("run-qemu")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).expect("run dir");
    VmConfig {
        name: name.into(),
        cpus: 1,
        memory: memory_mib << 20,
        boot: BootSource::Firmware { uefi: true },
        disks: vec![disk],
        nics: vec![],
        cloud_init_seed: None,
        run_dir,
    }
}

/// The backend, or `None` (with a message) where OVMF is not installed.
fn uefi_hv() -> Option<QemuHypervisor> {
    if !ovmf_installed() {
        eprintln!(
            "SKIPPED: no OVMF ({OVMF_CANDIDATES:?}): install the Debian package ovmf \
             (scripts/install-deps.sh does)"
        );
        return None;
    }
    let hv = QemuHypervisor::new();
    hv.resolve_binary()
        .expect("the QEMU tests need qemu-system-x86_64 (scripts/install-deps.sh installs it)");
    Some(hv)
}

/// Runs `config` to its end; returns the exit reason and the console.
async fn run(hv: &QemuHypervisor, config: VmConfig) -> (ExitReason, String) {
    let vm = hv.create_vm(config).await.expect("create");
    vm.start().await.expect("start");
    let reason = tokio::time::timeout(WAIT, vm.wait()).await;
    let console = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
    let reason = reason
        .unwrap_or_else(|_| panic!("the VM did not end in {WAIT:?}; console: {console:?}"))
        .expect("wait");
    (reason, console)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ovmf_runs_a_uefi_application_from_a_disk_served_over_nbd() {
    let Some(hv) = uefi_hv() else { return };

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("uefi-app");
    let img = esp_image(&uefi_app(&dir));
    let dev = Arc::new(MemBlockDevice::new(img.len() as u64));
    dev.write_at(&img, 0, WriteFlags::default())
        .await
        .expect("write the FAT image");
    let config = uefi_config(
        "uefi-nbd",
        128,
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

/// `/init`: mounts sysfs on /sys, prints [`EFI_YES`] or [`EFI_NO`] by
/// whether `/sys/firmware/efi` exists, and reboots (`-no-reboot`: the VM
/// ends with a reset). A static x86-64 ELF, no libc.
fn init_binary(dir: &Path) -> Vec<u8> {
    let src = format!(
        r#"
        .text
        .globl _start
_start:
        mov $165, %eax              # mount("sysfs", "/sys", "sysfs", 0, 0)
        lea sysfs(%rip), %rdi
        lea sys(%rip), %rsi
        lea sysfs(%rip), %rdx
        xor %r10d, %r10d
        xor %r8d, %r8d
        syscall
        mov $21, %eax               # access("/sys/firmware/efi", F_OK)
        lea efi(%rip), %rdi
        xor %esi, %esi
        syscall
        lea no(%rip), %rsi
        mov $no_len, %edx
        test %eax, %eax
        jnz 1f
        lea yes(%rip), %rsi
        mov $yes_len, %edx
1:      mov $1, %eax                # write(1, …)
        mov $1, %edi
        syscall
        mov $169, %eax              # reboot(MAGIC1, MAGIC2, RESTART)
        mov $0xfee1dead, %edi
        mov $672274793, %esi
        mov $0x01234567, %edx
        syscall
2:      jmp 2b
sysfs:  .asciz "sysfs"
sys:    .asciz "/sys"
efi:    .asciz "/sys/firmware/efi"
yes:    .ascii "{EFI_YES}\n"
        yes_len = . - yes
no:     .ascii "{EFI_NO}\n"
        no_len = . - no
"#
    );
    std::fs::create_dir_all(dir).expect("dir");
    let (s, bin) = (dir.join("init.S"), dir.join("init"));
    std::fs::write(&s, src).expect("write init.S");
    let ok = Command::new("gcc")
        .args(["-nostdlib", "-static", "-no-pie", "-o"])
        .arg(&bin)
        .arg(&s)
        .status()
        .expect("run gcc");
    assert!(ok.success(), "gcc failed on /init");
    std::fs::read(&bin).expect("read init")
}

const EFI_YES: &str = "hci-init: booted by UEFI (/sys/firmware/efi exists)";
const EFI_NO: &str = "hci-init: /sys/firmware/efi is missing";

/// A `newc` initramfs: /dev/console, /sys and [`init_binary`] as /init.
fn initramfs(init: &[u8]) -> Vec<u8> {
    let mut c = Vec::new();
    cpio_entry(&mut c, 1, "dev", 0o040755, (0, 0), &[]);
    cpio_entry(&mut c, 2, "dev/console", 0o020600, (5, 1), &[]);
    cpio_entry(&mut c, 3, "sys", 0o040755, (0, 0), &[]);
    cpio_entry(&mut c, 4, "init", 0o100755, (0, 0), init);
    cpio_entry(&mut c, 0, "TRAILER!!!", 0, (0, 0), &[]);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_boots_through_ovmf_and_the_uefi_shell() {
    let Some(hv) = uefi_hv() else { return };
    let (kernel, _) = debian_cloud_kernel();
    let kernel = std::fs::read(&kernel).expect("read the kernel");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("uefi-linux");
    let initrd = initramfs(&init_binary(&dir));
    // panic=-1: should the kernel not reach /init, it resets rather than hangs.
    let nsh = b"FS0:\\vmlinuz console=ttyS0 initrd=\\initrd.img panic=-1\r\n";
    let img = fat_image(&[
        ("vmlinuz", &kernel),
        ("initrd.img", &initrd),
        ("startup.nsh", nsh),
    ]);
    let path = dir.join("esp.img");
    std::fs::write(&path, img).expect("write the image");
    // 256 MiB: with 128 the shell ran the kernel and nothing more was
    // printed (not looked into further).
    let config = uefi_config(
        "uefi-linux",
        256,
        DiskConfig {
            name: "esp".into(),
            backend: DiskBackend::File(path),
            bus: DiskBus::Virtio,
            read_only: true,
            boot_order: Some(1),
        },
    );
    let (reason, console) = run(&hv, config).await;
    assert!(console.contains("Linux version"), "console: {console:?}");
    assert!(console.contains(EFI_YES), "console: {console:?}");
    assert_eq!(reason, ExitReason::Reset, "console: {console:?}");
}
