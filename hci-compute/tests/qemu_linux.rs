//! Real Linux guests on the QEMU backend, end to end.
//!
//! Debian's cloud kernel (`linux-image-cloud-amd64`) boots with an
//! initramfs this test builds from Debian's `busybox-static` and the
//! kernel's own virtio/vfat modules (cpio written here, in Rust). Two VMs sit
//! on an hci-net bridge network (in a network namespace standing for the
//! node) whose DHCP server is hci-net's; the first VM
//!
//! - mounts its cloud-init NoCloud seed (written by `hci_compute::qemu::seed`)
//!   and prints what it read, and reads an image on its IDE CD-ROM,
//! - writes and reads back patterns on its disk, a 2-replica replicated
//!   volume served to QEMU over NBD by this process — one replica server is
//!   torn down between the writes, and the guest sees no error,
//! - gets a DHCP lease and pings the second VM, then powers off.
//!
//! Needs root (namespaces, bridges, TAPs), qemu-system-x86,
//! linux-image-cloud-amd64 and busybox-static (scripts/install-deps.sh).
//! Under TCG the kernel boots in seconds; on a loaded machine allow minutes.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{cpio_entry, debian_cloud_kernel};
use hci_compute::qemu::QemuHypervisor;
use hci_compute::qemu::QemuVm;
use hci_compute::qemu::seed::NoCloudSeed;
use hci_core::block::BlockDevice;
use hci_core::compute::{
    BootSource, DiskBackend, DiskBus, DiskConfig, ExitReason, Migratable, MigrationOptions,
    MigrationProgress, NicConfig, NicModel, VmConfig, VmHandle,
};
use hci_core::net::{DhcpConfig, NetworkBackend, NetworkConfig, NetworkKind, PortConfig};
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};
use hci_net::{BackendOptions, LinuxBridgeBackend, NetNs};
use hci_storage::engine::{EngineOptions, ReplicatedVolumeBackend};
use hci_storage::replica::ReplicaNode;
use hci_storage::replica::client::{RemoteNode, ServerAddr};
use hci_storage::replica::server::ReplicaServer;
use tokio::io::AsyncWriteExt;

/// Generous: two TCG guests on a shared 2-core machine.
const BOOT_WAIT: Duration = Duration::from_secs(300);
const TOKEN: &str = "qemu-linux-test";

// ---------------------------------------------------------------- the guest

/// `wanted` modules and their dependencies, dependencies first, as paths
/// relative to the module directory (from `modules.dep`).
fn module_load_order(modules: &Path, wanted: &[&str]) -> Vec<String> {
    let dep = std::fs::read_to_string(modules.join("modules.dep")).expect("read modules.dep");
    let mut deps: HashMap<String, Vec<String>> = HashMap::new();
    let mut by_name: HashMap<String, String> = HashMap::new();
    for line in dep.lines() {
        let Some((m, rest)) = line.split_once(':') else {
            continue;
        };
        let name = Path::new(m)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next())
            .unwrap_or_default()
            .replace('-', "_");
        by_name.insert(name, m.to_string());
        deps.insert(
            m.to_string(),
            rest.split_whitespace().map(str::to_string).collect(),
        );
    }
    fn visit(
        m: &str,
        deps: &HashMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(m.to_string()) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, seen, out);
        }
        out.push(m.to_string());
    }
    let (mut seen, mut out) = (BTreeSet::new(), Vec::new());
    for w in wanted {
        let m = by_name
            .get(*w)
            .unwrap_or_else(|| panic!("module {w} is not in modules.dep (built in?)"));
        visit(m, &deps, &mut seen, &mut out);
    }
    out
}

/// The guest's /init. `hci.role=main` runs the checks; `hci.role=peer`
/// only takes a lease and stays up to be pinged.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
role=$(sed -n 's/.*hci\.role=\([a-z]*\).*/\1/p' /proc/cmdline)
peer=$(sed -n 's/.*hci\.peer=\([0-9.]*\).*/\1/p' /proc/cmdline)
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "HCI: insmod $m failed"; done
echo "HCI: up role=$role uptime=$(cut -d' ' -f1 /proc/uptime)"
disk_with_serial() {
    for b in /sys/block/vd*; do
        [ "$(cat $b/serial 2>/dev/null)" = "$1" ] && { echo /dev/${b##*/}; return; }
    done
}
if [ "$role" = main ]; then
    seed=$(disk_with_serial cidata)
    mkdir -p /seed
    if mount -t vfat -o ro "$seed" /seed; then
        # busybox-static has no blkid: the FAT12/16 label is at byte 43 of the boot sector.
        echo "HCI: seed label=$(dd if="$seed" bs=1 skip=43 count=11 2>/dev/null | tr -d ' ')"
        echo "HCI: seed files=$(ls /seed | tr '\n' ' ')"
        echo "HCI: meta-data instance-id=$(sed -n 's/^instance-id: "\(.*\)"/\1/p' /seed/meta-data)"
        echo "HCI: user-data first line=$(head -n1 /seed/user-data)"
        echo "HCI: user-data says=$(sed -n 's/^hci_message: //p' /seed/user-data)"
        umount /seed
    else
        echo "HCI: seed FAIL: cannot mount $seed"
    fi
    i=0; while [ ! -b /dev/sr0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    echo "HCI: cdrom says=$(dd if=/dev/sr0 bs=2048 count=1 2>/dev/null | head -c 20)"
    data=$(disk_with_serial data)
    echo "HCI: data disk $data $(cat /sys/block/${data#/dev/}/size) sectors"
    dd if=/dev/urandom of=/tmp/a bs=1M count=4 2>/dev/null
    dd if=/dev/urandom of=/tmp/b bs=1M count=4 2>/dev/null
    dd if=/tmp/a of=$data bs=1M seek=1 conv=fsync 2>/dev/null || echo "HCI: disk FAIL: write a"
    echo "HCI: wrote pattern a; waiting for go"
    read go
    echo "HCI: got $go"
    dd if=/tmp/b of=$data bs=1M seek=8 conv=fsync 2>/dev/null || echo "HCI: disk FAIL: write b"
    echo 3 > /proc/sys/vm/drop_caches
    dd if=$data of=/tmp/a2 bs=1M skip=1 count=4 2>/dev/null || echo "HCI: disk FAIL: read a"
    dd if=$data of=/tmp/b2 bs=1M skip=8 count=4 2>/dev/null || echo "HCI: disk FAIL: read b"
    if cmp -s /tmp/a /tmp/a2 && cmp -s /tmp/b /tmp/b2; then
        echo "HCI: disk patterns OK"
    else
        echo "HCI: disk FAIL: patterns differ"
    fi
    echo "HCI: kernel I/O errors=$(dmesg | grep -ci 'i/o error')"
fi
if [ "$role" = clock ]; then
    gip=$(sed -n 's/.*hci\.ip=\([0-9./]*\).*/\1/p' /proc/cmdline)
    if [ -n "$gip" ]; then
        ip link set eth0 up
        ip addr add "$gip" dev eth0
    fi
    # With a `data` disk: block N (4 KiB at N * 4 KiB) gets "hci-block N",
    # flushed, once a second.
    data=$(disk_with_serial data)
    n=0
    while true; do
        if [ -n "$data" ]; then
            n=$((n + 1))
            if printf 'hci-block %08d\n' $n | dd of=$data bs=4096 seek=$n conv=sync,fsync 2>/dev/null; then
                echo "HCI: wrote $n"
            else
                echo "HCI: disk FAIL $n"
            fi
        fi
        echo "HCI: uptime $(cut -d' ' -f1 /proc/uptime)"
        sleep 1
    done
fi
if [ "$role" = bench ]; then
    data=$(disk_with_serial data)
    now() { cut -d' ' -f1 /proc/uptime | tr -d .; }
    t0=$(now); dd if=/dev/zero of=$data bs=1M count=64 conv=fsync 2>/dev/null; t1=$(now)
    echo 3 > /proc/sys/vm/drop_caches
    t2=$(now); dd if=$data of=/dev/null bs=1M count=64 2>/dev/null; t3=$(now)
    echo "HCI: bench write_cs=$((t1 - t0)) read_cs=$((t3 - t2))"
    echo "HCI: bench done"
    poweroff -f
fi
ip link set lo up
ip link set eth0 up
if udhcpc -i eth0 -s /udhcpc.sh -n -q -t 20 -T 2 >/dev/null 2>&1; then
    echo "HCI: lease $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
else
    echo "HCI: no lease"
fi
if [ "$role" = main ]; then
    if ping -c 3 -W 5 "$peer" >/tmp/ping 2>&1; then
        echo "HCI: ping $peer OK"
    else
        echo "HCI: ping $peer FAIL: $(tail -n2 /tmp/ping | tr '\n' ' ')"
    fi
    echo "HCI: done"
    poweroff -f
fi
echo "HCI: peer ready"
while true; do sleep 3600; done
"#;

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew) ifconfig "$interface" "$ip" netmask "$subnet" up ;;
esac
exit 0
"#;

/// Whether an ELF64 file names a program interpreter (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
    };
    let Some(phoff) = elf
        .get(0x20..0x28)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
    else {
        return false;
    };
    let (size, count) = (u16_at(0x36) as usize, u16_at(0x38) as usize);
    (0..count).any(|i| {
        let o = phoff as usize + i * size;
        elf.get(o..o + 4) == Some(&3u32.to_le_bytes()[..]) // PT_INTERP
    })
}

/// Builds the initramfs (busybox, init, modules) into `dir`.
fn initramfs(modules: &Path, dir: &Path) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    let bb = std::fs::read(busybox)
        .expect("read /bin/busybox: install the Debian package busybox-static");
    assert!(
        !has_interpreter(&bb),
        "/bin/busybox is dynamically linked: install busybox-static"
    );
    let order = module_load_order(
        modules,
        &[
            "virtio_pci",
            "virtio_blk",
            "virtio_net",
            "vfat",
            "nls_cp437",
            "nls_ascii",
            "ata_piix",
            "sr_mod",
        ],
    );
    let mut c = Vec::new();
    let mut ino = 1;
    let mut add = |c: &mut Vec<u8>, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        cpio_entry(c, ino, name, mode, rdev, data);
        ino += 1;
    };
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
        "seed",
    ] {
        add(&mut c, d, 0o040755, (0, 0), &[]);
    }
    add(&mut c, "dev/console", 0o020600, (5, 1), &[]);
    add(&mut c, "bin/busybox", 0o100755, (0, 0), &bb);
    add(&mut c, "init", 0o100755, (0, 0), INIT.as_bytes());
    add(
        &mut c,
        "udhcpc.sh",
        0o100755,
        (0, 0),
        UDHCPC_SCRIPT.as_bytes(),
    );
    let mut list = String::new();
    for m in &order {
        assert!(
            m.ends_with(".ko"),
            "{m} is compressed; this initramfs builder expects plain .ko modules"
        );
        let data = std::fs::read(modules.join(m)).expect("read a module");
        let base = Path::new(m)
            .file_name()
            .and_then(|n| n.to_str())
            .expect("module file name");
        add(
            &mut c,
            &format!("lib/modules/{base}"),
            0o100644,
            (0, 0),
            &data,
        );
        list.push_str(base);
        list.push('\n');
    }
    add(&mut c, "modules.order", 0o100644, (0, 0), list.as_bytes());
    cpio_entry(&mut c, 0, "TRAILER!!!", 0, (0, 0), &[]);
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, c).expect("write the initramfs");
    path
}

// -------------------------------------------------------------- the node

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test creates a network namespace, a bridge and TAPs: run it as root"
    );
    assert!(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: TAP devices cannot be created"
    );
}

/// A network namespace standing for the node, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("hciq-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip (iproute2)");
        assert!(ok.success(), "ip netns add {name} failed");
        Netns { name }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A replica server on its own runtime and thread; [`ReplicaProc::crash`]
/// tears the runtime down at once (every connection reset, nothing flushed
/// politely), which is what a `kill -9` looks like to the engine.
struct ReplicaProc {
    addr: std::net::SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReplicaProc {
    fn start(root: PathBuf) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("replica runtime");
            let addr = rt.block_on(async {
                let server = ReplicaServer::new(root, TOKEN).expect("replica server");
                let (addr, _task) = server.spawn("127.0.0.1:0").await.expect("listen");
                addr
            });
            addr_tx.send(addr).expect("report the address");
            let _ = stop_rx.recv();
            rt.shutdown_background();
        });
        let addr = addr_rx.recv().expect("replica server address");
        ReplicaProc {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn node(&self) -> Arc<dyn ReplicaNode> {
        let mut sa = ServerAddr::new(self.addr.to_string(), TOKEN);
        sa.timeout = Duration::from_secs(5);
        Arc::new(RemoteNode::new(sa))
    }

    fn crash(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ReplicaProc {
    fn drop(&mut self) {
        self.crash();
    }
}

/// Kills the VMs when the test ends, passed or failed.
struct Guard(Vec<QemuVm>);

impl Drop for Guard {
    fn drop(&mut self) {
        for vm in &self.0 {
            if let Some(pid) = vm.pid() {
                // SAFETY: kill(2) on the QEMU child's pid; no memory involved.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

async fn wait_console(vm: &QemuVm, needle: &str) -> String {
    let hub = vm.console_hub().clone();
    let n = needle.to_string();
    let found = tokio::task::spawn_blocking(move || hub.wait_for(n.as_bytes(), BOOT_WAIT))
        .await
        .expect("wait task");
    let text = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
    assert!(
        found,
        "console of {} never showed {needle:?}; it said:\n{text}\nQEMU log:\n{}",
        vm.name(),
        std::fs::read_to_string(vm.run_dir().join("qemu.log")).unwrap_or_default()
    );
    text
}

fn run_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("run-qemu")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("run dir");
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_guests_boot_with_cloud_init_a_replicated_disk_dhcp_and_ping() {
    require_root();
    let hv = QemuHypervisor::new();
    hv.resolve_binary()
        .expect("needs qemu-system-x86_64 (scripts/install-deps.sh installs it)");
    let (kernel, modules) = debian_cloud_kernel();
    let work = run_dir("linux-work");
    let initrd = initramfs(&modules, &work);

    // The disk: a 2-replica volume on two replica servers.
    let mut replicas = [
        ReplicaProc::start(work.join("replica0")),
        ReplicaProc::start(work.join("replica1")),
    ];
    let backend = ReplicatedVolumeBackend::new(
        replicas.iter().map(ReplicaProc::node).collect(),
        EngineOptions {
            timeout: Duration::from_secs(5),
            ..EngineOptions::default()
        },
    )
    .expect("replicated backend");
    backend
        .create("data", CreateVolume::new(64 << 20))
        .await
        .expect("create the volume");
    let volume = backend
        .open_engine("data", OpenVolume::default())
        .await
        .expect("open the engine");

    // The cloud-init seed.
    let seed_path = work.join("seed.img");
    NoCloudSeed {
        instance_id: "i-hci-linux-1".into(),
        hostname: Some("linux-a".into()),
        ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI hci@test".into()],
        user_data: "#cloud-config\nhci_message: hello from the seed\n".into(),
        network_config: Some("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n".into()),
    }
    .write_vfat(&seed_path)
    .expect("write the seed");

    // The node's network: a bridge with hci-net's DHCP server, addresses reserved by MAC.
    let ns = Netns::new("linux");
    let net = LinuxBridgeBackend::new(BackendOptions {
        netns: NetNs::named(&ns.name).expect("open the namespace"),
        ..Default::default()
    })
    .await
    .expect("network backend");
    let (mac_a, mac_b) = (
        [0x02, 0x68, 0x63, 0x51, 0x00, 0x0a],
        [0x02, 0x68, 0x63, 0x51, 0x00, 0x0b],
    );
    let ip = |last: u8| -> std::net::IpAddr { format!("10.77.0.{last}").parse().expect("ip") };
    net.ensure_network(&NetworkConfig {
        name: "qlab".into(),
        kind: NetworkKind::Bridge { uplink: None },
        cidr: Some("10.77.0.0/24".parse().expect("cidr")),
        gateway: None,
        dhcp: Some(DhcpConfig {
            range_start: ip(100),
            range_end: ip(150),
            lease_time: Duration::from_secs(600),
            dns: vec![],
            reservations: vec![(mac_a, ip(10)), (mac_b, ip(11))],
        }),
        mtu: None,
    })
    .await
    .expect("ensure the network");
    let mut taps = Vec::new();
    for (port, mac) in [("qa-nic0", mac_a), ("qb-nic0", mac_b)] {
        let tap = net
            .attach_port(
                "qlab",
                &PortConfig {
                    name: port.into(),
                    mac,
                    queues: 1,
                },
            )
            .await
            .expect("attach a port");
        hv.register_tap(&tap);
        taps.push(tap);
    }

    let vm_config = |name: &str, role: &str, tap: &str, mac: [u8; 6]| VmConfig {
        name: name.into(),
        cpus: 1,
        memory: 256 << 20,
        boot: BootSource::Kernel {
            kernel: kernel.clone(),
            initrd: Some(initrd.clone()),
            cmdline: format!(
                "console=ttyS0 rdinit=/init panic=-1 quiet hci.role={role} hci.peer=10.77.0.11"
            ),
        },
        disks: vec![],
        nics: vec![NicConfig {
            name: "nic0".into(),
            tap: tap.into(),
            mac,
            model: NicModel::Virtio,
            mtu: 1500,
        }],
        cloud_init_seed: None,
        run_dir: run_dir(name),
    };
    let peer = hv
        .create_vm(vm_config("linux-b", "peer", &taps[1].ifname, mac_b))
        .await
        .expect("create the peer VM");
    let mut main_cfg = vm_config("linux-a", "main", &taps[0].ifname, mac_a);
    main_cfg.disks.push(DiskConfig {
        name: "data".into(),
        backend: DiskBackend::Device(volume.clone() as Arc<dyn BlockDevice>),
        bus: DiskBus::Virtio,
        read_only: false,
        boot_order: None,
    });
    main_cfg.cloud_init_seed = Some(seed_path);
    // A CD-ROM (IDE on the PIIX controller) holding an image with a marker.
    let iso = work.join("disk.iso");
    let mut iso_data = b"HCI-CDROM-IMAGE-0001".to_vec();
    iso_data.resize(1 << 20, 0);
    std::fs::write(&iso, iso_data).expect("write the CD-ROM image");
    main_cfg.disks.push(DiskConfig {
        name: "iso".into(),
        backend: DiskBackend::File(iso),
        bus: DiskBus::Cdrom,
        read_only: true,
        boot_order: None,
    });
    let main = hv.create_vm(main_cfg).await.expect("create the main VM");
    let _guard = Guard(vec![main.clone(), peer.clone()]);

    peer.start().await.expect("start the peer");
    main.start().await.expect("start the main VM");
    let up = wait_console(&main, "HCI: up role=main").await;
    assert!(!up.contains("insmod"), "a module failed to load:\n{up}");

    // cloud-init seed, as the guest read it.
    let text = wait_console(&main, "HCI: wrote pattern a; waiting for go").await;
    for line in [
        "HCI: seed label=CIDATA",
        "HCI: seed files=meta-data network-config user-data",
        "HCI: meta-data instance-id=i-hci-linux-1",
        "HCI: user-data first line=#cloud-config",
        "HCI: user-data says=hello from the seed",
        "HCI: cdrom says=HCI-CDROM-IMAGE-0001",
        "HCI: data disk /dev/vda 131072 sectors",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }

    // Lose one replica between the writes; the guest must not notice.
    replicas[1].crash();
    let mut console = main.console().await.expect("console");
    console
        .input
        .write_all(b"go\n")
        .await
        .expect("console input");
    let text = wait_console(&main, "HCI: done").await;
    for line in [
        "HCI: got go",
        "HCI: disk patterns OK",
        "HCI: kernel I/O errors=0",
        "HCI: lease 10.77.0.10/24",
        "HCI: ping 10.77.0.11 OK",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(!text.contains("FAIL"), "{text}");
    let status = volume.status().await;
    assert_eq!(
        status
            .replicas
            .iter()
            .filter(|r| r.state == hci_storage::engine::ReplicaState::Healthy)
            .count(),
        1,
        "the engine dropped the dead replica: {status:?}"
    );
    // The guest powered itself off.
    let reason = tokio::time::timeout(BOOT_WAIT, main.wait())
        .await
        .expect("the main VM stops")
        .expect("wait");
    assert_eq!(reason, ExitReason::Poweroff);
    let peer_text = wait_console(&peer, "HCI: peer ready").await;
    assert!(
        peer_text.contains("HCI: lease 10.77.0.11/24"),
        "{peer_text}"
    );
    let leases = net.leases("qlab").await.expect("leases");
    assert_eq!(leases.iter().filter(|l| l.bound).count(), 2, "{leases:?}");

    // The peer ignores ACPI (no acpid): shutdown kills it after the timeout.
    let r = peer
        .shutdown(Duration::from_millis(500))
        .await
        .expect("shutdown");
    assert_eq!(r, ExitReason::Killed);
    volume.close().await.expect("close the volume");
    net.remove_network("qlab")
        .await
        .expect("remove the network");
}

/// The guest uptimes (seconds) printed by the `clock` role so far.
fn uptimes(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("HCI: uptime ")?.parse().ok())
        .collect()
}

/// A QEMU that runs inside network namespace `ns` (`ip netns exec` execs
/// it, so the pid is QEMU's own).
fn qemu_in(ns: &str, dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("qemu-in-{ns}"));
    std::fs::write(
        &path,
        format!("#!/bin/sh\nexec ip netns exec {ns} qemu-system-x86_64 \"$@\"\n"),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// A real Linux guest moves between two nodes (network namespaces; each
/// QEMU runs in its node's namespace) and keeps running: its uptime
/// continues on the target, and pings from node a reach it throughout,
/// losing at most a few. Each node has an hci-net bridge network whose
/// uplink is its end of a veth pair between the nodes; the guest's NIC is a
/// port (same MAC) on the source node's bridge, then on the target's. The
/// migration stream crosses the same link. The guest writes and flushes a
/// numbered block a second to a 2-replica volume throughout: each node's
/// QEMU reaches it through its own engine, the target's takes it over at
/// the switch-over (the source's generation is refused from then on), and
/// every block the guest wrote, on either node, is there afterwards with no
/// I/O error in the guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linux_guest_migrates_between_two_nodes_and_its_uptime_continues() {
    require_root();
    let (kernel, modules) = debian_cloud_kernel();
    let work = run_dir("migrate-work");
    let initrd = initramfs(&modules, &work);
    let (a, b) = (Netns::new("node-a"), Netns::new("node-b"));
    let run = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "link", "add", "eth-a", "netns", &a.name, "type", "veth", "peer", "name", "eth-b", "netns",
        &b.name,
    ]);
    let mac = [0x02, 0x68, 0x63, 0x52, 0x00, 0x10];
    let mut nodes = Vec::new();
    for (ns, uplink, addr) in [(&a, "eth-a", "10.78.0.1/24"), (&b, "eth-b", "10.78.0.2/24")] {
        run(&["-n", &ns.name, "link", "set", "lo", "up"]);
        run(&["-n", &ns.name, "link", "set", uplink, "up"]);
        let net = LinuxBridgeBackend::new(BackendOptions {
            netns: NetNs::named(&ns.name).expect("open the namespace"),
            ..Default::default()
        })
        .await
        .expect("network backend");
        let st = net
            .ensure_network(&NetworkConfig {
                name: "mignet".into(),
                kind: NetworkKind::Bridge {
                    uplink: Some(uplink.into()),
                },
                cidr: None,
                gateway: None,
                dhcp: None,
                mtu: None,
            })
            .await
            .expect("ensure the network");
        run(&["-n", &ns.name, "addr", "add", addr, "dev", &st.bridge]);
        if ns.name == b.name {
            // hci-net derives a bridge's MAC from the network name, the same on
            // both nodes: give node b's its own, or the two hosts cannot talk.
            run(&[
                "-n",
                &ns.name,
                "link",
                "set",
                &st.bridge,
                "address",
                "02:68:63:52:00:02",
            ]);
        }
        let tap = net
            .attach_port(
                "mignet",
                &PortConfig {
                    name: "mig-nic0".into(),
                    mac,
                    queues: 1,
                },
            )
            .await
            .expect("attach the VM's port");
        let hv = QemuHypervisor::new().with_binary(qemu_in(&ns.name, &work));
        hv.register_tap(&tap);
        nodes.push((net, tap, hv));
    }
    // The guest's disk: a 2-replica volume on two replica servers.
    let replicas = [
        ReplicaProc::start(work.join("mig-replica0")),
        ReplicaProc::start(work.join("mig-replica1")),
    ];
    for r in &replicas {
        r.node()
            .backend()
            .create("migdata", CreateVolume::new(16 << 20))
            .await
            .expect("create the replica");
    }
    let token_file = work.join("replica-token");
    std::fs::write(&token_file, TOKEN).expect("token file");
    let disk = common::replicated_disk(
        "data",
        "migdata",
        replicas.iter().map(|r| r.addr.to_string()).collect(),
        token_file,
    );
    let config = |name: &str, tap: &str| VmConfig {
        name: name.into(),
        cpus: 1,
        memory: 256 << 20,
        boot: BootSource::Kernel {
            kernel: kernel.clone(),
            initrd: Some(initrd.clone()),
            cmdline:
                "console=ttyS0 rdinit=/init panic=-1 quiet hci.role=clock hci.ip=10.78.0.10/24"
                    .into(),
        },
        disks: vec![disk.clone()],
        nics: vec![NicConfig {
            name: "nic0".into(),
            tap: tap.into(),
            mac,
            model: NicModel::Virtio,
            mtu: 1500,
        }],
        cloud_init_seed: None,
        run_dir: run_dir(name),
    };
    let src = nodes[0]
        .2
        .create_vm(config("mig-src", &nodes[0].1.ifname))
        .await
        .expect("create on node a");
    let _guard = Guard(vec![src.clone()]);
    src.start().await.expect("start");
    wait_console(&src, "HCI: uptime").await;
    let ping = |count: &str, interval: &str| {
        Command::new("ip")
            .args([
                "netns", "exec", &a.name, "ping", "-n", "-c", count, "-i", interval, "-W", "1",
            ])
            .arg("10.78.0.10")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ping")
    };
    // The guest answers from node a first.
    let mut reached = false;
    for _ in 0..60 {
        if ping("1", "1").wait().is_ok_and(|s| s.success()) {
            reached = true;
            break;
        }
    }
    assert!(reached, "the guest never answered a ping on node a");
    let node_b_reached = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a.name,
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "10.78.0.2",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !node_b_reached {
        let show = |args: &[&str]| {
            let o = Command::new(args[0])
                .args(&args[1..])
                .output()
                .expect("diag");
            format!(
                "{args:?}:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        panic!(
            "node a cannot reach node b:\n{}\n{}\n{}\n{}",
            show(&["bridge", "-n", &a.name, "-d", "link"]),
            show(&["ip", "-n", &a.name, "-d", "link"]),
            show(&["ip", "-n", &b.name, "-d", "addr"]),
            show(&["nft", "list", "ruleset"]),
        );
    }

    let dst = nodes[1]
        .2
        .prepare_incoming(config("mig-dst", &nodes[1].1.ifname), "10.78.0.2:7788")
        .await
        .expect("the target QEMU listens on node b");
    let _guard2 = Guard(vec![dst.clone()]);
    // 50 pings, 0.2 s apart, across the switch-over. (Under TCG with QEMU
    // < 9.0 the guest is copied paused — QEMU's TCG dirty tracking loses
    // writes in a live pre-copy — so the pause is the whole copy: ~0.4 s
    // for this guest.)
    let pinger = ping("50", "0.2");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (tx, _rx) = tokio::sync::watch::channel(MigrationProgress::default());
    let done = tokio::time::timeout(
        BOOT_WAIT,
        src.migrate(
            "10.78.0.2:7788",
            MigrationOptions {
                max_downtime: Duration::from_millis(100),
                timeout: BOOT_WAIT,
                token: String::new(),
                ..Default::default()
            },
            tx,
        ),
    )
    .await
    .expect("migrate returns")
    .expect("migrate");
    dst.finish_incoming().await.expect("the target runs");
    let out = tokio::task::spawn_blocking(move || pinger.wait_with_output())
        .await
        .expect("ping task")
        .expect("ping output");
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default()
        .to_string();
    let numbers: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let (sent, received) = (
        numbers.first().copied().unwrap_or(0),
        numbers.get(1).copied().unwrap_or(0),
    );
    eprintln!(
        "linux migration: {} passes, {} MiB sent, downtime {:?}; ping: {summary}",
        done.iteration,
        done.bytes_sent >> 20,
        done.downtime
    );
    // The pings the guest's pause explains (one per 0.2 s of downtime),
    // plus a few for the bridges learning the guest's new port; at least 5.
    let downtime = done.downtime.expect("the migration's downtime");
    assert!(
        downtime < Duration::from_secs(2),
        "the guest paused {downtime:?}"
    );
    let allowed = (3 + downtime.as_millis() as u64 / 200).max(5);
    assert!(
        sent >= 50 && sent - received <= allowed,
        "pings lost across the migration (at most {allowed} for a {downtime:?} pause): {summary}"
    );
    assert_eq!(
        tokio::time::timeout(BOOT_WAIT, src.wait())
            .await
            .expect("source ends")
            .expect("wait"),
        ExitReason::Killed
    );
    let last_src = *uptimes(&String::from_utf8_lossy(&src.console_hub().history()))
        .last()
        .expect("source uptimes");
    let start = std::time::Instant::now();
    let after = loop {
        let u = uptimes(&String::from_utf8_lossy(&dst.console_hub().history()));
        if u.len() >= 2 {
            break u;
        }
        assert!(
            start.elapsed() < BOOT_WAIT,
            "the migrated guest printed nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        after[0] > last_src && after.windows(2).all(|w| w[1] > w[0]),
        "uptime did not continue: source ended at {last_src}, target printed {after:?}"
    );

    // The disk: the guest wrote on both nodes, never saw an error, and every
    // block it wrote is on the volume; the source's engine is fenced off.
    let wrote = |vm: &QemuVm| -> Vec<u64> {
        String::from_utf8_lossy(&vm.console_hub().history())
            .lines()
            .filter_map(|l| l.trim().strip_prefix("HCI: wrote ")?.parse().ok())
            .collect()
    };
    let start = std::time::Instant::now();
    let on_dst = loop {
        let w = wrote(&dst);
        if w.len() >= 2 {
            break w;
        }
        assert!(
            start.elapsed() < BOOT_WAIT,
            "the migrated guest wrote nothing to its disk"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let on_src = wrote(&src);
    assert!(
        !on_src.is_empty(),
        "the guest wrote nothing before the migration"
    );
    for vm in [&src, &dst] {
        let text = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
        assert!(
            !text.contains("disk FAIL") && !text.to_ascii_lowercase().contains("i/o error"),
            "the guest saw a disk error on {}:\n{text}",
            vm.name()
        );
    }
    let last = *on_dst.last().expect("blocks written on the target");
    let mut block = vec![0u8; 4096];
    for n in 1..=last {
        dst.volumes()[0]
            .read_at(&mut block, n * 4096)
            .await
            .expect("read a block");
        let want = format!("hci-block {n:08}\n");
        assert!(
            block.starts_with(want.as_bytes()) && block[want.len()..].iter().all(|&b| b == 0),
            "block {n} (source wrote up to {:?}, target from {:?}) holds {:?}",
            on_src.last(),
            on_dst.first(),
            String::from_utf8_lossy(&block[..32])
        );
    }
    assert!(
        src.volumes()[0]
            .write_at(&block, 0, hci_core::block::WriteFlags::default())
            .await
            .is_err(),
        "the source's engine must be refused after the hand-over"
    );
    eprintln!(
        "linux migration: the guest wrote blocks 1..={} (source up to {:?}), all present",
        last,
        on_src.last()
    );
    dst.kill().await.expect("kill the target");
    for (net, _, _) in &nodes {
        net.remove_network("mignet")
            .await
            .expect("remove the network");
    }
}

/// Runs the `bench` role on a VM whose disk is `disk`; returns (write, read)
/// seconds for 64 MiB as the guest measured them (centisecond clock).
async fn bench_disk(
    hv: &QemuHypervisor,
    kernel: &Path,
    initrd: &Path,
    name: &str,
    disk: DiskBackend,
) -> (f64, f64) {
    let vm = hv
        .create_vm(VmConfig {
            name: name.into(),
            cpus: 1,
            memory: 256 << 20,
            boot: BootSource::Kernel {
                kernel: kernel.to_path_buf(),
                initrd: Some(initrd.to_path_buf()),
                cmdline: "console=ttyS0 rdinit=/init panic=-1 quiet hci.role=bench".into(),
            },
            disks: vec![DiskConfig {
                name: "data".into(),
                backend: disk,
                bus: DiskBus::Virtio,
                read_only: false,
                boot_order: None,
            }],
            nics: vec![],
            cloud_init_seed: None,
            run_dir: run_dir(name),
        })
        .await
        .expect("create the bench VM");
    vm.start().await.expect("start");
    let text = wait_console(&vm, "HCI: bench done").await;
    let line = text
        .lines()
        .find(|l| l.starts_with("HCI: bench"))
        .expect("bench line")
        .to_string();
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("bench figure")
            / 100.0
    };
    let _ = tokio::time::timeout(BOOT_WAIT, vm.wait()).await;
    (field("write_cs="), field("read_cs="))
}

/// Benchmark (not a test; `scripts/bench-qemu.sh` runs it): a Linux guest
/// under TCG writes (fsync) and reads 64 MiB on its virtio disk, backed by
/// (1) an hci-storage local volume served to QEMU over NBD by this process,
/// (2) a 2-replica replicated volume over NBD, and (3) a raw file opened by
/// QEMU itself (the peer). Prints MB/s and ratios to the raw file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by scripts/bench-qemu.sh"]
async fn bench_guest_disk_nbd_vs_raw_file() {
    let hv = QemuHypervisor::new();
    let (kernel, modules) = debian_cloud_kernel();
    let work = run_dir("bench-work");
    let initrd = initramfs(&modules, &work);
    let raw = work.join("raw.img");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(128 << 20))
        .expect("raw image");
    let vol = work.join("vol");
    hci_storage::local::LocalVolumeBackend::new(&work)
        .expect("volume backend")
        .create("vol", CreateVolume::new(128 << 20))
        .await
        .expect("create the local volume");
    let replicas = [
        ReplicaProc::start(work.join("replica0")),
        ReplicaProc::start(work.join("replica1")),
    ];
    let backend = ReplicatedVolumeBackend::new(
        replicas.iter().map(ReplicaProc::node).collect(),
        EngineOptions::default(),
    )
    .expect("replicated backend");
    backend
        .create("rvol", CreateVolume::new(128 << 20))
        .await
        .expect("create the replicated volume");
    let rvol = backend
        .open_engine("rvol", OpenVolume::default())
        .await
        .expect("open the engine");
    let mb = 64.0 * 1.048576;
    let mut rows = Vec::new();
    for (label, disk) in [
        (
            "raw file (QEMU file driver)",
            DiskBackend::File(raw.clone()),
        ),
        (
            "local volume over NBD",
            DiskBackend::Volume {
                path: vol.clone(),
                key_file: None,
            },
        ),
        (
            "2-replica volume over NBD",
            DiskBackend::Device(rvol.clone() as Arc<dyn BlockDevice>),
        ),
    ] {
        let name = format!("bench-{}", rows.len());
        let (w, r) = bench_disk(&hv, &kernel, &initrd, &name, disk).await;
        rows.push((label, mb / w, mb / r));
    }
    let (raw_w, raw_r) = (rows[0].1, rows[0].2);
    eprintln!("| disk | write MB/s (fsync) | read MB/s | write vs raw | read vs raw |");
    eprintln!("|---|---|---|---|---|");
    for (label, w, r) in &rows {
        eprintln!(
            "| {label} | {w:.1} | {r:.1} | {:.2}x | {:.2}x |",
            w / raw_w,
            r / raw_r
        );
    }
    rvol.close().await.expect("close");
}
