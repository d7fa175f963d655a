//! The control socket of a VMM process (`hci-vmm --api-socket PATH`), its
//! client, and [`RemoteVm`], a [`VmHandle`] over it.
//!
//! # Protocol
//!
//! A Unix stream socket (mode 0600). The client writes one JSON request per
//! line and reads one JSON response line per request:
//!
//! ```text
//! → {"op":"pause"}
//! ← {"ok":true}
//! → {"op":"stats"}
//! ← {"ok":true,"stats":{"uptime_secs":1.5,"cpu_secs":0.2,"rss_bytes":3145728,…}}
//! → {"op":"shutdown","timeout_ms":30000}
//! ← {"ok":true,"exit":{"reason":"killed"}}
//! ← {"ok":false,"error":"…"}                      (any failure)
//! ```
//!
//! Operations: `info` (name, pid, state), `start`, `pause`, `resume`,
//! `shutdown` (`timeout_ms`), `kill`, `state`, `stats`, `wait` (answers when
//! the VM stops), and `console`: after its `{"ok":true}` line the connection
//! is the serial console — bytes read are guest output (recent history
//! first), bytes written go to the guest's serial input. Requests longer than
//! 64 KiB or not JSON end the connection with an error line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hci_core::compute::{
    Console, ExitReason, Migratable, MigrationOptions, MigrationProgress, Snapshottable, VmHandle,
    VmState, VmStats,
};
use hci_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// Migrations whose final answer is not written yet (the process must not
/// exit before: the migrated VM stops the moment it runs on the target).
static ANSWERING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Waits (up to `limit`) until every migration answer has been written.
pub async fn wait_answers(limit: Duration) {
    let start = std::time::Instant::now();
    while ANSWERING.load(std::sync::atomic::Ordering::SeqCst) > 0 && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Answering;

impl Answering {
    fn new() -> Self {
        ANSWERING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Answering
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        ANSWERING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 << 10;

/// A request to the VMM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Name, pid and state.
    Info,
    /// Boot the guest (when started with `--wait-start`).
    Start,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Ask the guest to stop; kill it after the timeout.
    Shutdown {
        /// Milliseconds to wait before killing.
        timeout_ms: u64,
    },
    /// Stop the VM at once.
    Kill,
    /// The VM's state.
    State,
    /// Resource usage.
    Stats,
    /// Answer when the VM stops.
    Wait,
    /// Become the serial console.
    Console,
    /// Save the paused VM to `path` (see [`Snapshottable`]).
    Snapshot {
        /// Snapshot file to write.
        path: PathBuf,
    },
    /// Live-migrate to the VMM listening at `target`; progress lines
    /// (`"done":false`) precede the final answer. Closing the connection
    /// cancels the migration.
    Migrate {
        /// `host:port` of the receiving VMM (`hci-vmm --incoming`).
        target: String,
        /// Largest acceptable pause.
        max_downtime_ms: u64,
        /// Give up after this long.
        timeout_ms: u64,
        /// Token the target checks.
        token: String,
    },
}

/// Migration progress on the wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WireProgress {
    /// Pass number.
    pub iteration: u32,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Dirty bytes left.
    pub bytes_remaining: u64,
    /// Dirty rate, bytes/s.
    pub dirty_rate: f64,
    /// Downtime once done, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_us: Option<u64>,
}

impl From<&MigrationProgress> for WireProgress {
    fn from(p: &MigrationProgress) -> Self {
        WireProgress {
            iteration: p.iteration,
            bytes_sent: p.bytes_sent,
            bytes_remaining: p.bytes_remaining,
            dirty_rate: p.dirty_rate,
            downtime_us: p
                .downtime
                .map(|d| d.as_micros().min(u128::from(u64::MAX)) as u64),
        }
    }
}

impl From<WireProgress> for MigrationProgress {
    fn from(p: WireProgress) -> Self {
        MigrationProgress {
            iteration: p.iteration,
            bytes_sent: p.bytes_sent,
            bytes_remaining: p.bytes_remaining,
            dirty_rate: p.dirty_rate,
            downtime: p.downtime_us.map(Duration::from_micros),
        }
    }
}

/// Why a VM stopped, on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum WireExit {
    /// Powered off.
    Poweroff,
    /// Reset.
    Reset,
    /// Killed.
    Killed,
    /// Crashed.
    Crashed(String),
    /// The VMM failed.
    VmmError(String),
}

impl From<&ExitReason> for WireExit {
    fn from(r: &ExitReason) -> Self {
        match r {
            ExitReason::Poweroff => WireExit::Poweroff,
            ExitReason::Reset => WireExit::Reset,
            ExitReason::Killed => WireExit::Killed,
            ExitReason::Crashed(s) => WireExit::Crashed(s.clone()),
            ExitReason::VmmError(s) => WireExit::VmmError(s.clone()),
        }
    }
}

impl From<WireExit> for ExitReason {
    fn from(r: WireExit) -> Self {
        match r {
            WireExit::Poweroff => ExitReason::Poweroff,
            WireExit::Reset => ExitReason::Reset,
            WireExit::Killed => ExitReason::Killed,
            WireExit::Crashed(s) => ExitReason::Crashed(s),
            WireExit::VmmError(s) => ExitReason::VmmError(s),
        }
    }
}

/// A VM state on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum WireState {
    /// Not booted yet.
    Created,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Stopped.
    Stopped {
        /// Why.
        exit: WireExit,
    },
}

impl From<&VmState> for WireState {
    fn from(s: &VmState) -> Self {
        match s {
            VmState::Created => WireState::Created,
            VmState::Running => WireState::Running,
            VmState::Paused => WireState::Paused,
            VmState::Stopped(r) => WireState::Stopped { exit: r.into() },
        }
    }
}

impl From<WireState> for VmState {
    fn from(s: WireState) -> Self {
        match s {
            WireState::Created => VmState::Created,
            WireState::Running => VmState::Running,
            WireState::Paused => VmState::Paused,
            WireState::Stopped { exit } => VmState::Stopped(exit.into()),
        }
    }
}

/// Resource usage on the wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WireStats {
    /// Seconds since boot.
    pub uptime_secs: f64,
    /// Guest CPU seconds.
    pub cpu_secs: f64,
    /// VMM resident memory.
    pub rss_bytes: u64,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// (disk, read bytes, written bytes).
    pub disks: Vec<(String, u64, u64)>,
    /// (NIC, received bytes, sent bytes).
    pub nics: Vec<(String, u64, u64)>,
}

/// A response line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// VM name (`info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// VMM process id (`info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// State (`info`, `state`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<WireState>,
    /// Exit (`wait`, `shutdown`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<WireExit>,
    /// Usage (`stats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<WireStats>,
    /// Migration progress (`migrate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<WireProgress>,
    /// `false` on an intermediate progress line of `migrate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<bool>,
}

impl Response {
    fn ok() -> Self {
        Response {
            ok: true,
            ..Response::default()
        }
    }

    fn error(e: impl ToString) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Response::default()
        }
    }
}

/// Serves the API of `vm` on `listener` until the task is dropped.
pub async fn serve(vm: Arc<dyn VmHandle>, listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let vm = vm.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(vm, stream).await {
                tracing::debug!(error = %e, "API connection ended");
            }
        });
    }
}

/// Binds the API socket at `path` (mode 0600), replacing a stale one.
pub fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("bind the API socket {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("restrict {}", path.display()), e))?;
    Ok(l)
}

async fn reply(w: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    w.write_all(&line).await
}

fn stats_to_wire(s: VmStats) -> WireStats {
    WireStats {
        uptime_secs: s.uptime.as_secs_f64(),
        cpu_secs: s.cpu_time.as_secs_f64(),
        rss_bytes: s.rss_bytes,
        memory_bytes: s.memory_bytes,
        disks: s.disks,
        nics: s.nics,
    }
}

async fn connection(vm: Arc<dyn VmHandle>, stream: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut r)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_REQUEST {
            return reply(&mut w, &Response::error("request too long")).await;
        }
        let req: Request = match serde_json::from_slice(&line) {
            Ok(req) => req,
            Err(e) => {
                return reply(&mut w, &Response::error(format!("bad request: {e}"))).await;
            }
        };
        let resp = match req {
            Request::Info => match vm.state().await {
                Ok(s) => Response {
                    name: Some(vm.name().to_string()),
                    pid: Some(std::process::id()),
                    state: Some((&s).into()),
                    ..Response::ok()
                },
                Err(e) => Response::error(e),
            },
            Request::Start => done(vm.start().await),
            Request::Pause => done(vm.pause().await),
            Request::Resume => done(vm.resume().await),
            Request::Kill => done(vm.kill().await),
            Request::State => match vm.state().await {
                Ok(s) => Response {
                    state: Some((&s).into()),
                    ..Response::ok()
                },
                Err(e) => Response::error(e),
            },
            Request::Stats => match vm.stats().await {
                Ok(s) => Response {
                    stats: Some(stats_to_wire(s)),
                    ..Response::ok()
                },
                Err(e) => Response::error(e),
            },
            Request::Shutdown { timeout_ms } => {
                exited(vm.shutdown(Duration::from_millis(timeout_ms)).await)
            }
            Request::Wait => exited(vm.wait().await),
            Request::Snapshot { path } => match vm.as_snapshottable() {
                Some(s) => done(s.save(&path).await),
                None => Response::error("this VM cannot be saved"),
            },
            Request::Migrate {
                target,
                max_downtime_ms,
                timeout_ms,
                token,
            } => {
                let Some(m) = vm.as_migratable() else {
                    return reply(&mut w, &Response::error("this VM cannot migrate")).await;
                };
                if target.parse::<std::net::SocketAddr>().is_err() {
                    let e = format!("migration target {target:?}: give an IP address and port");
                    reply(&mut w, &Response::error(e)).await?;
                    continue;
                }
                let cancel = hci_core::CancelToken::new();
                let options = MigrationOptions {
                    max_downtime: Duration::from_millis(max_downtime_ms),
                    timeout: Duration::from_millis(timeout_ms),
                    token,
                    cancel: cancel.clone(),
                };
                let (tx, mut rx) = watch::channel(MigrationProgress::default());
                let answering = Answering::new();
                let migration = m.migrate(&target, options, tx);
                tokio::pin!(migration);
                let mut probe = [0u8; 1];
                let mut hung_up = false;
                let result = loop {
                    tokio::select! {
                        r = &mut migration => break r,
                        changed = rx.changed() => {
                            if changed.is_ok() {
                                let line = Response {
                                    progress: Some((&*rx.borrow_and_update()).into()),
                                    done: Some(false),
                                    ..Response::ok()
                                };
                                // A client that went away entirely drops the
                                // migration (cancelled unless switching over).
                                reply(&mut w, &line).await?;
                            }
                        }
                        n = r.read(&mut probe), if !hung_up => {
                            if matches!(n, Ok(0) | Err(_)) {
                                // The client closed its side: that is a cancel.
                                // It takes effect unless the switch-over has
                                // begun; the answer says which.
                                hung_up = true;
                                cancel.cancel();
                            }
                        }
                    }
                };
                let resp = match result {
                    Ok(p) => Response {
                        progress: Some((&p).into()),
                        done: Some(true),
                        ..Response::ok()
                    },
                    Err(e) => Response::error(e),
                };
                reply(&mut w, &resp).await?;
                drop(answering);
                continue;
            }
            Request::Console => {
                let console = match vm.console().await {
                    Ok(c) => c,
                    Err(e) => return reply(&mut w, &Response::error(e)).await,
                };
                reply(&mut w, &Response::ok()).await?;
                // The output ends with the VM: a VMM about to exit waits
                // (`wait_answers`) until its last bytes reached the client.
                let _answering = Answering::new();
                let Console {
                    mut output,
                    mut input,
                } = console;
                // A client that stops typing (closes its write side) still
                // follows the output: only the output ends the session.
                let to_guest = async {
                    let _ = tokio::io::copy(&mut r, &mut input).await;
                    std::future::pending::<()>().await;
                };
                let to_client = async {
                    let _ = tokio::io::copy(&mut output, &mut w).await;
                };
                tokio::select! {
                    () = to_guest => {}
                    () = to_client => {}
                }
                return Ok(());
            }
        };
        reply(&mut w, &resp).await?;
    }
}

fn done(r: Result<()>) -> Response {
    match r {
        Ok(()) => Response::ok(),
        Err(e) => Response::error(e),
    }
}

fn exited(r: Result<ExitReason>) -> Response {
    match r {
        Ok(reason) => Response {
            exit: Some((&reason).into()),
            ..Response::ok()
        },
        Err(e) => Response::error(e),
    }
}

/// A client of one VMM's API socket. Every call opens its own connection,
/// so calls never wait on each other (a `wait` can block while a `pause`
/// goes through).
#[derive(Debug, Clone)]
pub struct VmmClient {
    path: PathBuf,
}

fn unavailable(path: &Path, why: impl ToString) -> Error {
    Error::Unavailable {
        what: format!("the VMM at {} ({})", path.display(), why.to_string()),
        source: None,
    }
}

impl VmmClient {
    /// A client of the socket at `path` (nothing is checked yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        VmmClient { path: path.into() }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn open(
        &self,
        req: &Request,
    ) -> Result<(
        BufReader<tokio::net::unix::OwnedReadHalf>,
        tokio::net::unix::OwnedWriteHalf,
        Response,
    )> {
        let stream = UnixStream::connect(&self.path)
            .await
            .map_err(|e| unavailable(&self.path, e))?;
        let (r, mut w) = stream.into_split();
        let mut line = serde_json::to_vec(req).map_err(|e| unavailable(&self.path, e))?;
        line.push(b'\n');
        w.write_all(&line)
            .await
            .map_err(|e| unavailable(&self.path, e))?;
        let mut r = BufReader::new(r);
        let mut answer = Vec::new();
        let n = (&mut r)
            .take(MAX_REQUEST as u64 * 16)
            .read_until(b'\n', &mut answer)
            .await
            .map_err(|e| unavailable(&self.path, e))?;
        if n == 0 {
            return Err(unavailable(&self.path, "it closed the connection"));
        }
        let resp: Response = serde_json::from_slice(&answer)
            .map_err(|e| unavailable(&self.path, format!("unreadable answer: {e}")))?;
        if !resp.ok {
            return Err(Error::Backend {
                backend: "hci-vmm",
                message: resp.error.unwrap_or_else(|| "failed".into()),
                source: None,
            });
        }
        Ok((r, w, resp))
    }

    /// Sends one request and returns its (successful) answer.
    pub async fn call(&self, req: &Request) -> Result<Response> {
        self.open(req).await.map(|(_, _, resp)| resp)
    }

    /// Attaches to the serial console.
    pub async fn console(&self) -> Result<Console> {
        let (r, w, _) = self.open(&Request::Console).await?;
        Ok(Console {
            output: Box::pin(r) as std::pin::Pin<Box<dyn AsyncRead + Send>>,
            input: Box::pin(w),
        })
    }
}

/// The exit record a VMM process leaves next to its socket.
pub fn read_exit_file(path: &Path) -> Option<ExitReason> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice::<WireExit>(&bytes)
        .ok()
        .map(Into::into)
}

/// Writes the exit record (atomically: temp file + rename).
pub fn write_exit_file(path: &Path, reason: &ExitReason) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec(&WireExit::from(reason))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// A VM running in a VMM process, driven over its API socket.
#[derive(Debug, Clone)]
pub struct RemoteVm {
    name: String,
    client: VmmClient,
    exit_file: PathBuf,
}

impl RemoteVm {
    /// The VM `name` behind the API socket `socket`; `exit_file` is where
    /// the process records how it ended.
    pub fn new(
        name: impl Into<String>,
        socket: impl Into<PathBuf>,
        exit_file: impl Into<PathBuf>,
    ) -> Self {
        RemoteVm {
            name: name.into(),
            client: VmmClient::new(socket),
            exit_file: exit_file.into(),
        }
    }

    /// The API client.
    pub fn client(&self) -> &VmmClient {
        &self.client
    }

    /// The process's recorded exit, or a VMM error if it left none.
    fn gone(&self) -> ExitReason {
        read_exit_file(&self.exit_file).unwrap_or_else(|| {
            ExitReason::VmmError("the VMM process ended without recording why".into())
        })
    }

    async fn simple(&self, req: Request) -> Result<()> {
        self.client.call(&req).await.map(|_| ())
    }
}

#[async_trait]
impl VmHandle for RemoteVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn as_snapshottable(&self) -> Option<&dyn Snapshottable> {
        Some(self)
    }

    fn as_migratable(&self) -> Option<&dyn Migratable> {
        Some(self)
    }

    async fn start(&self) -> Result<()> {
        self.simple(Request::Start).await
    }

    async fn pause(&self) -> Result<()> {
        self.simple(Request::Pause).await
    }

    async fn resume(&self) -> Result<()> {
        self.simple(Request::Resume).await
    }

    async fn shutdown(&self, timeout: Duration) -> Result<ExitReason> {
        let req = Request::Shutdown {
            timeout_ms: timeout.as_millis().min(u128::from(u64::MAX)) as u64,
        };
        match self.client.call(&req).await {
            Ok(resp) => Ok(resp.exit.map_or_else(|| self.gone(), Into::into)),
            Err(Error::Unavailable { .. }) => Ok(self.gone()),
            Err(e) => Err(e),
        }
    }

    async fn kill(&self) -> Result<()> {
        match self.simple(Request::Kill).await {
            // Already gone is as good as killed.
            Err(Error::Unavailable { .. }) => Ok(()),
            other => other,
        }
    }

    async fn state(&self) -> Result<VmState> {
        match self.client.call(&Request::State).await {
            Ok(resp) => Ok(resp
                .state
                .map_or_else(|| VmState::Stopped(self.gone()), Into::into)),
            Err(Error::Unavailable { .. }) => Ok(VmState::Stopped(self.gone())),
            Err(e) => Err(e),
        }
    }

    async fn wait(&self) -> Result<ExitReason> {
        match self.client.call(&Request::Wait).await {
            // A VMM that stops its guest for a reason of its own (fenced)
            // records it before the kill: that is the real exit.
            Ok(resp) => Ok(match resp.exit.map(ExitReason::from) {
                Some(ExitReason::Killed) => {
                    read_exit_file(&self.exit_file).unwrap_or(ExitReason::Killed)
                }
                Some(r) => r,
                None => self.gone(),
            }),
            // The process went away (killed, or it exited while we waited):
            // its exit file says how, if it could write one.
            Err(Error::Unavailable { .. }) => {
                // Give a process that is exiting a moment to write it.
                for _ in 0..20 {
                    if let Some(r) = read_exit_file(&self.exit_file) {
                        return Ok(r);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(self.gone())
            }
            Err(e) => Err(e),
        }
    }

    async fn console(&self) -> Result<Console> {
        self.client.console().await
    }

    async fn stats(&self) -> Result<VmStats> {
        let resp = self.client.call(&Request::Stats).await?;
        let s = resp.stats.unwrap_or_default();
        Ok(VmStats {
            uptime: Duration::from_secs_f64(s.uptime_secs.max(0.0)),
            cpu_time: Duration::from_secs_f64(s.cpu_secs.max(0.0)),
            rss_bytes: s.rss_bytes,
            memory_bytes: s.memory_bytes,
            disks: s.disks,
            nics: s.nics,
        })
    }
}

impl RemoteVm {
    /// Migrates the VM; see [`Migratable::migrate`].
    async fn migrate_remote(
        &self,
        target: &str,
        options: MigrationOptions,
        progress: watch::Sender<MigrationProgress>,
    ) -> Result<MigrationProgress> {
        // Resolve names here: the VMM process runs under seccomp and only
        // connects to addresses (a resolver would open sockets it may not).
        let resolved = tokio::net::lookup_host(target)
            .await
            .map_err(|e| Error::invalid("migration target", format!("{target}: {e}")))?
            .next()
            .ok_or_else(|| {
                Error::invalid("migration target", format!("{target} has no address"))
            })?;
        let req = Request::Migrate {
            target: resolved.to_string(),
            max_downtime_ms: options.max_downtime.as_millis().min(u128::from(u64::MAX)) as u64,
            timeout_ms: options.timeout.as_millis().min(u128::from(u64::MAX)) as u64,
            token: options.token,
        };
        // Closing our side cancels the migration unless the switch-over has
        // begun; the VMM answers either way. Dropping this future closes
        // the connection entirely, which also cancels.
        let (mut r, w, mut resp) = self.client.open(&req).await?;
        let cancel = options.cancel.clone();
        let _closer = AbortOnDrop(tokio::spawn(async move {
            cancel.cancelled().await;
            drop(w);
        }));
        loop {
            if let Some(p) = resp.progress.take() {
                let p: MigrationProgress = p.into();
                progress.send_replace(p.clone());
                if resp.done != Some(false) {
                    return Ok(p);
                }
            } else if resp.done != Some(false) {
                return Err(Error::Backend {
                    backend: "hci-vmm",
                    message: "the migration ended without a result".into(),
                    source: None,
                });
            }
            let mut line = Vec::new();
            let n = (&mut r)
                .take(MAX_REQUEST as u64)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|e| unavailable(self.client.path(), e))?;
            if n == 0 {
                return Err(unavailable(
                    self.client.path(),
                    "it closed the connection during the migration",
                ));
            }
            resp = serde_json::from_slice(&line)
                .map_err(|e| unavailable(self.client.path(), format!("unreadable answer: {e}")))?;
            if !resp.ok {
                return Err(Error::Backend {
                    backend: "hci-vmm",
                    message: resp.error.unwrap_or_else(|| "migration failed".into()),
                    source: None,
                });
            }
        }
    }
}

#[async_trait]
impl Snapshottable for RemoteVm {
    async fn save(&self, path: &Path) -> Result<()> {
        self.simple(Request::Snapshot {
            path: path.to_path_buf(),
        })
        .await
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[async_trait]
impl Migratable for RemoteVm {
    async fn migrate(
        &self,
        target: &str,
        options: MigrationOptions,
        progress: watch::Sender<MigrationProgress>,
    ) -> Result<MigrationProgress> {
        self.migrate_remote(target, options, progress).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip() {
        for req in [
            Request::Info,
            Request::Shutdown { timeout_ms: 5 },
            Request::Console,
        ] {
            let json = serde_json::to_string(&req).expect("json");
            assert_eq!(serde_json::from_str::<Request>(&json).expect("parse"), req);
        }
        assert_eq!(
            serde_json::to_string(&Request::Shutdown { timeout_ms: 5 }).expect("json"),
            r#"{"op":"shutdown","timeout_ms":5}"#
        );
        let r = Response {
            exit: Some(WireExit::Crashed("triple fault".into())),
            state: Some(WireState::Stopped {
                exit: WireExit::Reset,
            }),
            ..Response::ok()
        };
        let json = serde_json::to_string(&r).expect("json");
        assert_eq!(serde_json::from_str::<Response>(&json).expect("parse"), r);
    }

    proptest::proptest! {
        #[test]
        fn garbage_requests_are_errors_not_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = serde_json::from_slice::<Request>(&bytes);
            let _ = serde_json::from_slice::<Response>(&bytes);
        }
    }
}
