//! proptest strategies producing well-formed resources of every kind, for
//! round-trip and fuzz tests (here and in crates that store or send resources).
//!
//! Every generated resource passes [`Resource::validate`]; the resources it
//! refers to (a VM's volumes and networks…) are random names that need not exist.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use chrono::{DateTime, TimeZone, Utc};
use ipnet::Ipv4Net;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use uuid::Uuid;

use super::*;

/// DNS-1123 labels.
pub fn name() -> impl Strategy<Value = String> {
    "[a-z]([a-z0-9-]{0,14}[a-z0-9])?"
}

fn text() -> impl Strategy<Value = String> {
    "[ -~]{0,24}"
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    (0i64..4_000_000_000, 0u32..1_000_000_000)
        .prop_map(|(s, ns)| Utc.timestamp_opt(s, ns).single().unwrap_or_default())
}

fn size() -> impl Strategy<Value = ByteSize> {
    (1u64..1 << 40).prop_map(|n| ByteSize(n * 4096))
}

/// Metadata with labels, versions and timestamps.
pub fn meta() -> impl Strategy<Value = ObjectMeta> {
    (
        name(),
        option::of(any::<u128>().prop_map(Uuid::from_u128)),
        btree_map("[a-z][a-z0-9./-]{0,10}", "[a-z0-9]{0,8}", 0..3),
        btree_map("[a-z]{1,8}", text(), 0..2),
        any::<u64>(),
        any::<u64>(),
        option::of(time()),
        option::of(time()),
    )
        .prop_map(
            |(name, uid, labels, annotations, rv, generation, c, u)| ObjectMeta {
                name,
                uid,
                labels,
                annotations,
                resource_version: rv,
                generation,
                created_at: c,
                updated_at: u,
            },
        )
}

fn condition() -> impl Strategy<Value = Condition> {
    (
        "[A-Z][a-zA-Z]{0,10}",
        prop_oneof![
            Just(ConditionStatus::True),
            Just(ConditionStatus::False),
            Just(ConditionStatus::Unknown)
        ],
        "[A-Za-z]{0,10}",
        text(),
        option::of(time()),
    )
        .prop_map(|(kind, status, reason, message, t)| Condition {
            kind,
            status,
            reason,
            message,
            last_transition: t,
        })
}

fn mac() -> impl Strategy<Value = MacAddress> {
    any::<[u8; 6]>().prop_map(|mut b| {
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddress(b)
    })
}

fn vm_spec() -> impl Strategy<Value = VmSpec> {
    let boot = prop_oneof![
        ("/[a-z/]{1,20}", option::of("/[a-z/]{1,20}"), text()).prop_map(
            |(path, initrd, cmdline)| BootSpec::Kernel(KernelBoot {
                path,
                initrd,
                cmdline
            })
        ),
        (any::<bool>(), any::<bool>()).prop_map(|(uefi, sb)| BootSpec::Firmware(FirmwareBoot {
            kind: if uefi {
                FirmwareKind::Uefi
            } else {
                FirmwareKind::Bios
            },
            secure_boot: sb && uefi,
        })),
    ];
    // Keyed by name so that names are unique; boot orders are then numbered.
    let disks = btree_map(
        name(),
        (name(), 0usize..4, any::<bool>(), any::<bool>()),
        0..3,
    )
    .prop_map(|m| {
        m.into_iter()
            .enumerate()
            .map(|(i, (name, (volume, bus, boots, read_only)))| DiskSpec {
                name,
                volume,
                bus: [
                    DiskBus::Virtio,
                    DiskBus::Sata,
                    DiskBus::Scsi,
                    DiskBus::Cdrom,
                ][bus],
                boot_order: boots.then_some(i as u32 + 1),
                read_only,
            })
            .collect::<Vec<_>>()
    });
    let nics = btree_map(name(), (name(), option::of(mac()), any::<bool>()), 0..3).prop_map(|m| {
        let mut macs = BTreeSet::new();
        m.into_iter()
            .map(|(name, (network, mac, e))| NicSpec {
                name,
                network,
                mac: mac.filter(|m| macs.insert(*m)),
                model: if e { NicModel::E1000 } else { NicModel::Virtio },
            })
            .collect::<Vec<_>>()
    });
    let ci = option::of(
        (
            option::of(text()),
            option::of(text()),
            vec("ssh-ed25519 [A-Za-z0-9]{8}", 0..2),
        )
            .prop_map(|(u, n, k)| CloudInit {
                user_data: u,
                network_config: n,
                ssh_authorized_keys: k,
            }),
    );
    (
        1u32..64,
        (16u64..65536).prop_map(ByteSize::mib),
        boot,
        disks,
        nics,
        ci,
        (0usize..4, 0usize..3, 0usize..3),
        btree_map("[a-z]{1,6}", "[a-z0-9]{0,6}", 0..2),
    )
        .prop_map(
            |(cpus, memory, boot, disks, nics, cloud_init, (r, e, b), node_selector)| VmSpec {
                cpus,
                memory,
                boot,
                disks,
                nics,
                cloud_init,
                run_strategy: [
                    RunStrategy::Always,
                    RunStrategy::RerunOnFailure,
                    RunStrategy::Manual,
                    RunStrategy::Halted,
                ][r],
                eviction_strategy: [
                    EvictionStrategy::LiveMigrate,
                    EvictionStrategy::Shutdown,
                    EvictionStrategy::None,
                ][e],
                node_selector,
                backend: [
                    HypervisorBackend::Kvm,
                    HypervisorBackend::Qemu,
                    HypervisorBackend::Auto,
                ][b],
            },
        )
        .prop_map(|mut spec| {
            // The kvm backend boots kernels directly and has virtio devices only.
            let kvm_ok = matches!(spec.boot, BootSpec::Kernel(_))
                && spec.disks.iter().all(|d| d.bus == DiskBus::Virtio)
                && spec.nics.iter().all(|n| n.model == NicModel::Virtio);
            if spec.backend == HypervisorBackend::Kvm && !kvm_ok {
                spec.backend = HypervisorBackend::Auto;
            }
            spec
        })
}

fn vm_status() -> impl Strategy<Value = VmStatus> {
    (
        proptest::sample::select(VmPhase::ALL),
        option::of(name()),
        vec(condition(), 0..2),
        vec("10\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}", 0..2),
        option::of(time()),
        any::<u32>(),
        text(),
    )
        .prop_map(
            |(phase, node, conditions, ip_addresses, started_at, restarts, message)| VmStatus {
                phase,
                node,
                conditions,
                ip_addresses,
                started_at,
                restarts,
                message,
                migration: None,
            },
        )
}

/// Virtual machines.
pub fn virtual_machine() -> impl Strategy<Value = VirtualMachine> {
    (meta(), vm_spec(), option::of(vm_status())).prop_map(|(metadata, spec, status)| {
        VirtualMachine {
            metadata,
            spec,
            status,
        }
    })
}

fn volume_source() -> impl Strategy<Value = VolumeSource> {
    prop_oneof![
        Just(VolumeSource::Blank),
        name().prop_map(|name| VolumeSource::Image { name }),
        name().prop_map(|name| VolumeSource::Snapshot { name }),
        name().prop_map(|name| VolumeSource::Volume { name }),
        name().prop_map(|name| VolumeSource::Backup { name }),
    ]
}

fn volume_spec() -> impl Strategy<Value = VolumeSpec> {
    (
        size(),
        1u8..8,
        option::of(name()),
        volume_source(),
        option::of("/[a-z/]{1,16}"),
    )
        .prop_map(|(size, replicas, storage_class, source, key)| VolumeSpec {
            size,
            replicas,
            storage_class,
            source,
            encryption: key.map(|key_file| VolumeEncryption { key_file }),
        })
}

/// Volumes.
pub fn volume() -> impl Strategy<Value = Volume> {
    let spec = volume_spec();
    let replica = (
        name(),
        any::<bool>(),
        option::of(0u8..=100),
        option::of("[a-z0-9.]{1,12}:[0-9]{1,5}"),
    )
        .prop_map(|(node, healthy, rebuild_percent, address)| ReplicaStatus {
            node,
            healthy,
            rebuild_percent,
            address,
        });
    let status = (
        proptest::sample::select(VolumePhase::ALL),
        option::of(size()),
        option::of(size()),
        vec(replica, 0..3),
        option::of(name()),
        option::of(0u8..=100),
        vec(condition(), 0..2),
    )
        .prop_map(
            |(phase, size, allocated, replicas, attached_to, progress, conditions)| VolumeStatus {
                phase,
                size,
                allocated,
                replicas,
                attached_to,
                progress,
                conditions,
            },
        );
    (meta(), spec, option::of(status)).prop_map(|(metadata, spec, status)| Volume {
        metadata,
        spec,
        status,
    })
}

/// Images.
pub fn image() -> impl Strategy<Value = Image> {
    let spec = (
        "https://[a-z]{1,8}\\.example/[a-z]{1,8}\\.img",
        0usize..4,
        option::of("sha256:[0-9a-f]{64}"),
        text(),
    )
        .prop_map(|(url, f, checksum, description)| ImageSpec {
            url,
            format: [
                ImageFormat::Auto,
                ImageFormat::Raw,
                ImageFormat::Qcow2,
                ImageFormat::Iso,
            ][f],
            checksum,
            description,
        });
    let status = (0usize..4, option::of(size()), 0u8..=100, text()).prop_map(
        |(p, size, progress, message)| ImageStatus {
            phase: [
                ImagePhase::Pending,
                ImagePhase::Importing,
                ImagePhase::Ready,
                ImagePhase::Failed,
            ][p],
            size,
            progress,
            message,
        },
    );
    (meta(), spec, option::of(status)).prop_map(|(metadata, spec, status)| Image {
        metadata,
        spec,
        status,
    })
}

/// Snapshots.
pub fn snapshot() -> impl Strategy<Value = Snapshot> {
    let status = (0usize..3, option::of(time()), option::of(size()), text()).prop_map(
        |(p, t, size, message)| SnapshotStatus {
            phase: [
                SnapshotPhase::Pending,
                SnapshotPhase::Ready,
                SnapshotPhase::Failed,
            ][p],
            taken_at: t,
            size,
            message,
        },
    );
    (meta(), name(), option::of(status)).prop_map(|(metadata, volume, status)| Snapshot {
        metadata,
        spec: SnapshotSpec { volume },
        status,
    })
}

/// VM snapshots.
pub fn vm_snapshot() -> impl Strategy<Value = VirtualMachineSnapshot> {
    let volume =
        (name(), name(), volume_spec()).prop_map(|(volume, snapshot, spec)| VmSnapshotVolume {
            volume,
            snapshot,
            spec,
        });
    let status = (
        0usize..3,
        option::of(time()),
        option::of(vm_spec()),
        vec(volume, 0..3),
        text(),
    )
        .prop_map(
            |(p, taken_at, vm, volumes, message)| VirtualMachineSnapshotStatus {
                phase: [
                    SnapshotPhase::Pending,
                    SnapshotPhase::Ready,
                    SnapshotPhase::Failed,
                ][p],
                taken_at,
                vm,
                volumes,
                message,
            },
        );
    (meta(), name(), option::of(status)).prop_map(|(metadata, vm, status)| VirtualMachineSnapshot {
        metadata,
        spec: VirtualMachineSnapshotSpec { vm },
        status,
    })
}

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

/// Networks with consistent addressing: the gateway and the DHCP range lie in
/// the subnet, VLANs have an uplink and management networks a subnet.
pub fn network() -> impl Strategy<Value = Network> {
    let kind = prop_oneof![
        Just(NetworkKind::Management),
        Just(NetworkKind::Bridge),
        (1u16..4095).prop_map(|id| NetworkKind::Vlan { id }),
        (1u32..16_777_216).prop_map(|vni| NetworkKind::Overlay { vni }),
    ];
    // A /8 to /29 subnet, maybe its first host as gateway, maybe a DHCP range
    // among the hosts after it.
    let l3 = (
        ipv4(),
        8u8..=29,
        any::<bool>(),
        any::<bool>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(ip, prefix, gw, dhcp, a, b)| {
            let net = Ipv4Net::new(ip, prefix)
                .map(|n| n.trunc())
                .unwrap_or_default();
            let first = u32::from(net.network()) + 1;
            let last = u32::from(net.broadcast()) - 1;
            let span = last - first;
            let (x, y) = (first + 1 + a % span, first + 1 + b % span);
            let gateway = gw.then_some(Ipv4Addr::from(first));
            let dhcp = dhcp.then_some(DhcpRange {
                start: Ipv4Addr::from(x.min(y)),
                end: Ipv4Addr::from(x.max(y)),
            });
            (net, gateway, dhcp)
        });
    let spec = (
        kind,
        l3,
        any::<bool>(),
        option::of("[a-z][a-z0-9]{0,11}"),
        option::of(576u32..9001),
    )
        .prop_map(|(kind, (net, gateway, dhcp), routed, uplink, mtu)| {
            let routed = routed || kind == NetworkKind::Management;
            let uplink = match kind {
                NetworkKind::Vlan { .. } => uplink.or_else(|| Some("eth0".to_string())),
                _ => uplink,
            };
            NetworkSpec {
                kind,
                cidr: routed.then_some(net),
                gateway: gateway.filter(|_| routed),
                dhcp: dhcp.filter(|_| routed),
                uplink,
                mtu,
            }
        });
    let lease = (mac(), any::<[u8; 4]>()).prop_map(|(mac, ip)| NetworkLease { mac, ip: ip.into() });
    let status = (vec(name(), 0..3), vec(condition(), 0..2), vec(lease, 0..3)).prop_map(
        |(ready_nodes, conditions, leases)| NetworkStatus {
            ready_nodes,
            conditions,
            leases,
        },
    );
    (meta(), spec, option::of(status)).prop_map(|(metadata, spec, status)| Network {
        metadata,
        spec,
        status,
    })
}

fn backup_source() -> impl Strategy<Value = BackupSource> {
    prop_oneof![
        name().prop_map(|name| BackupSource::Volume { name }),
        name().prop_map(|name| BackupSource::VirtualMachine { name }),
    ]
}

/// Backups.
pub fn backup() -> impl Strategy<Value = Backup> {
    let spec =
        (backup_source(), name(), any::<bool>()).prop_map(|(source, target, incremental)| {
            BackupSpec {
                source,
                target,
                incremental,
            }
        });
    let status = (
        0usize..4,
        option::of("[a-f0-9]{16}"),
        0u8..=100,
        option::of(size()),
        option::of(size()),
        option::of(time()),
        text(),
    )
        .prop_map(
            |(p, backup_id, progress, read, added, completed_at, message)| BackupStatus {
                phase: [
                    BackupPhase::Pending,
                    BackupPhase::InProgress,
                    BackupPhase::Completed,
                    BackupPhase::Failed,
                ][p],
                backup_id,
                progress,
                read,
                added,
                completed_at,
                message,
            },
        );
    (meta(), spec, option::of(status)).prop_map(|(metadata, spec, status)| Backup {
        metadata,
        spec,
        status,
    })
}

/// Backup targets.
pub fn backup_target() -> impl Strategy<Value = BackupTarget> {
    let spec = (
        prop_oneof!["s3://[a-z]{3,10}/[a-z]{0,6}", "file:///[a-z/]{1,16}"],
        option::of("https?://[a-z]{1,8}:[0-9]{2,4}"),
        option::of("[a-z]{2}-[a-z]{4}-[0-9]"),
        option::of("/[a-z/]{1,16}"),
        any::<bool>(),
        any::<bool>(),
        option::of("/[a-z/]{1,16}"),
    )
        .prop_map(
            |(
                url,
                endpoint,
                region,
                credentials_file,
                path_style,
                allow_http,
                encryption_key_file,
            )| {
                // Endpoints are for S3 only, and plain HTTP must be allowed.
                let endpoint = endpoint.filter(|_| url.starts_with("s3://"));
                let allow_http = allow_http
                    || endpoint
                        .as_deref()
                        .is_some_and(|e| e.starts_with("http://"));
                BackupTargetSpec {
                    url,
                    endpoint,
                    region,
                    credentials_file,
                    path_style,
                    allow_http,
                    encryption_key_file,
                }
            },
        );
    let status =
        (vec(condition(), 0..2), option::of(time())).prop_map(|(conditions, last_checked)| {
            BackupTargetStatus {
                conditions,
                last_checked,
            }
        });
    (meta(), spec, option::of(status)).prop_map(|(metadata, spec, status)| BackupTarget {
        metadata,
        spec,
        status,
    })
}

/// Schedules.
pub fn schedule() -> impl Strategy<Value = Schedule> {
    let task = prop_oneof![
        Just(ScheduleTask::Snapshot),
        name().prop_map(|target| ScheduleTask::Backup { target })
    ];
    let field = |lo: u8, hi: u8| {
        prop_oneof![
            Just("*".to_string()),
            (lo..hi).prop_map(|n| n.to_string()),
            (lo..hi, lo..hi).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
            (1u8..10).prop_map(|n| format!("*/{n}")),
        ]
    };
    let cron = (
        field(0, 60),
        field(0, 24),
        field(1, 29),
        field(1, 13),
        field(0, 7),
    )
        .prop_map(|(m, h, d, mo, w)| format!("{m} {h} {d} {mo} {w}"));
    let spec = (cron, task, backup_source(), 1u32..=1000, any::<bool>()).prop_map(
        |(cron, task, source, retain, suspend)| ScheduleSpec {
            cron,
            // Snapshot schedules apply to volumes only.
            source: match (&task, source) {
                (ScheduleTask::Snapshot, BackupSource::VirtualMachine { name }) => {
                    BackupSource::Volume { name }
                }
                (_, source) => source,
            },
            task,
            retain,
            suspend,
        },
    );
    let status = (option::of(time()), option::of(time()), text()).prop_map(
        |(last_run, next_run, last_result)| ScheduleStatus {
            last_run,
            next_run,
            last_result,
        },
    );
    (meta(), spec, option::of(status)).prop_map(|(metadata, spec, status)| Schedule {
        metadata,
        spec,
        status,
    })
}

/// Nodes.
pub fn node() -> impl Strategy<Value = Node> {
    let res = (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(cpus, m, s)| NodeResources {
        cpus,
        memory: ByteSize(m),
        storage: ByteSize(s),
    });
    let spec = (
        any::<bool>(),
        any::<bool>(),
        vec(ipv4().prop_map(|ip| ip.to_string()), 0..2),
    )
        .prop_map(|(cordoned, maintenance, addresses)| NodeSpec {
            cordoned: cordoned || maintenance,
            maintenance,
            addresses,
        });
    let status = (
        res.clone(),
        res,
        vec(condition(), 0..2),
        option::of(time()),
        "[0-9.]{0,8}",
        vec("[a-z0-9.]{1,12}:[0-9]{1,5}", 0..3),
    )
        .prop_map(
            |(capacity, allocatable, conditions, last_heartbeat, version, replica_servers)| {
                NodeStatus {
                    capacity,
                    allocatable,
                    conditions,
                    last_heartbeat,
                    version,
                    replica_servers,
                }
            },
        );
    (meta(), spec, option::of(status)).prop_map(|(metadata, spec, status)| Node {
        metadata,
        spec,
        status,
    })
}

/// Any resource.
pub fn any_resource() -> impl Strategy<Value = AnyResource> {
    prop_oneof![
        virtual_machine().prop_map(AnyResource::from),
        volume().prop_map(AnyResource::from),
        image().prop_map(AnyResource::from),
        snapshot().prop_map(AnyResource::from),
        vm_snapshot().prop_map(AnyResource::from),
        network().prop_map(AnyResource::from),
        backup().prop_map(AnyResource::from),
        backup_target().prop_map(AnyResource::from),
        schedule().prop_map(AnyResource::from),
        node().prop_map(AnyResource::from),
    ]
}
