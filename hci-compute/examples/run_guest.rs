//! Runs a kernel (e.g. a test guest ELF) on the KVM VMM and prints its console.
//!
//! ```text
//! cargo run -p hci-compute --example run_guest -- guest.elf [cpus] [cmdline...]
//! ```

use std::time::Duration;

use hci_compute::devices::virtio::block::Executor;
use hci_compute::vm::{Vm, VmSpec};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let kernel = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: run_guest KERNEL [CPUS] [CMDLINE...]"))?;
    let cpus: u32 = args.next().map(|c| c.parse()).transpose()?.unwrap_or(1);
    let cmdline = args.collect::<Vec<_>>().join(" ");
    let spec = VmSpec {
        name: "run-guest".into(),
        cpus,
        memory: 64 << 20,
        kernel: kernel.into(),
        initrd: None,
        cmdline,
        disks: vec![],
        nics: vec![],
        entropy: false,
        memory_backing: Default::default(),
        console_log: None,
    };
    let vm = Vm::new(spec, Executor::Private)?;
    vm.start()?;
    let reason = vm.wait_timeout(Duration::from_secs(10));
    if reason.is_none() {
        vm.kill();
    }
    eprintln!(
        "console: {:?}",
        String::from_utf8_lossy(&vm.console().history())
    );
    eprintln!("exit: {reason:?}");
    Ok(())
}
