//! The local store against an in-memory model: random operation sequences,
//! reopening from the files, and a process killed in the middle of writes and
//! snapshot operations.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hci_core::block::ExtentKind;
use hci_storage::local::Replica;
use proptest::prelude::*;

const BS: usize = 4096;
const BLOCKS: usize = 48;
const SIZE: usize = BS * BLOCKS;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: usize,
        len: usize,
        seed: u8,
    },
    Zero {
        offset: usize,
        len: usize,
        keep: bool,
    },
    Snapshot,
    Revert(usize),
    DeleteSnapshot(usize),
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE - 1).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(5 * BS)));
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        2 => (range, any::<bool>()).prop_map(|((offset, len), keep)| Op::Zero { offset, len, keep }),
        2 => Just(Op::Snapshot),
        1 => (0usize..8).prop_map(Op::Revert),
        2 => (0usize..8).prop_map(Op::DeleteSnapshot),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn fill(len: usize, offset: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((offset + i) as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn read_all(r: &Replica) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE];
    r.read(&mut buf, 0).expect("read head");
    buf
}

fn check(r: &std::sync::Arc<Replica>, head: &[u8], snaps: &[(String, Vec<u8>)], step: usize) {
    assert!(
        read_all(r) == head,
        "head differs from the model after step {step}"
    );
    let ext = r.block_status(0, SIZE as u64).expect("block status");
    for e in ext.iter().filter(|e| e.kind == ExtentKind::Hole) {
        let (a, b) = (e.offset as usize, (e.offset + e.len) as usize);
        assert!(
            head[a..b].iter().all(|&x| x == 0),
            "data reported as a hole after step {step}"
        );
    }
    let listed: Vec<String> = r.snapshots().into_iter().map(|s| s.name).collect();
    let want: Vec<String> = snaps.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(listed, want, "snapshot list after step {step}");
    for (name, data) in snaps {
        let v = r.open_snapshot(name).expect("open snapshot");
        let mut buf = vec![0u8; SIZE];
        v.read(&mut buf, 0).expect("read snapshot");
        assert!(&buf == data, "snapshot {name} differs after step {step}");
        // Changed blocks from the beginning cover every non-zero block.
        let changed = r.changed_blocks(None, name).expect("changed blocks");
        for (i, block) in data.chunks(BS).enumerate() {
            if block.iter().any(|&x| x != 0) {
                let off = (i * BS) as u64;
                assert!(
                    changed.iter().any(|c| c.offset <= off && off < c.end()),
                    "block {i} of {name} missing from changed blocks"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vol");
        let mut r = Replica::create(&path, SIZE as u64, None).expect("create");
        let mut head = vec![0u8; SIZE];
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        let mut counter = 0;
        for (step, op) in ops.iter().enumerate() {
            match op {
                Op::Write { offset, len, seed } => {
                    let data = fill(*len, *offset, *seed);
                    r.write(&data, *offset as u64, false).expect("write");
                    head[*offset..offset + len].copy_from_slice(&data);
                }
                Op::Zero { offset, len, keep } => {
                    r.zero(*offset as u64, *len as u64, *keep, false).expect("zero");
                    head[*offset..offset + len].fill(0);
                }
                Op::Snapshot => {
                    counter += 1;
                    let name = format!("s{counter}");
                    r.snapshot(&name).expect("snapshot");
                    snaps.push((name, head.clone()));
                }
                Op::Revert(i) => {
                    if let Some((name, data)) = snaps.get(i % snaps.len().max(1)) {
                        r.revert(name).expect("revert");
                        head = data.clone();
                    }
                }
                Op::DeleteSnapshot(i) => {
                    if !snaps.is_empty() {
                        let (name, _) = snaps.remove(i % snaps.len());
                        r.delete_snapshot(&name).expect("delete snapshot");
                    }
                }
                Op::Flush => r.flush().expect("flush"),
                Op::Reopen => {
                    drop(r);
                    r = Replica::open(&path, None).expect("reopen");
                }
            }
            check(&r, &head, &snaps, step);
        }
        drop(r);
        let r = Replica::open(&path, None).expect("final reopen");
        check(&r, &head, &snaps, usize::MAX);
    }
}

/// The child half of `killed_writer_loses_nothing_acknowledged`: writes, flushes
/// and acknowledges on stdout, taking and deleting snapshots along the way.
fn child(dir: &Path) {
    let r = Replica::create(dir, SIZE as u64, None).expect("create");
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let block = (i as usize * 7) % BLOCKS;
        let data = fill(BS, block * BS, i as u8);
        r.write(&data, (block * BS) as u64, false).expect("write");
        r.flush().expect("flush");
        writeln!(out, "ack {i}").expect("stdout");
        out.flush().expect("stdout");
        if i % 5 == 0 {
            r.snapshot(&format!("s{i}")).expect("snapshot");
        }
        if i % 5 == 3 && i > 10 {
            r.delete_snapshot(&format!("s{}", i - 13))
                .expect("delete snapshot");
        }
    }
}

#[test]
fn killed_writer_loses_nothing_acknowledged() {
    if let Ok(dir) = std::env::var("HCI_TEST_KILL_CHILD") {
        child(Path::new(&dir));
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    for round in 0..3 {
        let dir = tmp.path().join(format!("vol{round}"));
        let exe = std::env::current_exe().expect("current exe");
        let mut c = Command::new(exe)
            .args([
                "--exact",
                "killed_writer_loses_nothing_acknowledged",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HCI_TEST_KILL_CHILD", &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = c.stdout.take().expect("stdout");
        let mut acked: Option<u64> = None;
        let start = Instant::now();
        let kill_after = Duration::from_millis(300 + 200 * round);
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("ack ").and_then(|n| n.parse().ok()) {
                acked = Some(n);
            }
            if start.elapsed() > kill_after {
                break;
            }
        }
        c.kill().expect("kill");
        c.wait().expect("wait");
        // The child kept writing between our last read and the kill: its
        // acknowledgements are still in the pipe. The newest of them is the
        // last write that must survive.
        for line in lines {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("ack ").and_then(|n| n.parse().ok()) {
                acked = Some(n);
            }
        }
        let last = acked.expect("the child acknowledged nothing");
        let r = Replica::open(&dir, None).expect("the volume must open after a kill");
        let head = read_all(&r);
        for block in 0..BLOCKS {
            // The newest acknowledged write to this block, or the one in flight after it.
            let writes: Vec<u64> = (0..=last + 1)
                .filter(|i| (*i as usize * 7) % BLOCKS == block)
                .collect();
            let got = &head[block * BS..(block + 1) * BS];
            let ok_values: Vec<Vec<u8>> = writes
                .iter()
                .rev()
                .take_while(|&&i| {
                    i >= writes
                        .iter()
                        .copied()
                        .filter(|&i| i <= last)
                        .max()
                        .unwrap_or(0)
                })
                .map(|&i| fill(BS, block * BS, i as u8))
                .collect();
            if writes.iter().any(|&i| i <= last) {
                assert!(
                    ok_values.iter().any(|v| v.as_slice() == got),
                    "block {block} lost an acknowledged write"
                );
            }
        }
        for s in r.snapshots() {
            r.open_snapshot(&s.name)
                .expect("every listed snapshot opens");
        }
    }
}

#[test]
fn punched_space_really_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Replica::create(&dir.path().join("v"), 64 << 20, None).expect("create");
    let used = |r: &Replica| r.info("v").expect("info").allocated;
    let before = used(&r);
    r.write(&vec![7u8; 16 << 20], 0, false).expect("write");
    r.flush().expect("flush");
    assert!(used(&r) >= before + (16 << 20), "writes did not allocate");
    r.zero(0, 16 << 20, false, false).expect("discard");
    assert!(
        used(&r) < before + (1 << 20),
        "discard did not return space: {}",
        used(&r)
    );
    // Under a snapshot, zeroes must hide the old data instead.
    r.write(&vec![9u8; 1 << 20], 0, false).expect("write");
    r.snapshot("s").expect("snapshot");
    r.zero(0, 1 << 20, false, false)
        .expect("zero over snapshot");
    let mut buf = vec![1u8; 1 << 20];
    r.read(&mut buf, 0).expect("read");
    assert!(buf.iter().all(|&b| b == 0));
    let v = r.open_snapshot("s").expect("open");
    v.read(&mut buf, 0).expect("read snapshot");
    assert!(buf.iter().all(|&b| b == 9));
}

#[test]
fn encryption_hides_data_and_refuses_wrong_keys() {
    use hci_core::volume::EncryptionKey;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v");
    let key = EncryptionKey::new(vec![3u8; 64]);
    let r = Replica::create(&path, 1 << 20, Some(&key)).expect("create");
    let secret = b"attack at dawn, attack at dawn!!".repeat(128);
    r.write(&secret, 8192, false).expect("write");
    r.flush().expect("flush");
    drop(r);
    let raw = std::fs::read(path.join("layer-1.img")).expect("raw layer");
    assert!(
        !raw.windows(14).any(|w| w == b"attack at dawn"),
        "plaintext on disk"
    );
    let e = Replica::open(&path, Some(&EncryptionKey::new(vec![4u8; 64]))).expect_err("wrong key");
    assert!(e.to_string().contains("wrong encryption key"), "{e}");
    let e = Replica::open(&path, Some(&EncryptionKey::new(vec![4u8; 10]))).expect_err("short key");
    assert!(e.to_string().contains("64 bytes"), "{e}");
    let locked = Replica::open(&path, None).expect("metadata ops work without the key");
    assert!(
        locked.read(&mut [0u8; 16], 0).is_err(),
        "read without the key"
    );
    let e = Replica::open(&path, Some(&key)).expect_err("one opener at a time");
    assert!(e.to_string().contains("busy"), "{e}");
    drop(locked);
    let r = Replica::open(&path, Some(&key)).expect("right key");
    let mut buf = vec![0u8; secret.len()];
    r.read(&mut buf, 8192).expect("read");
    assert_eq!(buf, secret);
}
