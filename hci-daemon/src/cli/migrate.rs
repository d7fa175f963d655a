//! `hcictl vm migrate NAME [--to NODE]`: asks for a live migration and
//! follows it (pass, bytes sent and remaining) until the VM runs on the
//! target or the migration fails.

use std::io::Write;
use std::time::{Duration, Instant};

use hci_core::model::{MigrationPhase, VirtualMachine, VmMigration};

use super::{CliError, Client, Kind, explain};
use crate::proto;

/// How long `hcictl vm migrate` follows a migration before giving up
/// watching (the migration itself goes on).
const FOLLOW_FOR: Duration = Duration::from_secs(600);

fn parse(r: &proto::Resource) -> Result<VirtualMachine, CliError> {
    serde_json::from_str(&r.json)
        .map_err(|e| CliError::Api(format!("the daemon sent an unreadable VirtualMachine: {e}")))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// One line about a migration in progress.
pub fn progress_line(m: &VmMigration) -> String {
    match m.phase {
        MigrationPhase::Pending => format!("waiting for node {} to get ready", m.target_node),
        MigrationPhase::TargetReady => format!("node {} listens on {}", m.target_node, m.address),
        MigrationPhase::Running if m.iteration == 0 => "connecting".to_string(),
        MigrationPhase::Running => format!(
            "pass {}: {} sent, {} remaining, dirtying {}/s",
            m.iteration,
            mib(m.bytes_sent),
            mib(m.bytes_remaining),
            mib(m.dirty_rate)
        ),
        MigrationPhase::Succeeded => format!(
            "migrated from {} to {} ({} sent in {} passes{})",
            m.source_node,
            m.target_node,
            mib(m.bytes_sent),
            m.iteration,
            m.downtime_ms
                .map(|d| format!(", downtime {d} ms"))
                .unwrap_or_default()
        ),
        MigrationPhase::Failed => format!("failed: {}", m.message),
    }
}

/// The VM's current (or last) migration record.
async fn migration_of(c: &Client, name: &str) -> Result<Option<VmMigration>, CliError> {
    let vm = c
        .get(Kind::Vm, name)
        .await
        .map_err(|s| explain(&format!("vm/{name}"), &s))?;
    Ok(parse(&vm)?.status.and_then(|s| s.migration))
}

/// How long `hcictl vm migrate --cancel` waits for the source to answer.
const CANCEL_FOR: Duration = Duration::from_secs(60);

/// `hcictl vm migrate NAME --cancel`: asks the source to stop the
/// migration and waits for its answer. A cancel that comes after the
/// switch-over began is too late: the VM then runs on the target, and
/// this says so (an error).
pub async fn cancel(c: &Client, name: &str) -> Result<String, CliError> {
    let what = format!("vm/{name}");
    let vm = c
        .vms()
        .migrate(proto::MigrateVmRequest {
            name: name.to_string(),
            target_node: String::new(),
            resource_version: 0,
            cancel: true,
        })
        .await
        .map_err(|s| explain(&what, &s))?
        .into_inner();
    let started_at = parse(&vm)?
        .status
        .and_then(|s| s.migration)
        .filter(|m| m.cancel_requested)
        .and_then(|m| m.started_at);
    if started_at.is_none() {
        return Ok(format!("{what} live migration request withdrawn\n"));
    }
    let start = Instant::now();
    loop {
        let m = migration_of(c, name)
            .await?
            .filter(|m| m.started_at == started_at);
        match m {
            Some(m) if m.phase == MigrationPhase::Failed => {
                return Ok(format!(
                    "{what} live migration cancelled; the VM runs on node {}\n",
                    m.source_node
                ));
            }
            Some(m) if m.phase == MigrationPhase::Succeeded => {
                return Err(CliError::Failed(format!(
                    "{what}: too late to cancel: the switch-over had begun and the VM now runs on node {}",
                    m.target_node
                )));
            }
            Some(m) if start.elapsed() > CANCEL_FOR => {
                return Err(CliError::Failed(format!(
                    "{what}: cancel requested, but node {} has not answered within {}s (hcictl describe vm {name})",
                    m.source_node,
                    CANCEL_FOR.as_secs()
                )));
            }
            Some(_) => {}
            None => return Ok(format!("{what} live migration cancelled\n")),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `hcictl vm migrate NAME [--to NODE] [--no-wait]`.
pub async fn migrate(
    c: &Client,
    name: &str,
    to: Option<&str>,
    wait: bool,
) -> Result<String, CliError> {
    let what = format!("vm/{name}");
    let before = c
        .get(Kind::Vm, name)
        .await
        .map_err(|s| explain(&what, &s))?;
    let before = parse(&before)?
        .status
        .and_then(|s| s.migration)
        .and_then(|m| m.started_at);
    c.vms()
        .migrate(proto::MigrateVmRequest {
            name: name.to_string(),
            target_node: to.unwrap_or_default().to_string(),
            resource_version: 0,
            cancel: false,
        })
        .await
        .map_err(|s| explain(&what, &s))?;
    if !wait {
        return Ok(format!("{what} live migration requested\n"));
    }
    let start = Instant::now();
    let mut last = String::new();
    let mut waited = false;
    let mut out = std::io::stdout();
    loop {
        let current = migration_of(c, name)
            .await?
            .filter(|m| m.started_at.is_some() && m.started_at != before);
        if let Some(m) = current {
            let line = progress_line(&m);
            if line != last {
                match m.phase {
                    // The source adds the downtime just after the target
                    // reports the VM running.
                    MigrationPhase::Succeeded
                        if m.downtime_ms.is_none() && start.elapsed() < FOLLOW_FOR && !waited =>
                    {
                        waited = true;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    MigrationPhase::Succeeded => return Ok(format!("{what} {line}\n")),
                    MigrationPhase::Failed => {
                        return Err(CliError::Failed(format!("{what}: live migration {line}")));
                    }
                    _ => {
                        let _ = writeln!(out, "{what}: {line}");
                        let _ = out.flush();
                    }
                }
                last = line;
            }
        }
        if start.elapsed() > FOLLOW_FOR {
            return Err(CliError::Failed(format!(
                "{what}: the live migration did not finish within {}s (still going: hcictl describe vm {name})",
                FOLLOW_FOR.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
