//! An NBD server exporting any [`BlockDevice`](hci_core::block::BlockDevice).
//!
//! Fixed-newstyle handshake with `OPT_GO`/`INFO`/`LIST`/`EXPORT_NAME`/`ABORT`,
//! structured replies (holes sent as `OFFSET_HOLE`, no zeroes on the wire), the
//! `base:allocation` metadata context, and every transmission command: `READ`,
//! `WRITE` (+`FUA`), `FLUSH`, `TRIM`, `WRITE_ZEROES` (+`NO_HOLE`, `FAST_ZERO`),
//! `CACHE`, `BLOCK_STATUS`, `DISC`. Requests are served concurrently (up to 128
//! per connection) and replied out of order, each reply in a single write; TCP
//! sockets get `TCP_NODELAY`. Malformed input gets an NBD error or a closed
//! connection, never a panic.

mod proto;
mod server;

pub use proto::Request;
pub use server::{ExportOptions, Listen, MAX_PAYLOAD, NbdServer, ServerHandle};

/// Protocol constants, for clients and tests.
pub mod constants {
    pub use super::proto::*;
}
