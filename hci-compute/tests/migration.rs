//! Snapshot/restore and live migration of the KVM backend with the `dirty`
//! test guest: its counter must continue with no gap and no repeat.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::{config, create, guest, require_kvm};
use hci_compute::KvmHypervisor;
use hci_compute::snapshot::{self, Hello, tag};
use hci_compute::test_guests::Guest;
use hci_core::compute::{
    ExitReason, Migratable, MigrationOptions, MigrationProgress, Snapshottable, VmHandle, VmState,
};
use tokio::sync::watch;

const EVERY: u64 = 100_000;

fn dirty_config(name: &str) -> hci_core::compute::VmConfig {
    let mut c = config(
        name,
        guest(Guest::Dirty),
        1,
        &format!("mib=8 every={EVERY}"),
    );
    c.memory = 64 << 20;
    c
}

fn history(vm: &hci_compute::KvmVm) -> String {
    String::from_utf8_lossy(&vm.console_hub().history()).into_owned()
}

/// Checks that `text` (the consoles of every incarnation, joined) counts
/// every multiple of EVERY in order, and returns the last count.
fn assert_counts_continue(text: &str) -> u64 {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    let counts: Vec<u64> = complete
        .lines()
        .filter_map(|l| l.strip_prefix("count ")?.parse().ok())
        .collect();
    assert!(counts.len() >= 2, "too few counts: {text:?}");
    for (i, n) in counts.iter().enumerate() {
        assert_eq!(*n, (i as u64 + 1) * EVERY, "gap or repeat in {counts:?}");
    }
    *counts.last().unwrap_or(&0)
}

fn wait_for(vm: &hci_compute::KvmVm, needle: &str) {
    assert!(
        vm.console_hub()
            .wait_for(needle.as_bytes(), Duration::from_secs(30)),
        "console never showed {needle:?}; got {:?}",
        history(vm)
    );
}

/// The count the guest will print `ahead` lines after what `text` shows.
fn next_count(text: &str, ahead: u64) -> u64 {
    let last = text
        .lines()
        .filter_map(|l| l.strip_prefix("count ")?.parse::<u64>().ok())
        .filter(|n| n % EVERY == 0)
        .max()
        .unwrap_or(0);
    last + ahead * EVERY
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restores_and_the_counter_continues() {
    let src = create(dirty_config("snap-src")).await;
    src.start().await.unwrap();
    wait_for(&src, &format!("count {}\n", 3 * EVERY));
    src.pause().await.unwrap();
    let file = common::run_dir("snap-file").join("vm.snap");
    src.save(&file).await.unwrap();
    let before = history(&src);
    src.kill().await.unwrap();
    // Sparse: only touched pages are stored (guest code + the 8 MiB area).
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size < 16 << 20, "snapshot of a 64 MiB guest is {size} bytes");

    let hv = KvmHypervisor::new();
    let restored = hv.restore_vm(dirty_config("snap-dst"), &file).await.unwrap();
    assert_eq!(restored.state().await.unwrap(), VmState::Paused);
    restored.resume().await.unwrap();
    let target = next_count(&before, 3);
    wait_for(&restored, &format!("count {target}\n"));
    assert_counts_continue(&(before + &history(&restored)));
    restored.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_or_foreign_snapshots_are_refused() {
    let src = create(dirty_config("snap-bad-src")).await;
    src.start().await.unwrap();
    wait_for(&src, &format!("count {EVERY}\n"));
    src.pause().await.unwrap();
    let dir = common::run_dir("snap-bad");
    let file = dir.join("vm.snap");
    src.save(&file).await.unwrap();
    src.kill().await.unwrap();
    let hv = KvmHypervisor::new();

    // One flipped byte in the middle (guest pages).
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let flipped = dir.join("flipped.snap");
    std::fs::write(&flipped, &bytes).unwrap();
    let e = hv
        .restore_vm(dirty_config("snap-bad-1"), &flipped)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("checksum") || e.contains("damaged"), "{e}");

    // Truncated.
    let cut = dir.join("cut.snap");
    std::fs::write(&cut, &std::fs::read(&file).unwrap()[..mid]).unwrap();
    let e = hv
        .restore_vm(dirty_config("snap-bad-2"), &cut)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated") || e.contains("ends"), "{e}");

    // Another format version.
    let mut v2 = Vec::new();
    let hello = Hello {
        version: snapshot::FORMAT_VERSION + 1,
        cpus: 1,
        memory: 64 << 20,
        token: vec![],
    };
    snapshot::write_frame(&mut v2, tag::HELLO, &[&hello.encode()]).unwrap();
    let other = dir.join("v2.snap");
    std::fs::write(&other, &v2).unwrap();
    let e = hv
        .restore_vm(dirty_config("snap-bad-3"), &other)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("version"), "{e}");

    // A different VM shape.
    let mut c = dirty_config("snap-bad-4");
    c.memory = 128 << 20;
    let e = hv.restore_vm(c, &file).await.unwrap_err().to_string();
    assert!(e.contains("memory"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_on_loopback_continues_the_counter() {
    require_kvm();
    let src = create(dirty_config("mig-src")).await;
    src.start().await.unwrap();
    wait_for(&src, &format!("count {}\n", 2 * EVERY));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let hv = KvmHypervisor::new();
    let receiving = tokio::spawn(async move {
        hv.receive_vm(dirty_config("mig-dst"), listener, "s3cret")
            .await
    });
    let (tx, mut rx) = watch::channel(MigrationProgress::default());
    let seen = tokio::spawn(async move {
        let mut max_iter = 0;
        while rx.changed().await.is_ok() {
            max_iter = max_iter.max(rx.borrow().iteration);
        }
        max_iter
    });
    let options = MigrationOptions {
        token: "s3cret".into(),
        ..Default::default()
    };
    let done = src.migrate(&addr, options, tx).await.unwrap();
    let dst = receiving.await.unwrap().unwrap();
    assert!(done.iteration >= 2, "{done:?}");
    assert!(done.downtime.is_some(), "{done:?}");
    assert!(seen.await.unwrap() >= 1);
    assert_eq!(src.wait().await.unwrap(), ExitReason::Killed);
    let before = history(&src);
    wait_for(&dst, &format!("count {}\n", next_count(&before, 3)));
    assert_counts_continue(&(before + &history(&dst)));
    eprintln!("migration: {done:?}");
    dst.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_refused_and_the_source_keeps_running() {
    let src = create(dirty_config("mig-token-src")).await;
    src.start().await.unwrap();
    wait_for(&src, &format!("count {EVERY}\n"));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let hv = KvmHypervisor::new();
    let receiving = tokio::spawn(async move {
        hv.receive_vm(dirty_config("mig-token-dst"), listener, "right")
            .await
    });
    let (tx, _rx) = watch::channel(MigrationProgress::default());
    let options = MigrationOptions {
        token: "wrong".into(),
        ..Default::default()
    };
    let e = src.migrate(&addr, options, tx).await.unwrap_err().to_string();
    assert!(e.contains("token"), "{e}");
    assert!(receiving.await.unwrap().is_err());
    assert_eq!(src.state().await.unwrap(), VmState::Running);
    let next = next_count(&history(&src), 2);
    wait_for(&src, &format!("count {next}\n"));
    src.kill().await.unwrap();
}

/// A target that accepts the header, then reads `take` bytes and either
/// stalls (keeps the connection open, reading nothing more) or drops it.
fn fake_target(take: usize, stall: bool) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        assert_eq!(snapshot::read_frame(&mut s, &mut buf).unwrap(), tag::HELLO);
        let mut ok = Vec::new();
        snapshot::write_frame(&mut ok, tag::REPLY, &[&[0u8], b"ready"]).unwrap();
        s.write_all(&ok).unwrap();
        let mut left = take;
        let mut chunk = vec![0u8; 64 << 10];
        while left > 0 {
            match s.read(&mut chunk[..left.min(64 << 10)]) {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n,
            }
        }
        if stall {
            std::thread::sleep(Duration::from_secs(3));
        }
        drop(s);
    });
    (addr, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_migration_leaves_the_source_running() {
    let src = create(dirty_config("mig-cancel-src")).await;
    src.start().await.unwrap();
    wait_for(&src, &format!("count {EVERY}\n"));
    // The target takes 1 MiB and then stops reading: the source is stuck
    // in pass 1 until the cancel.
    let (addr, target) = fake_target(1 << 20, true);
    let (tx, _rx) = watch::channel(MigrationProgress::default());
    let options = MigrationOptions {
        token: "t".into(),
        ..Default::default()
    };
    let migrating = src.migrate(&addr, options, tx);
    // Dropping the future is the cancel.
    let r = tokio::time::timeout(Duration::from_millis(500), migrating).await;
    assert!(r.is_err(), "the migration should still be stuck: {r:?}");
    // The blocked writer notices the cancel within moments; the guest never stopped.
    assert_eq!(src.state().await.unwrap(), VmState::Running);
    let next = next_count(&history(&src), 3);
    wait_for(&src, &format!("count {next}\n"));
    assert_counts_continue(&history(&src));
    // And a later migration can still be attempted (dirty logging was reset).
    src.kill().await.unwrap();
    target.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_dying_mid_migration_leaves_the_source_running() {
    let src = create(dirty_config("mig-die-src")).await;
    src.start().await.unwrap();
    wait_for(&src, &format!("count {EVERY}\n"));
    let (addr, target) = fake_target(2 << 20, false);
    let (tx, _rx) = watch::channel(MigrationProgress::default());
    let options = MigrationOptions {
        token: "t".into(),
        ..Default::default()
    };
    let e = src.migrate(&addr, options, tx).await.unwrap_err();
    target.join().unwrap();
    assert!(e.to_string().contains("failed"), "{e}");
    assert_eq!(src.state().await.unwrap(), VmState::Running);
    let next = next_count(&history(&src), 3);
    wait_for(&src, &format!("count {next}\n"));
    assert_counts_continue(&history(&src));
    src.kill().await.unwrap();
}
