//! `Volume`, `Image` and `Snapshot`: block storage resources.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::resource::{Envelope, EnvelopeRef, Resource, ResourceRef, check_envelope, resource};
use super::{ByteSize, Condition, ObjectMeta, ValidationErrors, VolumePhase, validate_name};

resource! {
    /// A replicated block volume.
    Volume, "Volume", VolumeSpec, VolumeStatus
}

resource! {
    /// A disk image (raw, qcow2 or ISO) that volumes can be created from.
    Image, "Image", ImageSpec, ImageStatus
}

resource! {
    /// A point-in-time snapshot of a volume.
    Snapshot, "Snapshot", SnapshotSpec, SnapshotStatus
}

fn one() -> u8 {
    1
}

/// Desired state of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSpec {
    /// Size (a nonzero multiple of 4Ki).
    pub size: ByteSize,
    /// Number of synchronous replicas, on distinct nodes (1 to 7).
    #[serde(default = "one")]
    pub replicas: u8,
    /// Storage class (disk tags / pool); the default pool when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// Initial content.
    #[serde(default)]
    pub source: VolumeSource,
    /// Encryption at rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<VolumeEncryption>,
}

impl VolumeSpec {
    /// A blank, unencrypted, single-replica volume.
    pub fn blank(size: ByteSize) -> Self {
        VolumeSpec {
            size,
            replicas: 1,
            storage_class: None,
            source: VolumeSource::Blank,
            encryption: None,
        }
    }
}

/// Where a new volume's content comes from, written `{type: image, name: debian}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum VolumeSource {
    /// All zeroes.
    #[default]
    Blank,
    /// An `Image`.
    Image {
        /// Image name.
        name: String,
    },
    /// A `Snapshot` of another volume.
    Snapshot {
        /// Snapshot name.
        name: String,
    },
    /// Another volume's current content (a clone).
    Volume {
        /// Volume name.
        name: String,
    },
    /// A `Backup`.
    Backup {
        /// Backup name.
        name: String,
    },
}

/// Encryption at rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeEncryption {
    /// Path of the 64-byte key file on every node (never the key itself).
    pub key_file: String,
}

/// Observed state of a volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: VolumePhase,
    /// Current size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// Bytes allocated (thin provisioning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<ByteSize>,
    /// Replicas and their health.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaStatus>,
    /// VM using it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<String>,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One replica of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicaStatus {
    /// Node holding it.
    pub node: String,
    /// In the write set and up to date.
    pub healthy: bool,
    /// Rebuild progress in percent, while rebuilding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_percent: Option<u8>,
}

impl Resource for Volume {
    const KIND: &'static str = "Volume";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }

    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::new();
        self.metadata.validate_into(&mut errs);
        let s = &self.spec;
        if s.size.bytes() == 0 {
            errs.push("spec.size", "must be greater than 0");
        } else if !s.size.bytes().is_multiple_of(4096) {
            errs.push("spec.size", format!("{} must be a multiple of 4Ki", s.size));
        }
        if !(1..=7).contains(&s.replicas) {
            errs.push(
                "spec.replicas",
                format!("{} is out of range: must be 1 to 7", s.replicas),
            );
        }
        if let Some(c) = &s.storage_class {
            validate_name("spec.storageClass", c, &mut errs);
        }
        if let Some(e) = &s.encryption
            && e.key_file.trim().is_empty()
        {
            errs.push("spec.encryption.keyFile", "must name a key file");
        }
        if let Some(r) = source_ref(&s.source) {
            validate_name(&r.path, &r.name, &mut errs);
        }
        errs.into_result()
    }

    fn references(&self) -> Vec<ResourceRef> {
        source_ref(&self.spec.source).into_iter().collect()
    }
}

fn source_ref(s: &VolumeSource) -> Option<ResourceRef> {
    let (kind, name, field) = match s {
        VolumeSource::Blank => return None,
        VolumeSource::Image { name } => ("Image", name, "image"),
        VolumeSource::Snapshot { name } => ("Snapshot", name, "snapshot"),
        VolumeSource::Volume { name } => ("Volume", name, "volume"),
        VolumeSource::Backup { name } => ("Backup", name, "backup"),
    };
    Some(ResourceRef {
        kind,
        name: name.clone(),
        path: format!("spec.source.name ({field})"),
    })
}

/// Desired state of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSpec {
    /// Where to fetch it: `https://…`, `http://…` or `file:///…`.
    pub url: String,
    /// Format; detected when `auto`.
    #[serde(default)]
    pub format: ImageFormat,
    /// Expected checksum, `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// Image file format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ImageFormat {
    /// Detect from the content.
    #[default]
    Auto,
    /// Raw disk image.
    Raw,
    /// qcow2.
    Qcow2,
    /// ISO 9660 (attached as a CD-ROM).
    Iso,
}

/// Phase of an image import.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImagePhase {
    /// Not started.
    #[default]
    Pending,
    /// Being fetched and converted.
    Importing,
    /// Usable.
    Ready,
    /// Import failed (see the message).
    Failed,
}

/// Observed state of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageStatus {
    /// Phase.
    #[serde(default)]
    pub phase: ImagePhase,
    /// Virtual size once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// Import progress in percent.
    #[serde(default)]
    pub progress: u8,
    /// Detail on failure.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Resource for Image {
    const KIND: &'static str = "Image";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }

    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::new();
        self.metadata.validate_into(&mut errs);
        let url = &self.spec.url;
        if !["https://", "http://", "file:///"]
            .iter()
            .any(|p| url.starts_with(p))
        {
            errs.push(
                "spec.url",
                format!("{url:?} must start with https://, http:// or file:///"),
            );
        }
        if let Some(c) = &self.spec.checksum {
            let ok = c
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                errs.push("spec.checksum", "must be sha256: followed by 64 hex digits");
            }
        }
        errs.into_result()
    }
}

/// Desired state of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSpec {
    /// The volume to snapshot.
    pub volume: String,
}

/// Phase of a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotPhase {
    /// Not taken yet.
    #[default]
    Pending,
    /// Taken and usable.
    Ready,
    /// Could not be taken.
    Failed,
}

/// Observed state of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotStatus {
    /// Phase.
    #[serde(default)]
    pub phase: SnapshotPhase,
    /// When it was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_at: Option<DateTime<Utc>>,
    /// Volume size at that time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// Detail on failure.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Resource for Snapshot {
    const KIND: &'static str = "Snapshot";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }

    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::new();
        self.metadata.validate_into(&mut errs);
        validate_name("spec.volume", &self.spec.volume, &mut errs);
        errs.into_result()
    }

    fn references(&self) -> Vec<ResourceRef> {
        vec![ResourceRef {
            kind: "Volume",
            name: self.spec.volume.clone(),
            path: "spec.volume".into(),
        }]
    }
}
