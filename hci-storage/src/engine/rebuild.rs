//! Rebuild: bringing a new or stale replica back in sync while the volume
//! stays in use.
//!
//! 1. Snapshot layers, oldest first: for each snapshot the target lacks, the
//!    target's head is made equal to the source's snapshot and the snapshot is
//!    taken on the target (the target gets no live writes yet, and snapshots
//!    are immutable, so nothing races).
//! 2. The target joins as [`ReplicaState::Rebuilding`]: it receives every live
//!    write from now on.
//! 3. The head is compared chunk by chunk with writes to that chunk quiesced;
//!    chunks unallocated on both sides are skipped without reading, and only
//!    4 KiB blocks that differ are sent (holes as zeroes, which punch).
//! 4. The target becomes healthy and a new membership epoch is recorded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hci_core::block::{BLOCK_SIZE, BlockDevice, WriteFlags, ZeroFlags};
use hci_core::volume::{CreateVolume, OpenVolume};
use hci_core::{Error, Result};

use super::{Member, ReplicaState, ReplicatedVolume};
use crate::replica::dirty::runs_of;
use crate::replica::{DirtyRegions, DirtyUpdate, ReplicaNode};

/// Bytes compared per step (and held quiesced during the head pass).
const CHUNK: u64 = 1 << 20;

/// Live progress of a rebuild (shared; read it from another task).
#[derive(Debug, Default)]
pub struct RebuildProgress {
    /// Bytes compared so far, over every layer.
    pub done: AtomicU64,
    /// Bytes to compare in total (volume size × layers to copy).
    pub total: AtomicU64,
    /// Bytes written to the target.
    pub sent: AtomicU64,
}

/// What a finished rebuild did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    /// Bytes compared.
    pub bytes_scanned: u64,
    /// Bytes written to the target.
    pub bytes_sent: u64,
    /// Snapshot layers copied.
    pub snapshots_copied: usize,
}

fn open_opts(v: &ReplicatedVolume, read_only: bool) -> OpenVolume {
    OpenVolume {
        read_only,
        encryption_key: v.key().cloned(),
    }
}

/// True if any byte of `[off, off+len)` is allocated with data.
async fn has_data(dev: &dyn BlockDevice, off: u64, len: u64) -> Result<bool> {
    let mut at = off;
    while at < off + len {
        let ext = dev.block_status(at, off + len - at).await?;
        let Some(last) = ext.last() else {
            return Err(Error::invalid("block status reply", "no extents"));
        };
        if ext.iter().any(|e| !e.kind.reads_zero()) {
            return Ok(true);
        }
        if last.end() <= at {
            return Err(Error::invalid("block status reply", "does not advance"));
        }
        at = last.end();
    }
    Ok(false)
}

/// Makes `dst` read like `src` over `[0, size)`, sending at most `rate`
/// bytes per second (the limit paces between chunks, never while writes are
/// quiesced).
pub(crate) async fn sync(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    size: u64,
    quiesce: Option<&tokio::sync::RwLock<()>>,
    progress: &RebuildProgress,
    rate: Option<u64>,
) -> Result<()> {
    sync_ranges(src, dst, &[(0, size)], quiesce, progress, rate).await
}

/// Like [`sync`], over the byte ranges `(offset, len)` only.
pub(crate) async fn sync_ranges(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    ranges: &[(u64, u64)],
    quiesce: Option<&tokio::sync::RwLock<()>>,
    progress: &RebuildProgress,
    rate: Option<u64>,
) -> Result<()> {
    let started = std::time::Instant::now();
    let sent_before = progress.sent.load(Ordering::Relaxed);
    for &(start, len) in ranges {
        sync_range(
            src,
            dst,
            start,
            start + len,
            quiesce,
            progress,
            rate,
            started,
            sent_before,
        )
        .await?;
    }
    dst.flush().await
}

#[allow(clippy::too_many_arguments)]
async fn sync_range(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    start: u64,
    size: u64,
    quiesce: Option<&tokio::sync::RwLock<()>>,
    progress: &RebuildProgress,
    rate: Option<u64>,
    started: std::time::Instant,
    sent_before: u64,
) -> Result<()> {
    // Buffers reused for every chunk (fresh 1 MiB allocations page-fault);
    // `zeros` stands for a side without data.
    let mut sbuf = vec![0u8; CHUNK as usize];
    let mut dbuf = vec![0u8; CHUNK as usize];
    let zeros = vec![0u8; CHUNK as usize];
    let mut off = start;
    while off < size {
        if let Some(rate) = rate.filter(|&r| r > 0) {
            let sent = progress.sent.load(Ordering::Relaxed) - sent_before;
            let due = std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let n = CHUNK.min(size - off);
        let _g = match quiesce {
            Some(q) => Some(q.write().await),
            None => None,
        };
        // Both sides at once: each is a round trip to a replica server.
        let (s_data, d_data) =
            futures::future::join(has_data(src, off, n), has_data(dst, off, n)).await;
        let (s_data, d_data) = (s_data?, d_data?);
        if s_data || d_data {
            let (sb, db) = (&mut sbuf[..n as usize], &mut dbuf[..n as usize]);
            let read_s = async {
                if s_data {
                    src.read_at(sb, off).await
                } else {
                    Ok(())
                }
            };
            let read_d = async {
                if d_data {
                    dst.read_at(db, off).await
                } else {
                    Ok(())
                }
            };
            let (rs, rd) = futures::future::join(read_s, read_d).await;
            rs?;
            rd?;
            let s = if s_data {
                &sbuf[..n as usize]
            } else {
                &zeros[..n as usize]
            };
            let d = if d_data {
                &dbuf[..n as usize]
            } else {
                &zeros[..n as usize]
            };
            let bs = BLOCK_SIZE as usize;
            let mut i = 0;
            while i < s.len() {
                let end = (i + bs).min(s.len());
                if s[i..end] == d[i..end] {
                    i = end;
                    continue;
                }
                // A run of differing blocks, all-zero or all-data in the source.
                let zero = s[i..end].iter().all(|&b| b == 0);
                let mut j = end;
                while j < s.len() {
                    let e = (j + bs).min(s.len());
                    if s[j..e] == d[j..e] || s[j..e].iter().all(|&b| b == 0) != zero {
                        break;
                    }
                    j = e;
                }
                let at = off + i as u64;
                if zero {
                    dst.write_zeroes(at, (j - i) as u64, ZeroFlags::default())
                        .await?;
                } else {
                    dst.write_at(&s[i..j], at, WriteFlags::default()).await?;
                    progress.sent.fetch_add((j - i) as u64, Ordering::Relaxed);
                }
                i = j;
            }
        }
        progress.done.fetch_add(n, Ordering::Relaxed);
        off += n;
    }
    Ok(())
}

impl ReplicatedVolume {
    /// Adds `node` as a replica (creating the volume there if missing, or
    /// reusing a stale copy) and rebuilds it while the volume stays in use;
    /// returns when it is healthy. `progress` is updated as it goes.
    pub async fn add_replica(
        &self,
        node: Arc<dyn ReplicaNode>,
        progress: Arc<RebuildProgress>,
    ) -> Result<RebuildReport> {
        self.writable()?;
        let name = self.name().to_string();
        let label = node.label();
        if self.all().iter().any(|m| {
            m.node.label() == label
                && matches!(m.state(), ReplicaState::Healthy | ReplicaState::Rebuilding)
        }) {
            return Err(Error::already_exists(
                "replica",
                format!("{name} on {label}"),
            ));
        }
        let source = self
            .healthy_nodes()
            .into_iter()
            .next()
            .ok_or_else(|| super::faulted(&name))?;
        let size = self.size();
        node.fence(&name, self.generation()).await?;
        let src_snaps = source.backend().list_snapshots(&name).await?;
        let mut have: Vec<String> = match node.backend().list_snapshots(&name).await {
            Ok(s) => s.into_iter().map(|s| s.name).collect(),
            Err(e) if e.is_not_found() => {
                node.backend()
                    .create(
                        &name,
                        CreateVolume {
                            size,
                            encryption_key: self.key().cloned(),
                        },
                    )
                    .await?;
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let prefix_ok =
            have.len() <= src_snaps.len() && have.iter().zip(&src_snaps).all(|(a, b)| *a == b.name);
        if !prefix_ok {
            // Diverged history: start over from an empty replica.
            node.backend().delete(&name).await?;
            node.backend()
                .create(
                    &name,
                    CreateVolume {
                        size,
                        encryption_key: self.key().cloned(),
                    },
                )
                .await?;
            have.clear();
        }
        let info = node.backend().info(&name).await?;
        if info.size < size {
            node.backend().expand(&name, size).await?;
        }
        let target = node
            .open_fenced(&name, self.generation(), open_opts(self, false))
            .await?;
        let mut copied = 0;
        loop {
            let snaps = source.backend().list_snapshots(&name).await?;
            let missing: Vec<_> = snaps.iter().skip(have.len()).cloned().collect();
            progress.total.fetch_add(
                missing.iter().map(|s| s.size).sum::<u64>(),
                Ordering::Relaxed,
            );
            for s in missing {
                let view = source
                    .backend()
                    .open_snapshot(&name, &s.name, open_opts(self, true))
                    .await?;
                sync(
                    &*view,
                    &*target,
                    s.size.min(view.size()),
                    None,
                    &progress,
                    self.options().rebuild_rate,
                )
                .await?;
                node.backend().snapshot(&name, &s.name).await?;
                have.push(s.name);
                copied += 1;
            }
            // Join the write set with snapshots excluded, if none appeared meanwhile.
            let _q = self.quiesce.write().await;
            if source.backend().list_snapshots(&name).await?.len() != have.len() {
                continue;
            }
            // Its dirty-region log starts with every region marked elsewhere
            // (no write is in flight while writes are quiesced).
            let _log = self.dirty.log_lock.lock().await;
            let region_size = self.dirty.region_size();
            node.update_dirty(&name, self.generation(), DirtyUpdate::Reset { region_size })
                .await?;
            node.update_dirty(
                &name,
                self.generation(),
                DirtyUpdate::Mark(DirtyRegions {
                    region_size,
                    runs: runs_of(self.dirty.marked()),
                }),
            )
            .await?;
            let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            let m = Arc::new(Member {
                node: node.clone(),
                dev: std::sync::Mutex::new(Some(target.clone())),
                state: std::sync::Mutex::new(ReplicaState::Rebuilding),
            });
            match members.iter().position(|m| m.node.label() == label) {
                Some(i) => members[i] = m,
                None => members.push(m),
            }
            break;
        }
        progress.total.fetch_add(self.size(), Ordering::Relaxed);
        let src_dev = self
            .healthy()
            .into_iter()
            .find_map(|m| m.dev())
            .ok_or_else(|| super::faulted(&name))?;
        let r = sync(
            &*src_dev,
            &*target,
            self.size(),
            Some(&self.quiesce),
            &progress,
            self.options().rebuild_rate,
        )
        .await;
        let member = self
            .all()
            .into_iter()
            .find(|m| m.node.label() == label)
            .ok_or_else(|| Error::Cancelled)?;
        if let Err(e) = r {
            if member.state() == ReplicaState::Rebuilding {
                self.fail(&member, format!("rebuild failed: {e}"));
            }
            return Err(e);
        }
        if member.state() != ReplicaState::Rebuilding {
            return Err(Error::Unavailable {
                what: format!("replica {label}"),
                source: Some("failed during its rebuild".into()),
            });
        }
        member.set_state(ReplicaState::Healthy);
        self.new_epoch().await?;
        tracing::info!(volume = %name, replica = %label, "rebuild finished");
        Ok(RebuildReport {
            bytes_scanned: progress.done.load(Ordering::Relaxed),
            bytes_sent: progress.sent.load(Ordering::Relaxed),
            snapshots_copied: copied,
        })
    }

    /// Removes the replica on the node labelled `label` from the set.
    pub async fn remove_replica(&self, label: &str) -> Result<()> {
        let _q = self.quiesce.write().await;
        {
            let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            let before = members.len();
            let healthy_left = members
                .iter()
                .filter(|m| m.node.label() != label && m.state() == ReplicaState::Healthy)
                .count();
            if healthy_left == 0 {
                return Err(Error::Busy {
                    kind: "replica",
                    name: label.to_string(),
                    reason: "it is the last healthy replica".into(),
                });
            }
            members.retain(|m| m.node.label() != label);
            if members.len() == before {
                return Err(Error::not_found("replica", label));
            }
        }
        self.new_epoch().await
    }
}
