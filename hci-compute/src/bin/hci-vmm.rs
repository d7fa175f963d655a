//! `hci-vmm`: one VM in one process, on hci's own KVM VMM.
//!
//! Runs a VM straight from the command line (like cloud-hypervisor) and,
//! with `--api-socket`, serves the control API of
//! [`hci_compute::vmm_api`] so a daemon can drive it — and find it again
//! after restarting. Exits 0 when the guest resets or powers off; 1 with a
//! one-line message on errors (missing kernel, bad sizes, KVM unavailable,
//! a volume missing or in use) or when the guest crashed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use hci_compute::{KvmHypervisor, MemoryBacking};
use hci_compute::{seccomp, vmm_api};
use hci_core::compute::{
    BootSource, DiskBackend, DiskBus, DiskConfig, ExitReason, NicConfig, NicModel, VmConfig,
    VmHandle,
};
use hci_core::net::TapHandle;
use tokio::io::AsyncWriteExt;

/// Run one VM on hci's KVM VMM.
#[derive(Debug, Parser)]
#[command(
    name = "hci-vmm",
    version,
    after_help = "Examples:\n  \
        hci-vmm --kernel guest.elf --memory 64M\n  \
        hci-vmm --kernel bzImage --initrd initrd.img --cmdline 'console=ttyS0' \\\n      \
        --cpus 2 --memory 1G --disk path=/var/lib/hci/volumes/root --net tap=tap0\n  \
        hci-vmm --kernel guest.elf --api-socket /run/hci/vm1.sock --serial file=/tmp/vm1.log\n  \
        hci-vmm --kernel guest.elf --memory 64M --restore /var/lib/hci/vm1.snap\n  \
        HCI_MIGRATION_TOKEN=s3cret hci-vmm --kernel guest.elf --memory 64M --incoming 0.0.0.0:7700"
)]
struct Args {
    /// Kernel: a PVH ELF (vmlinux, hci test guests) or a Linux bzImage.
    #[arg(long, value_name = "FILE", required_unless_present = "qemu_config")]
    kernel: Option<PathBuf>,
    /// Run a QEMU VM instead of one on hci's KVM VMM: FILE holds its
    /// configuration (JSON, written by `ProcessHypervisor::with_qemu`). This
    /// process opens its volumes, serves them to QEMU over NBD and answers
    /// the API socket; QEMU dies with it. The VM options above are ignored.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["restore", "kernel"])]
    qemu_config: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory (K, M, G suffixes; e.g. 256M, 2G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// What backs guest RAM: `anon` (private anonymous memory), `memfd`
    /// (shared memfd) or `file=PATH` (a shared file, e.g. in /dev/shm or on
    /// hugetlbfs).
    #[arg(long, default_value = "anon", value_name = "anon|memfd|file=PATH")]
    memory_backing: String,
    /// Back guest RAM with 2 MiB huge pages (a memfd from the hugetlb pool,
    /// all reserved at start; needs free pages in /proc/sys/vm/nr_hugepages).
    #[arg(long)]
    hugepages: bool,
    /// A disk: `path=VOLUME_DIR` (an hci-storage local volume),
    /// `file=IMAGE` (a raw image) or
    /// `replicas=HOST:PORT+HOST:PORT…,volume=NAME,token-file=FILE` (a
    /// replicated volume: this process runs its engine, and with
    /// `,control=SOCKET` answers `hci-storage replicas` there), then
    /// `,readonly`, `,name=NAME` and, for an encrypted volume,
    /// `,key-file=FILE`. Repeatable.
    #[arg(
        long,
        value_name = "path=DIR|file=IMAGE|replicas=A+B,volume=V,token-file=F[,readonly][,name=N]"
    )]
    disk: Vec<String>,
    /// A NIC: `tap=NAME[,mac=MAC][,name=N][,fd=N]` (`fd=`: an inherited,
    /// already attached queue descriptor of that TAP). Repeatable.
    #[arg(long, value_name = "tap=NAME[,mac=MAC][,fd=N]")]
    net: Vec<String>,
    /// No virtio-rng entropy device.
    #[arg(long)]
    no_rng: bool,
    /// Where the serial console goes: stdio, file=PATH or none.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// Serve the control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Record how the VM ended here (JSON) when it stops.
    #[arg(long, value_name = "PATH")]
    exit_file: Option<PathBuf>,
    /// Wait for a `start` request on the API socket before booting.
    #[arg(long, requires = "api_socket")]
    wait_start: bool,
    /// Seccomp filter: `trap` (refuse system calls a running VMM does not
    /// make, naming the call on stderr), `log` (allow, kernel logs them) or
    /// `off`.
    #[arg(long, default_value = "trap", value_name = "trap|log|off")]
    seccomp: seccomp::Mode,
    /// VM name (in logs and the API).
    #[arg(long, default_value = "vm")]
    name: String,
    /// Restore the VM saved in FILE (by the API's `snapshot`) instead of
    /// booting; the other options must describe the same VM. It resumes at
    /// once, or stays paused with `--wait-start` (then `resume` it).
    #[arg(long, value_name = "FILE", conflicts_with = "incoming")]
    restore: Option<PathBuf>,
    /// Receive a live migration on HOST:PORT instead of booting (the token
    /// comes from the HCI_MIGRATION_TOKEN environment variable). The API
    /// socket opens once the VM runs here; disks are opened only after the
    /// source has paused and sent its state.
    #[arg(long, value_name = "HOST:PORT")]
    incoming: Option<String>,
}

/// Parses `256M`, `2G`, `64Mi`, `4096` (bytes).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let unit = t[i..].trim_end_matches(['i', 'B', 'b']);
            let mult = match unit.to_ascii_uppercase().as_str() {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
            };
            (&t[..i], mult)
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 256M, 2G)"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes == 0 {
        return Err(format!("{s:?}: the size must not be zero"));
    }
    Ok(bytes)
}

fn parse_backing(s: &str, hugepages: bool) -> Result<MemoryBacking, String> {
    match (s, hugepages) {
        ("anon", false) => Ok(MemoryBacking::Anonymous),
        ("anon" | "memfd", true) => Ok(MemoryBacking::Memfd { hugepages: true }),
        ("memfd", false) => Ok(MemoryBacking::Memfd { hugepages: false }),
        (other, _) => match other.strip_prefix("file=") {
            Some("") | None => Err(format!(
                "--memory-backing {other:?}: use anon, memfd or file=PATH"
            )),
            Some(_) if hugepages => Err(
                "--hugepages with --memory-backing file=PATH: put the file on a hugetlbfs mount instead".into(),
            ),
            Some(path) => Ok(MemoryBacking::File(PathBuf::from(path))),
        },
    }
}

/// Splits `a=b,c,d=e` into (key, value) pairs (`c` has an empty value).
fn options(s: &str) -> Vec<(&str, &str)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

/// Parses a `--disk` option into a disk: `path=` becomes a local volume
/// and `replicas=` a replicated one (both opened by the hypervisor, which
/// serves their control sockets and can hand them over in a live
/// migration), `file=` a raw image opened here.
fn parse_disk(i: usize, spec: &str) -> Result<DiskConfig, String> {
    let (mut path, mut dir, mut ro, mut name) = (None, false, false, format!("disk{i}"));
    let mut key_file: Option<PathBuf> = None;
    let (mut replicas, mut volume, mut token_file, mut control) = (None, None, None, None);
    for (k, v) in options(spec) {
        match k {
            "path" => (path, dir) = (Some(PathBuf::from(v)), true),
            "file" => (path, dir) = (Some(PathBuf::from(v)), false),
            "replicas" => {
                replicas = Some(
                    v.split('+')
                        .filter(|a| !a.is_empty())
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                )
            }
            "volume" if !v.is_empty() => volume = Some(v.to_string()),
            "token-file" if !v.is_empty() => token_file = Some(PathBuf::from(v)),
            "control" if !v.is_empty() => control = Some(PathBuf::from(v)),
            "readonly" | "ro" => ro = true,
            "key-file" if !v.is_empty() => key_file = Some(PathBuf::from(v)),
            "name" if !v.is_empty() => name = v.to_string(),
            _ => return Err(format!("--disk {spec:?}: unknown option {k:?}")),
        }
    }
    let backend = if let Some(replicas) = replicas {
        let (Some(volume), Some(token_file)) = (volume, token_file) else {
            return Err(format!(
                "--disk {spec:?}: a replicated volume needs volume=NAME and token-file=FILE"
            ));
        };
        if replicas.is_empty() {
            return Err(format!(
                "--disk {spec:?}: replicas= names no replica server"
            ));
        }
        if path.is_some() {
            return Err(format!(
                "--disk {spec:?}: give replicas= or path=/file=, not both"
            ));
        }
        DiskBackend::Replicated {
            volume,
            replicas,
            token_file,
            key_file,
            control,
        }
    } else {
        if volume.is_some() || token_file.is_some() || control.is_some() {
            return Err(format!(
                "--disk {spec:?}: volume=, token-file= and control= are for replicated volumes (replicas=)"
            ));
        }
        let Some(path) = path else {
            return Err(format!(
                "--disk {spec:?}: needs path=VOLUME_DIR, file=IMAGE or replicas=…"
            ));
        };
        if key_file.is_some() && !dir {
            return Err(format!(
                "--disk {spec:?}: key-file= is for volumes (path=), not raw images"
            ));
        }
        if dir {
            DiskBackend::Volume { path, key_file }
        } else {
            DiskBackend::Device(Arc::new(
                hci_storage::raw::RawFileDevice::open(&path, ro)
                    .map_err(|e| format!("--disk {}: {e}", path.display()))?,
            ))
        }
    };
    Ok(DiskConfig {
        name,
        backend,
        bus: DiskBus::Virtio,
        read_only: ro,
        boot_order: None,
    })
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address"));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
    }
    Ok(mac)
}

fn parse_net(i: usize, spec: &str) -> Result<(NicConfig, Option<i32>), String> {
    let (mut tap, mut mac, mut name, mut fd) = (None, None, format!("net{i}"), None);
    for (k, v) in options(spec) {
        match k {
            "tap" => tap = Some(v.to_string()),
            "fd" => {
                fd =
                    Some(v.parse::<i32>().map_err(|_| {
                        format!("--net {spec:?}: fd={v:?} is not a descriptor number")
                    })?)
            }
            "mac" => mac = Some(parse_mac(v)?),
            "name" if !v.is_empty() => name = v.to_string(),
            _ => return Err(format!("--net {spec:?}: unknown option {k:?}")),
        }
    }
    let tap = tap.ok_or_else(|| format!("--net {spec:?}: needs tap=NAME"))?;
    // A stable locally administered MAC from the TAP name when none is given.
    let mac = mac.unwrap_or_else(|| {
        let h = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let b = h.to_le_bytes();
        [0x02, 0x68, b[0], b[1], b[2], b[3]]
    });
    Ok((
        NicConfig {
            name,
            tap,
            mac,
            model: NicModel::Virtio,
            mtu: 0,
        },
        fd,
    ))
}

/// Copies guest serial output to stdout or a file, and stdin to the guest.
/// Returns the output pump, which ends (flushed) once the VM stopped and its
/// last bytes are out: wait for it before exiting, or the tail is lost.
async fn pump_serial(
    vm: Arc<dyn VmHandle>,
    target: &str,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    if target == "none" {
        return Ok(None);
    }
    let console = vm.console().await.map_err(|e| e.to_string())?;
    let mut output = console.output;
    if let Some(path) = target.strip_prefix("file=") {
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| format!("--serial {target}: {e}"))?;
        return Ok(Some(tokio::spawn(async move {
            let _ = tokio::io::copy(&mut output, &mut file).await;
            let _ = file.flush().await;
        })));
    }
    if target != "stdio" {
        return Err(format!("--serial {target:?}: use stdio, file=PATH or none"));
    }
    let mut input = console.input;
    let pump = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        let _ = tokio::io::copy(&mut output, &mut stdout).await;
        let _ = stdout.flush().await;
    });
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let _ = tokio::io::copy(&mut stdin, &mut input).await;
    });
    Ok(Some(pump))
}

async fn run(args: Args) -> Result<ExitReason, String> {
    if let Some(file) = &args.qemu_config {
        #[cfg(feature = "qemu")]
        return run_qemu(&args, file).await;
        #[cfg(not(feature = "qemu"))]
        return Err(format!(
            "--qemu-config {}: this hci-vmm was built without the qemu feature",
            file.display()
        ));
    }
    let Some(kernel) = args.kernel.clone() else {
        return Err("--kernel is required".into());
    };
    if !KvmHypervisor::available() {
        return Err("KVM is not available: /dev/kvm is missing or not usable".into());
    }
    if !kernel.is_file() {
        return Err(format!("--kernel {}: no such file", kernel.display()));
    }
    let mut disks = Vec::new();
    for (i, d) in args.disk.iter().enumerate() {
        disks.push(parse_disk(i, d)?);
    }
    let backing = parse_backing(&args.memory_backing, args.hugepages)?;
    // Volumes are opened by the hypervisor (prepared only, with
    // --incoming, and taken over at the switch-over), with their control
    // sockets: this process owns them while the VM runs here, so others
    // (the daemon taking a snapshot, `hci-storage replicas`) ask it there.
    let hv = KvmHypervisor::new()
        .with_entropy(!args.no_rng)
        .with_memory_backing(backing)
        .with_volume_control_sockets(true);
    let mut nics = Vec::new();
    for (i, n) in args.net.iter().enumerate() {
        let (nic, fd) = parse_net(i, n)?;
        if let Some(fd) = fd {
            // A TAP queue handed over by the parent (hci-net keeps the
            // TAP's only queue, so attaching by name would fail).
            let fd = hci_compute::process::adopt_inherited_fd(fd)
                .map_err(|e| format!("--net {n:?}: {e}"))?;
            hv.register_tap(&TapHandle {
                ifname: nic.tap.clone(),
                mac: nic.mac,
                mtu: nic.mtu,
                fds: vec![Arc::new(fd)],
            });
        }
        nics.push(nic);
    }
    let config = VmConfig {
        name: args.name.clone(),
        cpus: args.cpus,
        memory: args.memory,
        boot: BootSource::Kernel {
            kernel,
            initrd: args.initrd.clone(),
            cmdline: args.cmdline.clone(),
        },
        disks,
        nics,
        cloud_init_seed: None,
        run_dir: PathBuf::new(),
    };
    let mut booted = true;
    let kvm_vm = if let Some(file) = &args.restore {
        booted = false;
        let vm = hv
            .restore_vm(config, file)
            .await
            .map_err(|e| format!("--restore {}: {e}", file.display()))?;
        if !args.wait_start {
            vm.resume().await.map_err(|e| e.to_string())?;
        }
        vm
    } else if let Some(addr) = &args.incoming {
        booted = false;
        let token = std::env::var("HCI_MIGRATION_TOKEN").unwrap_or_default();
        let listener = hci_compute::migration::listen(addr).map_err(|e| e.to_string())?;
        eprintln!("hci-vmm: waiting for a migration on {addr}");
        hv.receive_vm(config, listener, &token)
            .await
            .map_err(|e| format!("--incoming {addr}: {e}"))?
    } else {
        hv.create_vm(config).await.map_err(|e| e.to_string())?
    };
    // Closed at exit, unless a migration handed them over.
    let volumes = kvm_vm.handover_disks().to_vec();
    // Fencing watchdogs over the replicated ones (token read now: no file
    // opens once seccomp is on).
    let watches = fence_watches(&volumes)?;
    let vm: Arc<dyn VmHandle> = Arc::new(kvm_vm);
    let serial = pump_serial(vm.clone(), &args.serial).await?;
    if let Some(path) = &args.api_socket {
        let listener = vmm_api::bind(path).map_err(|e| e.to_string())?;
        tokio::spawn(vmm_api::serve(vm.clone(), listener));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    // Everything that needs a new socket, an exec or a new device is done:
    // from here on only what a running VMM does is allowed.
    seccomp::install(args.seccomp).map_err(|e| e.to_string())?;
    if booted && !args.wait_start {
        vm.start().await.map_err(|e| e.to_string())?;
    }
    let fenced = first_fenced(watches);
    let reason = until_stopped(&*vm, &mut term, fenced, &args.exit_file).await?;
    // A migrated VM stops as soon as it runs on the target: let the
    // migration's answer reach the caller first.
    vmm_api::wait_answers(std::time::Duration::from_secs(5)).await;
    // The console ends with the VM: let its last bytes out.
    if let Some(pump) = serial {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), pump).await;
    }
    record_exit(&args, &reason);
    // A clean close lets the next engine skip the crash reconcile; volumes
    // handed over in a migration belong to the target and are left alone.
    for disk in volumes {
        if disk.is_active()
            && let Err(e) = disk.close().await
        {
            eprintln!("hci-vmm: closing disk {}: {e}", disk.name());
        }
    }
    Ok(reason)
}

#[cfg(feature = "qemu")]
/// Runs the QEMU VM described in `file` (`--qemu-config`) until it stops.
/// No seccomp filter: this process spawns QEMU, which is itself the VMM.
async fn run_qemu(args: &Args, file: &std::path::Path) -> Result<ExitReason, String> {
    use hci_compute::process::QemuProcessConfig;
    use hci_compute::qemu::QemuHypervisor;

    let text = std::fs::read(file).map_err(|e| format!("--qemu-config {}: {e}", file.display()))?;
    let spec: QemuProcessConfig = serde_json::from_slice(&text)
        .map_err(|e| format!("--qemu-config {}: {e}", file.display()))?;
    // Volumes are opened here with their control sockets (the daemon
    // snapshots them through those) and closed cleanly when QEMU is gone.
    let hv = QemuHypervisor::from_options(spec.qemu).with_volume_control_sockets(true);
    for tap in &spec.taps {
        let nic = spec.config.nics.iter().find(|n| n.tap == tap.ifname);
        let fd = hci_compute::process::adopt_inherited_fd(tap.fd)
            .map_err(|e| format!("TAP {}: {e}", tap.ifname))?;
        hv.register_tap(&TapHandle {
            ifname: tap.ifname.clone(),
            mac: nic.map_or([0; 6], |n| n.mac),
            mtu: nic.map_or(0, |n| n.mtu),
            fds: vec![Arc::new(fd)],
        });
    }
    let qemu_vm = if let Some(addr) = &args.incoming {
        let token = std::env::var("HCI_MIGRATION_TOKEN").unwrap_or_default();
        eprintln!("hci-vmm: waiting for a QEMU migration on {addr}");
        let vm = hv
            .prepare_incoming_with_token(spec.config, addr, &token)
            .await
            .map_err(|e| format!("--incoming {addr}: {e}"))?;
        vm.finish_incoming()
            .await
            .map_err(|e| format!("--incoming {addr}: {e}"))?;
        vm
    } else {
        hv.create_vm(spec.config).await.map_err(|e| e.to_string())?
    };
    let vm: Arc<dyn VmHandle> = Arc::new(qemu_vm.clone());
    let fenced = first_fenced(fence_watches(qemu_vm.volumes())?);
    if let Some(path) = &args.api_socket {
        let listener = vmm_api::bind(path).map_err(|e| e.to_string())?;
        tokio::spawn(vmm_api::serve(vm.clone(), listener));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    if args.incoming.is_none() && !args.wait_start {
        vm.start().await.map_err(|e| e.to_string())?;
    }
    let reason = until_stopped(&*vm, &mut term, fenced, &args.exit_file).await?;
    vmm_api::wait_answers(std::time::Duration::from_secs(5)).await;
    record_exit(args, &reason);
    // The QEMU handle closes the volumes once its process is gone (unless a
    // migration handed them over): let it finish before this process exits.
    if !qemu_vm
        .volumes_closed(std::time::Duration::from_secs(30))
        .await
    {
        eprintln!("hci-vmm: the VM's volumes were not closed within 30 s");
    }
    Ok(reason)
}

/// Fencing watchdogs over the replicated volumes among `volumes`.
fn fence_watches(
    volumes: &[Arc<hci_compute::handover::HandoverDisk>],
) -> Result<Vec<hci_compute::replicated::FenceWatch>, String> {
    let mut watches = Vec::new();
    for disk in volumes {
        if let Some(w) = hci_compute::replicated::FenceWatch::new(disk.clone())
            .map_err(|e| format!("disk {}: {e}", disk.name()))?
        {
            watches.push(w);
        }
    }
    Ok(watches)
}

/// Resolves with the reason once any of `watches` finds its volume taken
/// over by another engine (the VM's node was lost and the VM moved): the
/// guest is then stopped rather than left running on headless with a disk
/// that refuses every write. Volumes handed over by a live migration are
/// not watched any more. Never resolves without watches.
fn first_fenced(
    watches: Vec<hci_compute::replicated::FenceWatch>,
) -> impl std::future::Future<Output = String> {
    let (fenced_tx, mut fenced_rx) = tokio::sync::mpsc::channel::<String>(1);
    for watch in watches {
        let tx = fenced_tx.clone();
        tokio::spawn(async move {
            let why = watch.fenced(FENCE_CHECK).await;
            let _ = tx.send(why).await;
        });
    }
    drop(fenced_tx);
    async move {
        match fenced_rx.recv().await {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }
}

/// Waits until the VM stops: by itself, killed on SIGTERM, or stopped by
/// the fencing watchdog (`fenced`).
async fn until_stopped(
    vm: &dyn VmHandle,
    term: &mut tokio::signal::unix::Signal,
    fenced: impl std::future::Future<Output = String>,
    exit_file: &Option<PathBuf>,
) -> Result<ExitReason, String> {
    Ok(tokio::select! {
        r = vm.wait() => r.map_err(|e| e.to_string())?,
        _ = term.recv() => {
            vm.kill().await.map_err(|e| e.to_string())?;
            vm.wait().await.map_err(|e| e.to_string())?
        }
        why = fenced => stop_fenced(vm, exit_file, &why).await?,
    })
}

/// Writes how the VM ended to the exit file and removes the API socket.
fn record_exit(args: &Args, reason: &ExitReason) {
    if let Some(path) = &args.exit_file
        && let Err(e) = vmm_api::write_exit_file(path, reason)
    {
        eprintln!("hci-vmm: cannot write {}: {e}", path.display());
    }
    if let Some(path) = &args.api_socket {
        let _ = std::fs::remove_file(path);
    }
}

/// Stops a fenced VM: records why first (a caller waiting on the API sees
/// that rather than a plain kill), then kills the guest.
async fn stop_fenced(
    vm: &dyn VmHandle,
    exit_file: &Option<PathBuf>,
    why: &str,
) -> Result<ExitReason, String> {
    eprintln!("hci-vmm: fenced: {why}; stopping the guest");
    let reason = ExitReason::VmmError(format!("fenced: {why}"));
    if let Some(path) = exit_file {
        let _ = vmm_api::write_exit_file(path, &reason);
    }
    vm.kill().await.map_err(|e| e.to_string())?;
    let _ = vm.wait().await;
    Ok(reason)
}

/// How often the fencing watchdog asks a VM's replicas whether another
/// engine took its volumes over.
const FENCE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> ExitCode {
    let args = Args::parse();
    // Warnings (a replica failed, a disk error behind an IOERR) go to stderr,
    // which is the VM's vmm.log under the daemon.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let exit_file = args.exit_file.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hci-vmm: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(ExitReason::Reset | ExitReason::Poweroff | ExitReason::Killed) => ExitCode::SUCCESS,
        Ok(other) => {
            eprintln!("hci-vmm: the VM stopped: {other:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            if let Some(path) = exit_file {
                let _ = vmm_api::write_exit_file(&path, &ExitReason::VmmError(e.clone()));
            }
            eprintln!("hci-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64Mi"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn nets_parse() {
        let (n, fd) = parse_net(0, "tap=tap0,mac=02:00:00:00:00:01").expect("net");
        assert_eq!(fd, None);
        assert_eq!(parse_net(0, "tap=t,fd=7").expect("net").1, Some(7));
        assert!(parse_net(0, "tap=t,fd=x").is_err());
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, [2, 0, 0, 0, 0, 1]);
        assert!(parse_net(0, "mac=02:00:00:00:00:01").is_err());
        assert!(parse_net(0, "tap=t,mac=zz").is_err());
        let a = parse_net(0, "tap=tap7").expect("net").0;
        assert_eq!(a.mac, parse_net(1, "tap=tap7").expect("net").0.mac);
        assert_eq!(a.mac[0] & 3, 2);
    }
}
