//! Live migration between QEMU processes: QMP `migrate` on the source to a
//! QEMU started with `-incoming tcp:HOST:PORT` on the target.
//!
//! The target ([`QemuHypervisor::prepare_incoming`]) is a normal VM of the
//! same shape whose QEMU waits for the stream; once the stream is in,
//! [`QemuVm::finish_incoming`] resumes it. The source
//! ([`Migratable::migrate`]) sets the downtime limit, turns on
//! auto-converge (guests that dirty memory faster than the link are
//! throttled until the rest fits the limit; after 30 passes the switch-over
//! is forced, as in the kvm backend), follows `query-migrate` for
//! progress and, once QEMU reports `completed`, ends its own QEMU (the
//! guest now runs on the target; the source VM stops as `Killed`). On
//! failure or timeout the source keeps running. QEMU pauses before the
//! switch-over (`pause-before-switchover`) and goes on only on
//! `migrate-continue`: a cancel seen before that resumes the source, one
//! after it is ignored, so the result always says where the guest runs.
//!
//! Replicated volumes move with the guest (see [`crate::handover`]): the
//! target prepares their engines before its QEMU starts (the NBD exports
//! exist, QEMU connects; requests would wait), and takes the volumes over
//! when its QEMU reports the incoming migration `completed` — the source
//! QEMU has then stopped the guest and drained its disks, so the source's
//! engine is idle; the target's activation fences it. The source releases
//! its engines when its QEMU reports `completed`. Both sides react to QMP
//! `MIGRATION` events (polling `query-migrate` as a fallback). Local
//! volumes are not handed over by this backend (refused at the target).
//!
//! Authentication: with a non-empty token (`MigrationOptions::token` on the
//! source, the `token` of [`ReceiveMigration::receive`] or
//! [`QemuHypervisor::prepare_incoming_with_token`] on the target) the
//! stream runs over TLS with the token as pre-shared key (QEMU's
//! `tls-creds-psk`): encrypted, and a peer without the token fails the
//! handshake. An empty token leaves the stream in the clear.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use hci_core::compute::{
    Migratable, MigrationOptions, MigrationProgress, ReceiveMigration, VmConfig, VmHandle, VmState,
};
use hci_core::{Error, Result};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{QemuHypervisor, QemuVm};

const POLL: Duration = Duration::from_millis(50);

/// Waits for a QMP `MIGRATION` event, or `POLL` at most.
async fn migration_event(events: &mut tokio::sync::broadcast::Receiver<super::qmp::Event>) {
    let _ = tokio::time::timeout(POLL, async {
        loop {
            match events.recv().await {
                Ok(e) if e.name == "MIGRATION" => return,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    // QEMU is gone: the state check says so next.
                    tokio::time::sleep(POLL).await;
                    return;
                }
            }
        }
    })
    .await;
}

/// Runs `f` on every volume at once; the first error wins.
async fn on_volumes<F, Fut>(
    volumes: &[std::sync::Arc<crate::handover::HandoverDisk>],
    f: F,
) -> Result<()>
where
    F: Fn(std::sync::Arc<crate::handover::HandoverDisk>) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let tasks: Vec<_> = volumes.iter().map(|d| tokio::spawn(f(d.clone()))).collect();
    let mut first = None;
    for t in tasks {
        let r = t
            .await
            .map_err(|e| Error::io("hand a volume over", std::io::Error::other(e)))
            .and_then(|r| r);
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

fn failed(message: String) -> Error {
    Error::Backend {
        backend: "qemu",
        message,
        source: None,
    }
}

/// Progress from a `query-migrate` answer.
fn progress_of(q: &Value) -> MigrationProgress {
    let ram = &q["ram"];
    let page = ram["page-size"].as_u64().unwrap_or(4096);
    MigrationProgress {
        iteration: u32::try_from(ram["dirty-sync-count"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX),
        bytes_sent: ram["transferred"].as_u64().unwrap_or(0),
        bytes_remaining: ram["remaining"].as_u64().unwrap_or(0),
        dirty_rate: ram["dirty-pages-rate"].as_f64().unwrap_or(0.0) * page as f64,
        downtime: q["downtime"].as_u64().map(Duration::from_millis),
    }
}

/// Id of the TLS credentials object of a migration.
const TLS_ID: &str = "hci-migration-tls";
/// PSK identity both sides use.
const TLS_IDENTITY: &str = "hci";

/// Creates QEMU's TLS-PSK credentials for a migration authenticated by
/// `token` (the pre-shared key is the token's bytes): a `keys.psk` in
/// `run_dir/migration-tls` (0600), a `tls-creds-psk` object (`server` on the
/// target, `client` on the source) and the migration's `tls-creds`. The
/// stream is then encrypted and a peer without the token fails the TLS
/// handshake. Nothing for an empty token.
async fn set_up_tls(vm: &QemuVm, token: &str, server: bool) -> Result<()> {
    if token.is_empty() {
        return Ok(());
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = vm.run_dir().join("migration-tls");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let hex: String = token.bytes().map(|b| format!("{b:02x}")).collect();
    let file = dir.join("keys.psk");
    let _ = std::fs::remove_file(&file);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .and_then(|mut f| writeln!(f, "{TLS_IDENTITY}:{hex}"))
        .map_err(|e| Error::io(format!("write {}", file.display()), e))?;
    let mut object = json!({
        "qom-type": "tls-creds-psk",
        "id": TLS_ID,
        "endpoint": if server { "server" } else { "client" },
        "dir": dir.display().to_string(),
    });
    if !server {
        object["username"] = json!(TLS_IDENTITY);
    }
    // A retried migration finds the object from the first attempt.
    let _ = vm
        .qmp()
        .execute("object-del", Some(json!({ "id": TLS_ID })))
        .await;
    vm.qmp().execute("object-add", Some(object)).await?;
    vm.qmp()
        .execute(
            "migrate-set-parameters",
            Some(json!({ "tls-creds": TLS_ID })),
        )
        .await?;
    Ok(())
}

impl QemuHypervisor {
    /// Starts a VM shaped like `config` whose QEMU waits for a migration
    /// stream on `listen` (`HOST:PORT`). When this returns, QEMU listens.
    /// The stream is not authenticated; see
    /// [`QemuHypervisor::prepare_incoming_with_token`].
    pub async fn prepare_incoming(&self, config: VmConfig, listen: &str) -> Result<QemuVm> {
        self.prepare_incoming_with_token(config, listen, "").await
    }

    /// [`QemuHypervisor::prepare_incoming`] for a stream authenticated and
    /// encrypted with TLS-PSK, the key being `token` (the source must
    /// migrate with the same token; empty: no TLS).
    pub async fn prepare_incoming_with_token(
        &self,
        config: VmConfig,
        listen: &str,
        token: &str,
    ) -> Result<QemuVm> {
        if listen.is_empty() || listen.contains([',', ' ']) {
            return Err(Error::invalid(
                "migration listen address",
                format!("{listen:?} is not HOST:PORT"),
            ));
        }
        let mut extra = self.options.extra_args.clone();
        extra.extend(["-incoming".to_string(), "defer".to_string()]);
        let vm = self.launch(config, extra, true).await?;
        // MIGRATION events tell finish_incoming at once when the stream is
        // in (the switch-over waits for it); then listen.
        vm.qmp()
            .execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": [{ "capability": "events", "state": true }] })),
            )
            .await?;
        set_up_tls(&vm, token, true).await?;
        vm.qmp()
            .execute(
                "migrate-incoming",
                Some(json!({ "uri": format!("tcp:{listen}") })),
            )
            .await?;
        Ok(vm)
    }
}

impl QemuVm {
    /// Waits until the incoming migration of a VM from
    /// [`QemuHypervisor::prepare_incoming`] has arrived, then runs it.
    pub async fn finish_incoming(&self) -> Result<()> {
        let mut events = self.qmp().events();
        let r = self.await_incoming(&mut events).await;
        if let Err(e) = &r {
            for d in self.volumes() {
                d.fail(&format!("the incoming migration failed: {e}")).await;
            }
        }
        r
    }

    async fn await_incoming(
        &self,
        events: &mut tokio::sync::broadcast::Receiver<super::qmp::Event>,
    ) -> Result<()> {
        loop {
            if let VmState::Stopped(r) = self.state().await? {
                return Err(failed(format!(
                    "the incoming migration of VM {} failed: {r:?}",
                    self.name()
                )));
            }
            let status = self.qmp().execute("query-status", None).await?;
            match status["status"].as_str().unwrap_or_default() {
                "inmigrate" => {}
                "running" => return Ok(()),
                _ => {
                    let m = self.qmp().execute("query-migrate", None).await?;
                    match m["status"].as_str().unwrap_or_default() {
                        "completed" => {
                            // The source QEMU stopped the guest and drained
                            // its disks: its engines are idle. Take the
                            // volumes over (fences them), then run.
                            let t = Instant::now();
                            on_volumes(self.volumes(), |d| async move {
                                let from = d.prepared_from().await;
                                d.activate(from).await
                            })
                            .await?;
                            if !self.volumes().is_empty() {
                                tracing::info!(vm = %self.name(), took = ?t.elapsed(), "volumes taken over");
                            }
                            return self.start().await;
                        }
                        "failed" | "cancelled" => {
                            return Err(failed(format!(
                                "the incoming migration of VM {} failed: {}",
                                self.name(),
                                m["error-desc"].as_str().unwrap_or("no reason given")
                            )));
                        }
                        _ => {}
                    }
                }
            }
            migration_event(events).await;
        }
    }
}

/// Whether pre-copy keeps every guest write under TCG with this QEMU
/// (its QMP greeting's `version`). Before QEMU 9.0 (commit 03bfc2188f,
/// "physmem: Fix migration dirty bitmap coherency with TCG memory access")
/// the dirty bitmap sync did not re-arm TCG's TLB, so writes to pages that
/// stayed in the TLB were lost after the first pass: the target resumed
/// with parts of memory from early in the migration.
pub fn tcg_precopy_is_safe(version: &Value) -> bool {
    version["qemu"]["major"]
        .as_u64()
        .is_some_and(|major| major >= 9)
}

#[async_trait]
impl Migratable for QemuVm {
    async fn migrate(
        &self,
        target: &str,
        options: MigrationOptions,
        progress: watch::Sender<MigrationProgress>,
    ) -> Result<MigrationProgress> {
        let state = self.state().await?;
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(Error::Busy {
                kind: "vm",
                name: self.name().to_string(),
                reason: format!("cannot migrate a VM that is {state:?}"),
            });
        }
        // Under TCG with an older QEMU a live pre-copy loses guest writes
        // (see `tcg_precopy_is_safe`): copy with the guest paused instead.
        // Correct, with the whole copy as downtime.
        let stop_and_copy = state == VmState::Running
            && self.accel() == super::cmdline::Accel::Tcg
            && !tcg_precopy_is_safe(self.qmp().version());
        if !stop_and_copy {
            return self.precopy(target, options, progress).await;
        }
        tracing::info!(
            vm = %self.name(),
            qemu = %self.qmp().version()["qemu"],
            "QEMU before 9.0 loses dirty pages in a TCG pre-copy: migrating with the guest paused"
        );
        let paused = Instant::now();
        self.pause().await?;
        // Dropped half-way: cancel and run the guest again.
        let mut guard = CancelOnDrop {
            vm: Some(self.clone()),
            resume: true,
        };
        let result = self.precopy(target, options, progress.clone()).await;
        guard.vm = None;
        match result {
            Ok(mut p) => {
                p.downtime = Some(paused.elapsed());
                progress.send_replace(p.clone());
                Ok(p)
            }
            Err(e) => {
                if let Err(re) = self.resume().await {
                    tracing::warn!(vm = %self.name(), error = %re, "cannot resume after the failed migration");
                }
                Err(e)
            }
        }
    }
}

impl QemuVm {
    /// QMP `migrate` with progress, cancel and forced switch-over (see the
    /// module documentation); the guest's run state is left as it was.
    async fn precopy(
        &self,
        target: &str,
        options: MigrationOptions,
        progress: watch::Sender<MigrationProgress>,
    ) -> Result<MigrationProgress> {
        let qmp = self.qmp();
        let mut events = qmp.events();
        // `pause-before-switchover`: QEMU stops in `pre-switchover` with the
        // guest paused and waits for `migrate-continue`; that is the one
        // point where this side decides between a cancel and the switch.
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [
                { "capability": "auto-converge", "state": true },
                { "capability": "events", "state": true },
                { "capability": "pause-before-switchover", "state": true },
            ]})),
        )
        .await?;
        let downtime_ms = u64::try_from(options.max_downtime.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "downtime-limit": downtime_ms, "max-bandwidth": 10u64 << 30 })),
        )
        .await?;
        set_up_tls(self, &options.token, false).await?;
        qmp.execute("migrate", Some(json!({ "uri": format!("tcp:{target}") })))
            .await?;
        // Dropped before the switch-over (the caller gave up): cancel the
        // migration QEMU would otherwise carry on with.
        let mut guard = CancelOnDrop {
            vm: Some(self.clone()),
            resume: false,
        };
        let started = Instant::now();
        let mut committed = false;
        let mut forced = false;
        let mut cancelling: Option<String> = None;
        loop {
            let q = qmp.execute("query-migrate", None).await?;
            tracing::debug!(vm = %self.name(), state = %q, "query-migrate");
            let p = progress_of(&q);
            progress.send_replace(p.clone());
            if !forced && !committed && p.iteration >= crate::migration::MAX_PASSES {
                // Like the kvm backend: a guest that outpaces the link even
                // throttled is switched over anyway, with a longer pause.
                forced = true;
                tracing::info!(
                    vm = %self.name(),
                    pass = p.iteration,
                    remaining = p.bytes_remaining,
                    "not converging; forcing the switch-over"
                );
                qmp.execute(
                    "migrate-set-parameters",
                    Some(json!({ "downtime-limit": FORCE_DOWNTIME_MS })),
                )
                .await?;
            }
            match q["status"].as_str().unwrap_or_default() {
                "completed" => {
                    guard.vm = None;
                    tracing::info!(vm = %self.name(), target, downtime = ?p.downtime, "migrated");
                    // The target takes the volumes over now: let them go
                    // (this QEMU issues no more I/O), then end this QEMU.
                    if let Err(e) =
                        on_volumes(
                            self.volumes(),
                            |d| async move { d.release().await.map(|_| ()) },
                        )
                        .await
                    {
                        tracing::warn!(vm = %self.name(), error = %e, "releasing a volume failed");
                    }
                    self.kill().await?;
                    return Ok(p);
                }
                "failed" | "cancelled" => {
                    guard.vm = None;
                    if let Some(why) = cancelling {
                        tracing::info!(vm = %self.name(), target, "{why}");
                        return Err(if options.cancel.is_cancelled() {
                            Error::Cancelled
                        } else {
                            failed(why)
                        });
                    }
                    return Err(failed(format!(
                        "migration of VM {} to {target} failed: {}",
                        self.name(),
                        q["error-desc"].as_str().unwrap_or("no reason given")
                    )));
                }
                // Paused for the switch-over: go on unless cancelled (then
                // the cancel below resumes the guest here).
                "pre-switchover"
                    if !committed && cancelling.is_none() && !options.cancel.is_cancelled() =>
                {
                    committed = true;
                    guard.vm = None;
                    qmp.execute(
                        "migrate-continue",
                        Some(json!({ "state": "pre-switchover" })),
                    )
                    .await?;
                    continue;
                }
                _ => {}
            }
            if !committed && cancelling.is_none() {
                if options.cancel.is_cancelled() {
                    cancelling = Some("cancelled".into());
                } else if started.elapsed() > options.timeout {
                    cancelling = Some(format!(
                        "migration of VM {} to {target} did not finish within {:?}; cancelled",
                        self.name(),
                        options.timeout
                    ));
                }
                if cancelling.is_some() {
                    // QEMU resumes the guest here and reports `cancelled`.
                    qmp.execute("migrate_cancel", None).await?;
                    continue;
                }
            }
            if (cancelling.is_some() || committed)
                && started.elapsed() > options.timeout + CANCEL_WAIT
            {
                return Err(failed(format!(
                    "migration of VM {} to {target}: QEMU did not finish the {}",
                    self.name(),
                    if committed { "switch-over" } else { "cancel" }
                )));
            }
            if options.cancel.is_cancelled() || cancelling.is_some() {
                migration_event(&mut events).await;
            } else {
                tokio::select! {
                    () = migration_event(&mut events) => {}
                    () = options.cancel.cancelled() => {}
                }
            }
        }
    }
}

/// QEMU's largest downtime limit (2000 s): the next pass switches over,
/// whatever is left to send.
const FORCE_DOWNTIME_MS: u64 = 2_000_000;

/// How long a cancelled QEMU migration may take to report `cancelled`.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// Cancels the QEMU migration of the VM it holds when dropped, then
/// resumes the guest if `resume`.
struct CancelOnDrop {
    vm: Option<QemuVm>,
    resume: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(vm) = self.vm.take() else {
            return;
        };
        let resume = self.resume;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = vm.qmp().execute("migrate_cancel", None).await {
                    tracing::warn!(vm = %vm.name(), error = %e, "cannot cancel the migration");
                }
                if resume && let Err(e) = vm.resume().await {
                    tracing::warn!(vm = %vm.name(), error = %e, "cannot resume after the cancelled migration");
                }
            });
        }
    }
}

#[async_trait]
impl ReceiveMigration for QemuHypervisor {
    async fn receive(
        &self,
        config: VmConfig,
        listen: &str,
        token: &str,
    ) -> Result<Box<dyn VmHandle>> {
        let vm = self
            .prepare_incoming_with_token(config, listen, token)
            .await?;
        vm.finish_incoming().await?;
        Ok(Box::new(vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_precopy_needs_qemu_9() {
        let v = |major: u64| json!({"qemu": {"major": major, "minor": 2, "micro": 0}});
        assert!(!tcg_precopy_is_safe(&v(7)));
        assert!(!tcg_precopy_is_safe(&v(8)));
        assert!(tcg_precopy_is_safe(&v(9)));
        assert!(tcg_precopy_is_safe(&v(10)));
        assert!(!tcg_precopy_is_safe(&Value::Null));
    }

    #[test]
    fn progress_from_query_migrate() {
        let q = json!({"status": "active", "ram": {"transferred": 1000, "remaining": 24,
            "dirty-sync-count": 3, "dirty-pages-rate": 10, "page-size": 4096}});
        let p = progress_of(&q);
        assert_eq!(
            (p.iteration, p.bytes_sent, p.bytes_remaining),
            (3, 1000, 24)
        );
        assert_eq!(p.dirty_rate, 40960.0);
        assert_eq!(p.downtime, None);
        let done = progress_of(&json!({"status": "completed", "downtime": 12}));
        assert_eq!(done.downtime, Some(Duration::from_millis(12)));
    }
}
