//! In-memory reference implementations (being written).
