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
    assert!(
        size < 16 << 20,
        "snapshot of a 64 MiB guest is {size} bytes"
    );

    let hv = KvmHypervisor::new();
    let restored = hv
        .restore_vm(dirty_config("snap-dst"), &file)
        .await
        .unwrap();
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
    let e = src
        .migrate(&addr, options, tx)
        .await
        .unwrap_err()
        .to_string();
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
    let listener = TcpListener::bind("127.0.0.1:0").expect("fake target");
    let addr = listener.local_addr().expect("fake target").to_string();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("fake target");
        let mut buf = Vec::new();
        assert_eq!(
            snapshot::read_frame(&mut s, &mut buf).expect("fake target"),
            tag::HELLO
        );
        let mut ok = Vec::new();
        snapshot::write_frame(&mut ok, tag::REPLY, &[&[0u8], b"ready"]).expect("fake target");
        s.write_all(&ok).expect("fake target");
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

/// A counting source VM and a target that takes 1 MiB and then stops
/// reading: a migration between them is stuck in pass 1 until cancelled.
async fn stuck_migration(name: &str) -> (hci_compute::KvmVm, String, std::thread::JoinHandle<()>) {
    let src = create(dirty_config(name)).await;
    src.start().await.expect("start");
    wait_for(&src, &format!("count {EVERY}\n"));
    let (addr, target) = fake_target(1 << 20, true);
    (src, addr, target)
}

/// The source counts on after a cancel, without a gap or a repeat.
async fn still_counting(src: hci_compute::KvmVm, target: std::thread::JoinHandle<()>) {
    assert_eq!(src.state().await.expect("state"), VmState::Running);
    let next = next_count(&history(&src), 3);
    wait_for(&src, &format!("count {next}\n"));
    assert_counts_continue(&history(&src));
    src.kill().await.expect("kill");
    target.join().expect("the fake target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_migration_leaves_the_source_running() {
    let (src, addr, target) = stuck_migration("mig-cancel-src").await;
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
    still_counting(src, target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_token_stops_the_migration_and_says_so() {
    let (src, addr, target) = stuck_migration("mig-token-src").await;
    let (tx, _rx) = watch::channel(MigrationProgress::default());
    let cancel = hci_core::CancelToken::new();
    let options = MigrationOptions {
        token: "t".into(),
        cancel: cancel.clone(),
        ..Default::default()
    };
    let canceller = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cancel.cancel();
    };
    let (r, ()) = tokio::join!(src.migrate(&addr, options, tx), canceller);
    assert!(
        matches!(r, Err(hci_core::Error::Cancelled)),
        "a cancel before the switch-over is reported: {r:?}"
    );
    still_counting(src, target).await;
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

// ---- Between hci-vmm processes ----

const VMM: &str = env!("CARGO_BIN_EXE_hci-vmm");

/// A config with a run directory of its own for a VMM process.
fn proc_config(name: &str, memory: u64, mib: u64) -> hci_core::compute::VmConfig {
    let mut c = config(
        &format!("{name}-{}", std::process::id()),
        guest(Guest::Dirty),
        1,
        &format!("mib={mib} every={EVERY}"),
    );
    c.memory = memory;
    c
}

fn console_log(c: &hci_core::compute::VmConfig) -> String {
    std::fs::read_to_string(c.run_dir.join("console.log")).unwrap_or_default()
}

async fn wait_log(c: &hci_core::compute::VmConfig, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !console_log(c).contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never showed {needle:?}: {:?}",
            c.name,
            console_log(c)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills a VM when dropped (a failing test leaves no VMM spinning).
struct KillOnDrop(Option<Box<dyn VmHandle>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(vm) = self.0.take() {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    let _ = rt.block_on(vm.kill());
                }
            })
            .join();
        }
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = dyn VmHandle;
    fn deref(&self) -> &Self::Target {
        self.0.as_deref().expect("VM")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_snapshot_restores_in_a_new_vmm_process() {
    use hci_core::compute::{Hypervisor, RestoreVm};
    require_kvm();
    let hv = hci_compute::ProcessHypervisor::with_vmm(VMM);
    let src_cfg = proc_config("psnap-src", 64 << 20, 8);
    let src = KillOnDrop(Some(hv.create(src_cfg.clone()).await.unwrap()));
    src.start().await.unwrap();
    wait_log(&src_cfg, &format!("count {}\n", 3 * EVERY)).await;
    src.pause().await.unwrap();
    let file = src_cfg.run_dir.join("vm.snap");
    src.as_snapshottable().unwrap().save(&file).await.unwrap();
    src.kill().await.unwrap();
    let before = console_log(&src_cfg);

    let dst_cfg = proc_config("psnap-dst", 64 << 20, 8);
    let dst = KillOnDrop(Some(hv.restore(dst_cfg.clone(), &file).await.unwrap()));
    assert_eq!(dst.state().await.unwrap(), VmState::Paused);
    dst.resume().await.unwrap();
    wait_log(&dst_cfg, &format!("count {}\n", next_count(&before, 3))).await;
    assert_counts_continue(&(before + &console_log(&dst_cfg)));
}

/// Migrates a dirty guest between two `ProcessHypervisor`s (`src_hv` runs
/// the source, `dst_hv` the target listening on `listen`, reached as
/// `connect`); checks the counter and returns the progress.
async fn migrate_between_processes(
    src_hv: &hci_compute::ProcessHypervisor,
    dst_hv: &hci_compute::ProcessHypervisor,
    listen: &str,
    connect: &str,
    tag: &str,
) -> MigrationProgress {
    use hci_core::compute::{Hypervisor, ReceiveMigration};
    let src_cfg = proc_config(&format!("{tag}-src"), 64 << 20, 8);
    let dst_cfg = proc_config(&format!("{tag}-dst"), 64 << 20, 8);
    let src = KillOnDrop(Some(
        src_hv
            .create(src_cfg.clone())
            .await
            .expect("migration step"),
    ));
    src.start().await.expect("migration step");
    wait_log(&src_cfg, &format!("count {}\n", 2 * EVERY)).await;
    let receiving = dst_hv.receive(dst_cfg.clone(), listen, "tok");
    let sending = async {
        let start = std::time::Instant::now();
        loop {
            let (tx, _rx) = watch::channel(MigrationProgress::default());
            let options = MigrationOptions {
                token: "tok".into(),
                ..Default::default()
            };
            match src
                .as_migratable()
                .expect("migration step")
                .migrate(connect, options, tx)
                .await
            {
                Ok(p) => return p,
                Err(e)
                    if e.to_string().contains("connect to")
                        && start.elapsed() < Duration::from_secs(20) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("migrate: {e}"),
            }
        }
    };
    let (dst, progress) = tokio::join!(receiving, sending);
    let dst = KillOnDrop(Some(dst.expect("migration step")));
    assert_eq!(
        src.wait().await.expect("migration step"),
        ExitReason::Killed
    );
    let before = console_log(&src_cfg);
    wait_log(&dst_cfg, &format!("count {}\n", next_count(&before, 3))).await;
    assert_counts_continue(&(before + &console_log(&dst_cfg)));
    assert_eq!(dst.state().await.expect("migration step"), VmState::Running);
    eprintln!("{tag}: {progress:?}");
    progress
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("migration step")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_migration_on_loopback() {
    require_kvm();
    let hv = hci_compute::ProcessHypervisor::with_vmm(VMM);
    let addr = format!("127.0.0.1:{}", free_port());
    let p = migrate_between_processes(&hv, &hv, &addr, &addr, "ploop").await;
    assert!(p.downtime.is_some());
}

/// Two network namespaces joined by a veth pair; removed on drop.
struct Netns {
    a: String,
    b: String,
    b_ip: String,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("hcimig-a{id}"), format!("hcimig-b{id}"));
        let (va, vb) = (format!("hma{id}"), format!("hmb{id}"));
        let n = Netns {
            a: a.clone(),
            b: b.clone(),
            b_ip: format!("10.231.{}.2", id % 250),
        };
        let a_ip = format!("10.231.{}.1/24", id % 250);
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        ip(&[
            "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ]);
        ip(&["-n", &a, "addr", "add", &a_ip, "dev", &va]);
        ip(&[
            "-n",
            &b,
            "addr",
            "add",
            &format!("{}/24", n.b_ip),
            "dev",
            &vb,
        ]);
        for (ns, dev) in [(&a, &va), (&b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        n
    }

    /// A wrapper that runs hci-vmm inside namespace `ns`.
    fn vmm_in(&self, ns: &str) -> std::path::PathBuf {
        let path =
            std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("hci-vmm-in-{ns}"));
        std::fs::write(
            &path,
            format!("#!/bin/sh\nexec ip netns exec {ns} {VMM} \"$@\"\n"),
        )
        .expect("wrapper script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("wrapper script");
        path
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_migration_between_network_namespaces() {
    require_kvm();
    let ns = Netns::new();
    let src_hv = hci_compute::ProcessHypervisor::with_vmm(ns.vmm_in(&ns.a));
    let dst_hv = hci_compute::ProcessHypervisor::with_vmm(ns.vmm_in(&ns.b));
    let addr = format!("{}:{}", ns.b_ip, 7700 + std::process::id() % 1000);
    let p = migrate_between_processes(&src_hv, &dst_hv, &addr, &addr, "pnetns").await;
    assert!(p.downtime.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_target_process_mid_migration_leaves_the_source_running() {
    use hci_core::compute::Hypervisor;
    require_kvm();
    let hv = hci_compute::ProcessHypervisor::with_vmm(VMM);
    // 256 MiB dirtied continuously: the migration takes a while.
    let src_cfg = proc_config("pkill-src", 320 << 20, 256);
    let src = KillOnDrop(Some(hv.create(src_cfg.clone()).await.unwrap()));
    src.start().await.unwrap();
    wait_log(&src_cfg, &format!("count {EVERY}\n")).await;
    let port = free_port();
    let dst_cfg = proc_config("pkill-dst", 320 << 20, 256);
    let target = std::process::Command::new(VMM)
        .args(hci_compute::ProcessHypervisor::args(&dst_cfg).unwrap())
        .args(["--incoming", &format!("127.0.0.1:{port}")])
        .env("HCI_MIGRATION_TOKEN", "tok")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let target_pid = target.id();
    let _reap = Reap(target);
    let (tx, mut rx) = watch::channel(MigrationProgress::default());
    let killer = tokio::spawn(async move {
        // Kill the target once 32 MiB went over.
        let _ = rx.wait_for(|p| p.bytes_sent > 32 << 20).await;
        let _ = std::process::Command::new("kill")
            .args(["-9", &target_pid.to_string()])
            .status();
    });
    let addr = format!("127.0.0.1:{port}");
    let result = loop {
        let options = MigrationOptions {
            token: "tok".into(),
            max_downtime: Duration::from_micros(1),
            ..Default::default()
        };
        match src
            .as_migratable()
            .unwrap()
            .migrate(&addr, options, tx.clone())
            .await
        {
            Err(e) if e.to_string().contains("connect to") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    killer.await.unwrap();
    assert!(result.is_err(), "{result:?}");
    assert_eq!(src.state().await.unwrap(), VmState::Running);
    let next = next_count(&console_log(&src_cfg), 3);
    wait_log(&src_cfg, &format!("count {next}\n")).await;
    assert_counts_continue(&console_log(&src_cfg));
}

// ---- With disks: a local volume and a 2-replica volume handed over ----

const DISK_TOKEN: &str = "disk-token";
const DISK_SIZE: u64 = 64 << 20;

/// A local volume and a replicated volume on two in-process replica servers.
struct Disks {
    dir: tempfile::TempDir,
    local: std::path::PathBuf,
    token_file: std::path::PathBuf,
    replicas: Vec<String>,
    nodes: Vec<std::sync::Arc<dyn hci_storage::replica::ReplicaNode>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Disks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn disks() -> Disks {
    use hci_core::volume::CreateVolume;
    use hci_storage::replica::client::{RemoteNode, ServerAddr};
    use hci_storage::replica::server::ReplicaServer;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("vol");
    drop(hci_storage::local::Replica::create(&local, DISK_SIZE, None).expect("local volume"));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, DISK_TOKEN).expect("token");
    let (mut replicas, mut nodes, mut tasks) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..2 {
        let srv = ReplicaServer::new(dir.path().join(format!("r{i}")), DISK_TOKEN).expect("server");
        let (addr, task) = srv.spawn("127.0.0.1:0").await.expect("spawn");
        let node: std::sync::Arc<dyn hci_storage::replica::ReplicaNode> = std::sync::Arc::new(
            RemoteNode::new(ServerAddr::new(addr.to_string(), DISK_TOKEN)),
        );
        node.backend()
            .create("rv", CreateVolume::new(DISK_SIZE))
            .await
            .expect("create the replica");
        replicas.push(addr.to_string());
        nodes.push(node);
        tasks.push(task);
    }
    Disks {
        dir,
        local,
        token_file,
        replicas,
        nodes,
        tasks,
    }
}

impl Disks {
    /// `c` with both disks attached and the guest writing to them.
    fn attach(&self, mut c: hci_core::compute::VmConfig) -> hci_core::compute::VmConfig {
        use hci_core::compute::{BootSource, DiskBackend, DiskBus, DiskConfig};
        if let BootSource::Kernel { cmdline, .. } = &mut c.boot {
            cmdline.push_str(" disks=2 diskevery=100000");
        }
        let disk = |name: &str, backend| DiskConfig {
            name: name.into(),
            backend,
            bus: DiskBus::Virtio,
            read_only: false,
            boot_order: None,
        };
        c.disks = vec![
            disk(
                "local",
                DiskBackend::Volume {
                    path: self.local.clone(),
                    key_file: None,
                },
            ),
            disk(
                "repl",
                DiskBackend::Replicated {
                    volume: "rv".into(),
                    replicas: self.replicas.clone(),
                    token_file: self.token_file.clone(),
                    key_file: None,
                    control: None,
                },
            ),
        ];
        c
    }

    async fn generation(&self) -> u64 {
        self.nodes[0]
            .fence_state("rv")
            .await
            .expect("fence state")
            .generation
    }

    /// Checks that blocks 1..=upto of both volumes hold their number.
    async fn check_blocks(&self, upto: u64) {
        use hci_core::block::BlockDevice;
        use hci_core::volume::OpenVolume;
        // The last owner's process lets go of the lock as it exits.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let local = loop {
            match hci_storage::local::Replica::open(&self.local, None) {
                Err(hci_core::Error::Busy { .. }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => break r.expect("open the volume"),
            }
        };
        let engine = hci_storage::engine::ReplicatedVolume::open(
            "rv",
            &self.nodes,
            OpenVolume::default(),
            hci_storage::engine::EngineOptions::default(),
        )
        .await
        .expect("open the replicated volume");
        let mut buf = vec![0u8; 4096];
        for seq in 1..=upto {
            for (which, ok) in [
                ("local", local.read(&mut buf, seq * 4096).is_ok()),
                ("repl", engine.read_at(&mut buf, seq * 4096).await.is_ok()),
            ] {
                assert!(ok, "{which}: block {seq} unreadable");
                let bad = buf
                    .chunks(8)
                    .position(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()) != seq);
                assert_eq!(bad, None, "{which}: block {seq} does not hold its number");
            }
        }
        engine.close().await.expect("close");
        let _ = &self.dir;
    }
}

/// The highest `disk N` line in `text` (blocks 1..=N were written).
fn last_disk(text: &str) -> u64 {
    assert!(!text.contains("disk FAIL"), "a disk request failed: {text}");
    text.lines()
        .filter_map(|l| l.strip_prefix("disk ")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_migration_hands_over_a_local_and_a_replicated_disk() {
    use hci_core::compute::{Hypervisor, ReceiveMigration};
    require_kvm();
    let d = disks().await;
    let hv = hci_compute::ProcessHypervisor::with_vmm(VMM);
    let src_cfg = d.attach(proc_config("pdisk-src", 64 << 20, 8));
    let dst_cfg = d.attach(proc_config("pdisk-dst", 64 << 20, 8));
    let src = KillOnDrop(Some(hv.create(src_cfg.clone()).await.expect("create")));
    src.start().await.expect("start");
    wait_log(&src_cfg, "disk 128\n").await;
    let old = d.generation().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let receiving = hv.receive(dst_cfg.clone(), &addr, "tok");
    let sending = async {
        let start = std::time::Instant::now();
        loop {
            let (tx, _rx) = watch::channel(MigrationProgress::default());
            let options = MigrationOptions {
                token: "tok".into(),
                ..Default::default()
            };
            match src
                .as_migratable()
                .expect("migratable")
                .migrate(&addr, options, tx)
                .await
            {
                Ok(p) => return p,
                Err(e)
                    if e.to_string().contains("connect to")
                        && start.elapsed() < Duration::from_secs(20) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("migrate: {e}"),
            }
        }
    };
    let (dst, progress) = tokio::join!(receiving, sending);
    let dst = KillOnDrop(Some(dst.expect("receive")));
    eprintln!("migration with 2 disks: {progress:?}");
    assert!(progress.downtime.is_some());
    // The source stopped after the switch-over; its engine's generation is
    // refused from now on, and the local volume is locked by the target.
    assert_eq!(src.wait().await.expect("wait"), ExitReason::Killed);
    assert_eq!(
        d.generation().await,
        old + 1,
        "the target fenced the source"
    );
    for n in &d.nodes {
        let r = n
            .open_fenced("rv", old, hci_core::volume::OpenVolume::default())
            .await;
        assert!(
            matches!(r, Err(hci_core::Error::Fenced { .. })),
            "the old engine's generation must be refused: {r:?}"
        );
        let r = n.fence("rv", old).await;
        assert!(matches!(r, Err(hci_core::Error::Fenced { .. })), "{r:?}");
    }
    let r = hci_storage::local::Replica::open(&d.local, None);
    assert!(
        matches!(r, Err(hci_core::Error::Busy { .. })),
        "the target owns the local volume: {r:?}"
    );
    drop(r);
    // The guest goes on counting and writing both disks on the target.
    let before = console_log(&src_cfg);
    let on_source = last_disk(&before);
    wait_log(&dst_cfg, &format!("disk {}\n", (on_source / 64 + 2) * 64)).await;
    assert_counts_continue(&(before + &console_log(&dst_cfg)));
    dst.kill().await.expect("kill");
    let _ = dst.wait().await;
    let upto = last_disk(&console_log(&dst_cfg));
    assert!(upto > on_source);
    d.check_blocks(upto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_migration_with_disks_keeps_them_on_the_source() {
    require_kvm();
    let d = disks().await;
    let src = create(d.attach(dirty_config("mig-dcancel-src"))).await;
    src.start().await.expect("start");
    wait_for(&src, "disk 64\n");
    let (addr, target) = fake_target(1 << 20, true);
    let (tx, _rx) = watch::channel(MigrationProgress::default());
    let options = MigrationOptions {
        token: "t".into(),
        ..Default::default()
    };
    let r = tokio::time::timeout(Duration::from_millis(500), src.migrate(&addr, options, tx)).await;
    assert!(r.is_err(), "the migration should still be stuck: {r:?}");
    assert_eq!(src.state().await.expect("state"), VmState::Running);
    let next = (last_disk(&history(&src)) / 64 + 2) * 64;
    wait_for(&src, &format!("disk {next}\n"));
    assert_eq!(d.generation().await, 1, "nobody took the replicated volume");
    src.kill().await.expect("kill");
    let upto = last_disk(&history(&src));
    for disk in src.handover_disks() {
        disk.close().await.expect("close");
    }
    d.check_blocks(upto).await;
    target.join().expect("fake target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_target_with_disks_mid_migration_leaves_the_source_writing() {
    require_kvm();
    let d = disks().await;
    // 256 MiB dirtied continuously: the migration takes a while.
    let mut src_cfg = d.attach(dirty_config("mig-dkill-src"));
    src_cfg.memory = 320 << 20;
    if let hci_core::compute::BootSource::Kernel { cmdline, .. } = &mut src_cfg.boot {
        *cmdline = cmdline.replace("mib=8", "mib=256");
    }
    let src = create(src_cfg.clone()).await;
    src.start().await.expect("start");
    wait_for(&src, "disk 64\n");
    let port = free_port();
    let dst_cfg = d.attach(proc_config("pdkill-dst", 320 << 20, 256));
    let target = std::process::Command::new(VMM)
        .args(hci_compute::ProcessHypervisor::args(&dst_cfg).expect("args"))
        .args(["--incoming", &format!("127.0.0.1:{port}")])
        .env("HCI_MIGRATION_TOKEN", "tok")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the target");
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let target_pid = target.id();
    let _reap = Reap(target);
    let (tx, mut rx) = watch::channel(MigrationProgress::default());
    let killer = tokio::spawn(async move {
        let _ = rx.wait_for(|p| p.bytes_sent > 32 << 20).await;
        let _ = std::process::Command::new("kill")
            .args(["-9", &target_pid.to_string()])
            .status();
    });
    let addr = format!("127.0.0.1:{port}");
    let result = loop {
        let options = MigrationOptions {
            token: "tok".into(),
            max_downtime: Duration::from_micros(1),
            ..Default::default()
        };
        match src.migrate(&addr, options, tx.clone()).await {
            Err(e) if e.to_string().contains("connect to") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    killer.await.expect("killer");
    assert!(result.is_err(), "{result:?}");
    assert_eq!(src.state().await.expect("state"), VmState::Running);
    let next = (last_disk(&history(&src)) / 64 + 2) * 64;
    wait_for(&src, &format!("disk {next}\n"));
    assert_eq!(d.generation().await, 1, "the target never took the volume");
    src.kill().await.expect("kill");
    let upto = last_disk(&history(&src));
    for disk in src.handover_disks() {
        disk.close().await.expect("close");
    }
    d.check_blocks(upto).await;
}
