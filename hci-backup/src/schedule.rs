//! Scheduled backups: a cron expression (`croner`, 5 fields), a volume, a
//! retention policy. Each run takes a snapshot, backs it up incrementally
//! from the schedule's previous backup, prunes by retention and drops the
//! previous run's snapshot. A run due while the previous one still runs is
//! skipped and reported, never queued.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use croner::Cron;
use tokio::sync::{Mutex, mpsc, watch};
use tracing::{info, warn};

use hci_core::backup::{BackupEngine, BackupInfo, VolumeBackupRequest};
use hci_core::volume::VolumeBackend;
use hci_core::{Error, Result};

use crate::repo::Repository;
use crate::retention::RetentionPolicy;

/// A backup schedule.
#[derive(Debug, Clone)]
pub struct BackupSchedule {
    /// Schedule name (prefix of the snapshots it takes).
    pub name: String,
    /// Volume to back up.
    pub volume: String,
    /// Retention applied after each run (nothing is pruned if empty).
    pub retention: RetentionPolicy,
    cron: Cron,
}

impl BackupSchedule {
    /// A schedule from a 5-field cron expression, e.g. `"0 2 * * *"`.
    pub fn new(
        name: impl Into<String>,
        cron: &str,
        volume: impl Into<String>,
        retention: RetentionPolicy,
    ) -> Result<Self> {
        let cron = Cron::from_str(cron)
            .map_err(|e| Error::invalid(format!("cron expression {cron:?}"), e.to_string()))?;
        Ok(BackupSchedule {
            name: name.into(),
            volume: volume.into(),
            retention,
            cron,
        })
    }

    /// The first run strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Result<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t, false)
            .map_err(|e| Error::invalid("cron schedule", e.to_string()))
    }
}

/// What became of one scheduled run.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// The backup was taken.
    Completed {
        /// When the run was due.
        scheduled: DateTime<Utc>,
        /// The new backup.
        backup: BackupInfo,
        /// Backups pruned by retention.
        pruned: Vec<String>,
    },
    /// The previous run was still going: this one was skipped.
    Skipped {
        /// When the run was due.
        scheduled: DateTime<Utc>,
    },
    /// The run failed.
    Failed {
        /// When the run was due.
        scheduled: DateTime<Utc>,
        /// Why.
        error: String,
    },
}

/// Runs a [`BackupSchedule`] against a repository and a volume backend.
#[derive(Debug, Clone)]
pub struct Scheduler {
    schedule: BackupSchedule,
    repo: Arc<Repository>,
    volumes: Arc<dyn VolumeBackend>,
    running: Arc<AtomicBool>,
    /// The previous successful run: (backup id, snapshot).
    last: Arc<Mutex<Option<(String, String)>>>,
}

impl Scheduler {
    /// A scheduler; the first run is a full backup.
    pub fn new(
        schedule: BackupSchedule,
        repo: Arc<Repository>,
        volumes: Arc<dyn VolumeBackend>,
    ) -> Self {
        Scheduler {
            schedule,
            repo,
            volumes,
            running: Arc::new(AtomicBool::new(false)),
            last: Arc::new(Mutex::new(None)),
        }
    }

    /// Starts the run due at `scheduled` unless the previous one still runs
    /// (then reports [`RunOutcome::Skipped`] at once). The outcome is sent
    /// on `reports`.
    pub fn trigger(&self, scheduled: DateTime<Utc>, reports: mpsc::UnboundedSender<RunOutcome>) {
        if self
            .running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            warn!(schedule = %self.schedule.name, %scheduled, "previous run still going: skipped");
            let _ = reports.send(RunOutcome::Skipped { scheduled });
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = match this.run_once(scheduled).await {
                Ok((backup, pruned)) => RunOutcome::Completed {
                    scheduled,
                    backup,
                    pruned,
                },
                Err(e) => RunOutcome::Failed {
                    scheduled,
                    error: e.to_string(),
                },
            };
            this.running.store(false, Ordering::Release);
            let _ = reports.send(outcome);
        });
    }

    async fn run_once(&self, scheduled: DateTime<Utc>) -> Result<(BackupInfo, Vec<String>)> {
        let s = &self.schedule;
        let snap = format!("{}-{}", s.name, scheduled.format("%Y%m%dT%H%M%SZ"));
        self.volumes.snapshot(&s.volume, &snap).await?;
        let mut last = self.last.lock().await;
        let base = last.as_ref().map(|(id, _)| id.clone());
        let backup = self
            .repo
            .backup(
                self.volumes.clone(),
                VolumeBackupRequest {
                    volume: s.volume.clone(),
                    snapshot: snap.clone(),
                    base,
                    metadata: vec![("schedule".into(), s.name.clone())],
                },
                None,
            )
            .await?;
        if let Some((_, old_snap)) = last.replace((backup.id.clone(), snap))
            && let Err(e) = self.volumes.delete_snapshot(&s.volume, &old_snap).await
        {
            warn!(snapshot = %old_snap, error = %e, "could not delete the previous run's snapshot");
        }
        drop(last);
        let pruned = if s.retention.is_empty() {
            Vec::new()
        } else {
            self.repo.prune(&s.retention).await?
        };
        info!(schedule = %s.name, backup = %backup.id, "scheduled backup done");
        Ok((backup, pruned))
    }

    /// Triggers runs on time until `stop` turns true.
    pub async fn run(
        &self,
        mut stop: watch::Receiver<bool>,
        reports: mpsc::UnboundedSender<RunOutcome>,
    ) -> Result<()> {
        loop {
            let next = self.schedule.next_after(Utc::now())?;
            let wait = (next - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(wait) => self.trigger(next, reports.clone()),
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn cron_expressions_parse_and_step() {
        let s =
            BackupSchedule::new("n", "30 2 * * *", "v", RetentionPolicy::default()).expect("parse");
        let t = Utc
            .with_ymd_and_hms(2026, 3, 1, 3, 0, 0)
            .single()
            .unwrap_or_default();
        let next = s.next_after(t).expect("next");
        assert_eq!(next.to_rfc3339(), "2026-03-02T02:30:00+00:00");
        assert!(BackupSchedule::new("n", "not cron", "v", RetentionPolicy::default()).is_err());
    }
}
