//! hci-core: resource model, errors, backend traits and conformance suites.
pub mod model;
