//! Power loss under a replicated volume, with a real kernel mechanism: each
//! replica server keeps its root on its own ext4 filesystem on a loop device,
//! and the crash point is `EXT4_IOC_SHUTDOWN` with `NOLOGFLUSH` (what xfstests
//! uses to simulate a power cut): from that instant nothing that was not
//! already written back reaches the disk image, the journal is not flushed,
//! and after unmount + mount (journal recovery) the filesystem holds exactly
//! what a machine losing power at that point would find. Device-mapper
//! (`dm-flakey`, `dm-log-writes`) is not in this kernel; see docs/NOTES.md.
//!
//! The test proves, for the engine's dirty-region log and for data: every
//! write acknowledged before a flush that completed survives on every
//! replica; every region holding a write that no completed flush covered is
//! marked in every replica's log after the crash; reopening reconciles from
//! the logs only (not a full compare) and leaves the replicas identical.
//!
//! Needs root (mount, loop devices) and mkfs.ext4; without them it says so
//! and skips.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hci_core::block::{BlockDevice, WriteFlags};
use hci_core::volume::{CreateVolume, OpenVolume};
use hci_storage::engine::{EngineOptions, ReplicatedVolume, Robustness};
use hci_storage::replica::ReplicaNode;
use hci_storage::replica::client::{RemoteNode, ServerAddr};

const TOKEN: &str = "powerloss-token";
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// Volume size; dirty regions are 1 MiB at this size.
const SIZE: u64 = 32 * MIB;
/// Blocks in [0, SETTLED) are written and flushed before the workload.
const SETTLED: u64 = 16 * MIB;
const WRITERS: u64 = 4;
/// Regions (1 MiB) the workload narrows to before the cut.
const HOT: std::ops::Range<u64> = 20..24;
/// Writes per writer between flushes.
const FLUSH_EVERY: u64 = 8;

fn run(cmd: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| format!("{}: {e}", cmd[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// An ext4 filesystem in a file on /dev/shm, loop-mounted; unmounted and
/// removed on drop.
struct Disk {
    image: PathBuf,
    mnt: PathBuf,
    mounted: bool,
}

impl Disk {
    fn new(dir: &Path, name: &str) -> Result<Disk, String> {
        let image = PathBuf::from(format!(
            "/dev/shm/hci-powerloss-{}-{name}.img",
            std::process::id()
        ));
        let mnt = dir.join(name);
        std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
        let f = std::fs::File::create(&image).map_err(|e| e.to_string())?;
        f.set_len(128 * MIB).map_err(|e| e.to_string())?;
        let mut d = Disk {
            image,
            mnt,
            mounted: false,
        };
        run(&["mkfs.ext4", "-q", "-F", d.image_str(), "-E", "nodiscard"])?;
        d.mount()?;
        Ok(d)
    }

    fn image_str(&self) -> &str {
        self.image.to_str().unwrap_or_default()
    }

    fn mount(&mut self) -> Result<(), String> {
        let mnt = self.mnt.to_str().unwrap_or_default().to_string();
        run(&["mount", "-o", "loop", self.image_str(), &mnt])?;
        self.mounted = true;
        Ok(())
    }

    fn umount(&mut self) {
        if self.mounted {
            let mnt = self.mnt.to_str().unwrap_or_default().to_string();
            if run(&["umount", &mnt]).is_err() {
                let _ = run(&["umount", "-l", &mnt]);
            }
            self.mounted = false;
        }
    }

    /// The power cut: `EXT4_IOC_SHUTDOWN` with `EXT4_GOING_FLAGS_NOLOGFLUSH`
    /// (neither dirty pages nor the journal are written any more).
    fn cut_power(&self) {
        const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d; // _IOR('X', 125, __u32)
        const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;
        let dir = std::fs::File::open(&self.mnt).expect("open the mount point");
        let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: the ioctl reads one u32 through the pointer, which points at
        // a live local; `dir` is an open descriptor for the whole call.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&dir),
                EXT4_IOC_SHUTDOWN,
                &flags as *const u32,
            )
        };
        assert_eq!(
            r,
            0,
            "EXT4_IOC_SHUTDOWN: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Unmount (dropping what the shutdown left in memory) and mount again
    /// (journal recovery): the machine comes back.
    fn reboot(&mut self) {
        self.umount();
        self.mount().expect("mount after the power cut");
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.umount();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Why this machine cannot run the test, if it cannot.
fn unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (needs mount and loop devices)".into());
    }
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        return Some("mkfs.ext4 missing (e2fsprogs)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no loop devices (/dev/loop-control)".into());
    }
    None
}

/// A replica server process, SIGKILLed and reaped on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(root: &Path, token_file: &Path) -> Server {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let addr = format!("127.0.0.1:{port}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_hci-storage"))
            .args(["replica-server", "--listen", &addr, "--root"])
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
        Server { child, addr }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({sig})");
    }

    fn node(&self) -> Arc<dyn ReplicaNode> {
        let mut sa = ServerAddr::new(self.addr.clone(), TOKEN);
        // Longer than the crash sequence: in-flight requests must still be
        // waiting when the servers are stopped, not failed by the engine.
        sa.timeout = Duration::from_secs(60);
        Arc::new(RemoteNode::new(sa))
    }
}

/// The content of a block written by `writer` as its write number `seq`.
fn block_data(writer: u64, seq: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    let mut x = writer
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(seq.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(block);
    for c in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    b[..8].copy_from_slice(&writer.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&block.to_le_bytes());
    b
}

/// The settled content (writer `u64::MAX`, seq 0).
const SETTLED_WRITER: u64 = u64::MAX;
/// Stands for a block never written (zeroes).
const ZEROES: u64 = u64::MAX - 1;

/// One write of the workload to a block.
#[derive(Debug, Clone, Copy)]
struct Write {
    writer: u64,
    seq: u64,
    /// The write was acknowledged.
    done: bool,
    /// A flush issued after this write completed, completed too.
    durable: bool,
}

/// Per block, its writes in issue order (each block has one writer).
type History = Arc<Mutex<Vec<Vec<Write>>>>;

fn engine_options() -> EngineOptions {
    EngineOptions {
        timeout: Duration::from_secs(60),
        keepalive: None,
        rebuild_rate: None,
    }
}

fn rw() -> OpenVolume {
    OpenVolume {
        read_only: false,
        encryption_key: None,
    }
}

/// Writer `w`: random blocks of its own (block % WRITERS == w) in the upper
/// half, or only in the HOT regions once `narrow` is set; a flush every
/// FLUSH_EVERY writes; records what was acknowledged and what became durable.
async fn writer(
    vol: Arc<ReplicatedVolume>,
    w: u64,
    history: History,
    narrow: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let first = SETTLED / BLOCK;
    let wide: Vec<u64> = (first..SIZE / BLOCK).filter(|b| b % WRITERS == w).collect();
    let hot: Vec<u64> = wide
        .iter()
        .copied()
        .filter(|b| HOT.contains(&(b * BLOCK / MIB)))
        .collect();
    let mut x = 0x1234_5678_9ABC_DEF1u64.wrapping_mul(w + 1);
    let mut unflushed: Vec<(u64, usize)> = Vec::new();
    let mut seq = 0;
    while !stop.load(Ordering::SeqCst) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mine = if narrow.load(Ordering::SeqCst) {
            &hot
        } else {
            &wide
        };
        let block = mine[(x % mine.len() as u64) as usize];
        seq += 1;
        let at = {
            let mut h = history.lock().expect("history");
            let l = &mut h[block as usize];
            l.push(Write {
                writer: w,
                seq,
                done: false,
                durable: false,
            });
            l.len() - 1
        };
        if vol
            .write_at(
                &block_data(w, seq, block),
                block * BLOCK,
                WriteFlags::default(),
            )
            .await
            .is_err()
        {
            return;
        }
        history.lock().expect("history")[block as usize][at].done = true;
        unflushed.push((block, at));
        if seq % FLUSH_EVERY == 0 {
            if vol.flush().await.is_err() {
                return;
            }
            let mut h = history.lock().expect("history");
            for (b, i) in unflushed.drain(..) {
                h[b as usize][i].durable = true;
            }
        }
    }
}

/// Regions marked in a replica root's dirty-region log (1 MiB regions).
fn logged_regions(root: &Path) -> Vec<u64> {
    let body = std::fs::read(root.join(".fence").join("v.dirty")).expect("dirty log");
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

/// Reads the whole head of `volume` on one replica server, read-only.
async fn replica_blocks(node: &Arc<dyn ReplicaNode>) -> Vec<u8> {
    let st = node.fence_state("v").await.expect("fence state");
    let dev = node
        .open_fenced(
            "v",
            st.generation,
            OpenVolume {
                read_only: true,
                encryption_key: None,
            },
        )
        .await
        .expect("open replica");
    let mut all = vec![0u8; SIZE as usize];
    for (i, c) in all.chunks_mut(MIB as usize).enumerate() {
        dev.read_at(c, i as u64 * MIB).await.expect("read replica");
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_keeps_flushed_writes_and_the_dirty_log_finds_the_rest() {
    if let Some(why) = unsupported() {
        eprintln!(
            "SKIPPED power_loss_keeps_flushed_writes_and_the_dirty_log_finds_the_rest: {why}"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).expect("token");
    let mut disks: Vec<Disk> = ["a", "b", "c"]
        .iter()
        .map(|n| Disk::new(dir.path(), n).expect("loop-mounted ext4"))
        .collect();
    let roots: Vec<PathBuf> = disks.iter().map(|d| d.mnt.join("replicas")).collect();
    let servers: Vec<Server> = roots
        .iter()
        .map(|r| Server::start(r, &token_file))
        .collect();
    let nodes: Vec<Arc<dyn ReplicaNode>> = servers.iter().map(Server::node).collect();
    for n in &nodes {
        n.backend()
            .create(
                "v",
                CreateVolume {
                    size: SIZE,
                    encryption_key: None,
                },
            )
            .await
            .expect("create replica");
    }
    let vol = ReplicatedVolume::open("v", &nodes, rw(), engine_options())
        .await
        .expect("open engine");

    // Settled data: the lower half, flushed, then flushed again after the
    // log's lazy clear interval so its regions leave the logs.
    for b in 0..SETTLED / BLOCK {
        vol.write_at(
            &block_data(SETTLED_WRITER, 0, b),
            b * BLOCK,
            WriteFlags::default(),
        )
        .await
        .expect("settled write");
    }
    vol.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    vol.flush().await.expect("flush");

    // The workload: 4 writers with flushes over the whole upper half, then
    // only over the HOT regions for longer than the log's clear interval (so
    // the other regions leave the logs), then the power cut mid-flight.
    let history: History = Arc::new(Mutex::new(vec![Vec::new(); (SIZE / BLOCK) as usize]));
    let narrow = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(writer(
                vol.clone(),
                w,
                history.clone(),
                narrow.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    narrow.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Every server freezes at once (the moment of the cut). Replica b's disk
    // happens to have written its cache back just before (a state a real
    // power loss can leave: unflushed writes may or may not be on disk), the
    // others lose everything they had not written back; then the processes
    // die.
    for s in &servers {
        s.signal(libc::SIGSTOP);
    }
    run(&["sync", "-f", disks[1].mnt.to_str().unwrap_or_default()]).expect("syncfs");
    for d in &disks {
        d.cut_power();
    }
    let history: Vec<Vec<Write>> = history.lock().expect("history").clone();
    stop.store(true, Ordering::SeqCst);
    drop(servers);
    for t in &tasks {
        t.abort();
    }
    drop(vol);
    for d in &mut disks {
        d.reboot();
    }

    let writes: usize = history.iter().map(Vec::len).sum();
    let durable: usize = history.iter().flatten().filter(|w| w.durable).count();
    let acked: usize = history.iter().flatten().filter(|w| w.done).count();
    eprintln!(
        "workload: {writes} writes issued, {acked} acknowledged, {durable} covered by a completed flush"
    );
    assert!(durable > 0, "no flush completed during the workload");

    // Every region holding a write that no completed flush covered is marked
    // in every replica's log, and nothing else but the HOT regions is.
    let open_regions: std::collections::BTreeSet<u64> = history
        .iter()
        .enumerate()
        .filter(|(_, l)| l.last().is_some_and(|w| !w.durable))
        .map(|(b, _)| b as u64 * BLOCK / MIB)
        .collect();
    assert!(
        !open_regions.is_empty(),
        "no write was in flight at the cut"
    );
    for r in &roots {
        let logged: std::collections::BTreeSet<u64> = logged_regions(r).into_iter().collect();
        let missing: Vec<_> = open_regions.difference(&logged).collect();
        assert!(
            missing.is_empty(),
            "{}: regions {missing:?} hold unflushed writes but are not in the log {logged:?}",
            r.display()
        );
        assert!(
            logged.iter().all(|i| HOT.contains(i)),
            "{}: regions outside {HOT:?} still logged: {logged:?}",
            r.display()
        );
    }

    // Power back: the servers restart on the recovered filesystems and a new
    // engine reconciles from the logs.
    let servers: Vec<Server> = roots
        .iter()
        .map(|r| Server::start(r, &token_file))
        .collect();
    let nodes: Vec<Arc<dyn ReplicaNode>> = servers.iter().map(Server::node).collect();
    // How the replicas differ before reconcile: b kept writes the others lost.
    let before: Vec<Vec<u8>> = futures::future::join_all(nodes.iter().map(replica_blocks)).await;
    let differing = (0..(SIZE / BLOCK) as usize)
        .filter(|&b| {
            let r = b * BLOCK as usize..(b + 1) * BLOCK as usize;
            before[1][r.clone()] != before[0][r.clone()] || before[2][r.clone()] != before[0][r]
        })
        .count();
    let vol = ReplicatedVolume::open("v", &nodes, rw(), engine_options())
        .await
        .expect("reopen after the power cut");
    let rec = vol
        .last_reconcile()
        .expect("an unclean shutdown reconciles");
    eprintln!(
        "reconcile after the power cut: {rec:?}; {differing} blocks differed between the replicas"
    );
    assert!(!rec.full, "the logs were lost: full compare");
    assert!(
        rec.dirty_bytes > 0 && rec.dirty_bytes <= (HOT.end - HOT.start) * MIB,
        "{rec:?}"
    );
    assert!(
        rec.bytes_copied >= differing as u64 * BLOCK,
        "{differing} blocks differed, {rec:?}"
    );
    assert_eq!(vol.status().await.robustness, Robustness::Healthy);

    // Every block holds its last flushed write or a later one; nothing older,
    // nothing torn.
    let mut buf = vec![0u8; SIZE as usize];
    for (i, c) in buf.chunks_mut(MIB as usize).enumerate() {
        vol.read_at(c, i as u64 * MIB).await.expect("read volume");
    }
    let mut unflushed_seen = 0;
    let mut lost_unflushed = 0;
    for (b, l) in history.iter().enumerate() {
        let b = b as u64;
        let got = &buf[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
        let from = l.iter().rposition(|w| w.durable);
        let mut ok: Vec<(u64, u64)> = l[from.unwrap_or(0)..]
            .iter()
            .map(|w| (w.writer, w.seq))
            .collect();
        if from.is_none() {
            ok.push(if b * BLOCK < SETTLED {
                (SETTLED_WRITER, 0)
            } else {
                (ZEROES, 0)
            });
        }
        let matches = ok.iter().any(|&(w, s)| {
            if w == ZEROES {
                got.iter().all(|&x| x == 0)
            } else {
                got == block_data(w, s, b).as_slice()
            }
        });
        assert!(
            matches,
            "block {b}: content {:?} is none of {ok:?} (a flushed write was lost or a block is torn)",
            &got[..24]
        );
        if from.is_some_and(|i| i + 1 < l.len()) {
            unflushed_seen += 1;
            let last_done = l.iter().rev().find(|w| w.done && !w.durable);
            if let (Some(i), Some(_)) = (from, last_done)
                && got == block_data(l[i].writer, l[i].seq, b).as_slice()
            {
                lost_unflushed += 1;
            }
        }
    }
    eprintln!(
        "verified {} blocks; {unflushed_seen} had writes after their last flush, \
         {lost_unflushed} of them lost an acknowledged but unflushed write (as they may)",
        SIZE / BLOCK
    );
    vol.close().await.expect("close");

    // The replicas were reconciled: identical everywhere.
    let first = replica_blocks(&nodes[0]).await;
    for n in &nodes[1..] {
        let other = replica_blocks(n).await;
        let diff = first
            .chunks(BLOCK as usize)
            .zip(other.chunks(BLOCK as usize))
            .position(|(x, y)| x != y);
        assert_eq!(
            diff,
            None,
            "replica {} differs at block {diff:?}",
            n.label()
        );
    }
    drop(servers);
}
