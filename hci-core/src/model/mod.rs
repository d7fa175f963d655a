//! Resource model (being written).
