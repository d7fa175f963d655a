//! In-memory reference implementations of the storage and state traits, for
//! tests, examples and as executable documentation of each contract.

mod block;

pub use block::MemBlockDevice;
