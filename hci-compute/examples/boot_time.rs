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

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hci_compute::devices::virtio::block::Executor;
use hci_compute::test_guests::{self, Guest};
use hci_compute::{DiskSpec, Vm, VmSpec};

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
        let device = Arc::new(
            hci_storage::raw::RawFileDevice::open(path.as_ref(), false)
                .context("open the disk file")?,
        );
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
        memory_backing: Default::default(),
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
