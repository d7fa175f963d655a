//! The backup repository: a content-addressed piece store in packs on a
//! [`BackupTarget`], and the [`BackupEngine`] over it.
//!
//! ## Layout on the target
//!
//! ```text
//! config                  JSON: format version, encrypted?, key check value
//! packs/<xx>/<pack-id>    concatenated sealed pieces (8–32 MiB, id = BLAKE3 of the pack)
//! index/<pack-id>         sealed pack index: piece id → offset, lengths
//! backups/<backup-id>     sealed manifest: header (JSON) + pieces + extents
//! locks/<backup-id>       JSON: a backup in progress (GC does not sweep under it)
//! gc/<mark-id>            JSON: packs found unreferenced, and when
//! ```
//!
//! Every object is written once (create-only) and in dependency order — pack,
//! then its index, then the manifest — so a backup killed at any point leaves
//! only unreferenced, still valid objects that GC later reclaims.
//!
//! ## Pieces
//!
//! The volume is cut at 64 KiB-aligned boundaries, and only inside the ranges
//! that are read: allocated ranges for a first backup, changed blocks since
//! the base for an incremental. A scattered 4 KiB change therefore becomes a
//! 4 KiB piece (not a re-upload of a 1–4 MiB chunk), and the new manifest is
//! the base's extents overlaid with the new ones: a synthetic full. All-zero
//! pieces are not stored (they restore as zeroes).
//!
//! ## Garbage collection
//!
//! `gc` marks packs that no manifest references, recording the mark; a later
//! run (after `grace`) deletes marked packs that are still unreferenced,
//! unless a backup that started before the mark may still be running (its
//! lock exists and is younger than `stale_lock`). Backups take their lock
//! before loading the index and never deduplicate against marked packs, so a
//! concurrent backup never references a pack GC deletes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, instrument, warn};

use hci_core::backup::{
    BackupEngine, BackupInfo, BackupProgress, BackupTarget, VerifyReport, VolumeBackupRequest,
};
use hci_core::block::{BlockDevice, ByteRange, WriteFlags, ZeroFlags};
use hci_core::volume::{OpenVolume, VolumeBackend};
use hci_core::{Error, Result};

use crate::format::{
    self, Extent, IndexEntry, Keys, Manifest, ManifestHeader, PieceId, corrupt, hex,
};
use crate::retention::{RetentionPolicy, select_keep};

/// Pieces are cut at multiples of this (volume offsets).
pub const PIECE_SIZE: u64 = 64 << 10;
/// A pack is closed once it holds this many bytes.
pub const PACK_TARGET: usize = 16 << 20;
/// Bytes read from the volume per processing batch.
const BATCH: u64 = 4 << 20;
const CONFIG_KEY: &str = "config";
const FORMAT_VERSION: u32 = 1;

/// The repository configuration object.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RepoConfig {
    version: u32,
    encrypted: bool,
    key_check: Option<String>,
    piece_size: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct LockFile {
    created: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize)]
struct GcMark {
    created: DateTime<Utc>,
    packs: Vec<String>,
}

/// Options of a garbage collection run.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// How long a pack stays marked before it may be deleted.
    pub grace: Duration,
    /// Locks older than this are considered left by a killed backup.
    pub stale_lock: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            stale_lock: Duration::from_secs(24 * 3600),
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
    /// Packs deleted by this run.
    pub deleted_packs: usize,
    /// Bytes freed.
    pub deleted_bytes: u64,
}

/// Reads a 32-byte key file (raw bytes, or 64 hex digits).
pub fn read_key_file(path: &Path) -> Result<[u8; 32]> {
    let data = std::fs::read(path)
        .map_err(|e| Error::io(format!("read key file {}", path.display()), e))?;
    let text = String::from_utf8_lossy(&data);
    let t = text.trim();
    let mut key = [0u8; 32];
    if data.len() == 32 {
        key.copy_from_slice(&data);
        return Ok(key);
    }
    if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|e| {
                Error::invalid(format!("key file {}", path.display()), e.to_string())
            })?;
        }
        return Ok(key);
    }
    Err(Error::invalid(
        format!("key file {}", path.display()),
        format!(
            "must hold 32 raw bytes or 64 hex digits, found {} bytes",
            data.len()
        ),
    ))
}

/// A piece located in a pack.
#[derive(Debug, Clone)]
struct Located {
    pack: String,
    entry: IndexEntry,
}

/// An extent with its piece named directly (working form of a manifest).
#[derive(Debug, Clone, Copy)]
struct Ext {
    offset: u64,
    len: u64,
    id: PieceId,
    raw_len: u32,
    piece_offset: u64,
}

/// A deduplicated, compressed, optionally encrypted backup repository.
#[derive(Debug, Clone)]
pub struct Repository {
    target: Arc<dyn BackupTarget>,
    keys: Option<Keys>,
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

fn new_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", now().format("%Y%m%dT%H%M%S%.3fZ"), &u[..8])
}

fn json_err(what: &str, e: serde_json::Error) -> Error {
    corrupt(what, format!("JSON: {e}"))
}

fn pack_key(pack: &str) -> String {
    format!("packs/{}/{pack}", pack.get(..2).unwrap_or("00"))
}

/// Cuts `ranges` at [`PIECE_SIZE`]-aligned boundaries.
fn cut(ranges: &[ByteRange], size: u64) -> Vec<ByteRange> {
    let mut out = Vec::new();
    for r in ranges {
        let mut off = r.offset.min(size);
        let end = r.end().min(size);
        while off < end {
            let next = ((off / PIECE_SIZE) + 1) * PIECE_SIZE;
            let e = next.min(end);
            out.push(ByteRange::new(off, e - off));
            off = e;
        }
    }
    out
}

/// Removes `cuts` (sorted, coalesced) from `base` extents (sorted).
fn subtract(base: Vec<Ext>, cuts: &[ByteRange]) -> Vec<Ext> {
    let mut out = Vec::with_capacity(base.len());
    let mut ci = 0;
    for e in base {
        let mut cur = e;
        let e_end = e.offset + e.len;
        while ci < cuts.len() && cuts[ci].end() <= cur.offset {
            ci += 1;
        }
        let mut j = ci;
        let mut alive = true;
        while j < cuts.len() && cuts[j].offset < e_end {
            let c = cuts[j];
            if c.offset > cur.offset {
                let keep = c.offset - cur.offset;
                out.push(Ext { len: keep, ..cur });
            }
            if c.end() >= e_end {
                alive = false;
                break;
            }
            let adv = c.end().saturating_sub(cur.offset);
            cur = Ext {
                offset: c.end(),
                len: e_end - c.end(),
                piece_offset: cur.piece_offset + adv,
                ..cur
            };
            j += 1;
        }
        if alive && cur.len > 0 {
            out.push(cur);
        }
    }
    out
}

/// Accumulates sealed pieces into packs and uploads them.
struct Packer {
    buf: Vec<u8>,
    entries: Vec<IndexEntry>,
    added: u64,
}

impl Repository {
    /// Creates a new repository on `target`; encrypted if `key` is given.
    pub async fn init(target: Arc<dyn BackupTarget>, key: Option<&[u8; 32]>) -> Result<Self> {
        let keys = key.map(Keys::derive);
        let cfg = RepoConfig {
            version: FORMAT_VERSION,
            encrypted: keys.is_some(),
            key_check: keys.as_ref().map(|k| k.check.clone()),
            piece_size: PIECE_SIZE,
        };
        let data = serde_json::to_vec_pretty(&cfg).map_err(|e| json_err("config", e))?;
        target
            .put_new(CONFIG_KEY, Bytes::from(data))
            .await
            .map_err(|e| match e {
                Error::AlreadyExists { .. } => Error::already_exists("backup repository", "config"),
                e => e,
            })?;
        Ok(Repository { target, keys })
    }

    /// Opens an existing repository; an encrypted one needs the right key.
    pub async fn open(target: Arc<dyn BackupTarget>, key: Option<&[u8; 32]>) -> Result<Self> {
        let raw = target.get(CONFIG_KEY).await.map_err(|e| match e {
            Error::NotFound { .. } => {
                Error::not_found("backup repository (no config object; run init)", CONFIG_KEY)
            }
            e => e,
        })?;
        let cfg: RepoConfig = serde_json::from_slice(&raw).map_err(|e| json_err(CONFIG_KEY, e))?;
        if cfg.version != FORMAT_VERSION {
            return Err(Error::unsupported(
                format!("repository format version {}", cfg.version),
                "this hci-backup",
            ));
        }
        let keys = match (cfg.encrypted, key) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(Error::invalid(
                    "encryption key",
                    "the repository is not encrypted",
                ));
            }
            (true, None) => {
                return Err(Error::invalid(
                    "encryption key",
                    "the repository is encrypted: a key file is required",
                ));
            }
            (true, Some(k)) => {
                let keys = Keys::derive(k);
                if cfg.key_check.as_deref() != Some(keys.check.as_str()) {
                    return Err(Error::invalid(
                        "encryption key",
                        "wrong key: it does not match the repository's key check",
                    ));
                }
                Some(keys)
            }
        };
        Ok(Repository { target, keys })
    }

    /// The target the repository lives on.
    pub fn target(&self) -> &Arc<dyn BackupTarget> {
        &self.target
    }

    async fn load_manifest(&self, id: &str) -> Result<Manifest> {
        let key = format!("backups/{id}");
        if id.is_empty() || id.contains('/') {
            return Err(Error::invalid("backup id", format!("{id:?}")));
        }
        let raw = self.target.get(&key).await.map_err(|e| match e {
            Error::NotFound { .. } => Error::not_found("backup", id),
            e => e,
        })?;
        let what = format!("manifest {key}");
        let plain = format::open_meta(self.keys.as_ref(), &raw, &what)?;
        let m = format::decode_manifest(&plain, &what)?;
        if m.header.id != id {
            return Err(corrupt(&what, "names another backup"));
        }
        Ok(m)
    }

    async fn load_index(&self, pack: &str) -> Result<Vec<IndexEntry>> {
        let key = format!("index/{pack}");
        let raw = self.target.get(&key).await?;
        let what = format!("pack index {key}");
        let plain = format::open_meta(self.keys.as_ref(), &raw, &what)?;
        format::decode_index(&plain, &what)
    }

    /// Loads every pack index (except `exclude`d packs): piece id → location.
    async fn load_all_indexes(
        &self,
        exclude: &HashSet<String>,
    ) -> Result<HashMap<PieceId, Located>> {
        let list = self.target.list("index/").await?;
        let packs: Vec<String> = list
            .into_iter()
            .filter_map(|m| m.key.strip_prefix("index/").map(str::to_string))
            .filter(|p| !exclude.contains(p))
            .collect();
        let loaded: Vec<(String, Result<Vec<IndexEntry>>)> = stream::iter(packs)
            .map(|p| async move {
                let r = self.load_index(&p).await;
                (p, r)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut map = HashMap::new();
        for (pack, r) in loaded {
            match r {
                Ok(entries) => {
                    for entry in entries {
                        map.insert(
                            entry.id,
                            Located {
                                pack: pack.clone(),
                                entry,
                            },
                        );
                    }
                }
                // A damaged index only costs deduplication here; verify reports it.
                Err(e) => warn!(pack = %pack, error = %e, "skipping unreadable pack index"),
            }
        }
        Ok(map)
    }

    async fn read_marks(&self) -> Result<Vec<(String, GcMark)>> {
        let mut out = Vec::new();
        for m in self.target.list("gc/").await? {
            let raw = self.target.get(&m.key).await?;
            let mark: GcMark = serde_json::from_slice(&raw).map_err(|e| json_err(&m.key, e))?;
            out.push((m.key, mark));
        }
        Ok(out)
    }

    async fn flush_pack(&self, p: &mut Packer) -> Result<()> {
        if p.entries.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut p.buf);
        let entries = std::mem::take(&mut p.entries);
        let pack = hex(blake3::hash(&data).as_bytes());
        let len = data.len() as u64;
        match self
            .target
            .put_new(&pack_key(&pack), Bytes::from(data))
            .await
        {
            Ok(()) | Err(Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
        let index = format::seal_meta(self.keys.as_ref(), &format::encode_index(&entries))?;
        let ilen = index.len() as u64;
        match self
            .target
            .put_new(&format!("index/{pack}"), Bytes::from(index))
            .await
        {
            Ok(()) | Err(Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
        p.added += len + ilen;
        Ok(())
    }

    fn to_ext(m: &Manifest) -> Vec<Ext> {
        m.extents
            .iter()
            .filter_map(|e| {
                let (id, raw_len) = *m.pieces.get(e.piece as usize)?;
                Some(Ext {
                    offset: e.offset,
                    len: u64::from(e.len),
                    id,
                    raw_len,
                    piece_offset: u64::from(e.piece_offset),
                })
            })
            .collect()
    }

    fn from_ext(header: ManifestHeader, exts: Vec<Ext>) -> Manifest {
        let mut table: HashMap<PieceId, u32> = HashMap::new();
        let mut pieces = Vec::new();
        let mut extents = Vec::with_capacity(exts.len());
        for e in exts {
            let idx = *table.entry(e.id).or_insert_with(|| {
                pieces.push((e.id, e.raw_len));
                (pieces.len() - 1) as u32
            });
            extents.push(Extent {
                offset: e.offset,
                len: e.len as u32,
                piece: idx,
                piece_offset: e.piece_offset as u32,
            });
        }
        Manifest {
            header,
            pieces,
            extents,
        }
    }

    async fn run_backup(
        &self,
        volumes: Arc<dyn VolumeBackend>,
        req: VolumeBackupRequest,
        progress: Option<watch::Sender<BackupProgress>>,
        id: String,
    ) -> Result<BackupInfo> {
        let dev = volumes
            .open_snapshot(&req.volume, &req.snapshot, OpenVolume::default())
            .await?;
        let size = dev.size();
        let (base_exts, ranges) = match &req.base {
            Some(b) => {
                let base = self.load_manifest(b).await?;
                if base.header.volume != req.volume {
                    return Err(Error::invalid(
                        format!("base backup {b}"),
                        format!("it is of volume {:?}", base.header.volume),
                    ));
                }
                let ranges = volumes
                    .changed_blocks(&req.volume, Some(&base.header.snapshot), &req.snapshot)
                    .await?;
                let mut exts = Self::to_ext(&base);
                exts.retain(|e| e.offset < size);
                for e in exts.iter_mut() {
                    e.len = e.len.min(size - e.offset);
                }
                (exts, ranges)
            }
            None => (
                Vec::new(),
                volumes
                    .changed_blocks(&req.volume, None, &req.snapshot)
                    .await?,
            ),
        };
        let ranges = hci_core::block::coalesce_ranges(ranges);
        let pieces = cut(&ranges, size);
        let total: u64 = pieces.iter().map(|r| r.len).sum();
        let mut prog = BackupProgress {
            total_bytes: total,
            ..Default::default()
        };
        if let Some(p) = &progress {
            p.send_replace(prog.clone());
        }

        // Dedup index, without packs GC has marked.
        let marked: HashSet<String> = self
            .read_marks()
            .await?
            .into_iter()
            .flat_map(|(_, m)| m.packs)
            .collect();
        let mut known: HashSet<PieceId> =
            self.load_all_indexes(&marked).await?.into_keys().collect();

        let mut packer = Packer {
            buf: Vec::with_capacity(PACK_TARGET + PIECE_SIZE as usize * 2),
            entries: Vec::new(),
            added: 0,
        };
        let mut new_exts: Vec<Ext> = Vec::new();
        let par = std::thread::available_parallelism().map_or(2, |n| n.get());

        // Batches of pieces, read in order, hashed/compressed in parallel.
        let mut batches: Vec<Vec<ByteRange>> = Vec::new();
        let mut cur = Vec::new();
        let mut cur_len = 0;
        for p in pieces {
            cur_len += p.len;
            cur.push(p);
            if cur_len >= BATCH {
                batches.push(std::mem::take(&mut cur));
                cur_len = 0;
            }
        }
        if !cur.is_empty() {
            batches.push(cur);
        }
        let keys = self.keys.clone();
        let mut results = stream::iter(batches)
            .map(|batch| {
                let dev = dev.clone();
                let keys = keys.clone();
                async move {
                    let mut bufs = Vec::with_capacity(batch.len());
                    for r in &batch {
                        let mut b = vec![0u8; r.len as usize];
                        dev.read_at(&mut b, r.offset).await?;
                        bufs.push(b);
                    }
                    tokio::task::spawn_blocking(move || process_batch(keys.as_ref(), batch, bufs))
                        .await
                        .map_err(|e| Error::Backend {
                            backend: "hci-backup",
                            message: "piece worker failed".into(),
                            source: Some(Box::new(e)),
                        })?
                }
            })
            .buffered(par + 1);
        while let Some(r) = results.next().await {
            for piece in r? {
                prog.done_bytes += piece.range.len;
                let Some((id, sealed)) = piece.data else {
                    continue; // zeroes
                };
                new_exts.push(Ext {
                    offset: piece.range.offset,
                    len: piece.range.len,
                    id,
                    raw_len: piece.range.len as u32,
                    piece_offset: 0,
                });
                if known.insert(id) {
                    packer.entries.push(IndexEntry {
                        id,
                        offset: packer.buf.len() as u64,
                        stored_len: sealed.len() as u32,
                        raw_len: piece.range.len as u32,
                    });
                    packer.buf.extend_from_slice(&sealed);
                    prog.uploaded_bytes += sealed.len() as u64;
                    if packer.buf.len() >= PACK_TARGET {
                        self.flush_pack(&mut packer).await?;
                    }
                }
            }
            if let Some(p) = &progress {
                p.send_replace(prog.clone());
            }
        }
        self.flush_pack(&mut packer).await?;

        let mut exts = subtract(base_exts, &ranges);
        exts.extend(new_exts);
        exts.sort_by_key(|e| e.offset);
        let header = ManifestHeader {
            id: id.clone(),
            volume: req.volume.clone(),
            snapshot: req.snapshot.clone(),
            size,
            created: now(),
            base: req.base.clone(),
            added_bytes: 0,
            metadata: req.metadata.clone(),
        };
        let mut m = Self::from_ext(header, exts);
        // Account for the manifest itself (its size depends little on this field).
        let probe = format::seal_meta(self.keys.as_ref(), &format::encode_manifest(&m)?)?;
        m.header.added_bytes = packer.added + probe.len() as u64;
        let sealed = format::seal_meta(self.keys.as_ref(), &format::encode_manifest(&m)?)?;
        self.target
            .put_new(&format!("backups/{id}"), Bytes::from(sealed))
            .await?;
        info!(backup = %id, added = m.header.added_bytes, "backup finished");
        Ok(info_of(&m.header))
    }

    /// Runs garbage collection (see the module docs).
    #[instrument(skip(self))]
    pub async fn gc(&self, opts: GcOptions) -> Result<GcReport> {
        let started = now();
        // Live pieces: every manifest must load, or nothing is deleted.
        let mut live: HashSet<PieceId> = HashSet::new();
        for m in self.target.list("backups/").await? {
            let id = m.key.trim_start_matches("backups/");
            let man = self.load_manifest(id).await?;
            live.extend(man.pieces.iter().map(|p| p.0));
        }
        let mut report = GcReport::default();
        let mut candidates: HashSet<String> = HashSet::new();
        let mut indexed: HashSet<String> = HashSet::new();
        for m in self.target.list("index/").await? {
            let pack = m.key.trim_start_matches("index/").to_string();
            indexed.insert(pack.clone());
            match self.load_index(&pack).await {
                Ok(entries) => {
                    if entries.iter().any(|e| live.contains(&e.id)) {
                        report.live_packs += 1;
                    } else {
                        candidates.insert(pack);
                    }
                }
                Err(e) => warn!(pack = %pack, error = %e, "unreadable index: pack kept"),
            }
        }
        // Packs without an index (a backup killed between the two writes).
        let mut sizes: HashMap<String, u64> = HashMap::new();
        for m in self.target.list("packs/").await? {
            if let Some(p) = m.key.rsplit('/').next() {
                if !indexed.contains(p) {
                    candidates.insert(p.to_string());
                }
                sizes.insert(p.to_string(), m.size);
            }
        }
        // Record this run's mark before sweeping.
        let mark_key = format!("gc/{}", new_id());
        let mut packs: Vec<String> = candidates.iter().cloned().collect();
        packs.sort();
        report.marked_packs = packs.len();
        let mark = GcMark {
            created: started,
            packs,
        };
        if !mark.packs.is_empty() {
            let data = serde_json::to_vec(&mark).map_err(|e| json_err("gc mark", e))?;
            self.target.put_new(&mark_key, Bytes::from(data)).await?;
        }
        let marks = self.read_marks().await?;
        let mut locks: Vec<DateTime<Utc>> = Vec::new();
        let stale = chrono::Duration::from_std(opts.stale_lock).unwrap_or(chrono::Duration::MAX);
        for l in self.target.list("locks/").await? {
            let Ok(raw) = self.target.get(&l.key).await else {
                continue;
            };
            match serde_json::from_slice::<LockFile>(&raw) {
                Ok(lf) if now() - lf.created < stale => locks.push(lf.created),
                Ok(_) => {}
                Err(e) => warn!(lock = %l.key, error = %e, "unreadable lock ignored"),
            }
        }
        let grace = chrono::Duration::from_std(opts.grace).unwrap_or(chrono::Duration::MAX);
        let cutoff = now() - grace;
        let mut deleted: HashSet<String> = HashSet::new();
        for (key, m) in &marks {
            let sweepable = m.created <= cutoff && !locks.iter().any(|l| *l <= m.created);
            if !sweepable {
                continue;
            }
            for p in &m.packs {
                if !candidates.contains(p) || deleted.contains(p) {
                    continue;
                }
                // Index first: a pack nobody can find is never deduplicated against.
                match self.target.delete(&format!("index/{p}")).await {
                    Ok(()) | Err(Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                match self.target.delete(&pack_key(p)).await {
                    Ok(()) | Err(Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                report.deleted_packs += 1;
                report.deleted_bytes += sizes.get(p).copied().unwrap_or(0);
                deleted.insert(p.clone());
            }
            match self.target.delete(key).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        info!(?report, "gc finished");
        Ok(report)
    }

    /// Applies `policy` per volume: deletes backups it does not keep. Returns
    /// the deleted ids. Space is reclaimed by [`Repository::gc`].
    pub async fn prune(&self, policy: &RetentionPolicy) -> Result<Vec<String>> {
        if policy.is_empty() {
            return Err(Error::invalid(
                "retention policy",
                "keeps nothing; set at least one keep rule",
            ));
        }
        let all = self.list_backups().await?;
        let mut by_volume: BTreeMap<String, Vec<(String, DateTime<Utc>)>> = BTreeMap::new();
        for b in &all {
            by_volume
                .entry(b.volume.clone())
                .or_default()
                .push((b.id.clone(), b.created));
        }
        let mut deleted = Vec::new();
        for backups in by_volume.values() {
            let keep = select_keep(backups, policy);
            for (id, _) in backups {
                if !keep.contains(id) {
                    self.delete_manifest(id).await?;
                    deleted.push(id.clone());
                }
            }
        }
        Ok(deleted)
    }

    async fn delete_manifest(&self, id: &str) -> Result<()> {
        self.load_manifest(id)
            .await
            .map(|_| ())
            .or_else(|e| match e {
                Error::Corrupt { .. } => Ok(()),
                e => Err(e),
            })?;
        self.target.delete(&format!("backups/{id}")).await
    }

    async fn list_backups(&self) -> Result<Vec<BackupInfo>> {
        let mut out = Vec::new();
        for m in self.target.list("backups/").await? {
            let id = m.key.trim_start_matches("backups/");
            out.push(info_of(&self.load_manifest(id).await?.header));
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Locates every piece of `m` (missing ones are reported by id).
    async fn locate(&self, m: &Manifest) -> Result<(HashMap<PieceId, Located>, Vec<PieceId>)> {
        let all = self.load_all_indexes(&HashSet::new()).await?;
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        for (id, _) in &m.pieces {
            match all.get(id) {
                Some(l) => {
                    found.insert(*id, l.clone());
                }
                None => missing.push(*id),
            }
        }
        Ok((found, missing))
    }

    /// Fetches and opens the pieces of one pack (ranged reads, coalesced).
    async fn fetch_pack_pieces(
        &self,
        pack: &str,
        mut entries: Vec<IndexEntry>,
    ) -> Vec<(PieceId, Result<Vec<u8>>)> {
        entries.sort_by_key(|e| e.offset);
        let key = pack_key(pack);
        let mut out = Vec::with_capacity(entries.len());
        let mut i = 0;
        while i < entries.len() {
            let start = entries[i].offset;
            let mut j = i;
            let mut end = start + u64::from(entries[i].stored_len);
            while j + 1 < entries.len()
                && entries[j + 1].offset <= end + (64 << 10)
                && end - start < (32 << 20)
            {
                j += 1;
                end = end.max(entries[j].offset + u64::from(entries[j].stored_len));
            }
            let group = entries[i..=j].to_vec();
            i = j + 1;
            let data = match self.target.get_range(&key, start..end).await {
                Ok(d) => d,
                Err(e) => {
                    for g in group {
                        let msg = format!("piece {} in pack {key}: {e}", hex(&g.id));
                        out.push((g.id, Err(corrupt(&msg, "unreadable"))));
                    }
                    continue;
                }
            };
            let keys = self.keys.clone();
            let key2 = key.clone();
            let opened = tokio::task::spawn_blocking(move || {
                group
                    .into_iter()
                    .map(|g| {
                        let a = (g.offset - start) as usize;
                        let b = a + g.stored_len as usize;
                        let what = format!("piece {} in pack {key2}", hex(&g.id));
                        let r = match data.get(a..b) {
                            Some(s) => format::open_piece(
                                keys.as_ref(),
                                &g.id,
                                s,
                                g.raw_len as usize,
                                &what,
                            ),
                            None => Err(corrupt(&what, "beyond the end of the pack")),
                        };
                        (g.id, r)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            match opened {
                Ok(v) => out.extend(v),
                Err(e) => {
                    let msg = format!("pack {key}: worker failed: {e}");
                    out.push(([0; 32], Err(corrupt(&msg, "worker failed"))));
                }
            }
        }
        out
    }

    /// Groups a manifest's located pieces by pack.
    fn by_pack(located: &HashMap<PieceId, Located>) -> BTreeMap<String, Vec<IndexEntry>> {
        let mut by: BTreeMap<String, Vec<IndexEntry>> = BTreeMap::new();
        for l in located.values() {
            by.entry(l.pack.clone()).or_default().push(l.entry);
        }
        by
    }
}

fn info_of(h: &ManifestHeader) -> BackupInfo {
    BackupInfo {
        id: h.id.clone(),
        volume: h.volume.clone(),
        snapshot: h.snapshot.clone(),
        size: h.size,
        created: h.created,
        base: h.base.clone(),
        added_bytes: h.added_bytes,
        metadata: h.metadata.clone(),
    }
}

/// One processed piece: its range and, unless all zero, id and sealed bytes.
struct Processed {
    range: ByteRange,
    data: Option<(PieceId, Vec<u8>)>,
}

fn process_batch(
    keys: Option<&Keys>,
    batch: Vec<ByteRange>,
    bufs: Vec<Vec<u8>>,
) -> Result<Vec<Processed>> {
    batch
        .into_iter()
        .zip(bufs)
        .map(|(range, b)| {
            if b.iter().all(|&x| x == 0) {
                return Ok(Processed { range, data: None });
            }
            let id = format::piece_id(keys, &b);
            let sealed = format::seal_piece(keys, format::compress(&b)?)?;
            Ok(Processed {
                range,
                data: Some((id, sealed)),
            })
        })
        .collect()
}

fn missing_piece(id: &PieceId) -> String {
    format!("piece {} (in no pack index)", hex(id))
}

#[async_trait]
impl BackupEngine for Repository {
    #[instrument(skip(self, volumes, progress), fields(volume = %request.volume, snapshot = %request.snapshot))]
    async fn backup(
        &self,
        volumes: Arc<dyn VolumeBackend>,
        request: VolumeBackupRequest,
        progress: Option<watch::Sender<BackupProgress>>,
    ) -> Result<BackupInfo> {
        let id = new_id();
        let lock_key = format!("locks/{id}");
        let lock =
            serde_json::to_vec(&LockFile { created: now() }).map_err(|e| json_err("lock", e))?;
        self.target.put_new(&lock_key, Bytes::from(lock)).await?;
        let r = self.run_backup(volumes, request, progress, id).await;
        if let Err(e) = self.target.delete(&lock_key).await {
            warn!(lock = %lock_key, error = %e, "could not remove backup lock");
        }
        r
    }

    #[instrument(skip(self, device, progress))]
    async fn restore(
        &self,
        backup_id: &str,
        device: Arc<dyn BlockDevice>,
        progress: Option<watch::Sender<BackupProgress>>,
    ) -> Result<()> {
        let m = self.load_manifest(backup_id).await?;
        if device.size() < m.header.size {
            return Err(Error::invalid(
                "restore device",
                format!(
                    "{} bytes is smaller than the backup's {} bytes",
                    device.size(),
                    m.header.size
                ),
            ));
        }
        let (located, missing) = self.locate(&m).await?;
        if let Some(id) = missing.first() {
            return Err(corrupt(
                &format!("backup {backup_id}: {}", missing_piece(id)),
                format!("{} piece(s) missing", missing.len()),
            ));
        }
        // Piece id → extents using it.
        let mut uses: HashMap<PieceId, Vec<Extent>> = HashMap::new();
        for e in &m.extents {
            if let Some((id, _)) = m.pieces.get(e.piece as usize) {
                uses.entry(*id).or_default().push(*e);
            }
        }
        // Zero the gaps (restoring over an existing volume).
        let mut pos = 0u64;
        for e in &m.extents {
            if e.offset > pos {
                device
                    .write_zeroes(pos, e.offset - pos, ZeroFlags::default())
                    .await?;
            }
            pos = e.offset + u64::from(e.len);
        }
        if m.header.size > pos {
            device
                .write_zeroes(pos, m.header.size - pos, ZeroFlags::default())
                .await?;
        }
        let total: u64 = m.extents.iter().map(|e| u64::from(e.len)).sum();
        let prog = Arc::new(std::sync::Mutex::new(BackupProgress {
            total_bytes: total,
            ..Default::default()
        }));
        let par = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
        let uses = &uses;
        let device = &device;
        let progress = &progress;
        let prog = &prog;
        let results: Vec<Result<()>> = stream::iter(Self::by_pack(&located))
            .map(|(pack, entries)| async move {
                for (id, r) in self.fetch_pack_pieces(&pack, entries).await {
                    let plain = r?;
                    let mut n = 0u64;
                    for e in uses.get(&id).map(Vec::as_slice).unwrap_or(&[]) {
                        let a = e.piece_offset as usize;
                        let b = a + e.len as usize;
                        let slice = plain.get(a..b).ok_or_else(|| {
                            corrupt(&format!("piece {}", hex(&id)), "shorter than its extent")
                        })?;
                        device
                            .write_at(slice, e.offset, WriteFlags::default())
                            .await?;
                        n += u64::from(e.len);
                    }
                    if let Ok(mut p) = prog.lock() {
                        p.done_bytes += n;
                        if let Some(tx) = progress {
                            tx.send_replace(p.clone());
                        }
                    }
                }
                Ok(())
            })
            .buffer_unordered(par)
            .collect()
            .await;
        for r in results {
            r?;
        }
        device.flush().await
    }

    async fn list(&self) -> Result<Vec<BackupInfo>> {
        self.list_backups().await
    }

    #[instrument(skip(self))]
    async fn verify(&self, backup_id: &str) -> Result<VerifyReport> {
        let m = self.load_manifest(backup_id).await?;
        let (located, missing) = self.locate(&m).await?;
        let mut report = VerifyReport {
            chunks_checked: m.pieces.len() as u64,
            bad_chunks: missing.iter().map(missing_piece).collect(),
        };
        let results: Vec<Vec<(PieceId, Result<Vec<u8>>)>> = stream::iter(Self::by_pack(&located))
            .map(|(pack, entries)| async move { self.fetch_pack_pieces(&pack, entries).await })
            .buffer_unordered(4)
            .collect()
            .await;
        for (_, r) in results.into_iter().flatten() {
            if let Err(e) = r {
                report.bad_chunks.push(match &e {
                    Error::Corrupt {
                        what,
                        source: Some(s),
                    } => format!("{what}: {s}"),
                    e => e.to_string(),
                });
            }
        }
        report.bad_chunks.sort();
        Ok(report)
    }

    async fn delete(&self, backup_id: &str) -> Result<()> {
        self.delete_manifest(backup_id).await?;
        self.gc(GcOptions::default()).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, tag: u8) -> Ext {
        Ext {
            offset,
            len,
            id: [tag; 32],
            raw_len: len as u32,
            piece_offset: 0,
        }
    }

    #[test]
    fn subtract_splits_extents() {
        let base = vec![ext(0, 65536, 1), ext(65536, 65536, 2)];
        let cuts = [ByteRange::new(4096, 4096), ByteRange::new(65536, 65536)];
        let out = subtract(base, &cuts);
        let got: Vec<(u64, u64, u64)> = out
            .iter()
            .map(|e| (e.offset, e.len, e.piece_offset))
            .collect();
        assert_eq!(got, vec![(0, 4096, 0), (8192, 57344, 8192)]);
    }

    #[test]
    fn cut_aligns_pieces() {
        let r = cut(&[ByteRange::new(60 << 10, 72 << 10)], 1 << 20);
        let got: Vec<(u64, u64)> = r.iter().map(|r| (r.offset, r.len)).collect();
        assert_eq!(
            got,
            vec![
                (60 << 10, 4 << 10),
                (64 << 10, 64 << 10),
                (128 << 10, 4 << 10)
            ]
        );
    }
}
