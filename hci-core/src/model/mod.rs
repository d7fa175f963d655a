//! The resource model: what users declare and what the system reports.
//!
//! Every resource is a document with `apiVersion: hci.dev/v1`, a `kind`,
//! `metadata` ([`ObjectMeta`]: name, uid, labels, resource version,
//! timestamps), a `spec` (desired state) and a `status` (observed state, set
//! by the system, optional on input). Documents round-trip through YAML and
//! JSON; field names are camelCase and unknown fields are refused, so a typo
//! is an error rather than a silently ignored setting.
//!
//! | kind | spec |
//! |---|---|
//! | [`VirtualMachine`] | cpus, memory, boot (kernel or firmware), disks on volumes, NICs on networks, cloud-init, run/eviction strategy, node selector, backend |
//! | [`Volume`] | size, replicas, storage class, source (blank, image, snapshot, volume, backup), encryption |
//! | [`Image`] | URL, format, checksum |
//! | [`Snapshot`] | the volume |
//! | [`VirtualMachineSnapshot`] | the VM (every volume at one instant, with its spec) |
//! | [`Network`] | management / bridge / VLAN / overlay; CIDR, gateway, DHCP range, uplink, MTU |
//! | [`Backup`], [`BackupTarget`] | what to back up, and where (`s3://`, `file://`) |
//! | [`Schedule`] | cron, snapshot or backup, retention |
//! | [`Node`] | cordoned, maintenance; status: capacity, allocatable, conditions |
//!
//! A file holds one or more documents:
//!
//! ```
//! use hci_core::model::{AnyResource, VmPhase};
//!
//! let docs = AnyResource::from_yaml_multi(r#"
//! apiVersion: hci.dev/v1
//! kind: Network
//! metadata: { name: lan }
//! spec:
//!   kind: { type: management }
//!   cidr: 10.42.0.0/24
//!   gateway: 10.42.0.1
//!   dhcp: { start: 10.42.0.100, end: 10.42.0.200 }
//! ---
//! apiVersion: hci.dev/v1
//! kind: Volume
//! metadata: { name: web-root }
//! spec:
//!   size: 20Gi
//!   replicas: 3
//!   source: { type: image, name: debian-12 }
//! ---
//! apiVersion: hci.dev/v1
//! kind: VirtualMachine
//! metadata: { name: web, labels: { tier: frontend } }
//! spec:
//!   cpus: 2
//!   memory: 2Gi
//!   boot: { type: firmware, kind: uefi }
//!   disks: [{ name: root, volume: web-root, bootOrder: 1 }]
//!   nics: [{ name: eth0, network: lan, mac: "02:00:00:aa:bb:cc" }]
//!   cloudInit:
//!     sshAuthorizedKeys: ["ssh-ed25519 AAAAC3Nza admin@example"]
//!   runStrategy: Always
//! "#).unwrap();
//! assert_eq!(docs.len(), 3);
//! for d in &docs {
//!     d.validate().unwrap();
//! }
//! // The VM's references resolve within the file; the volume's image does not.
//! docs[2].validate_refs(&docs).unwrap();
//! let err = docs[1].validate_refs(&docs).unwrap_err();
//! assert_eq!(err.to_string(), r#"spec.source.name: image "debian-12" does not exist"#);
//!
//! // Phases move only along the lifecycle.
//! assert!(VmPhase::Running.transition(VmPhase::Migrating).is_ok());
//! assert!(VmPhase::Deleting.transition(VmPhase::Running).is_err());
//! ```
//!
//! Validation names the offending field and says why, and reports every
//! problem at once:
//!
//! ```
//! use hci_core::model::{AnyResource, Resource};
//! let docs = AnyResource::from_yaml_multi(r#"
//! apiVersion: hci.dev/v1
//! kind: Volume
//! metadata: { name: Data_1 }
//! spec: { size: 0 }
//! "#).unwrap();
//! let err = docs[0].validate().unwrap_err();
//! assert!(err.has_path("metadata.name"));
//! assert_eq!(err.errors[1].to_string(), "spec.size: must be greater than 0");
//! ```
//!
//! References between resources (a VM's disks to volumes, its NICs to
//! networks) are checked separately with [`validate_refs`], given a
//! [`RefLookup`] over what exists. The `arbitrary` module (feature `testing`) has
//! proptest strategies for every kind.

mod backup;
mod image;
mod mac;
mod meta;
mod network;
mod node;
mod phase;
mod quantity;
mod resource;
mod schedule;
mod snapshot;
mod validation;
mod vm;
mod vmsnapshot;
mod volume;

#[cfg(any(test, feature = "testing"))]
pub mod arbitrary;

pub use backup::{
    Backup, BackupPhase, BackupSource, BackupSpec, BackupStatus, BackupTarget, BackupTargetSpec,
    BackupTargetStatus,
};
pub use image::{Image, ImageFormat, ImagePhase, ImageSpec, ImageStatus};
pub use mac::{MacAddress, ParseMacError};
pub use meta::{
    API_VERSION, Condition, ConditionStatus, ObjectMeta, check_dns_label, set_condition,
    validate_name,
};
pub use network::{DhcpRange, Network, NetworkKind, NetworkLease, NetworkSpec, NetworkStatus};
pub use node::{Node, NodeResources, NodeSpec, NodeStatus};
pub use phase::{InvalidTransition, VmPhase, VolumePhase};
pub use quantity::{ByteSize, ParseByteSizeError};
pub use resource::{RefLookup, Resource, ResourceRef, validate_all, validate_refs};
pub use schedule::{Schedule, ScheduleSpec, ScheduleStatus, ScheduleTask, parse_cron};
pub use snapshot::{Snapshot, SnapshotPhase, SnapshotSpec, SnapshotStatus};
pub use validation::{ValidationError, ValidationErrors};
pub use vm::{
    BootSpec, CloudInit, DiskBus, DiskSpec, EvictionStrategy, FirmwareBoot, FirmwareKind,
    HypervisorBackend, KernelBoot, MAX_CMDLINE, MigrationPhase, NicModel, NicSpec, RunStrategy,
    VirtualMachine, VmBuilder, VmMigration, VmSpec, VmStatus,
};
pub use vmsnapshot::{
    VM_SNAPSHOT_ANNOTATION, VirtualMachineSnapshot, VirtualMachineSnapshotSpec,
    VirtualMachineSnapshotStatus, VmSnapshotVolume, copied_volume_name, vm_snapshot_member,
};
pub use volume::{ReplicaStatus, Volume, VolumeEncryption, VolumeSource, VolumeSpec, VolumeStatus};

use crate::error::{Error, Result};

macro_rules! any_resource {
    ($($kind:ident),* $(,)?) => {
        /// Any resource, for tools that handle documents of every kind
        /// (`hcictl apply -f`, the daemon's generic store).
        #[derive(Debug, Clone, PartialEq)]
        #[allow(clippy::large_enum_variant)]
        pub enum AnyResource {
            $(
                #[doc = concat!("A `", stringify!($kind), "`.")]
                $kind($kind),
            )*
        }

        impl AnyResource {
            /// Every kind name.
            pub const KINDS: &'static [&'static str] = &[$(stringify!($kind)),*];

            /// The document's kind.
            pub fn kind(&self) -> &'static str {
                match self { $(AnyResource::$kind(_) => <$kind as Resource>::KIND,)* }
            }

            /// Its metadata.
            pub fn metadata(&self) -> &ObjectMeta {
                match self { $(AnyResource::$kind(r) => r.metadata(),)* }
            }

            /// Its metadata, mutably.
            pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
                match self { $(AnyResource::$kind(r) => r.metadata_mut(),)* }
            }

            /// Self-contained validation.
            pub fn validate(&self) -> Result<(), ValidationErrors> {
                match self { $(AnyResource::$kind(r) => r.validate(),)* }
            }

            /// References to other resources.
            pub fn references(&self) -> Vec<ResourceRef> {
                match self { $(AnyResource::$kind(r) => r.references(),)* }
            }

            /// Checks that every resource it refers to exists (see [`validate_refs`]).
            pub fn validate_refs(&self, lookup: &dyn RefLookup) -> Result<(), ValidationErrors> {
                match self { $(AnyResource::$kind(r) => validate_refs(r, lookup),)* }
            }

            /// Serializes as YAML.
            pub fn to_yaml(&self) -> Result<String> {
                match self { $(AnyResource::$kind(r) => r.to_yaml(),)* }
            }

            /// Serializes as JSON.
            pub fn to_json(&self) -> Result<String> {
                match self { $(AnyResource::$kind(r) => r.to_json(),)* }
            }

            /// Parses `text` (one document) as a resource of `kind`, keeping
            /// the parser's field path and line in errors; `None` for an
            /// unknown kind.
            fn parse_kind(kind: &str, text: &str, json: bool) -> Option<std::result::Result<Self, String>> {
                match kind {
                    $(stringify!($kind) => Some(if json {
                        serde_json::from_str(text).map(AnyResource::$kind).map_err(|e| e.to_string())
                    } else {
                        serde_norway::from_str(text).map(AnyResource::$kind).map_err(|e| e.to_string())
                    }),)*
                    _ => None,
                }
            }
        }

        $(
            impl From<$kind> for AnyResource {
                fn from(r: $kind) -> Self { AnyResource::$kind(r) }
            }
        )*
    };
}

any_resource!(
    VirtualMachine,
    Volume,
    Image,
    Snapshot,
    VirtualMachineSnapshot,
    Network,
    Backup,
    BackupTarget,
    Schedule,
    Node,
);

impl AnyResource {
    /// The resource's name.
    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    /// Parses one JSON document of any kind.
    pub fn from_json(s: &str) -> Result<Self> {
        let what = "JSON document";
        let v: serde_json::Value =
            serde_json::from_str(s).map_err(|e| Error::invalid(what, e.to_string()))?;
        let kind = match v.get("kind") {
            Some(serde_json::Value::String(k)) => k.as_str(),
            Some(_) => return Err(Error::invalid(what, "`kind` must be a string")),
            None => return Err(Error::invalid(what, "missing field `kind`")),
        };
        let name = v.pointer("/metadata/name").and_then(|n| n.as_str());
        Self::parse_or_explain(kind, name, s, true).map_err(|reason| Error::invalid(what, reason))
    }

    /// Parses a YAML stream of one or more documents separated by `---`
    /// (empty documents are skipped).
    ///
    /// Errors name the document (1-based), its kind and name, the field path
    /// and the line in `s`:
    ///
    /// ```
    /// use hci_core::model::AnyResource;
    /// let err = AnyResource::from_yaml_multi("\
    /// apiVersion: hci.dev/v1
    /// kind: Volume
    /// metadata: { name: data }
    /// spec: { size: 1Gi }
    /// ---
    /// apiVersion: hci.dev/v1
    /// kind: Volume
    /// metadata: { name: logs }
    /// spec: { size: 1.5Gi }
    /// ").unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "invalid YAML document 2: Volume \"logs\": spec.size: invalid size \"1.5Gi\": \
    ///      expected a whole number with an optional unit such as Ki, Mi, Gi, Ti at line 9 column 15",
    /// );
    /// ```
    pub fn from_yaml_multi(s: &str) -> Result<Vec<Self>> {
        let mut out = Vec::new();
        for (i, (first_line, doc)) in split_yaml_documents(s).into_iter().enumerate() {
            let what = format!("YAML document {}", i + 1);
            if !has_yaml_content(doc) {
                continue;
            }
            // Pad with the lines before the document, so that the parser's
            // line numbers are those of `s`.
            let text = format!("{}{doc}", "\n".repeat(first_line));
            let v: serde_norway::Value =
                serde_norway::from_str(&text).map_err(|e| Error::invalid(&what, e.to_string()))?;
            if v.is_null() {
                continue;
            }
            let here = || format!("(the document starts at line {})", first_line + 1);
            if !v.is_mapping() {
                return Err(Error::invalid(
                    &what,
                    format!(
                        "expected a mapping with apiVersion, kind, metadata and spec {}",
                        here()
                    ),
                ));
            }
            let kind = match v.get("kind") {
                Some(serde_norway::Value::String(k)) => k.as_str(),
                Some(_) => {
                    return Err(Error::invalid(
                        &what,
                        format!("`kind` must be a string {}", here()),
                    ));
                }
                None => {
                    return Err(Error::invalid(
                        &what,
                        format!("missing field `kind` {}", here()),
                    ));
                }
            };
            let name = v
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str());
            let r = Self::parse_or_explain(kind, name, &text, false)
                .map_err(|reason| Error::invalid(&what, reason))?;
            out.push(r);
        }
        Ok(out)
    }

    fn parse_or_explain(
        kind: &str,
        name: Option<&str>,
        text: &str,
        json: bool,
    ) -> std::result::Result<Self, String> {
        let who = match name {
            Some(n) => format!("{kind} {n:?}"),
            None => kind.to_string(),
        };
        match Self::parse_kind(kind, text, json) {
            Some(r) => r.map_err(|e| format!("{who}: {e}")),
            None => {
                let hint = Self::KINDS
                    .iter()
                    .find(|k| k.eq_ignore_ascii_case(kind) || edit_distance(k, kind) <= 2)
                    .map(|k| format!(" (did you mean {k:?}?)"))
                    .unwrap_or_default();
                Err(format!(
                    "unknown kind {kind:?}{hint}; known kinds: {}",
                    Self::KINDS.join(", ")
                ))
            }
        }
    }
}

/// The documents of a file answer for themselves, so a file can be checked on
/// its own or chained with what already exists:
/// `|k: &str, n: &str| docs.exists(k, n) || store_has(k, n)`.
impl RefLookup for [AnyResource] {
    fn exists(&self, kind: &str, name: &str) -> bool {
        self.iter().any(|r| r.kind() == kind && r.name() == name)
    }
}

impl RefLookup for Vec<AnyResource> {
    fn exists(&self, kind: &str, name: &str) -> bool {
        self.as_slice().exists(kind, name)
    }
}

/// True for a `---` document marker line (`---`, `--- `, `---\r`…).
fn is_document_marker(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.chars().next().is_none_or(char::is_whitespace))
}

/// True if a line holds nothing but blanks, a comment, a directive or `...`.
fn is_filler(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#') || t.starts_with('%') || t == "..."
}

/// True if a document chunk holds more than markers, comments and blanks.
fn has_yaml_content(doc: &str) -> bool {
    doc.lines().any(|l| {
        let l = if is_document_marker(l) { &l[3..] } else { l };
        !is_filler(l)
    })
}

/// Splits a YAML stream into documents at `---` lines (which YAML forbids
/// inside content), returning each with the 0-based line it starts on.
/// Comments and directives before a marker stay with the document after it.
fn split_yaml_documents(s: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let (mut start, mut start_line, mut offset) = (0, 0, 0);
    let mut started = false;
    for (n, line) in s.split_inclusive('\n').enumerate() {
        if is_document_marker(line) {
            if started {
                docs.push((start_line, &s[start..offset]));
                start = offset;
                start_line = n;
            }
            started = true;
        } else if !is_filler(line) {
            started = true;
        }
        offset += line.len();
    }
    docs.push((start_line, &s[start..]));
    docs
}

/// Levenshtein distance, for "did you mean" hints on short words.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests;
