//! # hci-backup
//!
//! Incremental, deduplicated, compressed and optionally encrypted backups of
//! hci volumes and VMs to filesystem and S3-compatible targets, driven by
//! changed-block tracking, implementing hci-core's `BackupTarget` and
//! `BackupEngine`.
//!
//! **Status: not implemented yet** (tracked in issue #8). The crate exists so
//! the workspace has its final shape; it exports nothing.
#![deny(missing_docs)]
