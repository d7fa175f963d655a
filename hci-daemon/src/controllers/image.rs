//! The image controller: imports each `Image` (a local file, `file://`,
//! `http://` or `https://` URL; raw, qcow2 or anything qemu-img reads) into
//! the node's image pool once, with progress in its status and an optional
//! `sha256:` checksum check, so volumes can be cloned from it (only the
//! allocated blocks are copied).
//!
//! An imported image is a pool volume named after the image holding one
//! snapshot, [`BASE_SNAPSHOT`]; an import interrupted by a crash leaves no
//! such snapshot and is redone.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hci_core::model::{ByteSize, Image, ImagePhase};
use hci_core::volume::VolumeBackend;
use hci_core::{Error, Result};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{Reconcile, Runtime, join_err, set_status};

/// The snapshot holding an imported image's content.
pub const BASE_SNAPSHOT: &str = "hci.base";

pub(crate) struct ImageController {
    rt: Runtime,
    /// Imports that failed: spec (JSON) → when to try again and how many
    /// times it failed. Without this, the controller's own status write
    /// (phase Failed) would wake it to import again at once, forever.
    failed: std::sync::Mutex<HashMap<String, (String, Instant, u32)>>,
}

/// First wait before retrying a failed import; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(5);
/// Longest wait between import attempts.
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Where an image comes from.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    File(PathBuf),
    Http(String),
}

fn source(url: &str) -> Result<Source> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(Source::Http(url.to_string()));
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    if Path::new(path).is_absolute() {
        Ok(Source::File(path.into()))
    } else {
        Err(Error::invalid(
            "spec.url",
            format!("{url:?} is neither an http(s) URL nor an absolute file path"),
        ))
    }
}

/// Downloads `url` to `dest`, reporting progress in percent (when the
/// server says how long the body is).
fn download(url: &str, dest: &Path, progress: &mpsc::UnboundedSender<u8>) -> Result<()> {
    let fail = |why: String| Error::Unavailable {
        what: format!("{url} ({why})"),
        source: None,
    };
    let response = ureq::get(url).call().map_err(|e| fail(e.to_string()))?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = response.into_body().into_reader();
    let mut file = std::fs::File::create(dest)
        .map_err(|e| Error::io(format!("create {}", dest.display()), e))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut done, mut last) = (0u64, 0u8);
    loop {
        let n = body.read(&mut buf).map_err(|e| fail(e.to_string()))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])
            .map_err(|e| Error::io(format!("write {}", dest.display()), e))?;
        done += n as u64;
        if let Some(total) = total.filter(|t| *t > 0) {
            let pct = (done.saturating_mul(100) / total).min(99) as u8;
            if pct >= last.saturating_add(5) {
                last = pct;
                let _ = progress.send(pct);
            }
        }
    }
    if let Some(total) = total
        && total != done
    {
        return Err(fail(format!(
            "the body ended after {done} of {total} bytes"
        )));
    }
    file.sync_all()
        .map_err(|e| Error::io(format!("sync {}", dest.display()), e))
}

/// Checks `file` against `expected` (`sha256:<hex>`).
fn verify(file: &Path, expected: &str) -> Result<()> {
    let Some(want) = expected.strip_prefix("sha256:") else {
        return Err(Error::invalid(
            "spec.checksum",
            format!("{expected:?}: only sha256:<hex> is supported"),
        ));
    };
    let mut f =
        std::fs::File::open(file).map_err(|e| Error::io(format!("open {}", file.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(format!("read {}", file.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got.eq_ignore_ascii_case(want) {
        Ok(())
    } else {
        Err(Error::invalid(
            "spec.checksum",
            format!("mismatch: expected sha256:{want}, the image has sha256:{got}"),
        ))
    }
}

impl ImageController {
    pub(crate) fn new(rt: Runtime) -> Self {
        ImageController {
            rt,
            failed: std::sync::Mutex::default(),
        }
    }

    fn failed_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant, u32)>> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn progress(
        &self,
        name: &str,
        phase: ImagePhase,
        pct: u8,
        message: String,
    ) -> Result<()> {
        set_status(&self.rt.resources, name, |i: &mut Image| {
            let st = i.status_mut();
            st.phase = phase;
            st.progress = pct;
            st.message = message.clone();
        })
        .await
    }

    /// Fetches, verifies and imports the image; returns its size.
    async fn import(&self, img: &Image) -> Result<u64> {
        let name = img.metadata.name.clone();
        let downloads = self.rt.images.root().join(".downloads");
        tokio::fs::create_dir_all(&downloads)
            .await
            .map_err(|e| Error::io(format!("create {}", downloads.display()), e))?;
        let (file, temporary) = match source(&img.spec.url)? {
            Source::File(path) => (path, false),
            Source::Http(url) => {
                let dest = downloads.join(format!("{name}.part"));
                let (tx, mut rx) = mpsc::unbounded_channel();
                let d = dest.clone();
                let fetch = tokio::task::spawn_blocking(move || download(&url, &d, &tx));
                while let Some(pct) = rx.recv().await {
                    self.progress(&name, ImagePhase::Importing, pct, String::new())
                        .await?;
                }
                fetch.await.map_err(join_err("image"))??;
                (dest, true)
            }
        };
        let dir = self.rt.images.root().join(&name);
        let checksum = img.spec.checksum.clone();
        let src = file.clone();
        let imported = tokio::task::spawn_blocking(move || {
            if let Some(sum) = &checksum {
                verify(&src, sum)?;
            }
            hci_storage::local::import_image(&src, &dir, None).map(|r| r.size())
        })
        .await
        .map_err(join_err("image"))?;
        if temporary {
            let _ = tokio::fs::remove_file(&file).await;
        }
        let size = imported?;
        self.rt.images.snapshot(&name, BASE_SNAPSHOT).await?;
        Ok(size)
    }
}

#[async_trait]
impl Reconcile for ImageController {
    type Kind = Image;

    async fn reconcile(&self, name: &str, current: Option<Image>) -> Result<Option<Duration>> {
        let pool = &self.rt.images;
        let Some(img) = current else {
            return match pool.delete(name).await {
                Ok(()) | Err(Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            };
        };
        match pool.list_snapshots(name).await {
            Ok(snaps) if snaps.iter().any(|s| s.name == BASE_SNAPSHOT) => {
                let size = pool.info(name).await?.size;
                set_status(&self.rt.resources, name, |i: &mut Image| {
                    let st = i.status_mut();
                    st.phase = ImagePhase::Ready;
                    st.progress = 100;
                    st.size = Some(ByteSize(size));
                    st.message.clear();
                })
                .await?;
                return Ok(None);
            }
            // An import cut short: start over.
            Ok(_) => pool.delete(name).await?,
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let spec = serde_json::to_string(&img.spec).unwrap_or_default();
        if let Some((failed_spec, retry_at, _)) = self.failed_lock().get(name)
            && *failed_spec == spec
        {
            let now = Instant::now();
            if *retry_at > now {
                return Ok(Some(*retry_at - now));
            }
        }
        self.progress(name, ImagePhase::Importing, 0, String::new())
            .await?;
        match self.import(&img).await {
            Ok(size) => {
                tracing::info!(image = name, size, "image imported");
                self.rt
                    .events
                    .normal("Image", name, "Imported", format!("{size} bytes"))
                    .await;
                self.failed_lock().remove(name);
                // The next pass reports it Ready.
                Ok(Some(Duration::ZERO))
            }
            Err(e) => {
                if pool.info(name).await.is_ok() {
                    let _ = pool.delete(name).await;
                }
                let wait = {
                    let mut failed = self.failed_lock();
                    let tries = match failed.get(name) {
                        Some((s, _, n)) if *s == spec => n + 1,
                        _ => 1,
                    };
                    let wait = (RETRY_MIN * (1u32 << (tries - 1).min(10))).min(RETRY_MAX);
                    failed.insert(name.to_string(), (spec, Instant::now() + wait, tries));
                    wait
                };
                self.rt
                    .events
                    .warning(
                        "Image",
                        name,
                        "ImportFailed",
                        format!("{e} (trying again in {}s)", wait.as_secs()),
                    )
                    .await;
                self.progress(name, ImagePhase::Failed, 0, e.to_string())
                    .await?;
                Err(e)
            }
        }
    }

    async fn sweep(&self, existing: &BTreeSet<String>) -> Result<()> {
        for info in self.rt.images.list().await? {
            if !existing.contains(&info.name) {
                tracing::info!(
                    image = info.name,
                    "removing an image whose resource is gone"
                );
                if let Err(e) = self.rt.images.delete(&info.name).await {
                    tracing::warn!(image = info.name, error = %e, "cannot remove an orphaned image");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_files_or_http() {
        assert_eq!(
            source("file:///srv/debian.qcow2").expect("file url"),
            Source::File("/srv/debian.qcow2".into())
        );
        assert_eq!(
            source("/srv/a.raw").expect("path"),
            Source::File("/srv/a.raw".into())
        );
        assert!(matches!(
            source("https://example.org/x.img"),
            Ok(Source::Http(_))
        ));
        assert!(source("relative/path.img").is_err());
        assert!(source("ftp://example.org/x").is_err());
    }

    #[test]
    fn checksums_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("x");
        std::fs::write(&f, b"abc").expect("write");
        let abc = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify(&f, abc).expect("right sum");
        let err = verify(&f, &abc.replace("ba78", "0000")).expect_err("wrong sum");
        assert!(err.to_string().contains("mismatch"), "{err}");
        assert!(verify(&f, "md5:123").is_err());
    }
}
