//! Crash safety of the redb store: a writer process is killed (SIGKILL) in
//! the middle of a stream of writes; after reopening, every write it saw
//! acknowledged is there.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hci_core::store::{PutOptions, StateStore};
use hci_daemon::store::RedbStateStore;

const DIR_ENV: &str = "HCI_CRASH_TEST_DIR";

/// The writer half, run in a child process by `acknowledged_puts_survive_sigkill`.
#[tokio::test]
#[ignore = "helper process of acknowledged_puts_survive_sigkill"]
async fn crash_child_writer() {
    let dir = std::env::var(DIR_ENV).expect("HCI_CRASH_TEST_DIR is set by the parent test");
    let store = RedbStateStore::open(std::path::Path::new(&dir).join("state.redb"))
        .await
        .expect("open");
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let rev = store
            .put(
                &format!("/crash/{i:08}"),
                i.to_string().into_bytes(),
                PutOptions::default(),
            )
            .await
            .expect("put");
        writeln!(out, "acked {i} {rev}").expect("report ack");
        out.flush().expect("flush");
    }
}

#[tokio::test]
async fn acknowledged_puts_survive_sigkill() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child_writer", "--ignored", "--nocapture"])
        .env(DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn writer");
    let stdout = child.stdout.take().expect("child stdout");
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let started = Instant::now();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read child output");
        let Some(rest) = line.strip_prefix("acked ") else {
            continue;
        };
        let mut parts = rest.split(' ').map(|p| p.parse::<u64>().expect("number"));
        let (Some(i), Some(rev)) = (parts.next(), parts.next()) else {
            panic!("bad ack line {line:?}");
        };
        acked.push((i, rev));
        if acked.len() >= 200 || started.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    // Kill while the writer is in the middle of its next commits.
    child.kill().expect("kill writer");
    child.wait().expect("reap writer");
    assert!(!acked.is_empty(), "the writer acknowledged nothing");

    let store = RedbStateStore::open(dir.path().join("state.redb"))
        .await
        .expect("reopen after crash");
    for (i, rev) in &acked {
        let kv = store
            .get(&format!("/crash/{i:08}"))
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("acknowledged put {i} lost"));
        assert_eq!(kv.value, i.to_string().into_bytes());
        assert_eq!(kv.mod_revision, *rev);
    }
    let last = acked.last().map_or(0, |a| a.1);
    assert!(store.current_revision().await.expect("revision") >= last);
    // The store is fully usable after the crash.
    let rev = store
        .put("/crash/after", b"ok".to_vec(), PutOptions::default())
        .await
        .expect("put after crash");
    assert!(rev > last);
}
