//! `Image`: a disk image that volumes and boot media are made from.

use serde::{Deserialize, Serialize};

use super::resource::{Envelope, EnvelopeRef, Resource, check_envelope, resource};
use super::{ByteSize, ObjectMeta, ValidationErrors};

resource! {
    /// A disk image (raw, qcow2 or ISO) that volumes can be created from.
    Image, "Image", ImageSpec, ImageStatus
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
