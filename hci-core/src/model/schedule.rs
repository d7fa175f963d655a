//! `Schedule`: recurring snapshots and backups with retention.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::resource::{Envelope, EnvelopeRef, Resource, ResourceRef, check_envelope, resource};
use super::{BackupSource, ObjectMeta, ValidationErrors, validate_name};

resource! {
    /// A recurring snapshot or backup job with retention.
    Schedule, "Schedule", ScheduleSpec, ScheduleStatus
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What a schedule does, written `{type: snapshot}` or `{type: backup, target: s3}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ScheduleTask {
    /// Take a snapshot.
    Snapshot,
    /// Take a backup to a target.
    Backup {
        /// `BackupTarget` name.
        target: String,
    },
}

/// Desired state of a schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Five-field cron expression (`minute hour day month weekday`), in UTC.
    pub cron: String,
    /// What to do.
    pub task: ScheduleTask,
    /// The volume (or VM, for backups of a whole VM) it applies to.
    pub source: BackupSource,
    /// How many snapshots/backups made by this schedule to keep (1 to 1000).
    pub retain: u32,
    /// Paused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspend: bool,
}

/// Observed state of a schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScheduleStatus {
    /// Last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<DateTime<Utc>>,
    /// Next run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<DateTime<Utc>>,
    /// Outcome of the last run.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_result: String,
}

impl ScheduleSpec {
    /// Snapshots of volume `volume` at `cron`, keeping the last `retain`.
    pub fn snapshots(volume: impl Into<String>, cron: impl Into<String>, retain: u32) -> Self {
        ScheduleSpec {
            cron: cron.into(),
            task: ScheduleTask::Snapshot,
            source: BackupSource::Volume {
                name: volume.into(),
            },
            retain,
            suspend: false,
        }
    }

    /// Backups of `source` to backup target `target` at `cron`, keeping the last `retain`.
    pub fn backups(
        source: BackupSource,
        target: impl Into<String>,
        cron: impl Into<String>,
        retain: u32,
    ) -> Self {
        ScheduleSpec {
            cron: cron.into(),
            task: ScheduleTask::Backup {
                target: target.into(),
            },
            source,
            retain,
            suspend: false,
        }
    }

    /// The first time strictly after `after` that the schedule fires (UTC);
    /// `None` if the expression is invalid, never fires again, or the schedule is suspended.
    ///
    /// ```
    /// use chrono::{TimeZone, Utc};
    /// use hci_core::model::ScheduleSpec;
    /// let nightly = ScheduleSpec::snapshots("data", "30 3 * * *", 7);
    /// let t = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
    /// assert_eq!(nightly.next_run_after(t), Some(Utc.with_ymd_and_hms(2026, 1, 2, 3, 30, 0).unwrap()));
    /// ```
    pub fn next_run_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.suspend {
            return None;
        }
        parse_cron(&self.cron)
            .ok()?
            .find_next_occurrence(&after, false)
            .ok()
    }
}

/// Parses a five-field cron expression, explaining what is wrong.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    if expr.split_whitespace().count() != 5 {
        return Err(format!(
            "invalid cron expression {expr:?}: expected 5 fields (minute hour day month weekday), \
             e.g. \"0 3 * * *\""
        ));
    }
    expr.parse::<croner::Cron>()
        .map_err(|e| format!("invalid cron expression {expr:?}: {e}"))
}

impl Resource for Schedule {
    const KIND: &'static str = "Schedule";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }

    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::new();
        self.metadata.validate_into(&mut errs);
        if let Err(e) = parse_cron(&self.spec.cron) {
            errs.push("spec.cron", e);
        }
        if !(1..=1000).contains(&self.spec.retain) {
            errs.push(
                "spec.retain",
                format!("{} is out of range: must be 1 to 1000", self.spec.retain),
            );
        }
        if matches!(self.spec.task, ScheduleTask::Snapshot)
            && matches!(self.spec.source, BackupSource::VirtualMachine { .. })
        {
            errs.push("spec.source", "snapshot schedules apply to a volume");
        }
        for r in self.references() {
            validate_name(&r.path, &r.name, &mut errs);
        }
        errs.into_result()
    }

    fn references(&self) -> Vec<ResourceRef> {
        let mut refs = vec![match &self.spec.source {
            BackupSource::Volume { name } => ResourceRef {
                kind: "Volume",
                name: name.clone(),
                path: "spec.source.name".into(),
            },
            BackupSource::VirtualMachine { name } => ResourceRef {
                kind: "VirtualMachine",
                name: name.clone(),
                path: "spec.source.name".into(),
            },
        }];
        if let ScheduleTask::Backup { target } = &self.spec.task {
            refs.push(ResourceRef {
                kind: "BackupTarget",
                name: target.clone(),
                path: "spec.task.target".into(),
            });
        }
        refs
    }
}
