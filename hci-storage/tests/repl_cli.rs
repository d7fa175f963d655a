//! `hci-storage serve --replica … --control` and `hci-storage replicas …` as
//! real processes: list/add/remove through the control socket, and an engine
//! killed with SIGKILL mid-write then reopened.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use hci_core::volume::OpenVolume;
use hci_storage::replica::ReplicaNode;
use hci_storage::replica::client::{RemoteNode, ServerAddr};

const TOKEN: &str = "cli-token";
const MIB: u64 = 1 << 20;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hci-storage"))
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A child process killed (SIGKILL) and reaped on drop; `log` collects its
/// standard output once it is started.
struct Kid {
    child: Child,
    log: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child started in its own process group, which is killed whole on drop
/// (fio forks its jobs; killing only the parent would orphan them).
struct Group(Kid);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group our child leads; no memory is involved.
        unsafe { libc::kill(-(self.0.child.id() as libc::pid_t), libc::SIGKILL) };
    }
}

impl Kid {
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({sig})");
    }

    /// SIGTERM, then waits for a clean exit; returns the output after start-up.
    fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        let st = self.child.wait().expect("wait");
        let out = self
            .log
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        assert!(st.success(), "serve exited with {st}: {out}");
        out
    }
}

fn replica_server(root: &Path, token_file: &Path, port: u16) -> Kid {
    let mut child = bin()
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
    assert!(line.contains("serving replicas"), "unexpected {line:?}");
    Kid { child, log: None }
}

/// `hci-storage serve ARGS`; returns the process once it serves, and its NBD URI.
fn serve(args: &[String]) -> (Kid, String) {
    let mut child = bin()
        .arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    for _ in 0..6 {
        let mut line = String::new();
        if out.read_line(&mut line).expect("read") == 0 {
            break;
        }
        seen.push_str(&line);
        if let Some((_, uri)) = line.trim().split_once(" as nbd://") {
            // Keep the pipe drained from now on so the child never blocks.
            let log = std::thread::spawn(move || {
                let mut all = String::new();
                while out.read_line(&mut all).is_ok_and(|n| n > 0) {}
                all
            });
            return (
                Kid {
                    child,
                    log: Some(log),
                },
                format!("nbd://{uri}"),
            );
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("serve did not start: {seen}");
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(uri).output().expect("qemu-io (install qemu-utils)");
    let s = text(&out);
    assert!(out.status.success(), "qemu-io {cmds:?} failed: {s}");
    assert!(
        !s.contains("verification failed") && !s.contains("error"),
        "qemu-io {cmds:?}: {s}"
    );
    s
}

fn replicas(args: &[&str]) -> Output {
    bin()
        .arg("replicas")
        .args(args)
        .output()
        .expect("run hci-storage replicas")
}

fn status(control: &Path) -> serde_json::Value {
    let out = replicas(&["list", "--control", p(control), "-o", "json"]);
    assert!(out.status.success(), "replicas list: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("JSON status")
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

struct Env {
    dir: tempfile::TempDir,
    token_file: PathBuf,
}

fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).expect("token");
    Env { dir, token_file }
}

/// CRC32C of the whole head of `volume` on the replica server at `port`.
async fn checksum(port: u16, volume: &str, size: u64) -> u32 {
    let node = RemoteNode::new(ServerAddr::new(format!("127.0.0.1:{port}"), TOKEN));
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

fn replica_states(st: &serde_json::Value) -> Vec<(String, String)> {
    st["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| {
            (
                r["node"].as_str().unwrap_or_default().to_string(),
                r["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn replicas_list_add_remove_through_the_control_socket() {
    let e = env();
    let (pa, pb) = (free_port(), free_port());
    let _a = replica_server(&e.dir.path().join("a"), &e.token_file, pa);
    let b = replica_server(&e.dir.path().join("b"), &e.token_file, pb);
    let control = e.dir.path().join("ctl.sock");
    let (srv, uri) = serve(&[
        "--replica".into(),
        format!("127.0.0.1:{pa}/v"),
        "--token-file".into(),
        p(&e.token_file).into(),
        "--size".into(),
        "32M".into(),
        "--replica-timeout-ms".into(),
        "1000".into(),
        "--keepalive-ms".into(),
        "200".into(),
        // The rebuild below goes through the rate limiter (5 MiB at 64 MiB/s).
        "--rebuild-rate".into(),
        "64M".into(),
        "--control".into(),
        p(&control).into(),
        "--listen".into(),
        format!("127.0.0.1:{}", free_port()),
    ]);
    qemu_io(
        &uri,
        &["write -P 0x33 0 4M", "write -P 0x34 20M 1M", "flush"],
    );

    let st = status(&control);
    assert_eq!(st["robustness"], "healthy", "{st}");
    assert_eq!(
        replica_states(&st),
        vec![(format!("127.0.0.1:{pa}"), "healthy".to_string())]
    );
    let table = replicas(&["list", "--control", p(&control)]);
    assert!(
        text(&table).contains("healthy"),
        "table output: {}",
        text(&table)
    );

    // A replica for another volume is refused with a reason.
    let bad = replicas(&[
        "add",
        "--control",
        p(&control),
        &format!("127.0.0.1:{pb}/other"),
    ]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("names volume other"), "{}", text(&bad));

    // Add B: its rebuild copies the allocated 5 MiB, not the 32 MiB volume.
    let add = replicas(&[
        "add",
        "--control",
        p(&control),
        &format!("127.0.0.1:{pb}/v"),
        "--wait",
    ]);
    assert!(add.status.success(), "replicas add: {}", text(&add));
    assert!(text(&add).contains("rebuilt"), "{}", text(&add));
    let st = status(&control);
    assert_eq!(st["robustness"], "healthy", "{st}");
    let states = replica_states(&st);
    assert_eq!(states.len(), 2, "{st}");
    assert!(states.iter().all(|(_, s)| s == "healthy"), "{st}");
    let sent = st["replicas"][1]["rebuild"]["sent"]
        .as_u64()
        .expect("rebuild progress");
    assert!((5 * MIB..32 * MIB).contains(&sent), "sent {sent}: {st}");
    // Writes now reach both; the data reads back through the engine.
    qemu_io(&uri, &["write -P 0x35 8M 1M", "flush", "read -P 0x33 0 4M"]);

    // B dies: the keepalive (or the next write) fails it; the volume degrades.
    b.signal(libc::SIGKILL);
    drop(b);
    let mut degraded = None;
    for _ in 0..300 {
        let st = status(&control);
        if st["robustness"] == "degraded" {
            degraded = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = degraded.expect("the dead replica was never marked failed");
    assert_eq!(st["replicas"][1]["state"], "failed", "{st}");
    assert!(st["replicas"][1]["reason"].is_string(), "{st}");

    // Removing it leaves a healthy single-replica volume; the last one stays.
    let rm = replicas(&[
        "remove",
        "--control",
        p(&control),
        &format!("127.0.0.1:{pb}/v"),
    ]);
    assert!(rm.status.success(), "replicas remove: {}", text(&rm));
    let st = status(&control);
    assert_eq!(st["robustness"], "healthy", "{st}");
    assert_eq!(replica_states(&st).len(), 1, "{st}");
    let last = replicas(&[
        "remove",
        "--control",
        p(&control),
        &format!("127.0.0.1:{pa}"),
    ]);
    assert!(!last.status.success(), "removed the last healthy replica");
    qemu_io(&uri, &["read -P 0x35 8M 1M", "read -P 0x34 20M 1M"]);
    let out = srv.stop();
    assert!(out.contains("stopped"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_killed_mid_write_keeps_flushed_data_and_reconciles_replicas() {
    if Command::new("fio").arg("--version").output().is_err() {
        panic!("fio is missing; run scripts/install-deps.sh");
    }
    let e = env();
    let (pa, pb) = (free_port(), free_port());
    let (ra, rb) = (e.dir.path().join("a"), e.dir.path().join("b"));
    let _a = replica_server(&ra, &e.token_file, pa);
    let _b = replica_server(&rb, &e.token_file, pb);
    let size = 32 * MIB;
    let args = |port: u16| -> Vec<String> {
        vec![
            "--replica".into(),
            format!("127.0.0.1:{pa}/v"),
            "--replica".into(),
            format!("127.0.0.1:{pb}/v"),
            "--token-file".into(),
            p(&e.token_file).into(),
            "--size".into(),
            "32M".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ]
    };
    let (engine, uri) = serve(&args(free_port()));
    qemu_io(&uri, &["write -P 0x11 0 8M", "flush"]);

    // An unflushed random-write workload on the upper half...
    let fio = Command::new("fio")
        .args([
            "--name=inflight",
            // Jobs as threads of the process we kill: a forked job calls
            // setsid() and escaped the process-group kill (one was found
            // idle 45 minutes after a run).
            "--thread",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--offset=16M",
            "--size=16M",
            "--iodepth=32",
            "--time_based",
            "--runtime=60",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn fio");
    // fio forks its job into a child: kill the whole group on drop.
    let fio = Group(Kid {
        child: fio,
        log: None,
    });
    std::thread::sleep(Duration::from_millis(300));
    // ...while more data is written and flushed; then the engine dies with
    // writes in flight.
    qemu_io(&uri, &["write -P 0x22 8M 4M", "flush"]);
    engine.signal(libc::SIGKILL);
    drop(engine);
    drop(fio);

    // Reopen (a new generation): every flushed write is there.
    let (engine, uri) = serve(&args(free_port()));
    qemu_io(&uri, &["read -P 0x11 0 8M", "read -P 0x22 8M 4M"]);
    let out = engine.stop();
    assert!(out.contains("robustness Healthy"), "{out}");

    // The replicas were reconciled at open: identical, and marked clean.
    let (ca, cb) = (checksum(pa, "v", size).await, checksum(pb, "v", size).await);
    assert_eq!(ca, cb, "replicas differ after the engine crash");
    for root in [&ra, &rb] {
        let fence = std::fs::read_to_string(root.join(".fence").join("v.json")).expect("fence");
        assert!(fence.contains("\"clean\":true"), "{fence}");
    }
}

/// CRC32C of every 4 KiB block of `dev`.
async fn block_crcs(dev: &dyn hci_core::block::BlockDevice, size: u64) -> Vec<u32> {
    let mut crcs = Vec::with_capacity((size / 4096) as usize);
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        dev.read_at(&mut buf, off).await.expect("read replica");
        crcs.extend(buf.chunks(4096).map(crc32c::crc32c));
        off += MIB;
    }
    crcs
}

/// Per-block CRCs of the head of `volume` on the replica server at `port`.
async fn remote_block_crcs(port: u16, volume: &str, size: u64) -> Vec<u32> {
    let node = RemoteNode::new(ServerAddr::new(format!("127.0.0.1:{port}"), TOKEN));
    let st = node.fence_state(volume).await.expect("fence state");
    let opts = OpenVolume {
        read_only: true,
        encryption_key: None,
    };
    let dev = node
        .open_fenced(volume, st.generation, opts)
        .await
        .expect("open replica");
    block_crcs(&*dev, size).await
}

/// Dirty regions recorded in a replica root's log for `volume` (1 MiB regions).
fn dirty_regions(root: &Path, volume: &str) -> Vec<u64> {
    let body =
        std::fs::read(root.join(".fence").join(format!("{volume}.dirty"))).expect("dirty log");
    assert_eq!(&body[..8], b"HCIDIRT1");
    assert_eq!(
        u64::from_le_bytes(body[8..16].try_into().expect("8 bytes")),
        MIB
    );
    let mut out = Vec::new();
    for (i, b) in body[16..].iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                out.push(i as u64 * 8 + bit);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_crash_reconciles_only_the_dirty_regions() {
    if Command::new("fio").arg("--version").output().is_err() {
        panic!("fio is missing; run scripts/install-deps.sh");
    }
    let e = env();
    let (pa, pb) = (free_port(), free_port());
    let (ra, rb) = (e.dir.path().join("a"), e.dir.path().join("b"));
    let local = e.dir.path().join("local");
    let _a = replica_server(&ra, &e.token_file, pa);
    let _b = replica_server(&rb, &e.token_file, pb);
    let size = 64 * MIB;
    let control = e.dir.path().join("ctl.sock");
    let args = |port: u16| -> Vec<String> {
        vec![
            "--replica".into(),
            format!("{}/v", p(&local)),
            "--replica".into(),
            format!("127.0.0.1:{pa}/v"),
            "--replica".into(),
            format!("127.0.0.1:{pb}/v"),
            "--token-file".into(),
            p(&e.token_file).into(),
            "--size".into(),
            "64M".into(),
            "--control".into(),
            p(&control).into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ]
    };
    let (engine, uri) = serve(&args(free_port()));
    // 40 MiB of flushed data; flushes clear the log lazily (at most once a
    // second), so flush until the replicas' logs are empty again.
    qemu_io(&uri, &["write -P 0x11 0 40M", "flush"]);
    let mut cleared = false;
    for _ in 0..40 {
        qemu_io(&uri, &["flush"]);
        if [&ra, &rb, &local]
            .iter()
            .all(|r| dirty_regions(r, "v").is_empty())
        {
            cleared = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(cleared, "flushes never cleared the dirty-region logs");

    // Unflushed random writes to 48M..52M, then the engine dies mid-write.
    let fio = Command::new("fio")
        .args([
            "--name=inflight",
            // Jobs as threads of the process we kill: a forked job calls
            // setsid() and escaped the process-group kill (one was found
            // idle 45 minutes after a run).
            "--thread",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--offset=48M",
            "--size=4M",
            "--iodepth=32",
            "--time_based",
            "--runtime=60",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn fio");
    // fio forks its job into a child: kill the whole group on drop.
    let fio = Group(Kid {
        child: fio,
        log: None,
    });
    // Wait until fio's writes have marked regions (fio may take a while to
    // start on a loaded machine), then a moment more.
    for _ in 0..600 {
        if !dirty_regions(&ra, "v").is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    engine.signal(libc::SIGKILL);
    drop(engine);
    drop(fio);
    for r in [&ra, &rb, &local] {
        let d = dirty_regions(r, "v");
        assert!(!d.is_empty(), "no dirty region on {}", r.display());
        assert!(d.iter().all(|&i| (48..52).contains(&i)), "{d:?}");
    }

    // Reopen: reconcile compares only the dirty regions (4 MiB of 44 MiB
    // allocated) and the flushed data is intact.
    let (engine, uri) = serve(&args(free_port()));
    let st = status(&control);
    let rec = &st["reconcile"];
    eprintln!("reconcile after the crash: {rec}");
    assert_eq!(rec["full"], false, "{st}");
    let dirty = rec["dirty_bytes"].as_u64().expect("dirty_bytes");
    let scanned = rec["bytes_scanned"].as_u64().expect("bytes_scanned");
    assert!(dirty > 0 && dirty <= 4 * MIB, "{st}");
    // Two replicas compared against the source, each over the dirty regions.
    assert!(scanned <= 2 * dirty, "{st}");
    qemu_io(&uri, &["read -P 0x11 0 40M"]);
    let out = engine.stop();
    assert!(out.contains("robustness Healthy"), "{out}");

    // Every block of the three replicas agrees.
    let a = remote_block_crcs(pa, "v", size).await;
    let b = remote_block_crcs(pb, "v", size).await;
    let backend = hci_storage::local::LocalVolumeBackend::new(&local).expect("local backend");
    let dev = hci_core::volume::VolumeBackend::open(
        &backend,
        "v",
        OpenVolume {
            read_only: true,
            encryption_key: None,
        },
    )
    .await
    .expect("open local replica");
    let l = block_crcs(&*dev, size).await;
    for (i, ((x, y), z)) in a.iter().zip(&b).zip(&l).enumerate() {
        assert!(x == y && y == z, "block {i} differs between the replicas");
    }
    assert_eq!((a.len(), b.len(), l.len()), (16384, 16384, 16384));
}
