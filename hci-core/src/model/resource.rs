//! The `Resource` trait, the document envelope and reference checking.

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{ObjectMeta, ValidationErrors};
use crate::error::{Error, Result};

/// A reference from one resource to another (a VM to its volumes and networks…).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceRef {
    /// Kind of the referenced resource, e.g. `Volume`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// Field path of the reference in the referring document.
    pub path: String,
}

/// Answers "does this resource exist?" for reference validation.
pub trait RefLookup {
    /// True if a resource of `kind` named `name` exists.
    fn exists(&self, kind: &str, name: &str) -> bool;
}

impl<F: Fn(&str, &str) -> bool> RefLookup for F {
    fn exists(&self, kind: &str, name: &str) -> bool {
        self(kind, name)
    }
}

/// A declarative resource: `apiVersion`, `kind`, `metadata`, `spec`, `status`.
pub trait Resource: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static {
    /// The `kind` of its documents, e.g. `VirtualMachine`.
    const KIND: &'static str;

    /// Its metadata.
    fn metadata(&self) -> &ObjectMeta;

    /// Its metadata, mutably.
    fn metadata_mut(&mut self) -> &mut ObjectMeta;

    /// Self-contained checks of metadata and spec (not references).
    fn validate(&self) -> Result<(), ValidationErrors>;

    /// Other resources this one refers to.
    fn references(&self) -> Vec<ResourceRef> {
        Vec::new()
    }

    /// Its name.
    fn name(&self) -> &str {
        &self.metadata().name
    }

    /// Serializes as a YAML document.
    fn to_yaml(&self) -> Result<String> {
        serde_norway::to_string(self)
            .map_err(|e| Error::invalid(format!("{} {:?}", Self::KIND, self.name()), e.to_string()))
    }

    /// Serializes as JSON.
    fn to_json(&self) -> Result<String> {
        serde_json::to_string(self)
            .map_err(|e| Error::invalid(format!("{} {:?}", Self::KIND, self.name()), e.to_string()))
    }

    /// Parses a YAML document (syntax and shape; call [`Resource::validate`] after).
    fn from_yaml(s: &str) -> Result<Self> {
        serde_norway::from_str(s)
            .map_err(|e| Error::invalid(format!("{} document", Self::KIND), e.to_string()))
    }

    /// Parses a JSON document.
    fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s)
            .map_err(|e| Error::invalid(format!("{} document", Self::KIND), e.to_string()))
    }
}

/// Checks that every resource `r` refers to exists, naming the referring field.
pub fn validate_refs<R: Resource>(r: &R, lookup: &dyn RefLookup) -> Result<(), ValidationErrors> {
    let mut errs = ValidationErrors::new();
    for rf in r.references() {
        if !lookup.exists(rf.kind, &rf.name) {
            errs.push(
                &rf.path,
                format!("{} {:?} does not exist", kind_in_words(rf.kind), rf.name),
            );
        }
    }
    errs.into_result()
}

/// `BackupTarget` -> `backup target`, for messages.
pub(crate) fn kind_in_words(kind: &str) -> String {
    let mut out = String::with_capacity(kind.len() + 2);
    for (i, c) in kind.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Validates a full resource (self-contained checks, then references).
pub fn validate_all<R: Resource>(r: &R, lookup: &dyn RefLookup) -> Result<(), ValidationErrors> {
    let mut errs = match r.validate() {
        Ok(()) => ValidationErrors::new(),
        Err(e) => e,
    };
    if let Err(e) = validate_refs(r, lookup) {
        errs.errors.extend(e.errors);
    }
    errs.into_result()
}

/// Declares a resource type with its envelope (`apiVersion`, `kind`) serde.
macro_rules! resource {
    (
        $(#[$meta:meta])* $name:ident, $kind:literal, $spec:ty, $status:ty
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            /// Identity, labels, version.
            pub metadata: $crate::model::ObjectMeta,
            /// Desired state.
            pub spec: $spec,
            /// Observed state (set by the system).
            pub status: Option<$status>,
        }

        impl $name {
            /// A resource named `name` with `spec` and no status.
            pub fn new(name: impl Into<String>, spec: $spec) -> Self {
                $name { metadata: $crate::model::ObjectMeta::named(name), spec, status: None }
            }

            /// The status, created empty first if there is none yet.
            pub fn status_mut(&mut self) -> &mut $status {
                self.status.get_or_insert_with(Default::default)
            }

            /// A copy of the status, or the empty status if there is none yet.
            pub fn status_or_default(&self) -> $status {
                self.status.clone().unwrap_or_default()
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                EnvelopeRef {
                    api_version: $crate::model::API_VERSION,
                    kind: $kind,
                    metadata: &self.metadata,
                    spec: &self.spec,
                    status: &self.status,
                }
                .serialize(s)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let e = Envelope::<$spec, $status>::deserialize(d)?;
                check_envelope(&e.api_version, &e.kind, $kind).map_err(serde::de::Error::custom)?;
                Ok($name { metadata: e.metadata, spec: e.spec, status: e.status })
            }
        }
    };
}
pub(crate) use resource;

/// The serialized form shared by every resource (borrowing, for output).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EnvelopeRef<'a, S, T> {
    pub(crate) api_version: &'a str,
    pub(crate) kind: &'a str,
    pub(crate) metadata: &'a ObjectMeta,
    pub(crate) spec: &'a S,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: &'a Option<T>,
}

/// The serialized form shared by every resource.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Envelope<S, T> {
    pub(crate) api_version: String,
    pub(crate) kind: String,
    pub(crate) metadata: ObjectMeta,
    pub(crate) spec: S,
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<T>,
}

fn none<T>() -> Option<T> {
    None
}

pub(crate) fn check_envelope(api_version: &str, kind: &str, want: &str) -> Result<(), String> {
    if api_version != super::API_VERSION {
        return Err(format!(
            "apiVersion {api_version:?} is not supported (expected {:?})",
            super::API_VERSION
        ));
    }
    if kind != want {
        return Err(format!("kind {kind:?} does not match (expected {want:?})"));
    }
    Ok(())
}
