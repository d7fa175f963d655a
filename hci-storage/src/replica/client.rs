//! Clients of a [`super::server::ReplicaServer`]: [`RemoteNode`] (control
//! calls, a [`VolumeBackend`] and a [`ReplicaNode`]) and [`RemoteDevice`] (a
//! [`BlockDevice`] on one connection bound to a volume or snapshot).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, oneshot};

use hci_core::block::{BlockDevice, ByteRange, DeviceCaps, Extent, WriteFlags, ZeroFlags};
use hci_core::volume::{CreateVolume, OpenVolume, SnapshotInfo, VolumeBackend, VolumeInfo};
use hci_core::{Error, Result};

use super::proto::{self, Call, Op, ReplyHeader, RequestHeader, WireError};
use super::{DirtyRegions, DirtyUpdate, FenceState, ReplicaNode};

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

/// Frames waiting to be sent: requests append here and the connection's writer
/// task sends everything queued in one `write`, so concurrent requests share
/// system calls instead of each taking a lock and a syscall of its own.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
}

struct Shared {
    pending: Pending,
    dead: AtomicBool,
    why: Mutex<Option<String>>,
    outbox: Mutex<Outbox>,
    wake: Notify,
}

impl Shared {
    /// Marks the connection dead and fails every waiting request.
    fn kill(&self, addr: &str, why: String) {
        self.dead.store(true, Ordering::SeqCst);
        self.why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| why.clone());
        let waiting: Vec<_> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for (_, tx) in waiting {
            let _ = tx.send(Err(unavailable(addr, why.clone())));
        }
        // Let the writer notice and exit.
        self.wake.notify_one();
    }
}

/// One pipelined connection.
struct Conn {
    addr: String,
    timeout: Duration,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("addr", &self.addr).finish()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

fn unavailable(addr: &str, why: impl Into<String>) -> Error {
    Error::Unavailable {
        what: format!("replica server {addr}"),
        source: Some(why.into().into()),
    }
}

/// Socket buffers of replica connections: a few MiB in flight without
/// waiting for the peer's window.
const SOCKET_BUFFER: usize = 4 << 20;

/// Opens a TCP connection with `TCP_NODELAY`, large buffers and keepalive
/// probes (so a silently dead peer is noticed even with no request pending).
async fn tcp_connect(addr: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let s = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        let _ = s.set_send_buffer_size(SOCKET_BUFFER as u32);
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER as u32);
        match s.connect(a).await {
            Ok(sock) => {
                sock.set_nodelay(true)?;
                return Ok(sock);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "address resolves to nothing")
    }))
}

impl Conn {
    async fn connect(sa: &ServerAddr) -> Result<Conn> {
        tokio::time::timeout(sa.timeout, Self::connect_inner(sa))
            .await
            .map_err(|_| unavailable(&sa.addr, "connect timed out"))?
    }

    async fn connect_inner(sa: &ServerAddr) -> Result<Conn> {
        let addr = sa.addr.clone();
        let sock = tcp_connect(&addr)
            .await
            .map_err(|e| unavailable(&addr, format!("connect: {e}")))?;
        let (rd, mut wr) = sock.into_split();
        let mut rd = BufReader::with_capacity(256 << 10, rd);
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
            why: Mutex::new(None),
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
        });
        let sh = shared.clone();
        let a2 = addr.clone();
        let reader = tokio::spawn(async move {
            let why = read_replies(&mut rd, &sh).await;
            sh.kill(&a2, why);
        });
        let sh = shared.clone();
        let a2 = addr.clone();
        let writer = tokio::spawn(async move {
            let why = write_frames(&mut wr, &sh).await;
            sh.kill(&a2, why);
            let _ = wr.shutdown().await;
        });
        Ok(Conn {
            addr,
            timeout: sa.timeout,
            shared,
            next_id: AtomicU64::new(1),
            reader,
            writer,
        })
    }

    fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }

    fn lost(&self) -> Error {
        let why = self
            .shared
            .why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "connection lost".into());
        unavailable(&self.addr, why)
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
            return Err(self.lost());
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
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let was_empty = {
            let mut o = self.shared.outbox.lock().unwrap_or_else(|e| e.into_inner());
            let was_empty = o.buf.is_empty();
            o.buf.extend_from_slice(&h.encode());
            o.buf.extend_from_slice(payload);
            was_empty
        };
        if was_empty {
            self.shared.wake.notify_one();
        }
        // The connection may have died between the check and the insert.
        if self.is_dead() {
            self.forget(id);
            return Err(self.lost());
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.lost()),
            Err(_) => {
                self.forget(id);
                // A server that misses the bound is treated as gone: never
                // reuse this stream (its replies would arrive out of date).
                self.shared
                    .kill(&self.addr, format!("no reply within {:?}", self.timeout));
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

/// Sends queued frames until the connection dies; returns why.
async fn write_frames(wr: &mut OwnedWriteHalf, sh: &Shared) -> String {
    let mut spare = Vec::new();
    loop {
        if sh.dead.load(Ordering::SeqCst) {
            return "connection closed".into();
        }
        {
            let mut o = sh.outbox.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut o.buf, &mut spare);
        }
        if spare.is_empty() {
            sh.wake.notified().await;
            // Woken by the first request of a burst: let the other requests
            // that are ready to run queue their frames too, so the burst
            // leaves in one `send` (a woken task otherwise runs next, before
            // them, and sends one frame per system call).
            tokio::task::yield_now().await;
            continue;
        }
        if let Err(e) = wr.write_all(&spare).await {
            return format!("send: {e}");
        }
        // Keep a moderate buffer for reuse; drop a huge one.
        if spare.capacity() > 8 << 20 {
            spare = Vec::new();
        } else {
            spare.clear();
        }
    }
}

async fn read_replies(rd: &mut BufReader<OwnedReadHalf>, sh: &Shared) -> String {
    let mut hb = [0u8; proto::REPLY_LEN];
    loop {
        if let Err(e) = rd.read_exact(&mut hb).await {
            return format!("receive: {e}");
        }
        let h = match ReplyHeader::decode(&hb) {
            Ok(h) => h,
            Err(e) => return e.to_string(),
        };
        let mut payload = Vec::new();
        if let Err(e) = proto::read_payload(rd, &mut payload, h.payload_len as usize).await {
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

    async fn mark_clean(&self, volume: &str, generation: u64) -> Result<()> {
        self.call(Call::MarkClean {
            volume: volume.into(),
            generation,
        })
        .await
    }

    async fn dirty_regions(&self, volume: &str) -> Result<Option<DirtyRegions>> {
        self.call(Call::DirtyRegions {
            volume: volume.into(),
        })
        .await
    }

    async fn update_dirty(&self, volume: &str, generation: u64, update: DirtyUpdate) -> Result<()> {
        self.call(Call::UpdateDirty {
            volume: volume.into(),
            generation,
            update,
        })
        .await
    }

    /// Round-trips a ping on the control connection (reconnecting if needed).
    async fn ping(&self) -> Result<()> {
        self.conn()
            .await?
            .request(Op::Ping, 0, 0, 0, &[])
            .await
            .map(|_| ())
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
        if len <= CHUNK {
            // One request (the common case): no join machinery.
            let d = self.conn.request(Op::Read, 0, offset, len, &[]).await?;
            if d.len() != buf.len() {
                return Err(Error::invalid("replica read reply", "wrong length"));
            }
            buf.copy_from_slice(&d);
            return Ok(());
        }
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
        if len <= CHUNK {
            // One request (the common case): no join machinery.
            return self
                .conn
                .request(Op::Write, f, offset, 0, buf)
                .await
                .map(|_| ());
        }
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
