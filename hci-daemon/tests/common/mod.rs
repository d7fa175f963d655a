//! Shared helpers for the tests that run real `hci-daemon` processes: one
//! daemon (its data directory, log, console files, `hcictl` against it)
//! and, with the `etcd` feature, a cluster of them on one etcd.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `hci-vmm` built next to the daemon under test.
pub fn vmm() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_hci-daemon")).with_file_name("hci-vmm")
}

/// Daemon arguments for VMs in their own `hci-vmm` processes.
pub fn process_mode() -> Vec<String> {
    vec![
        "--vm-mode".into(),
        "process".into(),
        "--vmm".into(),
        vmm().display().to_string(),
    ]
}

/// One hci-daemon on a unix socket in `dir`, killed (SIGKILL) on drop with
/// the `hci-vmm` processes of its VMs. `args` come after the data
/// directory, socket, node name and store.
pub struct Daemon {
    pub name: String,
    pub dir: PathBuf,
    pub store_url: String,
    pub args: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    /// A daemon for node `name` under `root`, not started yet.
    pub fn new(root: &Path, name: &str, store_url: &str, args: Vec<String>) -> Daemon {
        Daemon {
            name: name.to_string(),
            dir: root.join(name),
            store_url: store_url.to_string(),
            args,
            child: None,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("hci.sock")
    }

    /// Starts the daemon (again) and waits for its API socket. Logs go to
    /// `DIR.log` at the level `HCI_TEST_LOG` gives (default `info`).
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        std::fs::create_dir_all(&self.dir).expect("data dir");
        let log = std::fs::File::create(self.dir.with_extension("log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_hci-daemon"))
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--listen")
            .arg(format!("unix:{}", self.socket().display()))
            .args(["--node", &self.name, "--store", &self.store_url])
            // Engines reach replicas on every node: one token for all.
            .arg("--replica-token-file")
            .arg(self.dir.with_file_name("replica.token"))
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("HCI_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn hci-daemon");
        self.child = Some(child);
        wait_for_socket(&self.socket(), || {
            format!(
                "hci-daemon {} did not start: {}",
                self.name,
                self.log_tail()
            )
        });
    }

    /// Kills the daemon (SIGKILL) and its replica server processes, like a
    /// node losing its daemon and its storage at once; its `hci-vmm`
    /// processes live on (a node cut off from the others).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let servers = pids_of("replica-server", &self.dir.to_string_lossy());
        for &pid in &servers {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        wait_gone(&servers);
    }

    /// What VM `vm`'s serial console printed on this node.
    pub fn console(&self, vm: &str) -> String {
        std::fs::read_to_string(self.dir.join("data/run").join(vm).join("console.log"))
            .unwrap_or_default()
    }

    /// The last 25 lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// Runs `hcictl` against this daemon: (success, stdout + stderr).
    pub fn hcictl(&self, args: &[&str]) -> (bool, String) {
        hcictl(&self.socket(), args)
    }

    /// How many `hci-vmm` processes run VM `vm` of this daemon.
    pub fn vmms_of(&self, vm: &str) -> usize {
        let needle = self.dir.join("data/run").join(vm);
        vmm_pids(&needle.to_string_lossy()).len()
    }
}

/// Waits up to 60 s for a daemon's API socket to appear; panics with
/// `why()` (e.g. the daemon's log) if it does not.
pub fn wait_for_socket(socket: &Path, why: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `hcictl` against the daemon on unix socket `socket`: (success,
/// stdout + stderr).
pub fn hcictl(socket: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hcictl"))
        .arg("--server")
        .arg(format!("unix:{}", socket.display()))
        .args(args)
        .output()
        .expect("run hcictl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        kill_vmms_under(&self.dir);
    }
}

/// Pids of the `hci-vmm` processes whose command line mentions `needle`.
fn vmm_pids(needle: &str) -> Vec<i32> {
    pids_of("hci-vmm", needle)
}

/// Pids of the processes whose command line mentions both `what` and `needle`.
pub fn pids_of(what: &str, needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            (cmd.contains(what) && cmd.contains(needle)).then_some(pid)
        })
        .collect()
}

/// Kills the `hci-vmm` and replica server processes whose command line
/// mentions `dir` (with VMs in their own processes, both outlive their
/// daemon by design).
/// Returns once they are gone (so their volume locks are free).
pub fn kill_vmms_under(dir: &Path) {
    let needle = dir.to_string_lossy();
    let servers = pids_of("replica-server", &needle);
    let pids: Vec<i32> = vmm_pids(&needle).into_iter().chain(servers).collect();
    for &pid in &pids {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    wait_gone(&pids);
}

/// Waits (up to 10 s) until none of `pids` runs any more: reaped, or a
/// zombie with no thread left. (A killed multi-threaded process shows its
/// leader as a zombie while other threads still exit and still hold its
/// files, and so its volume locks.)
pub fn wait_gone(pids: &[i32]) {
    let running = |pid: i32| {
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        });
        match zombie {
            Err(_) => false,
            Ok(false) => true,
            Ok(true) => std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| d.count() > 1)
                .unwrap_or(false),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| running(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls resource `R` named `name` in `resources` until `done` holds;
/// panics with the last state seen (never `what`) after `within`.
pub async fn wait_for<R: hci_core::model::Resource + std::fmt::Debug>(
    resources: &hci_daemon::resources::ResourceStore,
    name: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&R) -> bool,
) -> R {
    let deadline = Instant::now() + within;
    loop {
        let r: Option<R> = resources.try_get(name).await.expect("read");
        if let Some(r) = &r
            && done(r)
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{} {name} never became {what}: {r:#?}",
            R::KIND
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(feature = "etcd")]
#[allow(unused_imports)] // not every test binary uses it
pub use cluster::Cluster;

#[cfg(feature = "etcd")]
mod cluster {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use hci_core::model::{ConditionStatus, Node, VirtualMachine};
    use hci_daemon::resources::ResourceStore;
    use hci_daemon::store::{EtcdServer, EtcdStateStore};

    use super::Daemon;

    /// Daemons on one etcd (started by the test), and a resource store on
    /// the same etcd to drive and watch them.
    pub struct Cluster {
        pub daemons: Vec<Daemon>,
        pub resources: ResourceStore,
        pub etcd: EtcdServer,
        _root: tempfile::TempDir,
    }

    impl Cluster {
        /// Starts etcd and one daemon per node with `args`, and waits until
        /// every node is Ready.
        pub async fn start_with_args(nodes: &[&str], args: Vec<String>) -> Cluster {
            let root = tempfile::tempdir().expect("temp dir");
            let etcd = EtcdServer::start_in(&root.path().join("etcd")).expect("start etcd");
            let daemons = nodes
                .iter()
                .map(|n| {
                    let mut d = Daemon::new(root.path(), n, &etcd.url(), args.clone());
                    d.spawn();
                    d
                })
                .collect();
            let store = EtcdStateStore::open(&etcd.url()).await.expect("connect");
            let c = Cluster {
                daemons,
                resources: ResourceStore::new(Arc::new(store)),
                etcd,
                _root: root,
            };
            for n in nodes {
                c.wait_ready(n, true, Duration::from_secs(60)).await;
            }
            c
        }

        pub fn daemon(&self, node: &str) -> &Daemon {
            self.daemons
                .iter()
                .find(|d| d.name == node)
                .expect("no such daemon")
        }

        pub fn daemon_mut(&mut self, node: &str) -> &mut Daemon {
            self.daemons
                .iter_mut()
                .find(|d| d.name == node)
                .expect("no such daemon")
        }

        /// Every daemon's log tail, for failure messages.
        pub fn logs(&self) -> String {
            self.daemons
                .iter()
                .map(|d| format!("--- {} ---\n{}\n", d.name, d.log_tail()))
                .collect()
        }

        pub async fn vm(&self, name: &str) -> VirtualMachine {
            self.resources.get(name).await.expect("get VM")
        }

        /// Waits until node `node` is Ready (`want`) or not; how long it took.
        pub async fn wait_ready(&self, node: &str, want: bool, within: Duration) -> Duration {
            let start = Instant::now();
            loop {
                let ready = match self.resources.try_get::<Node>(node).await {
                    Ok(Some(n)) => n.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.kind == "Ready" && c.status == ConditionStatus::True)
                    }),
                    _ => false,
                };
                if ready == want {
                    return start.elapsed();
                }
                assert!(
                    start.elapsed() < within,
                    "node {node} not {} within {within:?}\n{}",
                    if want { "Ready" } else { "NotReady" },
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
