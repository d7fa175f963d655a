//! # hci-compute
//!
//! Hypervisor backends of the hci SDK: **hci's own KVM VMM**, built on
//! rust-vmm crates (kvm-ioctls, vm-memory, virtio-queue, linux-loader,
//! vm-superio), exposed as hci-core's [`Hypervisor`](hci_core::compute::Hypervisor)
//! through [`KvmHypervisor`] (and [`ProcessHypervisor`], one process per VM),
//! and **QEMU** driven over QMP ([`qemu::QemuHypervisor`]).
//!
//! ## Layout
//!
//! - [`kvm`]: the only module that issues KVM ioctls (VM, vCPUs, irqchip, PIT,
//!   memory slots, CPUID, MSRs, registers, irqfd/ioeventfd);
//! - [`memory`]: guest RAM layout around the 32-bit MMIO hole, the e820 map;
//! - [`boot`]: PVH and Linux 64-bit boot (kernel, command line, initrd, zero
//!   page, `hvm_start_info`, MP table);
//! - [`devices`]: buses, COM1 16550, i8042 reset, virtio-mmio, virtio-blk,
//!   virtio-net (on a TAP queue: by name or an adopted descriptor) and
//!   virtio-rng;
//! - [`vcpu`]: one thread per vCPU and its run/pause/stop state machine;
//! - [`vm`]: the VM manager (build, start, pause, resume, kill, wait);
//! - [`hypervisor`]: [`KvmHypervisor`] / [`KvmVm`], the hci-core trait impls;
//! - [`console`]: the serial console stream (history, readers, log file);
//! - [`snapshot`]: VM snapshots (vCPU, irqchip/PIT/clock, device and queue
//!   state, sparse guest memory) in a versioned, checksummed stream format;
//! - [`migration`]: pre-copy live migration over TCP in that format (KVM
//!   dirty log plus the VMM's own writes, token, downtime target, cancel);
//!   the kvm backend implements hci-core's `Snapshottable`, `RestoreVm`,
//!   `Migratable` and `ReceiveMigration`, in process and through `hci-vmm`
//!   (`--restore`, `--incoming`, API `snapshot`/`migrate`);
//! - [`vmm_api`]: the control socket of a VMM process, its client and
//!   [`vmm_api::RemoteVm`];
//! - [`process`]: [`ProcessHypervisor`], one `hci-vmm` process per VM (VMs
//!   outlive their caller and can be adopted again);
//! - [`qemu`] (feature `qemu`, on by default): [`QemuHypervisor`], the same
//!   trait over one `qemu-system-x86_64` process per VM driven by QMP, for
//!   firmware boots, any guest OS and real Linux guests under TCG; disks
//!   served to QEMU over NBD from this process; cloud-init NoCloud seeds;
//! - [`test_guests`]: tiny PVH guests built with gcc for tests and benchmarks
//!   (including `net`, which answers ARP and ping on a virtio-net NIC, and
//!   `rng`, which reads virtio-rng).
//!
//! Every libc call outside [`kvm`] lives in the private `sys` module
//! (process facts, TAP ioctls).
//!
//! ## Networking
//!
//! Each [`NicConfig`](hci_core::compute::NicConfig) becomes a virtio-net
//! device (two queues, MAC, link status, MTU; no offloads yet) on the TAP it
//! names. hci-net's `LinuxBridgeBackend::attach_port` returns a `TapHandle`
//! whose queue descriptor the backend keeps attached; hand it over with
//! [`KvmHypervisor::register_tap`] before creating the VM, otherwise the VMM
//! attaches to the TAP by name in its own network namespace. Traffic counters
//! show up in `VmStats::nics` and [`Vm::nic_counters`].
//!
//! ## Example
//!
//! ```no_run
//! # async fn demo() -> hci_core::Result<()> {
//! use hci_compute::KvmHypervisor;
//! use hci_compute::test_guests::{self, Guest};
//! use hci_core::compute::{BootSource, ExitReason, Hypervisor, VmConfig};
//!
//! let kernel = test_guests::build_default(Guest::Hello).expect("gcc");
//! let vm = KvmHypervisor::new()
//!     .create(VmConfig {
//!         name: "hello".into(),
//!         cpus: 1,
//!         memory: 64 << 20,
//!         boot: BootSource::Kernel { kernel, initrd: None, cmdline: String::new() },
//!         disks: vec![],
//!         nics: vec![],
//!         cloud_init_seed: None,
//!         run_dir: std::env::temp_dir(),
//!     })
//!     .await?;
//! vm.start().await?;
//! assert_eq!(vm.wait().await?, ExitReason::Reset);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod boot;
mod capabilities;
pub mod console;
pub mod devices;
pub mod error;
pub mod handover;
pub mod hypervisor;
pub mod kvm;
pub mod memory;
pub mod migration;
pub mod process;
#[cfg(feature = "qemu")]
pub mod qemu;
pub mod replicated;
pub mod seccomp;
pub mod snapshot;
mod sys;
pub mod test_guests;
pub mod vcpu;
pub mod vm;
pub mod vmm_api;

pub use error::{Result, VmmError};
pub use hypervisor::{KvmHypervisor, KvmVm, TapRegistry};
pub use memory::MemoryBacking;
pub use process::ProcessHypervisor;
#[cfg(feature = "qemu")]
pub use qemu::QemuHypervisor;
pub use vm::{DiskSpec, NicSpec, Vm, VmSpec};
