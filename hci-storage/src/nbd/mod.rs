//! NBD server (being written).
