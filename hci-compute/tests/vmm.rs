//! The KVM VMM end to end with hci's test guests (real /dev/kvm).
//!
//! Under `kvm_pvm` guest CPL0 code is emulated, so the guests leave CPL0
//! after a short prologue and drive devices from CPL3 (see `guests/`).

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use hci_compute::test_guests::Guest;
use hci_core::block::BlockDevice;
use hci_core::compute::{ExitReason, Hypervisor, NicConfig, NicModel, VmHandle, VmState};
use hci_core::memory::MemBlockDevice;
use tokio::io::AsyncReadExt;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_guest_prints_and_resets() {
    let vm = create(config("hello", guest(Guest::Hello), 1, "")).await;
    assert_eq!(vm.state().await.unwrap(), VmState::Created);
    let mut console = vm.console().await.unwrap();
    vm.start().await.unwrap();
    let reason = timeout(WAIT, vm.wait())
        .await
        .expect("guest did not reset in time")
        .unwrap();
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(
        vm.state().await.unwrap(),
        VmState::Stopped(ExitReason::Reset)
    );
    assert_eq!(vm.console_hub().history(), b"hello from guest\n");
    // An attached console sees the same bytes, then end-of-stream since the VM stopped.
    let mut out = Vec::new();
    timeout(WAIT, console.output.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, b"hello from guest\n");
    let stats = vm.stats().await.unwrap();
    assert_eq!(stats.memory_bytes, 64 << 20);
    assert!(stats.rss_bytes > 0);
    // The guest touched its image at 1 MiB and its page tables: some guest RAM is resident.
    assert!(
        vm.guest_rss_bytes() >= 4096,
        "guest RSS {}",
        vm.guest_rss_bytes()
    );
    // The console log in the run directory has the same bytes.
    let log = std::fs::read(run_dir_of("hello").join("console.log")).unwrap();
    assert_eq!(log, b"hello from guest\n");
}

fn run_dir_of(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("run")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_guest_pauses_resumes_and_is_killed() {
    let vm = create(config("spin", guest(Guest::Spin), 1, "every=1000000")).await;
    vm.start().await.unwrap();
    assert!(vm.start().await.is_err(), "a running VM cannot start again");
    assert!(vm.resume().await.is_err(), "a running VM cannot resume");
    wait_console(&vm, "spinning\n..");
    assert_eq!(vm.state().await.unwrap(), VmState::Running);

    vm.pause().await.unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::Paused);
    assert!(vm.pause().await.is_err(), "a paused VM cannot pause again");
    let before = vm.console_hub().total_bytes();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        vm.console_hub().total_bytes(),
        before,
        "a paused guest made progress"
    );

    vm.resume().await.unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::Running);
    let hub = vm.console_hub().clone();
    let grew = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if hub.total_bytes() > before + 2 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    })
    .await
    .unwrap();
    assert!(grew, "the guest did not continue after resume");
    let stats = vm.stats().await.unwrap();
    assert!(stats.cpu_time > Duration::ZERO);

    vm.kill().await.unwrap();
    assert_eq!(
        timeout(WAIT, vm.wait()).await.unwrap().unwrap(),
        ExitReason::Killed
    );
    assert_eq!(
        vm.state().await.unwrap(),
        VmState::Stopped(ExitReason::Killed)
    );
    assert!(vm.resume().await.is_err());
    vm.kill().await.unwrap(); // idempotent
    assert_eq!(vm.vm().running_vcpu_threads(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_a_guest_that_does_not_stop() {
    let vm = create(config("stubborn", guest(Guest::Spin), 1, "")).await;
    vm.start().await.unwrap();
    let reason = vm.shutdown(Duration::from_millis(200)).await.unwrap();
    assert_eq!(reason, ExitReason::Killed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_presses_ctrl_alt_del_and_a_listening_guest_stops() {
    let vm = create(config("kbd", guest(Guest::Kbd), 1, "")).await;
    assert!(
        vm.vm().send_ctrl_alt_del().is_err(),
        "a VM that never started cannot be asked"
    );
    vm.start().await.unwrap();
    wait_console(&vm, "kbd ready\n");
    let reason = timeout(WAIT, vm.shutdown(Duration::from_secs(20)))
        .await
        .expect("shutdown returns")
        .unwrap();
    assert_eq!(reason, ExitReason::Reset, "the guest reset by itself");
    let out = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
    // The controller's self-test answered 0x55; the command byte has the
    // keyboard interrupt and system flag set.
    assert_eq!(
        out,
        "kbd self-test 0x0000000000000055 ctr 0x0000000000000005\nkbd ready\nctrl-alt-del\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blk_guest_round_trips_through_a_mem_block_device() {
    let dev = Arc::new(MemBlockDevice::new(1 << 20));
    let mut cfg = config("blk", guest(Guest::Blk), 1, "sector=24");
    cfg.disks.push(disk("hci-disk0", dev.clone()));
    let vm = create(cfg).await;
    vm.start().await.unwrap();
    let reason = timeout(WAIT, vm.wait())
        .await
        .expect("guest did not finish")
        .unwrap();
    let console = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
    assert_eq!(reason, ExitReason::Reset, "console: {console}");
    assert!(
        console.contains("virtio-blk at 0x00000000d0000000 capacity 2048 sectors\n"),
        "{console}"
    );
    assert!(console.contains("virtio-blk id hci-disk0\n"), "{console}");
    assert!(console.ends_with("virtio-blk OK\n"), "{console}");

    // The host sees the guest's pattern through the block device, and nothing else changed.
    let mut data = vec![0u8; 4096];
    dev.read_at(&mut data, 24 * 512).await.unwrap();
    let want: Vec<u8> = (0..4096).map(|i| (i * 31 + 7) as u8).collect();
    assert_eq!(data, want);
    let mut before = vec![0u8; 24 * 512];
    dev.read_at(&mut before, 0).await.unwrap();
    assert!(before.iter().all(|b| *b == 0));

    let stats = vm.stats().await.unwrap();
    let (name, read, written) = &stats.disks[0];
    assert_eq!((name.as_str(), *read, *written), ("hci-disk0", 4096, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smp_vcpus_start_pause_and_stop_together() {
    let vm = create(config("smp", guest(Guest::Spin), 4, "every=1000000")).await;
    vm.start().await.unwrap();
    wait_console(&vm, "spinning\n.");
    assert_eq!(vm.vm().running_vcpu_threads(), 4);
    vm.pause().await.unwrap();
    vm.resume().await.unwrap();
    vm.kill().await.unwrap();
    assert_eq!(vm.vm().running_vcpu_threads(), 0);

    // A guest reset stops every vCPU, not just the one that asked.
    let vm = create(config("smp-hello", guest(Guest::Hello), 3, "")).await;
    vm.start().await.unwrap();
    assert_eq!(
        timeout(WAIT, vm.wait()).await.unwrap().unwrap(),
        ExitReason::Reset
    );
    assert_eq!(vm.vm().running_vcpu_threads(), 0);
    assert_eq!(vm.console_hub().history(), b"hello from guest\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_give_clear_errors() {
    require_kvm();
    let hv = hci_compute::KvmHypervisor::new();
    let kernel = guest(Guest::Hello);

    let mut c = config("zero-mem", kernel.clone(), 1, "");
    c.memory = 0;
    let e = hv.create(c).await.unwrap_err().to_string();
    assert!(e.contains("memory"), "{e}");

    let c = config("no-kernel", "/nonexistent/vmlinuz".into(), 1, "");
    let e = hv.create(c).await.unwrap_err().to_string();
    assert!(e.contains("/nonexistent/vmlinuz"), "{e}");

    let c = config("no-cpus", kernel.clone(), 0, "");
    assert!(hv.create(c).await.unwrap_err().to_string().contains("cpus"));

    let c = config("too-many-cpus", kernel.clone(), 1000, "");
    assert!(
        hv.create(c)
            .await
            .unwrap_err()
            .to_string()
            .contains("vCPU count")
    );

    let nic = NicConfig {
        name: "eth0".into(),
        tap: "hci-no-such-tap".into(),
        mac: [2, 0, 0, 0, 0, 1],
        model: Default::default(),
        mtu: 1500,
    };
    let mut c = config("nic", kernel.clone(), 1, "");
    c.nics.push(nic.clone());
    let e = hv.create(c).await.unwrap_err().to_string();
    assert!(e.contains("hci-no-such-tap"), "{e}");

    let mut c = config("e1000", kernel.clone(), 1, "");
    c.nics.push(NicConfig {
        model: NicModel::E1000,
        ..nic.clone()
    });
    let e = hv.create(c).await.unwrap_err();
    assert!(matches!(e, hci_core::Error::Unsupported { .. }), "{e}");

    let mut c = config("multicast-mac", kernel.clone(), 1, "");
    c.nics.push(NicConfig {
        mac: [1, 0, 0, 0, 0, 1],
        ..nic.clone()
    });
    let e = hv.create(c).await.unwrap_err().to_string();
    assert!(e.contains("MAC"), "{e}");

    let mut c = config("two-eth0", kernel, 1, "");
    c.nics.push(nic.clone());
    c.nics.push(nic);
    let e = hv.create(c).await.unwrap_err().to_string();
    assert!(e.contains("NIC name"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rng_guest_reads_host_entropy() {
    let vm = create(config("rng", guest(Guest::Rng), 1, "")).await;
    vm.start().await.unwrap();
    let reason = timeout(WAIT, vm.wait()).await.unwrap().unwrap();
    let console = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
    assert_eq!(reason, ExitReason::Reset, "{console}");
    assert_eq!(console, "virtio-rng OK\n");
    let c = vm.vm().entropy_counters().expect("an entropy device");
    assert_eq!(c.bytes.load(Ordering::Relaxed), 64);
    assert_eq!(c.requests.load(Ordering::Relaxed), 2);

    // Without the entropy device the guest finds none.
    require_kvm();
    let vm = hci_compute::KvmHypervisor::new()
        .with_entropy(false)
        .create_vm(config("no-rng", guest(Guest::Rng), 1, ""))
        .await
        .unwrap();
    vm.start().await.unwrap();
    timeout(WAIT, vm.wait()).await.unwrap().unwrap();
    let console = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
    assert!(
        console.starts_with("virtio-rng FAIL: no virtio-rng device"),
        "{console}"
    );
    assert!(vm.vm().entropy_counters().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_driver_cannot_crash_the_vmm() {
    let panicked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = panicked.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("virtio-blk") || n.starts_with("vcpu"))
        {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        previous(info);
    }));
    for seed in [1, 2, 3] {
        let dev = Arc::new(MemBlockDevice::new(1 << 20));
        let mut cfg = config(
            &format!("chaos-{seed}"),
            guest(Guest::Chaos),
            1,
            &format!("seed={seed} iters=20000"),
        );
        cfg.disks.push(disk("victim", dev));
        let vm = create(cfg).await;
        vm.start().await.unwrap();
        let reason = timeout(Duration::from_secs(60), vm.wait())
            .await
            .expect("chaos guest did not finish")
            .unwrap();
        let console = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
        assert_eq!(reason, ExitReason::Reset, "seed {seed}: {console}");
        assert!(
            console.ends_with("chaos survived\n"),
            "seed {seed}: {console}"
        );
        let c = &vm.vm().disk_counters()[0].1;
        let (requests, errors) = (
            c.requests.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
        );
        eprintln!("seed {seed}: {requests} garbage requests served, {errors} refused");
        assert!(
            requests + errors > 0,
            "seed {seed}: the device never saw a request"
        );
    }
    assert!(
        !panicked.load(std::sync::atomic::Ordering::SeqCst),
        "a device or vCPU thread panicked"
    );
}

/// The counts a `dirty` guest printed so far, complete lines only (a pause
/// can land in the middle of a line: `count 6` of `count 600000`).
fn counts(vm: &hci_compute::KvmVm) -> Vec<u64> {
    let history = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
    let complete = match history.rfind('\n') {
        Some(end) => &history[..end],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("count ")?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_guest_counts_without_gaps_and_stops_while_paused() {
    let mut c = config("dirty", guest(Guest::Dirty), 1, "mib=8 every=200000");
    c.memory = 64 << 20;
    let vm = create(c).await;
    vm.start().await.unwrap();
    wait_console(&vm, "count 400000\n");
    vm.pause().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let paused = counts(&vm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counts(&vm), paused, "a paused guest kept counting");
    vm.resume().await.unwrap();
    let next = paused.last().copied().unwrap_or(0) + 400_000;
    wait_console(&vm, &format!("count {next}\n"));
    // Every multiple of `every`, in order: no gap, no repeat.
    let all = counts(&vm);
    for (i, n) in all.iter().enumerate() {
        assert_eq!(*n, (i as u64 + 1) * 200_000, "{all:?}");
    }
    let head = String::from_utf8_lossy(&vm.console_hub().history()).into_owned();
    assert!(head.starts_with("dirty counter at 0x"), "{head}");
    // It really writes memory: the area's pages are resident.
    assert!(
        vm.guest_rss_bytes() >= 8 << 20,
        "rss {}",
        vm.guest_rss_bytes()
    );
    vm.kill().await.unwrap();
}
