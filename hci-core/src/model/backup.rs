//! `Backup` and `BackupTarget`: copies of volumes kept off the cluster.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::resource::{Envelope, EnvelopeRef, Resource, ResourceRef, check_envelope, resource};
use super::{ByteSize, Condition, ObjectMeta, ValidationErrors, validate_name};

resource! {
    /// One backup of a volume (or of a VM's volumes) on a backup target.
    Backup, "Backup", BackupSpec, BackupStatus
}

resource! {
    /// Where backups go: an S3-compatible bucket or a filesystem/NFS path.
    BackupTarget, "BackupTarget", BackupTargetSpec, BackupTargetStatus
}

fn yes() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What a backup covers, written `{kind: volume, name: data}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum BackupSource {
    /// One volume.
    Volume {
        /// Volume name.
        name: String,
    },
    /// Every volume of a VM, plus its spec.
    VirtualMachine {
        /// VM name.
        name: String,
    },
}

/// Desired state of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupSpec {
    /// What to back up.
    pub source: BackupSource,
    /// The `BackupTarget` to write to.
    pub target: String,
    /// Read only blocks changed since the previous backup of the same source.
    #[serde(default = "yes")]
    pub incremental: bool,
}

/// Phase of a backup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupPhase {
    /// Waiting.
    #[default]
    Pending,
    /// Running.
    InProgress,
    /// Stored and verified.
    Completed,
    /// Failed (see the message).
    Failed,
}

/// Observed state of a backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupStatus {
    /// Phase.
    #[serde(default)]
    pub phase: BackupPhase,
    /// Id of the backup on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// Progress in percent.
    #[serde(default)]
    pub progress: u8,
    /// Bytes read from the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<ByteSize>,
    /// Bytes newly stored on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added: Option<ByteSize>,
    /// When it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    /// Detail on failure.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Resource for Backup {
    const KIND: &'static str = "Backup";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }

    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::new();
        self.metadata.validate_into(&mut errs);
        for r in self.references() {
            validate_name(&r.path, &r.name, &mut errs);
        }
        errs.into_result()
    }

    fn references(&self) -> Vec<ResourceRef> {
        let src = match &self.spec.source {
            BackupSource::Volume { name } => ResourceRef {
                kind: "Volume",
                name: name.clone(),
                path: "spec.source.name".into(),
            },
            BackupSource::VirtualMachine { name } => ResourceRef {
                kind: "VirtualMachine",
                name: name.clone(),
                path: "spec.source.name".into(),
            },
        };
        let target = ResourceRef {
            kind: "BackupTarget",
            name: self.spec.target.clone(),
            path: "spec.target".into(),
        };
        vec![src, target]
    }
}

/// Desired state of a backup target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupTargetSpec {
    /// `s3://bucket/prefix` or `file:///path` (also an NFS mount).
    pub url: String,
    /// S3 endpoint for non-AWS servers, e.g. `http://127.0.0.1:9000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// S3 region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// File holding `ACCESS_KEY_ID:SECRET_ACCESS_KEY` on every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
    /// Path-style S3 addressing (most self-hosted servers).
    #[serde(default, skip_serializing_if = "is_false")]
    pub path_style: bool,
    /// Allow plain HTTP endpoints.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_http: bool,
    /// Key file for client-side encryption of backup data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_file: Option<String>,
}

impl BackupTargetSpec {
    /// A target at `url` (`s3://bucket/prefix` or `file:///path`) with no other settings.
    pub fn new(url: impl Into<String>) -> Self {
        BackupTargetSpec {
            url: url.into(),
            endpoint: None,
            region: None,
            credentials_file: None,
            path_style: false,
            allow_http: false,
            encryption_key_file: None,
        }
    }
}

impl BackupSpec {
    /// An incremental backup of volume `volume` to backup target `target`.
    pub fn volume(volume: impl Into<String>, target: impl Into<String>) -> Self {
        BackupSpec {
            source: BackupSource::Volume {
                name: volume.into(),
            },
            target: target.into(),
            incremental: true,
        }
    }
}

/// Observed state of a backup target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupTargetStatus {
    /// Conditions (`Available`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Last successful contact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked: Option<DateTime<Utc>>,
}

impl Resource for BackupTarget {
    const KIND: &'static str = "BackupTarget";

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
        if let Some(rest) = s.url.strip_prefix("s3://") {
            if rest.split('/').next().unwrap_or("").is_empty() {
                errs.push(
                    "spec.url",
                    "an s3:// URL needs a bucket: s3://bucket/prefix",
                );
            }
        } else if let Some(path) = s.url.strip_prefix("file://") {
            if !path.starts_with('/') {
                errs.push(
                    "spec.url",
                    "a file:// URL needs an absolute path: file:///srv/backups",
                );
            }
            if s.endpoint.is_some() {
                errs.push("spec.endpoint", "only applies to s3:// targets");
            }
        } else {
            errs.push(
                "spec.url",
                format!("{:?} must start with s3:// or file://", s.url),
            );
        }
        if let Some(ep) = &s.endpoint {
            if ep.starts_with("http://") && !s.allow_http {
                errs.push("spec.endpoint", "plain http:// needs allowHttp: true");
            } else if !ep.starts_with("http://") && !ep.starts_with("https://") {
                errs.push(
                    "spec.endpoint",
                    format!("{ep:?} must start with https:// or http://"),
                );
            }
        }
        errs.into_result()
    }
}
