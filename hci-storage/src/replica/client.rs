//! Clients of a [`super::server::ReplicaServer`]: [`RemoteNode`] (control
//! calls, a [`VolumeBackend`] and a [`ReplicaNode`]) and [`RemoteDevice`] (a
//! [`BlockDevice`] on one connection bound to a volume or snapshot).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::oneshot;

use hci_core::block::{BlockDevice, ByteRange, DeviceCaps, Extent, WriteFlags, ZeroFlags};
use hci_core::volume::{CreateVolume, OpenVolume, SnapshotInfo, VolumeBackend, VolumeInfo};
use hci_core::{Error, Result};

use super::proto::{self, Call, Op, ReplyHeader, RequestHeader, WireError};
use super::{FenceState, ReplicaNode};

/// Default bound on any single request (connect, I/O or control call).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest chunk a client sends in one request.
const CHUNK: u64 = 1 << 20;

/// How to reach a replica server.
#[derive(Debug, Clone)]
pub struct ServerAddr {
    /// `host:port`.
    pub addr: String,
    /// Auth token.
    pub token: Vec<u8>,
    /// Bound on every request; a server that does not answer in time is
    /// reported [`Error::Unavailable`].
    pub timeout: Duration,
}

impl ServerAddr {
    /// An address with the default timeout.
    pub fn new(addr: impl Into<String>, token: impl Into<Vec<u8>>) -> Self {
        ServerAddr {
            addr: addr.into(),
            token: token.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Vec<u8>>>>>;

struct Shared {
    pending: Pending,
    dead: AtomicBool,
}

/// One pipelined connection.
struct Conn {
    addr: String,
    timeout: Duration,
    wr: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("addr", &self.addr).finish()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn unavailable(addr: &str, why: impl Into<String>) -> Error {
    Error::Unavailable {
        what: format!("replica server {addr}"),
        source: Some(why.into().into()),
    }
}

impl Conn {
    async fn connect(sa: &ServerAddr) -> Result<Conn> {
        tokio::time::timeout(sa.timeout, Self::connect_inner(sa))
            .await
            .map_err(|_| unavailable(&sa.addr, "connect timed out"))?
    }

    async fn connect_inner(sa: &ServerAddr) -> Result<Conn> {
        let addr = sa.addr.clone();
        let sock = TcpStream::connect(&addr)
            .await
            .map_err(|e| unavailable(&addr, format!("connect: {e}")))?;
        sock.set_nodelay(true)
            .map_err(|e| Error::io("set TCP_NODELAY", e))?;
        let (mut rd, mut wr) = sock.into_split();
        wr.write_all(&proto::encode_hello(&sa.token)?)
            .await
            .map_err(|e| unavailable(&addr, format!("hello: {e}")))?;
        let mut hb = [0u8; proto::HELLO_REPLY_LEN];
        rd.read_exact(&mut hb)
            .await
            .map_err(|e| unavailable(&addr, format!("hello: {e}")))?;
        let (_version, status) = proto::decode_hello_reply(&hb)?;
        match status {
            proto::HELLO_OK => {}
            proto::HELLO_BAD_TOKEN => {
                return Err(Error::invalid(
                    format!("auth token for replica server {addr}"),
                    "refused",
                ));
            }
            _ => {
                return Err(Error::Unsupported {
                    operation: format!("protocol version {}", proto::VERSION),
                    backend: format!("replica server {addr}"),
                });
            }
        }
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let a2 = addr.clone();
        let reader = tokio::spawn(async move {
            let why = read_replies(&mut rd, &sh).await;
            sh.dead.store(true, Ordering::SeqCst);
            let waiting: Vec<_> = sh
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain()
                .collect();
            for (_, tx) in waiting {
                let _ = tx.send(Err(unavailable(&a2, why.clone())));
            }
        });
        Ok(Conn {
            addr,
            timeout: sa.timeout,
            wr: tokio::sync::Mutex::new(wr),
            shared,
            next_id: AtomicU64::new(1),
            reader,
        })
    }

    fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }

    async fn request(
        &self,
        op: Op,
        flags: u8,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<Vec<u8>> {
        if self.is_dead() {
            return Err(unavailable(&self.addr, "connection lost"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let h = RequestHeader {
            op,
            flags,
            id,
            offset,
            length,
            payload_len: payload.len() as u32,
            crc: crc32c::crc32c(payload),
        };
        let mut frame = Vec::with_capacity(proto::REQUEST_LEN + payload.len());
        frame.extend_from_slice(&h.encode());
        frame.extend_from_slice(payload);
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let fut = async {
            {
                let mut wr = self.wr.lock().await;
                wr.write_all(&frame)
                    .await
                    .map_err(|e| unavailable(&self.addr, format!("send: {e}")))?;
            }
            rx.await
                .map_err(|_| unavailable(&self.addr, "connection lost"))?
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => {
                if r.is_err() {
                    self.forget(id);
                }
                r
            }
            Err(_) => {
                self.forget(id);
                // The request may have been cut mid-frame: never reuse this stream.
                self.shared.dead.store(true, Ordering::SeqCst);
                Err(unavailable(
                    &self.addr,
                    format!("no reply within {:?}", self.timeout),
                ))
            }
        }
    }

    fn forget(&self, id: u64) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    async fn call<T: for<'de> serde::Deserialize<'de>>(&self, call: &Call) -> Result<T> {
        let body = self
            .request(Op::Call, 0, 0, 0, &proto::to_json(call))
            .await?;
        proto::from_json(&body)
    }
}

async fn read_replies(rd: &mut tokio::net::tcp::OwnedReadHalf, sh: &Shared) -> String {
    let mut hb = [0u8; proto::REPLY_LEN];
    loop {
        if let Err(e) = rd.read_exact(&mut hb).await {
            return format!("receive: {e}");
        }
        let h = match ReplyHeader::decode(&hb) {
            Ok(h) => h,
            Err(e) => return e.to_string(),
        };
        let mut payload = vec![0u8; h.payload_len as usize];
        if let Err(e) = rd.read_exact(&mut payload).await {
            return format!("receive: {e}");
        }
        let r = proto::check_crc(&payload, h.crc).and_then(|()| {
            if h.error {
                let w: WireError = proto::from_json(&payload)?;
                Err(Error::from(w))
            } else {
                Ok(payload)
            }
        });
        let tx = sh
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&h.id);
        if let Some(tx) = tx {
            let _ = tx.send(r);
        }
    }
}

/// A replica server seen as a [`VolumeBackend`] and a [`ReplicaNode`].
#[derive(Debug)]
pub struct RemoteNode {
    sa: ServerAddr,
    ctl: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

impl RemoteNode {
    /// A node at `sa`; connects lazily (and again after a lost connection).
    pub fn new(sa: ServerAddr) -> Self {
        RemoteNode {
            sa,
            ctl: tokio::sync::Mutex::new(None),
        }
    }

    /// The server's address.
    pub fn addr(&self) -> &ServerAddr {
        &self.sa
    }

    async fn conn(&self) -> Result<Arc<Conn>> {
        let mut g = self.ctl.lock().await;
        if let Some(c) = g.as_ref()
            && !c.is_dead()
        {
            return Ok(c.clone());
        }
        let c = Arc::new(Conn::connect(&self.sa).await?);
        *g = Some(c.clone());
        Ok(c)
    }

    async fn call<T: for<'de> serde::Deserialize<'de>>(&self, call: Call) -> Result<T> {
        self.conn().await?.call(&call).await
    }

    /// Round-trips a ping.
    pub async fn ping(&self) -> Result<()> {
        self.conn()
            .await?
            .request(Op::Ping, 0, 0, 0, &[])
            .await
            .map(|_| ())
    }

    async fn open_device(&self, call: Call, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
        let conn = Conn::connect(&self.sa).await?;
        let size: u64 = conn.call(&call).await?;
        Ok(Arc::new(RemoteDevice {
            conn,
            size: AtomicU64::new(size),
            read_only,
        }))
    }
}

fn key_bytes(k: &Option<hci_core::volume::EncryptionKey>) -> Option<Vec<u8>> {
    k.as_ref().map(|k| k.as_bytes().to_vec())
}

#[async_trait]
impl VolumeBackend for RemoteNode {
    async fn create(&self, name: &str, params: CreateVolume) -> Result<VolumeInfo> {
        let w: proto::WireVolumeInfo = self
            .call(Call::Create {
                volume: name.into(),
                size: params.size,
                key: key_bytes(&params.encryption_key),
            })
            .await?;
        Ok(w.into())
    }

    async fn open(&self, name: &str, options: OpenVolume) -> Result<Arc<dyn BlockDevice>> {
        self.open_fenced(name, 0, options).await
    }

    async fn open_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        options: OpenVolume,
    ) -> Result<Arc<dyn BlockDevice>> {
        self.open_device(
            Call::OpenSnapshot {
                volume: name.into(),
                snapshot: snapshot.into(),
                key: key_bytes(&options.encryption_key),
            },
            true,
        )
        .await
    }

    async fn info(&self, name: &str) -> Result<VolumeInfo> {
        let w: proto::WireVolumeInfo = self
            .call(Call::Info {
                volume: name.into(),
            })
            .await?;
        Ok(w.into())
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>> {
        let w: Vec<proto::WireVolumeInfo> = self.call(Call::List).await?;
        Ok(w.into_iter().map(Into::into).collect())
    }

    async fn delete(&self, name: &str) -> Result<()> {
        self.call(Call::Delete {
            volume: name.into(),
        })
        .await
    }

    async fn snapshot(&self, name: &str, snapshot: &str) -> Result<SnapshotInfo> {
        let w: proto::WireSnapshotInfo = self
            .call(Call::Snapshot {
                volume: name.into(),
                snapshot: snapshot.into(),
            })
            .await?;
        Ok(w.into())
    }

    async fn list_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>> {
        let w: Vec<proto::WireSnapshotInfo> = self
            .call(Call::ListSnapshots {
                volume: name.into(),
            })
            .await?;
        Ok(w.into_iter().map(Into::into).collect())
    }

    async fn delete_snapshot(&self, name: &str, snapshot: &str) -> Result<()> {
        self.call(Call::DeleteSnapshot {
            volume: name.into(),
            snapshot: snapshot.into(),
        })
        .await
    }

    async fn revert(&self, name: &str, snapshot: &str) -> Result<()> {
        self.call(Call::Revert {
            volume: name.into(),
            snapshot: snapshot.into(),
        })
        .await
    }

    async fn clone_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        new_name: &str,
    ) -> Result<VolumeInfo> {
        let w: proto::WireVolumeInfo = self
            .call(Call::Clone {
                volume: name.into(),
                snapshot: snapshot.into(),
                new_name: new_name.into(),
            })
            .await?;
        Ok(w.into())
    }

    async fn expand(&self, name: &str, new_size: u64) -> Result<VolumeInfo> {
        let w: proto::WireVolumeInfo = self
            .call(Call::Expand {
                volume: name.into(),
                size: new_size,
            })
            .await?;
        Ok(w.into())
    }

    async fn changed_blocks(
        &self,
        name: &str,
        from: Option<&str>,
        to: &str,
    ) -> Result<Vec<ByteRange>> {
        let v: Vec<(u64, u64)> = self
            .call(Call::ChangedBlocks {
                volume: name.into(),
                from: from.map(Into::into),
                to: to.into(),
            })
            .await?;
        Ok(v.into_iter().map(|(o, l)| ByteRange::new(o, l)).collect())
    }
}

#[async_trait]
impl ReplicaNode for RemoteNode {
    fn label(&self) -> String {
        self.sa.addr.clone()
    }

    fn is_local(&self) -> bool {
        false
    }

    fn backend(&self) -> &dyn VolumeBackend {
        self
    }

    async fn fence_state(&self, volume: &str) -> Result<FenceState> {
        self.call(Call::FenceState {
            volume: volume.into(),
        })
        .await
    }

    async fn fence(&self, volume: &str, generation: u64) -> Result<FenceState> {
        self.call(Call::Fence {
            volume: volume.into(),
            generation,
        })
        .await
    }

    async fn set_epoch(&self, volume: &str, generation: u64, epoch: u64) -> Result<()> {
        self.call(Call::SetEpoch {
            volume: volume.into(),
            generation,
            epoch,
        })
        .await
    }

    async fn open_fenced(
        &self,
        volume: &str,
        generation: u64,
        options: OpenVolume,
    ) -> Result<Arc<dyn BlockDevice>> {
        self.open_device(
            Call::Open {
                volume: volume.into(),
                generation,
                read_only: options.read_only,
                key: key_bytes(&options.encryption_key),
            },
            options.read_only,
        )
        .await
    }
}

/// A [`BlockDevice`] served by a replica server over one pipelined connection.
#[derive(Debug)]
pub struct RemoteDevice {
    conn: Conn,
    size: AtomicU64,
    read_only: bool,
}

impl RemoteDevice {
    /// Updates the cached size (after an expand).
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::SeqCst);
    }
}

impl RemoteDevice {
    /// For a request split in several chunks that reaches past the cached
    /// size, asks the server (which knows the real size) about the last chunk
    /// first, so an out-of-range request fails before any chunk is applied.
    async fn probe_end(&self, offset: u64, len: u64) -> Result<()> {
        let Some(end) = offset.checked_add(len) else {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            });
        };
        if len > CHUNK && end > self.size() {
            self.conn
                .request(Op::Read, 0, end - 1, 1, &[])
                .await
                .map_err(|e| match e {
                    Error::OutOfRange { size, .. } => Error::OutOfRange { offset, len, size },
                    other => other,
                })?;
            self.size.fetch_max(end, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let n = (len - at).min(CHUNK);
        let r = (offset + at, n);
        at += n;
        Some(r)
    })
}

#[async_trait]
impl BlockDevice for RemoteDevice {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn capabilities(&self) -> DeviceCaps {
        DeviceCaps {
            discard: true,
            write_zeroes: true,
            block_status: true,
            shared_flush: true,
        }
    }

    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return self
                .conn
                .request(Op::Read, 0, offset, 0, &[])
                .await
                .map(|_| ());
        }
        let len = buf.len() as u64;
        self.probe_end(offset, len).await?;
        let parts = chunks(offset, len).map(|(o, n)| async move {
            self.conn
                .request(Op::Read, 0, o, n, &[])
                .await
                .map(|d| (o, n, d))
        });
        for r in futures::future::join_all(parts).await {
            let (o, n, d) = r?;
            if d.len() as u64 != n {
                return Err(Error::invalid("replica read reply", "wrong length"));
            }
            let at = (o - offset) as usize;
            buf[at..at + d.len()].copy_from_slice(&d);
        }
        Ok(())
    }

    async fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<()> {
        let f = if flags.fua { proto::FLAG_FUA } else { 0 };
        if buf.is_empty() {
            return self
                .conn
                .request(Op::Write, f, offset, 0, &[])
                .await
                .map(|_| ());
        }
        let len = buf.len() as u64;
        self.probe_end(offset, len).await?;
        let parts = chunks(offset, len).map(|(o, n)| {
            let at = (o - offset) as usize;
            let data = &buf[at..at + n as usize];
            self.conn.request(Op::Write, f, o, 0, data)
        });
        for r in futures::future::join_all(parts).await {
            r?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.conn.request(Op::Flush, 0, 0, 0, &[]).await.map(|_| ())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.conn
            .request(Op::Discard, 0, offset, len, &[])
            .await
            .map(|_| ())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let mut f = 0;
        if flags.fua {
            f |= proto::FLAG_FUA;
        }
        if flags.no_hole {
            f |= proto::FLAG_NO_HOLE;
        }
        self.conn
            .request(Op::WriteZeroes, f, offset, len, &[])
            .await
            .map(|_| ())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let body = self
            .conn
            .request(Op::BlockStatus, 0, offset, len, &[])
            .await?;
        proto::decode_extents(proto::from_json(&body)?)
    }
}
