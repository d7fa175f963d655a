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
//! See [`crate::gc`]: dead packs are marked, then swept after a grace
//! period; mostly dead packs are repacked. Backups take their lock before
//! loading the index and never deduplicate against marked packs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

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
    self, Cipher, Extent, IndexEntry, Keys, Manifest, ManifestHeader, PieceId, corrupt, hex,
};
use crate::job::Job;
use crate::retention::{RetentionPolicy, select_keep};
use crate::vm::VM_BACKUP_KEY;

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
    /// Absent in repositories made before ChaCha20-Poly1305 was offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cipher: Option<Cipher>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LockFile {
    pub(crate) created: DateTime<Utc>,
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
pub(crate) struct Located {
    pub(crate) pack: String,
    pub(crate) entry: IndexEntry,
}

/// Neighbouring pieces of one pack fetched with one ranged read.
#[derive(Debug, Clone)]
pub(crate) struct ReadGroup {
    pub(crate) pack: String,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) entries: Vec<IndexEntry>,
}

/// Largest stored span, and largest plain total, of a [`ReadGroup`]: bounds
/// the memory of each restore/verify worker.
const GROUP_BYTES: u64 = 8 << 20;

/// Cuts pieces into [`ReadGroup`]s: per pack, by offset, neighbours at most
/// 64 KiB apart, at most [`GROUP_BYTES`] stored and plain.
pub(crate) fn read_groups<'a>(located: impl IntoIterator<Item = &'a Located>) -> Vec<ReadGroup> {
    let mut by: BTreeMap<&str, Vec<IndexEntry>> = BTreeMap::new();
    for l in located {
        by.entry(l.pack.as_str()).or_default().push(l.entry);
    }
    let mut out = Vec::new();
    for (pack, mut entries) in by {
        entries.sort_by_key(|e| e.offset);
        entries.dedup_by_key(|e| e.offset);
        let mut cur: Option<(ReadGroup, u64)> = None;
        for e in entries {
            let e_end = e.offset + u64::from(e.stored_len);
            if let Some((g, raw)) = &mut cur
                && e.offset <= g.end + (64 << 10)
                && e_end - g.start <= GROUP_BYTES
                && *raw + u64::from(e.raw_len) <= GROUP_BYTES
            {
                g.end = g.end.max(e_end);
                *raw += u64::from(e.raw_len);
                g.entries.push(e);
                continue;
            }
            if let Some((g, _)) = cur.take() {
                out.push(g);
            }
            cur = Some((
                ReadGroup {
                    pack: pack.to_string(),
                    start: e.offset,
                    end: e_end,
                    entries: vec![e],
                },
                u64::from(e.raw_len),
            ));
        }
        if let Some((g, _)) = cur {
            out.push(g);
        }
    }
    out
}

/// Whether every byte is zero (word at a time).
fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u128; align_to only reinterprets
        // the aligned middle of the slice.
        unsafe { b.align_to::<u128>() }
    };
    head.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&x| x == 0)
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

pub(crate) fn now() -> DateTime<Utc> {
    Utc::now()
}

pub(crate) fn new_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", now().format("%Y%m%dT%H%M%S%.3fZ"), &u[..8])
}

pub(crate) fn json_err(what: &str, e: serde_json::Error) -> Error {
    corrupt(what, format!("JSON: {e}"))
}

pub(crate) fn pack_key(pack: &str) -> String {
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

/// Accumulates sealed pieces into packs; full packs upload in the
/// background (at most [`UPLOADS`] at once) while pieces keep coming.
pub(crate) struct Packer {
    repo: Repository,
    buf: Vec<u8>,
    entries: Vec<IndexEntry>,
    uploads: tokio::task::JoinSet<Result<u64>>,
    /// Bytes stored by finished uploads (packs and their indexes).
    pub(crate) added: u64,
}

/// Pack uploads in flight per backup.
const UPLOADS: usize = 2;

impl Packer {
    pub(crate) fn new(repo: &Repository) -> Self {
        Packer {
            repo: repo.clone(),
            buf: Vec::with_capacity(PACK_TARGET + PIECE_SIZE as usize * 2),
            entries: Vec::new(),
            uploads: tokio::task::JoinSet::new(),
            added: 0,
        }
    }

    /// Adds a sealed piece; uploads the pack once it is full.
    pub(crate) async fn push(&mut self, id: PieceId, sealed: &[u8], raw_len: u32) -> Result<()> {
        self.entries.push(IndexEntry {
            id,
            offset: self.buf.len() as u64,
            stored_len: sealed.len() as u32,
            raw_len,
        });
        self.buf.extend_from_slice(sealed);
        if self.buf.len() >= PACK_TARGET {
            self.seal_pack().await?;
        }
        Ok(())
    }

    async fn seal_pack(&mut self) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        while self.uploads.len() >= UPLOADS {
            self.reap_one().await?;
        }
        let data = std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(PACK_TARGET + PIECE_SIZE as usize * 2),
        );
        let entries = std::mem::take(&mut self.entries);
        let repo = self.repo.clone();
        self.uploads
            .spawn(async move { repo.upload_pack(data, entries).await });
        Ok(())
    }

    async fn reap_one(&mut self) -> Result<()> {
        if let Some(r) = self.uploads.join_next().await {
            self.added += r.map_err(|e| Error::Backend {
                backend: "hci-backup",
                message: "pack upload task failed".into(),
                source: Some(Box::new(e)),
            })??;
        }
        Ok(())
    }

    /// Uploads what is left and waits for every upload.
    pub(crate) async fn finish(&mut self) -> Result<u64> {
        self.seal_pack().await?;
        while !self.uploads.is_empty() {
            self.reap_one().await?;
        }
        Ok(self.added)
    }
}

impl Repository {
    /// Creates a new repository on `target`; encrypted with AES-256-GCM if
    /// `key` is given.
    pub async fn init(target: Arc<dyn BackupTarget>, key: Option<&[u8; 32]>) -> Result<Self> {
        Repository::init_with_cipher(target, key, Cipher::default()).await
    }

    /// Creates a new repository on `target`; encrypted with `cipher` if `key`
    /// is given.
    pub async fn init_with_cipher(
        target: Arc<dyn BackupTarget>,
        key: Option<&[u8; 32]>,
        cipher: Cipher,
    ) -> Result<Self> {
        let keys = key.map(|k| Keys::derive_with(k, cipher));
        let cfg = RepoConfig {
            version: FORMAT_VERSION,
            encrypted: keys.is_some(),
            key_check: keys.as_ref().map(|k| k.check.clone()),
            piece_size: PIECE_SIZE,
            cipher: keys.as_ref().map(|k| k.cipher()),
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
                let keys = Keys::derive_with(k, cfg.cipher.unwrap_or_default());
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

    /// The cipher of an encrypted repository.
    pub fn cipher(&self) -> Option<Cipher> {
        self.keys.as_ref().map(Keys::cipher)
    }

    pub(crate) fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    pub(crate) async fn load_manifest(&self, id: &str) -> Result<Manifest> {
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

    pub(crate) async fn load_index(&self, pack: &str) -> Result<Vec<IndexEntry>> {
        let key = format!("index/{pack}");
        let raw = self.target.get(&key).await?;
        let what = format!("pack index {key}");
        let plain = format::open_meta(self.keys.as_ref(), &raw, &what)?;
        format::decode_index(&plain, &what)
    }

    /// Loads every pack index (except `exclude`d packs): piece id → location.
    pub(crate) async fn load_all_indexes(
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

    /// Uploads a pack, then its index (in that order, create-only); returns
    /// the bytes stored.
    pub(crate) async fn upload_pack(&self, data: Vec<u8>, entries: Vec<IndexEntry>) -> Result<u64> {
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
        Ok(len + ilen)
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

    /// Backs up a volume snapshot, following and controlling it through
    /// `job` (progress with rate, cancellation). See [`BackupEngine::backup`].
    #[instrument(skip(self, volumes, job), fields(volume = %request.volume, snapshot = %request.snapshot))]
    pub async fn backup_with(
        &self,
        volumes: Arc<dyn VolumeBackend>,
        request: VolumeBackupRequest,
        job: &Job,
    ) -> Result<BackupInfo> {
        job.cancel.check()?;
        let id = new_id();
        let lock_key = format!("locks/{id}");
        let lock =
            serde_json::to_vec(&LockFile { created: now() }).map_err(|e| json_err("lock", e))?;
        self.target.put_new(&lock_key, Bytes::from(lock)).await?;
        let r = self.run_backup(volumes, request, job, id).await;
        if let Err(e) = self.target.delete(&lock_key).await {
            warn!(lock = %lock_key, error = %e, "could not remove backup lock");
        }
        r
    }

    async fn run_backup(
        &self,
        volumes: Arc<dyn VolumeBackend>,
        req: VolumeBackupRequest,
        job: &Job,
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
        let mut tracker = job.tracker(total);

        // Dedup index, without packs GC has marked.
        let marked: HashSet<String> = self
            .read_marks()
            .await?
            .into_iter()
            .flat_map(|(_, m)| m.packs)
            .collect();
        let mut known: HashSet<PieceId> =
            self.load_all_indexes(&marked).await?.into_keys().collect();

        let mut packer = Packer::new(self);
        let mut new_exts: Vec<Ext> = Vec::with_capacity(pieces.len());
        let par = std::thread::available_parallelism().map_or(2, |n| n.get());

        // Batches of pieces; each batch reads its contiguous runs with one
        // call each and is hashed/compressed on a blocking thread, batches
        // in parallel.
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
                    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
                    let mut i = 0;
                    while i < batch.len() {
                        let start = batch[i].offset;
                        let mut end = batch[i].end();
                        let mut j = i + 1;
                        while j < batch.len() && batch[j].offset == end {
                            end = batch[j].end();
                            j += 1;
                        }
                        let mut b = vec![0u8; (end - start) as usize];
                        dev.read_at(&mut b, start).await?;
                        runs.push((start, b));
                        i = j;
                    }
                    tokio::task::spawn_blocking(move || process_batch(keys.as_ref(), batch, runs))
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
            tracker.check()?;
            let mut uploaded = 0;
            let mut done = 0;
            for piece in r? {
                done += piece.range.len;
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
                    uploaded += sealed.len() as u64;
                    packer.push(id, &sealed, piece.range.len as u32).await?;
                }
            }
            tracker.add(done, uploaded);
            tracker.publish();
        }
        let added = packer.finish().await?;
        tracker.check()?;

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
        m.header.added_bytes = added + probe.len() as u64;
        let sealed = format::seal_meta(self.keys.as_ref(), &format::encode_manifest(&m)?)?;
        self.target
            .put_new(&format!("backups/{id}"), Bytes::from(sealed))
            .await?;
        info!(backup = %id, added = m.header.added_bytes, "backup finished");
        Ok(info_of(&m.header))
    }

    /// Restores a backup into `device`, following and controlling it
    /// through `job`. Pieces are fetched in groups of neighbours (at most 8
    /// MiB each, a few groups per core in flight, so memory stays bounded
    /// whatever the volume size), decrypted, decompressed and checked
    /// against their ids on blocking threads, and written in runs of
    /// contiguous extents. See [`BackupEngine::restore`].
    #[instrument(skip(self, device, job))]
    pub async fn restore_with(
        &self,
        backup_id: &str,
        device: Arc<dyn BlockDevice>,
        job: &Job,
    ) -> Result<()> {
        job.cancel.check()?;
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
        let tracker = std::sync::Mutex::new(job.tracker(total));
        let par = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
        let uses = &uses;
        let device = &device;
        let tracker = &tracker;
        let mut results = stream::iter(read_groups(located.values()))
            .map(|g| async move {
                job.cancel.check()?;
                let pieces = self.fetch_group(g).await?;
                // Every (volume offset, piece, range in piece) this group serves.
                let mut writes: Vec<(u64, usize, usize, usize)> = Vec::new();
                for (i, (id, _)) in pieces.iter().enumerate() {
                    for e in uses.get(id).map(Vec::as_slice).unwrap_or(&[]) {
                        let a = e.piece_offset as usize;
                        writes.push((e.offset, i, a, a + e.len as usize));
                    }
                }
                writes.sort_unstable_by_key(|w| w.0);
                let mut run: Vec<u8> = Vec::new();
                let mut run_start = 0u64;
                let mut done = 0u64;
                for (off, i, a, b) in writes {
                    let (id, plain) = &pieces[i];
                    let slice = plain.get(a..b).ok_or_else(|| {
                        corrupt(&format!("piece {}", hex(id)), "shorter than its extent")
                    })?;
                    if !run.is_empty()
                        && (off != run_start + run.len() as u64
                            || run.len() + slice.len() > GROUP_BYTES as usize)
                    {
                        device
                            .write_at(&run, run_start, WriteFlags::default())
                            .await?;
                        done += run.len() as u64;
                        run.clear();
                    }
                    if run.is_empty() {
                        run_start = off;
                    }
                    run.extend_from_slice(slice);
                }
                if !run.is_empty() {
                    device
                        .write_at(&run, run_start, WriteFlags::default())
                        .await?;
                    done += run.len() as u64;
                }
                if let Ok(mut t) = tracker.lock() {
                    t.add(done, 0);
                    t.publish();
                }
                Ok::<(), Error>(())
            })
            .buffer_unordered(par);
        while let Some(r) = results.next().await {
            r?;
        }
        drop(results);
        job.cancel.check()?;
        device.flush().await
    }

    /// Applies `policy` per volume, and per VM to whole-VM backups: deletes
    /// the backups it does not keep. Returns the deleted ids. Space is
    /// reclaimed by [`Repository::gc`].
    pub async fn prune(&self, policy: &RetentionPolicy) -> Result<Vec<String>> {
        if policy.is_empty() {
            return Err(Error::invalid(
                "retention policy",
                "keeps nothing; set at least one keep rule",
            ));
        }
        let vms = self.list_vm_backups().await?;
        let in_vm: HashSet<&str> = vms
            .iter()
            .flat_map(|m| m.volumes.iter().map(|v| v.backup.as_str()))
            .collect();
        let all = self.list_backups().await?;
        let mut by_volume: BTreeMap<String, Vec<(String, DateTime<Utc>)>> = BTreeMap::new();
        for b in &all {
            if in_vm.contains(b.id.as_str()) {
                continue;
            }
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
        let mut by_vm: BTreeMap<String, Vec<(String, DateTime<Utc>)>> = BTreeMap::new();
        for m in &vms {
            by_vm
                .entry(m.vm_name.clone())
                .or_default()
                .push((m.id.clone(), m.created));
        }
        for backups in by_vm.values() {
            let keep = select_keep(backups, policy);
            for (id, _) in backups {
                if !keep.contains(id) {
                    self.delete_vm_backup(id).await?;
                    deleted.push(id.clone());
                }
            }
        }
        Ok(deleted)
    }

    async fn delete_manifest(&self, id: &str) -> Result<()> {
        match self.load_manifest(id).await {
            Ok(m) => {
                let vm = m.header.metadata.iter().find(|(k, _)| k == VM_BACKUP_KEY);
                if let Some((_, vm)) = vm {
                    match self.target.head(&format!("vms/{vm}")).await {
                        Ok(_) => {
                            return Err(Error::invalid(
                                format!("backup {id}"),
                                format!("it is part of VM backup {vm}: delete that instead"),
                            ));
                        }
                        Err(Error::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(Error::Corrupt { .. }) => {}
            Err(e) => return Err(e),
        }
        self.target.delete(&format!("backups/{id}")).await
    }

    async fn list_backups(&self) -> Result<Vec<BackupInfo>> {
        let mut out = Vec::new();
        for m in self.target.list("backups/").await? {
            let id = m.key.trim_start_matches("backups/");
            match self.load_manifest(id).await {
                Ok(manifest) => out.push(info_of(&manifest.header)),
                // Deleted between the listing and the read: not a backup any more.
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
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

    /// Fetches one group with a ranged read and opens each piece (decrypt,
    /// decompress, check against its id) on a blocking thread.
    pub(crate) async fn fetch_group_checked(
        &self,
        g: ReadGroup,
    ) -> Vec<(PieceId, Result<Vec<u8>>)> {
        let key = pack_key(&g.pack);
        let data = match self.target.get_range(&key, g.start..g.end).await {
            Ok(d) => d,
            Err(e) => {
                return g
                    .entries
                    .iter()
                    .map(|p| {
                        let what = format!("piece {} in pack {key}", hex(&p.id));
                        (p.id, Err(corrupt(&what, format!("unreadable: {e}"))))
                    })
                    .collect();
            }
        };
        let keys = self.keys.clone();
        let first = g.entries.first().map(|e| e.id).unwrap_or([0; 32]);
        let key2 = key.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let mut dec = format::decompressor().ok();
            g.entries
                .into_iter()
                .map(|p| {
                    let a = (p.offset - g.start) as usize;
                    let b = a + p.stored_len as usize;
                    let what = format!("piece {} in pack {key2}", hex(&p.id));
                    let r = match data.get(a..b) {
                        Some(s) => format::open_piece_with(
                            dec.as_mut(),
                            keys.as_ref(),
                            &p.id,
                            s,
                            p.raw_len as usize,
                            &what,
                        ),
                        None => Err(corrupt(&what, "beyond the end of the pack")),
                    };
                    (p.id, r)
                })
                .collect::<Vec<_>>()
        })
        .await;
        opened.unwrap_or_else(|e| {
            let what = format!("pack {key}");
            vec![(first, Err(corrupt(&what, format!("worker failed: {e}"))))]
        })
    }

    /// [`Repository::fetch_group_checked`], failing on the first bad piece.
    pub(crate) async fn fetch_group(&self, g: ReadGroup) -> Result<Vec<(PieceId, Vec<u8>)>> {
        self.fetch_group_checked(g)
            .await
            .into_iter()
            .map(|(id, r)| r.map(|p| (id, p)))
            .collect()
    }
}

pub(crate) fn info_of(h: &ManifestHeader) -> BackupInfo {
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
    runs: Vec<(u64, Vec<u8>)>,
) -> Result<Vec<Processed>> {
    let mut out = Vec::with_capacity(batch.len());
    let mut zc = format::compressor()?;
    let mut run = 0;
    for range in batch {
        while run < runs.len() && runs[run].0 + runs[run].1.len() as u64 <= range.offset {
            run += 1;
        }
        let b = runs
            .get(run)
            .and_then(|(start, buf)| {
                let a = range.offset.checked_sub(*start)? as usize;
                buf.get(a..a + range.len as usize)
            })
            .ok_or_else(|| corrupt("backup read batch", "piece outside its read run"))?;
        if is_zero(b) {
            out.push(Processed { range, data: None });
            continue;
        }
        let id = format::piece_id(keys, b);
        let sealed = format::seal_piece(keys, format::compress_with(&mut zc, b)?)?;
        out.push(Processed {
            range,
            data: Some((id, sealed)),
        });
    }
    Ok(out)
}

fn missing_piece(id: &PieceId) -> String {
    format!("piece {} (in no pack index)", hex(id))
}

#[async_trait]
impl BackupEngine for Repository {
    async fn backup(
        &self,
        volumes: Arc<dyn VolumeBackend>,
        request: VolumeBackupRequest,
        progress: Option<watch::Sender<BackupProgress>>,
    ) -> Result<BackupInfo> {
        let job = Job::new().with_backup_progress(progress);
        self.backup_with(volumes, request, &job).await
    }

    async fn restore(
        &self,
        backup_id: &str,
        device: Arc<dyn BlockDevice>,
        progress: Option<watch::Sender<BackupProgress>>,
    ) -> Result<()> {
        let job = Job::new().with_backup_progress(progress);
        self.restore_with(backup_id, device, &job).await
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
        let par = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut results = stream::iter(read_groups(located.values()))
            .map(|g| async move {
                self.fetch_group_checked(g)
                    .await
                    .into_iter()
                    .filter_map(|(_, r)| r.err())
                    .collect::<Vec<_>>()
            })
            .buffer_unordered(par);
        while let Some(errors) = results.next().await {
            for e in errors {
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

    /// Deletes the backup's manifest. Its data is reclaimed by the next
    /// [`Repository::gc`] run (deleting lists nothing).
    async fn delete(&self, backup_id: &str) -> Result<()> {
        self.delete_manifest(backup_id).await
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
