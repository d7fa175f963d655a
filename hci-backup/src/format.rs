//! On-target formats: sealed objects, pack indexes and backup manifests.
//!
//! Every metadata object (index, manifest) is `zstd(payload)` *sealed*: in a
//! plain repository followed by the BLAKE3 hash of the compressed bytes, in an
//! encrypted one as `nonce(12) ‖ AEAD(compressed)` with the repository's
//! [`Cipher`] (AES-256-GCM or ChaCha20-Poly1305; both have a 12-byte nonce and
//! a 16-byte tag). A piece stored in a
//! pack is sealed the same way, except that a plain piece carries no trailer
//! (its id, the hash of its content, already checks it).
//!
//! Parsers never panic: every length is bounds-checked and damage is an
//! [`Error::Corrupt`] naming the object.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng};
use chacha20poly1305::ChaCha20Poly1305;
use serde::{Deserialize, Serialize};

use hci_core::{Error, Result};

/// Length of a piece id (BLAKE3 output).
pub const ID_LEN: usize = 32;
/// A piece id: BLAKE3 of the plain content (keyed when encrypted).
pub type PieceId = [u8; ID_LEN];

const INDEX_MAGIC: &[u8; 8] = b"HCIBIDX1";
const MANIFEST_MAGIC: &[u8; 8] = b"HCIBMAN1";
/// Largest decompressed metadata object accepted (guards against zip bombs).
const MAX_META: usize = 1 << 30;

/// Builds a corruption error naming `what`.
pub fn corrupt(what: &str, why: impl Into<String>) -> Error {
    Error::Corrupt {
        what: what.to_string(),
        source: Some(why.into().into()),
    }
}

/// Lowercase hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The authenticated cipher of an encrypted repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cipher {
    /// AES-256-GCM (fastest with AES-NI).
    #[default]
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305 (fast without AES hardware, constant time everywhere).
    #[serde(rename = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

impl Cipher {
    /// The name used in the repository config and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes256Gcm => "aes-256-gcm",
            Cipher::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }
}

impl std::fmt::Display for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Cipher {
    type Err = Error;
    fn from_str(s: &str) -> Result<Cipher> {
        match s {
            "aes-256-gcm" => Ok(Cipher::Aes256Gcm),
            "chacha20-poly1305" => Ok(Cipher::ChaCha20Poly1305),
            _ => Err(Error::invalid(
                "cipher",
                format!("{s:?}: expected aes-256-gcm or chacha20-poly1305"),
            )),
        }
    }
}

#[derive(Clone)]
enum Aeads {
    Aes(Box<Aes256Gcm>),
    ChaCha(ChaCha20Poly1305),
}

/// Keys derived from the repository's master key.
#[derive(Clone)]
pub struct Keys {
    cipher: Aeads,
    id_key: [u8; 32],
    /// Key check value stored in the repository config.
    pub check: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(redacted)")
    }
}

impl Keys {
    /// Derives the AES-256-GCM encryption, piece-id and check keys from a
    /// 32-byte master key.
    pub fn derive(master: &[u8; 32]) -> Keys {
        Keys::derive_with(master, Cipher::Aes256Gcm)
    }

    /// Derives the keys for `cipher` from a 32-byte master key.
    pub fn derive_with(master: &[u8; 32], cipher: Cipher) -> Keys {
        let enc = blake3::derive_key("hci-backup 2026-11 data encryption", master);
        let id_key = blake3::derive_key("hci-backup 2026-11 piece id", master);
        let check = hex(&blake3::derive_key("hci-backup 2026-11 key check", master));
        let key = GenericArray::from_slice(&enc);
        let cipher = match cipher {
            Cipher::Aes256Gcm => Aeads::Aes(Box::new(Aes256Gcm::new(key))),
            Cipher::ChaCha20Poly1305 => Aeads::ChaCha(ChaCha20Poly1305::new(key)),
        };
        Keys {
            cipher,
            id_key,
            check,
        }
    }

    /// The cipher these keys use.
    pub fn cipher(&self) -> Cipher {
        match self.cipher {
            Aeads::Aes(_) => Cipher::Aes256Gcm,
            Aeads::ChaCha(_) => Cipher::ChaCha20Poly1305,
        }
    }
}

/// Id of a piece's plain content.
pub fn piece_id(keys: Option<&Keys>, data: &[u8]) -> PieceId {
    match keys {
        Some(k) => *blake3::keyed_hash(&k.id_key, data).as_bytes(),
        None => *blake3::hash(data).as_bytes(),
    }
}

/// Encrypts (or passes through) an already compressed piece.
pub fn seal_piece(keys: Option<&Keys>, compressed: Vec<u8>) -> Result<Vec<u8>> {
    match keys {
        None => Ok(compressed),
        Some(k) => encrypt(k, &compressed),
    }
}

fn encrypt(k: &Keys, data: &[u8]) -> Result<Vec<u8>> {
    let mut nonce = [0u8; 12];
    OsRng.fill_bytes(&mut nonce);
    let n = GenericArray::from_slice(&nonce);
    let ct = match &k.cipher {
        Aeads::Aes(c) => c.encrypt(n, data),
        Aeads::ChaCha(c) => c.encrypt(n, data),
    };
    let ct = ct.map_err(|_| Error::Backend {
        backend: "hci-backup",
        message: "encryption failed".into(),
        source: None,
    })?;
    let mut out = Vec::with_capacity(12 + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn decrypt(k: &Keys, data: &[u8], what: &str) -> Result<Vec<u8>> {
    if data.len() < 12 + 16 {
        return Err(corrupt(what, "too short for an encrypted object"));
    }
    let (nonce, ct) = data.split_at(12);
    let n = GenericArray::from_slice(nonce);
    match &k.cipher {
        Aeads::Aes(c) => c.decrypt(n, ct),
        Aeads::ChaCha(c) => c.decrypt(n, ct),
    }
    .map_err(|_| corrupt(what, "authentication failed (damaged, or wrong key)"))
}

fn decompress(data: &[u8], max: usize, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut dec =
        zstd::stream::read::Decoder::new(data).map_err(|e| corrupt(what, format!("zstd: {e}")))?;
    use std::io::Read;
    (&mut dec)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| corrupt(what, format!("zstd: {e}")))?;
    if out.len() > max {
        return Err(corrupt(what, "decompresses to more than allowed"));
    }
    Ok(out)
}

/// Compresses a piece or metadata object.
pub fn compress(data: &[u8]) -> Result<Vec<u8>> {
    zstd::bulk::compress(data, 1).map_err(|e| Error::io("compress with zstd", e))
}

/// Compresses a piece with a reused zstd context (level 1): the context is
/// allocated once per batch instead of once per piece.
pub fn compress_with(c: &mut zstd::bulk::Compressor<'static>, data: &[u8]) -> Result<Vec<u8>> {
    c.compress(data)
        .map_err(|e| Error::io("compress with zstd", e))
}

/// A zstd compression context for [`compress_with`].
pub fn compressor() -> Result<zstd::bulk::Compressor<'static>> {
    zstd::bulk::Compressor::new(1).map_err(|e| Error::io("create a zstd context", e))
}

/// A zstd decompression context for [`open_piece_with`].
pub fn decompressor() -> Result<zstd::bulk::Decompressor<'static>> {
    zstd::bulk::Decompressor::new().map_err(|e| Error::io("create a zstd context", e))
}

/// Opens a stored piece: decrypts, decompresses and checks it against `id`.
pub fn open_piece(
    keys: Option<&Keys>,
    id: &PieceId,
    stored: &[u8],
    raw_len: usize,
    what: &str,
) -> Result<Vec<u8>> {
    open_piece_with(None, keys, id, stored, raw_len, what)
}

/// [`open_piece`] with a reused decompression context (one per group of
/// pieces); the output can never exceed `raw_len`.
pub fn open_piece_with(
    dec: Option<&mut zstd::bulk::Decompressor<'static>>,
    keys: Option<&Keys>,
    id: &PieceId,
    stored: &[u8],
    raw_len: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let compressed;
    let c: &[u8] = match keys {
        None => stored,
        Some(k) => {
            compressed = decrypt(k, stored, what)?;
            &compressed
        }
    };
    let plain = match dec {
        Some(d) => d
            .decompress(c, raw_len)
            .map_err(|e| corrupt(what, format!("zstd: {e}")))?,
        None => decompress(c, raw_len, what)?,
    };
    if plain.len() != raw_len || piece_id(keys, &plain) != *id {
        return Err(corrupt(what, "content does not match its id"));
    }
    Ok(plain)
}

/// Seals a metadata object: compress, then checksum or encrypt.
pub fn seal_meta(keys: Option<&Keys>, payload: &[u8]) -> Result<Vec<u8>> {
    let c = compress(payload)?;
    match keys {
        None => {
            let mut out = c;
            let h = blake3::hash(&out);
            out.extend_from_slice(h.as_bytes());
            Ok(out)
        }
        Some(k) => encrypt(k, &c),
    }
}

/// Opens a sealed metadata object.
pub fn open_meta(keys: Option<&Keys>, stored: &[u8], what: &str) -> Result<Vec<u8>> {
    let c = match keys {
        None => {
            if stored.len() < 32 {
                return Err(corrupt(what, "too short"));
            }
            let (body, sum) = stored.split_at(stored.len() - 32);
            if blake3::hash(body).as_bytes() != sum {
                return Err(corrupt(what, "checksum mismatch"));
            }
            body.to_vec()
        }
        Some(k) => decrypt(k, stored, what)?,
    };
    decompress(&c, MAX_META, what)
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(corrupt(self.what, "truncated"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn id(&mut self) -> Result<PieceId> {
        let b = self.take(ID_LEN)?;
        let mut a = [0u8; ID_LEN];
        a.copy_from_slice(b);
        Ok(a)
    }
    /// A count of items of `item` bytes each that must fit in the rest.
    fn count(&mut self, item: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n.checked_mul(item).is_none_or(|b| b > self.buf.len()) {
            return Err(corrupt(self.what, "count exceeds the object"));
        }
        Ok(n)
    }
}

/// Where a piece lives inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Piece id.
    pub id: PieceId,
    /// Offset of the stored piece in the pack.
    pub offset: u64,
    /// Stored (compressed, maybe encrypted) length.
    pub stored_len: u32,
    /// Plain length.
    pub raw_len: u32,
}

const INDEX_ENTRY: usize = ID_LEN + 8 + 4 + 4;

/// Encodes a pack index.
pub fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + entries.len() * INDEX_ENTRY);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.id);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
    }
    out
}

/// Decodes a pack index.
pub fn decode_index(buf: &[u8], what: &str) -> Result<Vec<IndexEntry>> {
    let mut r = Reader { buf, what };
    if r.take(8)? != INDEX_MAGIC {
        return Err(corrupt(what, "not a pack index"));
    }
    let n = r.count(INDEX_ENTRY)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(IndexEntry {
            id: r.id()?,
            offset: r.u64()?,
            stored_len: r.u32()?,
            raw_len: r.u32()?,
        });
    }
    if !r.buf.is_empty() {
        return Err(corrupt(what, "trailing bytes"));
    }
    Ok(v)
}

/// Descriptive part of a manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestHeader {
    /// Backup id.
    pub id: String,
    /// Source volume.
    pub volume: String,
    /// Source snapshot.
    pub snapshot: String,
    /// Volume size.
    pub size: u64,
    /// Creation time (RFC 3339).
    pub created: chrono::DateTime<chrono::Utc>,
    /// Base backup.
    pub base: Option<String>,
    /// Bytes newly stored.
    pub added_bytes: u64,
    /// Opaque metadata.
    pub metadata: Vec<(String, String)>,
}

/// A run of volume bytes taken from a piece. Bytes no extent covers are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Volume offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
    /// Index into [`Manifest::pieces`].
    pub piece: u32,
    /// Offset inside the piece's plain content.
    pub piece_offset: u32,
}

/// A backup manifest: the volume layout as extents over pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Description.
    pub header: ManifestHeader,
    /// Pieces used, with their plain length.
    pub pieces: Vec<(PieceId, u32)>,
    /// Sorted, non-overlapping extents.
    pub extents: Vec<Extent>,
}

/// Encodes a manifest.
pub fn encode_manifest(m: &Manifest) -> Result<Vec<u8>> {
    let header = serde_json::to_vec(&m.header).map_err(|e| Error::Backend {
        backend: "hci-backup",
        message: "encode manifest header".into(),
        source: Some(Box::new(e)),
    })?;
    let mut out = Vec::new();
    out.extend_from_slice(MANIFEST_MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&(m.pieces.len() as u32).to_le_bytes());
    for (id, len) in &m.pieces {
        out.extend_from_slice(id);
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(&(m.extents.len() as u32).to_le_bytes());
    for e in &m.extents {
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.piece.to_le_bytes());
        out.extend_from_slice(&e.piece_offset.to_le_bytes());
    }
    Ok(out)
}

/// Decodes and validates a manifest (extents sorted, inside the volume and
/// inside their pieces).
pub fn decode_manifest(buf: &[u8], what: &str) -> Result<Manifest> {
    let mut r = Reader { buf, what };
    if r.take(8)? != MANIFEST_MAGIC {
        return Err(corrupt(what, "not a manifest"));
    }
    let hl = r.count(1)?;
    let header: ManifestHeader =
        serde_json::from_slice(r.take(hl)?).map_err(|e| corrupt(what, format!("header: {e}")))?;
    let np = r.count(ID_LEN + 4)?;
    let mut pieces = Vec::with_capacity(np);
    for _ in 0..np {
        pieces.push((r.id()?, r.u32()?));
    }
    let ne = r.count(20)?;
    let mut extents = Vec::with_capacity(ne);
    let mut end = 0u64;
    for _ in 0..ne {
        let e = Extent {
            offset: r.u64()?,
            len: r.u32()?,
            piece: r.u32()?,
            piece_offset: r.u32()?,
        };
        let plen = pieces
            .get(e.piece as usize)
            .map(|p| p.1)
            .ok_or_else(|| corrupt(what, "extent names a missing piece"))?;
        let e_end = e.offset.checked_add(u64::from(e.len));
        if e.len == 0
            || e.offset < end
            || e_end.is_none_or(|x| x > header.size)
            || u64::from(e.piece_offset) + u64::from(e.len) > u64::from(plen)
        {
            return Err(corrupt(what, "bad extent"));
        }
        end = e_end.unwrap_or(u64::MAX);
        extents.push(e);
    }
    if !r.buf.is_empty() {
        return Err(corrupt(what, "trailing bytes"));
    }
    Ok(Manifest {
        header,
        pieces,
        extents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        Manifest {
            header: ManifestHeader {
                id: "b1".into(),
                volume: "v".into(),
                snapshot: "s".into(),
                size: 1 << 20,
                created: chrono::Utc::now(),
                base: None,
                added_bytes: 3,
                metadata: vec![("k".into(), "v".into())],
            },
            pieces: vec![([7; 32], 8192)],
            extents: vec![
                Extent {
                    offset: 0,
                    len: 4096,
                    piece: 0,
                    piece_offset: 0,
                },
                Extent {
                    offset: 8192,
                    len: 4096,
                    piece: 0,
                    piece_offset: 4096,
                },
            ],
        }
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        let enc = encode_manifest(&m).expect("encode");
        assert_eq!(decode_manifest(&enc, "m").expect("decode"), m);
    }

    #[test]
    fn sealed_meta_detects_flips_and_wrong_keys() {
        let k1 = Keys::derive(&[1; 32]);
        let k2 = Keys::derive(&[2; 32]);
        for keys in [None, Some(&k1)] {
            let mut s = seal_meta(keys, b"hello").expect("seal");
            assert_eq!(open_meta(keys, &s, "x").expect("open"), b"hello");
            let n = s.len();
            s[n / 2] ^= 1;
            assert!(open_meta(keys, &s, "x").is_err());
        }
        let s = seal_meta(Some(&k1), b"hello").expect("seal");
        assert!(open_meta(Some(&k2), &s, "x").is_err());
        // Same master key, other cipher: refused too.
        let c1 = Keys::derive_with(&[1; 32], Cipher::ChaCha20Poly1305);
        assert!(open_meta(Some(&c1), &s, "x").is_err());
        let s = seal_meta(Some(&c1), b"hello").expect("seal");
        assert_eq!(open_meta(Some(&c1), &s, "x").expect("open"), b"hello");
        assert!(open_meta(Some(&k1), &s, "x").is_err());
    }

    proptest! {
        #[test]
        fn parsers_survive_garbage(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_manifest(&data, "m");
            let _ = decode_index(&data, "i");
            let _ = open_meta(None, &data, "x");
            let _ = open_meta(Some(&Keys::derive(&[3; 32])), &data, "x");
            let _ = open_piece(None, &[0; 32], &data, 4096, "p");
        }

        #[test]
        fn parsers_survive_mutated_manifests(pos in any::<usize>(), val in any::<u8>(), cut in any::<usize>()) {
            let mut enc = encode_manifest(&sample()).expect("encode");
            let n = enc.len();
            enc[pos % n] = val;
            let _ = decode_manifest(&enc, "m");
            enc.truncate(cut % n);
            let _ = decode_manifest(&enc, "m");
            let idx = encode_index(&[IndexEntry { id: [1; 32], offset: 5, stored_len: 9, raw_len: 10 }]);
            let _ = decode_index(&idx[..cut % idx.len()], "i");
        }
    }
}
