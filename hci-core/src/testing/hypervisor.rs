//! Conformance suite for [`Hypervisor`] and [`VmHandle`].
//!
//! A backend supplies a [`HypervisorFixture`]: the hypervisor plus two guest
//! configurations it can run — `hello`, which prints a known text on its
//! console and then stops on its own, and `spin`, which runs until stopped and
//! keeps printing (so progress is visible). Run it with one test per case
//! through [`hypervisor_conformance!`](crate::hypervisor_conformance).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::compute::{BootSource, ExitReason, Hypervisor, VmConfig, VmHandle, VmState};

/// What a backend hands the suite.
#[derive(Debug)]
pub struct HypervisorFixture {
    /// The backend under test.
    pub hypervisor: Box<dyn Hypervisor>,
    /// A guest that prints [`HypervisorFixture::hello_output`] and stops by itself.
    pub hello: VmConfig,
    /// Text `hello` prints.
    pub hello_output: String,
    /// How `hello` stops (e.g. `Reset` or `Poweroff`).
    pub hello_exit: ExitReason,
    /// A guest that runs until stopped, printing continuously.
    pub spin: VmConfig,
}

/// Names of every case, in the order [`hypervisor_suite`] runs them.
pub const HYPERVISOR_CASES: &[&str] = &[
    "guest_runs_to_completion_with_console_output",
    "pause_stops_progress_and_resume_continues",
    "kill_is_final_and_idempotent",
    "shutdown_stops_a_guest_within_its_timeout",
    "stats_report_uptime_and_memory",
    "invalid_configs_are_refused",
    "snapshot_restores_a_paused_guest_that_continues",
    "live_migration_moves_a_running_guest",
];

const WAIT: Duration = Duration::from_secs(60);

/// Collects a VM's console output in the background.
struct Output(Arc<Mutex<Vec<u8>>>);

impl Output {
    async fn follow(vm: &dyn VmHandle) -> Output {
        let mut console = vm.console().await.expect("console");
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = console.output.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                b.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&chunk[..n]);
            }
        });
        Output(buf)
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits until the output grows past `len` bytes.
    async fn grows_past(&self, len: usize, within: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.len() > len {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

fn named(mut c: VmConfig, suffix: &str) -> VmConfig {
    c.name = format!("{}-{suffix}", c.name);
    c
}

/// `named` plus a run directory of its own under the fixture's (cases run
/// in parallel; a VM's sockets and logs live there).
fn own(c: &VmConfig, suffix: &str) -> VmConfig {
    let mut c = named(c.clone(), suffix);
    c.run_dir = c.run_dir.join(suffix);
    let _ = std::fs::create_dir_all(&c.run_dir);
    c
}

async fn stop(vm: &dyn VmHandle) {
    vm.kill().await.expect("kill");
    let r = tokio::time::timeout(WAIT, vm.wait())
        .await
        .expect("the VM stops after kill");
    assert_eq!(r.expect("wait"), ExitReason::Killed);
}

/// `hello` starts, prints its text and stops by itself with the expected reason.
pub async fn guest_runs_to_completion_with_console_output(f: &HypervisorFixture) {
    let vm = f
        .hypervisor
        .create(named(f.hello.clone(), "complete"))
        .await
        .expect("create");
    assert_eq!(vm.state().await.expect("state"), VmState::Created);
    let out = Output::follow(&*vm).await;
    vm.start().await.expect("start");
    let reason = tokio::time::timeout(WAIT, vm.wait())
        .await
        .expect("the guest stops by itself");
    assert_eq!(reason.expect("wait"), f.hello_exit);
    let start = Instant::now();
    while !out.text().contains(&f.hello_output) && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        out.text().contains(&f.hello_output),
        "console said {:?}",
        out.text()
    );
    assert_eq!(
        vm.state().await.expect("state"),
        VmState::Stopped(f.hello_exit.clone())
    );
}

/// A paused guest makes no progress; resumed, it continues.
pub async fn pause_stops_progress_and_resume_continues(f: &HypervisorFixture) {
    let vm = f
        .hypervisor
        .create(named(f.spin.clone(), "pause"))
        .await
        .expect("create");
    let out = Output::follow(&*vm).await;
    vm.start().await.expect("start");
    assert!(
        out.grows_past(0, WAIT).await,
        "the spin guest printed nothing"
    );
    vm.pause().await.expect("pause");
    assert_eq!(vm.state().await.expect("state"), VmState::Paused);
    tokio::time::sleep(Duration::from_millis(200)).await; // output already in flight
    let paused_at = out.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(out.len(), paused_at, "a paused guest kept printing");
    vm.resume().await.expect("resume");
    assert_eq!(vm.state().await.expect("state"), VmState::Running);
    assert!(
        out.grows_past(paused_at, WAIT).await,
        "the guest did not continue after resume"
    );
    stop(&*vm).await;
}

/// Kill stops the guest for good; a second kill is harmless; nothing restarts it.
pub async fn kill_is_final_and_idempotent(f: &HypervisorFixture) {
    let vm = f
        .hypervisor
        .create(named(f.spin.clone(), "kill"))
        .await
        .expect("create");
    vm.start().await.expect("start");
    stop(&*vm).await;
    assert_eq!(
        vm.state().await.expect("state"),
        VmState::Stopped(ExitReason::Killed)
    );
    vm.kill().await.expect("a second kill is harmless");
    assert!(vm.resume().await.is_err(), "resumed a killed VM");
    assert!(vm.pause().await.is_err(), "paused a killed VM");
}

/// Shutdown returns within its timeout (plus slack), killing a guest that ignores it.
pub async fn shutdown_stops_a_guest_within_its_timeout(f: &HypervisorFixture) {
    let vm = f
        .hypervisor
        .create(named(f.spin.clone(), "shutdown"))
        .await
        .expect("create");
    vm.start().await.expect("start");
    let t = Instant::now();
    let r = tokio::time::timeout(WAIT, vm.shutdown(Duration::from_millis(300)))
        .await
        .expect("shutdown returns")
        .expect("shutdown");
    assert!(
        matches!(r, ExitReason::Killed | ExitReason::Poweroff),
        "shutdown gave {r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert!(matches!(
        vm.state().await.expect("state"),
        VmState::Stopped(_)
    ));
}

/// Stats report uptime and the configured memory.
pub async fn stats_report_uptime_and_memory(f: &HypervisorFixture) {
    let vm = f
        .hypervisor
        .create(named(f.spin.clone(), "stats"))
        .await
        .expect("create");
    vm.start().await.expect("start");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = vm.stats().await.expect("stats");
    assert!(
        s.uptime >= Duration::from_millis(100),
        "uptime {:?}",
        s.uptime
    );
    assert_eq!(s.memory_bytes, f.spin.memory, "memory_bytes");
    stop(&*vm).await;
}

/// Zero memory, zero vCPUs and a missing kernel are refused with an error.
pub async fn invalid_configs_are_refused(f: &HypervisorFixture) {
    let mut c = named(f.hello.clone(), "no-memory");
    c.memory = 0;
    assert!(f.hypervisor.create(c).await.is_err(), "memory 0 accepted");
    let mut c = named(f.hello.clone(), "no-cpus");
    c.cpus = 0;
    assert!(f.hypervisor.create(c).await.is_err(), "0 vCPUs accepted");
    let mut c = named(f.hello.clone(), "no-kernel");
    c.boot = BootSource::Kernel {
        kernel: "/nonexistent/hci/vmlinuz".into(),
        initrd: None,
        cmdline: String::new(),
    };
    match f.hypervisor.create(c).await {
        Ok(vm) => assert!(vm.start().await.is_err(), "started a VM without a kernel"),
        Err(e) => assert!(e.to_string().contains("/nonexistent/hci/vmlinuz"), "{e}"),
    }
}

/// A snapshot of a paused guest restores (paused) into a new VM that
/// continues when resumed. Skipped, saying so, for backends without
/// [`Snapshottable`](crate::compute::Snapshottable) /
/// [`RestoreVm`](crate::compute::RestoreVm).
pub async fn snapshot_restores_a_paused_guest_that_continues(f: &HypervisorFixture) {
    let vm = f
        .hypervisor
        .create(own(&f.spin, "snap"))
        .await
        .expect("create");
    let (Some(saver), Some(restorer)) = (vm.as_snapshottable(), f.hypervisor.as_restorer()) else {
        eprintln!(
            "SKIPPED snapshot_restores_a_paused_guest_that_continues: the {:?} backend cannot snapshot and restore",
            f.hypervisor.kind()
        );
        // A VM in its own process outlives its handle: end it.
        let _ = vm.kill().await;
        return;
    };
    let out = Output::follow(&*vm).await;
    vm.start().await.expect("start");
    assert!(
        out.grows_past(0, WAIT).await,
        "the spin guest printed nothing"
    );
    vm.pause().await.expect("pause");
    let file = std::env::temp_dir().join(format!(
        "hci-suite-{}-{}.snap",
        f.spin.name,
        std::process::id()
    ));
    saver.save(&file).await.expect("save");
    stop(&*vm).await;
    let restored = restorer
        .restore(own(&f.spin, "restored"), &file)
        .await
        .expect("restore");
    let _ = std::fs::remove_file(&file);
    assert_eq!(restored.state().await.expect("state"), VmState::Paused);
    let out = Output::follow(&*restored).await;
    let before = out.len();
    restored.resume().await.expect("resume");
    assert!(
        out.grows_past(before, WAIT).await,
        "the restored guest did not continue"
    );
    stop(&*restored).await;
}

/// A running guest migrates to a receiver of the same backend on loopback:
/// the source stops, the target runs and the guest goes on printing there.
/// Skipped, saying so, for backends without live migration.
pub async fn live_migration_moves_a_running_guest(f: &HypervisorFixture) {
    use crate::compute::{MigrationOptions, MigrationProgress};
    let vm = f
        .hypervisor
        .create(own(&f.spin, "mig-src"))
        .await
        .expect("create");
    let (Some(sender), Some(receiver)) = (vm.as_migratable(), f.hypervisor.as_migration_receiver())
    else {
        eprintln!(
            "SKIPPED live_migration_moves_a_running_guest: the {:?} backend cannot live-migrate",
            f.hypervisor.kind()
        );
        let _ = vm.kill().await;
        return;
    };
    vm.start().await.expect("start");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let receiving = receiver.receive(own(&f.spin, "mig-dst"), &addr, "suite-token");
    let sending = async {
        // The receiver may take a moment to listen.
        let start = Instant::now();
        loop {
            let (tx, _rx) = tokio::sync::watch::channel(MigrationProgress::default());
            let options = MigrationOptions {
                token: "suite-token".into(),
                ..MigrationOptions::default()
            };
            match sender.migrate(&addr, options, tx).await {
                Ok(p) => return p,
                Err(e) if start.elapsed() < WAIT && e.to_string().contains("connect to") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("migrate: {e}"),
            }
        }
    };
    let (target, progress) = tokio::join!(receiving, sending);
    let target = target.expect("receive");
    assert!(progress.downtime.is_some(), "{progress:?}");
    assert_eq!(
        tokio::time::timeout(WAIT, vm.wait())
            .await
            .expect("the source stops")
            .expect("wait"),
        ExitReason::Killed
    );
    assert_eq!(target.state().await.expect("state"), VmState::Running);
    let out = Output::follow(&*target).await;
    let before = out.len();
    assert!(
        out.grows_past(before, WAIT).await,
        "the migrated guest does not run"
    );
    stop(&*target).await;
}

/// Runs every case.
pub async fn hypervisor_suite(f: &HypervisorFixture) {
    guest_runs_to_completion_with_console_output(f).await;
    pause_stops_progress_and_resume_continues(f).await;
    kill_is_final_and_idempotent(f).await;
    shutdown_stops_a_guest_within_its_timeout(f).await;
    stats_report_uptime_and_memory(f).await;
    invalid_configs_are_refused(f).await;
    snapshot_restores_a_paused_guest_that_continues(f).await;
    live_migration_moves_a_running_guest(f).await;
}

/// Generates one `#[tokio::test]` per [`Hypervisor`] conformance case;
/// `$make` is an async function returning a [`HypervisorFixture`] (or anything
/// that dereferences to one).
#[macro_export]
macro_rules! hypervisor_conformance {
    ($make:expr) => {
        $crate::hypervisor_conformance!(@cases $make;
            guest_runs_to_completion_with_console_output,
            pause_stops_progress_and_resume_continues,
            kill_is_final_and_idempotent,
            shutdown_stops_a_guest_within_its_timeout,
            stats_report_uptime_and_memory,
            invalid_configs_are_refused,
            snapshot_restores_a_paused_guest_that_continues,
            live_migration_moves_a_running_guest,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = ($make)().await;
                $crate::testing::hypervisor::$case(&fixture).await;
            }
        )*
    };
}
