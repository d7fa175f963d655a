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

/// `hcictl vm migrate NAME --cancel`.
pub async fn cancel(c: &Client, name: &str) -> Result<String, CliError> {
    let what = format!("vm/{name}");
    c.vms()
        .migrate(proto::MigrateVmRequest {
            name: name.to_string(),
            target_node: String::new(),
            resource_version: 0,
            cancel: true,
        })
        .await
        .map_err(|s| explain(&what, &s))?;
    Ok(format!("{what} live migration cancelled\n"))
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
        let vm = parse(
            &c.get(Kind::Vm, name)
                .await
                .map_err(|s| explain(&what, &s))?,
        )?;
        let current = vm
            .status
            .and_then(|s| s.migration)
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
