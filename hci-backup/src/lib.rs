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
//!   pruning, streaming parallel restore.
//! - [`gc`]: garbage collection with repacking, safe against concurrent backups.
//! - [`job`]: progress (bytes, rate) and cancellation of long jobs.
//! - [`format`](mod@format): the on-target object formats and their (panic-free) parsers.
//! - [`vm`]: whole-VM backups (VM spec + volume specs + every volume) and
//!   their restore under a new name.
//! - [`retention`]: keep-last/daily/weekly/monthly as a pure function.
//! - [`schedule`]: cron-scheduled snapshot + incremental backup + prune runs
//!   that skip (and report) a run overlapping the previous one.
#![deny(missing_docs)]

pub mod format;
pub mod gc;
pub mod job;
pub mod repo;
pub mod retention;
pub mod schedule;
pub mod target;
pub mod vm;

pub use format::Cipher;
pub use gc::{GcOptions, GcReport};
pub use job::{CancelToken, Job, JobProgress};
pub use repo::{Repository, read_key_file};
pub use retention::{RetentionPolicy, select_keep};
pub use schedule::{BackupSchedule, RunOutcome, Scheduler};
pub use target::{FsTarget, ObjectStoreTarget, S3Config, S3Target, open_target};
pub use vm::{VmBackupRequest, VmManifest, VmRestorePlan, VmVolumeBackup, VmVolumeRequest};
