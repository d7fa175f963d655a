//! One QEMU process: spawning it, watching it, and [`QemuVm`], its
//! [`VmHandle`].

use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hci_core::compute::{Console, ExitReason, VmHandle, VmState, VmStats};
use hci_core::{Error, Result};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio::sync::{broadcast, mpsc, watch};

use super::Plan;
use super::cmdline::{self, Accel};
use super::qmp::{Event, Qmp, QmpError};
use crate::console::ConsoleHub;

/// How long QEMU may take to open its QMP socket.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `kill` waits for the process to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Bytes of QEMU's own log quoted in errors.
const LOG_TAIL: usize = 2048;

impl From<QmpError> for Error {
    fn from(e: QmpError) -> Self {
        let message = e.to_string();
        Error::Backend {
            backend: "qemu",
            message,
            source: Some(Box::new(e)),
        }
    }
}

fn backend(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: "qemu",
        message: message.into(),
        source: None,
    }
}

/// The last [`LOG_TAIL`] bytes of QEMU's log, trimmed.
fn log_tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(LOG_TAIL);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// State shared by the handle and the task watching the process.
#[derive(Debug)]
struct Shared {
    name: String,
    state: watch::Sender<VmState>,
    /// Set when we asked for the kill (the exit is then `Killed`).
    killed: AtomicBool,
    /// The reason of the last QMP `SHUTDOWN` event.
    shutdown_reason: Mutex<Option<String>>,
    started_at: Mutex<Option<Instant>>,
}

impl Shared {
    fn state(&self) -> VmState {
        self.state.borrow().clone()
    }

    /// Moves to `to` when the current state is one of `from`.
    fn transition(&self, from: &[VmState], to: VmState) -> bool {
        self.state.send_if_modified(|s| {
            if from.contains(s) {
                *s = to.clone();
                true
            } else {
                false
            }
        })
    }
}

/// A VM running in its own QEMU process. Clones share it; dropping the last
/// clone kills QEMU.
#[derive(Debug, Clone)]
pub struct QemuVm {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    qmp: Qmp,
    console: Arc<ConsoleHub>,
    /// Dropping it (with the last handle) kills QEMU.
    kill: mpsc::UnboundedSender<()>,
    pid: Option<u32>,
    memory: u64,
    run_dir: PathBuf,
    accel: Accel,
    disks: Vec<String>,
    nic_taps: Vec<(String, String)>,
    /// Volumes this process owns for the VM (handed over in a migration).
    volumes: Vec<Arc<crate::handover::HandoverDisk>>,
    /// Turns true once QEMU is gone and those volumes are closed.
    closed: watch::Receiver<bool>,
}

/// Makes the child die with the thread that spawned it, and lets it
/// inherit `fds` (TAP queues) under the same numbers.
fn prepare_child(cmd: &mut tokio::process::Command, fds: Vec<i32>) {
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe calls (prctl, fcntl) on plain integers; it
    // touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Serves the plan's in-process disks over NBD, spawns QEMU paused and
/// connects to its QMP and console sockets.
pub(super) async fn launch(
    binary: PathBuf,
    plan: Plan,
    accel: Accel,
    extra: Vec<String>,
    engines: super::replicated::Engines,
) -> Result<QemuVm> {
    let (closed_tx, closed) = watch::channel(false);
    match launch_inner(binary, plan, accel, extra, engines.disks.clone(), closed).await {
        Ok((vm, watch)) => {
            tokio::spawn(async move {
                watch_process(watch).await;
                engines.close().await;
                let _ = closed_tx.send(true);
            });
            Ok(vm)
        }
        Err(e) => {
            engines.close().await;
            Err(e)
        }
    }
}

async fn launch_inner(
    binary: PathBuf,
    plan: Plan,
    accel: Accel,
    extra: Vec<String>,
    volumes: Vec<Arc<crate::handover::HandoverDisk>>,
    closed: watch::Receiver<bool>,
) -> Result<(QemuVm, Watch)> {
    let Plan {
        mut spec,
        exports,
        nbd_socket,
        fds,
        run_dir,
        memory,
        nic_taps,
    } = plan;
    spec.accel = accel;
    spec.extra = extra;
    let name = spec.name.clone();
    for s in [&spec.qmp_socket, &spec.console_socket] {
        let _ = std::fs::remove_file(s);
    }
    let nbd = if exports.is_empty() {
        None
    } else {
        let server = Arc::new(hci_storage::nbd::NbdServer::new());
        for (export, device, read_only) in exports {
            server.add_export(
                &export,
                device,
                hci_storage::nbd::ExportOptions {
                    read_only,
                    description: format!("disk {export} of VM {name}"),
                },
            )?;
        }
        Some(
            server
                .serve(hci_storage::nbd::Listen::Unix(nbd_socket))
                .await?,
        )
    };
    let args = cmdline::args(&spec);
    let log_path = run_dir.join("qemu.log");
    let log = File::create(&log_path)
        .map_err(|e| Error::io(format!("create {}", log_path.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| Error::io("duplicate the log descriptor", e))?;
    let mut cmd = tokio::process::Command::new(&binary);
    cmd.args(&args)
        .current_dir(&run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .kill_on_drop(true);
    prepare_child(
        &mut cmd,
        fds.iter()
            .map(|f| std::os::fd::AsRawFd::as_raw_fd(&**f))
            .collect(),
    );
    tracing::info!(vm = %name, binary = %binary.display(), args = ?args, "starting QEMU");
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("start {}", binary.display()), e))?;
    drop(fds);
    let pid = child.id();

    let fail = |child_status: Option<ExitStatus>, what: &str| {
        if let Some(n) = &nbd {
            n.shutdown();
        }
        let status = child_status.map(|s| format!(" ({s})")).unwrap_or_default();
        backend(format!(
            "QEMU could not start VM {name}{status}: {what}: {}",
            log_tail(&log_path)
        ))
    };
    // QMP: wait for the socket, unless QEMU gives up first.
    let started = Instant::now();
    let qmp = loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(fail(Some(status), "it exited"));
        }
        if let Ok(stream) = UnixStream::connect(&spec.qmp_socket).await {
            match Qmp::handshake(stream).await {
                Ok(q) => break q,
                Err(e) => {
                    let _ = child.start_kill();
                    let status = child.wait().await.ok();
                    return Err(fail(status, &e.to_string()));
                }
            }
        }
        if started.elapsed() > STARTUP_TIMEOUT {
            let _ = child.start_kill();
            let status = child.wait().await.ok();
            return Err(fail(status, "no QMP socket after 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let console_stream = match UnixStream::connect(&spec.console_socket).await {
        Ok(s) => s,
        Err(e) => {
            let _ = child.start_kill();
            let status = child.wait().await.ok();
            return Err(fail(status, &format!("console socket: {e}")));
        }
    };
    let console_log = File::create(run_dir.join("console.log")).ok();
    let hub = ConsoleHub::new(console_log);
    let (read, mut write) = console_stream.into_split();
    let reader_hub = hub.clone();
    let console_task = tokio::spawn(async move {
        let mut read = read;
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(n) = read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            reader_hub.push(&buf[..n]);
        }
    });
    let (input_tx, mut input_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    hub.set_input(Box::new(move |b| {
        let _ = input_tx.send(b.to_vec());
        b.len()
    }));
    tokio::spawn(async move {
        while let Some(b) = input_rx.recv().await {
            if write.write_all(&b).await.is_err() {
                break;
            }
        }
    });

    let (state, _) = watch::channel(VmState::Created);
    let shared = Arc::new(Shared {
        name: name.clone(),
        state,
        killed: AtomicBool::new(false),
        shutdown_reason: Mutex::new(None),
        started_at: Mutex::new(None),
    });
    let (kill_tx, kill_rx) = mpsc::unbounded_channel();
    let watch = Watch {
        child,
        kill: kill_rx,
        events: qmp.events(),
        shared: shared.clone(),
        console: hub.clone(),
        console_task,
        nbd,
        log: log_path,
    };
    let vm = QemuVm {
        inner: Arc::new(Inner {
            shared,
            qmp,
            console: hub,
            kill: kill_tx,
            pid,
            memory,
            run_dir,
            accel,
            disks: spec.disks.iter().map(|d| d.name.clone()).collect(),
            nic_taps,
            volumes,
            closed,
        }),
    };
    Ok((vm, watch))
}

struct Watch {
    child: Child,
    kill: mpsc::UnboundedReceiver<()>,
    events: broadcast::Receiver<Event>,
    shared: Arc<Shared>,
    console: Arc<ConsoleHub>,
    console_task: tokio::task::JoinHandle<()>,
    nbd: Option<hci_storage::nbd::ServerHandle>,
    log: PathBuf,
}

/// Follows QMP events and the process until it exits, then records why.
async fn watch_process(mut w: Watch) {
    let mut events_open = true;
    let status = loop {
        tokio::select! {
            status = w.child.wait() => break status,
            k = w.kill.recv() => {
                // A kill request, or every handle is gone: either way, kill.
                w.shared.killed.store(true, Ordering::SeqCst);
                let _ = w.child.start_kill();
                if k.is_none() {
                    break w.child.wait().await;
                }
            }
            ev = w.events.recv(), if events_open => match ev {
                Ok(ev) => on_event(&w.shared, &ev),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => events_open = false,
            },
        }
    };
    // Late events (the SHUTDOWN that preceded the exit) may still be queued.
    while let Ok(ev) = w.events.try_recv() {
        on_event(&w.shared, &ev);
    }
    // QEMU closed the console socket on exit: let the reader drain it.
    let _ = tokio::time::timeout(Duration::from_secs(2), &mut w.console_task).await;
    w.console_task.abort();
    w.console.close();
    if let Some(n) = &w.nbd {
        n.shutdown();
    }
    let reason = exit_reason(
        w.shared.killed.load(Ordering::SeqCst),
        w.shared
            .shutdown_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref(),
        status.as_ref().ok(),
        &w.log,
    );
    tracing::info!(vm = %w.shared.name, ?reason, "QEMU exited");
    w.shared.state.send_replace(VmState::Stopped(reason));
}

fn on_event(shared: &Shared, ev: &Event) {
    match ev.name.as_str() {
        "SHUTDOWN" => {
            let reason = ev
                .data
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string();
            *shared
                .shutdown_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(reason);
        }
        "GUEST_PANICKED" => {
            *shared
                .shutdown_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some("guest-panic".into());
        }
        "STOP" => {
            shared.transition(&[VmState::Running], VmState::Paused);
        }
        "RESUME" => {
            shared.transition(&[VmState::Paused, VmState::Created], VmState::Running);
        }
        _ => {}
    }
}

/// Why the VM ended: our kill, the guest's own shutdown/reset (QMP
/// `SHUTDOWN` reason), or QEMU dying on its own (with its log).
pub(crate) fn exit_reason(
    killed: bool,
    shutdown: Option<&str>,
    status: Option<&ExitStatus>,
    log: &Path,
) -> ExitReason {
    if killed {
        return ExitReason::Killed;
    }
    match shutdown {
        Some("guest-shutdown") => return ExitReason::Poweroff,
        Some("guest-reset" | "host-qmp-system-reset" | "subsystem-reset") => {
            return ExitReason::Reset;
        }
        Some("guest-panic") => return ExitReason::Crashed("the guest kernel panicked".into()),
        Some("host-signal" | "host-qmp-quit") => return ExitReason::Killed,
        Some(_) => return ExitReason::Poweroff,
        None => {}
    }
    let how = match status {
        Some(s) if s.success() => return ExitReason::Poweroff,
        Some(s) => match s.signal() {
            Some(sig) => format!("QEMU was killed by signal {sig}"),
            None => format!("QEMU exited with status {}", s.code().unwrap_or(-1)),
        },
        None => "QEMU's exit status could not be read".into(),
    };
    let tail = log_tail(log);
    ExitReason::VmmError(if tail.is_empty() {
        how
    } else {
        format!("{how}: {tail}")
    })
}

impl QemuVm {
    fn bad_state(&self, op: &str, state: &VmState) -> Error {
        Error::Busy {
            kind: "vm",
            name: self.inner.shared.name.clone(),
            reason: format!("cannot {op} a VM that is {state:?}"),
        }
    }

    /// The QEMU process id.
    pub fn pid(&self) -> Option<u32> {
        self.inner.pid
    }

    /// Waits (up to `timeout`) until QEMU is gone and the volumes this
    /// process opened for it are closed; true if they are. A process
    /// about to exit waits for this, so its replicas are marked clean.
    pub async fn volumes_closed(&self, timeout: Duration) -> bool {
        let mut closed = self.inner.closed.clone();
        tokio::time::timeout(timeout, closed.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The acceleration this VM runs with.
    pub fn accel(&self) -> Accel {
        self.inner.accel
    }

    /// The volumes this process owns for the VM (replicated volumes, as
    /// [`HandoverDisk`](crate::handover::HandoverDisk)s).
    pub fn volumes(&self) -> &[Arc<crate::handover::HandoverDisk>] {
        &self.inner.volumes
    }

    /// The VM's run directory (`qmp.sock`, `console.sock`, `nbd.sock`,
    /// `console.log`, `qemu.log`).
    pub fn run_dir(&self) -> &Path {
        &self.inner.run_dir
    }

    /// The serial console hub (history, waiting for output).
    pub fn console_hub(&self) -> &Arc<ConsoleHub> {
        &self.inner.console
    }

    /// The QMP connection, for commands this handle does not wrap.
    pub fn qmp(&self) -> &Qmp {
        &self.inner.qmp
    }

    /// Subscribes to state changes.
    pub fn subscribe(&self) -> watch::Receiver<VmState> {
        self.inner.shared.state.subscribe()
    }

    async fn command(&self, op: &str, command: &str, args: Option<Value>) -> Result<Value> {
        self.inner.qmp.execute(command, args).await.map_err(|e| {
            let state = self.inner.shared.state();
            if matches!(state, VmState::Stopped(_)) {
                self.bad_state(op, &state)
            } else {
                e.into()
            }
        })
    }
}

#[async_trait]
impl VmHandle for QemuVm {
    fn name(&self) -> &str {
        &self.inner.shared.name
    }

    async fn start(&self) -> Result<()> {
        let state = self.inner.shared.state();
        if state != VmState::Created {
            return Err(self.bad_state("start", &state));
        }
        self.command("start", "cont", None).await?;
        *self
            .inner
            .shared
            .started_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.inner
            .shared
            .transition(&[VmState::Created, VmState::Paused], VmState::Running);
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        let state = self.inner.shared.state();
        match state {
            VmState::Paused => return Ok(()),
            VmState::Running => {}
            other => return Err(self.bad_state("pause", &other)),
        }
        self.command("pause", "stop", None).await?;
        self.inner
            .shared
            .transition(&[VmState::Running], VmState::Paused);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        let state = self.inner.shared.state();
        match state {
            VmState::Running => return Ok(()),
            VmState::Paused => {}
            other => return Err(self.bad_state("resume", &other)),
        }
        self.command("resume", "cont", None).await?;
        self.inner
            .shared
            .transition(&[VmState::Paused], VmState::Running);
        Ok(())
    }

    async fn shutdown(&self, timeout: Duration) -> Result<ExitReason> {
        if self.inner.shared.state() == VmState::Running
            && let Err(e) = self.inner.qmp.execute("system_powerdown", None).await
        {
            tracing::info!(vm = %self.name(), error = %e, "cannot ask the guest to power off");
        }
        if let Ok(reason) = tokio::time::timeout(timeout, self.wait()).await {
            return reason;
        }
        self.kill().await?;
        self.wait().await
    }

    async fn kill(&self) -> Result<()> {
        if matches!(self.inner.shared.state(), VmState::Stopped(_)) {
            return Ok(());
        }
        let _ = self.inner.kill.send(());
        match tokio::time::timeout(KILL_WAIT, self.wait()).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(backend(format!(
                "QEMU of VM {} did not exit within {KILL_WAIT:?} of SIGKILL",
                self.name()
            ))),
        }
    }

    async fn state(&self) -> Result<VmState> {
        Ok(self.inner.shared.state())
    }

    async fn wait(&self) -> Result<ExitReason> {
        let mut rx = self.inner.shared.state.subscribe();
        let state = rx
            .wait_for(|s| matches!(s, VmState::Stopped(_)))
            .await
            .map_err(|_| backend("the VM's watcher is gone"))?;
        match &*state {
            VmState::Stopped(r) => Ok(r.clone()),
            _ => Err(backend("unexpected VM state")),
        }
    }

    async fn console(&self) -> Result<Console> {
        let (output, input) = self.inner.console.subscribe();
        Ok(Console {
            output: Box::pin(output),
            input: Box::pin(input),
        })
    }

    fn as_migratable(&self) -> Option<&dyn hci_core::compute::Migratable> {
        Some(self)
    }

    async fn stats(&self) -> Result<VmStats> {
        let uptime = self
            .inner
            .shared
            .started_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
            .unwrap_or_default();
        let (cpu_time, rss_bytes) = self.inner.pid.map(proc_usage).unwrap_or_default();
        let mut disks = Vec::new();
        if !matches!(self.inner.shared.state(), VmState::Stopped(_))
            && let Ok(Value::Array(nodes)) = self
                .inner
                .qmp
                .execute("query-blockstats", Some(json!({ "query-nodes": true })))
                .await
        {
            for name in &self.inner.disks {
                let node = cmdline::qemu_id("drive", name);
                if let Some(s) = nodes
                    .iter()
                    .find(|n| n["node-name"] == node.as_str())
                    .map(|n| &n["stats"])
                {
                    disks.push((
                        name.clone(),
                        s["rd_bytes"].as_u64().unwrap_or(0),
                        s["wr_bytes"].as_u64().unwrap_or(0),
                    ));
                }
            }
        }
        // The TAP's transmit side is what the guest received.
        let nics = self
            .inner
            .nic_taps
            .iter()
            .filter_map(|(nic, tap)| {
                let stat = |f: &str| -> Option<u64> {
                    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{f}"))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()
                };
                Some((nic.clone(), stat("tx_bytes")?, stat("rx_bytes")?))
            })
            .collect();
        Ok(VmStats {
            uptime,
            cpu_time,
            rss_bytes,
            memory_bytes: self.inner.memory,
            disks,
            nics,
        })
    }
}

/// CPU time (user + system, all threads) and resident memory of process `pid`.
fn proc_usage(pid: u32) -> (Duration, u64) {
    // Linux reports times in USER_HZ, which is 100 on every architecture we run on.
    const TICKS_PER_SEC: u64 = 100;
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(") ")?.1.to_string();
            let f: Vec<&str> = after.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some(Duration::from_millis(
                (utime + stime) * 1000 / TICKS_PER_SEC,
            ))
        })
        .unwrap_or_default();
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    (cpu, rss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons() {
        let log = Path::new("/nonexistent/qemu.log");
        let ok = ExitStatus::from_raw(0);
        let segv = ExitStatus::from_raw(11);
        let code1 = ExitStatus::from_raw(1 << 8);
        assert_eq!(
            exit_reason(true, Some("guest-reset"), Some(&ok), log),
            ExitReason::Killed
        );
        assert_eq!(
            exit_reason(false, Some("guest-reset"), Some(&ok), log),
            ExitReason::Reset
        );
        assert_eq!(
            exit_reason(false, Some("guest-shutdown"), Some(&ok), log),
            ExitReason::Poweroff
        );
        assert_eq!(
            exit_reason(false, Some("host-signal"), Some(&ok), log),
            ExitReason::Killed
        );
        assert!(matches!(
            exit_reason(false, Some("guest-panic"), Some(&ok), log),
            ExitReason::Crashed(_)
        ));
        assert_eq!(
            exit_reason(false, None, Some(&segv), log),
            ExitReason::VmmError("QEMU was killed by signal 11".into())
        );
        assert_eq!(
            exit_reason(false, None, Some(&code1), log),
            ExitReason::VmmError("QEMU exited with status 1".into())
        );
    }

    #[test]
    fn own_usage_is_readable() {
        let (_, rss) = proc_usage(std::process::id());
        assert!(rss > 0);
    }
}
