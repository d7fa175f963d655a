//! The `qemu-system-x86_64` command line for a VM, generated from a
//! [`LaunchSpec`] (a [`VmConfig`](hci_core::compute::VmConfig) with every
//! path, socket and descriptor already resolved). Pure: no files are touched,
//! so every shape is unit-tested.
//!
//! Layout: `-M pc` (i440fx: PIIX IDE for CD-ROMs, i8042 for test guests'
//! reset), `-nodefaults`, no display, `-S` (the VM starts paused; `cont`
//! over QMP boots it), `-no-reboot` (a guest reset ends the VM, as on the
//! KVM backend). Block devices are `-blockdev` JSON (no comma escaping, no
//! format probing); the serial port and QMP are unix-socket chardevs.

use std::fmt::Write as _;
use std::os::fd::RawFd;
use std::path::PathBuf;

use hci_core::compute::{DiskBus, NicModel};
use serde_json::{Value, json};

/// CPU acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm` (`-cpu host`).
    Kvm,
    /// QEMU's binary translator (works everywhere, slower).
    Tcg,
}

impl Accel {
    /// The `-accel` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Direct kernel boot (`-kernel`, `-initrd`, `-append`; Linux bzImage or PVH ELF).
    Kernel {
        /// Kernel image.
        kernel: PathBuf,
        /// Initial ramdisk.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
    /// SeaBIOS (QEMU's default firmware) boots from the disks.
    Bios,
    /// UEFI (OVMF): read-only code and a per-VM copy of the variable store.
    Uefi {
        /// `OVMF_CODE*.fd`.
        code: PathBuf,
        /// The VM's own writable copy of `OVMF_VARS*.fd`.
        vars: PathBuf,
    },
}

/// Where a disk's data comes from, as QEMU sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// An NBD export on a unix socket.
    NbdUnix {
        /// Socket path.
        socket: PathBuf,
        /// Export name.
        export: String,
    },
    /// An NBD export over TCP.
    NbdTcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
        /// Export name.
        export: String,
    },
    /// A raw file (or ISO) on the host.
    File(PathBuf),
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    /// Disk name (unique in the VM; used in QEMU ids).
    pub name: String,
    /// Data source.
    pub source: DiskSource,
    /// Bus.
    pub bus: DiskBus,
    /// Read-only.
    pub read_only: bool,
    /// Firmware boot order.
    pub boot_order: Option<u32>,
    /// Serial number the guest sees (virtio-blk: `/dev/disk/by-id/virtio-SERIAL`).
    pub serial: Option<String>,
}

/// The host side of a NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapArg {
    /// Attach to the TAP by name.
    Name(String),
    /// A TAP queue descriptor QEMU inherits.
    Fd(RawFd),
}

/// One NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicArg {
    /// NIC name (unique in the VM).
    pub name: String,
    /// The TAP.
    pub tap: TapArg,
    /// Guest MAC.
    pub mac: [u8; 6],
    /// Device model.
    pub model: NicModel,
    /// MTU offered to the guest (0: default).
    pub mtu: u16,
}

/// Everything needed to write the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// VM name.
    pub name: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Acceleration.
    pub accel: Accel,
    /// Boot method.
    pub boot: Boot,
    /// Disks in order.
    pub disks: Vec<DiskArg>,
    /// NICs in order.
    pub nics: Vec<NicArg>,
    /// QMP socket path (QEMU listens).
    pub qmp_socket: PathBuf,
    /// Serial console socket path (QEMU listens).
    pub console_socket: PathBuf,
    /// Extra arguments appended verbatim (expert use; tests).
    pub extra: Vec<String>,
}

/// Escapes a value for QEMU's `key=value,...` option syntax (`,` → `,,`).
pub fn escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn mac_str(mac: [u8; 6]) -> String {
    let mut s = String::new();
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// QEMU ids allow letters, digits, `-`, `.`, `_` and must start with a letter.
pub fn qemu_id(prefix: &str, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}-{clean}")
}

fn blockdev(d: &DiskArg, node: &str) -> Value {
    let mut v = match &d.source {
        DiskSource::NbdUnix { socket, export } => json!({
            "driver": "nbd",
            "server": { "type": "unix", "path": socket },
            "export": export,
        }),
        DiskSource::NbdTcp { host, port, export } => json!({
            "driver": "nbd",
            "server": { "type": "inet", "host": host, "port": port.to_string() },
            "export": export,
        }),
        DiskSource::File(path) => json!({ "driver": "file", "filename": path }),
    };
    v["node-name"] = json!(node);
    v["read-only"] = json!(d.read_only);
    if !d.read_only {
        v["discard"] = json!("unmap");
    }
    v
}

/// The arguments (without the program name).
pub fn args(spec: &LaunchSpec) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&["-S", "-no-reboot"]);
    push(&[
        "-name",
        &format!("guest={},debug-threads=on", escape(&spec.name)),
    ]);
    push(&["-machine", "pc", "-accel", spec.accel.as_str()]);
    if spec.accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-smp", &spec.cpus.to_string()]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    match &spec.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            push(&["-kernel", &kernel.display().to_string()]);
            if let Some(i) = initrd {
                push(&["-initrd", &i.display().to_string()]);
            }
            if !cmdline.is_empty() {
                push(&["-append", cmdline]);
            }
        }
        Boot::Bios => {}
        Boot::Uefi { code, vars } => {
            push(&[
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    escape(&code.display().to_string())
                ),
            ]);
            push(&[
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    escape(&vars.display().to_string())
                ),
            ]);
        }
    }
    // The serial console and the monitor.
    push(&[
        "-chardev",
        &format!(
            "socket,id=console,path={},server=on,wait=off",
            escape(&spec.console_socket.display().to_string())
        ),
        "-serial",
        "chardev:console",
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            escape(&spec.qmp_socket.display().to_string())
        ),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    // Controllers, once each, when some disk needs them.
    if spec.disks.iter().any(|d| d.bus == DiskBus::Sata) {
        push(&["-device", "ahci,id=ahci0"]);
    }
    if spec.disks.iter().any(|d| d.bus == DiskBus::Scsi) {
        push(&["-device", "virtio-scsi-pci,id=scsi0"]);
    }
    let (mut sata, mut ide) = (0u32, 0u32);
    for d in &spec.disks {
        let node = qemu_id("drive", &d.name);
        let id = qemu_id("disk", &d.name);
        push(&["-blockdev", &blockdev(d, &node).to_string()]);
        let mut dev = match d.bus {
            DiskBus::Virtio => format!("virtio-blk-pci,drive={node},id={id}"),
            DiskBus::Scsi => format!("scsi-hd,drive={node},id={id},bus=scsi0.0"),
            DiskBus::Sata => {
                let s = format!("ide-hd,drive={node},id={id},bus=ahci0.{sata}");
                sata += 1;
                s
            }
            DiskBus::Cdrom => {
                let s = format!("ide-cd,drive={node},id={id},bus=ide.{}", ide / 2);
                let s = format!("{s},unit={}", ide % 2);
                ide += 1;
                s
            }
        };
        if let Some(o) = d.boot_order {
            let _ = write!(dev, ",bootindex={o}");
        }
        if let Some(s) = &d.serial
            && matches!(d.bus, DiskBus::Virtio | DiskBus::Scsi | DiskBus::Sata)
        {
            let _ = write!(dev, ",serial={}", escape(s));
        }
        push(&["-device", &dev]);
    }
    for n in &spec.nics {
        let id = qemu_id("net", &n.name);
        let tap = match &n.tap {
            TapArg::Name(t) => format!("ifname={},script=no,downscript=no", escape(t)),
            TapArg::Fd(fd) => format!("fd={fd}"),
        };
        push(&["-netdev", &format!("tap,id={id},{tap}")]);
        let model = match n.model {
            NicModel::Virtio => "virtio-net-pci",
            NicModel::E1000 => "e1000",
        };
        let mut dev = format!(
            "{model},netdev={id},id={},mac={}",
            qemu_id("nic", &n.name),
            mac_str(n.mac)
        );
        if n.mtu != 0 && n.model == NicModel::Virtio {
            let _ = write!(dev, ",host_mtu={}", n.mtu);
        }
        push(&["-device", &dev]);
    }
    a.extend(spec.extra.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> LaunchSpec {
        LaunchSpec {
            name: "vm1".into(),
            cpus: 2,
            memory_mib: 256,
            accel: Accel::Tcg,
            boot: Boot::Kernel {
                kernel: "/k/vmlinuz".into(),
                initrd: Some("/k/initrd".into()),
                cmdline: "console=ttyS0 quiet".into(),
            },
            disks: vec![],
            nics: vec![],
            qmp_socket: "/run/vm1/qmp.sock".into(),
            console_socket: "/run/vm1/console.sock".into(),
            extra: vec![],
        }
    }

    /// The value following `flag`, for every occurrence.
    fn values<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn kernel_boot_under_tcg() {
        let a = args(&base());
        assert_eq!(values(&a, "-accel"), ["tcg"]);
        assert!(!a.contains(&"-cpu".to_string()), "no -cpu host under TCG");
        assert_eq!(values(&a, "-smp"), ["2"]);
        assert_eq!(values(&a, "-m"), ["256M"]);
        assert_eq!(values(&a, "-kernel"), ["/k/vmlinuz"]);
        assert_eq!(values(&a, "-initrd"), ["/k/initrd"]);
        assert_eq!(values(&a, "-append"), ["console=ttyS0 quiet"]);
        assert_eq!(values(&a, "-machine"), ["pc"]);
        assert_eq!(
            values(&a, "-chardev"),
            [
                "socket,id=console,path=/run/vm1/console.sock,server=on,wait=off",
                "socket,id=qmp,path=/run/vm1/qmp.sock,server=on,wait=off"
            ]
        );
        assert_eq!(values(&a, "-serial"), ["chardev:console"]);
        for f in ["-S", "-no-reboot", "-nodefaults"] {
            assert!(a.contains(&f.to_string()), "{f} missing");
        }
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_firmware_boots_have_no_kernel() {
        let mut s = base();
        s.accel = Accel::Kvm;
        s.boot = Boot::Bios;
        let a = args(&s);
        assert_eq!(values(&a, "-accel"), ["kvm"]);
        assert_eq!(values(&a, "-cpu"), ["host"]);
        assert!(values(&a, "-kernel").is_empty());
        assert!(values(&a, "-drive").is_empty());
        s.boot = Boot::Uefi {
            code: "/fw/CODE.fd".into(),
            vars: "/run/a,b/VARS.fd".into(),
        };
        let a = args(&s);
        assert_eq!(
            values(&a, "-drive"),
            [
                "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd",
                "if=pflash,format=raw,unit=1,file=/run/a,,b/VARS.fd"
            ]
        );
    }

    #[test]
    fn disks_on_every_bus() {
        let mut s = base();
        let disk = |name: &str, source: DiskSource, bus, ro| DiskArg {
            name: name.into(),
            source,
            bus,
            read_only: ro,
            boot_order: None,
            serial: None,
        };
        s.disks = vec![
            DiskArg {
                boot_order: Some(1),
                serial: Some("root".into()),
                ..disk(
                    "root",
                    DiskSource::NbdUnix {
                        socket: "/run/vm1/nbd.sock".into(),
                        export: "root".into(),
                    },
                    DiskBus::Virtio,
                    false,
                )
            },
            disk(
                "iso",
                DiskSource::File("/img/debian.iso".into()),
                DiskBus::Cdrom,
                true,
            ),
            disk(
                "data",
                DiskSource::NbdTcp {
                    host: "10.0.0.5".into(),
                    port: 10809,
                    export: "data".into(),
                },
                DiskBus::Scsi,
                false,
            ),
            disk(
                "old",
                DiskSource::File("/img/old.raw".into()),
                DiskBus::Sata,
                false,
            ),
        ];
        let a = args(&s);
        let bd: Vec<Value> = values(&a, "-blockdev")
            .iter()
            .map(|j| serde_json::from_str(j).unwrap())
            .collect();
        assert_eq!(
            bd[0],
            json!({"driver": "nbd", "server": {"type": "unix", "path": "/run/vm1/nbd.sock"},
                   "export": "root", "node-name": "drive-root", "read-only": false, "discard": "unmap"})
        );
        assert_eq!(
            bd[1],
            json!({"driver": "file", "filename": "/img/debian.iso", "node-name": "drive-iso", "read-only": true})
        );
        assert_eq!(
            bd[2]["server"],
            json!({"type": "inet", "host": "10.0.0.5", "port": "10809"})
        );
        assert_eq!(
            values(&a, "-device"),
            [
                "ahci,id=ahci0",
                "virtio-scsi-pci,id=scsi0",
                "virtio-blk-pci,drive=drive-root,id=disk-root,bootindex=1,serial=root",
                "ide-cd,drive=drive-iso,id=disk-iso,bus=ide.0,unit=0",
                "scsi-hd,drive=drive-data,id=disk-data,bus=scsi0.0",
                "ide-hd,drive=drive-old,id=disk-old,bus=ahci0.0",
            ]
        );
    }

    #[test]
    fn nics_by_name_and_by_descriptor() {
        let mut s = base();
        s.nics = vec![
            NicArg {
                name: "nic0".into(),
                tap: TapArg::Fd(7),
                mac: [0x02, 0, 0, 0, 0, 0x2a],
                model: NicModel::Virtio,
                mtu: 1450,
            },
            NicArg {
                name: "legacy".into(),
                tap: TapArg::Name("tap1".into()),
                mac: [0x52, 0x54, 0, 0xab, 0xcd, 0xef],
                model: NicModel::E1000,
                mtu: 1500,
            },
        ];
        let a = args(&s);
        assert_eq!(
            values(&a, "-netdev"),
            [
                "tap,id=net-nic0,fd=7",
                "tap,id=net-legacy,ifname=tap1,script=no,downscript=no"
            ]
        );
        assert_eq!(
            values(&a, "-device"),
            [
                "virtio-net-pci,netdev=net-nic0,id=nic-nic0,mac=02:00:00:00:00:2a,host_mtu=1450",
                "e1000,netdev=net-legacy,id=nic-legacy,mac=52:54:00:ab:cd:ef"
            ]
        );
    }

    #[test]
    fn names_and_paths_with_commas_cannot_inject_options() {
        let mut s = base();
        s.name = "a,b".into();
        s.console_socket = "/tmp/x,server=off/c.sock".into();
        let a = args(&s);
        assert_eq!(values(&a, "-name"), ["guest=a,,b,debug-threads=on"]);
        assert!(
            values(&a, "-chardev")[0]
                .starts_with("socket,id=console,path=/tmp/x,,server=off/c.sock,")
        );
        assert_eq!(qemu_id("disk", "a b/c"), "disk-a_b_c");
    }

    #[test]
    fn extra_arguments_come_last() {
        let mut s = base();
        s.extra = vec!["-global".into(), "x=y".into()];
        let a = args(&s);
        assert_eq!(&a[a.len() - 2..], ["-global", "x=y"]);
    }
}
