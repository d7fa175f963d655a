//! Live migration of a running VM from this node to another (cluster mode).
//!
//! Two daemons cooperate through the VM's `status.migration`:
//!
//! 1. A request — the [`MIGRATE_TO`] annotation, set by the API
//!    (`hcictl vm migrate`) or by a drain — reaches the VM controller of the
//!    node running the VM (the source). It checks the VM can move (running,
//!    a backend that migrates, no volume that lives only on this node),
//!    picks the target (the requested node, or the best one by the
//!    placement rules), and records `{source, target, token, phase:
//!    Pending}`.
//! 2. The target node's controller sees the migration aimed at it: it
//!    attaches the VM's NICs to its networks, builds the same VM
//!    configuration (the same disk specs; replicated volumes are described,
//!    not opened, so the backend hands them over at switch-over), starts the
//!    receiver (`hci-vmm --incoming`, the in-process VMM, or QEMU
//!    `-incoming`) on a free port of its address and records `TargetReady`
//!    with `address`.
//! 3. The source calls [`Migratable::migrate`] to that address with the
//!    token (retrying the connection for a few seconds while the receiver
//!    starts), writing progress (pass, bytes sent and remaining, dirty rate)
//!    into the status as it goes (`Running`).
//! 4. When the receiver returns a running VM, the target records itself as
//!    the VM's node and `Succeeded` — ownership moves only then. The source
//!    forgets its instance once it sees that.
//!
//! A failure or cancel on either side records `Failed` with the reason: the
//! source VM keeps running where it was, and the target drops its receiver
//! (killing the half-received VM) and its NICs. While a migration involves
//! a VM, both nodes' controllers leave it alone (see `VmController::migrating`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;
use hci_core::compute::{
    Hypervisor, MigrationOptions, MigrationProgress, ReceiveMigration, VmHandle,
};
use hci_core::model::{
    ConditionStatus, MigrationPhase, Resource, VirtualMachine, VmMigration, VmPhase, Volume,
    set_condition,
};
use hci_core::{Error, Result};
use tokio::sync::watch;

use super::{Instance, KIND, VmController, uses_qemu};

/// Annotation asking for a live migration of the VM: the target node's
/// name, or empty for "any node that fits". The source node's controller
/// takes it and clears it.
pub const MIGRATE_TO: &str = "hci.dev/migrate-to";

/// Largest pause of the guest the migration aims for.
const MAX_DOWNTIME: Duration = Duration::from_millis(50);
/// A migration still copying after this long is given up (the VM stays).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the source waits for the target's receiver to be ready.
const TARGET_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the source retries connecting to a receiver still starting.
const CONNECT_RETRY: Duration = Duration::from_secs(10);
/// How long the source waits, after the switch-over, for the target to
/// report the VM running there.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Status is polled this often while waiting for the other node.
const POLL: Duration = Duration::from_millis(100);
/// Progress is written to the status at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

impl VmController {
    /// Takes a migration request for a VM running here: checks it, picks
    /// the target, records the migration and starts driving it.
    pub(super) async fn start_migration(
        &self,
        vm: &VirtualMachine,
        wanted: &str,
    ) -> Result<Option<Duration>> {
        let name = vm.name().to_string();
        let source = self.rt.node.name.clone();
        let checked = self.migration_check(vm, wanted).await;
        // Take the request off the VM whatever happens next.
        let cleared = self
            .rt
            .resources
            .modify::<VirtualMachine, _>(&name, None, |v| {
                v.metadata.annotations.remove(MIGRATE_TO);
                Ok(())
            })
            .await;
        match cleared {
            Ok(_) => {}
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        }
        let (inst, target) = match checked? {
            Ok(ok) => ok,
            Err(why) => {
                let message = format!("cannot live-migrate: {why}");
                self.rt
                    .events
                    .warning(KIND, &name, "MigrationFailed", &message)
                    .await;
                self.status(&name, |v| {
                    v.status_mut().migration = Some(VmMigration {
                        source_node: source.clone(),
                        target_node: String::new(),
                        phase: MigrationPhase::Failed,
                        message: message.clone(),
                        started_at: Some(Utc::now()),
                        finished_at: Some(Utc::now()),
                        ..VmMigration::default()
                    });
                })
                .await?;
                return Ok(None);
            }
        };
        self.migrating().insert(name.clone());
        let token = uuid::Uuid::new_v4().simple().to_string();
        let now = Utc::now();
        let recorded = self
            .status(&name, |v| {
                let s = v.status_mut();
                s.migration = Some(VmMigration {
                    source_node: source.clone(),
                    target_node: target.clone(),
                    phase: MigrationPhase::Pending,
                    token: token.clone(),
                    started_at: Some(now),
                    ..VmMigration::default()
                });
                set_condition(
                    &mut s.conditions,
                    "Migrating",
                    ConditionStatus::True,
                    "Pending",
                    &format!("to node {target}"),
                );
            })
            .await;
        if let Err(e) = recorded {
            self.migrating().remove(&name);
            return Err(e);
        }
        self.rt
            .events
            .normal(
                KIND,
                &name,
                "Migrating",
                format!("live migration from node {source} to node {target} requested"),
            )
            .await;
        let Some(this) = self.me.upgrade() else {
            self.migrating().remove(&name);
            return Ok(None);
        };
        tokio::spawn(async move {
            this.drive_source(&name, inst, &target, &token).await;
            this.migrating().remove(&name);
            this.kick.now(&name);
        });
        Ok(None)
    }

    /// Whether `vm` can move now, and where: `Ok(Err(why))` if not.
    async fn migration_check(
        &self,
        vm: &VirtualMachine,
        wanted: &str,
    ) -> Result<std::result::Result<(Arc<Instance>, String), String>> {
        if self.rt.cluster.is_none() {
            return Ok(Err(
                "live migration needs cluster mode (hci-daemon --store etcd://…)".into(),
            ));
        }
        let Some(inst) = self.instance(vm.name()).filter(|i| i.alive()) else {
            return Ok(Err(format!(
                "the VM is not running on node {}",
                self.rt.node.name
            )));
        };
        if vm.status_or_default().phase == VmPhase::Paused {
            return Ok(Err(
                "the VM is paused (resume it first: a paused VM is not migrated)".into(),
            ));
        }
        if inst.handle.as_migratable().is_none() {
            return Ok(Err("its hypervisor backend cannot live-migrate".into()));
        }
        for disk in &vm.spec.disks {
            let vol: Option<Volume> = self.rt.resources.try_get(&disk.volume).await?;
            if vol.is_some_and(|v| v.spec.replicas <= 1) {
                return Ok(Err(format!(
                    "disk {:?} is on volume {:?}, which lives only on node {} (not yet supported: \
                     live migration moves VMs on replicated volumes only)",
                    disk.name, disk.volume, self.rt.node.name
                )));
            }
        }
        let wanted = (!wanted.is_empty()).then_some(wanted);
        let target =
            super::super::scheduler::migration_target(&self.rt, vm, &self.rt.node.name, wanted)
                .await?;
        Ok(target
            .map(|t| (inst, t))
            .map_err(|why| format!("no node can take it: {why}")))
    }

    /// The source side, from `Pending` to the end.
    async fn drive_source(&self, name: &str, inst: Arc<Instance>, target: &str, token: &str) {
        let outcome = self.send(name, &inst, target, token).await;
        match outcome {
            Ok(progress) => self.hand_over(name, &inst, target, &progress).await,
            Err(Error::Cancelled) => {
                // By request, or because the target gave up (its own
                // record of why stays: a finished record is not rewritten).
                let message =
                    format!("live migration to node {target} cancelled; the VM runs on here");
                tracing::info!(vm = name, "{message}");
                self.fail_migration(name, &message).await;
            }
            Err(e) => {
                let message = format!("live migration to node {target} failed: {e}");
                tracing::warn!(vm = name, "{message}");
                self.fail_migration(name, &message).await;
            }
        }
    }

    /// Waits for the target, then migrates; the final progress on success.
    async fn send(
        &self,
        name: &str,
        inst: &Instance,
        target: &str,
        token: &str,
    ) -> Result<MigrationProgress> {
        let address = self.wait_target_ready(name, target).await?;
        let migratable = inst
            .handle
            .as_migratable()
            .ok_or_else(|| Error::unsupported("live migration", "this VM's backend"))?;
        self.set_migration(name, |m| m.phase = MigrationPhase::Running)
            .await?;
        let started = Instant::now();
        loop {
            let (tx, rx) = watch::channel(MigrationProgress::default());
            let reporter = self.report_progress(name, rx);
            let cancel = hci_core::CancelToken::new();
            let options = MigrationOptions {
                max_downtime: MAX_DOWNTIME,
                timeout: MIGRATION_TIMEOUT,
                token: token.to_string(),
                cancel: cancel.clone(),
            };
            let sent = tx.subscribe();
            // A cancel request (or the target giving up) cancels the
            // migration unless the switch-over has begun; either way the
            // backend's answer says where the guest runs, so the migration
            // is never dropped half-way.
            let watcher = async {
                self.until_cancelled(name).await;
                cancel.cancel();
                std::future::pending::<()>().await;
            };
            let result = tokio::select! {
                r = migratable.migrate(&address, options, tx) => r,
                () = reporter => unreachable_reporter(),
                () = watcher => unreachable_reporter(),
            };
            let e = match result {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            // The receiver may not listen yet: the connection was refused
            // and nothing was sent.
            let nothing_sent = sent.borrow().bytes_sent == 0 && refused(&e);
            if !nothing_sent || started.elapsed() > CONNECT_RETRY {
                return Err(e);
            }
            if self.cancel_wanted(name).await {
                return Err(Error::Cancelled);
            }
            tracing::debug!(vm = name, error = %e, "target not listening yet; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes progress from `rx` into the VM's status until the sender goes.
    async fn report_progress(&self, name: &str, mut rx: watch::Receiver<MigrationProgress>) {
        loop {
            if rx.changed().await.is_err() {
                // The migration ended: park (the select picks the result).
                std::future::pending::<()>().await;
            }
            let p = rx.borrow_and_update().clone();
            let written = self
                .set_migration(name, |m| {
                    m.iteration = p.iteration;
                    m.bytes_sent = p.bytes_sent;
                    m.bytes_remaining = p.bytes_remaining;
                    m.dirty_rate = p.dirty_rate as u64;
                })
                .await;
            if let Err(e) = written {
                tracing::debug!(vm = name, error = %e, "cannot record migration progress");
            }
            tokio::time::sleep(PROGRESS_EVERY).await;
        }
    }

    /// Waits until the target records `TargetReady`; its address.
    async fn wait_target_ready(&self, name: &str, target: &str) -> Result<String> {
        let deadline = Instant::now() + TARGET_READY_TIMEOUT;
        loop {
            let vm: VirtualMachine = self.rt.resources.get(name).await?;
            let m = vm.status_or_default().migration.unwrap_or_default();
            if m.cancel_requested {
                return Err(Error::Cancelled);
            }
            match m.phase {
                MigrationPhase::TargetReady if !m.address.is_empty() => return Ok(m.address),
                MigrationPhase::Failed => {
                    return Err(Error::Unavailable {
                        what: format!("node {target} ({})", m.message),
                        source: None,
                    });
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(Error::Unavailable {
                    what: format!(
                        "node {target} (its receiver was not ready within {}s)",
                        TARGET_READY_TIMEOUT.as_secs()
                    ),
                    source: None,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Returns once someone asked to cancel the VM's migration, or the
    /// target marked it failed.
    async fn until_cancelled(&self, name: &str) {
        loop {
            tokio::time::sleep(POLL).await;
            if self.cancel_wanted(name).await {
                return;
            }
        }
    }

    async fn cancel_wanted(&self, name: &str) -> bool {
        match self.rt.resources.try_get::<VirtualMachine>(name).await {
            Ok(Some(vm)) => vm
                .status_or_default()
                .migration
                .is_some_and(|m| m.cancel_requested || m.phase == MigrationPhase::Failed),
            _ => false,
        }
    }

    /// After the switch-over: the guest runs on the target. Waits for the
    /// target to record itself as the VM's node, then forgets the instance
    /// here (its NICs detached; the volumes stay attached to the VM).
    async fn hand_over(
        &self,
        name: &str,
        inst: &Arc<Instance>,
        target: &str,
        progress: &MigrationProgress,
    ) {
        // The source VM ends now ("killed"): not a failure.
        inst.stopping.store(true, Ordering::SeqCst);
        inst.recorded.store(true, Ordering::SeqCst);
        let downtime = progress.downtime.map(|d| d.as_millis() as u64);
        // The final figures, also when the target has already recorded
        // the success.
        let _ = self
            .status(name, |v| {
                if let Some(m) = v.status_mut().migration.as_mut()
                    && m.target_node == target
                    && m.phase != MigrationPhase::Failed
                {
                    m.downtime_ms = downtime;
                    m.bytes_sent = progress.bytes_sent;
                    m.iteration = progress.iteration;
                    m.bytes_remaining = 0;
                }
            })
            .await;
        let deadline = Instant::now() + TAKEOVER_TIMEOUT;
        let taken = loop {
            match self.rt.resources.try_get::<VirtualMachine>(name).await {
                Ok(Some(vm)) if vm.status_or_default().node.as_deref() == Some(target) => {
                    break true;
                }
                Ok(None) => break true,
                _ => {}
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(POLL).await;
        };
        let removed = {
            let mut map = self.map();
            match map.get(name) {
                Some(i) if Arc::ptr_eq(i, inst) => map.remove(name),
                _ => None,
            }
        };
        if let Some(inst) = removed {
            self.detach_ports(&inst.ports, &inst.nics).await;
        }
        if taken {
            tracing::info!(vm = name, target, "VM live-migrated away");
            return;
        }
        // The guest left this node but the target never reported it
        // running: hand the VM back to the scheduler (restarted per run
        // strategy).
        let message = format!(
            "live migration to node {target}: the target did not report the VM running within {}s",
            TAKEOVER_TIMEOUT.as_secs()
        );
        self.fail_migration(name, &message).await;
        let source = self.rt.node.name.clone();
        let _ = self
            .status(name, |v| {
                let s = v.status_mut();
                if s.node.as_deref() == Some(source.as_str()) {
                    s.node = None;
                    s.phase = VmPhase::Pending;
                }
            })
            .await;
    }

    /// Records a failed migration (unless it already finished).
    pub(super) async fn fail_migration(&self, name: &str, message: &str) {
        self.rt
            .events
            .warning(KIND, name, "MigrationFailed", message)
            .await;
        let now = Utc::now();
        let written = self
            .status(name, |v| {
                let s = v.status_mut();
                if let Some(m) = s.migration.as_mut()
                    && !m.phase.is_finished()
                {
                    m.phase = MigrationPhase::Failed;
                    m.message = message.to_string();
                    m.finished_at = Some(now);
                    m.token.clear();
                }
                set_condition(
                    &mut s.conditions,
                    "Migrating",
                    ConditionStatus::False,
                    "Failed",
                    message,
                );
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(vm = name, error = %e, "cannot record the failed migration");
        }
    }

    /// Changes the VM's unfinished migration record.
    async fn set_migration(
        &self,
        name: &str,
        change: impl Fn(&mut VmMigration) + Send + Sync,
    ) -> Result<()> {
        self.status(name, |v| {
            if let Some(m) = v.status_mut().migration.as_mut()
                && !m.phase.is_finished()
            {
                change(m);
            }
        })
        .await
    }

    /// The target side: a migration to this node is pending for `vm`.
    pub(super) fn start_receiving(&self, vm: &VirtualMachine) {
        let Some(this) = self.me.upgrade() else {
            return;
        };
        let name = vm.name().to_string();
        if !self.migrating().insert(name.clone()) {
            return;
        }
        let vm = vm.clone();
        tokio::spawn(async move {
            if let Err(e) = this.receive(&vm).await {
                let message = format!(
                    "live migration to node {}: the target failed: {e}",
                    this.rt.node.name
                );
                tracing::warn!(vm = vm.name(), "{message}");
                this.fail_migration(vm.name(), &message).await;
            }
            this.migrating().remove(vm.name());
            this.kick.now(vm.name());
        });
    }

    async fn receive(&self, vm: &VirtualMachine) -> Result<()> {
        let name = vm.name();
        let migration = vm.status_or_default().migration.unwrap_or_default();
        let qemu = uses_qemu(vm);
        let (ports, nics) = self.attach_nics(vm).await?;
        let received = self
            .receive_with_nics(vm, &migration, nics.clone(), qemu)
            .await;
        let handle = match received {
            Ok(Some(handle)) => handle,
            Ok(None) => {
                self.detach_ports(&ports, &nics).await;
                return Ok(());
            }
            Err(e) => {
                self.detach_ports(&ports, &nics).await;
                return Err(e);
            }
        };
        let inst = Arc::new(Instance {
            uid: vm.metadata.uid,
            handle,
            cpus: vm.spec.cpus,
            memory: vm.spec.memory.0,
            exit: std::sync::Mutex::new(None),
            stopping: Default::default(),
            recorded: Default::default(),
            started: Instant::now(),
            exited: std::sync::Mutex::new(None),
            ports,
            nics,
            qemu,
        });
        self.track(name, inst);
        let node = self.rt.node.name.clone();
        let now = Utc::now();
        let message = format!(
            "live-migrated from node {} to node {node}",
            migration.source_node
        );
        self.status(name, |v| {
            let s = v.status_mut();
            s.node = Some(node.clone());
            s.phase = VmPhase::Running;
            s.message = message.clone();
            if let Some(m) = s.migration.as_mut() {
                m.phase = MigrationPhase::Succeeded;
                m.finished_at = Some(now);
                m.bytes_remaining = 0;
                m.token.clear();
            }
            set_condition(
                &mut s.conditions,
                "Migrating",
                ConditionStatus::False,
                "Succeeded",
                &message,
            );
            set_condition(
                &mut s.conditions,
                "Ready",
                ConditionStatus::True,
                "Running",
                "",
            );
        })
        .await?;
        tracing::info!(vm = name, "VM live-migrated here");
        self.rt.events.normal(KIND, name, "Migrated", message).await;
        Ok(())
    }

    /// Starts the receiver, announces it and waits for the VM: `None` if
    /// the source gave up meanwhile (the receiver is dropped, which kills
    /// a half-received VM).
    async fn receive_with_nics(
        &self,
        vm: &VirtualMachine,
        migration: &VmMigration,
        nics: Vec<hci_core::compute::NicConfig>,
        qemu: bool,
    ) -> Result<Option<Arc<dyn VmHandle>>> {
        let name = vm.name();
        let config = self.config(vm, nics, true).await?;
        std::fs::create_dir_all(&config.run_dir)
            .map_err(|e| Error::io(format!("create {}", config.run_dir.display()), e))?;
        let host = self
            .rt
            .node
            .addresses
            .first()
            .cloned()
            .unwrap_or_else(|| "127.0.0.1".into());
        let port = super::super::free_address(&host, "migration")?.port();
        let listen = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let token = migration.token.clone();
        let hypervisor: Arc<dyn Hypervisor> = self.rt.hypervisor.clone();
        let qemu_hv: Arc<dyn Hypervisor> = match &self.rt.qemu_processes {
            Some(p) => p.clone(),
            None => self.rt.qemu.clone(),
        };
        let listen_on = listen.clone();
        let receiving = async move {
            let receiver: &dyn ReceiveMigration = if qemu {
                qemu_hv.as_migration_receiver().ok_or_else(|| {
                    Error::unsupported("receiving live migrations", "the qemu hypervisor")
                })?
            } else {
                hypervisor.as_migration_receiver().ok_or_else(|| {
                    Error::unsupported("receiving live migrations", "this node's hypervisor")
                })?
            };
            receiver.receive(config, &listen_on, &token).await
        };
        tokio::pin!(receiving);
        // Give the receiver a moment to bind before the source connects
        // (the source also retries while it starts).
        let early = tokio::time::timeout(Duration::from_millis(200), &mut receiving).await;
        if let Ok(r) = early {
            return r.map(|h| Some(Arc::from(h)));
        }
        self.set_migration(name, |m| {
            if m.phase == MigrationPhase::Pending {
                m.phase = MigrationPhase::TargetReady;
                m.address = listen.clone();
            }
        })
        .await?;
        let mut poll = tokio::time::interval(Duration::from_millis(200));
        let deadline = Instant::now() + TARGET_READY_TIMEOUT + MIGRATION_TIMEOUT;
        loop {
            tokio::select! {
                r = &mut receiving => return r.map(|h| Some(Arc::from(h))),
                _ = poll.tick() => {
                    let still = match self.rt.resources.try_get::<VirtualMachine>(name).await {
                        Ok(Some(v)) => {
                            let s = v.status_or_default();
                            // The source still runs it (not failed over
                            // elsewhere meanwhile) and still sends it here.
                            s.node.as_deref() == Some(migration.source_node.as_str())
                                && s.migration.is_some_and(|m| !m.phase.is_finished()
                                    && m.target_node == self.rt.node.name)
                        }
                        Ok(None) => false,
                        Err(_) => true,
                    };
                    if !still {
                        tracing::info!(vm = name, "migration given up by the source; receiver dropped");
                        return Ok(None);
                    }
                    if Instant::now() > deadline {
                        return Err(Error::Unavailable {
                            what: format!(
                                "the migration stream from node {} (nothing complete within {}s)",
                                migration.source_node,
                                (TARGET_READY_TIMEOUT + MIGRATION_TIMEOUT).as_secs()
                            ),
                            source: None,
                        });
                    }
                }
            }
        }
    }
}

/// Whether a migration failed because the target refused the connection
/// (its receiver not listening yet).
fn refused(e: &Error) -> bool {
    let text = e.to_string();
    text.contains("Connection refused") || text.contains("connection refused")
}

/// The report task never finishes on its own.
fn unreachable_reporter() -> Result<MigrationProgress> {
    Err(Error::Backend {
        backend: "hci-daemon",
        message: "the migration progress reporter ended".into(),
        source: None,
    })
}

/// Whether `vm` has an unfinished migration from `node` (its source) that
/// no task drives (the source daemon restarted meanwhile).
pub(super) fn orphaned_here(vm: &VirtualMachine, node: &str) -> bool {
    vm.status_or_default()
        .migration
        .is_some_and(|m| !m.phase.is_finished() && m.source_node == node)
}

/// Whether `vm` is the target of an unfinished migration to `node` not yet
/// taken up.
pub(super) fn pending_here(vm: &VirtualMachine, node: &str) -> bool {
    vm.status_or_default()
        .migration
        .is_some_and(|m| m.phase == MigrationPhase::Pending && m.target_node == node)
}
