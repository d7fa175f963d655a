//! A raw disk image file as a [`BlockDevice`] (`pread`/`pwrite`): for disk
//! images handed to a VM as they are, and for benchmarks.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use async_trait::async_trait;
use hci_core::block::{BlockDevice, Extent, ExtentKind, WriteFlags, ZeroFlags, check_range};
use hci_core::{Error, Result};

/// A raw image file. Its size is the file's size; writes never grow it.
#[derive(Debug)]
pub struct RawFileDevice {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawFileDevice {
    /// Opens `path` (read-write unless `read_only`).
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io(format!("open the disk image {}", path.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        Ok(RawFileDevice {
            file,
            size,
            read_only,
        })
    }

    fn writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                what: "the disk image".into(),
            });
        }
        check_range(offset, len, self.size)
    }
}

#[async_trait]
impl BlockDevice for RawFileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io("read the disk image", e))
    }

    async fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<()> {
        self.writable(offset, buf.len() as u64)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io("write the disk image", e))?;
        if flags.fua {
            self.file
                .sync_data()
                .map_err(|e| Error::io("sync the disk image", e))?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync the disk image", e))
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Advisory: nothing is released (the capability is not advertised).
        self.writable(offset, len)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _: ZeroFlags) -> Result<()> {
        self.writable(offset, len)?;
        let zeroes = vec![0u8; 64 << 10];
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = (end - at).min(zeroes.len() as u64) as usize;
            self.file
                .write_all_at(&zeroes[..n], at)
                .map_err(|e| Error::io("write the disk image", e))?;
            at += n as u64;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        Ok(vec![Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        }])
    }
}
