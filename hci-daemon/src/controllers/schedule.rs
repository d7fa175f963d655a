//! The schedule controller: runs each `Schedule` at the times its cron
//! expression (`croner`, five fields, UTC) names, by creating a `Snapshot`
//! or a `Backup` resource labelled `hci.dev/schedule=<name>` (their own
//! controllers take them), then deleting the oldest ones it made beyond
//! `retain`. A run due while the schedule's previous backup is still
//! pending or in progress is skipped and reported in `lastResult`, never
//! queued. A run missed while the daemon was down runs once at start.
//!
//! The annotation `hci.dev/run-now` (any value) asks for one run at once;
//! the controller removes it when it has run.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hci_core::model::{
    Backup, BackupPhase, BackupSource, BackupSpec, Resource, Schedule, ScheduleTask, Snapshot,
    SnapshotSpec,
};
use hci_core::{Error, Result};

use super::{Reconcile, Runtime, set_status};

/// Label naming the schedule that made a snapshot or backup.
pub const SCHEDULE_LABEL: &str = "hci.dev/schedule";
/// Annotation asking a schedule to run once now.
pub const RUN_NOW_ANNOTATION: &str = "hci.dev/run-now";

pub(crate) struct ScheduleController {
    rt: Runtime,
}

impl ScheduleController {
    pub(crate) fn new(rt: Runtime) -> Self {
        ScheduleController { rt }
    }

    /// Oldest first, then by name.
    fn by_age<R: Resource>(mut items: Vec<R>) -> Vec<R> {
        items.sort_by(|a, b| {
            a.metadata()
                .created_at
                .cmp(&b.metadata().created_at)
                .then_with(|| a.name().cmp(b.name()))
        });
        items
    }

    async fn run(&self, s: &Schedule, at: DateTime<Utc>) -> Result<String> {
        let name = s.name();
        let run_name = format!("{name}-{}", at.format("%Y%m%d-%H%M%S%3f"));
        let volume = match &s.spec.source {
            BackupSource::Volume { name } => Some(name.clone()),
            BackupSource::VirtualMachine { .. } => None,
        };
        let retain = s.spec.retain as usize;
        match &s.spec.task {
            ScheduleTask::Snapshot => {
                let volume = volume.ok_or_else(|| {
                    Error::invalid("spec.source", "snapshot schedules apply to a volume")
                })?;
                let mut snap = Snapshot::new(&run_name, SnapshotSpec { volume });
                snap.metadata
                    .labels
                    .insert(SCHEDULE_LABEL.into(), name.to_string());
                self.rt.resources.create(snap).await?;
                let mine: Vec<Snapshot> = self
                    .rt
                    .resources
                    .list::<Snapshot>()
                    .await?
                    .items
                    .into_iter()
                    .filter(|x| {
                        x.metadata.labels.get(SCHEDULE_LABEL).map(String::as_str) == Some(name)
                    })
                    .collect();
                let mine = Self::by_age(mine);
                let extra = mine.len().saturating_sub(retain);
                for old in &mine[..extra] {
                    self.delete::<Snapshot>(old.name()).await?;
                }
                Ok(format!("snapshot {run_name} created, {extra} pruned"))
            }
            ScheduleTask::Backup { target } => {
                let mine: Vec<Backup> = self
                    .rt
                    .resources
                    .list::<Backup>()
                    .await?
                    .items
                    .into_iter()
                    .filter(|x| {
                        x.metadata.labels.get(SCHEDULE_LABEL).map(String::as_str) == Some(name)
                    })
                    .collect();
                if let Some(busy) = mine.iter().find(|b| {
                    matches!(
                        b.status_or_default().phase,
                        BackupPhase::Pending | BackupPhase::InProgress
                    )
                }) {
                    tracing::warn!(
                        schedule = name,
                        previous = busy.name(),
                        "run skipped: the previous one is still running"
                    );
                    return Ok(format!(
                        "skipped at {}: backup {} is still running",
                        at.to_rfc3339(),
                        busy.name()
                    ));
                }
                let mut b = Backup::new(
                    &run_name,
                    BackupSpec {
                        source: s.spec.source.clone(),
                        target: target.clone(),
                        incremental: true,
                    },
                );
                b.metadata
                    .labels
                    .insert(SCHEDULE_LABEL.into(), name.to_string());
                self.rt.resources.create(b).await?;
                // Retention: the new one counts; the newest earlier one stays
                // until the new one completes (it is its base).
                let done = Self::by_age(mine);
                let extra = (done.len() + 1)
                    .saturating_sub(retain)
                    .min(done.len().saturating_sub(1));
                for old in done.iter().take(extra) {
                    self.delete::<Backup>(old.name()).await?;
                }
                Ok(format!("backup {run_name} started, {extra} pruned"))
            }
        }
    }

    async fn delete<R: Resource>(&self, name: &str) -> Result<()> {
        match self.rt.resources.delete::<R>(name, None).await {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl Reconcile for ScheduleController {
    type Kind = Schedule;

    async fn reconcile(&self, name: &str, current: Option<Schedule>) -> Result<Option<Duration>> {
        let Some(s) = current else {
            return Ok(None);
        };
        let now = Utc::now();
        let st = s.status_or_default();
        let run_now = s.metadata.annotations.contains_key(RUN_NOW_ANNOTATION);
        let after = st.last_run.or(s.metadata.created_at).unwrap_or(now);
        let next = s.spec.next_run_after(after);
        let due = run_now || next.is_some_and(|n| n <= now);
        if !due {
            set_status(&self.rt.resources, name, |x: &mut Schedule| {
                x.status_mut().next_run = next;
            })
            .await?;
            return Ok(next.map(|n| until(n, now)));
        }
        let result = match self.run(&s, now).await {
            Ok(r) => r,
            Err(e) => format!("failed at {}: {e}", now.to_rfc3339()),
        };
        tracing::info!(schedule = name, result, "schedule ran");
        let next = s.spec.next_run_after(now);
        self.rt
            .resources
            .modify::<Schedule, _>(name, None, |x| {
                x.metadata.annotations.remove(RUN_NOW_ANNOTATION);
                let st = x.status_mut();
                st.last_run = Some(now);
                st.next_run = next;
                st.last_result = result.clone();
                Ok(())
            })
            .await?;
        Ok(next.map(|n| until(n, Utc::now())))
    }
}

/// Time from `now` to `t` (at least 100 ms, so a run never fires early).
fn until(t: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (t - now)
        .to_std()
        .unwrap_or_default()
        .max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_the_next_run() {
        let now = Utc::now();
        assert_eq!(
            until(now - chrono::Duration::seconds(5), now),
            Duration::from_millis(100)
        );
        assert_eq!(
            until(now + chrono::Duration::seconds(5), now),
            Duration::from_secs(5)
        );
    }
}
