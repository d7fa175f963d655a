//! Validation errors that name the offending field.

use std::fmt;

/// One problem with a resource spec: where it is and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ValidationError {
    /// Field path in the document, e.g. `spec.disks[1].volume`.
    pub path: String,
    /// What is wrong, in words a user understands.
    pub reason: String,
}

impl ValidationError {
    /// Creates an error at `path`.
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ValidationError {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Every problem found in one spec (validation does not stop at the first).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ValidationErrors {
    /// The problems, in the order they were found.
    pub errors: Vec<ValidationError>,
}

impl ValidationErrors {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a problem at `path`.
    pub fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ValidationError::new(path, reason));
    }

    /// True if no problem was found.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// `Ok(())` if empty, otherwise `Err(self)`.
    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }

    /// True if some problem is at exactly `path`.
    pub fn has_path(&self, path: &str) -> bool {
        self.errors.iter().any(|e| e.path == path)
    }
}

impl From<ValidationError> for ValidationErrors {
    fn from(e: ValidationError) -> Self {
        ValidationErrors { errors: vec![e] }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errors.as_slice() {
            [] => f.write_str("no errors"),
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems", many.len())?;
                for e in many {
                    write!(f, "; {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ValidationErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_lists_every_problem() {
        let mut e = ValidationErrors::new();
        assert!(e.clone().into_result().is_ok());
        e.push("spec.cpus", "must be at least 1");
        assert_eq!(e.to_string(), "spec.cpus: must be at least 1");
        e.push("metadata.name", "must be a DNS-1123 label");
        assert_eq!(
            e.to_string(),
            "2 problems; spec.cpus: must be at least 1; metadata.name: must be a DNS-1123 label"
        );
        assert!(e.has_path("spec.cpus"));
        assert!(e.into_result().is_err());
    }
}
