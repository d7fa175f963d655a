//! The local replica store: thin volumes on sparse files with O(1) snapshots.
//!
//! ## On-disk layout (one directory per replica)
//!
//! ```text
//! volume.json        metadata: size, revision, layer tree, key check (+ crc32c line)
//! volume.json.bak    the same, written first (fallback if the main copy is damaged)
//! layer-<id>.img     one sparse file per layer, as large as the volume was
//! ```
//!
//! Layers form a tree: each snapshot is a frozen layer, the writable *head* sits
//! on top of the snapshot it was taken after (or reverted to). A block is read
//! from the topmost layer on the head's path that holds it; an in-memory map
//! (4 bytes per 4 KiB block) says which, rebuilt at open from the files with
//! `SEEK_DATA`/`SEEK_HOLE` — the files are the truth, so nothing but metadata
//! needs journaling.
//!
//! - **Snapshot**: fsync the head, create an empty layer, switch metadata
//!   atomically. No data is copied: O(1) whatever the size.
//! - **Delete snapshot**: copy the snapshot's blocks into each child that lacks
//!   them (under per-block locks, while I/O goes on), then drop the layer.
//! - **Write-zeroes / discard**: punch holes where no older layer holds the
//!   block (space returns), write real zeroes where one does.
//! - **Changed blocks** between snapshots: the union of the data extents of the
//!   layers between them, at 4 KiB granularity.
//! - **Durability**: data after `flush` (fdatasync of the head) or FUA;
//!   metadata by write-temp + fsync + rename + fsync-dir; leftovers of an
//!   interrupted operation are removed at open.
//! - **Encryption**: AES-XTS-256 per 4 KiB block, block index as tweak; a key
//!   check value in the metadata refuses a wrong key.
//!
//! I/O runs as positional reads and writes on the calling thread: for a file
//! in the page cache a 4 KiB `pread` costs about a microsecond, several times
//! less than a hop through `spawn_blocking`.

mod backend;
pub mod control;
mod crypt;
mod file;
mod import;
mod meta;
mod volume;

pub use backend::{LocalVolumeBackend, ReplicaDevice, SnapshotDevice};
pub use import::{image_virtual_size, import_image};
pub use volume::{Replica, SnapshotView};

use hci_core::{Error, Result};

/// Checks a volume or snapshot name: it becomes a file or directory name.
pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.len() > 255 {
        "must be at most 255 bytes"
    } else if name.contains(['/', '\0']) {
        "must not contain '/' or NUL"
    } else if name.starts_with('.') {
        "must not start with '.'"
    } else {
        return Ok(());
    };
    Err(Error::invalid(format!("{what} name {name:?}"), reason))
}
