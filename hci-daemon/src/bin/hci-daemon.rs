//! `hci-daemon`: serves the hci gRPC API on a Unix socket over the embedded
//! redb state store, or as one node of a cluster over etcd.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use hci_compute::{KvmHypervisor, ProcessHypervisor};
use hci_daemon::api::{Api, TcpSecurity, serve_tcp, serve_unix};
use hci_daemon::controllers::replicas::{ReplicaPool, ServerMode, find_server_binary};
use hci_daemon::controllers::{ClusterOptions, Controllers, NodeInfo, Runtime};
use hci_daemon::metrics::{MetricsSource, serve_metrics};
use hci_daemon::resources::ResourceStore;
#[cfg(feature = "etcd")]
use hci_daemon::store::EtcdStateStore;
use hci_daemon::store::RedbStateStore;
use hci_net::{BackendOptions, LinuxBridgeBackend};
use tracing_subscriber::EnvFilter;

/// The hci daemon: serves the hci gRPC API (VMs, volumes, images, networks,
/// snapshots, backups, backup targets, schedules, nodes) with gRPC health and
/// reflection, over an embedded state store.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  \
        hci-daemon --data-dir /var/lib/hci\n  \
        hci-daemon --data-dir ./state --listen unix:/run/hci/hci.sock\n  \
        hci-daemon --listen unix:/var/lib/hci/hci.sock --listen https://0.0.0.0:7443 \\\n      \
        --tls-cert cert.pem --tls-key key.pem --token-file token\n  \
        hci-daemon --store etcd://10.0.0.1:2379 --node node-a --address 10.0.0.11\n\n\
        Logging follows RUST_LOG (default: info)."
)]
struct Args {
    /// Directory of the daemon's state (created with mode 0700 if missing).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/hci")]
    data_dir: PathBuf,
    /// Where to serve the API: unix:PATH (the socket gets mode 0600, no
    /// token) or https://ADDR:PORT (needs --tls-cert, --tls-key and
    /// --token-file). Repeatable. Default: unix:DIR/hci.sock.
    #[arg(long, value_name = "unix:PATH|https://ADDR", value_parser = parse_listen)]
    listen: Vec<Listen>,
    /// PEM certificate chain for https listeners.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for https listeners.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// File holding the bearer token https clients must send.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Where the state lives: `redb` (default: the embedded store in
    /// DIR/state.redb, a single node) or `etcd://HOST:PORT[,HOST:PORT…]`
    /// (cluster mode: one daemon per node shares the state; VMs are placed
    /// on nodes by the elected leader and restarted elsewhere when a node
    /// fails).
    #[arg(long, value_name = "redb|etcd://HOST:PORT", default_value = "redb")]
    store: String,
    /// Cluster mode: TTL of this node's liveness lease. A node whose daemon
    /// stops renewing it is NotReady this long after the last renewal.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    node_lease_ttl: std::time::Duration,
    /// Cluster mode: how long a node stays NotReady before its VMs (run
    /// strategy Always or RerunOnFailure) are restarted on other nodes.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    failover_grace: std::time::Duration,
    /// Cluster mode: how long a node stays NotReady before the replicas it
    /// holds are rebuilt on other nodes (a node back sooner keeps them; they
    /// catch up).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    replica_rebuild_grace: std::time::Duration,
    /// Name of this node (a DNS-1123 label). Default: the host name.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// Address other nodes reach this node at (carries overlay networks).
    #[arg(long, value_name = "IP")]
    address: Option<std::net::IpAddr>,
    /// A directory holding replicas of replicated volumes (`spec.replicas >
    /// 1`), each served by its own replica server on the node's address.
    /// Repeatable: one per disk. Default: DATA_DIR/replicas.
    #[arg(long, value_name = "DIR")]
    replica_disk: Vec<PathBuf>,
    /// File holding the token replica servers require (created if missing).
    /// Give every node of a cluster the same file: engines reach replicas
    /// on other nodes with it. Default: DATA_DIR/replica.token.
    #[arg(long, value_name = "FILE")]
    replica_token_file: Option<PathBuf>,
    /// Memory kept for the host, not offered to VMs (e.g. 1G, 512M).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    reserved_memory: u64,
    /// Where VMs run. `process`: each VM in its own hci-vmm process (VMs
    /// keep running when the daemon stops or crashes, and the next daemon
    /// adopts them). `in-process`: inside the daemon (VMs stop with it).
    /// `auto` (default): `process` when an hci-vmm binary is found (--vmm,
    /// next to hci-daemon, or on PATH), else `in-process` with a warning.
    #[arg(long, value_enum, default_value_t = VmMode::Auto)]
    vm_mode: VmMode,
    /// Same as `--vm-mode process` (kept for older scripts).
    #[arg(long, hide = true)]
    vm_processes: bool,
    /// The hci-vmm binary (default: next to hci-daemon, then PATH).
    #[arg(long, value_name = "FILE")]
    vmm: Option<PathBuf>,
    /// The QEMU binary VMs with `backend: qemu` run on (default:
    /// qemu-system-x86_64 on PATH).
    #[arg(long, value_name = "FILE")]
    qemu: Option<PathBuf>,
    /// UEFI firmware for `boot: { type: firmware, kind: uefi }` VMs, as
    /// `CODE,VARS` (the code image and the variable store template; default:
    /// Debian's `ovmf` package files under /usr/share/OVMF).
    #[arg(long, value_name = "CODE,VARS", value_parser = parse_ovmf)]
    ovmf: Option<(PathBuf, PathBuf)>,
    /// How long a VM stop waits for the guest to shut down before killing it.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    stop_timeout: std::time::Duration,
    /// Serve the API only: run no controllers (nothing is created or started).
    #[arg(long)]
    no_controllers: bool,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Where VMs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum VmMode {
    /// Process mode when hci-vmm is installed, else in-process.
    Auto,
    /// Each VM in its own hci-vmm process.
    Process,
    /// Inside the daemon.
    InProcess,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<hci_core::model::ByteSize>()
        .map(|b| b.0)
        .map_err(|e| format!("{s:?} is not a size: {e}"))
}

/// `10s`, `500ms`, `2m` or a number of seconds.
/// `CODE,VARS`: the two OVMF files.
fn parse_ovmf(s: &str) -> Result<(PathBuf, PathBuf), String> {
    match s.split_once(',') {
        Some((code, vars)) if !code.is_empty() && !vars.is_empty() => {
            Ok((PathBuf::from(code), PathBuf::from(vars)))
        }
        _ => Err(format!("{s:?}: expected CODE,VARS (two file paths)")),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 10s, 500ms, 2m)");
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        _ => Err(bad()),
    }
}

/// The host name as a DNS-1123 label.
fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let label: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let label = label.trim_matches('-').to_string();
    if label.is_empty() {
        "node".to_string()
    } else {
        label
    }
}

/// One place the API is served.
#[derive(Debug, Clone)]
enum Listen {
    Unix(PathBuf),
    Https(std::net::SocketAddr),
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(path) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = s.strip_prefix("https://") {
        return addr
            .trim_end_matches('/')
            .parse()
            .map(Listen::Https)
            .map_err(|e| format!("{s:?}: {e} (use https://IP:PORT)"));
    }
    Err(format!(
        "{s:?} is not a listen address: use unix:PATH or https://IP:PORT"
    ))
}

/// Reads the TLS material and token an https listener needs.
fn tcp_security(args: &Args) -> anyhow::Result<TcpSecurity> {
    let need = |opt: &Option<PathBuf>, flag: &str| {
        opt.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "serving the API over https needs {flag} (TCP is never served without TLS and a token)"
            )
        })
    };
    let (cert, key, token) = (
        need(&args.tls_cert, "--tls-cert")?,
        need(&args.tls_key, "--tls-key")?,
        need(&args.token_file, "--token-file")?,
    );
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("failed to read {}", p.display()));
    let token = String::from_utf8(read(&token)?)
        .map_err(|_| anyhow::anyhow!("the token file is not text"))?
        .trim()
        .to_string();
    if token.len() < 16 {
        anyhow::bail!("the token in the token file is shorter than 16 characters");
    }
    Ok(TcpSecurity {
        cert_pem: read(&cert)?,
        key_pem: read(&key)?,
        token,
    })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let dir = &args.data_dir;
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create data directory {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("failed to restrict data directory {}", dir.display()))?;
    }
    let (store, cluster): (Arc<dyn hci_core::store::StateStore>, _) = match args.store.as_str() {
        "redb" => {
            let db = dir.join("state.redb");
            let store = RedbStateStore::open(&db)
                .await
                .with_context(|| format!("failed to open the state store {}", db.display()))?;
            (Arc::new(store), None)
        }
        #[cfg(feature = "etcd")]
        url if url.starts_with("etcd://") => {
            let store = EtcdStateStore::open(url)
                .await
                .with_context(|| format!("failed to reach etcd at {url}"))?;
            tracing::info!(store = url, "cluster mode: state in etcd");
            let options = ClusterOptions {
                lease_ttl: args.node_lease_ttl,
                failover_grace: args.failover_grace,
                replica_grace: args.replica_rebuild_grace,
                ..ClusterOptions::default()
            };
            (Arc::new(store), Some(options))
        }
        #[cfg(not(feature = "etcd"))]
        url if url.starts_with("etcd://") => {
            anyhow::bail!("--store {url}: this hci-daemon was built without the etcd feature")
        }
        other => anyhow::bail!("--store {other:?}: use redb or etcd://HOST:PORT"),
    };
    let listen = if args.listen.is_empty() {
        vec![Listen::Unix(dir.join("hci.sock"))]
    } else {
        args.listen.clone()
    };
    let security = if listen.iter().any(|l| matches!(l, Listen::Https(_))) {
        Some(tcp_security(&args)?)
    } else {
        None
    };
    let resources = ResourceStore::new(store);
    let mut api = Api::new(resources.clone());
    let controllers = if args.no_controllers {
        None
    } else {
        let name = args.node.unwrap_or_else(default_node_name);
        let mut node = NodeInfo::detect(&name, dir, args.reserved_memory)
            .context("failed to inspect this node")?;
        node.addresses = args.address.iter().map(ToString::to_string).collect();
        tracing::info!(node = name, cpus = node.allocatable.cpus, memory = %node.allocatable.memory, "starting controllers");
        let mode = if args.vm_processes {
            VmMode::Process
        } else {
            args.vm_mode
        };
        let vmm = args.vmm.clone().or_else(ProcessHypervisor::find_vmm);
        let vm_processes = match (mode, &vmm) {
            (VmMode::InProcess, _) => false,
            (VmMode::Process | VmMode::Auto, Some(_)) => true,
            (VmMode::Process, None) => {
                anyhow::bail!(
                    "--vm-mode process: no hci-vmm binary next to hci-daemon or on PATH (give --vmm FILE)"
                )
            }
            (VmMode::Auto, None) => {
                tracing::warn!(
                    "no hci-vmm binary next to hci-daemon or on PATH: VMs run inside the daemon and stop with it (install hci-vmm, or give --vmm FILE)"
                );
                false
            }
        };
        let (hypervisor, taps): (Arc<dyn hci_core::compute::Hypervisor>, _) =
            if let (true, Some(vmm)) = (vm_processes, &vmm) {
                tracing::info!(vmm = %vmm.display(), "VMs run in their own hci-vmm processes");
                let hv = ProcessHypervisor::with_vmm(vmm);
                let taps = hv.taps().clone();
                (Arc::new(hv), taps)
            } else {
                let hv = KvmHypervisor::new();
                let taps = hv.taps().clone();
                (Arc::new(hv), taps)
            };
        let mut rt = Runtime::new(resources, dir, node, hypervisor)
            .context("failed to prepare the storage pool")?;
        rt.vm_processes = vm_processes;
        rt.cluster = cluster;
        rt.stop_timeout = args.stop_timeout;
        if args.qemu.is_some() || args.ovmf.is_some() {
            let mut qemu = hci_compute::qemu::QemuHypervisor::new();
            if let Some(binary) = &args.qemu {
                qemu = qemu.with_binary(binary);
            }
            if let Some(pair) = &args.ovmf {
                qemu = qemu.with_ovmf(vec![pair.clone()]);
            }
            rt.qemu = Arc::new(qemu);
        }
        if let (true, Some(vmm)) = (vm_processes, &vmm) {
            // QEMU VMs too: in an hci-vmm process each, adopted after a restart.
            rt.qemu_processes = Some(Arc::new(
                ProcessHypervisor::with_vmm(vmm).with_qemu(&rt.qemu),
            ));
        }
        // Cluster mode: bridges of one network on two nodes get their own MACs.
        let bridge_node = rt.cluster.is_some().then(|| name.clone());
        let networks = LinuxBridgeBackend::new(BackendOptions {
            state_dir: Some(dir.join("net")),
            node: bridge_node,
            ..BackendOptions::default()
        })
        .await;
        match networks {
            Ok(backend) => {
                rt.networks = Some(Arc::new(backend));
                rt.taps = Some(taps);
            }
            Err(e) => {
                tracing::warn!(error = %e, "no network backend: networks stay not ready and VMs with NICs do not start")
            }
        }
        let disks = if args.replica_disk.is_empty() {
            vec![dir.join("replicas")]
        } else {
            args.replica_disk.clone()
        };
        let host = args
            .address
            .map_or_else(|| "127.0.0.1".to_string(), |a| a.to_string());
        // With VMs in their own processes, replica servers get theirs too:
        // engines in running VMs keep their replicas across a daemon restart.
        let server_mode = match (vm_processes, find_server_binary()) {
            (true, Some(binary)) => ServerMode::Process(binary),
            (true, None) => {
                tracing::warn!(
                    "no hci-storage binary next to hci-daemon or on PATH: replica servers run inside the daemon, and a daemon restart fails the replicas of running VMs for its duration"
                );
                ServerMode::InProcess
            }
            (false, _) => ServerMode::InProcess,
        };
        let replicas = ReplicaPool::start(
            dir,
            &disks,
            &host,
            args.replica_token_file.as_deref(),
            &server_mode,
        )
        .await
        .context("failed to start the replica servers")?;
        let replicas = Arc::new(replicas);
        ReplicaPool::supervise(&replicas);
        rt.replicas = Some(replicas);
        let controllers = Controllers::start(rt)
            .await
            .context("failed to start the controllers")?;
        api = api.with_console(controllers.vms().clone());
        Some(controllers)
    };
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = args.metrics {
        let source = MetricsSource {
            resources: api.resources().clone(),
            latency: api.latency().clone(),
            vms: controllers.as_ref().map(|c| c.vms().clone()),
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to serve metrics on {addr}"))?;
        tokio::spawn(async move {
            let stopped = async {
                let _ = metrics_stopped.await;
            };
            if let Err(e) = serve_metrics(listener, source, stopped).await {
                tracing::error!(error = %e, "the metrics server failed");
            }
        });
    }
    // Every listener stops on the same signal.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stopping.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut servers = tokio::task::JoinSet::new();
    for l in listen {
        let api = api.clone();
        let stopped = stopped();
        match l {
            Listen::Unix(path) => {
                servers.spawn(async move { serve_unix(api, &path, stopped).await });
            }
            Listen::Https(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("failed to listen on {addr}"))?;
                let security = security.clone().context("no TLS settings")?;
                servers.spawn(serve_tcp(api, listener, security, stopped));
            }
        }
    }
    let mut served = Ok(());
    tokio::select! {
        () = shutdown_signal() => {}
        Some(first) = servers.join_next() => {
            served = first.map_err(anyhow::Error::from).and_then(|r| r.map_err(anyhow::Error::from));
        }
    }
    let _ = stop.send(true);
    while let Some(r) = servers.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "a listener stopped with an error");
        }
    }
    let _ = stop_metrics.send(());
    if let Some(controllers) = controllers {
        controllers.shutdown().await;
    }
    served?;
    Ok(())
}
