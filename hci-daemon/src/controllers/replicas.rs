//! Replicated volumes (`spec.replicas > 1`): this node's replica servers,
//! where a volume's replicas go, and the engine that writes them all.
//!
//! Each disk given to the daemon (`--replica-disk DIR`, default
//! `DATA/replicas`) is served by its own replica server
//! (`hci_storage::replica`) on a port that stays the same across daemon
//! restarts (recorded in `DATA/replica-servers.json`), so a VMM process
//! whose engine outlives the daemon finds its replicas again. The servers
//! share one token (`--replica-token-file`, default `DATA/replica.token`,
//! mode 0600) that the VMM processes read; the nodes of a cluster must share
//! it. The node publishes its servers in `status.replicaServers`.
//!
//! Where VMs run in their own processes, each server is an
//! `hci-storage replica-server` process of its own too
//! ([`ServerMode::Process`]): like the VMs, it outlives a daemon restart,
//! so engines in running VMs never lose their replicas to one (with every
//! replica on this node, that would fail the guest's I/O). The next daemon
//! finds it again by the pid in `DISK/replica-server.pid` (checked against
//! the process's command line) and its recorded address. A server stops
//! by itself once its disk directory is gone.
//!
//! A replicated volume's replicas are placed on distinct nodes first, then
//! on distinct disks of a node; the placement is kept in the volume's
//! `status.replicas` and never moves by itself. The engine runs in whichever
//! process attaches the volume: the VMM of the VM using it, or the daemon
//! for a moment while the volume is detached (create, grow, snapshot).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hci_core::model::{Node, ReplicaStatus, Resource, Volume};
use hci_core::volume::{SnapshotInfo, VolumeBackend};
use hci_core::{Error, Result};
use hci_storage::engine::{EngineOptions, ReplicatedVolumeBackend};
use hci_storage::replica::ReplicaNode;
use hci_storage::replica::client::{RemoteNode, ServerAddr};
use hci_storage::replica::server::ReplicaServer;

/// One disk of this node holding replicas, and the server in front of it.
#[derive(Debug)]
pub struct ReplicaDisk {
    /// The directory.
    pub path: PathBuf,
    /// Its replica server (`HOST:PORT`).
    pub address: String,
}

/// Where the replica servers run.
#[derive(Debug, Clone)]
pub enum ServerMode {
    /// Tasks of the daemon (they stop with it).
    InProcess,
    /// One `hci-storage replica-server` process per disk, started from this
    /// binary (or found again after a daemon restart).
    Process(PathBuf),
}

/// How long a new server process may take to listen.
const SERVER_STARTUP: std::time::Duration = std::time::Duration::from_secs(10);
/// How often [`ReplicaPool::supervise`] checks the server processes.
const SUPERVISE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// The file naming a disk's server process.
const PID_FILE: &str = "replica-server.pid";

/// The `hci-storage` binary next to the current executable, else the first
/// on `PATH`.
pub fn find_server_binary() -> Option<PathBuf> {
    hci_compute::process::find_program("hci-storage")
}

/// The pid in `disk`'s pid file if that process is still the replica
/// server of `disk` (its command line says so).
fn running_server(disk: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(disk.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let root = disk.as_os_str().as_encoded_bytes();
    let serves_disk = args.windows(2).any(|w| w[0] == b"--root" && w[1] == root);
    let is_server = args.iter().any(|a| *a == b"replica-server");
    (serves_disk && is_server).then_some(pid)
}

/// Starts the server process of `disk` on its `recorded` address, else
/// (none, or taken now) on any free port of `host`; its address.
async fn start_server_process(
    binary: &Path,
    disk: &Path,
    recorded: Option<String>,
    host: &str,
    token_file: &Path,
    log: &Path,
) -> Result<String> {
    let first = recorded.map_or_else(|| free_server_address(host), Ok)?;
    let (address, pid) = match spawn_server(binary, disk, &first, token_file, log).await {
        Ok(pid) => (first, pid),
        Err(e) => {
            tracing::warn!(disk = %disk.display(), address = %first, error = %e, "replica server: trying another port");
            let other = free_server_address(host)?;
            let pid = spawn_server(binary, disk, &other, token_file, log).await?;
            (other, pid)
        }
    };
    tracing::info!(disk = %disk.display(), %address, pid, "replica server process started");
    Ok(address)
}

/// A free `HOST:PORT` for a replica server on `host`.
fn free_server_address(host: &str) -> Result<String> {
    super::free_address(host, "replica server").map(|a| a.to_string())
}

/// Whether something accepts TCP connections at `address`.
async fn listening(address: &str) -> bool {
    matches!(
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            tokio::net::TcpStream::connect(address)
        )
        .await,
        Ok(Ok(_))
    )
}

/// Starts `binary replica-server` for `disk` on `address`, in its own
/// process group (it outlives the daemon); waits until it listens.
async fn spawn_server(
    binary: &Path,
    disk: &Path,
    address: &str,
    token_file: &Path,
    log: &Path,
) -> Result<u32> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(format!("open {}", log.display()), e))?;
    let mut child = tokio::process::Command::new(binary)
        .arg("replica-server")
        .arg("--listen")
        .arg(address)
        .arg("--root")
        .arg(disk)
        .arg("--token-file")
        .arg(token_file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| Error::io(format!("start {} replica-server", binary.display()), e))?;
    let pid = child.id().unwrap_or(0);
    let deadline = std::time::Instant::now() + SERVER_STARTUP;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            return Err(Error::Unavailable {
                what: format!("replica server for {} on {address}", disk.display()),
                source: Some(format!("it exited ({status}): {}", tail.join(" | ")).into()),
            });
        }
        if listening(address).await {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.start_kill();
            return Err(Error::Unavailable {
                what: format!("replica server for {} on {address}", disk.display()),
                source: Some("not listening 10 s after it started".into()),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Reaped when it ends, while this daemon lives.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    let pid_file = disk.join(PID_FILE);
    std::fs::write(&pid_file, pid.to_string())
        .map_err(|e| Error::io(format!("write {}", pid_file.display()), e))?;
    Ok(pid)
}

/// This node's replica servers.
#[derive(Debug)]
pub struct ReplicaPool {
    token: Vec<u8>,
    token_file: PathBuf,
    disks: Vec<ReplicaDisk>,
    mode: ServerMode,
    data_dir: PathBuf,
}

/// Hex of 32 bytes from the kernel's random source.
fn new_token() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("read /dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads the token in `path`, creating it (mode 0600) on first start.
fn load_token(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().as_bytes().to_vec()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
    }
    let token = new_token()?;
    let tmp = path.with_extension("tmp");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, token.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    Ok(token.into_bytes())
}

impl ReplicaPool {
    /// Starts a replica server for each of `disks` on `host` (ports kept
    /// from the last start in `data_dir`).
    ///
    /// The servers' token is read from `token_file` (every node of a
    /// cluster must share it: engines reach replicas on other nodes), or
    /// from `DATA/replica.token`, created on first start.
    pub async fn start(
        data_dir: &Path,
        disks: &[PathBuf],
        host: &str,
        token_file: Option<&Path>,
        mode: &ServerMode,
    ) -> Result<Self> {
        let token_file =
            token_file.map_or_else(|| data_dir.join("replica.token"), Path::to_path_buf);
        let token = load_token(&token_file)?;
        let record = data_dir.join("replica-servers.json");
        let mut known: BTreeMap<String, String> = match std::fs::read(&record) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::invalid(record.display().to_string(), format!("is not JSON: {e}"))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(Error::io(format!("read {}", record.display()), e)),
        };
        let mut started = Vec::new();
        for (i, path) in disks.iter().enumerate() {
            std::fs::create_dir_all(path)
                .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
            let key = path.display().to_string();
            let recorded = known
                .get(&key)
                .filter(|a| a.rsplit_once(':').is_some_and(|(h, _)| h == host))
                .cloned();
            let address = match mode {
                ServerMode::InProcess => {
                    let wanted = recorded.unwrap_or_else(|| format!("{host}:0"));
                    let server = ReplicaServer::new(path, token.clone())?;
                    let (addr, _task) =
                        server
                            .spawn(&wanted)
                            .await
                            .map_err(|e| Error::Unavailable {
                                what: format!("replica server for {} on {wanted}", path.display()),
                                source: Some(e.to_string().into()),
                            })?;
                    tracing::info!(disk = %path.display(), address = %addr, "replica server started");
                    addr.to_string()
                }
                ServerMode::Process(binary) => {
                    let log = data_dir.join(format!("replica-server-{i}.log"));
                    match (running_server(path), recorded) {
                        (Some(pid), Some(address)) if listening(&address).await => {
                            tracing::info!(disk = %path.display(), %address, pid, "replica server still running: kept");
                            address
                        }
                        (running, recorded) => {
                            if let Some(pid) = running {
                                // Alive but not where it was recorded: replace it.
                                crate::sys::kill_pid(pid);
                            }
                            start_server_process(binary, path, recorded, host, &token_file, &log)
                                .await?
                        }
                    }
                }
            };
            known.insert(key, address.clone());
            started.push(ReplicaDisk {
                path: path.clone(),
                address,
            });
        }
        let json = serde_json::to_vec_pretty(&known)
            .map_err(|e| Error::invalid("replica server record", e.to_string()))?;
        std::fs::write(&record, json)
            .map_err(|e| Error::io(format!("write {}", record.display()), e))?;
        Ok(ReplicaPool {
            token,
            token_file,
            disks: started,
            mode: mode.clone(),
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Keeps the server processes running ([`ServerMode::Process`]): one
    /// that died (crashed, killed to upgrade it) is started again on the
    /// same address within a second or two, for as long as `pool` lives
    /// and its disk exists. Engines then add its replicas back.
    pub fn supervise(pool: &Arc<ReplicaPool>) {
        let ServerMode::Process(binary) = pool.mode.clone() else {
            return;
        };
        let weak = Arc::downgrade(pool);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SUPERVISE_EVERY).await;
                let Some(pool) = weak.upgrade() else {
                    return;
                };
                for (i, disk) in pool.disks.iter().enumerate() {
                    if !disk.path.is_dir() || running_server(&disk.path).is_some() {
                        continue;
                    }
                    let log = pool.data_dir.join(format!("replica-server-{i}.log"));
                    match spawn_server(&binary, &disk.path, &disk.address, &pool.token_file, &log)
                        .await
                    {
                        Ok(pid) => tracing::warn!(
                            disk = %disk.path.display(),
                            address = %disk.address,
                            pid,
                            "replica server was gone: started again"
                        ),
                        Err(e) => tracing::warn!(
                            disk = %disk.path.display(),
                            error = %e,
                            "replica server is gone and does not start again (retrying)"
                        ),
                    }
                }
            }
        });
    }

    /// The servers' addresses, in disk order.
    pub fn addresses(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.address.clone()).collect()
    }

    /// The disks.
    pub fn disks(&self) -> &[ReplicaDisk] {
        &self.disks
    }

    /// The file holding the servers' token (handed to VMM processes).
    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// The replica server at `address`, as an engine sees it.
    pub fn node(&self, address: &str) -> Arc<dyn ReplicaNode> {
        Arc::new(RemoteNode::new(ServerAddr::new(
            address,
            self.token.clone(),
        )))
    }

    /// A backend over the replica servers at `addresses` (one replica each).
    pub fn backend(&self, addresses: &[String]) -> Result<ReplicatedVolumeBackend> {
        let nodes = addresses.iter().map(|a| self.node(a)).collect();
        ReplicatedVolumeBackend::new(nodes, EngineOptions::default())
    }

    /// Removes this node's replicas of volume `name` (deleted), through
    /// their servers (which own them).
    pub async fn remove_local(&self, name: &str) {
        for disk in &self.disks {
            match self.node(&disk.address).backend().delete(name).await {
                Ok(()) => {
                    tracing::info!(volume = name, disk = %disk.path.display(), "replica deleted")
                }
                Err(Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(volume = name, error = %e, "cannot remove a replica"),
            }
        }
    }

    /// Removes, from this node's disks, replicas of volumes not in `keep`
    /// (deleted, or in a cluster placed on other nodes).
    pub async fn sweep(&self, keep: &BTreeSet<String>) {
        for disk in &self.disks {
            let server = self.node(&disk.address);
            let Ok(volumes) = server.backend().list().await else {
                continue;
            };
            for v in volumes {
                if !keep.contains(&v.name) {
                    tracing::info!(volume = v.name, disk = %disk.path.display(), "removing a replica whose volume is gone or placed elsewhere");
                    if let Err(e) = server.backend().delete(&v.name).await {
                        tracing::warn!(volume = v.name, error = %e, "cannot remove an orphaned replica");
                    }
                }
            }
        }
    }
}

/// Where volume `vol`'s data lives: the local pool, or the replica servers
/// of a replicated volume — with the control socket of the engine that owns
/// it while a VM uses it (snapshots must go through that engine, which
/// holds writes for the instant, to be the same on every replica).
pub(crate) fn backend_for(
    rt: &super::Runtime,
    vol: &Volume,
) -> Result<(Arc<dyn VolumeBackend>, Option<PathBuf>)> {
    match &rt.replicas {
        Some(pool) if vol.spec.replicas > 1 => {
            let backend: Arc<dyn VolumeBackend> = Arc::new(pool.backend(&placed(vol))?);
            let engine = vol
                .status_or_default()
                .attached_to
                .map(|vm| super::volume::engine_socket(rt, &vm, vol.name()));
            Ok((backend, engine))
        }
        _ => Ok((rt.volumes.clone(), None)),
    }
}

/// [`backend_for`] by volume name (the local pool once the resource is gone).
pub(crate) async fn backend_named(
    rt: &super::Runtime,
    name: &str,
) -> Result<(Arc<dyn VolumeBackend>, Option<PathBuf>)> {
    match rt.resources.try_get::<Volume>(name).await? {
        Some(v) => backend_for(rt, &v),
        None => Ok((rt.volumes.clone(), None)),
    }
}

/// Takes snapshot `snapshot` of volume `vol`, through its engine while a VM
/// uses a replicated volume.
pub(crate) async fn take_snapshot(
    rt: &super::Runtime,
    vol: &Volume,
    snapshot: &str,
) -> Result<SnapshotInfo> {
    let (backend, engine) = backend_for(rt, vol)?;
    let Some(socket) = engine else {
        return backend.snapshot(vol.name(), snapshot).await;
    };
    let req = hci_storage::control::ControlRequest::Snapshot {
        name: snapshot.to_string(),
    };
    let reply = tokio::task::spawn_blocking(move || hci_storage::control::call(&socket, &req))
        .await
        .map_err(super::join_err("engine control"))??;
    if !reply.ok {
        return Err(Error::Unavailable {
            what: format!("the engine of volume {:?}", vol.name()),
            source: Some(reply.error.unwrap_or_default().into()),
        });
    }
    backend
        .list_snapshots(vol.name())
        .await?
        .into_iter()
        .find(|s| s.name == snapshot)
        .ok_or_else(|| Error::not_found("snapshot", snapshot))
}

/// Chooses where `want` replicas of a volume go among `nodes` (each with
/// its replica servers; the first is the node placing it): the first
/// replica on that node — which thereby owns the volume, so that two nodes
/// placing the same volume at once never agree and only one claim wins —
/// then one per node while nodes last, spreading over the nodes with the
/// fewest `used` replicas, then on further disks of the nodes. Returns
/// `(node, address)` pairs, possibly fewer than `want`.
pub fn place(
    want: usize,
    nodes: &[(String, Vec<String>)],
    used: &BTreeMap<String, usize>,
) -> Vec<(String, String)> {
    let mut chosen: Vec<(String, String)> = Vec::new();
    let mut order: Vec<&(String, Vec<String>)> = nodes.iter().collect();
    if let Some((_, rest)) = order.split_first_mut() {
        rest.sort_by_key(|(n, _)| (used.get(n).copied().unwrap_or(0), n.clone()));
    }
    // Round after round: one more disk of every node.
    let deepest = nodes.iter().map(|(_, d)| d.len()).max().unwrap_or(0);
    for round in 0..deepest {
        for (node, disks) in &order {
            if chosen.len() == want {
                return chosen;
            }
            if let Some(addr) = disks.get(round) {
                chosen.push((node.clone(), addr.clone()));
            }
        }
    }
    chosen
}

/// The replica servers of every node that can take replicas: Ready and not
/// cordoned (this node always counts, with its own servers).
pub fn candidates(all: &[Node], this: &str, own: &[String]) -> Vec<(String, Vec<String>)> {
    let mut out = vec![(this.to_string(), own.to_vec())];
    for n in all {
        if n.name() == this || n.spec.cordoned {
            continue;
        }
        let st = n.status_or_default();
        let ready = st
            .conditions
            .iter()
            .any(|c| c.kind == "Ready" && c.status == hci_core::model::ConditionStatus::True);
        if ready && !st.replica_servers.is_empty() {
            out.push((n.name().to_string(), st.replica_servers.clone()));
        }
    }
    out
}

/// The replica servers in a volume's recorded placement.
pub fn placed(vol: &Volume) -> Vec<String> {
    vol.status_or_default()
        .replicas
        .iter()
        .filter_map(|r| r.address.clone())
        .collect()
}

/// Replica statuses for a placement, all healthy.
pub fn statuses(placement: &[(String, String)]) -> Vec<ReplicaStatus> {
    placement
        .iter()
        .map(|(node, address)| ReplicaStatus {
            node: node.clone(),
            healthy: true,
            rebuild_percent: None,
            address: Some(address.clone()),
        })
        .collect()
}

/// Checks which replicas of `name` answer: `(address, healthy)` pairs.
pub async fn probe(pool: &ReplicaPool, name: &str, addresses: &[String]) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for a in addresses {
        let ok = match pool.backend(std::slice::from_ref(a)) {
            Ok(b) => tokio::time::timeout(std::time::Duration::from_secs(3), b.info(name))
                .await
                .is_ok_and(|r| r.is_ok()),
            Err(_) => false,
        };
        out.push((a.clone(), ok));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(spec: &[(&str, usize)]) -> Vec<(String, Vec<String>)> {
        spec.iter()
            .map(|(n, disks)| {
                (
                    n.to_string(),
                    (0..*disks).map(|d| format!("{n}:{}", 7000 + d)).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn replicas_go_to_distinct_nodes_first() {
        let got = place(3, &nodes(&[("a", 2), ("b", 2), ("c", 2)]), &BTreeMap::new());
        let names: BTreeSet<_> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 3, "{got:?}");
    }

    #[test]
    fn one_node_spreads_over_its_disks() {
        let got = place(3, &nodes(&[("a", 3)]), &BTreeMap::new());
        let addrs: BTreeSet<_> = got.iter().map(|(_, a)| a.as_str()).collect();
        assert_eq!(addrs.len(), 3, "{got:?}");
        // Not enough disks: as many as there are, never two on one disk.
        let got = place(3, &nodes(&[("a", 2)]), &BTreeMap::new());
        assert_eq!(got.len(), 2, "{got:?}");
    }

    #[test]
    fn the_placing_node_comes_first_then_the_least_used() {
        let used = BTreeMap::from([
            ("a".to_string(), 9),
            ("b".to_string(), 5),
            ("c".to_string(), 1),
        ]);
        let got = place(2, &nodes(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]), &used);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "d"]);
        // Two nodes placing the same volume never choose the same list.
        let other = place(2, &nodes(&[("d", 1), ("a", 1), ("b", 1), ("c", 1)]), &used);
        assert_ne!(got, other);
    }
}
