//! `Volume`: a replicated block volume.

use serde::{Deserialize, Serialize};

use super::resource::{Envelope, EnvelopeRef, Resource, ResourceRef, check_envelope, resource};
use super::{ByteSize, Condition, ObjectMeta, ValidationErrors, VolumePhase, validate_name};

resource! {
    /// A replicated block volume.
    Volume, "Volume", VolumeSpec, VolumeStatus
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

    /// A single-replica volume of `size` filled from image `image`.
    pub fn from_image(size: ByteSize, image: impl Into<String>) -> Self {
        VolumeSpec {
            source: VolumeSource::Image { name: image.into() },
            ..VolumeSpec::blank(size)
        }
    }

    /// The same spec with `replicas` replicas.
    #[must_use]
    pub fn with_replicas(mut self, replicas: u8) -> Self {
        self.replicas = replicas;
        self
    }
}

impl Volume {
    /// A blank, single-replica volume named `name`.
    ///
    /// ```
    /// use hci_core::model::{ByteSize, Resource, Volume};
    /// let v = Volume::blank("data", ByteSize::gib(10));
    /// v.validate().unwrap();
    /// assert_eq!(v.to_json().unwrap(),
    ///     r#"{"apiVersion":"hci.dev/v1","kind":"Volume","metadata":{"name":"data"},"spec":{"size":"10Gi","replicas":1,"source":{"type":"blank"}}}"#);
    /// ```
    pub fn blank(name: impl Into<String>, size: ByteSize) -> Self {
        Volume::new(name, VolumeSpec::blank(size))
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
    /// Percent done while the volume is being filled from its source (a
    /// restore from a backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
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
    /// The replica server holding it (`HOST:PORT`), for replicated volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
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
    let (kind, name) = match s {
        VolumeSource::Blank => return None,
        VolumeSource::Image { name } => ("Image", name),
        VolumeSource::Snapshot { name } => ("Snapshot", name),
        VolumeSource::Volume { name } => ("Volume", name),
        VolumeSource::Backup { name } => ("Backup", name),
    };
    Some(ResourceRef {
        kind,
        name: name.clone(),
        path: "spec.source.name".into(),
    })
}
