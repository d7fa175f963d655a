//! Byte layouts of the records the redb store keeps.
//!
//! Fixed-width integers are little-endian. A stored key value is
//! `create_revision | mod_revision | lease (0 = none) | value`; a change-log
//! entry (keyed by its revision) is `1 | create_revision | lease | key_len | key | value`
//! for a put and `2 | key` for a delete.

use hci_core::store::{KeyValue, LeaseId, WatchEvent};
use hci_core::{Error, Result};

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;
const KV_HEADER: usize = 24;

fn corrupt(what: &str) -> Error {
    Error::Corrupt {
        what: format!("state store {what}"),
        source: None,
    }
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let raw: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(raw))
}

fn read_i64(bytes: &[u8], at: usize) -> Option<i64> {
    let raw: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
    Some(i64::from_le_bytes(raw))
}

fn lease_from_raw(raw: i64) -> Option<LeaseId> {
    (raw != 0).then_some(raw)
}

/// Encodes a stored key's record (the key itself is the table key).
pub(crate) fn encode_kv(
    create_revision: u64,
    mod_revision: u64,
    lease: Option<LeaseId>,
    value: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(KV_HEADER + value.len());
    out.extend_from_slice(&create_revision.to_le_bytes());
    out.extend_from_slice(&mod_revision.to_le_bytes());
    out.extend_from_slice(&lease.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// Decodes a stored key's record.
pub(crate) fn decode_kv(key: &str, bytes: &[u8]) -> Result<KeyValue> {
    let (Some(create_revision), Some(mod_revision), Some(lease)) =
        (read_u64(bytes, 0), read_u64(bytes, 8), read_i64(bytes, 16))
    else {
        return Err(corrupt(&format!("record of key {key:?}")));
    };
    Ok(KeyValue {
        key: key.to_string(),
        value: bytes[KV_HEADER..].to_vec(),
        create_revision,
        mod_revision,
        lease: lease_from_raw(lease),
    })
}

/// Encodes a change-log entry (its revision is the table key).
pub(crate) fn encode_event(event: &WatchEvent) -> Vec<u8> {
    match event {
        WatchEvent::Put(kv) => {
            let mut out = Vec::with_capacity(1 + 20 + kv.key.len() + kv.value.len());
            out.push(TAG_PUT);
            out.extend_from_slice(&kv.create_revision.to_le_bytes());
            out.extend_from_slice(&kv.lease.unwrap_or(0).to_le_bytes());
            // Keys are bounded far below 4 GiB by the callers (resource names).
            let len = u32::try_from(kv.key.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(kv.key.as_bytes());
            out.extend_from_slice(&kv.value);
            out
        }
        WatchEvent::Delete { key, .. } => {
            let mut out = Vec::with_capacity(1 + key.len());
            out.push(TAG_DELETE);
            out.extend_from_slice(key.as_bytes());
            out
        }
    }
}

/// Decodes the change-log entry of `revision`.
pub(crate) fn decode_event(revision: u64, bytes: &[u8]) -> Result<WatchEvent> {
    let bad = || corrupt(&format!("change-log entry {revision}"));
    match bytes.first() {
        Some(&TAG_PUT) => {
            let create_revision = read_u64(bytes, 1).ok_or_else(bad)?;
            let lease = read_i64(bytes, 9).ok_or_else(bad)?;
            let raw: [u8; 4] = bytes
                .get(17..21)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(bad)?;
            let key_end = 21 + u32::from_le_bytes(raw) as usize;
            let key = bytes.get(21..key_end).ok_or_else(bad)?;
            let key = std::str::from_utf8(key).map_err(|_| bad())?;
            Ok(WatchEvent::Put(KeyValue {
                key: key.to_string(),
                value: bytes[key_end..].to_vec(),
                create_revision,
                mod_revision: revision,
                lease: lease_from_raw(lease),
            }))
        }
        Some(&TAG_DELETE) => {
            let key = std::str::from_utf8(&bytes[1..]).map_err(|_| bad())?;
            Ok(WatchEvent::Delete {
                key: key.to_string(),
                mod_revision: revision,
            })
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_round_trips() {
        let bytes = encode_kv(3, 7, Some(42), b"{\"a\":1}");
        let kv = decode_kv("/k", &bytes).expect("decode");
        assert_eq!(kv.create_revision, 3);
        assert_eq!(kv.mod_revision, 7);
        assert_eq!(kv.lease, Some(42));
        assert_eq!(kv.value, b"{\"a\":1}");
        let kv = decode_kv("/k", &encode_kv(1, 1, None, b"")).expect("decode");
        assert_eq!(kv.lease, None);
        assert!(decode_kv("/k", b"short").is_err());
    }

    #[test]
    fn events_round_trip() {
        let put = WatchEvent::Put(KeyValue {
            key: "/hci/v1/volumes/a".into(),
            value: b"value".to_vec(),
            create_revision: 5,
            mod_revision: 9,
            lease: None,
        });
        assert_eq!(decode_event(9, &encode_event(&put)).expect("put"), put);
        let del = WatchEvent::Delete {
            key: "/x".into(),
            mod_revision: 11,
        };
        assert_eq!(decode_event(11, &encode_event(&del)).expect("delete"), del);
        assert!(decode_event(1, &[9]).is_err());
        assert!(decode_event(1, &[TAG_PUT, 0]).is_err());
    }
}
