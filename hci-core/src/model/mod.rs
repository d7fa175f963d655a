//! The resource model: what users declare and what the system reports.
//!
//! Every resource has `metadata`, a `spec` (desired state) and a `status`
//! (observed state). Specs are validated with [`ValidationErrors`] that name the
//! offending field path.

mod validation;

pub use validation::{ValidationError, ValidationErrors};
