//! Garbage collection: reclaims packs no backup needs, and repacks packs
//! that are mostly dead.
//!
//! A run has two phases.
//!
//! **Mark.** The live pieces are those of every manifest (one listing of
//! `backups/`; a manifest that cannot be read stops the run before anything
//! is deleted). With one listing of `index/` and of `packs/`, each pack is
//! classed: *dead* (no live piece, or no index: a backup killed between its
//! two writes), *sparse* (live bytes below [`GcOptions::repack_below`] of
//! the pack) or kept. A sparse pack's live pieces are copied, still sealed
//! and after checking them, into new packs. Dead and repacked packs are
//! recorded in a mark `gc/<id>`, then the mark's visibility time in
//! `gc/<id>.visible` once the mark is stored.
//!
//! **Sweep.** A marked pack is deleted (index first, then pack) when its
//! mark has been visible for [`GcOptions::grace`], no backup that may have
//! missed the mark still runs (a live lock no younger than the visibility
//! time: a backup takes its lock before it reads the marks, and never
//! deduplicates against marked packs), and every piece the pack holds that
//! is live *now* is also held by a pack that stays. Locks are read before
//! the live set is recomputed, so a backup that finishes meanwhile is
//! either still locked or already counted.
//!
//! Deleting a backup only deletes its manifest: nothing is listed per
//! deletion, a run reclaims the space of any number of deletions.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{info, instrument, warn};

use hci_core::{Error, Result};

use crate::format::{self, IndexEntry, Manifest, PieceId};
use crate::repo::{
    Located, LockFile, Packer, Repository, json_err, new_id, now, pack_key, read_groups,
};

/// A GC mark: packs found dead or repacked.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct GcMark {
    pub(crate) created: DateTime<Utc>,
    pub(crate) packs: Vec<String>,
}

/// When a mark became visible to backups.
#[derive(Debug, Serialize, Deserialize)]
struct MarkVisible {
    visible: DateTime<Utc>,
}

const VISIBLE_SUFFIX: &str = ".visible";

/// Options of a garbage collection run.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// How long a pack stays marked before it may be deleted.
    pub grace: Duration,
    /// Locks older than this are considered left by a killed backup.
    pub stale_lock: Duration,
    /// Packs whose live bytes are below this fraction of their size are
    /// repacked (0 disables repacking).
    pub repack_below: f64,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            stale_lock: Duration::from_secs(24 * 3600),
            repack_below: 0.5,
        }
    }
}

/// What a GC run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Packs referenced by some backup.
    pub live_packs: usize,
    /// Unreferenced packs marked for deletion by this run.
    pub marked_packs: usize,
    /// Partly dead packs whose live pieces this run copied into new packs
    /// (and marked for deletion).
    pub repacked_packs: usize,
    /// Bytes of live pieces copied by repacking.
    pub repacked_bytes: u64,
    /// Packs deleted by this run.
    pub deleted_packs: usize,
    /// Bytes freed.
    pub deleted_bytes: u64,
}

/// Manifests by id, loaded once per run (a manifest never changes).
#[derive(Default)]
struct LiveSet {
    manifests: HashMap<String, Vec<PieceId>>,
}

impl LiveSet {
    /// Lists `backups/` and returns the live pieces of the backups there.
    async fn refresh(&mut self, repo: &Repository) -> Result<HashSet<PieceId>> {
        let mut present = HashSet::new();
        for m in repo.target().list("backups/").await? {
            let id = m.key.trim_start_matches("backups/").to_string();
            if !self.manifests.contains_key(&id) {
                let man: Manifest = match repo.load_manifest(&id).await {
                    Ok(man) => man,
                    // Deleted since the listing: its pieces are not live.
                    Err(Error::NotFound { .. }) => continue,
                    Err(e) => return Err(e),
                };
                self.manifests
                    .insert(id.clone(), man.pieces.iter().map(|p| p.0).collect());
            }
            present.insert(id);
        }
        self.manifests.retain(|id, _| present.contains(id));
        Ok(self.manifests.values().flatten().copied().collect())
    }
}

impl Repository {
    /// The GC marks on the target (not their visibility records).
    pub(crate) async fn read_marks(&self) -> Result<Vec<(String, GcMark)>> {
        let mut out = Vec::new();
        for m in self.target().list("gc/").await? {
            if m.key.ends_with(VISIBLE_SUFFIX) {
                continue;
            }
            let raw = self.target().get(&m.key).await?;
            let mark: GcMark = serde_json::from_slice(&raw).map_err(|e| json_err(&m.key, e))?;
            out.push((m.key, mark));
        }
        Ok(out)
    }

    /// Creation times of the locks of backups that may still run.
    async fn live_locks(&self, stale: Duration) -> Result<Vec<DateTime<Utc>>> {
        let stale = chrono::Duration::from_std(stale).unwrap_or(chrono::Duration::MAX);
        let mut locks = Vec::new();
        for l in self.target().list("locks/").await? {
            let Ok(raw) = self.target().get(&l.key).await else {
                continue; // finished meanwhile
            };
            match serde_json::from_slice::<LockFile>(&raw) {
                Ok(lf) if now() - lf.created < stale => locks.push(lf.created),
                Ok(_) => {}
                Err(e) => warn!(lock = %l.key, error = %e, "unreadable lock ignored"),
            }
        }
        Ok(locks)
    }

    /// Copies the given live pieces of `pack` (still sealed, after checking
    /// each) into `packer`. Returns the bytes copied.
    async fn repack(&self, pack: &str, entries: &[IndexEntry], packer: &mut Packer) -> Result<u64> {
        let located: Vec<Located> = entries
            .iter()
            .map(|e| Located {
                pack: pack.to_string(),
                entry: *e,
            })
            .collect();
        let mut copied = 0;
        for g in read_groups(&located) {
            let key = pack_key(pack);
            let data = self.target().get_range(&key, g.start..g.end).await?;
            // Checking is what repacking costs: damage is never copied.
            self.fetch_group(g.clone()).await?;
            for e in &g.entries {
                let a = (e.offset - g.start) as usize;
                let b = a + e.stored_len as usize;
                let sealed = data
                    .get(a..b)
                    .ok_or_else(|| format::corrupt(&key, "piece beyond the end of the pack"))?;
                packer.push(e.id, sealed, e.raw_len).await?;
                copied += sealed.len() as u64;
            }
        }
        Ok(copied)
    }

    /// Runs garbage collection (see the [module docs](crate::gc)).
    #[instrument(skip(self))]
    pub async fn gc(&self, opts: GcOptions) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut live_set = LiveSet::default();
        let live = live_set.refresh(self).await?;

        // Every index, once.
        let mut indexes: HashMap<String, Vec<IndexEntry>> = HashMap::new();
        let mut unreadable: HashSet<String> = HashSet::new();
        for m in self.target().list("index/").await? {
            let pack = m.key.trim_start_matches("index/").to_string();
            match self.load_index(&pack).await {
                Ok(entries) => {
                    indexes.insert(pack, entries);
                }
                Err(e) => {
                    warn!(pack = %pack, error = %e, "unreadable index: pack kept");
                    unreadable.insert(pack);
                }
            }
        }
        let mut sizes: HashMap<String, u64> = HashMap::new();
        let mut dead: Vec<String> = Vec::new();
        for m in self.target().list("packs/").await? {
            if let Some(p) = m.key.rsplit('/').next() {
                if !indexes.contains_key(p) && !unreadable.contains(p) {
                    dead.push(p.to_string()); // a backup killed between pack and index
                }
                sizes.insert(p.to_string(), m.size);
            }
        }
        let already: HashSet<String> = self
            .read_marks()
            .await?
            .into_iter()
            .flat_map(|(_, m)| m.packs)
            .collect();
        let mut sparse: Vec<(String, Vec<IndexEntry>)> = Vec::new();
        for (pack, entries) in &indexes {
            let live_entries: Vec<IndexEntry> = entries
                .iter()
                .filter(|e| live.contains(&e.id))
                .copied()
                .collect();
            if live_entries.is_empty() {
                dead.push(pack.clone());
                continue;
            }
            report.live_packs += 1;
            let live_bytes: u64 = live_entries.iter().map(|e| u64::from(e.stored_len)).sum();
            let size = sizes.get(pack).copied().unwrap_or(0);
            if !already.contains(pack)
                && size > 0
                && (live_bytes as f64) < opts.repack_below * size as f64
            {
                sparse.push((pack.clone(), live_entries));
            }
        }

        // Repack sparse packs: a live piece some other kept pack holds is not copied.
        let sparse_set: HashSet<&str> = sparse.iter().map(|(p, _)| p.as_str()).collect();
        let mut held_elsewhere: HashSet<PieceId> = HashSet::new();
        for (pack, entries) in &indexes {
            if !sparse_set.contains(pack.as_str()) && !already.contains(pack) {
                held_elsewhere.extend(entries.iter().map(|e| e.id));
            }
        }
        let mut packer = Packer::new(self);
        let mut repacked: Vec<String> = Vec::new();
        for (pack, live_entries) in &sparse {
            let to_copy: Vec<IndexEntry> = live_entries
                .iter()
                .filter(|e| held_elsewhere.insert(e.id))
                .copied()
                .collect();
            match self.repack(pack, &to_copy, &mut packer).await {
                Ok(n) => {
                    report.repacked_bytes += n;
                    repacked.push(pack.clone());
                }
                Err(e) => {
                    warn!(pack = %pack, error = %e, "cannot repack: pack kept (run verify)");
                    for e in &to_copy {
                        held_elsewhere.remove(&e.id);
                    }
                }
            }
        }
        packer.finish().await?;
        report.repacked_packs = repacked.len();

        // Record the mark, then when it became visible.
        let mut packs: Vec<String> = dead
            .into_iter()
            .chain(repacked)
            .filter(|p| !already.contains(p))
            .collect();
        packs.sort();
        packs.dedup();
        report.marked_packs = packs.len();
        if !packs.is_empty() {
            let mark_key = format!("gc/{}", new_id());
            let mark = GcMark {
                created: now(),
                packs,
            };
            let data = serde_json::to_vec(&mark).map_err(|e| json_err("gc mark", e))?;
            self.target().put_new(&mark_key, Bytes::from(data)).await?;
            let vis = serde_json::to_vec(&MarkVisible { visible: now() })
                .map_err(|e| json_err("gc mark", e))?;
            self.target()
                .put_new(&format!("{mark_key}{VISIBLE_SUFFIX}"), Bytes::from(vis))
                .await?;
        }

        self.sweep(&opts, &mut live_set, &sizes, &mut report)
            .await?;
        info!(?report, "gc finished");
        Ok(report)
    }

    async fn sweep(
        &self,
        opts: &GcOptions,
        live_set: &mut LiveSet,
        sizes: &HashMap<String, u64>,
        report: &mut GcReport,
    ) -> Result<()> {
        let grace = chrono::Duration::from_std(opts.grace).unwrap_or(chrono::Duration::MAX);
        let stale = chrono::Duration::from_std(opts.stale_lock).unwrap_or(chrono::Duration::MAX);
        let cutoff = now() - grace;
        let marks = self.read_marks().await?;
        let mut visible: HashMap<String, DateTime<Utc>> = HashMap::new();
        for m in self.target().list("gc/").await? {
            if let Some(mark) = m.key.strip_suffix(VISIBLE_SUFFIX) {
                let raw = self.target().get(&m.key).await?;
                let v: MarkVisible =
                    serde_json::from_slice(&raw).map_err(|e| json_err(&m.key, e))?;
                visible.insert(mark.to_string(), v.visible);
            }
        }
        // Locks before the live set: see the module docs.
        let locks = self.live_locks(opts.stale_lock).await?;
        let due: Vec<&(String, GcMark)> = marks
            .iter()
            .filter(|(key, _)| {
                visible
                    .get(key)
                    .is_some_and(|v| *v <= cutoff && !locks.iter().any(|l| l <= v))
            })
            .collect();
        // A mark whose visibility was never recorded (GC killed between the
        // two writes) is dropped once old: a later run marks its packs again.
        for (key, m) in &marks {
            if !visible.contains_key(key) && now() - m.created > stale {
                self.delete_quietly(key).await?;
            }
        }
        if due.is_empty() {
            return Ok(());
        }
        let live = live_set.refresh(self).await?;
        let doomed: HashSet<&str> = due
            .iter()
            .flat_map(|(_, m)| m.packs.iter().map(String::as_str))
            .collect();
        // Live pieces held by packs that stay.
        let mut kept: HashSet<PieceId> = HashSet::new();
        let mut doomed_live: HashMap<String, Vec<PieceId>> = HashMap::new();
        for m in self.target().list("index/").await? {
            let pack = m.key.trim_start_matches("index/").to_string();
            let entries = match self.load_index(&pack).await {
                Ok(e) => e,
                Err(_) if doomed.contains(pack.as_str()) => {
                    // Cannot tell what it holds: keep it.
                    doomed_live.insert(pack, vec![[0; 32]]);
                    continue;
                }
                Err(_) => continue,
            };
            let live_ids = entries.iter().map(|e| e.id).filter(|id| live.contains(id));
            if doomed.contains(pack.as_str()) {
                doomed_live.insert(pack, live_ids.collect());
            } else {
                kept.extend(live_ids);
            }
        }
        let mut deleted: HashSet<String> = HashSet::new();
        for (key, m) in due {
            for p in &m.packs {
                if deleted.contains(p) {
                    continue;
                }
                let needed = doomed_live
                    .get(p)
                    .is_some_and(|ids| ids.iter().any(|id| !kept.contains(id)));
                if needed {
                    // A backup uses it after all: unmarked with the mark
                    // below; a later run marks it again if it dies.
                    continue;
                }
                // Index first: a pack nobody can find is never deduplicated against.
                self.delete_quietly(&format!("index/{p}")).await?;
                self.delete_quietly(&pack_key(p)).await?;
                report.deleted_packs += 1;
                report.deleted_bytes += sizes.get(p).copied().unwrap_or(0);
                deleted.insert(p.clone());
            }
            self.delete_quietly(&format!("{key}{VISIBLE_SUFFIX}"))
                .await?;
            self.delete_quietly(key).await?;
        }
        Ok(())
    }

    async fn delete_quietly(&self, key: &str) -> Result<()> {
        match self.target().delete(key).await {
            Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
