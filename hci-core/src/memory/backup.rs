//! An in-memory [`BackupTarget`].

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use crate::backup::{BackupTarget, ObjectMeta};
use crate::error::{Error, Result};

/// Objects held in memory: the reference [`BackupTarget`].
#[derive(Debug, Default)]
pub struct MemBackupTarget {
    objects: Mutex<BTreeMap<String, Bytes>>,
}

impl MemBackupTarget {
    /// An empty target.
    pub fn new() -> Self {
        Self::default()
    }

    fn objects(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Bytes>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Checks an object key: non-empty, relative, no empty, `.` or `..` segments.
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key.starts_with('/')
        || key.contains('\0')
        || key
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(Error::invalid(
            format!("object key {key:?}"),
            "must be a relative '/'-separated path without empty, '.' or '..' segments",
        ));
    }
    Ok(())
}

#[async_trait]
impl BackupTarget for MemBackupTarget {
    async fn put_new(&self, key: &str, data: Bytes) -> Result<()> {
        check_key(key)?;
        let mut o = self.objects();
        if o.contains_key(key) {
            return Err(Error::already_exists("object", key));
        }
        o.insert(key.to_string(), data);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        self.objects()
            .get(key)
            .cloned()
            .ok_or_else(|| Error::not_found("object", key))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let data = self.get(key).await?;
        let len = data.len() as u64;
        if range.start > range.end || range.end > len {
            return Err(Error::OutOfRange {
                offset: range.start,
                len: range.end.saturating_sub(range.start),
                size: len,
            });
        }
        Ok(data.slice(range.start as usize..range.end as usize))
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let o = self.objects();
        let data = o.get(key).ok_or_else(|| Error::not_found("object", key))?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size: data.len() as u64,
        })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        Ok(self
            .objects()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.objects()
            .remove(key)
            .map(|_| ())
            .ok_or_else(|| Error::not_found("object", key))
    }
}
