//! Importing raw and qcow2 images into new replicas, keeping them sparse.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use hci_core::block::BLOCK_SIZE;
use hci_core::volume::EncryptionKey;
use hci_core::{Error, Result};

use super::file;
use super::volume::Replica;

fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| Error::io("run qemu-img (install qemu-utils)", e))?;
    if !out.status.success() {
        return Err(Error::invalid(
            "image",
            format!(
                "qemu-img failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(out.stdout)
}

/// The virtual size of an image file (any format qemu-img reads).
pub fn image_virtual_size(image: &Path) -> Result<u64> {
    let out = qemu_img(&["info".as_ref(), "--output=json".as_ref(), image.as_os_str()])?;
    let v: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|e| Error::invalid("image", format!("unreadable qemu-img info output: {e}")))?;
    v.get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| Error::invalid("image", "qemu-img info reported no virtual size"))
}

/// Creates a replica in `dir` holding the content of `image` (raw, qcow2, or any
/// format qemu-img reads). Only allocated, non-zero 4 KiB blocks are written, so
/// the replica is as sparse as the image. The size is rounded up to 4 KiB.
pub fn import_image(image: &Path, dir: &Path, key: Option<&EncryptionKey>) -> Result<Arc<Replica>> {
    let size = image_virtual_size(image)?.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    if size == 0 {
        return Err(Error::invalid("image", "has a virtual size of 0"));
    }
    let replica = Replica::create(dir, size, key)?;
    let result = (|| {
        // Convert to a sparse raw file next to the replica, then copy its data.
        let tmp = dir.join("import.raw.tmp");
        qemu_img(&[
            "convert".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            "-S".as_ref(),
            "4k".as_ref(),
            image.as_os_str(),
            tmp.as_os_str(),
        ])?;
        let raw = std::fs::File::open(&tmp)
            .map_err(|e| Error::io(format!("open {}", tmp.display()), e))?;
        let mut buf = vec![0u8; 1 << 20];
        for (off, len) in file::data_extents(&raw, 0, size)
            .map_err(|e| Error::io("scan the converted image", e))?
        {
            let mut pos = off / BLOCK_SIZE * BLOCK_SIZE;
            let end = ((off + len).div_ceil(BLOCK_SIZE) * BLOCK_SIZE).min(size);
            while pos < end {
                let n = ((end - pos) as usize).min(buf.len());
                let chunk = &mut buf[..n];
                file::read_at(&raw, chunk, pos)
                    .map_err(|e| Error::io("read the converted image", e))?;
                // Skip all-zero blocks inside allocated extents.
                for (i, block) in chunk.chunks(BLOCK_SIZE as usize).enumerate() {
                    if block.iter().any(|&b| b != 0) {
                        replica.write(block, pos + (i as u64) * BLOCK_SIZE, false)?;
                    }
                }
                pos += n as u64;
            }
        }
        drop(raw);
        let _ = std::fs::remove_file(&tmp);
        replica.flush()
    })();
    if let Err(e) = result {
        drop(replica);
        let _ = std::fs::remove_dir_all(dir);
        return Err(e);
    }
    Ok(replica)
}
