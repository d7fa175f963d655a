//! One VMM process per VM: the `hci-vmm` binary from the command line, and
//! `ProcessHypervisor` (hci-core's hypervisor suite, adoption after the
//! caller is gone).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use hci_compute::ProcessHypervisor;
use hci_compute::test_guests::Guest;
use hci_core::compute::{ExitReason, Hypervisor, VmConfig, VmState};
use hci_core::testing::hypervisor::HypervisorFixture;

const VMM: &str = env!("CARGO_BIN_EXE_hci-vmm");

/// A config whose run directory no other test process uses (tests run in
/// parallel processes; `config` clears its shared run directory).
fn unique(mut c: VmConfig) -> VmConfig {
    // Cases of one test binary run in parallel too: a counter per fixture.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    c.run_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("run-proc")
        .join(format!("{}-{}-{n}", c.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&c.run_dir);
    let _ = std::fs::create_dir_all(&c.run_dir);
    c
}

async fn fixture() -> HypervisorFixture {
    require_kvm();
    HypervisorFixture {
        hypervisor: Box::new(ProcessHypervisor::with_vmm(VMM)),
        hello: unique(config("proc-hello", guest(Guest::Hello), 1, "")),
        hello_output: "hello from guest\n".into(),
        hello_exit: ExitReason::Reset,
        spin: unique(config("proc-spin", guest(Guest::Spin), 1, "every=1000000")),
    }
}

hci_core::hypervisor_conformance!(fixture);

/// Waits until the console log at `log` satisfies `done`, panicking with
/// its contents after `within`.
async fn wait_log(log: &std::path::Path, within: Duration, done: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if done(&text) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the console log never got there:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn vmm(args: &[&str]) -> std::process::Output {
    Command::new(VMM).args(args).output().expect("run hci-vmm")
}

#[test]
fn the_command_line_runs_a_guest_and_exits_zero() {
    require_kvm();
    let kernel = guest(Guest::Hello);
    let out = vmm(&["--kernel", &kernel.display().to_string(), "--memory", "64M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello from guest"));
}

#[test]
fn guest_memory_can_be_a_memfd_a_file_or_huge_pages() {
    require_kvm();
    let k = guest(Guest::Hello).display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = format!("file={}", dir.path().join("ram").display());
    for backing in ["memfd", file.as_str()] {
        let out = vmm(&[
            "--kernel",
            &k,
            "--memory",
            "64M",
            "--memory-backing",
            backing,
        ]);
        assert!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("hello from guest"),
            "{backing}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        std::fs::metadata(dir.path().join("ram"))
            .expect("ram file")
            .len(),
        64 << 20
    );

    // Huge pages: reserve 32 (64 MiB) in the host pool when we may, run,
    // and give them back.
    let pool = "/proc/sys/vm/nr_hugepages";
    let Some(before) = std::fs::read_to_string(pool)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        eprintln!("skipping the huge page run: {pool} is not readable");
        return;
    };
    if hci_compute::memory::free_huge_pages().unwrap_or(0) < 32
        && std::fs::write(pool, (before + 32).to_string()).is_err()
    {
        eprintln!("skipping the huge page run: cannot raise {pool} (not root?)");
        return;
    }
    let out = vmm(&["--kernel", &k, "--memory", "64M", "--hugepages"]);
    let _ = std::fs::write(pool, before.to_string());
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("cannot reserve") {
        eprintln!("skipping the huge page run: the host could not supply them: {err}");
        return;
    }
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello from guest"),
        "hugepages: {err}"
    );
}

#[test]
fn bad_command_lines_fail_with_one_clear_line() {
    let kernel = guest(Guest::Hello);
    let k = kernel.display().to_string();
    for (args, expect) in [
        (vec!["--kernel", "/nonexistent/vmlinux"], "no such file"),
        (vec!["--kernel", &k, "--memory", "0"], "must not be zero"),
        (vec!["--kernel", &k, "--memory", "12Q"], "unknown unit"),
        (
            vec!["--kernel", &k, "--disk", "path=/nonexistent/vol"],
            "/nonexistent/vol",
        ),
        (
            vec!["--kernel", &k, "--disk", "color=blue"],
            "unknown option",
        ),
        (
            vec!["--kernel", &k, "--net", "mac=02:00:00:00:00:01"],
            "tap=NAME",
        ),
        (
            vec!["--kernel", &k, "--memory-backing", "floppy"],
            "anon, memfd or file=PATH",
        ),
        (
            vec!["--kernel", &k, "--memory", "65M", "--hugepages"],
            "2 MiB huge page",
        ),
    ] {
        let out = vmm(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}

#[test]
fn an_encrypted_volume_is_opened_with_its_key_file() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol");
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, [0x5au8; 64]).expect("key");
    let key = hci_core::volume::EncryptionKey::new(vec![0x5au8; 64]);
    drop(hci_storage::local::Replica::create(&vol, 16 << 20, Some(&key)).expect("create volume"));
    let k = guest(Guest::Blk).display().to_string();
    let disk = format!(
        "path={},name=data,key-file={}",
        vol.display(),
        key_file.display()
    );
    let out = vmm(&["--kernel", &k, "--memory", "64M", "--disk", &disk]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("virtio-blk OK"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The guest's pattern is there through the key, and not in the clear on disk.
    let r = hci_storage::local::Replica::open(&vol, Some(&key)).expect("reopen");
    let mut buf = vec![0u8; 4096];
    r.read(&mut buf, 8 * 512).expect("read");
    drop(r);
    assert!(
        buf.iter()
            .enumerate()
            .all(|(i, b)| *b == (i as u32 * 31 + 7) as u8)
    );
    // Without the key file the volume is refused with a clear message.
    let out = vmm(&[
        "--kernel",
        &k,
        "--memory",
        "64M",
        "--disk",
        &format!("path={}", vol.display()),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("encrypted"));
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, [1u8; 64]).expect("key");
    let disk = format!("path={},key-file={}", vol.display(), wrong.display());
    let out = vmm(&["--kernel", &k, "--memory", "64M", "--disk", &disk]);
    assert!(!out.status.success(), "a wrong key was accepted");
}

/// A volume attached to a VM in its own process is owned (locked) by that
/// process; the pool's backend still snapshots, inspects and expands it
/// online through the volume's control socket, and gets it back after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_volume_is_snapshotted_online_through_its_owner() {
    use hci_core::volume::VolumeBackend;
    require_kvm();
    let pool_dir = tempfile::tempdir().expect("tempdir");
    let (pool, disk) = released_volume(pool_dir.path(), "root", 16 << 20).await;
    let mut cfg = unique(config("online-snap", guest(Guest::Blk), 1, "stay=1"));
    cfg.disks.push(disk);
    let run_dir = cfg.run_dir.clone();
    let vm = ProcessHypervisor::with_vmm(VMM)
        .create(cfg)
        .await
        .expect("create");
    vm.start().await.expect("start");
    let log = run_dir.join("console.log");
    wait_log(&log, Duration::from_secs(30), |l| l.contains("staying up")).await;
    let snap = pool.snapshot("root", "s1").await.expect("online snapshot");
    assert_eq!(snap.name, "s1");
    assert!(matches!(
        pool.snapshot("root", "s1").await,
        Err(hci_core::Error::AlreadyExists { .. })
    ));
    // The guest wrote one 4 KiB block at sector 8.
    let changed = pool
        .changed_blocks("root", None, "s1")
        .await
        .expect("changed");
    assert_eq!(
        changed,
        vec![hci_core::block::ByteRange {
            offset: 4096,
            len: 4096
        }]
    );
    assert_eq!(pool.info("root").await.expect("info").snapshots, 1);
    // Its data is readable while the VM runs (a backup of a running VM).
    let snap_dev = pool
        .open_snapshot(
            "root",
            "s1",
            hci_core::volume::OpenVolume {
                read_only: true,
                encryption_key: None,
            },
        )
        .await
        .expect("open the snapshot of an owned volume");
    let mut buf = vec![0u8; 4096];
    snap_dev.read_at(&mut buf, 4096).await.expect("read");
    assert!(
        buf.iter()
            .enumerate()
            .all(|(i, b)| *b == (i as u32 * 31 + 7) as u8)
    );
    assert_eq!(
        pool.expand("root", 32 << 20).await.expect("expand").size,
        32 << 20
    );
    let clone = pool
        .clone_snapshot("root", "s1", "copy")
        .await
        .expect("clone");
    assert_eq!(clone.name, "copy");
    // Opening it for I/O or reverting stays refused while the VM owns it.
    assert!(pool.revert("root", "s1").await.is_err());

    assert_eq!(
        vm.shutdown(Duration::from_secs(20))
            .await
            .expect("shutdown"),
        ExitReason::Reset
    );
    // Back in the pool's hands once the process is gone (it removes the
    // control socket on its way out): the snapshot is there.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pool_dir.path().join("root/control.sock").exists() {
        assert!(std::time::Instant::now() < deadline, "the VMM never let go");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snaps = loop {
        match pool.list_snapshots("root").await {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline && e.is_retryable() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("list: {e}"),
        }
    };
    assert_eq!(snaps.len(), 1);
}

#[test]
fn a_volume_disk_is_written_by_the_guest_and_read_back_on_the_host() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol");
    drop(hci_storage::local::Replica::create(&vol, 16 << 20, None).expect("create volume"));
    let kernel = guest(Guest::Blk);
    let out = vmm(&[
        "--kernel",
        &kernel.display().to_string(),
        "--memory",
        "64M",
        "--disk",
        &format!("path={},name=data", vol.display()),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("virtio-blk OK"),
        "{stdout}"
    );
    assert!(stdout.contains("virtio-blk id data"), "{stdout}");
    // The guest's pattern (byte i = i*31+7) at sector 8, through the volume.
    let r = hci_storage::local::Replica::open(&vol, None).expect("reopen");
    let mut buf = vec![0u8; 4096];
    r.read(&mut buf, 8 * 512).expect("read");
    for (i, b) in buf.iter().enumerate() {
        assert_eq!(*b, (i as u32 * 31 + 7) as u8, "byte {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reaches_a_guest_in_its_own_process() {
    require_kvm();
    let cfg = unique(config("kbd-proc", guest(Guest::Kbd), 1, ""));
    let run_dir = cfg.run_dir.clone();
    let hv = ProcessHypervisor::with_vmm(VMM);
    let vm = hv.create(cfg).await.expect("create");
    vm.start().await.expect("start");
    let log = run_dir.join("console.log");
    wait_log(&log, Duration::from_secs(20), |l| l.contains("kbd ready")).await;
    // The running VMM is under its seccomp filter (mode 2: filter).
    let info = hci_compute::vmm_api::VmmClient::new(run_dir.join("api.sock"))
        .call(&hci_compute::vmm_api::Request::Info)
        .await
        .expect("info");
    let pid = info.pid.expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(
        status.lines().any(|l| l == "Seccomp:\t2"),
        "hci-vmm runs without its filter:\n{status}"
    );
    let reason = vm
        .shutdown(Duration::from_secs(20))
        .await
        .expect("shutdown");
    assert_eq!(reason, ExitReason::Reset);
    // The console pump writes the log asynchronously: its last line may land
    // just after the VM stopped.
    wait_log(&log, Duration::from_secs(10), |l| {
        l.ends_with("ctrl-alt-del\n")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_outlive_their_hypervisor_and_are_adopted() {
    require_kvm();
    let cfg = unique(config("adopt", guest(Guest::Spin), 1, "every=1000000"));
    let run_dir = cfg.run_dir.clone();
    {
        let hv = ProcessHypervisor::with_vmm(VMM);
        let vm = hv.create(cfg).await.expect("create");
        vm.start().await.expect("start");
        // The hypervisor and the handle go away; the process stays.
    }
    let hv = ProcessHypervisor::with_vmm(VMM);
    let adopter = hv.as_adopter().expect("adopts");
    let vm = adopter
        .adopt("adopt", &run_dir)
        .await
        .expect("adopt")
        .expect("still running");
    assert_eq!(vm.state().await.expect("state"), VmState::Running);
    vm.pause().await.expect("pause");
    assert_eq!(vm.state().await.expect("state"), VmState::Paused);
    vm.resume().await.expect("resume");
    // Console history survived: the guest printed before we adopted it.
    let mut console = vm.console().await.expect("console");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        // The history may arrive in pieces.
        let mut n = 0;
        while n < 8 {
            match console.output.read(&mut buf[n..]).await {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    })
    .await
    .expect("console output in time")
    .expect("read");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("spinning"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    vm.kill().await.expect("kill");
    assert_eq!(vm.wait().await.expect("wait"), ExitReason::Killed);
    // Gone once the process has exited: adoption finds nothing, and the
    // exit was recorded.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while adopter
        .adopt("adopt", &run_dir)
        .await
        .expect("adopt")
        .is_some()
    {
        assert!(std::time::Instant::now() < deadline, "the VMM never exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        hci_compute::vmm_api::read_exit_file(&run_dir.join("exit.json")),
        Some(ExitReason::Killed)
    );
}

/// Kills a child process on drop (a failed test leaves no spinning VMM).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The fencing watchdog: an `hci-vmm` whose replicated volume is taken
/// over by a newer engine (what the cluster does before it restarts a lost
/// node's VM elsewhere) stops its guest, exit reason "fenced", instead of
/// running on headless with a disk that refuses its writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_vmm_stops_its_guest() {
    use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};

    require_kvm();
    let dir = tempfile::tempdir().expect("temp dir");
    let servers = ReplicaServers::start(dir.path(), 2, "fence-watch").await;
    let backend = &servers.backend;
    backend
        .create("fv", CreateVolume::new(4 << 20))
        .await
        .expect("create");

    let mut cfg = unique(config("fenced", guest(Guest::Blk), 1, "stay=1 writes=1"));
    cfg.disks.push(replicated_disk(
        "data",
        "fv",
        servers.addrs.clone(),
        servers.token_file.clone(),
    ));
    let run_dir = cfg.run_dir.clone();
    let mut args = ProcessHypervisor::args(&cfg).expect("command line");
    // Boot at once (ProcessHypervisor starts it over the API).
    args.retain(|a| a != "--wait-start");
    let stderr = std::fs::File::create(run_dir.join("stderr")).expect("stderr file");
    let mut vmm = KillOnDrop(
        Command::new(VMM)
            .args(&args)
            .stderr(stderr)
            .spawn()
            .expect("spawn hci-vmm"),
    );
    let log = run_dir.join("console.log");
    wait_log(&log, Duration::from_secs(60), |l| l.contains("writes ")).await;

    // Another engine takes the volume over (generation + 1).
    let taken = std::time::Instant::now();
    let engine = backend
        .open_engine("fv", OpenVolume::default())
        .await
        .expect("open a newer engine");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = vmm.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hci-vmm still runs after its volume was taken over:\n{}",
            std::fs::read_to_string(run_dir.join("stderr")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "fenced hci-vmm stopped {:.2} s after a newer engine opened the volume",
        taken.elapsed().as_secs_f64()
    );
    assert!(!status.success());
    let stderr = std::fs::read_to_string(run_dir.join("stderr")).unwrap_or_default();
    assert!(stderr.contains("fenced"), "{stderr}");
    let exit = std::fs::read_to_string(run_dir.join("exit.json")).unwrap_or_default();
    assert!(exit.contains("fenced"), "exit file: {exit}");
    engine.close().await.expect("close");
}
