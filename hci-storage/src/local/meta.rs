//! Replica metadata: the layer tree, size and revision, stored atomically.
//!
//! `volume.json` holds the JSON body followed by a line `crc32c:<hex>` over the
//! body. It is replaced by write-temp + fsync + rename + fsync-directory, so a
//! crash leaves the old or the new version, never a mix. A copy is kept in
//! `volume.json.bak` (written first) for when the main file is damaged.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use hci_core::{Error, Result};

use super::file::sync_dir;

/// The on-disk format version this code writes.
pub(crate) const FORMAT: u32 = 1;
const FILE: &str = "volume.json";
const BACKUP: &str = "volume.json.bak";

/// One layer: a sparse file `layer-<id>.img`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LayerMeta {
    pub(crate) id: u64,
    /// The layer below (`None` for the first).
    pub(crate) parent: Option<u64>,
    /// Set when the layer is a (read-only) snapshot.
    pub(crate) snapshot: Option<SnapMeta>,
}

/// What makes a layer a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapMeta {
    pub(crate) name: String,
    pub(crate) created: DateTime<Utc>,
    pub(crate) size: u64,
}

/// A replica's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub(crate) format: u32,
    pub(crate) size: u64,
    /// Bumped by every metadata change.
    pub(crate) revision: u64,
    /// The writable layer.
    pub(crate) head: u64,
    pub(crate) next_id: u64,
    pub(crate) layers: Vec<LayerMeta>,
    /// Key-check value of an encrypted volume.
    pub(crate) key_check: Option<String>,
}

impl Meta {
    pub(crate) fn layer(&self, id: u64) -> Option<&LayerMeta> {
        self.layers.iter().find(|l| l.id == id)
    }

    pub(crate) fn snapshot(&self, name: &str) -> Option<&LayerMeta> {
        self.layers
            .iter()
            .find(|l| l.snapshot.as_ref().is_some_and(|s| s.name == name))
    }

    /// Layer ids from the root down to `id` (inclusive).
    pub(crate) fn path_to(&self, id: u64) -> Result<Vec<u64>> {
        let mut path = Vec::new();
        let mut cur = Some(id);
        while let Some(c) = cur {
            if path.len() > self.layers.len() {
                return Err(corrupt("the layer tree has a cycle"));
            }
            let l = self
                .layer(c)
                .ok_or_else(|| corrupt(format!("layer {c} is missing")))?;
            path.push(c);
            cur = l.parent;
        }
        path.reverse();
        Ok(path)
    }

    pub(crate) fn children(&self, id: u64) -> Vec<u64> {
        self.layers
            .iter()
            .filter(|l| l.parent == Some(id))
            .map(|l| l.id)
            .collect()
    }

    /// Snapshots ordered oldest first (by creation, then id).
    pub(crate) fn snapshots(&self) -> Vec<(&LayerMeta, &SnapMeta)> {
        let mut v: Vec<_> = self
            .layers
            .iter()
            .filter_map(|l| l.snapshot.as_ref().map(|s| (l, s)))
            .collect();
        v.sort_by_key(|(l, s)| (s.created, l.id));
        v
    }

    fn validate(&self) -> Result<()> {
        if self.format != FORMAT {
            return Err(corrupt(format!(
                "unsupported format version {}",
                self.format
            )));
        }
        if self.layer(self.head).is_none_or(|h| h.snapshot.is_some()) {
            return Err(corrupt("the head layer is missing or is a snapshot"));
        }
        for l in &self.layers {
            self.path_to(l.id)?;
        }
        Ok(())
    }
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        what: format!("replica metadata ({what})"),
        source: None,
    }
}

/// The path of layer `id` in `dir`.
pub(crate) fn layer_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("layer-{id}.img"))
}

fn encode(meta: &Meta) -> Result<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(meta)
        .map_err(|e| Error::invalid("replica metadata", e.to_string()))?;
    let crc = crc32c::crc32c(&body);
    body.extend_from_slice(format!("\ncrc32c:{crc:08x}\n").as_bytes());
    Ok(body)
}

fn decode(bytes: &[u8], path: &Path) -> Result<Meta> {
    let bad = |why: &str| Error::Corrupt {
        what: format!("replica metadata {} ({why})", path.display()),
        source: None,
    };
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8"))?;
    let text = text.strip_suffix('\n').ok_or_else(|| bad("truncated"))?;
    let (body, trailer) = text.rsplit_once('\n').ok_or_else(|| bad("no checksum"))?;
    let want = trailer
        .strip_prefix("crc32c:")
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| bad("no checksum"))?;
    if crc32c::crc32c(body.as_bytes()) != want {
        return Err(bad("checksum mismatch"));
    }
    let meta: Meta = serde_json::from_str(body).map_err(|_| bad("unreadable JSON"))?;
    meta.validate()?;
    Ok(meta)
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let io = |what: &str, e| Error::io(format!("{what} {}", tmp.display()), e);
    let mut f = fs::File::create(&tmp).map_err(|e| io("create", e))?;
    f.write_all(bytes).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("fsync", e))?;
    drop(f);
    fs::rename(&tmp, dir.join(name)).map_err(|e| io("rename", e))?;
    sync_dir(dir).map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))
}

/// Stores `meta` atomically (backup copy first, then the main file).
pub(crate) fn store(dir: &Path, meta: &Meta) -> Result<()> {
    let bytes = encode(meta)?;
    write_atomic(dir, BACKUP, &bytes)?;
    write_atomic(dir, FILE, &bytes)
}

/// Loads the metadata, falling back to the backup copy if the main file is damaged.
pub(crate) fn load(dir: &Path) -> Result<Meta> {
    let main = dir.join(FILE);
    let first = match fs::read(&main) {
        Ok(b) => decode(&b, &main),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !dir.exists() {
                return Err(Error::not_found("replica", dir.display().to_string()));
            }
            Err(Error::io(format!("read {}", main.display()), e))
        }
        Err(e) => Err(Error::io(format!("read {}", main.display()), e)),
    };
    match first {
        Ok(m) => Ok(m),
        Err(e) => {
            let bak = dir.join(BACKUP);
            match fs::read(&bak).map(|b| decode(&b, &bak)) {
                Ok(Ok(m)) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "using the backup metadata copy");
                    Ok(m)
                }
                _ => Err(e),
            }
        }
    }
}

/// True if `dir` holds replica metadata.
pub(crate) fn exists(dir: &Path) -> bool {
    dir.join(FILE).exists() || dir.join(BACKUP).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Meta {
        Meta {
            format: FORMAT,
            size: 1 << 20,
            revision: 3,
            head: 2,
            next_id: 3,
            layers: vec![
                LayerMeta {
                    id: 1,
                    parent: None,
                    snapshot: Some(SnapMeta {
                        name: "s".into(),
                        created: Utc::now(),
                        size: 1 << 20,
                    }),
                },
                LayerMeta {
                    id: 2,
                    parent: Some(1),
                    snapshot: None,
                },
            ],
            key_check: None,
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = sample();
        store(dir.path(), &m).expect("store");
        assert_eq!(load(dir.path()).expect("load"), m);

        // A damaged main file falls back to the backup copy.
        let main = dir.path().join(FILE);
        let mut bytes = fs::read(&main).expect("read");
        bytes[10] ^= 0x20;
        fs::write(&main, &bytes).expect("write");
        assert_eq!(load(dir.path()).expect("fallback"), m);

        // Both damaged: a clear error, never a panic.
        fs::write(dir.path().join(BACKUP), b"garbage").expect("write");
        let e = load(dir.path()).expect_err("both damaged");
        assert!(e.to_string().contains("integrity"), "{e}");
        fs::write(&main, &bytes[..bytes.len() / 2]).expect("truncate");
        assert!(load(dir.path()).is_err());
    }

    #[test]
    fn structural_damage_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = sample();
        m.layers[0].parent = Some(2);
        store(dir.path(), &m).expect("store");
        assert!(load(dir.path()).is_err(), "a cycle must be refused");
    }
}
