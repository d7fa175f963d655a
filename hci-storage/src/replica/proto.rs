//! The replica wire protocol.
//!
//! All integers are little-endian.
//!
//! **Hello** (client → server, once): magic `HCIREPL\0` (8 bytes), `min_version`
//! u16, `max_version` u16, `token_len` u16 (≤ [`MAX_TOKEN`]), reserved u16, then
//! the token. Server → client: magic, chosen `version` u16, `status` u8
//! ([`HELLO_OK`], [`HELLO_BAD_VERSION`], [`HELLO_BAD_TOKEN`]), reserved u8.
//!
//! **Request** ([`REQUEST_LEN`] bytes): magic `HCIQ` u32, opcode u8, flags u8,
//! reserved u16, request id u64, offset u64, length u64 (bytes to read/zero),
//! payload length u32 (≤ [`MAX_PAYLOAD`]), CRC32C of the payload u32; then the
//! payload (write data, or a JSON [`Call`]).
//!
//! **Reply** ([`REPLY_LEN`] bytes): magic `HCIA` u32, status u8 (0 ok, 1 error),
//! reserved 3 bytes, request id u64, payload length u32, CRC32C u32; then the
//! payload (read data, JSON result, or a JSON [`WireError`]). Replies may come
//! in any order: requests are pipelined and matched by id.

use serde::{Deserialize, Serialize};

use hci_core::block::{Extent, ExtentKind};
use hci_core::volume::{SnapshotInfo, VolumeInfo};
use hci_core::{Error, Result};

/// Magic opening a hello in both directions.
pub const HELLO_MAGIC: [u8; 8] = *b"HCIREPL\0";
/// Protocol version spoken by this build.
pub const VERSION: u16 = 1;
/// Longest accepted auth token.
pub const MAX_TOKEN: usize = 1024;
/// Hello accepted.
pub const HELLO_OK: u8 = 0;
/// No common protocol version.
pub const HELLO_BAD_VERSION: u8 = 1;
/// Wrong auth token.
pub const HELLO_BAD_TOKEN: u8 = 2;
/// Length of the client hello before the token.
pub const HELLO_LEN: usize = 16;
/// Length of the server hello.
pub const HELLO_REPLY_LEN: usize = 12;

/// Request magic.
pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"HCIQ");
/// Reply magic.
pub const REPLY_MAGIC: u32 = u32::from_le_bytes(*b"HCIA");
/// Request header length.
pub const REQUEST_LEN: usize = 40;
/// Reply header length.
pub const REPLY_LEN: usize = 24;
/// Largest payload (and largest read) in one request; bounds memory per request.
pub const MAX_PAYLOAD: u32 = 4 << 20;
/// Write flag: force unit access.
pub const FLAG_FUA: u8 = 1;
/// Zero flag: keep the range allocated.
pub const FLAG_NO_HOLE: u8 = 2;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Keepalive; empty reply.
    Ping = 1,
    /// Read `length` bytes at `offset` from the bound device.
    Read = 2,
    /// Write the payload at `offset`.
    Write = 3,
    /// Flush the bound device.
    Flush = 4,
    /// Discard `length` bytes at `offset`.
    Discard = 5,
    /// Zero `length` bytes at `offset`.
    WriteZeroes = 6,
    /// Block status of `length` bytes at `offset`; JSON list of extents.
    BlockStatus = 7,
    /// A control call: JSON [`Call`] in, JSON result out.
    Call = 16,
}

impl Op {
    /// Decodes an opcode.
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Ping,
            2 => Op::Read,
            3 => Op::Write,
            4 => Op::Flush,
            5 => Op::Discard,
            6 => Op::WriteZeroes,
            7 => Op::BlockStatus,
            16 => Op::Call,
            _ => return None,
        })
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// The operation.
    pub op: Op,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Matches the reply to the request.
    pub id: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (reads, zeroes, block status).
    pub length: u64,
    /// Payload length that follows.
    pub payload_len: u32,
    /// CRC32C of the payload.
    pub crc: u32,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::invalid("replica protocol frame", reason)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl RequestHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        b[4] = self.op as u8;
        b[5] = self.flags;
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.length.to_le_bytes());
        b[32..36].copy_from_slice(&self.payload_len.to_le_bytes());
        b[36..40].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header (magic, opcode, payload bound).
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < REQUEST_LEN {
            return Err(bad("short request header"));
        }
        if u32_at(b, 0) != REQUEST_MAGIC {
            return Err(bad("bad request magic"));
        }
        let op = Op::from_u8(b[4]).ok_or_else(|| bad(format!("unknown opcode {}", b[4])))?;
        let h = RequestHeader {
            op,
            flags: b[5],
            id: u64_at(b, 8),
            offset: u64_at(b, 16),
            length: u64_at(b, 24),
            payload_len: u32_at(b, 32),
            crc: u32_at(b, 36),
        };
        if h.payload_len > MAX_PAYLOAD + 4096 {
            return Err(bad(format!(
                "payload of {} bytes is too large",
                h.payload_len
            )));
        }
        if h.op == Op::Read && h.length > u64::from(MAX_PAYLOAD) {
            return Err(bad(format!("read of {} bytes is too large", h.length)));
        }
        Ok(h)
    }
}

/// A decoded reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    /// True if the payload is a [`WireError`].
    pub error: bool,
    /// The request this answers.
    pub id: u64,
    /// Payload length that follows.
    pub payload_len: u32,
    /// CRC32C of the payload.
    pub crc: u32,
}

impl ReplyHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[0..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
        b[4] = u8::from(self.error);
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..20].copy_from_slice(&self.payload_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < REPLY_LEN {
            return Err(bad("short reply header"));
        }
        if u32_at(b, 0) != REPLY_MAGIC {
            return Err(bad("bad reply magic"));
        }
        if b[4] > 1 {
            return Err(bad(format!("bad reply status {}", b[4])));
        }
        let h = ReplyHeader {
            error: b[4] == 1,
            id: u64_at(b, 8),
            payload_len: u32_at(b, 16),
            crc: u32_at(b, 20),
        };
        if h.payload_len > MAX_PAYLOAD + 4096 {
            return Err(bad(format!(
                "reply payload of {} bytes is too large",
                h.payload_len
            )));
        }
        Ok(h)
    }
}

/// Builds a whole reply frame (header and payload in one buffer, for one write).
pub fn reply_frame(id: u64, error: bool, payload: &[u8]) -> Vec<u8> {
    let h = ReplyHeader {
        error,
        id,
        payload_len: payload.len() as u32,
        crc: crc32c::crc32c(payload),
    };
    let mut v = Vec::with_capacity(REPLY_LEN + payload.len());
    v.extend_from_slice(&h.encode());
    v.extend_from_slice(payload);
    v
}

/// Reads exactly `n` bytes of a frame's payload into `buf` (cleared first)
/// without zero-filling it beforehand: the bytes land in `buf`'s spare
/// capacity straight from the reader (a megabyte write would otherwise be
/// written twice, once as zeroes).
pub async fn read_payload<R>(rd: &mut R, buf: &mut Vec<u8>, n: usize) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    buf.clear();
    buf.reserve(n);
    while buf.len() < n {
        let want = (n - buf.len()) as u64;
        if (&mut *rd).take(want).read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Checks a payload against its CRC32C.
pub fn check_crc(payload: &[u8], crc: u32) -> Result<()> {
    if crc32c::crc32c(payload) != crc {
        return Err(Error::Corrupt {
            what: "replica protocol payload".into(),
            source: None,
        });
    }
    Ok(())
}

/// Encodes a client hello.
pub fn encode_hello(token: &[u8]) -> Result<Vec<u8>> {
    if token.len() > MAX_TOKEN {
        return Err(Error::invalid("auth token", "longer than 1024 bytes"));
    }
    let mut v = Vec::with_capacity(HELLO_LEN + token.len());
    v.extend_from_slice(&HELLO_MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&(token.len() as u16).to_le_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(token);
    Ok(v)
}

/// A decoded client hello (before its token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Oldest version the client speaks.
    pub min_version: u16,
    /// Newest version the client speaks.
    pub max_version: u16,
    /// Length of the token that follows.
    pub token_len: usize,
}

/// Decodes the fixed part of a client hello.
pub fn decode_hello(b: &[u8]) -> Result<Hello> {
    if b.len() < HELLO_LEN || b[0..8] != HELLO_MAGIC {
        return Err(bad("bad hello"));
    }
    let h = Hello {
        min_version: u16::from_le_bytes([b[8], b[9]]),
        max_version: u16::from_le_bytes([b[10], b[11]]),
        token_len: usize::from(u16::from_le_bytes([b[12], b[13]])),
    };
    if h.token_len > MAX_TOKEN {
        return Err(bad("token too long"));
    }
    if h.min_version > h.max_version {
        return Err(bad("empty version range"));
    }
    Ok(h)
}

/// Encodes the server's hello reply.
pub fn encode_hello_reply(version: u16, status: u8) -> [u8; HELLO_REPLY_LEN] {
    let mut b = [0u8; HELLO_REPLY_LEN];
    b[0..8].copy_from_slice(&HELLO_MAGIC);
    b[8..10].copy_from_slice(&version.to_le_bytes());
    b[10] = status;
    b
}

/// Decodes the server's hello reply into (version, status).
pub fn decode_hello_reply(b: &[u8]) -> Result<(u16, u8)> {
    if b.len() < HELLO_REPLY_LEN || b[0..8] != HELLO_MAGIC {
        return Err(bad("bad hello reply"));
    }
    Ok((u16::from_le_bytes([b[8], b[9]]), b[10]))
}

/// Constant-time comparison of auth tokens.
pub fn token_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A control call (payload of [`Op::Call`], JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    /// Create a volume.
    Create {
        /// Volume.
        volume: String,
        /// Size in bytes.
        size: u64,
        /// Encryption key, if any.
        key: Option<Vec<u8>>,
    },
    /// Bind this connection to the head of a volume for engine `generation`.
    Open {
        /// Volume.
        volume: String,
        /// Engine generation (fencing).
        generation: u64,
        /// Read-only handle.
        read_only: bool,
        /// Encryption key, if any.
        key: Option<Vec<u8>>,
    },
    /// Bind this connection to a snapshot (read-only).
    OpenSnapshot {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
        /// Encryption key, if any.
        key: Option<Vec<u8>>,
    },
    /// Volume info.
    Info {
        /// Volume.
        volume: String,
    },
    /// List volumes.
    List,
    /// Delete a volume.
    Delete {
        /// Volume.
        volume: String,
    },
    /// Take a snapshot.
    Snapshot {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
    },
    /// List snapshots.
    ListSnapshots {
        /// Volume.
        volume: String,
    },
    /// Delete a snapshot.
    DeleteSnapshot {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
    },
    /// Revert the head to a snapshot.
    Revert {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
    },
    /// Clone a snapshot into a new volume.
    Clone {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
        /// New volume.
        new_name: String,
    },
    /// Grow a volume.
    Expand {
        /// Volume.
        volume: String,
        /// New size.
        size: u64,
    },
    /// Changed 4 KiB blocks between snapshots.
    ChangedBlocks {
        /// Volume.
        volume: String,
        /// Older snapshot (None = since creation).
        from: Option<String>,
        /// Newer snapshot.
        to: String,
    },
    /// Fence state of a volume.
    FenceState {
        /// Volume.
        volume: String,
    },
    /// Record an engine generation.
    Fence {
        /// Volume.
        volume: String,
        /// Engine generation.
        generation: u64,
    },
    /// Set the membership epoch.
    SetEpoch {
        /// Volume.
        volume: String,
        /// Engine generation.
        generation: u64,
        /// New epoch.
        epoch: u64,
    },
    /// Record a clean shutdown of engine `generation`.
    MarkClean {
        /// Volume.
        volume: String,
        /// Engine generation.
        generation: u64,
    },
    /// The volume's dirty-region log (`null` if it has none).
    DirtyRegions {
        /// Volume.
        volume: String,
    },
    /// Change the volume's dirty-region log for engine `generation`.
    UpdateDirty {
        /// Volume.
        volume: String,
        /// Engine generation.
        generation: u64,
        /// The change.
        update: super::DirtyUpdate,
    },
}

/// [`VolumeInfo`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireVolumeInfo {
    /// Name.
    pub name: String,
    /// Size.
    pub size: u64,
    /// Allocated bytes.
    pub allocated: u64,
    /// Snapshot count.
    pub snapshots: usize,
    /// Encrypted.
    pub encrypted: bool,
    /// Metadata revision.
    pub revision: u64,
}

impl From<VolumeInfo> for WireVolumeInfo {
    fn from(i: VolumeInfo) -> Self {
        WireVolumeInfo {
            name: i.name,
            size: i.size,
            allocated: i.allocated,
            snapshots: i.snapshots,
            encrypted: i.encrypted,
            revision: i.revision,
        }
    }
}

impl From<WireVolumeInfo> for VolumeInfo {
    fn from(i: WireVolumeInfo) -> Self {
        VolumeInfo {
            name: i.name,
            size: i.size,
            allocated: i.allocated,
            snapshots: i.snapshots,
            encrypted: i.encrypted,
            revision: i.revision,
        }
    }
}

/// [`SnapshotInfo`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireSnapshotInfo {
    /// Name.
    pub name: String,
    /// Creation time.
    pub created: chrono::DateTime<chrono::Utc>,
    /// Size.
    pub size: u64,
    /// Allocated bytes.
    pub allocated: u64,
}

impl From<SnapshotInfo> for WireSnapshotInfo {
    fn from(i: SnapshotInfo) -> Self {
        WireSnapshotInfo {
            name: i.name,
            created: i.created,
            size: i.size,
            allocated: i.allocated,
        }
    }
}

impl From<WireSnapshotInfo> for SnapshotInfo {
    fn from(i: WireSnapshotInfo) -> Self {
        SnapshotInfo {
            name: i.name,
            created: i.created,
            size: i.size,
            allocated: i.allocated,
        }
    }
}

/// An extent on the wire: (offset, len, kind 0 data / 1 zero / 2 hole).
pub type WireExtent = (u64, u64, u8);

/// Encodes extents.
pub fn encode_extents(e: &[Extent]) -> Vec<WireExtent> {
    e.iter()
        .map(|e| {
            let k = match e.kind {
                ExtentKind::Data => 0,
                ExtentKind::Zero => 1,
                ExtentKind::Hole => 2,
            };
            (e.offset, e.len, k)
        })
        .collect()
}

/// Decodes extents.
pub fn decode_extents(v: Vec<WireExtent>) -> Result<Vec<Extent>> {
    v.into_iter()
        .map(|(offset, len, k)| {
            let kind = match k {
                0 => ExtentKind::Data,
                1 => ExtentKind::Zero,
                2 => ExtentKind::Hole,
                _ => return Err(bad(format!("unknown extent kind {k}"))),
            };
            Ok(Extent { offset, len, kind })
        })
        .collect()
}

/// An [`Error`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum WireError {
    /// [`Error::NotFound`].
    NotFound {
        /// Kind.
        kind: String,
        /// Name.
        name: String,
    },
    /// [`Error::AlreadyExists`].
    AlreadyExists {
        /// Kind.
        kind: String,
        /// Name.
        name: String,
    },
    /// [`Error::Invalid`].
    Invalid {
        /// What.
        what: String,
        /// Why.
        reason: String,
    },
    /// [`Error::OutOfRange`].
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Size.
        size: u64,
    },
    /// [`Error::ReadOnly`].
    ReadOnly {
        /// What.
        what: String,
    },
    /// [`Error::Unsupported`].
    Unsupported {
        /// Operation.
        operation: String,
        /// Backend.
        backend: String,
    },
    /// [`Error::Busy`].
    Busy {
        /// Kind.
        kind: String,
        /// Name.
        name: String,
        /// Why.
        reason: String,
    },
    /// [`Error::Fenced`].
    Fenced {
        /// What.
        what: String,
        /// Caller's generation.
        ours: u64,
        /// Newest seen.
        current: u64,
    },
    /// [`Error::Corrupt`].
    Corrupt {
        /// What.
        what: String,
    },
    /// Anything else.
    Other {
        /// The error's message.
        message: String,
    },
}

fn static_kind(k: &str) -> &'static str {
    match k {
        "volume" => "volume",
        "snapshot" => "snapshot",
        "image" => "image",
        _ => "resource",
    }
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        match e {
            Error::NotFound { kind, name } => WireError::NotFound {
                kind: (*kind).into(),
                name: name.clone(),
            },
            Error::AlreadyExists { kind, name } => WireError::AlreadyExists {
                kind: (*kind).into(),
                name: name.clone(),
            },
            Error::Invalid { what, reason } => WireError::Invalid {
                what: what.clone(),
                reason: reason.clone(),
            },
            Error::OutOfRange { offset, len, size } => WireError::OutOfRange {
                offset: *offset,
                len: *len,
                size: *size,
            },
            Error::ReadOnly { what } => WireError::ReadOnly { what: what.clone() },
            Error::Unsupported { operation, backend } => WireError::Unsupported {
                operation: operation.clone(),
                backend: backend.clone(),
            },
            Error::Busy { kind, name, reason } => WireError::Busy {
                kind: (*kind).into(),
                name: name.clone(),
                reason: reason.clone(),
            },
            Error::Fenced {
                what,
                ours,
                current,
            } => WireError::Fenced {
                what: what.clone(),
                ours: *ours,
                current: *current,
            },
            Error::Corrupt { what, .. } => WireError::Corrupt { what: what.clone() },
            other => WireError::Other {
                message: error_chain(other),
            },
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::NotFound { kind, name } => Error::not_found(static_kind(&kind), name),
            WireError::AlreadyExists { kind, name } => {
                Error::already_exists(static_kind(&kind), name)
            }
            WireError::Invalid { what, reason } => Error::Invalid { what, reason },
            WireError::OutOfRange { offset, len, size } => Error::OutOfRange { offset, len, size },
            WireError::ReadOnly { what } => Error::ReadOnly { what },
            WireError::Unsupported { operation, backend } => {
                Error::Unsupported { operation, backend }
            }
            WireError::Busy { kind, name, reason } => Error::Busy {
                kind: static_kind(&kind),
                name,
                reason,
            },
            WireError::Fenced {
                what,
                ours,
                current,
            } => Error::Fenced {
                what,
                ours,
                current,
            },
            WireError::Corrupt { what } => Error::Corrupt { what, source: None },
            WireError::Other { message } => Error::Backend {
                backend: "replica server",
                message,
                source: None,
            },
        }
    }
}

/// Encodes a JSON payload.
pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising plain data structs cannot fail; fall back to `null` anyway.
    serde_json::to_vec(v).unwrap_or_else(|_| b"null".to_vec())
}

/// Decodes a JSON payload.
pub fn from_json<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| bad(format!("bad JSON payload: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trip() {
        let h = RequestHeader {
            op: Op::Write,
            flags: FLAG_FUA,
            id: 7,
            offset: 4096,
            length: 0,
            payload_len: 512,
            crc: 99,
        };
        assert_eq!(RequestHeader::decode(&h.encode()).ok(), Some(h));
    }

    #[test]
    fn reply_round_trip_and_crc() {
        let f = reply_frame(3, false, b"abc");
        let h = ReplyHeader::decode(&f).expect("decode");
        assert_eq!((h.id, h.error, h.payload_len), (3, false, 3));
        assert!(check_crc(&f[REPLY_LEN..], h.crc).is_ok());
        assert!(check_crc(b"abd", h.crc).is_err());
    }

    #[test]
    fn oversized_and_unknown_are_refused() {
        let mut h = RequestHeader {
            op: Op::Read,
            flags: 0,
            id: 1,
            offset: 0,
            length: u64::from(MAX_PAYLOAD) + 1,
            payload_len: 0,
            crc: 0,
        }
        .encode();
        assert!(RequestHeader::decode(&h).is_err());
        h[4] = 99;
        assert!(RequestHeader::decode(&h).is_err());
    }

    #[test]
    fn hello_round_trip() {
        let h = encode_hello(b"secret").expect("hello");
        let d = decode_hello(&h).expect("decode");
        assert_eq!(d.token_len, 6);
        assert_eq!(&h[HELLO_LEN..], b"secret");
        assert!(token_eq(b"secret", b"secret"));
        assert!(!token_eq(b"secret", b"secreT"));
        assert_eq!(
            decode_hello_reply(&encode_hello_reply(1, HELLO_OK)).ok(),
            Some((1, HELLO_OK))
        );
    }

    #[test]
    fn errors_survive_the_wire() {
        let e = Error::Fenced {
            what: "volume v".into(),
            ours: 1,
            current: 2,
        };
        let w: WireError = from_json(&to_json(&WireError::from(&e))).expect("json");
        assert!(matches!(
            Error::from(w),
            Error::Fenced {
                ours: 1,
                current: 2,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn read_payload_reads_exactly_n_bytes_and_reports_a_short_stream() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        // A reader that hands out 1,000 bytes at a time, like a socket.
        let mut rd = tokio::io::BufReader::with_capacity(1000, &data[..]);
        let mut buf = vec![0xAA; 3];
        read_payload(&mut rd, &mut buf, 6000).await.expect("read");
        assert_eq!(buf, &data[..6000]);
        read_payload(&mut rd, &mut buf, 0).await.expect("empty");
        assert!(buf.is_empty());
        let e = read_payload(&mut rd, &mut buf, 5000)
            .await
            .expect_err("only 4000 bytes left");
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = RequestHeader::decode(&b);
            let _ = ReplyHeader::decode(&b);
            let _ = decode_hello(&b);
            let _ = decode_hello_reply(&b);
            let _ = from_json::<Call>(&b);
            let _ = from_json::<WireError>(&b);
        }

        #[test]
        fn valid_headers_round_trip(id in any::<u64>(), off in any::<u64>(), len in 0u64..(4 << 20), pl in 0u32..(4 << 20), op in prop::sample::select(vec![Op::Ping, Op::Read, Op::Write, Op::Flush, Op::Discard, Op::WriteZeroes, Op::BlockStatus, Op::Call])) {
            let h = RequestHeader { op, flags: 0, id, offset: off, length: len, payload_len: pl, crc: 5 };
            prop_assert_eq!(RequestHeader::decode(&h.encode()).ok(), Some(h));
        }
    }
}
