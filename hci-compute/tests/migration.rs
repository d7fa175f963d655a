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
