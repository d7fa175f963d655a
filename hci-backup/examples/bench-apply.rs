//! Benchmark helper: copies the 4 KiB blocks listed in OFFSETS (one byte
//! offset per line) from IMAGE into the head of the local volume VOLUME_DIR.
//!
//! Usage: `bench-apply VOLUME_DIR IMAGE OFFSETS`

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result};
use hci_core::block::WriteFlags;
use hci_core::volume::{OpenVolume, VolumeBackend};
use hci_storage::local::LocalVolumeBackend;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, image, offsets] = args.as_slice() else {
        anyhow::bail!("usage: bench-apply VOLUME_DIR IMAGE OFFSETS");
    };
    let dir = std::path::absolute(Path::new(dir))?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("volume name")?;
    let root = dir.parent().context("volume parent")?;
    let backend = LocalVolumeBackend::new(root)?;
    let dev = backend.open(name, OpenVolume::default()).await?;
    let mut img = std::fs::File::open(image).context("open image")?;
    let mut buf = vec![0u8; 4096];
    for line in std::fs::read_to_string(offsets)
        .context("read offsets")?
        .lines()
    {
        let off: u64 = line.trim().parse().context("offset")?;
        img.seek(SeekFrom::Start(off))?;
        img.read_exact(&mut buf)?;
        dev.write_at(&buf, off, WriteFlags::default()).await?;
    }
    dev.flush().await?;
    Ok(())
}
