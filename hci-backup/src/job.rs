//! Progress and cancellation of long jobs (backup, restore, verify).
//!
//! A [`Job`] carries a [`CancelToken`] and, optionally, a channel on which
//! the job publishes [`JobProgress`] (bytes done of total, bytes uploaded,
//! elapsed time, rate). A cancelled job stops at its next piece boundary
//! and returns [`Error::Cancelled`](hci_core::Error::Cancelled); a cancelled backup writes no manifest,
//! so the target only gains unreferenced (still valid) packs that garbage
//! collection reclaims.

use std::time::{Duration, Instant};

use hci_core::Result;
use hci_core::backup::BackupProgress;
use tokio::sync::watch;

pub use hci_core::cancel::CancelToken;

/// Progress of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobProgress {
    /// Bytes to process in total (volume bytes read or restored).
    pub total_bytes: u64,
    /// Bytes processed so far.
    pub done_bytes: u64,
    /// Bytes uploaded (after deduplication, compression, encryption).
    pub uploaded_bytes: u64,
    /// Time since the job started.
    pub elapsed: Duration,
    /// Average rate of `done_bytes` so far, in bytes per second.
    pub bytes_per_second: u64,
}

impl JobProgress {
    /// Done as a fraction in `0.0..=1.0` (1.0 for an empty job).
    pub fn fraction(&self) -> f64 {
        if self.total_bytes == 0 {
            1.0
        } else {
            (self.done_bytes as f64 / self.total_bytes as f64).min(1.0)
        }
    }

    /// Estimated time left at the average rate so far.
    pub fn eta(&self) -> Option<Duration> {
        if self.bytes_per_second == 0 {
            return None;
        }
        let left = self.total_bytes.saturating_sub(self.done_bytes);
        Some(Duration::from_secs_f64(
            left as f64 / self.bytes_per_second as f64,
        ))
    }
}

/// How a caller follows and controls a job.
#[derive(Debug, Clone, Default)]
pub struct Job {
    /// Cancels the job.
    pub cancel: CancelToken,
    progress: Option<watch::Sender<JobProgress>>,
    legacy: Option<watch::Sender<BackupProgress>>,
}

impl Job {
    /// A job nobody watches, cancellable through [`Job::cancel`].
    pub fn new() -> Self {
        Job::default()
    }

    /// Publishes progress on `tx`.
    pub fn with_progress(mut self, tx: watch::Sender<JobProgress>) -> Self {
        self.progress = Some(tx);
        self
    }

    /// Uses `token` to cancel the job.
    pub fn with_cancel(mut self, token: CancelToken) -> Self {
        self.cancel = token;
        self
    }

    /// Publishes progress in the shape of hci-core's [`BackupProgress`].
    pub fn with_backup_progress(mut self, tx: Option<watch::Sender<BackupProgress>>) -> Self {
        self.legacy = tx;
        self
    }

    pub(crate) fn tracker(&self, total_bytes: u64) -> Tracker {
        let t = Tracker {
            job: self.clone(),
            start: Instant::now(),
            p: JobProgress {
                total_bytes,
                ..Default::default()
            },
        };
        t.publish();
        t
    }
}

/// Progress accounting of one running job.
#[derive(Debug)]
pub(crate) struct Tracker {
    job: Job,
    start: Instant,
    p: JobProgress,
}

impl Tracker {
    /// Records `done` more bytes processed and `uploaded` more stored.
    pub(crate) fn add(&mut self, done: u64, uploaded: u64) {
        self.p.done_bytes += done;
        self.p.uploaded_bytes += uploaded;
    }

    /// Sends the current progress to whoever watches.
    pub(crate) fn publish(&self) {
        let mut p = self.p.clone();
        p.elapsed = self.start.elapsed();
        let secs = p.elapsed.as_secs_f64();
        if secs > 0.0 {
            p.bytes_per_second = (p.done_bytes as f64 / secs) as u64;
        }
        if let Some(tx) = &self.job.legacy {
            tx.send_replace(BackupProgress {
                total_bytes: p.total_bytes,
                done_bytes: p.done_bytes,
                uploaded_bytes: p.uploaded_bytes,
            });
        }
        if let Some(tx) = &self.job.progress {
            tx.send_replace(p);
        }
    }

    /// `Err(Cancelled)` once the job is cancelled.
    pub(crate) fn check(&self) -> Result<()> {
        self.job.cancel.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cancel_wakes_waiters_and_fails_checks() {
        let t = CancelToken::new();
        assert!(t.check().is_ok());
        let t2 = t.clone();
        let waiter = tokio::spawn(async move { t2.cancelled().await });
        t.cancel();
        waiter.await.expect("waiter");
        assert!(matches!(t.check(), Err(hci_core::Error::Cancelled)));
    }

    #[test]
    fn progress_reports_rate_and_fraction() {
        let (tx, rx) = watch::channel(JobProgress::default());
        let job = Job::new().with_progress(tx);
        let mut t = job.tracker(200);
        t.add(100, 10);
        t.publish();
        let p = rx.borrow().clone();
        assert_eq!(
            (p.done_bytes, p.uploaded_bytes, p.total_bytes),
            (100, 10, 200)
        );
        assert!((p.fraction() - 0.5).abs() < 1e-9);
        assert!(p.bytes_per_second > 0);
    }
}
