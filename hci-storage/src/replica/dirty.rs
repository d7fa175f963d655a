//! The dirty-region log a replica keeps for its engine: a bitmap of regions
//! that may have writes in flight, persisted before those writes are sent,
//! so that reconcile after an engine crash compares only those regions
//! instead of all allocated data (like md's write-intent bitmap).
//!
//! File `<root>/.fence/<volume>.dirty`: the magic `HCIDIRT1`, the region
//! size (u64 LE), then one bit per region (bit `i % 8` of byte `i / 8`),
//! regions past the end of the file clean. Updates rewrite only the bytes
//! that changed and are synced before the call returns. A missing file means
//! "no log": reconcile must then compare everything.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use hci_core::{Error, Result};

const MAGIC: &[u8; 8] = b"HCIDIRT1";
const HEADER: usize = 16;
/// Largest region count a log holds (a bitmap of 2 MiB).
pub const MAX_REGIONS: u64 = 1 << 24;

/// Dirty regions of one volume: runs of `(first region, count)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRegions {
    /// Region size in bytes (a power of two).
    pub region_size: u64,
    /// Sorted, non-overlapping runs `(first, count)`.
    pub runs: Vec<(u64, u64)>,
}

impl DirtyRegions {
    /// The byte ranges `(offset, len)` the runs cover.
    pub fn byte_ranges(&self) -> Vec<(u64, u64)> {
        self.runs
            .iter()
            .map(|&(f, n)| {
                (
                    f.saturating_mul(self.region_size),
                    n.saturating_mul(self.region_size),
                )
            })
            .collect()
    }

    /// Number of dirty regions.
    pub fn count(&self) -> u64 {
        self.runs.iter().map(|&(_, n)| n).sum()
    }
}

/// A change to a dirty-region log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DirtyUpdate {
    /// Start an empty log of `region_size` regions (creating it if missing).
    Reset {
        /// Region size in bytes.
        region_size: u64,
    },
    /// Mark regions dirty (before writes to them are sent).
    Mark(DirtyRegions),
    /// Clear regions (after the writes to them were flushed everywhere).
    Clear(DirtyRegions),
}

/// Turns region indexes into sorted runs.
pub fn runs_of(mut regions: Vec<u64>) -> Vec<(u64, u64)> {
    regions.sort_unstable();
    regions.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for r in regions {
        match runs.last_mut() {
            Some((f, n)) if *f + *n == r => *n += 1,
            _ => runs.push((r, 1)),
        }
    }
    runs
}

fn check_region_size(region_size: u64) -> Result<()> {
    if !region_size.is_power_of_two() || region_size < 4096 {
        return Err(Error::invalid(
            "dirty region size",
            "must be a power of two of at least 4096",
        ));
    }
    Ok(())
}

fn check_runs(runs: &[(u64, u64)]) -> Result<()> {
    for &(f, n) in runs {
        if f.checked_add(n).is_none_or(|end| end > MAX_REGIONS) {
            return Err(Error::invalid(
                "dirty regions",
                format!("reach past region {MAX_REGIONS}"),
            ));
        }
    }
    Ok(())
}

/// The log of one volume on one node, kept in memory and on disk.
#[derive(Debug)]
pub struct DirtyLog {
    path: PathBuf,
    file: File,
    region_size: u64,
    bits: Vec<u8>,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let what = format!("{what} {}", path.display());
    move |e| Error::io(what, e)
}

impl DirtyLog {
    /// Reads the log at `path`; `None` if there is none.
    pub fn load(path: &Path) -> Result<Option<DirtyLog>> {
        let body = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", path)(e)),
        };
        let corrupt = |why: &str| Error::Corrupt {
            what: format!("dirty-region log {}", path.display()),
            source: Some(why.to_string().into()),
        };
        if body.len() < HEADER || &body[..8] != MAGIC {
            return Err(corrupt("bad header"));
        }
        let mut rs = [0u8; 8];
        rs.copy_from_slice(&body[8..16]);
        let region_size = u64::from_le_bytes(rs);
        if check_region_size(region_size).is_err() {
            return Err(corrupt("bad region size"));
        }
        if (body.len() - HEADER) as u64 > MAX_REGIONS / 8 {
            return Err(corrupt("too long"));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("open", path))?;
        Ok(Some(DirtyLog {
            path: path.to_path_buf(),
            file,
            region_size,
            bits: body[HEADER..].to_vec(),
        }))
    }

    /// Writes a fresh, empty log at `path` (replacing any), synced.
    pub fn create(path: &Path, region_size: u64) -> Result<DirtyLog> {
        check_region_size(region_size)?;
        let tmp = path.with_extension("dirty.tmp");
        let mut head = Vec::with_capacity(HEADER);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&region_size.to_le_bytes());
        {
            let f = File::create(&tmp).map_err(io("create", &tmp))?;
            f.write_all_at(&head, 0)
                .and_then(|()| f.sync_all())
                .map_err(io("write", &tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(io("rename", &tmp))?;
        if let Some(dir) = path.parent()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("open", path))?;
        Ok(DirtyLog {
            path: path.to_path_buf(),
            file,
            region_size,
            bits: Vec::new(),
        })
    }

    /// The dirty regions.
    pub fn regions(&self) -> DirtyRegions {
        let mut idx = Vec::new();
        for (i, &b) in self.bits.iter().enumerate() {
            if b == 0 {
                continue;
            }
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    idx.push(i as u64 * 8 + bit);
                }
            }
        }
        DirtyRegions {
            region_size: self.region_size,
            runs: runs_of(idx),
        }
    }

    /// Re-expresses the log in `region_size` regions, covering at least the
    /// bytes it covered (a finer size keeps every byte of a coarse region).
    fn convert(&mut self, region_size: u64) -> Result<()> {
        check_region_size(region_size)?;
        if region_size == self.region_size {
            return Ok(());
        }
        let old = self.regions();
        let mut idx = Vec::new();
        for (off, len) in old.byte_ranges() {
            let first = off / region_size;
            let last = (off + len - 1) / region_size;
            if last >= MAX_REGIONS {
                return Err(Error::invalid(
                    "dirty region size",
                    "too small for this log",
                ));
            }
            idx.extend(first..=last);
        }
        let new = runs_of(idx);
        self.region_size = region_size;
        self.bits.clear();
        self.set_runs(&new, true);
        // Rewrite the whole file: header and bitmap.
        let mut body = Vec::with_capacity(HEADER + self.bits.len());
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&region_size.to_le_bytes());
        body.extend_from_slice(&self.bits);
        self.file
            .set_len(0)
            .and_then(|()| self.file.write_all_at(&body, 0))
            .and_then(|()| self.file.sync_data())
            .map_err(io("write", &self.path))
    }

    /// Sets or clears runs in memory; returns the byte range of the bitmap
    /// that changed.
    fn set_runs(&mut self, runs: &[(u64, u64)], dirty: bool) -> Option<(usize, usize)> {
        let mut changed: Option<(usize, usize)> = None;
        for &(f, n) in runs {
            for r in f..f + n {
                let (byte, bit) = ((r / 8) as usize, (r % 8) as u8);
                if byte >= self.bits.len() {
                    if !dirty {
                        continue;
                    }
                    self.bits.resize(byte + 1, 0);
                }
                let old = self.bits[byte];
                let new = if dirty {
                    old | (1 << bit)
                } else {
                    old & !(1 << bit)
                };
                if new != old {
                    self.bits[byte] = new;
                    changed = Some(match changed {
                        None => (byte, byte + 1),
                        Some((a, b)) => (a.min(byte), b.max(byte + 1)),
                    });
                }
            }
        }
        changed
    }

    /// Marks (`dirty`) or clears `runs` of `region_size` regions, persisted
    /// before it returns.
    pub fn update(&mut self, region_size: u64, runs: &[(u64, u64)], dirty: bool) -> Result<()> {
        check_runs(runs)?;
        self.convert(region_size)?;
        if let Some((a, b)) = self.set_runs(runs, dirty) {
            self.file
                .write_all_at(&self.bits[a..b], (HEADER + a) as u64)
                .and_then(|()| self.file.sync_data())
                .map_err(io("write", &self.path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_neighbours() {
        assert_eq!(
            runs_of(vec![5, 1, 2, 3, 9, 3]),
            vec![(1, 3), (5, 1), (9, 1)]
        );
        assert!(runs_of(Vec::new()).is_empty());
    }

    #[test]
    fn marks_persist_and_clear() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("v.dirty");
        assert!(DirtyLog::load(&p).expect("load").is_none());
        let mut log = DirtyLog::create(&p, 1 << 20).expect("create");
        log.update(1 << 20, &[(3, 2), (100, 1)], true)
            .expect("mark");
        let back = DirtyLog::load(&p).expect("load").expect("some");
        assert_eq!(back.regions().runs, vec![(3, 2), (100, 1)]);
        log.update(1 << 20, &[(4, 1), (100, 1), (5000, 1)], false)
            .expect("clear");
        let back = DirtyLog::load(&p).expect("load").expect("some");
        assert_eq!(back.regions().runs, vec![(3, 1)]);
        assert_eq!(back.regions().byte_ranges(), vec![(3 << 20, 1 << 20)]);
    }

    #[test]
    fn a_new_region_size_keeps_every_dirty_byte() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("v.dirty");
        let mut log = DirtyLog::create(&p, 1 << 20).expect("create");
        log.update(1 << 20, &[(3, 1)], true).expect("mark");
        // Coarser: region 3 of 1 MiB lies in region 0 of 4 MiB.
        log.update(4 << 20, &[(2, 1)], true).expect("mark");
        assert_eq!(log.regions().runs, vec![(0, 1), (2, 1)]);
        // Finer again: each 4 MiB region becomes four 1 MiB ones.
        log.update(1 << 20, &[], true).expect("convert");
        let back = DirtyLog::load(&p).expect("load").expect("some");
        assert_eq!(back.regions().runs, vec![(0, 4), (8, 4)]);
    }

    proptest::proptest! {
        // Every update syncs a file: keep the case count modest.
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]
        #[test]
        fn any_file_loads_or_fails_cleanly(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), magic in proptest::prelude::any::<bool>()) {
            let d = tempfile::tempdir().expect("tempdir");
            let p = d.path().join("v.dirty");
            let mut b = Vec::new();
            if magic {
                b.extend_from_slice(MAGIC);
            }
            b.extend_from_slice(&body);
            std::fs::write(&p, &b).expect("write");
            if let Ok(Some(l)) = DirtyLog::load(&p) {
                let r = l.regions();
                proptest::prop_assert!(r.region_size.is_power_of_two());
            }
        }

        #[test]
        fn updates_match_a_set(ops in proptest::collection::vec((0u64..200, 1u64..20, proptest::prelude::any::<bool>()), 0..30)) {
            let d = tempfile::tempdir().expect("tempdir");
            let p = d.path().join("v.dirty");
            let mut log = DirtyLog::create(&p, 1 << 20).expect("create");
            let mut model = std::collections::BTreeSet::new();
            for (f, n, mark) in ops {
                log.update(1 << 20, &[(f, n)], mark).expect("update");
                for r in f..f + n {
                    if mark { model.insert(r); } else { model.remove(&r); }
                }
            }
            let want = runs_of(model.into_iter().collect());
            proptest::prop_assert_eq!(&log.regions().runs, &want);
            let back = DirtyLog::load(&p).expect("load").expect("some");
            proptest::prop_assert_eq!(&back.regions().runs, &want);
        }
    }

    #[test]
    fn bad_input_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("v.dirty");
        assert!(DirtyLog::create(&p, 1000).is_err());
        let mut log = DirtyLog::create(&p, 1 << 20).expect("create");
        assert!(log.update(1 << 20, &[(u64::MAX, 2)], true).is_err());
        assert!(log.update(1 << 20, &[(MAX_REGIONS, 1)], true).is_err());
        std::fs::write(&p, b"garbage").expect("write");
        assert!(DirtyLog::load(&p).is_err());
    }
}
