//! Online metadata operations on a volume another process owns.
//!
//! A replica directory is locked by the one process that has it open (a VMM
//! serving it to a guest, `hci-storage serve`). That process calls [`serve`]
//! to answer metadata requests on `<volume>/control.sock` — snapshot, list
//! and delete snapshots, clone a snapshot into a new volume, expand, info,
//! changed blocks — and [`LocalVolumeBackend`](super::LocalVolumeBackend)
//! in any other process sends them there ([`ControlClient`]) when it finds
//! the volume locked. So a daemon snapshots, expands or backs up a volume
//! while a guest in its own VMM process writes to it.
//!
//! Protocol: one JSON request per line, one JSON response per line, on a
//! Unix socket with mode 0600 (only the owner's user may connect). Data never
//! crosses it; I/O stays in the owning process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hci_core::block::ByteRange;
use hci_core::volume::{SnapshotInfo, VolumeInfo};
use hci_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::Replica;
use crate::replica::proto::{WireError, WireSnapshotInfo, WireVolumeInfo};

/// The socket's file name inside the volume directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Size, allocation, snapshot count.
    Info,
    /// Take a snapshot.
    Snapshot {
        /// Its name.
        name: String,
    },
    /// List snapshots.
    ListSnapshots,
    /// Delete a snapshot (online merge).
    DeleteSnapshot {
        /// Its name.
        name: String,
    },
    /// Clone a snapshot into a new volume directory.
    Clone {
        /// The snapshot.
        snapshot: String,
        /// The new volume's directory (must not exist).
        dest: PathBuf,
    },
    /// Grow the volume.
    Expand {
        /// New size, bytes.
        size: u64,
    },
    /// Blocks changed between two snapshots (or since the start).
    ChangedBlocks {
        /// The older snapshot (`None`: everything allocated up to `to`).
        from: Option<String>,
        /// The newer snapshot.
        to: String,
    },
}

/// A response.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    /// What failed, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
    /// Volume information (info, expand, clone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<WireVolumeInfo>,
    /// Snapshots (snapshot: the new one; list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<WireSnapshotInfo>,
    /// Changed ranges `(offset, len)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<(u64, u64)>,
}

/// Path of the control socket of the volume in `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

/// Serves metadata requests for `replica` (volume `name`, in directory `dir`)
/// on `dir/control.sock` until the returned task is aborted or the process
/// ends. Binds before returning (a stale socket is replaced).
pub fn serve(replica: Arc<Replica>, name: &str, dir: &Path) -> Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(dir);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(|e| Error::io(format!("bind {}", path.display()), e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    }
    let name = name.to_string();
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(connection(stream, Arc::clone(&replica), name.clone()));
        }
    }))
}

async fn connection(stream: UnixStream, replica: Arc<Replica>, name: String) {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let resp = match serde_json::from_str::<Request>(line.trim_end()) {
            Ok(req) => {
                let (replica, name) = (Arc::clone(&replica), name.clone());
                tokio::task::spawn_blocking(move || handle(&replica, &name, req))
                    .await
                    .unwrap_or_else(|e| {
                        Err(Error::io("run a control request", std::io::Error::other(e)))
                    })
                    .unwrap_or_else(|e| Response {
                        error: Some(WireError::from(&e)),
                        ..Response::default()
                    })
            }
            Err(e) => Response {
                error: Some(WireError::from(&Error::invalid(
                    "control request",
                    e.to_string(),
                ))),
                ..Response::default()
            },
        };
        let Ok(mut out) = serde_json::to_vec(&resp) else {
            return;
        };
        out.push(b'\n');
        if w.write_all(&out).await.is_err() {
            return;
        }
    }
}

fn handle(replica: &Arc<Replica>, name: &str, req: Request) -> Result<Response> {
    let mut resp = Response::default();
    match req {
        Request::Info => resp.info = Some(replica.info(name)?.into()),
        Request::Snapshot { name: snap } => {
            super::check_name("snapshot", &snap)?;
            resp.snapshots = vec![replica.snapshot(&snap)?.into()];
        }
        Request::ListSnapshots => {
            resp.snapshots = replica.snapshots().into_iter().map(Into::into).collect();
        }
        Request::DeleteSnapshot { name: snap } => replica.delete_snapshot(&snap)?,
        Request::Clone { snapshot, dest } => {
            let new_name = dest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| Error::invalid("clone destination", "has no directory name"))?;
            let clone = replica.clone_snapshot(&snapshot, &dest)?;
            resp.info = Some(clone.info(&new_name)?.into());
        }
        Request::Expand { size } => {
            replica.expand(size)?;
            resp.info = Some(replica.info(name)?.into());
        }
        Request::ChangedBlocks { from, to } => {
            resp.ranges = replica
                .changed_blocks(from.as_deref(), &to)?
                .into_iter()
                .map(|r| (r.offset, r.len))
                .collect();
        }
    }
    Ok(resp)
}

/// Sends metadata requests to the process that owns a volume.
#[derive(Debug, Clone)]
pub struct ControlClient {
    path: PathBuf,
}

impl ControlClient {
    /// A client for the volume in `dir` (nothing is connected yet).
    pub fn new(dir: &Path) -> Self {
        ControlClient {
            path: socket_path(dir),
        }
    }

    /// Whether the owner serves a control socket (it may still be stale).
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Sends `req` and waits for its answer.
    pub async fn call(&self, req: &Request) -> Result<Response> {
        let unavailable = |e: std::io::Error| Error::Unavailable {
            what: format!("the owner of the volume at {}: {e}", self.path.display()),
            source: None,
        };
        let stream = UnixStream::connect(&self.path).await.map_err(unavailable)?;
        let (r, mut w) = stream.into_split();
        let mut out = serde_json::to_vec(req)
            .map_err(|e| Error::invalid("control request", e.to_string()))?;
        out.push(b'\n');
        w.write_all(&out).await.map_err(unavailable)?;
        let mut line = String::new();
        BufReader::new(r)
            .take(16 << 20)
            .read_line(&mut line)
            .await
            .map_err(unavailable)?;
        if line.is_empty() {
            return Err(unavailable(std::io::Error::other(
                "it closed the connection without answering",
            )));
        }
        let resp: Response = serde_json::from_str(line.trim_end()).map_err(|e| Error::Corrupt {
            what: format!("control reply from {}: {e}", self.path.display()),
            source: None,
        })?;
        match resp.error {
            Some(e) => Err(e.into()),
            None => Ok(resp),
        }
    }

    /// Volume information.
    pub async fn info(&self) -> Result<VolumeInfo> {
        info_of(self.call(&Request::Info).await?)
    }

    /// Takes snapshot `name`.
    pub async fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        let resp = self
            .call(&Request::Snapshot {
                name: name.to_string(),
            })
            .await?;
        resp.snapshots
            .into_iter()
            .next()
            .map(Into::into)
            .ok_or_else(|| missing("snapshot"))
    }

    /// The snapshots.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let resp = self.call(&Request::ListSnapshots).await?;
        Ok(resp.snapshots.into_iter().map(Into::into).collect())
    }

    /// Deletes snapshot `name`.
    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.call(&Request::DeleteSnapshot {
            name: name.to_string(),
        })
        .await
        .map(drop)
    }

    /// Clones `snapshot` into a new volume at `dest`.
    pub async fn clone_snapshot(&self, snapshot: &str, dest: &Path) -> Result<VolumeInfo> {
        info_of(
            self.call(&Request::Clone {
                snapshot: snapshot.to_string(),
                dest: dest.to_path_buf(),
            })
            .await?,
        )
    }

    /// Grows the volume to `size` bytes.
    pub async fn expand(&self, size: u64) -> Result<VolumeInfo> {
        info_of(self.call(&Request::Expand { size }).await?)
    }

    /// Blocks changed between snapshots `from` and `to`.
    pub async fn changed_blocks(&self, from: Option<&str>, to: &str) -> Result<Vec<ByteRange>> {
        let resp = self
            .call(&Request::ChangedBlocks {
                from: from.map(str::to_string),
                to: to.to_string(),
            })
            .await?;
        Ok(resp
            .ranges
            .into_iter()
            .map(|(offset, len)| ByteRange { offset, len })
            .collect())
    }
}

fn info_of(resp: Response) -> Result<VolumeInfo> {
    resp.info.map(Into::into).ok_or_else(|| missing("info"))
}

fn missing(what: &str) -> Error {
    Error::Corrupt {
        what: format!("control reply without its {what}"),
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line_each() {
        let r = Request::Snapshot { name: "s1".into() };
        assert_eq!(
            serde_json::to_string(&r).expect("test"),
            r#"{"op":"snapshot","name":"s1"}"#
        );
        for r in [
            Request::Info,
            Request::ListSnapshots,
            Request::Expand { size: 1 << 30 },
            Request::ChangedBlocks {
                from: None,
                to: "b".into(),
            },
        ] {
            let s = serde_json::to_string(&r).expect("test");
            assert!(!s.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&s).expect("test"), r);
        }
    }

    #[tokio::test]
    async fn an_owned_volume_is_snapshotted_expanded_and_cloned_from_outside() {
        let dir = tempfile::tempdir().expect("test");
        let vol = dir.path().join("v");
        let r = Replica::create(&vol, 8 << 20, None).expect("test");
        r.write(&[7u8; 4096], 0, false).expect("test");
        let server = serve(Arc::clone(&r), "v", &vol).expect("test");

        // Another handle cannot open it (the owner holds the lock)...
        assert!(matches!(Replica::open(&vol, None), Err(Error::Busy { .. })));
        // ...but asks the owner.
        let c = ControlClient::new(&vol);
        assert_eq!(c.info().await.expect("test").size, 8 << 20);
        let s = c.snapshot("s1").await.expect("test");
        assert_eq!(s.name, "s1");
        assert!(matches!(
            c.snapshot("s1").await,
            Err(Error::AlreadyExists { .. })
        ));
        assert!(matches!(
            c.snapshot("../x").await,
            Err(Error::Invalid { .. })
        ));
        r.write(&[9u8; 4096], 8192, false).expect("test");
        c.snapshot("s2").await.expect("test");
        let changed = c.changed_blocks(Some("s1"), "s2").await.expect("test");
        assert_eq!(
            changed,
            vec![ByteRange {
                offset: 8192,
                len: 4096
            }]
        );
        assert_eq!(c.list_snapshots().await.expect("test").len(), 2);
        assert_eq!(c.expand(16 << 20).await.expect("test").size, 16 << 20);
        assert_eq!(r.size(), 16 << 20, "the owner sees the new size");
        let info = c
            .clone_snapshot("s1", &dir.path().join("copy"))
            .await
            .expect("test");
        assert_eq!(info.name, "copy");
        // Snapshot data is readable without the owner's lock.
        let view = Replica::open_snapshot_shared(&vol, "s2", None).expect("test");
        let mut buf = vec![0u8; 4096];
        view.read(&mut buf, 8192).expect("test");
        assert_eq!(buf, vec![9u8; 4096]);
        view.read(&mut buf, 0).expect("test");
        assert_eq!(buf, vec![7u8; 4096]);
        assert!(matches!(
            Replica::open_snapshot_shared(&vol, "nope", None),
            Err(Error::NotFound { .. })
        ));
        c.delete_snapshot("s1").await.expect("test");
        // s2 sat on s1: the merge copied s1's blocks up, the view still reads them.
        view.read(&mut buf, 0).expect("test");
        assert_eq!(buf, vec![7u8; 4096]);
        assert!(matches!(
            c.delete_snapshot("nope").await,
            Err(Error::NotFound { .. })
        ));
        server.abort();
        // Garbage on the socket gets an error line, not a crash.
        let server = serve(Arc::clone(&r), "v", &vol).expect("test");
        let mut s = UnixStream::connect(socket_path(&vol)).await.expect("test");
        s.write_all(b"{not json\n").await.expect("test");
        let mut line = String::new();
        BufReader::new(&mut s)
            .read_line(&mut line)
            .await
            .expect("test");
        assert!(line.contains("error"), "{line}");
        server.abort();
    }
}
