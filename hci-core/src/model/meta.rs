//! Object metadata, conditions and name validation shared by every resource.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ValidationErrors;

/// The API group and version every resource document carries.
pub const API_VERSION: &str = "hci.dev/v1";

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Metadata of a resource: identity, labels, version and timestamps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Name, unique per kind; a DNS-1123 label (`[a-z0-9-]`, at most 63 characters).
    pub name: String,
    /// Unique id assigned by the system at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<Uuid>,
    /// Labels for selection (`node=a`, `tier=db`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations for tools.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Version of the stored object (the state store's modification revision);
    /// 0 for an object never stored. Updates must carry the version they read.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resource_version: u64,
    /// Bumped by the system on every spec change.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// When the object was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// When the object was last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

impl ObjectMeta {
    /// Metadata with just a name.
    pub fn named(name: impl Into<String>) -> Self {
        ObjectMeta {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Validates the name and labels, reporting under `metadata`.
    pub fn validate_into(&self, errs: &mut ValidationErrors) {
        validate_name("metadata.name", &self.name, errs);
        for (k, v) in &self.labels {
            validate_label(&format!("metadata.labels[{k:?}]"), k, v, errs);
        }
    }
}

/// Checks one label (or label selector) `key: value`, recording problems at `path`.
pub(crate) fn validate_label(path: &str, k: &str, v: &str, errs: &mut ValidationErrors) {
    if k.is_empty() || k.len() > 253 {
        errs.push(path, "label keys must be 1 to 253 characters");
    } else if !k
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    {
        errs.push(
            path,
            "label keys may contain letters, digits, '-', '_', '.' and '/'",
        );
    }
    if v.len() > 63 {
        errs.push(path, "label values must be at most 63 characters");
    }
}

/// Checks that `name` is a DNS-1123 label, recording a problem at `path` if not.
pub fn validate_name(path: &str, name: &str, errs: &mut ValidationErrors) {
    if let Err(reason) = check_dns_label(name) {
        errs.push(path, format!("{name:?} {reason}"));
    }
}

/// Why `name` is not a DNS-1123 label, if it is not.
pub fn check_dns_label(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty: a name is required");
    }
    if name.len() > 63 {
        return Err("is too long: names must be at most 63 characters");
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !name.chars().all(ok_char) || !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return Err(
            "is not a valid name: use lower-case letters, digits and '-', \
                    starting and ending with a letter or digit",
        );
    }
    Ok(())
}

/// Whether a condition holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionStatus {
    /// It holds.
    True,
    /// It does not hold.
    False,
    /// Not known yet.
    #[default]
    Unknown,
}

/// One observed condition of a resource (`Ready`, `Scheduled`, `Degraded`…).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// A machine-readable reason in CamelCase.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// A human-readable message.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<DateTime<Utc>>,
}

/// Sets (or adds) condition `kind` in `conditions`, updating the transition time
/// only when the status changes. Returns true if anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    kind: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
) -> bool {
    let now = Some(Utc::now());
    match conditions.iter_mut().find(|c| c.kind == kind) {
        Some(c) => {
            let changed = c.status != status || c.reason != reason || c.message != message;
            if c.status != status {
                c.last_transition = now;
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message.to_string();
            changed
        }
        None => {
            conditions.push(Condition {
                kind: kind.to_string(),
                status,
                reason: reason.to_string(),
                message: message.to_string(),
                last_transition: now,
            });
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "vm-1", "0abc", &"a".repeat(63)] {
            assert!(check_dns_label(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64), "é"] {
            assert!(check_dns_label(bad).is_err(), "{bad}");
        }
        let mut e = ValidationErrors::new();
        validate_name("metadata.name", "My_VM", &mut e);
        assert_eq!(
            e.to_string(),
            "metadata.name: \"My_VM\" is not a valid name: use lower-case letters, digits and \
             '-', starting and ending with a letter or digit"
        );
    }

    #[test]
    fn conditions_track_transitions() {
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            "Ready",
            ConditionStatus::False,
            "Starting",
            ""
        ));
        let t0 = c[0].last_transition;
        assert!(!set_condition(
            &mut c,
            "Ready",
            ConditionStatus::False,
            "Starting",
            ""
        ));
        assert_eq!(c[0].last_transition, t0);
        assert!(set_condition(
            &mut c,
            "Ready",
            ConditionStatus::True,
            "Running",
            "ok"
        ));
        assert_eq!(c.len(), 1);
    }
}
