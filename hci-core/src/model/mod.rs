//! The resource model: what users declare and what the system reports.
//!
//! Every resource is a document with `apiVersion: hci.dev/v1`, a `kind`,
//! `metadata` ([`ObjectMeta`]: name, uid, labels, resource version,
//! timestamps), a `spec` (desired state) and a `status` (observed state, set
//! by the system). Documents round-trip through YAML and JSON; field names
//! are camelCase and unknown fields are refused, so a typo is an error rather
//! than a silently ignored setting.
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
//! [`RefLookup`] over what exists.

mod backup;
mod mac;
mod meta;
mod network;
mod node;
mod phase;
mod quantity;
mod resource;
mod validation;
mod vm;
mod volume;

#[cfg(any(test, feature = "testing"))]
pub mod arbitrary;

pub use backup::{
    Backup, BackupPhase, BackupSource, BackupSpec, BackupStatus, BackupTarget, BackupTargetSpec,
    BackupTargetStatus, Schedule, ScheduleSpec, ScheduleStatus, ScheduleTask, parse_cron,
};
pub use mac::{MacAddress, ParseMacError};
pub use meta::{
    API_VERSION, Condition, ConditionStatus, ObjectMeta, check_dns_label, set_condition,
    validate_name,
};
pub use network::{DhcpRange, Network, NetworkKind, NetworkSpec, NetworkStatus};
pub use node::{Node, NodeResources, NodeSpec, NodeStatus};
pub use phase::{InvalidTransition, VmPhase, VolumePhase};
pub use quantity::{ByteSize, ParseByteSizeError};
pub use resource::{RefLookup, Resource, ResourceRef, validate_all, validate_refs};
pub use validation::{ValidationError, ValidationErrors};
pub use vm::{
    BootSpec, CloudInit, DiskBus, DiskSpec, EvictionStrategy, FirmwareBoot, FirmwareKind,
    HypervisorBackend, KernelBoot, NicModel, NicSpec, RunStrategy, VirtualMachine, VmSpec,
    VmStatus,
};
pub use volume::{
    Image, ImageFormat, ImagePhase, ImageSpec, ImageStatus, ReplicaStatus, Snapshot, SnapshotPhase,
    SnapshotSpec, SnapshotStatus, Volume, VolumeEncryption, VolumeSource, VolumeSpec, VolumeStatus,
};

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

            /// Serializes as YAML.
            pub fn to_yaml(&self) -> Result<String> {
                match self { $(AnyResource::$kind(r) => r.to_yaml(),)* }
            }

            /// Serializes as JSON.
            pub fn to_json(&self) -> Result<String> {
                match self { $(AnyResource::$kind(r) => r.to_json(),)* }
            }

            fn from_value(kind: &str, v: serde_json::Value) -> std::result::Result<Self, String> {
                match kind {
                    $(stringify!($kind) => serde_json::from_value(v)
                        .map(AnyResource::$kind)
                        .map_err(|e| e.to_string()),)*
                    other => Err(format!(
                        "unknown kind {other:?}; known kinds: {}",
                        Self::KINDS.join(", ")
                    )),
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
        let v: serde_json::Value =
            serde_json::from_str(s).map_err(|e| Error::invalid("JSON document", e.to_string()))?;
        Self::from_json_value(v).map_err(|reason| Error::invalid("JSON document", reason))
    }

    fn from_json_value(v: serde_json::Value) -> std::result::Result<Self, String> {
        let kind = match v.get("kind") {
            Some(serde_json::Value::String(k)) => k.clone(),
            Some(_) => return Err("kind must be a string".into()),
            None => return Err("missing field `kind`".into()),
        };
        Self::from_value(&kind, v).map_err(|e| format!("{kind}: {e}"))
    }

    /// Parses a YAML stream of one or more documents separated by `---`
    /// (empty documents are skipped). Errors name the document (1-based).
    pub fn from_yaml_multi(s: &str) -> Result<Vec<Self>> {
        use serde::Deserialize;
        let mut out = Vec::new();
        for (i, doc) in serde_norway::Deserializer::from_str(s).enumerate() {
            let what = format!("YAML document {}", i + 1);
            let v = serde_json::Value::deserialize(doc)
                .map_err(|e| Error::invalid(&what, e.to_string()))?;
            if v.is_null() {
                continue;
            }
            out.push(Self::from_json_value(v).map_err(|reason| Error::invalid(&what, reason))?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
