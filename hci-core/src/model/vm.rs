//! `VirtualMachine`: what to run, on what disks and networks, and how to keep it running.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::resource::{Envelope, EnvelopeRef, Resource, ResourceRef, check_envelope, resource};
use super::{
    ByteSize, Condition, MacAddress, ObjectMeta, ValidationErrors, VmPhase, meta::validate_label,
    validate_name,
};

resource! {
    /// A virtual machine.
    ///
    /// ```
    /// use hci_core::model::{Resource, VirtualMachine};
    /// let vm = VirtualMachine::from_yaml(r#"
    /// apiVersion: hci.dev/v1
    /// kind: VirtualMachine
    /// metadata: { name: web }
    /// spec:
    ///   cpus: 2
    ///   memory: 1Gi
    ///   boot: { type: firmware, kind: uefi }
    ///   disks: [{ name: root, volume: web-root, bootOrder: 1 }]
    ///   nics: [{ name: eth0, network: lan }]
    /// "#).unwrap();
    /// assert_eq!(vm.spec.memory.bytes(), 1 << 30);
    /// vm.validate().unwrap();
    /// ```
    VirtualMachine, "VirtualMachine", VmSpec, VmStatus
}

fn one() -> u32 {
    1
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Desired state of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmSpec {
    /// Virtual CPUs (1 to 255).
    #[serde(default = "one")]
    pub cpus: u32,
    /// Guest memory (at least 16Mi, a multiple of 1Mi).
    pub memory: ByteSize,
    /// How the guest boots.
    pub boot: BootSpec,
    /// Disks, each backed by a `Volume`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    /// Network interfaces, each on a `Network`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    /// cloud-init NoCloud data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// Whether the system keeps the VM running.
    #[serde(default)]
    pub run_strategy: RunStrategy,
    /// What happens when its node is drained.
    #[serde(default)]
    pub eviction_strategy: EvictionStrategy,
    /// Only nodes with all these labels may run it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Which hypervisor backend runs it. `kvm` (hci's own VMM) boots kernels
    /// directly and has virtio devices only; `qemu` has everything; `auto`
    /// picks `kvm` when it can.
    #[serde(default)]
    pub backend: HypervisorBackend,
}

/// How a VM boots, written `{type: kernel, path: …}` or `{type: firmware, kind: uefi}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum BootSpec {
    /// Direct kernel boot (Linux bzImage or PVH ELF).
    Kernel(KernelBoot),
    /// Firmware boot from a disk or ISO.
    Firmware(FirmwareBoot),
}

/// Direct kernel boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KernelBoot {
    /// Path of the kernel on the node, or `image:NAME`.
    pub path: String,
    /// Initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
}

/// Firmware boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FirmwareBoot {
    /// BIOS or UEFI.
    pub kind: FirmwareKind,
    /// Enable Secure Boot (UEFI only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub secure_boot: bool,
}

/// Firmware flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FirmwareKind {
    /// SeaBIOS.
    Bios,
    /// OVMF.
    Uefi,
}

/// A VM disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskSpec {
    /// Disk name, unique in the VM (a DNS-1123 label).
    pub name: String,
    /// The `Volume` backing it.
    pub volume: String,
    /// Bus.
    #[serde(default)]
    pub bus: DiskBus,
    /// Boot order (1 = first); unique among disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<u32>,
    /// The guest sees it read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

/// Longest kernel command line accepted (the hci KVM VMM's limit).
pub const MAX_CMDLINE: usize = 0xffff;

/// Disk bus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DiskBus {
    /// virtio-blk.
    #[default]
    Virtio,
    /// SATA (QEMU backend).
    Sata,
    /// virtio-scsi (QEMU backend).
    Scsi,
    /// CD-ROM (QEMU backend).
    Cdrom,
}

impl DiskBus {
    /// The name used in documents (`virtio`, `sata`, `scsi`, `cdrom`).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Sata => "sata",
            DiskBus::Scsi => "scsi",
            DiskBus::Cdrom => "cdrom",
        }
    }
}

/// A VM network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NicSpec {
    /// Interface name, unique in the VM.
    pub name: String,
    /// The `Network` it attaches to.
    pub network: String,
    /// MAC address (unicast); derived from the VM and NIC names when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddress>,
    /// Device model.
    #[serde(default)]
    pub model: NicModel,
}

/// NIC model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NicModel {
    /// virtio-net.
    #[default]
    Virtio,
    /// Intel e1000 (QEMU backend).
    E1000,
}

/// cloud-init NoCloud data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudInit {
    /// user-data (`#cloud-config …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// network-config (v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
    /// SSH public keys for the default user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
}

/// Whether the system keeps a VM running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStrategy {
    /// Always running: restarted whenever it stops.
    Always,
    /// Restarted after a failure, not after a clean guest shutdown.
    #[default]
    RerunOnFailure,
    /// Started and stopped only by explicit actions.
    Manual,
    /// Kept stopped.
    Halted,
}

/// What happens to a VM when its node is drained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EvictionStrategy {
    /// Live-migrate to another node.
    #[default]
    LiveMigrate,
    /// Shut down cleanly (restarted elsewhere per run strategy).
    Shutdown,
    /// Block the drain.
    None,
}

/// Which hypervisor runs a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HypervisorBackend {
    /// hci's own KVM VMM.
    Kvm,
    /// QEMU.
    Qemu,
    /// kvm for direct-kernel boot with virtio devices, qemu otherwise.
    #[default]
    Auto,
}

/// Observed state of a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: VmPhase,
    /// Node running it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Conditions (`Scheduled`, `Ready`…).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Guest IP addresses, when known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    /// When the guest last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// Restarts by the run strategy.
    #[serde(default)]
    pub restarts: u32,
    /// A human-readable note on the current state.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The VM's last (or current) live migration between nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<VmMigration>,
}

/// A live migration of a VM from one node to another (cluster mode), as
/// the two nodes' daemons report it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmMigration {
    /// Node the VM runs on when the migration starts.
    pub source_node: String,
    /// Node it moves to.
    pub target_node: String,
    /// Where it stands.
    #[serde(default)]
    pub phase: MigrationPhase,
    /// Where the target's receiver listens (`HOST:PORT`), once ready.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Secret the target checks on the migration stream.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// Pre-copy pass (1 = the full pass).
    #[serde(default)]
    pub iteration: u32,
    /// Bytes sent so far.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Dirty bytes still to send.
    #[serde(default)]
    pub bytes_remaining: u64,
    /// Guest dirty rate, bytes per second.
    #[serde(default)]
    pub dirty_rate: u64,
    /// Someone asked to cancel it: the source stops the migration unless
    /// the switch-over has begun, and records the outcome.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    /// Pause of the guest at the switch-over, once done (milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// What happened (why it failed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When it was requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

/// Where a live migration stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationPhase {
    /// Requested: the target node prepares its receiver.
    #[default]
    Pending,
    /// The target listens ([`VmMigration::address`]); the source connects.
    TargetReady,
    /// Memory is being copied.
    Running,
    /// The VM runs on the target node.
    Succeeded,
    /// The VM stayed on the source node ([`VmMigration::message`] says why).
    Failed,
}

impl MigrationPhase {
    /// Whether the migration is over (succeeded or failed).
    pub fn is_finished(self) -> bool {
        matches!(self, MigrationPhase::Succeeded | MigrationPhase::Failed)
    }
}

impl VmSpec {
    /// A spec with `cpus`, `memory` and a boot source; no disks or NICs.
    pub fn new(cpus: u32, memory: ByteSize, boot: BootSpec) -> Self {
        VmSpec {
            cpus,
            memory,
            boot,
            disks: Vec::new(),
            nics: Vec::new(),
            cloud_init: None,
            run_strategy: RunStrategy::default(),
            eviction_strategy: EvictionStrategy::default(),
            node_selector: BTreeMap::new(),
            backend: HypervisorBackend::default(),
        }
    }

    fn validate_into(&self, errs: &mut ValidationErrors) {
        if !(1..=255).contains(&self.cpus) {
            errs.push(
                "spec.cpus",
                format!("{} is out of range: must be 1 to 255", self.cpus),
            );
        }
        let mem = self.memory.bytes();
        if mem < 16 << 20 {
            errs.push(
                "spec.memory",
                format!("{} is too small: at least 16Mi", self.memory),
            );
        } else if !mem.is_multiple_of(1 << 20) {
            errs.push(
                "spec.memory",
                format!("{} must be a multiple of 1Mi", self.memory),
            );
        }
        match &self.boot {
            BootSpec::Kernel(k) => {
                if k.path.trim().is_empty() {
                    errs.push("spec.boot.path", "must name the kernel to boot");
                }
                if k.initrd.as_deref().is_some_and(|i| i.trim().is_empty()) {
                    errs.push("spec.boot.initrd", "must not be empty when given");
                }
                if k.cmdline.len() > MAX_CMDLINE {
                    errs.push(
                        "spec.boot.cmdline",
                        format!(
                            "is {} bytes long: at most {MAX_CMDLINE} bytes",
                            k.cmdline.len()
                        ),
                    );
                }
                if k.cmdline.contains('\0') {
                    errs.push("spec.boot.cmdline", "must not contain NUL characters");
                }
            }
            BootSpec::Firmware(f) => {
                if f.secure_boot && f.kind != FirmwareKind::Uefi {
                    errs.push("spec.boot.secureBoot", "Secure Boot needs UEFI firmware");
                }
                if self.backend == HypervisorBackend::Kvm {
                    errs.push(
                        "spec.boot",
                        "the kvm backend boots kernels directly: use {type: kernel, …}, \
                         or backend qemu (or auto) for firmware boot",
                    );
                }
            }
        }
        for (k, v) in &self.node_selector {
            validate_label(&format!("spec.nodeSelector[{k:?}]"), k, v, errs);
        }
        let mut names = BTreeSet::new();
        let mut orders = BTreeSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            validate_name(&format!("spec.disks[{i}].name"), &d.name, errs);
            if !names.insert(&d.name) {
                errs.push(
                    format!("spec.disks[{i}].name"),
                    format!("duplicate disk name {:?}", d.name),
                );
            }
            validate_name(&format!("spec.disks[{i}].volume"), &d.volume, errs);
            if self.backend == HypervisorBackend::Kvm && d.bus != DiskBus::Virtio {
                errs.push(
                    format!("spec.disks[{i}].bus"),
                    format!(
                        "{} needs the qemu backend: the kvm backend has virtio disks only",
                        d.bus.as_str()
                    ),
                );
            }
            if let Some(o) = d.boot_order {
                if o == 0 {
                    errs.push(format!("spec.disks[{i}].bootOrder"), "must be 1 or more");
                } else if !orders.insert(o) {
                    errs.push(
                        format!("spec.disks[{i}].bootOrder"),
                        format!("boot order {o} is used twice"),
                    );
                }
            }
        }
        let mut nic_names = BTreeSet::new();
        let mut macs = BTreeSet::new();
        for (i, n) in self.nics.iter().enumerate() {
            validate_name(&format!("spec.nics[{i}].name"), &n.name, errs);
            if !nic_names.insert(&n.name) {
                errs.push(
                    format!("spec.nics[{i}].name"),
                    format!("duplicate NIC name {:?}", n.name),
                );
            }
            validate_name(&format!("spec.nics[{i}].network"), &n.network, errs);
            if self.backend == HypervisorBackend::Kvm && n.model != NicModel::Virtio {
                errs.push(
                    format!("spec.nics[{i}].model"),
                    "e1000 needs the qemu backend: the kvm backend has virtio NICs only",
                );
            }
            if let Some(mac) = n.mac {
                if mac.is_multicast() {
                    errs.push(
                        format!("spec.nics[{i}].mac"),
                        format!("{mac} is a multicast address"),
                    );
                } else if mac.0 == [0; 6] {
                    errs.push(
                        format!("spec.nics[{i}].mac"),
                        "00:00:00:00:00:00 is not a usable address",
                    );
                } else if !macs.insert(mac) {
                    errs.push(
                        format!("spec.nics[{i}].mac"),
                        format!("{mac} is used twice"),
                    );
                }
            }
        }
        if let Some(ci) = &self.cloud_init {
            for (i, k) in ci.ssh_authorized_keys.iter().enumerate() {
                if !k.starts_with("ssh-") && !k.starts_with("ecdsa-") && !k.starts_with("sk-") {
                    errs.push(
                        format!("spec.cloudInit.sshAuthorizedKeys[{i}]"),
                        "does not look like an SSH public key (ssh-ed25519 …, ssh-rsa …)",
                    );
                }
            }
        }
    }
}

impl Resource for VirtualMachine {
    const KIND: &'static str = "VirtualMachine";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }

    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::new();
        self.metadata.validate_into(&mut errs);
        self.spec.validate_into(&mut errs);
        errs.into_result()
    }

    fn references(&self) -> Vec<ResourceRef> {
        let disks = self
            .spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| ResourceRef {
                kind: "Volume",
                name: d.volume.clone(),
                path: format!("spec.disks[{i}].volume"),
            });
        let nics = self.spec.nics.iter().enumerate().map(|(i, n)| ResourceRef {
            kind: "Network",
            name: n.network.clone(),
            path: format!("spec.nics[{i}].network"),
        });
        disks.chain(nics).collect()
    }
}

impl VirtualMachine {
    /// The MAC of NIC `i`: the one in the spec, or one derived from the names.
    pub fn nic_mac(&self, i: usize) -> Option<MacAddress> {
        let nic = self.spec.nics.get(i)?;
        Some(nic.mac.unwrap_or_else(|| {
            MacAddress::from_name(&format!("{}/{}", self.metadata.name, nic.name))
        }))
    }
}

impl BootSpec {
    /// Direct kernel boot of `path` with `cmdline` and no initrd.
    pub fn kernel(path: impl Into<String>, cmdline: impl Into<String>) -> Self {
        BootSpec::Kernel(KernelBoot {
            path: path.into(),
            initrd: None,
            cmdline: cmdline.into(),
        })
    }

    /// UEFI firmware boot, without Secure Boot.
    pub fn uefi() -> Self {
        BootSpec::Firmware(FirmwareBoot {
            kind: FirmwareKind::Uefi,
            secure_boot: false,
        })
    }

    /// BIOS firmware boot.
    pub fn bios() -> Self {
        BootSpec::Firmware(FirmwareBoot {
            kind: FirmwareKind::Bios,
            secure_boot: false,
        })
    }
}

impl DiskSpec {
    /// A read-write virtio disk `name` backed by volume `volume`, not in the boot order.
    pub fn new(name: impl Into<String>, volume: impl Into<String>) -> Self {
        DiskSpec {
            name: name.into(),
            volume: volume.into(),
            bus: DiskBus::Virtio,
            boot_order: None,
            read_only: false,
        }
    }
}

impl NicSpec {
    /// A virtio NIC `name` on network `network`, with a MAC derived from the names.
    pub fn new(name: impl Into<String>, network: impl Into<String>) -> Self {
        NicSpec {
            name: name.into(),
            network: network.into(),
            mac: None,
            model: NicModel::Virtio,
        }
    }
}

impl VirtualMachine {
    /// Starts building a VM named `name`: 1 CPU, 512Mi, UEFI boot, no disks or
    /// NICs until added.
    ///
    /// ```
    /// use hci_core::model::{ByteSize, Resource, RunStrategy, VirtualMachine};
    /// let vm = VirtualMachine::builder("web")
    ///     .cpus(2)
    ///     .memory(ByteSize::gib(2))
    ///     .boot_disk("root", "web-root")
    ///     .disk("data", "web-data")
    ///     .nic("eth0", "lan")
    ///     .ssh_key("ssh-ed25519 AAAAC3Nza… admin@example")
    ///     .run_strategy(RunStrategy::Always)
    ///     .build();
    /// vm.validate().unwrap();
    /// assert_eq!(vm.spec.disks[0].boot_order, Some(1));
    /// assert!(vm.to_yaml().unwrap().contains("kind: VirtualMachine"));
    /// ```
    pub fn builder(name: impl Into<String>) -> VmBuilder {
        VmBuilder {
            vm: VirtualMachine::new(name, VmSpec::new(1, ByteSize::mib(512), BootSpec::uefi())),
        }
    }
}

/// Builds a [`VirtualMachine`] step by step; see [`VirtualMachine::builder`].
///
/// The builder does not validate: call [`Resource::validate`] on the result.
#[derive(Debug, Clone)]
#[must_use]
pub struct VmBuilder {
    vm: VirtualMachine,
}

impl VmBuilder {
    /// Sets the number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.vm.spec.cpus = cpus;
        self
    }

    /// Sets the guest memory.
    pub fn memory(mut self, memory: ByteSize) -> Self {
        self.vm.spec.memory = memory;
        self
    }

    /// Sets how the guest boots.
    pub fn boot(mut self, boot: BootSpec) -> Self {
        self.vm.spec.boot = boot;
        self
    }

    /// Adds a disk.
    pub fn disk_spec(mut self, disk: DiskSpec) -> Self {
        self.vm.spec.disks.push(disk);
        self
    }

    /// Adds a virtio disk `name` on volume `volume`.
    pub fn disk(self, name: impl Into<String>, volume: impl Into<String>) -> Self {
        self.disk_spec(DiskSpec::new(name, volume))
    }

    /// Adds a virtio disk that boots after the boot disks added before it.
    pub fn boot_disk(self, name: impl Into<String>, volume: impl Into<String>) -> Self {
        let next = self
            .vm
            .spec
            .disks
            .iter()
            .filter_map(|d| d.boot_order)
            .max()
            .unwrap_or(0)
            + 1;
        self.disk_spec(DiskSpec {
            boot_order: Some(next),
            ..DiskSpec::new(name, volume)
        })
    }

    /// Adds a NIC.
    pub fn nic_spec(mut self, nic: NicSpec) -> Self {
        self.vm.spec.nics.push(nic);
        self
    }

    /// Adds a virtio NIC `name` on network `network`.
    pub fn nic(self, name: impl Into<String>, network: impl Into<String>) -> Self {
        self.nic_spec(NicSpec::new(name, network))
    }

    fn cloud_init_mut(&mut self) -> &mut CloudInit {
        self.vm
            .spec
            .cloud_init
            .get_or_insert_with(CloudInit::default)
    }

    /// Sets the cloud-init user-data.
    pub fn user_data(mut self, user_data: impl Into<String>) -> Self {
        self.cloud_init_mut().user_data = Some(user_data.into());
        self
    }

    /// Sets the cloud-init network-config.
    pub fn network_config(mut self, network_config: impl Into<String>) -> Self {
        self.cloud_init_mut().network_config = Some(network_config.into());
        self
    }

    /// Adds an SSH public key for the default user.
    pub fn ssh_key(mut self, key: impl Into<String>) -> Self {
        self.cloud_init_mut().ssh_authorized_keys.push(key.into());
        self
    }

    /// Sets the run strategy.
    pub fn run_strategy(mut self, s: RunStrategy) -> Self {
        self.vm.spec.run_strategy = s;
        self
    }

    /// Sets the eviction strategy.
    pub fn eviction_strategy(mut self, s: EvictionStrategy) -> Self {
        self.vm.spec.eviction_strategy = s;
        self
    }

    /// Requires nodes labelled `key=value`.
    pub fn node_selector(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.vm.spec.node_selector.insert(key.into(), value.into());
        self
    }

    /// Sets the hypervisor backend.
    pub fn backend(mut self, backend: HypervisorBackend) -> Self {
        self.vm.spec.backend = backend;
        self
    }

    /// Adds a label to the VM's metadata.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.vm.metadata.labels.insert(key.into(), value.into());
        self
    }

    /// The VM (unvalidated, without status).
    pub fn build(self) -> VirtualMachine {
        self.vm
    }
}
