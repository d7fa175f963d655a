//! Resource documents: parsing and validation by hci-core's model, so
//! Python objects obey exactly the rules the daemon applies.

use hci_core::model::AnyResource;
use pyo3::prelude::*;

use crate::error::CoreResultExt;

fn normalized(r: &AnyResource) -> PyResult<String> {
    r.validate()
        .map_err(hci_core::Error::InvalidSpec)
        .py_err()?;
    r.to_json().py_err()
}

/// Parses and validates one JSON resource document; returns it normalized
/// (defaults filled in, canonical field spelling) as JSON. Raises
/// `InvalidSpec` naming every offending field.
#[pyfunction]
pub fn validate_json(json: &str) -> PyResult<String> {
    normalized(&AnyResource::from_json(json).py_err()?)
}

/// Parses and validates a YAML stream of one or more documents (`---`
/// separated); returns each normalized as JSON.
#[pyfunction]
pub fn parse_yaml(text: &str) -> PyResult<Vec<String>> {
    AnyResource::from_yaml_multi(text)
        .py_err()?
        .iter()
        .map(normalized)
        .collect()
}

/// Renders one JSON resource document as YAML.
#[pyfunction]
pub fn to_yaml(json: &str) -> PyResult<String> {
    AnyResource::from_json(json).py_err()?.to_yaml().py_err()
}

/// The resource kinds the model knows (`VirtualMachine`, `Volume`, …).
#[pyfunction]
pub fn kinds() -> Vec<&'static str> {
    AnyResource::KINDS.to_vec()
}
