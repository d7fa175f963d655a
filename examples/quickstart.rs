//! The main job on an embedded default: give a VM a disk, boot it on hci's own
//! KVM VMM, watch its console, and see what it wrote to the disk.
//!
//! ```text
//! cargo run --release -p hci-examples --example quickstart
//! ```
//!
//! Needs `/dev/kvm` and `gcc` (the test guest is compiled on the fly).
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hci_compute::KvmHypervisor;
use hci_compute::test_guests::{self, Guest};
use hci_core::block::BlockDevice;
use hci_core::compute::{BootSource, DiskBackend, DiskBus, DiskConfig, Hypervisor, VmConfig};
use hci_core::memory::MemBlockDevice;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // 1. A 1 MiB thin volume (in memory here; the local replica store plugs in the same way).
    let disk = Arc::new(MemBlockDevice::new(1 << 20));

    // 2. A small test guest that drives virtio-blk: writes a pattern at sector 24,
    //    reads it back and reports on the serial console.
    let kernel = test_guests::build_default(Guest::Blk).context("building the test guest (gcc)")?;
    let run_dir = std::env::temp_dir().join("hci-quickstart");
    std::fs::create_dir_all(&run_dir)?;

    let vm = KvmHypervisor::new()
        .create(VmConfig {
            name: "quickstart".into(),
            cpus: 1,
            memory: 64 << 20,
            boot: BootSource::Kernel {
                kernel,
                initrd: None,
                cmdline: "sector=24".into(),
            },
            disks: vec![DiskConfig {
                name: "hci-disk0".into(),
                backend: DiskBackend::Device(disk.clone()),
                bus: DiskBus::default(),
                read_only: false,
                boot_order: None,
            }],
            nics: vec![],
            cloud_init_seed: None,
            run_dir,
        })
        .await?;

    // 3. Boot it and follow the console until the guest resets.
    let mut console = vm.console().await?;
    let printer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        let _ = tokio::io::copy(&mut console.output, &mut stdout).await;
    });
    println!("--- guest console ---");
    let started = Instant::now();
    vm.start().await?;
    let reason = tokio::time::timeout(Duration::from_secs(60), vm.wait())
        .await
        .context("the guest did not finish within 60 s")??;
    let stats = vm.stats().await?;
    // Let the console drain, then stop following it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    printer.abort();
    println!(
        "--- guest exited: {reason:?} after {:.1?}",
        started.elapsed()
    );
    for (name, read, written) in &stats.disks {
        println!("disk {name}: {read} bytes read, {written} bytes written by the guest");
    }

    // 4. The host sees exactly what the guest wrote.
    let mut block = vec![0u8; 4096];
    disk.read_at(&mut block, 24 * 512).await?;
    let expected: Vec<u8> = (0..4096u32).map(|i| (i * 31 + 7) as u8).collect();
    anyhow::ensure!(
        block == expected,
        "the disk does not hold the guest's pattern"
    );
    println!("host read back the guest's 4 KiB pattern at sector 24: OK");
    Ok(())
}
