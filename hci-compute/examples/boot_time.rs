//! Boot-time and memory probe for the KVM VMM, used by `scripts/bench-vmm.sh`.
//!
//! ```text
//! boot_time build-guest hello|spin|blk      # prints the built ELF's path
//! boot_time run [--disk FILE] KERNEL [CPUS] [MEMORY_MIB] [CMDLINE...]
//! ```
//!
//! `--disk FILE` attaches FILE as a virtio-blk disk (read with `pread`, for
//! comparing against QEMU reading the same file).
//!
//! `run` boots KERNEL with the guest's serial output going straight to stdout
//! (so an outside harness can time the first byte exactly as it does for
//! QEMU's `-serial stdio`), and when the guest stops prints one JSON line of
//! internal timings and memory figures to stderr.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hci_compute::devices::virtio::block::Executor;
use hci_compute::test_guests::{self, Guest};
use hci_compute::{DiskSpec, Vm, VmSpec};
use hci_core::block::{BlockDevice, Extent, ExtentKind, WriteFlags, ZeroFlags, check_range};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("build-guest") => {
            let guest = match args.get(1).map(String::as_str) {
                Some("hello") => Guest::Hello,
                Some("spin") => Guest::Spin,
                Some("blk") => Guest::Blk,
                Some("chaos") => Guest::Chaos,
                Some("net") => Guest::Net,
                Some("rng") => Guest::Rng,
                other => bail!("unknown guest {other:?}; expected hello, spin or blk"),
            };
            let path = test_guests::build_default(guest).context("build the test guest")?;
            writeln!(std::io::stdout(), "{}", path.display())?;
            Ok(())
        }
        Some("run") => run(t0, &args[1..]),
        _ => bail!(
            "usage: boot_time build-guest NAME | boot_time run KERNEL [CPUS] [MEMORY_MIB] [CMDLINE...]"
        ),
    }
}

fn run(t0: Instant, mut args: &[String]) -> anyhow::Result<()> {
    let mut disks = Vec::new();
    if args.first().map(String::as_str) == Some("--disk") {
        let path = args.get(1).context("--disk needs a FILE")?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .context("open the disk file")?;
        let size = file.metadata()?.len();
        let device = Arc::new(FileDisk { file, size });
        disks.push(DiskSpec {
            name: "bench".into(),
            device,
            read_only: false,
        });
        args = &args[2..];
    }
    let kernel = args.first().context("missing KERNEL")?;
    let cpus: u32 = args
        .get(1)
        .map(|s| s.parse())
        .transpose()
        .context("bad CPUS")?
        .unwrap_or(1);
    let mem_mib: u64 = args
        .get(2)
        .map(|s| s.parse())
        .transpose()
        .context("bad MEMORY_MIB")?
        .unwrap_or(64);
    let cmdline = args.get(3..).map(|a| a.join(" ")).unwrap_or_default();
    let spec = VmSpec {
        name: "bench".into(),
        cpus,
        memory: mem_mib << 20,
        kernel: kernel.into(),
        initrd: None,
        cmdline,
        disks,
        nics: vec![],
        entropy: false,
        // Unbuffered writes to our stdout, byte by byte as the guest sends them.
        console_log: Some("/dev/stdout".into()),
    };
    let vm = Vm::new(spec, Executor::Private)?;
    let created = t0.elapsed();
    vm.start()?;
    let reason = vm.wait_timeout(Duration::from_secs(60));
    let exited = t0.elapsed();
    let first = vm
        .console()
        .first_output()
        .map(|t| ms(t.duration_since(t0)));
    let rss = rss_kib("VmRSS:");
    let guest_rss = guest_rss_kib(mem_mib * 1024);
    let line = format!(
        "{{\"create_ms\":{:.3},\"first_byte_ms\":{},\"exit_ms\":{:.3},\"exit\":\"{:?}\",\"rss_kib\":{rss},\"guest_rss_kib\":{guest_rss},\"overhead_kib\":{}}}",
        ms(created),
        first.map_or("null".into(), |f| format!("{f:.3}")),
        ms(exited),
        reason,
        rss.saturating_sub(guest_rss),
    );
    writeln!(std::io::stderr(), "{line}")?;
    vm.kill();
    Ok(())
}

fn rss_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(key)
                    .map(|v| v.trim().trim_end_matches("kB").trim().to_string())
            })
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Rss of the mapping(s) whose size is the guest memory size.
fn guest_rss_kib(size_kib: u64) -> u64 {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut total = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            in_guest = v.trim().trim_end_matches("kB").trim().parse::<u64>().ok() == Some(size_kib);
        } else if in_guest && let Some(v) = line.strip_prefix("Rss:") {
            total += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    total
}

/// A plain file as a block device (`pread`/`pwrite`), for benchmarks.
#[derive(Debug)]
struct FileDisk {
    file: File,
    size: u64,
}

fn io_err(what: &str, e: std::io::Error) -> hci_core::Error {
    hci_core::Error::io(what, e)
}

#[async_trait::async_trait]
impl BlockDevice for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        false
    }

    async fn read_at(&self, buf: &mut [u8], offset: u64) -> hci_core::Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| io_err("read the disk file", e))
    }

    async fn write_at(&self, buf: &[u8], offset: u64, _: WriteFlags) -> hci_core::Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| io_err("write the disk file", e))
    }

    async fn flush(&self) -> hci_core::Result<()> {
        self.file
            .sync_data()
            .map_err(|e| io_err("sync the disk file", e))
    }

    async fn discard(&self, _: u64, _: u64) -> hci_core::Result<()> {
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _: ZeroFlags) -> hci_core::Result<()> {
        check_range(offset, len, self.size)?;
        let zeroes = vec![0u8; 64 * 1024];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeroes.len() as u64) as usize;
            self.file
                .write_all_at(&zeroes[..n], at)
                .map_err(|e| io_err("write the disk file", e))?;
            at += n as u64;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> hci_core::Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        }])
    }
}
