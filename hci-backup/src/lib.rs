//! # hci-backup
//!
//! Incremental, deduplicated, compressed and optionally encrypted backups of
//! hci volumes to filesystem and S3-compatible targets, driven by
//! changed-block tracking.
//!
//! - [`target`]: [`BackupTarget`](hci_core::backup::BackupTarget)s on the
//!   `object_store` crate ([`FsTarget`], [`S3Target`], [`open_target`] for
//!   `file://` and `s3://` URLs).
//! - [`repo`]: the [`Repository`], a content-addressed piece store in packs
//!   implementing [`BackupEngine`](hci_core::backup::BackupEngine), with
//!   garbage collection and pruning.
//! - [`format`](mod@format): the on-target object formats and their (panic-free) parsers.
//! - [`retention`]: keep-last/daily/weekly/monthly as a pure function.
//! - [`schedule`]: cron-scheduled snapshot + incremental backup + prune runs
//!   that skip (and report) a run overlapping the previous one.
#![deny(missing_docs)]

pub mod format;
pub mod repo;
pub mod retention;
pub mod schedule;
pub mod target;

pub use repo::{GcOptions, GcReport, Repository, read_key_file};
pub use retention::{RetentionPolicy, select_keep};
pub use schedule::{BackupSchedule, RunOutcome, Scheduler};
pub use target::{FsTarget, ObjectStoreTarget, S3Config, S3Target, open_target};
