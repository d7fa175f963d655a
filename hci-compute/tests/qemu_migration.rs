//! Live migration between two QEMU processes through QMP `migrate`: the
//! `dirty` test guest keeps counting (and dirtying memory) across the
//! switch — the target's console continues the source's count, with no
//! restart from zero. Loopback TCP; both QEMUs under TCG here.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use hci_compute::qemu::QemuHypervisor;
use hci_compute::test_guests::Guest;
use hci_core::compute::{
    ExitReason, Migratable, MigrationOptions, MigrationProgress, VmConfig, VmHandle, VmState,
};

const WAIT: Duration = Duration::from_secs(120);

fn own(mut c: VmConfig, tag: &str) -> VmConfig {
    c.run_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("run-qemu")
        .join(format!("{}-{tag}-{}", c.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&c.run_dir);
    std::fs::create_dir_all(&c.run_dir).expect("run dir");
    c
}

/// The `count N` values printed so far.
fn counts(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("count ")?.trim().parse().ok())
        .collect()
}

fn console(vm: &hci_compute::qemu::QemuVm) -> String {
    String::from_utf8_lossy(&vm.console_hub().history()).into_owned()
}

async fn wait_counts(vm: &hci_compute::qemu::QemuVm, n: usize) -> Vec<u64> {
    let start = std::time::Instant::now();
    loop {
        let c = counts(&console(vm));
        if c.len() >= n {
            return c;
        }
        assert!(
            start.elapsed() < WAIT,
            "{} printed {} counts: {:?}",
            vm.name(),
            c.len(),
            console(vm)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_migrates_and_keeps_counting() {
    let hv = QemuHypervisor::new();
    hv.resolve_binary()
        .expect("needs qemu-system-x86_64 (scripts/install-deps.sh installs it)");
    let base = config("qmig", guest(Guest::Dirty), 1, "mib=2 every=100000");
    let src = hv
        .create_vm(own(base.clone(), "src"))
        .await
        .expect("create the source");
    src.start().await.expect("start");
    let before = wait_counts(&src, 2).await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let target = format!("127.0.0.1:{port}");
    let dst = hv
        .prepare_incoming(own(base, "dst"), &target)
        .await
        .expect("start the target QEMU");
    assert_eq!(dst.state().await.expect("state"), VmState::Created);

    let (tx, _rx) = tokio::sync::watch::channel(MigrationProgress::default());
    let done = tokio::time::timeout(
        WAIT,
        src.migrate(
            &target,
            MigrationOptions {
                max_downtime: Duration::from_millis(100),
                timeout: WAIT,
                token: String::new(),
                ..Default::default()
            },
            tx,
        ),
    )
    .await
    .expect("migrate returns")
    .expect("migrate");
    tokio::time::timeout(WAIT, dst.finish_incoming())
        .await
        .expect("the target resumes")
        .expect("finish the incoming migration");
    assert_eq!(dst.state().await.expect("state"), VmState::Running);
    assert!(done.bytes_sent > 0, "{done:?}");
    eprintln!(
        "migration: {} passes, {} bytes, downtime {:?}",
        done.iteration, done.bytes_sent, done.downtime
    );

    // The source is gone; the guest counts on, from where it was.
    assert_eq!(
        tokio::time::timeout(WAIT, src.wait())
            .await
            .expect("source stops")
            .expect("wait"),
        ExitReason::Killed
    );
    let last_src = *counts(&console(&src)).last().expect("source counts");
    assert!(last_src >= before[1]);
    let after = wait_counts(&dst, 2).await;
    assert!(
        after[0] > last_src,
        "the target's count restarted: source ended at {last_src}, target printed {after:?}"
    );
    assert!(after.windows(2).all(|w| w[1] > w[0]), "{after:?}");
    dst.kill().await.expect("kill the target");
}

/// A started `dirty` guest named `name` (`cmdline`) that has counted once.
async fn counting_source(name: &str, cmdline: &str) -> hci_compute::qemu::QemuVm {
    let hv = QemuHypervisor::new();
    hv.resolve_binary()
        .expect("needs qemu-system-x86_64 (scripts/install-deps.sh installs it)");
    let src = hv
        .create_vm(own(config(name, guest(Guest::Dirty), 1, cmdline), "src"))
        .await
        .expect("create");
    src.start().await.expect("start");
    wait_counts(&src, 1).await;
    src
}

/// After a failed or cancelled migration: the source runs and counts on.
async fn still_counting(src: &hci_compute::qemu::QemuVm) {
    assert_eq!(src.state().await.expect("state"), VmState::Running);
    let n = counts(&console(src)).len();
    wait_counts(src, n + 1).await;
    src.kill().await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_to_nowhere_fails_and_the_source_keeps_running() {
    let src = counting_source("qmig-fail", "mib=1 every=100000").await;
    // Nothing listens on a port we just bound and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let (tx, _rx) = tokio::sync::watch::channel(MigrationProgress::default());
    let err = tokio::time::timeout(
        WAIT,
        src.migrate(
            &format!("127.0.0.1:{port}"),
            MigrationOptions::default(),
            tx,
        ),
    )
    .await
    .expect("migrate returns")
    .expect_err("nobody listens");
    assert!(err.to_string().contains("failed"), "{err}");
    still_counting(&src).await;
}

/// A cancel before the switch-over: QEMU drops the stream (to a peer that
/// stopped reading, while pass 1 still has most of the guest's 40 dirtied
/// MiB to send), `migrate` answers `Cancelled` and the guest counts on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_before_the_switch_over_leaves_the_source_running() {
    let src = counting_source("qmig-cancel", "mib=40 every=100000").await;
    // A peer that takes the connection and never reads: pass 1 stalls.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let held = listener.accept();
        let _ = released.recv_timeout(WAIT);
        drop(held);
    });
    let (tx, _rx) = tokio::sync::watch::channel(MigrationProgress::default());
    let cancel = hci_core::CancelToken::new();
    let options = MigrationOptions {
        cancel: cancel.clone(),
        timeout: WAIT,
        ..Default::default()
    };
    let canceller = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cancel.cancel();
    };
    let (r, ()) = tokio::join!(
        tokio::time::timeout(WAIT, src.migrate(&addr, options, tx)),
        canceller
    );
    let r = r.expect("migrate returns");
    assert!(matches!(r, Err(hci_core::Error::Cancelled)), "{r:?}");
    still_counting(&src).await;
    let _ = release.send(());
    holder.join().expect("holder");
}

/// A replicated volume (two in-process replica servers) moves with the
/// guest, over a TLS-PSK stream keyed by the token: the target's engine is only prepared until its QEMU has the
/// whole stream, then takes the volume over (the source's generation is
/// refused from then on); data written through the source's engine before
/// is read through the target's after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_disk_is_handed_over_at_the_switch() {
    use hci_core::block::{BlockDevice, WriteFlags};
    use hci_core::volume::{CreateVolume, OpenVolume};
    use hci_storage::replica::ReplicaNode;
    use hci_storage::replica::client::{RemoteNode, ServerAddr};
    use hci_storage::replica::server::ReplicaServer;
    const TOKEN: &str = "qmig-token";
    let hv = QemuHypervisor::new();
    hv.resolve_binary()
        .expect("needs qemu-system-x86_64 (scripts/install-deps.sh installs it)");
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).expect("token");
    let (mut replicas, mut nodes, mut tasks) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..2 {
        let srv = ReplicaServer::new(dir.path().join(format!("r{i}")), TOKEN).expect("server");
        let (addr, task) = srv.spawn("127.0.0.1:0").await.expect("spawn");
        let node: std::sync::Arc<dyn ReplicaNode> =
            std::sync::Arc::new(RemoteNode::new(ServerAddr::new(addr.to_string(), TOKEN)));
        node.backend()
            .create("qv", CreateVolume::new(16 << 20))
            .await
            .expect("create the replica");
        replicas.push(addr.to_string());
        nodes.push(node);
        tasks.push(AbortOnDrop(task));
    }
    let mut base = config("qmigd", guest(Guest::Dirty), 1, "mib=2 every=100000");
    base.disks = vec![replicated_disk("data", "qv", replicas, token_file)];
    let src = hv
        .create_vm(own(base.clone(), "src"))
        .await
        .expect("create the source");
    src.start().await.expect("start");
    wait_counts(&src, 2).await;
    let old = nodes[0].fence_state("qv").await.expect("state").generation;
    let block = |b: u8| vec![b; 4096];
    src.volumes()[0]
        .write_at(&block(0xa1), 0, WriteFlags::default())
        .await
        .expect("write through the source's engine");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let target = format!("127.0.0.1:{port}");
    let dst = hv
        .prepare_incoming_with_token(own(base, "dst"), &target, "s3cret")
        .await
        .expect("start the target QEMU");
    // Prepared only: nobody fenced the source yet.
    assert_eq!(
        nodes[0].fence_state("qv").await.expect("state").generation,
        old
    );
    assert!(!dst.volumes()[0].is_active());
    src.volumes()[0]
        .write_at(&block(0xa2), 4096, WriteFlags::default())
        .await
        .expect("the source still writes while the target is prepared");

    let (tx, _rx) = tokio::sync::watch::channel(MigrationProgress::default());
    let (done, finished) = tokio::join!(
        tokio::time::timeout(
            WAIT,
            src.migrate(
                &target,
                MigrationOptions {
                    max_downtime: Duration::from_millis(100),
                    timeout: WAIT,
                    token: "s3cret".into(),
                    ..Default::default()
                },
                tx,
            ),
        ),
        tokio::time::timeout(WAIT, dst.finish_incoming())
    );
    let done = done.expect("migrate returns").expect("migrate");
    finished
        .expect("the target resumes")
        .expect("finish the incoming migration");
    eprintln!(
        "migration with a replicated disk: {} passes, {} bytes, downtime {:?}",
        done.iteration, done.bytes_sent, done.downtime
    );
    assert_eq!(dst.state().await.expect("state"), VmState::Running);
    assert_eq!(
        tokio::time::timeout(WAIT, src.wait())
            .await
            .expect("source stops")
            .expect("wait"),
        ExitReason::Killed
    );
    // The target owns the volume; the source's generation is refused.
    assert!(dst.volumes()[0].is_active());
    assert_eq!(
        nodes[0].fence_state("qv").await.expect("state").generation,
        old + 1
    );
    for n in &nodes {
        let r = n.open_fenced("qv", old, OpenVolume::default()).await;
        assert!(matches!(r, Err(hci_core::Error::Fenced { .. })), "{r:?}");
    }
    assert!(
        src.volumes()[0]
            .write_at(&block(0xee), 0, WriteFlags::default())
            .await
            .is_err(),
        "the source's disk must refuse writes after the hand-over"
    );
    let mut buf = vec![0u8; 4096];
    dst.volumes()[0].read_at(&mut buf, 0).await.expect("read");
    assert_eq!(buf, block(0xa1));
    dst.volumes()[0]
        .read_at(&mut buf, 4096)
        .await
        .expect("read");
    assert_eq!(buf, block(0xa2));
    dst.volumes()[0]
        .write_at(&block(0xb1), 8192, WriteFlags::default())
        .await
        .expect("the target writes");
    let _ = wait_counts(&dst, 2).await;
    dst.kill().await.expect("kill the target");
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_fails_the_tls_handshake_and_the_source_keeps_running() {
    let hv = QemuHypervisor::new();
    hv.resolve_binary()
        .expect("needs qemu-system-x86_64 (scripts/install-deps.sh installs it)");
    let base = config("qmigt", guest(Guest::Dirty), 1, "mib=1 every=100000");
    let src = hv
        .create_vm(own(base.clone(), "src"))
        .await
        .expect("create");
    src.start().await.expect("start");
    wait_counts(&src, 1).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let target = format!("127.0.0.1:{port}");
    let dst = hv
        .prepare_incoming_with_token(own(base, "dst"), &target, "right")
        .await
        .expect("start the target QEMU");
    let (tx, _rx) = tokio::sync::watch::channel(MigrationProgress::default());
    let r = tokio::time::timeout(
        WAIT,
        src.migrate(
            &target,
            MigrationOptions {
                max_downtime: Duration::from_millis(100),
                timeout: WAIT,
                token: "wrong".into(),
                ..Default::default()
            },
            tx,
        ),
    )
    .await
    .expect("migrate returns");
    assert!(r.is_err(), "a wrong token was accepted: {r:?}");
    still_counting(&src).await;
    dst.kill().await.expect("kill");
}
