//! One replica: a tree of sparse layer files, the block→layer map of the head,
//! and the I/O and metadata operations on them.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use chrono::Utc;

use hci_core::block::{BLOCK_SIZE, ByteRange, Extent, ExtentKind, check_range, coalesce_ranges};
use hci_core::volume::{EncryptionKey, SnapshotInfo, VolumeInfo};
use hci_core::{Error, Result};

use super::crypt::Cipher;
use super::file;
use super::meta::{self, LayerMeta, Meta, SnapMeta, layer_path};

const BS: u64 = BLOCK_SIZE;
const BSU: usize = BLOCK_SIZE as usize;
const STRIPES: usize = 1024;

fn io_err(what: impl std::fmt::Display, path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), e)
}

/// Owner of each 4 KiB block of a view: a layer id, or 0 for "no layer" (zeroes).
pub(crate) type OwnerMap = Vec<AtomicU32>;

fn owner_id(id: u64) -> Result<u32> {
    u32::try_from(id).map_err(|_| Error::invalid("layer id", "exhausted 32-bit layer ids"))
}

/// Builds the owner map of the view through `path` (root first), `size` bytes.
fn build_map(
    dir: &Path,
    files: &HashMap<u64, Arc<File>>,
    path: &[u64],
    size: u64,
) -> Result<OwnerMap> {
    let nblocks = size.div_ceil(BS) as usize;
    let map: OwnerMap = (0..nblocks).map(|_| AtomicU32::new(0)).collect();
    for &id in path {
        let f = files.get(&id).ok_or_else(|| Error::Corrupt {
            what: format!("layer {id} of {}", dir.display()),
            source: None,
        })?;
        let oid = owner_id(id)?;
        for (off, len) in
            file::data_extents(f, 0, size).map_err(|e| io_err("scan", &layer_path(dir, id), e))?
        {
            let first = off / BS;
            let last = (off + len).div_ceil(BS).min(nblocks as u64);
            for b in first..last {
                map[b as usize].store(oid, Ordering::Relaxed);
            }
        }
    }
    Ok(map)
}

/// The mutable part of a replica, behind one lock: I/O takes it shared,
/// structural changes (snapshot, revert, expand) exclusively.
#[derive(Debug)]
struct Chain {
    meta: Meta,
    files: HashMap<u64, Arc<File>>,
    map: OwnerMap,
}

impl Chain {
    fn head_file(&self) -> Result<&Arc<File>> {
        self.files
            .get(&self.meta.head)
            .ok_or_else(|| Error::Corrupt {
                what: "head layer file".into(),
                source: None,
            })
    }
}

/// A local replica directory, opened.
#[derive(Debug)]
pub struct Replica {
    dir: PathBuf,
    chain: RwLock<Chain>,
    /// Serializes metadata operations (one at a time per replica).
    ops: Mutex<()>,
    /// Per-block locks for copy-on-write and merges (hashed by block index).
    stripes: Vec<Mutex<()>>,
    cipher: OnceLock<Cipher>,
    /// Held open for its exclusive lock: one process owns a replica at a time
    /// (`None` for the lock-free observer behind [`Replica::open_snapshot_shared`]).
    _lock: Option<File>,
}

/// Locks a replica directory for this process.
fn lock_dir(dir: &Path) -> Result<File> {
    let p = dir.join("lock");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(|e| io_err("open", &p, e))?;
    if !file::try_lock_exclusive(&f).map_err(|e| io_err("lock", &p, e))? {
        return Err(Error::Busy {
            kind: "replica",
            name: dir.display().to_string(),
            reason: "it is open in another process or handle (stop `hci-storage serve` first)"
                .into(),
        });
    }
    Ok(f)
}

fn open_layer(dir: &Path, id: u64) -> Result<File> {
    let p = layer_path(dir, id);
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .map_err(|e| io_err("open", &p, e))
}

fn create_layer(dir: &Path, id: u64, size: u64) -> Result<File> {
    let p = layer_path(dir, id);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .map_err(|e| io_err("create", &p, e))?;
    f.set_len(size).map_err(|e| io_err("size", &p, e))?;
    f.sync_all().map_err(|e| io_err("fsync", &p, e))?;
    Ok(f)
}

fn check_snapshot_name(name: &str) -> Result<()> {
    crate::local::check_name("snapshot", name)
}

impl Replica {
    /// Creates an empty replica of `size` bytes in the empty or absent directory `dir`.
    pub fn create(dir: &Path, size: u64, key: Option<&EncryptionKey>) -> Result<Arc<Replica>> {
        if size == 0 || !size.is_multiple_of(BS) {
            return Err(Error::invalid(
                "volume size",
                format!("{size} must be a nonzero multiple of {BS}"),
            ));
        }
        if meta::exists(dir) {
            return Err(Error::already_exists("replica", dir.display().to_string()));
        }
        fs::create_dir_all(dir).map_err(|e| io_err("create directory", dir, e))?;
        let cipher = key.map(Cipher::new).transpose()?;
        create_layer(dir, 1, size)?;
        let m = Meta {
            format: meta::FORMAT,
            size,
            revision: 1,
            head: 1,
            next_id: 2,
            layers: vec![LayerMeta {
                id: 1,
                parent: None,
                snapshot: None,
            }],
            key_check: cipher.as_ref().map(Cipher::check_value),
        };
        meta::store(dir, &m)?;
        Self::open(dir, key)
    }

    /// Opens an existing replica. Encrypted replicas need their key for I/O
    /// (metadata operations work without it); a wrong key is refused.
    pub fn open(dir: &Path, key: Option<&EncryptionKey>) -> Result<Arc<Replica>> {
        let m = meta::load(dir)?;
        let lock = lock_dir(dir)?;
        Self::cleanup_orphans(dir, &m);
        let mut files = HashMap::new();
        for l in &m.layers {
            files.insert(l.id, Arc::new(open_layer(dir, l.id)?));
        }
        let path = m.path_to(m.head)?;
        let map = build_map(dir, &files, &path, m.size)?;
        let r = Replica {
            dir: dir.to_path_buf(),
            chain: RwLock::new(Chain {
                meta: m,
                files,
                map,
            }),
            ops: Mutex::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            cipher: OnceLock::new(),
            _lock: Some(lock),
        };
        if let Some(k) = key {
            r.unlock(k)?;
        }
        Ok(Arc::new(r))
    }

    /// Removes files an interrupted operation left behind.
    fn cleanup_orphans(dir: &Path, m: &Meta) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let orphan_layer = name
                .strip_prefix("layer-")
                .and_then(|r| r.strip_suffix(".img"))
                .and_then(|id| id.parse::<u64>().ok())
                .is_some_and(|id| m.layer(id).is_none());
            if orphan_layer || name.ends_with(".tmp") && name != "lock" {
                tracing::info!(file = %e.path().display(), "removing a leftover of an interrupted operation");
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Checks `key` against the replica and enables I/O with it.
    pub fn unlock(&self, key: &EncryptionKey) -> Result<()> {
        let want = self.read_chain().meta.key_check.clone();
        let Some(want) = want else {
            return Err(Error::invalid(
                format!("replica {}", self.dir.display()),
                "is not encrypted, but a key was given",
            ));
        };
        let c = Cipher::new(key)?;
        if c.check_value() != want {
            return Err(Error::invalid(
                format!("replica {}", self.dir.display()),
                "wrong encryption key",
            ));
        }
        let _ = self.cipher.set(c);
        Ok(())
    }

    /// True if data is encrypted at rest.
    pub fn is_encrypted(&self) -> bool {
        self.read_chain().meta.key_check.is_some()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_chain(&self) -> RwLockReadGuard<'_, Chain> {
        self.chain.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_chain(&self) -> RwLockWriteGuard<'_, Chain> {
        self.chain.write().unwrap_or_else(|e| e.into_inner())
    }

    fn ops(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stripe(&self, block: u64) -> MutexGuard<'_, ()> {
        self.stripes[(block as usize) % STRIPES]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The cipher for I/O, if the replica is encrypted (error if locked).
    fn io_cipher(&self, chain: &Chain) -> Result<Option<&Cipher>> {
        match (&chain.meta.key_check, self.cipher.get()) {
            (None, _) => Ok(None),
            (Some(_), Some(c)) => Ok(Some(c)),
            (Some(_), None) => Err(Error::invalid(
                format!("replica {}", self.dir.display()),
                "is encrypted: open it with its key",
            )),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.read_chain().meta.size
    }

    /// Reads `buf.len()` bytes at `offset` of the head.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let c = self.read_chain();
        check_range(offset, buf.len() as u64, c.meta.size)?;
        let cipher = self.io_cipher(&c)?;
        read_view(&self.dir, &c.files, &c.map, cipher, buf, offset)
    }

    /// Writes `buf` at `offset` of the head (durable at once with `fua`).
    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let c = self.read_chain();
        check_range(offset, buf.len() as u64, c.meta.size)?;
        let cipher = self.io_cipher(&c)?;
        self.write_locked(&c, cipher, buf, offset)?;
        if fua {
            let head = c.head_file()?;
            file::sync_data(head)
                .map_err(|e| io_err("fdatasync", &layer_path(&self.dir, c.meta.head), e))?;
        }
        Ok(())
    }

    fn write_locked(
        &self,
        c: &Chain,
        cipher: Option<&Cipher>,
        buf: &[u8],
        offset: u64,
    ) -> Result<()> {
        let head = c.meta.head;
        let hid = owner_id(head)?;
        let hf = c.head_file()?;
        let hpath = || layer_path(&self.dir, head);
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let b = pos / BS;
            let bstart = b * BS;
            if pos == bstart && end - pos >= BS {
                // A run of whole blocks.
                let nfull = (end - pos) / BS;
                let run = &buf[(pos - offset) as usize..(pos - offset + nfull * BS) as usize];
                let blocks = b..b + nfull;
                let foreign: Vec<u64> = blocks
                    .clone()
                    .filter(|&x| c.map[x as usize].load(Ordering::Acquire) != hid)
                    .collect();
                let mut stripes: Vec<usize> =
                    foreign.iter().map(|&x| x as usize % STRIPES).collect();
                stripes.sort_unstable();
                stripes.dedup();
                let _guards: Vec<_> = stripes
                    .iter()
                    .map(|&s| self.stripes[s].lock().unwrap_or_else(|e| e.into_inner()))
                    .collect();
                match cipher {
                    None => {
                        file::write_at(hf, run, pos).map_err(|e| io_err("write", &hpath(), e))?
                    }
                    Some(ci) => {
                        let mut enc = run.to_vec();
                        for (i, chunk) in enc.chunks_mut(BSU).enumerate() {
                            ci.encrypt(chunk, b + i as u64);
                        }
                        file::write_at(hf, &enc, pos).map_err(|e| io_err("write", &hpath(), e))?;
                    }
                }
                for x in foreign {
                    c.map[x as usize].store(hid, Ordering::Release);
                }
                pos += nfull * BS;
            } else {
                // A partial block: read-modify-write under the block's lock.
                let n = (BS - (pos - bstart)).min(end - pos) as usize;
                let within = (pos - bstart) as usize;
                let data = &buf[(pos - offset) as usize..(pos - offset) as usize + n];
                let _g = self.stripe(b);
                let owner = c.map[b as usize].load(Ordering::Acquire);
                if owner == hid && cipher.is_none() {
                    file::write_at(hf, data, pos).map_err(|e| io_err("write", &hpath(), e))?;
                } else if owner == 0 && cipher.is_none() {
                    file::write_at(hf, data, pos).map_err(|e| io_err("write", &hpath(), e))?;
                    c.map[b as usize].store(hid, Ordering::Release);
                } else {
                    let mut block = vec![0u8; BSU];
                    if owner != 0 {
                        let f = c
                            .files
                            .get(&u64::from(owner))
                            .ok_or_else(|| corrupt_map(owner))?;
                        file::read_at(f, &mut block, bstart)
                            .map_err(|e| io_err("read", &layer_path(&self.dir, owner.into()), e))?;
                        if let Some(ci) = cipher {
                            ci.decrypt(&mut block, b);
                        }
                    }
                    block[within..within + n].copy_from_slice(data);
                    if let Some(ci) = cipher {
                        ci.encrypt(&mut block, b);
                    }
                    file::write_at(hf, &block, bstart).map_err(|e| io_err("write", &hpath(), e))?;
                    c.map[b as usize].store(hid, Ordering::Release);
                }
                pos += n as u64;
            }
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeroes; whole blocks that no older
    /// layer holds are punched out (space returns) unless `keep` is set.
    pub fn zero(&self, offset: u64, len: u64, keep: bool, fua: bool) -> Result<()> {
        let c = self.read_chain();
        check_range(offset, len, c.meta.size)?;
        let cipher = self.io_cipher(&c)?;
        let end = offset + len;
        let first_full = offset.div_ceil(BS) * BS;
        let last_full = (end / BS) * BS;
        if first_full >= last_full {
            let zeros = vec![0u8; len as usize];
            self.write_locked(&c, cipher, &zeros, offset)?;
        } else {
            if offset < first_full {
                self.write_locked(
                    &c,
                    cipher,
                    &vec![0u8; (first_full - offset) as usize],
                    offset,
                )?;
            }
            if last_full < end {
                self.write_locked(
                    &c,
                    cipher,
                    &vec![0u8; (end - last_full) as usize],
                    last_full,
                )?;
            }
            self.zero_blocks(&c, cipher, first_full / BS, last_full / BS, keep)?;
        }
        if fua {
            file::sync_data(c.head_file()?).map_err(|e| io_err("fdatasync", &self.dir, e))?;
        }
        Ok(())
    }

    fn zero_blocks(
        &self,
        c: &Chain,
        cipher: Option<&Cipher>,
        first: u64,
        last: u64,
        keep: bool,
    ) -> Result<()> {
        let head = c.meta.head;
        let hid = owner_id(head)?;
        let hf = c.head_file()?;
        // Which blocks an older layer on the head's path holds: those need real
        // zeroes in the head to hide them.
        let path = c.meta.path_to(head)?;
        let mut below: Vec<ByteRange> = Vec::new();
        for id in path.iter().filter(|&&id| id != head) {
            let f = c.files.get(id).ok_or_else(|| corrupt_map(*id as u32))?;
            for (o, l) in file::data_extents(f, first * BS, last * BS)
                .map_err(|e| io_err("scan", &layer_path(&self.dir, *id), e))?
            {
                below.push(ByteRange::new(o, l));
            }
        }
        let below = coalesce_ranges(below);
        let mut zero_block = vec![0u8; BSU];
        let mut punch_from: Option<u64> = None;
        let flush_punch = |from: &mut Option<u64>, to: u64| -> Result<()> {
            if let Some(s) = from.take() {
                file::punch_hole(hf, s * BS, (to - s) * BS)
                    .map_err(|e| io_err("punch", &self.dir, e))?;
            }
            Ok(())
        };
        let mut bi = 0usize;
        for b in first..last {
            let off = b * BS;
            while bi < below.len() && below[bi].end() <= off {
                bi += 1;
            }
            let covered = bi < below.len() && below[bi].offset < off + BS;
            let _g = (c.map[b as usize].load(Ordering::Acquire) != hid).then(|| self.stripe(b));
            if covered || keep {
                flush_punch(&mut punch_from, b)?;
                zero_block.fill(0);
                if let Some(ci) = cipher {
                    ci.encrypt(&mut zero_block, b);
                }
                file::write_at(hf, &zero_block, off).map_err(|e| io_err("write", &self.dir, e))?;
                c.map[b as usize].store(hid, Ordering::Release);
            } else {
                punch_from.get_or_insert(b);
                c.map[b as usize].store(0, Ordering::Release);
            }
        }
        flush_punch(&mut punch_from, last)
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        let c = self.read_chain();
        let head = c.head_file()?;
        file::sync_data(head)
            .map_err(|e| io_err("fdatasync", &layer_path(&self.dir, c.meta.head), e))
    }

    /// Allocation of the head view over `[offset, offset+len)`.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let c = self.read_chain();
        check_range(offset, len, c.meta.size)?;
        Ok(map_status(&c.map, offset, len))
    }

    /// Describes the replica.
    pub fn info(&self, name: &str) -> Result<VolumeInfo> {
        let c = self.read_chain();
        let mut allocated = 0;
        for (id, f) in &c.files {
            allocated +=
                file::allocated(f).map_err(|e| io_err("stat", &layer_path(&self.dir, *id), e))?;
        }
        Ok(VolumeInfo {
            name: name.to_string(),
            size: c.meta.size,
            allocated,
            snapshots: c.meta.snapshots().len(),
            encrypted: c.meta.key_check.is_some(),
            revision: c.meta.revision,
        })
    }

    /// The metadata revision (bumped by every metadata change).
    pub fn revision(&self) -> u64 {
        self.read_chain().meta.revision
    }

    fn snapshot_info(&self, c: &Chain, l: &LayerMeta, s: &SnapMeta) -> SnapshotInfo {
        let allocated = c
            .files
            .get(&l.id)
            .and_then(|f| file::allocated(f).ok())
            .unwrap_or(0);
        SnapshotInfo {
            name: s.name.clone(),
            created: s.created,
            size: s.size,
            allocated,
        }
    }

    /// Lists snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let c = self.read_chain();
        c.meta
            .snapshots()
            .into_iter()
            .map(|(l, s)| self.snapshot_info(&c, l, s))
            .collect()
    }

    /// Stores new metadata (revision bumped) and makes it current.
    fn commit(&self, c: &mut Chain, mut m: Meta) -> Result<()> {
        m.revision = c.meta.revision + 1;
        meta::store(&self.dir, &m)?;
        c.meta = m;
        Ok(())
    }

    /// Freezes the head as snapshot `name` and continues in a new empty head. O(1):
    /// no data is copied.
    pub fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        check_snapshot_name(name)?;
        let _ops = self.ops();
        let mut c = self.write_chain();
        if c.meta.snapshot(name).is_some() {
            return Err(Error::already_exists("snapshot", name));
        }
        let old = c.meta.head;
        file::sync_data(c.head_file()?)
            .map_err(|e| io_err("fdatasync", &layer_path(&self.dir, old), e))?;
        let id = c.meta.next_id;
        owner_id(id)?;
        let f = create_layer(&self.dir, id, c.meta.size)?;
        file::sync_dir(&self.dir).map_err(|e| io_err("fsync", &self.dir, e))?;
        let mut m = c.meta.clone();
        let snap = SnapMeta {
            name: name.to_string(),
            created: Utc::now(),
            size: m.size,
        };
        for l in &mut m.layers {
            if l.id == old {
                l.snapshot = Some(snap.clone());
            }
        }
        m.layers.push(LayerMeta {
            id,
            parent: Some(old),
            snapshot: None,
        });
        m.head = id;
        m.next_id = id + 1;
        if let Err(e) = self.commit(&mut c, m) {
            let _ = fs::remove_file(layer_path(&self.dir, id));
            return Err(e);
        }
        c.files.insert(id, Arc::new(f));
        let l = c.meta.layer(old).cloned().ok_or_else(|| corrupt_map(0))?;
        Ok(self.snapshot_info(&c, &l, &snap))
    }

    fn find_snapshot(c: &Chain, name: &str) -> Result<LayerMeta> {
        c.meta
            .snapshot(name)
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot", name))
    }

    /// Deletes snapshot `name`, merging its data into its children while I/O
    /// continues. Crash-safe: copies are idempotent, the metadata switch atomic.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let _ops = self.ops();
        let (s, children, head, head_path, sfile) = {
            let c = self.read_chain();
            let s = Self::find_snapshot(&c, name)?;
            let f = c
                .files
                .get(&s.id)
                .cloned()
                .ok_or_else(|| corrupt_map(s.id as u32))?;
            (
                s.clone(),
                c.meta.children(s.id),
                c.meta.head,
                c.meta.path_to(c.meta.head)?,
                f,
            )
        };
        let size = self.size();
        let sid = owner_id(s.id)?;
        let extents = file::data_extents(&sfile, 0, size)
            .map_err(|e| io_err("scan", &layer_path(&self.dir, s.id), e))?;
        let mut block = vec![0u8; 256 * BSU];
        for child in children {
            let c = self.read_chain();
            let cf = c
                .files
                .get(&child)
                .cloned()
                .ok_or_else(|| corrupt_map(child as u32))?;
            let cid = owner_id(child)?;
            let on_head_path = head_path.contains(&child);
            let mine = coalesce_ranges(
                file::data_extents(&cf, 0, size)
                    .map_err(|e| io_err("scan", &layer_path(&self.dir, child), e))?
                    .into_iter()
                    .map(|(o, l)| ByteRange::new(o, l)),
            );
            // Blocks the snapshot holds and the child does not, in runs.
            let todo = subtract_blocks(&extents, &mine, c.map.len() as u64);
            for (first, last) in todo {
                let mut b = first;
                while b < last {
                    let n = (last - b).min(256);
                    let chunk = &mut block[..(n * BS) as usize];
                    if child == head {
                        // Exclude writers of these blocks while deciding and copying.
                        let mut st: Vec<usize> = (b..b + n).map(|x| x as usize % STRIPES).collect();
                        st.sort_unstable();
                        st.dedup();
                        let _g: Vec<_> = st
                            .iter()
                            .map(|&i| self.stripes[i].lock().unwrap_or_else(|e| e.into_inner()))
                            .collect();
                        let mut x = b;
                        while x < b + n {
                            if c.map[x as usize].load(Ordering::Acquire) != sid {
                                x += 1;
                                continue; // written meanwhile
                            }
                            let mut y = x + 1;
                            while y < b + n && c.map[y as usize].load(Ordering::Acquire) == sid {
                                y += 1;
                            }
                            let part = &mut chunk[((x - b) * BS) as usize..((y - b) * BS) as usize];
                            file::read_at(&sfile, part, x * BS)
                                .map_err(|e| io_err("read", &layer_path(&self.dir, s.id), e))?;
                            file::write_at(&cf, part, x * BS)
                                .map_err(|e| io_err("write", &layer_path(&self.dir, child), e))?;
                            for z in x..y {
                                c.map[z as usize].store(cid, Ordering::Release);
                            }
                            x = y;
                        }
                    } else {
                        file::read_at(&sfile, chunk, b * BS)
                            .map_err(|e| io_err("read", &layer_path(&self.dir, s.id), e))?;
                        file::write_at(&cf, chunk, b * BS)
                            .map_err(|e| io_err("write", &layer_path(&self.dir, child), e))?;
                        if on_head_path {
                            // The head's view now finds these blocks in the child.
                            for z in b..b + n {
                                let _ = c.map[z as usize].compare_exchange(
                                    sid,
                                    cid,
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                );
                            }
                        }
                    }
                    b += n;
                }
            }
            file::sync_data(&cf)
                .map_err(|e| io_err("fdatasync", &layer_path(&self.dir, child), e))?;
        }
        let mut c = self.write_chain();
        let mut m = c.meta.clone();
        m.layers.retain(|l| l.id != s.id);
        for l in &mut m.layers {
            if l.parent == Some(s.id) {
                l.parent = s.parent;
            }
        }
        self.commit(&mut c, m)?;
        c.files.remove(&s.id);
        drop(c);
        let p = layer_path(&self.dir, s.id);
        fs::remove_file(&p).map_err(|e| io_err("remove", &p, e))?;
        file::sync_dir(&self.dir).map_err(|e| io_err("fsync", &self.dir, e))
    }

    /// Discards the head: the replica reads as snapshot `name` again; other
    /// snapshots are kept.
    pub fn revert(&self, name: &str) -> Result<()> {
        let _ops = self.ops();
        let mut c = self.write_chain();
        let s = Self::find_snapshot(&c, name)?;
        let old = c.meta.head;
        let id = c.meta.next_id;
        owner_id(id)?;
        let f = Arc::new(create_layer(&self.dir, id, c.meta.size)?);
        let mut m = c.meta.clone();
        m.layers.retain(|l| l.id != old);
        m.layers.push(LayerMeta {
            id,
            parent: Some(s.id),
            snapshot: None,
        });
        m.head = id;
        m.next_id = id + 1;
        let mut files = c.files.clone();
        files.remove(&old);
        files.insert(id, f);
        let map = build_map(&self.dir, &files, &m.path_to(id)?, m.size)?;
        if let Err(e) = self.commit(&mut c, m) {
            let _ = fs::remove_file(layer_path(&self.dir, id));
            return Err(e);
        }
        c.files = files;
        c.map = map;
        drop(c);
        let p = layer_path(&self.dir, old);
        fs::remove_file(&p).map_err(|e| io_err("remove", &p, e))
    }

    /// Grows the replica to `new_size` bytes while I/O continues.
    pub fn expand(&self, new_size: u64) -> Result<()> {
        let _ops = self.ops();
        let mut c = self.write_chain();
        let size = c.meta.size;
        if new_size < size {
            return Err(Error::invalid(
                "volume size",
                format!("cannot shrink from {size} to {new_size} bytes"),
            ));
        }
        if !new_size.is_multiple_of(BS) {
            return Err(Error::invalid(
                "volume size",
                format!("{new_size} must be a multiple of {BS}"),
            ));
        }
        if new_size == size {
            return Ok(());
        }
        let head = c.head_file()?.clone();
        head.set_len(new_size)
            .map_err(|e| io_err("grow", &self.dir, e))?;
        head.sync_all().map_err(|e| io_err("fsync", &self.dir, e))?;
        let mut m = c.meta.clone();
        m.size = new_size;
        self.commit(&mut c, m)?;
        let n = new_size.div_ceil(BS) as usize;
        let extra = n - c.map.len();
        c.map.extend((0..extra).map(|_| AtomicU32::new(0)));
        Ok(())
    }

    /// 4 KiB-aligned ranges that may differ between snapshot `from` (or nothing)
    /// and snapshot `to`.
    pub fn changed_blocks(&self, from: Option<&str>, to: &str) -> Result<Vec<ByteRange>> {
        let c = self.read_chain();
        let t = Self::find_snapshot(&c, to)?;
        let tsize = t.snapshot.as_ref().map(|s| s.size).unwrap_or(c.meta.size);
        let path = c.meta.path_to(t.id)?;
        let start = match from {
            None => 0,
            Some(f) => {
                let fl = Self::find_snapshot(&c, f)?;
                let i = path.iter().position(|&id| id == fl.id).ok_or_else(|| {
                    Error::invalid(
                        "changed blocks",
                        format!("snapshot {f:?} is not an ancestor of {to:?}"),
                    )
                })?;
                if fl.id == t.id {
                    return Err(Error::invalid(
                        "changed blocks",
                        format!("{f:?} and {to:?} are the same snapshot"),
                    ));
                }
                i + 1
            }
        };
        let mut ranges = Vec::new();
        for id in &path[start..] {
            let f = c.files.get(id).ok_or_else(|| corrupt_map(*id as u32))?;
            for (o, l) in file::data_extents(f, 0, tsize)
                .map_err(|e| io_err("scan", &layer_path(&self.dir, *id), e))?
            {
                let s = o / BS * BS;
                let e = (o + l).div_ceil(BS) * BS;
                ranges.push(ByteRange::new(s, e.min(tsize) - s));
            }
        }
        Ok(coalesce_ranges(ranges))
    }

    /// A read-only view of snapshot `name`, independent of later changes.
    pub fn open_snapshot(self: &Arc<Self>, name: &str) -> Result<SnapshotView> {
        let c = self.read_chain();
        let s = Self::find_snapshot(&c, name)?;
        let size = s.snapshot.as_ref().map(|x| x.size).unwrap_or(c.meta.size);
        let path = c.meta.path_to(s.id)?;
        let files: HashMap<u64, Arc<File>> = path
            .iter()
            .filter_map(|id| c.files.get(id).map(|f| (*id, f.clone())))
            .collect();
        let map = build_map(&self.dir, &files, &path, size)?;
        let encrypted = c.meta.key_check.is_some();
        drop(c);
        if encrypted && self.cipher.get().is_none() {
            return Err(Error::invalid(
                format!("replica {}", self.dir.display()),
                "is encrypted: open it with its key",
            ));
        }
        Ok(SnapshotView {
            replica: self.clone(),
            files,
            map,
            size,
        })
    }

    /// A read-only view of snapshot `name` of the replica in `dir` without
    /// taking its lock: works while another process owns the replica (a VMM
    /// serving it), e.g. for a backup of a running VM's snapshot.
    ///
    /// A snapshot's layers never change while it exists (writes go to the
    /// head; deleting an older snapshot only copies identical blocks up into
    /// this one), and open descriptors keep a layer's data even if its file
    /// is unlinked, so the view stays consistent. Nothing in `dir` is
    /// modified, and the layer files are opened read-only.
    pub fn open_snapshot_shared(
        dir: &Path,
        name: &str,
        key: Option<&EncryptionKey>,
    ) -> Result<SnapshotView> {
        let m = meta::load(dir)?;
        let s = m
            .snapshot(name)
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot", name))?;
        let size = s.snapshot.as_ref().map(|x| x.size).unwrap_or(m.size);
        let path = m.path_to(s.id)?;
        let mut files = HashMap::new();
        for id in &path {
            let p = layer_path(dir, *id);
            let f = File::open(&p).map_err(|e| io_err("open", &p, e))?;
            files.insert(*id, Arc::new(f));
        }
        let map = build_map(dir, &files, &path, size)?;
        let encrypted = m.key_check.is_some();
        let observer = Replica {
            dir: dir.to_path_buf(),
            chain: RwLock::new(Chain {
                meta: m,
                files: HashMap::new(),
                map: Vec::new(),
            }),
            ops: Mutex::new(()),
            stripes: Vec::new(),
            cipher: OnceLock::new(),
            _lock: None,
        };
        match key {
            Some(k) => observer.unlock(k)?,
            None if encrypted => {
                return Err(Error::invalid(
                    format!("replica {}", dir.display()),
                    "is encrypted: open it with its key",
                ));
            }
            None => {}
        }
        Ok(SnapshotView {
            replica: Arc::new(observer),
            files,
            map,
            size,
        })
    }

    /// Writes a flattened copy of snapshot `name` into a new replica at `dest`
    /// (same key), copying only allocated blocks.
    pub fn clone_snapshot(self: &Arc<Self>, name: &str, dest: &Path) -> Result<Arc<Replica>> {
        let view = self.open_snapshot_raw(name)?;
        if meta::exists(dest) {
            return Err(Error::already_exists("replica", dest.display().to_string()));
        }
        let tmp = dest.with_extension("cloning.tmp");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| io_err("create directory", &tmp, e))?;
        let result = (|| {
            let f = create_layer(&tmp, 1, view.size)?;
            let mut buf = vec![0u8; 1 << 20];
            let nblocks = view.map.len() as u64;
            let mut b = 0;
            while b < nblocks {
                let owner = view.map[b as usize].load(Ordering::Relaxed);
                let mut n = 1;
                while b + n < nblocks
                    && n < 256
                    && view.map[(b + n) as usize].load(Ordering::Relaxed) == owner
                {
                    n += 1;
                }
                if owner != 0 {
                    let src = view
                        .files
                        .get(&u64::from(owner))
                        .ok_or_else(|| corrupt_map(owner))?;
                    let chunk = &mut buf[..(n * BS) as usize];
                    file::read_at(src, chunk, b * BS).map_err(|e| io_err("read", &self.dir, e))?;
                    file::write_at(&f, chunk, b * BS).map_err(|e| io_err("write", &tmp, e))?;
                }
                b += n;
            }
            f.sync_all().map_err(|e| io_err("fsync", &tmp, e))?;
            let key_check = self.read_chain().meta.key_check.clone();
            let m = Meta {
                format: meta::FORMAT,
                size: view.size,
                revision: 1,
                head: 1,
                next_id: 2,
                layers: vec![LayerMeta {
                    id: 1,
                    parent: None,
                    snapshot: None,
                }],
                key_check,
            };
            meta::store(&tmp, &m)
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, dest).map_err(|e| io_err("rename", dest, e))?;
        if let Some(parent) = dest.parent() {
            let _ = file::sync_dir(parent);
        }
        Replica::open(dest, None)
    }

    fn open_snapshot_raw(self: &Arc<Self>, name: &str) -> Result<SnapshotView> {
        let c = self.read_chain();
        let s = Self::find_snapshot(&c, name)?;
        let size = s.snapshot.as_ref().map(|x| x.size).unwrap_or(c.meta.size);
        let path = c.meta.path_to(s.id)?;
        let files: HashMap<u64, Arc<File>> = path
            .iter()
            .filter_map(|id| c.files.get(id).map(|f| (*id, f.clone())))
            .collect();
        let map = build_map(&self.dir, &files, &path, size)?;
        Ok(SnapshotView {
            replica: self.clone(),
            files,
            map,
            size,
        })
    }
}

/// Block runs `[first, last)` covered by `have` but not by `minus` (both byte
/// extents), limited to `nblocks`.
fn subtract_blocks(have: &[(u64, u64)], minus: &[ByteRange], nblocks: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut mi = 0usize;
    for &(off, len) in have {
        let mut b = off / BS;
        let end = (off + len).div_ceil(BS).min(nblocks);
        while b < end {
            let boff = b * BS;
            while mi < minus.len() && minus[mi].end() <= boff {
                mi += 1;
            }
            match minus.get(mi) {
                Some(m) if m.offset < boff + BS => {
                    // Skip the blocks the child holds.
                    b = m.end().div_ceil(BS).max(b + 1);
                }
                next => {
                    let stop = next.map_or(end, |m| (m.offset / BS).min(end)).max(b + 1);
                    match out.last_mut() {
                        Some((_, l)) if *l == b => *l = stop,
                        _ => out.push((b, stop)),
                    }
                    b = stop;
                }
            }
        }
    }
    out
}

fn corrupt_map(owner: u32) -> Error {
    Error::Corrupt {
        what: format!("block map (layer {owner} has no file)"),
        source: None,
    }
}

/// Reads through an owner map.
fn read_view(
    dir: &Path,
    files: &HashMap<u64, Arc<File>>,
    map: &OwnerMap,
    cipher: Option<&Cipher>,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    let end = offset + buf.len() as u64;
    let mut pos = offset;
    let mut scratch = Vec::new();
    while pos < end {
        let b = pos / BS;
        let owner = map[b as usize].load(Ordering::Acquire);
        // Extend the run while the owner stays the same.
        let mut run_end = ((b + 1) * BS).min(end);
        while run_end < end && map[(run_end / BS) as usize].load(Ordering::Acquire) == owner {
            run_end = ((run_end / BS + 1) * BS).min(end);
        }
        let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
        if owner == 0 {
            dst.fill(0);
        } else {
            let f = files
                .get(&u64::from(owner))
                .ok_or_else(|| corrupt_map(owner))?;
            match cipher {
                None => file::read_at(f, dst, pos)
                    .map_err(|e| io_err("read", &layer_path(dir, owner.into()), e))?,
                Some(ci) => {
                    let first = pos / BS;
                    let last = run_end.div_ceil(BS);
                    scratch.resize(((last - first) * BS) as usize, 0);
                    file::read_at(f, &mut scratch, first * BS)
                        .map_err(|e| io_err("read", &layer_path(dir, owner.into()), e))?;
                    for (i, chunk) in scratch.chunks_mut(BSU).enumerate() {
                        ci.decrypt(chunk, first + i as u64);
                    }
                    let skip = (pos - first * BS) as usize;
                    dst.copy_from_slice(&scratch[skip..skip + dst.len()]);
                }
            }
        }
        pos = run_end;
    }
    Ok(())
}

fn map_status(map: &OwnerMap, offset: u64, len: u64) -> Vec<Extent> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let b = pos / BS;
        let next = ((b + 1) * BS).min(end);
        let kind = if map[b as usize].load(Ordering::Acquire) == 0 {
            ExtentKind::Hole
        } else {
            ExtentKind::Data
        };
        match out.last_mut() {
            Some(l) if l.kind == kind => l.len += next - pos,
            _ => out.push(Extent {
                offset: pos,
                len: next - pos,
                kind,
            }),
        }
        pos = next;
    }
    out
}

/// A read-only view of one snapshot (holds its layer files open, so it stays
/// readable even if the snapshot is deleted meanwhile).
#[derive(Debug)]
pub struct SnapshotView {
    replica: Arc<Replica>,
    files: HashMap<u64, Arc<File>>,
    map: OwnerMap,
    size: u64,
}

impl SnapshotView {
    /// Size of the snapshot.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads from the snapshot.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        read_view(
            &self.replica.dir,
            &self.files,
            &self.map,
            self.replica.cipher.get(),
            buf,
            offset,
        )
    }

    /// Allocation of the snapshot.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        Ok(map_status(&self.map, offset, len))
    }
}
