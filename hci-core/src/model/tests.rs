use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::arbitrary;
use super::*;

/// Generated resources are valid, and come back equal through YAML and JSON.
fn yaml_round_trip<R: Resource + PartialEq>(r: &R) {
    if let Err(e) = r.validate() {
        panic!("generated {} is invalid: {e}\n{r:?}", R::KIND);
    }
    let y = r.to_yaml().expect("to_yaml");
    let back = R::from_yaml(&y).unwrap_or_else(|e| panic!("from_yaml: {e}\n{y}"));
    assert_eq!(&back, r, "YAML round trip\n{y}");
    let j = r.to_json().expect("to_json");
    let back = R::from_json(&j).unwrap_or_else(|e| panic!("from_json: {e}\n{j}"));
    assert_eq!(&back, r, "JSON round trip\n{j}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64)
    ))]

    #[test]
    fn virtual_machines_round_trip(r in arbitrary::virtual_machine()) { yaml_round_trip(&r) }
    #[test]
    fn volumes_round_trip(r in arbitrary::volume()) { yaml_round_trip(&r) }
    #[test]
    fn images_round_trip(r in arbitrary::image()) { yaml_round_trip(&r) }
    #[test]
    fn snapshots_round_trip(r in arbitrary::snapshot()) { yaml_round_trip(&r) }
    #[test]
    fn networks_round_trip(r in arbitrary::network()) { yaml_round_trip(&r) }
    #[test]
    fn backups_round_trip(r in arbitrary::backup()) { yaml_round_trip(&r) }
    #[test]
    fn backup_targets_round_trip(r in arbitrary::backup_target()) { yaml_round_trip(&r) }
    #[test]
    fn schedules_round_trip(r in arbitrary::schedule()) { yaml_round_trip(&r) }
    #[test]
    fn nodes_round_trip(r in arbitrary::node()) { yaml_round_trip(&r) }

    #[test]
    fn any_resource_round_trips_through_multi_document_yaml(
        rs in proptest::collection::vec(arbitrary::any_resource(), 1..4)
    ) {
        let stream = rs.iter().map(|r| r.to_yaml().expect("yaml")).collect::<Vec<_>>().join("---\n");
        let back = AnyResource::from_yaml_multi(&stream).expect("parse stream");
        prop_assert_eq!(back, rs.clone());
        for r in &rs {
            prop_assert_eq!(AnyResource::from_json(&r.to_json().expect("json")).expect("parse"), r.clone());
        }
    }

    #[test]
    fn garbage_never_panics(s in "\\PC{0,200}") {
        let _ = AnyResource::from_yaml_multi(&s);
        let _ = AnyResource::from_json(&s);
        let _ = s.parse::<ByteSize>();
        let _ = s.parse::<MacAddress>();
        let _ = parse_cron(&s);
    }

    #[test]
    fn byte_sizes_print_and_parse_back(n in any::<u64>()) {
        let s = ByteSize(n).to_string();
        prop_assert_eq!(s.parse::<ByteSize>().expect("parse"), ByteSize(n));
    }
}

fn vm(yaml_spec: &str) -> VirtualMachine {
    let doc = format!(
        "apiVersion: hci.dev/v1\nkind: VirtualMachine\nmetadata:\n  name: vm1\nspec:\n{yaml_spec}"
    );
    VirtualMachine::from_yaml(&doc).unwrap_or_else(|e| panic!("{e}\n{doc}"))
}

fn messages(e: ValidationErrors) -> Vec<String> {
    e.errors.iter().map(ToString::to_string).collect()
}

#[test]
fn bad_names_are_explained() {
    let mut v = Volume::new("Bad_Name", VolumeSpec::blank(ByteSize::gib(1)));
    let e = v.validate().expect_err("bad name");
    assert_eq!(
        messages(e),
        [
            "metadata.name: \"Bad_Name\" is not a valid name: use lower-case letters, digits and '-', \
          starting and ending with a letter or digit"
        ]
    );
    v.metadata.name = "x".repeat(64);
    assert!(
        v.validate()
            .expect_err("long")
            .to_string()
            .contains("at most 63 characters")
    );
    v.metadata.name = String::new();
    assert!(
        v.validate()
            .expect_err("empty")
            .to_string()
            .contains("a name is required")
    );
}

#[test]
fn zero_and_unaligned_sizes_are_refused() {
    let v = Volume::new("data", VolumeSpec::blank(ByteSize(0)));
    assert_eq!(
        messages(v.validate().expect_err("zero")),
        ["spec.size: must be greater than 0"]
    );
    let v = Volume::new("data", VolumeSpec::blank(ByteSize(1000)));
    assert_eq!(
        messages(v.validate().expect_err("odd")),
        ["spec.size: 1000 must be a multiple of 4Ki"]
    );
    let mut v = Volume::new("data", VolumeSpec::blank(ByteSize::gib(1)));
    v.spec.replicas = 0;
    assert_eq!(
        messages(v.validate().expect_err("replicas")),
        ["spec.replicas: 0 is out of range: must be 1 to 7"]
    );
    let m = vm("  memory: 0\n  boot: { type: firmware, kind: bios }\n");
    assert_eq!(
        messages(m.validate().expect_err("memory")),
        ["spec.memory: 0 is too small: at least 16Mi"]
    );
}

#[test]
fn duplicate_disk_names_are_refused() {
    let m = vm(
        "  memory: 1Gi\n  boot: { type: firmware, kind: bios }\n  disks:\n    - { name: root, volume: a, bootOrder: 1 }\n    - { name: root, volume: b, bootOrder: 1 }\n",
    );
    assert_eq!(
        messages(m.validate().expect_err("dup")),
        [
            "spec.disks[1].name: duplicate disk name \"root\"",
            "spec.disks[1].bootOrder: boot order 1 is used twice",
        ]
    );
}

#[test]
fn a_nic_on_a_missing_network_is_refused() {
    let m = vm(
        "  memory: 1Gi\n  boot: { type: kernel, path: /boot/vmlinuz }\n  disks: [{ name: root, volume: root-vol }]\n  nics: [{ name: eth0, network: lan }]\n",
    );
    m.validate().expect("self-contained checks pass");
    let exists = |kind: &str, name: &str| kind == "Volume" && name == "root-vol";
    let e = validate_refs(&m, &exists).expect_err("missing network");
    assert_eq!(
        messages(e),
        ["spec.nics[0].network: network \"lan\" does not exist"]
    );
    let everything = |_: &str, _: &str| true;
    validate_all(&m, &everything).expect("all present");
}

#[test]
fn invalid_cron_strings_are_refused() {
    let doc = "apiVersion: hci.dev/v1\nkind: Schedule\nmetadata: { name: nightly }\nspec:\n  cron: '* * *'\n  task: { type: snapshot }\n  source: { kind: volume, name: data }\n  retain: 7\n";
    let s = Schedule::from_yaml(doc).expect("parse");
    let e = messages(s.validate().expect_err("cron"));
    assert_eq!(
        e,
        [
            "spec.cron: invalid cron expression \"* * *\": expected 5 fields (minute hour day month \
          weekday), e.g. \"0 3 * * *\""
        ]
    );
    let mut s2 = s.clone();
    s2.spec.cron = "61 3 * * *".into();
    let e = s2.validate().expect_err("minute 61").to_string();
    assert!(
        e.starts_with("spec.cron: invalid cron expression \"61 3 * * *\""),
        "{e}"
    );
    s2.spec.cron = "0 3 * * 1-5".into();
    s2.validate().expect("valid cron");
}

#[test]
fn networks_are_checked() {
    let n = |spec: &str| {
        Network::from_yaml(&format!(
            "apiVersion: hci.dev/v1\nkind: Network\nmetadata: {{ name: n }}\nspec:\n{spec}"
        ))
        .expect("parse")
    };
    let e = n("  kind: { type: vlan, id: 5000 }\n")
        .validate()
        .expect_err("vlan");
    assert_eq!(
        messages(e),
        [
            "spec.kind.id: 5000 is out of range: must be 1 to 4094",
            "spec.uplink: a VLAN network needs an uplink (the trunk NIC)",
        ]
    );
    let e = n("  kind: { type: management }\n  cidr: 10.0.0.0/24\n  gateway: 10.0.1.1\n  dhcp: { start: 10.0.0.200, end: 10.0.0.100 }\n")
        .validate()
        .expect_err("addresses");
    assert_eq!(
        messages(e),
        [
            "spec.gateway: 10.0.1.1 is not a usable address in 10.0.0.0/24",
            "spec.dhcp: start 10.0.0.200 is after end 10.0.0.100"
        ]
    );
    n("  kind: { type: overlay, vni: 42 }\n  mtu: 1450\n")
        .validate()
        .expect("overlay");
    let e = n("  kind: { type: management }\n")
        .validate()
        .expect_err("no cidr");
    assert_eq!(
        messages(e),
        ["spec.cidr: a management network needs a subnet"]
    );
}

#[test]
fn unknown_fields_kinds_and_versions_are_errors() {
    let e = AnyResource::from_yaml_multi("apiVersion: hci.dev/v1\nkind: Volume\nmetadata: { name: a }\nspec: { size: 1Gi, replica: 3 }\n")
        .expect_err("typo");
    assert!(e.to_string().contains("unknown field `replica`"), "{e}");
    let e = AnyResource::from_yaml_multi(
        "apiVersion: hci.dev/v1\nkind: Volum\nmetadata: { name: a }\nspec: {}\n",
    )
    .expect_err("kind");
    assert!(e.to_string().contains("unknown kind \"Volum\""), "{e}");
    let e = Volume::from_yaml(
        "apiVersion: hci.dev/v2\nkind: Volume\nmetadata: { name: a }\nspec: { size: 1Gi }\n",
    )
    .expect_err("version");
    assert!(
        e.to_string()
            .contains("apiVersion \"hci.dev/v2\" is not supported"),
        "{e}"
    );
    let e = Volume::from_yaml(
        "apiVersion: hci.dev/v1\nkind: Network\nmetadata: { name: a }\nspec: { size: 1Gi }\n",
    )
    .expect_err("wrong kind");
    assert!(
        e.to_string().contains("kind \"Network\" does not match"),
        "{e}"
    );
    let e = AnyResource::from_yaml_multi("a: [\n").expect_err("syntax");
    assert!(e.to_string().contains("YAML document 1"), "{e}");
}

#[test]
fn multi_document_files_parse_in_order() {
    let docs = AnyResource::from_yaml_multi(
        "---\napiVersion: hci.dev/v1\nkind: Volume\nmetadata: { name: root }\nspec: { size: 10Gi, source: { type: image, name: debian } }\n\
         ---\napiVersion: hci.dev/v1\nkind: VirtualMachine\nmetadata: { name: web }\nspec:\n  memory: 512Mi\n  boot: { type: firmware, kind: uefi }\n  disks: [{ name: root, volume: root }]\n---\n",
    )
    .expect("parse");
    let kinds: Vec<&str> = docs.iter().map(AnyResource::kind).collect();
    assert_eq!(kinds, ["Volume", "VirtualMachine"]);
    assert_eq!(docs[1].name(), "web");
    let refs: BTreeSet<(&str, String)> = docs
        .iter()
        .flat_map(|d| d.references())
        .map(|r| (r.kind, r.name))
        .collect();
    assert!(
        refs.contains(&("Image", "debian".to_string()))
            && refs.contains(&("Volume", "root".to_string()))
    );
    let AnyResource::VirtualMachine(vm) = &docs[1] else {
        panic!("not a VM")
    };
    assert_eq!(vm.spec.run_strategy, RunStrategy::RerunOnFailure);
    assert_eq!(vm.spec.cpus, 1);
    assert!(vm.nic_mac(0).is_none());
}

#[test]
fn multi_document_errors_name_document_path_and_file_line() {
    let good = "apiVersion: hci.dev/v1\nkind: Network\nmetadata: { name: lan }\nspec: { kind: { type: bridge } }\n";
    let bad_mac = "apiVersion: hci.dev/v1\nkind: VirtualMachine\nmetadata: { name: web }\nspec:\n  memory: 1Gi\n  boot: { type: firmware, kind: uefi }\n  nics:\n    - { name: eth0, network: lan, mac: 'zz:00:00:00:00:00' }\n";
    // The bad document's marker is line 6 of the stream, so its NIC (its 8th
    // line) is line 14.
    let stream = format!("# cluster\n{good}---\n{bad_mac}");
    let e = AnyResource::from_yaml_multi(&stream)
        .expect_err("bad MAC")
        .to_string();
    assert_eq!(
        e,
        "invalid YAML document 2: VirtualMachine \"web\": spec.nics[0]: invalid MAC address \
         \"zz:00:00:00:00:00\": expected six hex bytes like 02:68:63:00:00:01 at line 14 column 7"
    );
    // The single-document parser says the same, with lines of its own.
    let e = VirtualMachine::from_yaml(bad_mac)
        .expect_err("bad MAC")
        .to_string();
    assert!(e.contains("spec.nics[0]: invalid MAC address"), "{e}");

    let e = AnyResource::from_yaml_multi(&format!(
        "{good}---\n---\napiVersion: hci.dev/v1\nkind: volume\n"
    ))
    .expect_err("kind")
    .to_string();
    assert!(
        e.starts_with(
            "invalid YAML document 3: unknown kind \"volume\" (did you mean \"Volume\"?)"
        ),
        "{e}"
    );
    let e = AnyResource::from_yaml_multi("---\n- a\n- b\n")
        .expect_err("list")
        .to_string();
    assert_eq!(
        e,
        "invalid YAML document 1: expected a mapping with apiVersion, kind, metadata and spec \
         (the document starts at line 1)"
    );
    let e = AnyResource::from_yaml_multi(&format!("{good}---\nmetadata: {{ name: x }}\n"))
        .expect_err("no kind")
        .to_string();
    assert_eq!(
        e,
        "invalid YAML document 2: missing field `kind` (the document starts at line 5)"
    );
    let e = AnyResource::from_json("{\"kind\": \"Volume\", \"apiVersion\": \"hci.dev/v1\", \"metadata\": {\"name\": \"d\"}, \"spec\": {\"size\": \"1Gi\", \"replica\": 2}}")
        .expect_err("typo")
        .to_string();
    assert!(
        e.starts_with("invalid JSON document: Volume \"d\": unknown field `replica`"),
        "{e}"
    );
}

#[test]
fn yaml_streams_split_like_yaml_does() {
    let vol = |n: &str| {
        format!(
            "apiVersion: hci.dev/v1\nkind: Volume\nmetadata: {{ name: {n} }}\nspec: {{ size: 1Gi }}\n"
        )
    };
    let names = |s: &str| -> Vec<String> {
        AnyResource::from_yaml_multi(s)
            .unwrap_or_else(|e| panic!("{e}\n{s}"))
            .iter()
            .map(|r| r.name().to_string())
            .collect()
    };
    assert!(names("").is_empty());
    assert!(names("# nothing\n---\n...\n---   # empty\n").is_empty());
    assert_eq!(names(&vol("a")), ["a"]);
    // Comments and directives before the first marker belong to the first document.
    assert_eq!(
        names(&format!(
            "# c\n%YAML 1.2\n---\n{}---\r\n{}...\n",
            vol("a"),
            vol("b")
        )),
        ["a", "b"]
    );
    // `----` and indented `---` are content, not markers.
    assert_eq!(
        names(&format!(
            "apiVersion: hci.dev/v1\nkind: Image\nmetadata: {{ name: i }}\nspec:\n  url: https://x.example/i.img\n  description: |\n    ---\n    ----\n---\n{}",
            vol("v")
        )),
        ["i", "v"]
    );
    // A document may start on the marker line.
    assert_eq!(
        names(
            "--- {apiVersion: hci.dev/v1, kind: Volume, metadata: {name: a}, spec: {size: 4096}}\n"
        ),
        ["a"]
    );
}

#[test]
fn constructors_build_valid_resources() {
    let valid = |r: AnyResource| {
        if let Err(e) = r.validate() {
            panic!("{} {:?}: {e}", r.kind(), r.name());
        }
        r
    };
    let docs = vec![
        valid(Volume::blank("data", ByteSize::gib(10)).into()),
        valid(
            Volume::new(
                "root",
                VolumeSpec::from_image(ByteSize::gib(20), "debian").with_replicas(3),
            )
            .into(),
        ),
        valid(
            Network::new(
                "lan",
                NetworkSpec::management("192.168.7.0/30".parse().expect("cidr")),
            )
            .into(),
        ),
        valid(Network::new("tagged", NetworkSpec::vlan(100, "eth1")).into()),
        valid(Network::new("ovl", NetworkSpec::overlay(4242)).into()),
        valid(BackupTarget::new("s3", BackupTargetSpec::new("s3://backups/hci")).into()),
        valid(Backup::new("data-1", BackupSpec::volume("data", "s3")).into()),
        valid(Schedule::new("nightly", ScheduleSpec::snapshots("data", "0 3 * * *", 7)).into()),
        valid(
            Schedule::new(
                "weekly",
                ScheduleSpec::backups(
                    BackupSource::VirtualMachine { name: "web".into() },
                    "s3",
                    "0 4 * * 0",
                    4,
                ),
            )
            .into(),
        ),
        valid(
            VirtualMachine::builder("web")
                .boot(BootSpec::kernel("/boot/vmlinuz", "console=ttyS0"))
                .boot_disk("root", "root")
                .boot_disk("data", "data")
                .nic("eth0", "lan")
                .nic_spec(NicSpec {
                    model: NicModel::E1000,
                    ..NicSpec::new("eth1", "tagged")
                })
                .user_data("#cloud-config\n")
                .node_selector("zone", "a")
                .label("app", "web")
                .build()
                .into(),
        ),
    ];
    let AnyResource::VirtualMachine(vm) = &docs[9] else {
        panic!("not a VM")
    };
    let orders: Vec<_> = vm.spec.disks.iter().map(|d| d.boot_order).collect();
    assert_eq!(orders, [Some(1), Some(2)]);
    assert_eq!(vm.nic_mac(0), Some(MacAddress::from_name("web/eth0")));
    // Everything the file refers to is in the file, except the image.
    let unresolved: Vec<String> = docs
        .iter()
        .filter_map(|d| d.validate_refs(&docs).err())
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        unresolved,
        ["spec.source.name: image \"debian\" does not exist"]
    );
    let elsewhere = |k: &str, n: &str| docs.exists(k, n) || (k, n) == ("Image", "debian");
    assert!(docs[1].validate_refs(&elsewhere).is_ok());
    let lonely = Backup::new("b", BackupSpec::volume("gone", "nowhere"));
    assert_eq!(
        messages(validate_refs(&lonely, &docs).expect_err("dangling")),
        [
            "spec.source.name: volume \"gone\" does not exist",
            "spec.target: backup target \"nowhere\" does not exist"
        ]
    );

    // A /30 has two hosts: the gateway and a one-address pool; a /31 has no room.
    let small = NetworkSpec::management("192.168.7.0/30".parse().expect("cidr"));
    assert_eq!(small.gateway, Some(Ipv4Addr::new(192, 168, 7, 1)));
    assert_eq!(
        small.dhcp.map(|r| (r.start, r.end)),
        Some((Ipv4Addr::new(192, 168, 7, 2), Ipv4Addr::new(192, 168, 7, 2)))
    );
    let tiny = NetworkSpec::management("192.168.7.0/31".parse().expect("cidr"));
    assert_eq!((tiny.gateway, tiny.dhcp), (None, None));
}

#[test]
fn schedules_compute_their_next_run() {
    use chrono::{TimeZone, Utc};
    let t = Utc
        .with_ymd_and_hms(2026, 3, 6, 23, 59, 0)
        .single()
        .expect("time");
    let mut s = ScheduleSpec::snapshots("data", "*/15 * * * 1-5", 3);
    // Friday 23:59 -> Monday 00:00.
    assert_eq!(
        s.next_run_after(t),
        Utc.with_ymd_and_hms(2026, 3, 9, 0, 0, 0).single()
    );
    s.suspend = true;
    assert_eq!(s.next_run_after(t), None);
    s.suspend = false;
    s.cron = "* * *".into();
    assert_eq!(s.next_run_after(t), None);
}

#[test]
fn vm_boot_and_backend_rules_are_explained() {
    let m = vm(
        "  memory: 1Gi\n  backend: kvm\n  boot: { type: firmware, kind: bios, secureBoot: true }\n  disks: [{ name: cd, volume: iso, bus: cdrom }]\n  nics: [{ name: eth0, network: lan, model: e1000, mac: '01:00:5e:00:00:01' }]\n  nodeSelector: { 'bad key': x }\n",
    );
    assert_eq!(
        messages(m.validate().expect_err("many")),
        [
            "spec.boot.secureBoot: Secure Boot needs UEFI firmware",
            "spec.boot: the kvm backend boots kernels directly: use {type: kernel, …}, or backend \
             qemu (or auto) for firmware boot",
            "spec.nodeSelector[\"bad key\"]: label keys may contain letters, digits, '-', '_', '.' \
             and '/'",
            "spec.disks[0].bus: cdrom needs the qemu backend: the kvm backend has virtio disks only",
            "spec.nics[0].model: e1000 needs the qemu backend: the kvm backend has virtio NICs only",
            "spec.nics[0].mac: 01:00:5e:00:00:01 is a multicast address",
        ]
    );
    let m = vm(&format!(
        "  memory: 1Gi\n  cpus: 0\n  boot: {{ type: kernel, path: ' ', initrd: '', cmdline: '{}' }}\n",
        "x".repeat(MAX_CMDLINE + 1)
    ));
    assert_eq!(
        messages(m.validate().expect_err("kernel")),
        [
            "spec.cpus: 0 is out of range: must be 1 to 255",
            "spec.boot.path: must name the kernel to boot",
            "spec.boot.initrd: must not be empty when given",
            "spec.boot.cmdline: is 65536 bytes long: at most 65535 bytes",
        ]
    );
    let m = vm("  memory: 100000000\n  boot: { type: kernel, path: /k }\n  backend: kvm\n");
    assert_eq!(
        messages(m.validate().expect_err("unaligned memory")),
        ["spec.memory: 100000000 must be a multiple of 1Mi"]
    );
}
