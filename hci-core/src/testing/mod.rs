//! Conformance suites: one per backend trait, run by every implementation.

pub mod network;
