//! Local replica store (being written).
