//! [`BackupTarget`]s on the `object_store` crate: a local filesystem (or NFS
//! mount) and S3-compatible object storage.
//!
//! Both write create-only ([`PutMode::Create`]): a second writer of a key gets
//! [`Error::AlreadyExists`] and the stored object is untouched.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use hci_core::backup::{BackupTarget, ObjectMeta};
use hci_core::{Error, Result};

/// Checks a target key: relative, `/`-separated, no empty, `.` or `..`
/// segments, no control characters.
pub fn check_key(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        "must not be empty"
    } else if key.starts_with('/') {
        "must be relative"
    } else if key.chars().any(|c| c.is_control()) {
        "must not contain control characters"
    } else if key.contains('#') || key.contains('\\') {
        "must not contain '#' or '\\'"
    } else if key
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        "must not contain empty, '.' or '..' segments"
    } else {
        return Ok(());
    };
    Err(Error::invalid(format!("object key {key:?}"), reason))
}

/// Checks a list prefix: like a key, but may be empty or end with `/`.
fn check_prefix(prefix: &str) -> Result<()> {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        if prefix.is_empty() {
            return Ok(());
        }
        return Err(Error::invalid(
            format!("list prefix {prefix:?}"),
            "must be relative",
        ));
    }
    check_key(trimmed)
}

/// A [`BackupTarget`] over any [`ObjectStore`], under an optional key prefix.
#[derive(Clone)]
pub struct ObjectStoreTarget {
    store: Arc<dyn ObjectStore>,
    /// Key prefix inside the store, empty or ending in `/`.
    root: String,
    name: String,
}

impl fmt::Debug for ObjectStoreTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreTarget")
            .field("name", &self.name)
            .field("root", &self.root)
            .finish()
    }
}

/// A target on a local directory (also an NFS mount).
pub type FsTarget = ObjectStoreTarget;
/// A target on an S3-compatible bucket.
pub type S3Target = ObjectStoreTarget;

/// Settings of an S3-compatible target.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (may be empty).
    pub prefix: String,
    /// Endpoint URL, e.g. `http://127.0.0.1:9000` (None = AWS).
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`).
    pub region: Option<String>,
    /// Access key id (default: `AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// Secret key (default: `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<String>,
    /// Use virtual-hosted-style requests instead of path-style.
    pub virtual_hosted: bool,
}

impl ObjectStoreTarget {
    /// A target over `store`, with keys under `prefix`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, name: impl Into<String>) -> Result<Self> {
        let p = prefix.trim_matches('/');
        let root = if p.is_empty() {
            String::new()
        } else {
            check_key(p)?;
            format!("{p}/")
        };
        Ok(ObjectStoreTarget {
            store,
            root,
            name: name.into(),
        })
    }

    /// A filesystem target rooted at `dir` (created if missing).
    pub fn filesystem(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create backup directory {}", dir.display()), e))?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| map_err(e, &dir.display().to_string()))?
            .with_automatic_cleanup(true);
        Self::new(Arc::new(store), "", format!("file://{}", dir.display()))
    }

    /// An S3-compatible target.
    pub fn s3(config: &S3Config) -> Result<Self> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(config.region.as_deref().unwrap_or("us-east-1"))
            .with_virtual_hosted_style_request(config.virtual_hosted);
        if let Some(e) = &config.endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if let Some(k) = &config.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &config.secret_access_key {
            b = b.with_secret_access_key(k);
        }
        let store = b.build().map_err(|e| Error::Invalid {
            what: format!("S3 target s3://{}", config.bucket),
            reason: e.to_string(),
        })?;
        Self::new(
            Arc::new(store),
            &config.prefix,
            format!("s3://{}/{}", config.bucket, config.prefix),
        )
    }

    fn path(&self, key: &str) -> Result<ObjPath> {
        check_key(key)?;
        ObjPath::parse(format!("{}{key}", self.root))
            .map_err(|e| Error::invalid(format!("object key {key:?}"), e.to_string()))
    }
}

/// Maps an `object_store` error on `key` to an hci error.
fn map_err(e: object_store::Error, key: &str) -> Error {
    match e {
        object_store::Error::NotFound { .. } => Error::not_found("object", key),
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            Error::already_exists("object", key)
        }
        object_store::Error::InvalidPath { source } => {
            Error::invalid(format!("object key {key:?}"), source.to_string())
        }
        object_store::Error::NotSupported { source } => Error::Unsupported {
            operation: format!("operation on {key:?}: {source}"),
            backend: "object store".into(),
        },
        other => Error::Unavailable {
            what: format!("object {key:?}"),
            source: Some(Box::new(other)),
        },
    }
}

#[async_trait]
impl BackupTarget for ObjectStoreTarget {
    async fn put_new(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.store
            .put_opts(&path, PutPayload::from(data), opts)
            .await
            .map_err(|e| map_err(e, key))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        let r = self.store.get(&path).await.map_err(|e| map_err(e, key))?;
        r.bytes().await.map_err(|e| map_err(e, key))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path(key)?;
        if range.end < range.start {
            return Err(Error::invalid(
                format!("range of {key:?}"),
                "end before start",
            ));
        }
        if range.start == range.end {
            let meta = self.head(key).await?;
            if range.start > meta.size {
                return Err(Error::OutOfRange {
                    offset: range.start,
                    len: 0,
                    size: meta.size,
                });
            }
            return Ok(Bytes::new());
        }
        let want = range.end - range.start;
        let got = self
            .store
            .get_range(&path, range.clone())
            .await
            .map_err(|e| match map_err(e, key) {
                Error::Unavailable { .. } | Error::Invalid { .. } => Error::OutOfRange {
                    offset: range.start,
                    len: want,
                    size: 0,
                },
                e => e,
            })?;
        if got.len() as u64 != want {
            return Err(Error::OutOfRange {
                offset: range.start,
                len: want,
                size: range.start + got.len() as u64,
            });
        }
        Ok(got)
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let path = self.path(key)?;
        let m = self.store.head(&path).await.map_err(|e| map_err(e, key))?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size: m.size,
        })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        check_prefix(prefix)?;
        // object_store lists by directory: list the prefix's directory and filter.
        let dir = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let full_dir = format!("{}{dir}", self.root);
        let full_dir = full_dir.trim_end_matches('/');
        let p =
            if full_dir.is_empty() {
                None
            } else {
                Some(ObjPath::parse(full_dir).map_err(|e| {
                    Error::invalid(format!("list prefix {prefix:?}"), e.to_string())
                })?)
            };
        let items: Vec<object_store::ObjectMeta> = self
            .store
            .list(p.as_ref())
            .try_collect()
            .await
            .map_err(|e| map_err(e, prefix))?;
        let mut out: Vec<ObjectMeta> = items
            .into_iter()
            .filter_map(|m| {
                let full = m.location.as_ref();
                let rel = full.strip_prefix(self.root.as_str())?;
                rel.starts_with(prefix).then(|| ObjectMeta {
                    key: rel.to_string(),
                    size: m.size,
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        // S3 deletes are idempotent: check presence first so absence is NotFound.
        self.store.head(&path).await.map_err(|e| map_err(e, key))?;
        self.store.delete(&path).await.map_err(|e| map_err(e, key))
    }
}

/// Opens a target from a URL: `file:///path` or
/// `s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1`
/// (credentials from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`;
/// `virtual_hosted=true` for virtual-hosted-style requests).
pub fn open_target(url: &str) -> Result<ObjectStoreTarget> {
    let bad = |reason: String| Error::invalid(format!("target URL {url:?}"), reason);
    let u = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    match u.scheme() {
        "file" => {
            let path: PathBuf = u
                .to_file_path()
                .map_err(|()| bad("not an absolute file path".into()))?;
            ObjectStoreTarget::filesystem(path)
        }
        "s3" => {
            let bucket = u
                .host_str()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| bad("missing bucket".into()))?
                .to_string();
            let mut cfg = S3Config {
                bucket,
                prefix: u.path().trim_matches('/').to_string(),
                ..Default::default()
            };
            for (k, v) in u.query_pairs() {
                match &*k {
                    "endpoint" => cfg.endpoint = Some(v.into_owned()),
                    "region" => cfg.region = Some(v.into_owned()),
                    "virtual_hosted" => cfg.virtual_hosted = v == "true",
                    other => return Err(bad(format!("unknown parameter {other:?}"))),
                }
            }
            ObjectStoreTarget::s3(&cfg)
        }
        other => Err(bad(format!("unsupported scheme {other:?} (file or s3)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        for bad in ["", "/a", "../x", "a/../../b", "a//b", "nul\0", "a/./b"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "packs/ab/cdef", "conformance/x-1/dir/c"] {
            assert!(check_key(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn urls_parse() {
        assert!(open_target("ftp://x").is_err());
        assert!(open_target("s3:///nobucket").is_err());
        assert!(open_target("s3://b/p?bogus=1").is_err());
        assert!(open_target("s3://b/p/q?endpoint=http://127.0.0.1:1&region=eu-west-1").is_ok());
    }
}
