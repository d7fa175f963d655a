//! Fault tests with real replica-server processes: kill -9, SIGSTOP, stale
//! replicas after a restart, rebuild to byte-identical replicas.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hci_core::block::{BlockDevice, WriteFlags};
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};
use hci_storage::engine::rebuild::RebuildProgress;
use hci_storage::engine::{
    EngineOptions, ReplicaState, ReplicatedVolume, ReplicatedVolumeBackend, Robustness,
};
use hci_storage::replica::ReplicaNode;
use hci_storage::replica::client::{RemoteNode, ServerAddr};

const TOKEN: &str = "fault-token";
const MIB: u64 = 1 << 20;

/// A `hci-storage replica-server` child process.
struct Proc {
    child: Child,
    port: u16,
    root: PathBuf,
    token_file: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn start(root: &Path, token_file: &Path, port: u16) -> Proc {
    Proc {
        child: spawn_server(root, token_file, port),
        port,
        root: root.to_path_buf(),
        token_file: token_file.to_path_buf(),
    }
}

/// Starts a replica server and waits until it listens.
fn spawn_server(root: &Path, token_file: &Path, port: u16) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hci-storage"))
        .args(["replica-server", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--root")
        .arg(root)
        .arg("--token-file")
        .arg(token_file)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn replica-server");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).expect("read");
    assert!(
        line.contains("serving replicas"),
        "unexpected output {line:?}"
    );
    child
}

impl Proc {
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_server(&self.root, &self.token_file, self.port);
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({sig})");
    }

    /// Waits until every thread of the process is stopped (SIGSTOP is asynchronous).
    fn wait_stopped(&self) {
        let dir = format!("/proc/{}/task", self.child.id());
        loop {
            let all_stopped = std::fs::read_dir(&dir)
                .expect("task dir")
                .flatten()
                .all(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .ok()
                        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('T')))
                        .unwrap_or(false)
                });
            if all_stopped {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn node(&self, timeout: Duration) -> Arc<dyn ReplicaNode> {
        let mut sa = ServerAddr::new(format!("127.0.0.1:{}", self.port), TOKEN);
        sa.timeout = timeout;
        Arc::new(RemoteNode::new(sa))
    }
}

struct Setup {
    procs: Vec<Proc>,
    _dir: tempfile::TempDir,
}

fn setup(n: usize) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let tf = dir.path().join("token");
    std::fs::write(&tf, TOKEN).expect("token");
    let procs = (0..n)
        .map(|i| {
            let root = dir.path().join(format!("node{i}"));
            start(&root, &tf, free_port())
        })
        .collect();
    Setup { procs, _dir: dir }
}

fn opts(ms: u64) -> EngineOptions {
    EngineOptions {
        timeout: Duration::from_millis(ms),
        ..EngineOptions::default()
    }
}

fn block(i: u64, round: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    for (j, b) in v.iter_mut().enumerate() {
        *b = (i.wrapping_mul(31) ^ round.wrapping_mul(7) ^ j as u64) as u8 | 1;
    }
    v
}

/// Reads the whole head of `volume` on one node (at the current generation).
async fn checksum(node: &Arc<dyn ReplicaNode>, volume: &str, size: u64) -> u32 {
    let st = node.fence_state(volume).await.expect("fence state");
    let dev = node
        .open_fenced(
            volume,
            st.generation,
            OpenVolume {
                read_only: true,
                encryption_key: None,
            },
        )
        .await
        .expect("open replica");
    let mut crc = 0;
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        dev.read_at(&mut buf, off).await.expect("read replica");
        crc = crc32c::crc32c_append(crc, &buf);
        off += MIB;
    }
    crc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_verified_writes_then_rebuild() {
    let s = setup(3);
    let nodes: Vec<_> = s
        .procs
        .iter()
        .map(|p| p.node(Duration::from_secs(3)))
        .collect();
    let b = ReplicatedVolumeBackend::new(nodes.clone(), opts(3000)).expect("backend");
    let size = 16 * MIB;
    b.create("v", CreateVolume::new(size))
        .await
        .expect("create");
    let vol = b
        .open_engine("v", OpenVolume::default())
        .await
        .expect("open");
    let blocks = size / 4096;
    let mut s = s;
    let mut killed = false;
    for round in 0..3u64 {
        for i in (0..blocks).step_by(3) {
            if round == 1 && i >= blocks / 2 && !killed {
                s.procs[1].signal(libc::SIGKILL);
                killed = true;
            }
            vol.write_at(&block(i, round), i * 4096, WriteFlags::default())
                .await
                .expect("no write may fail while a replica dies");
        }
    }
    vol.flush().await.expect("flush");
    let mut buf = vec![0u8; 4096];
    for i in (0..blocks).step_by(3) {
        vol.read_at(&mut buf, i * 4096).await.expect("read");
        assert!(buf == block(i, 2), "block {i} lost its last write");
    }
    let st = vol.status().await;
    assert_eq!(st.robustness, Robustness::Degraded);
    assert!(matches!(st.replicas[1].state, ReplicaState::Failed(_)));

    // The killed server comes back with a stale copy; rebuild it.
    s.procs[1].restart();
    let progress = Arc::new(RebuildProgress::default());
    let report = vol
        .add_replica(nodes[1].clone(), progress.clone())
        .await
        .expect("rebuild");
    assert_eq!(vol.status().await.robustness, Robustness::Healthy);
    assert!(report.bytes_sent > 0 && report.bytes_sent <= size);
    vol.flush().await.expect("flush");
    let sums = [
        checksum(&nodes[0], "v", size).await,
        checksum(&nodes[1], "v", size).await,
        checksum(&nodes[2], "v", size).await,
    ];
    assert!(
        sums[0] == sums[1] && sums[1] == sums[2],
        "replicas differ after rebuild: {sums:x?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_is_failed_within_the_timeout() {
    let s = setup(2);
    let nodes: Vec<_> = s
        .procs
        .iter()
        .map(|p| p.node(Duration::from_millis(500)))
        .collect();
    let b = ReplicatedVolumeBackend::new(nodes, opts(500)).expect("backend");
    b.create("v", CreateVolume::new(4 * MIB))
        .await
        .expect("create");
    let vol = b
        .open_engine("v", OpenVolume::default())
        .await
        .expect("open");
    vol.write_at(&block(0, 0), 0, WriteFlags::default())
        .await
        .expect("write");
    s.procs[1].signal(libc::SIGSTOP);
    s.procs[1].wait_stopped();
    // Bounded by the 500 ms timeout; the test would hang forever otherwise.
    vol.write_at(&block(1, 0), 4096, WriteFlags::default())
        .await
        .expect("a hung replica must not fail the write");
    let st = vol.status().await;
    s.procs[1].signal(libc::SIGCONT);
    assert!(
        matches!(st.replicas[1].state, ReplicaState::Failed(_)),
        "{st:?}"
    );
    assert_eq!(st.robustness, Robustness::Degraded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_is_never_served_after_reopen() {
    let mut s = setup(2);
    let nodes: Vec<_> = s
        .procs
        .iter()
        .map(|p| p.node(Duration::from_secs(2)))
        .collect();
    let size = 4 * MIB;
    {
        let b = ReplicatedVolumeBackend::new(nodes.clone(), opts(2000)).expect("backend");
        b.create("v", CreateVolume::new(size))
            .await
            .expect("create");
        let vol = b
            .open_engine("v", OpenVolume::default())
            .await
            .expect("open");
        vol.write_at(&block(0, 0), 0, WriteFlags::default())
            .await
            .expect("write A");
        s.procs[0].signal(libc::SIGKILL);
        vol.write_at(&block(0, 1), 0, WriteFlags::default())
            .await
            .expect("write B with one replica gone");
        vol.flush().await.expect("flush");
    }
    s.procs[0].restart();
    let vol = ReplicatedVolume::open("v", &nodes, OpenVolume::default(), opts(2000))
        .await
        .expect("reopen");
    let st = vol.status().await;
    assert_eq!(st.replicas[0].state, ReplicaState::Stale, "{st:?}");
    let mut buf = vec![0u8; 4096];
    vol.read_at(&mut buf, 0).await.expect("read");
    assert!(buf == block(0, 1), "served data from the stale replica");
    vol.add_replica(nodes[0].clone(), Arc::new(RebuildProgress::default()))
        .await
        .expect("rebuild");
    assert_eq!(
        checksum(&nodes[0], "v", size).await,
        checksum(&nodes[1], "v", size).await
    );
}

/// `hci-storage serve --replica …` as a process, fio verifying through NBD
/// while one of the two replica servers is killed with SIGKILL.
#[test]
fn fio_verify_through_nbd_survives_a_replica_kill() {
    if Command::new("fio").arg("--version").output().is_err() {
        panic!("fio is missing; run scripts/install-deps.sh");
    }
    let mut s = setup(2);
    let tf = s.procs[0].token_file.clone();
    let port = free_port();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_hci-storage"))
        .arg("serve")
        .args(["--replica", &format!("127.0.0.1:{}/vol", s.procs[0].port)])
        .args(["--replica", &format!("127.0.0.1:{}/vol", s.procs[1].port)])
        .arg("--token-file")
        .arg(&tf)
        .args(["--size", "64M", "--replica-timeout-ms", "2000"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let mut out = BufReader::new(serve.stdout.take().expect("stdout"));
    let mut uri = String::new();
    for _ in 0..4 {
        let mut line = String::new();
        out.read_line(&mut line).expect("read");
        if let Some(rest) = line.trim().strip_prefix("serving vol as ") {
            uri = rest.to_string();
            break;
        }
    }
    assert!(!uri.is_empty(), "serve did not start");
    let fio = Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=48M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
    // Let the workload get going, then kill a replica server mid-job.
    std::thread::sleep(Duration::from_millis(700));
    s.procs[1].signal(libc::SIGKILL);
    let res = fio.wait_with_output().expect("fio");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    let _ = s.procs.pop();
    // SAFETY: signal to our own child.
    unsafe { libc::kill(serve.id() as libc::pid_t, libc::SIGTERM) };
    let _ = serve.wait();
    assert!(res.status.success(), "fio failed:\n{text}");
    assert!(!text.contains("verify: bad"), "{text}");
    assert!(text.contains("err= 0"), "fio reported errors:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_replica_copies_only_what_changed_while_it_was_gone() {
    let mut s = setup(3);
    let nodes: Vec<_> = s
        .procs
        .iter()
        .map(|p| p.node(Duration::from_secs(3)))
        .collect();
    let b = ReplicatedVolumeBackend::new(nodes.clone(), opts(3000)).expect("backend");
    let size = 16 * MIB;
    b.create("v", CreateVolume::new(size))
        .await
        .expect("create");
    let vol = b
        .open_engine("v", OpenVolume::default())
        .await
        .expect("open");
    let blocks = size / 4096;
    for i in 0..blocks {
        vol.write_at(&block(i, 0), i * 4096, WriteFlags::default())
            .await
            .expect("write");
    }
    vol.flush().await.expect("flush");

    // Replica 1 dies; 100 scattered blocks change while it is gone.
    s.procs[1].signal(libc::SIGKILL);
    let changed: Vec<u64> = (0..100).map(|k| k * 40 + 7).collect();
    for &i in &changed {
        vol.write_at(&block(i, 1), i * 4096, WriteFlags::default())
            .await
            .expect("no write may fail while a replica dies");
    }
    vol.flush().await.expect("flush");
    assert!(matches!(
        vol.status().await.replicas[1].state,
        ReplicaState::Failed(_)
    ));

    // It comes back with its old copy: the rebuild compares all 16 MiB but
    // sends exactly the 100 changed blocks.
    s.procs[1].restart();
    let report = vol
        .add_replica(nodes[1].clone(), Arc::new(RebuildProgress::default()))
        .await
        .expect("rebuild");
    assert_eq!(report.bytes_sent, changed.len() as u64 * 4096, "{report:?}");
    assert_eq!(vol.status().await.robustness, Robustness::Healthy);
    let sums = [
        checksum(&nodes[0], "v", size).await,
        checksum(&nodes[1], "v", size).await,
        checksum(&nodes[2], "v", size).await,
    ];
    assert!(
        sums[0] == sums[1] && sums[1] == sums[2],
        "replicas differ after rebuild: {sums:x?}"
    );
}
