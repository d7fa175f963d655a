//! `Snapshot`: a point-in-time copy of a volume.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::resource::{Envelope, EnvelopeRef, Resource, ResourceRef, check_envelope, resource};
use super::{ByteSize, ObjectMeta, ValidationErrors, validate_name};

resource! {
    /// A point-in-time snapshot of a volume.
    Snapshot, "Snapshot", SnapshotSpec, SnapshotStatus
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
