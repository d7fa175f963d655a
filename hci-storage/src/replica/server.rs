//! [`ReplicaServer`]: serves every replica under a root directory over TCP.
//!
//! One connection is bound (by an `Open` call) to at most one device at a
//! time. Requests are served in order, inline on the connection's task (the
//! local store's I/O is positional reads and writes on the page cache); only
//! flushes run concurrently (at most [`MAX_IN_FLIGHT`] per connection). A
//! pipelined client's replies are batched into few writes. Memory per
//! connection is bounded by the read buffer, one payload and one reply batch.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use hci_core::block::{BlockDevice, WriteFlags, ZeroFlags};
use hci_core::volume::{CreateVolume, EncryptionKey, OpenVolume, VolumeBackend};
use hci_core::{Error, Result};

use super::proto::{self, Call, Op, RequestHeader, WireError};
use super::{LocalNode, ReplicaNode};

/// Most flushes running at once on one connection.
pub const MAX_IN_FLIGHT: usize = 32;

/// Serves the replicas under one root over TCP.
#[derive(Debug)]
pub struct ReplicaServer {
    node: Arc<LocalNode>,
    token: Arc<Vec<u8>>,
}

impl ReplicaServer {
    /// A server for the replicas under `root`, accepting clients with `token`.
    pub fn new(root: impl Into<std::path::PathBuf>, token: impl Into<Vec<u8>>) -> Result<Self> {
        let token = token.into();
        if token.len() > proto::MAX_TOKEN {
            return Err(Error::invalid("auth token", "longer than 1024 bytes"));
        }
        Ok(ReplicaServer {
            node: Arc::new(LocalNode::new(root)?),
            token: Arc::new(token),
        })
    }

    /// The node served.
    pub fn node(&self) -> &Arc<LocalNode> {
        &self.node
    }

    /// Binds `addr` and serves until the task is dropped; returns the bound
    /// address through `bound` as soon as it listens.
    pub async fn bind(&self, addr: &str) -> Result<(TcpListener, SocketAddr)> {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("listen on {addr}"), e))?;
        let a = l
            .local_addr()
            .map_err(|e| Error::io("read the listening address", e))?;
        Ok((l, a))
    }

    /// Accepts and serves connections forever.
    pub async fn serve(&self, listener: TcpListener) -> Result<()> {
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let node = self.node.clone();
            let token = self.token.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_conn(node, token, sock).await {
                    tracing::debug!(%peer, error = %e, "replica connection closed");
                }
            });
        }
    }

    /// Binds `addr`, then serves in a background task; returns the bound
    /// address and the task.
    pub async fn spawn(self, addr: &str) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let (l, a) = self.bind(addr).await?;
        let h = tokio::spawn(async move {
            let _ = self.serve(l).await;
        });
        Ok((a, h))
    }
}

async fn serve_conn(node: Arc<LocalNode>, token: Arc<Vec<u8>>, sock: TcpStream) -> Result<()> {
    sock.set_nodelay(true)
        .map_err(|e| Error::io("set TCP_NODELAY", e))?;
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let io = |what: &'static str| move |e: std::io::Error| Error::io(what, e);

    // Hello.
    let mut hb = [0u8; proto::HELLO_LEN];
    rd.read_exact(&mut hb).await.map_err(io("read hello"))?;
    let hello = proto::decode_hello(&hb)?;
    let mut tok = vec![0u8; hello.token_len];
    rd.read_exact(&mut tok).await.map_err(io("read token"))?;
    let status = if hello.min_version > proto::VERSION || hello.max_version < proto::VERSION {
        proto::HELLO_BAD_VERSION
    } else if !proto::token_eq(&tok, &token) {
        proto::HELLO_BAD_TOKEN
    } else {
        proto::HELLO_OK
    };
    wr.write_all(&proto::encode_hello_reply(proto::VERSION, status))
        .await
        .map_err(io("write hello"))?;
    if status != proto::HELLO_OK {
        return Err(Error::invalid("replica client", "refused at hello"));
    }
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let result = read_loop(&node, &mut rd, &wr).await;
    let _ = wr.lock().await.shutdown().await;
    result
}

/// Bytes of requests read from the socket at once.
const READ_BUFFER: usize = 256 << 10;
/// Replies are sent once this many bytes are queued, or when no request is
/// left to read.
const REPLY_BATCH: usize = 256 << 10;

type Writer = Arc<tokio::sync::Mutex<OwnedWriteHalf>>;

/// Sends the queued replies (one `write` for a whole batch).
async fn send_batch(wr: &Writer, out: &mut Vec<u8>) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let r = wr.lock().await.write_all(out).await;
    out.clear();
    r.map_err(|e| Error::io("write replies", e))
}

/// True if `buf` starts with a whole request (header and payload): serving it
/// needs no wait, so queued replies can wait for it.
fn whole_request_buffered(buf: &[u8]) -> bool {
    if buf.len() < proto::REQUEST_LEN {
        return false;
    }
    let mut pl = [0u8; 4];
    pl.copy_from_slice(&buf[32..36]);
    buf.len() - proto::REQUEST_LEN >= u32::from_le_bytes(pl) as usize
}

/// Appends a reply frame (header, then `payload`) to `out`.
fn push_reply(out: &mut Vec<u8>, id: u64, error: bool, payload: &[u8]) {
    let h = proto::ReplyHeader {
        error,
        id,
        payload_len: payload.len() as u32,
        crc: crc32c::crc32c(payload),
    };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(payload);
}

fn push_error(out: &mut Vec<u8>, id: u64, e: &Error) {
    push_reply(out, id, true, &proto::to_json(&WireError::from(e)));
}

/// Serves requests in arrival order. Data requests on a local replica are
/// positional I/O on the page cache (about a microsecond for 4 KiB), so they
/// run inline: a task per request would cost more than the I/O. Replies are
/// batched and written whenever the socket has no further request buffered,
/// so a pipelined client gets many replies per system call. Flushes
/// (`fdatasync`, possibly milliseconds) run in their own task so later
/// requests are not held behind them; they cover every write answered before.
async fn read_loop(
    node: &Arc<LocalNode>,
    rd: &mut BufReader<OwnedReadHalf>,
    wr: &Writer,
) -> Result<()> {
    let flushes = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut device: Option<Arc<dyn BlockDevice>> = None;
    let mut hb = [0u8; proto::REQUEST_LEN];
    let mut payload: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::with_capacity(REPLY_BATCH * 2);
    loop {
        if !whole_request_buffered(rd.buffer()) || out.len() >= REPLY_BATCH {
            send_batch(wr, &mut out).await?;
        }
        match rd.read_exact(&mut hb).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                send_batch(wr, &mut out).await?;
                return Ok(());
            }
            Err(e) => return Err(Error::io("read request", e)),
        }
        let h = RequestHeader::decode(&hb)?;
        proto::read_payload(rd, &mut payload, h.payload_len as usize)
            .await
            .map_err(|e| Error::io("read request payload", e))?;
        if let Err(e) = proto::check_crc(&payload, h.crc) {
            push_error(&mut out, h.id, &e);
            continue;
        }
        match h.op {
            Op::Ping => push_reply(&mut out, h.id, false, &[]),
            Op::Call => {
                let r = match proto::from_json::<Call>(&payload) {
                    Ok(call) => handle_call(node, call, &mut device).await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(body) => push_reply(&mut out, h.id, false, &body),
                    Err(e) => push_error(&mut out, h.id, &e),
                }
            }
            op => {
                let Some(dev) = device.as_ref() else {
                    push_error(
                        &mut out,
                        h.id,
                        &Error::invalid("replica request", "no volume is open on this connection"),
                    );
                    continue;
                };
                if op == Op::Flush {
                    // Replies queued so far answer writes this flush covers;
                    // send them first so ordering on the wire stays intuitive.
                    send_batch(wr, &mut out).await?;
                    let permit = flushes
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| Error::Cancelled)?;
                    let (dev, wr) = (dev.clone(), wr.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        let mut f = Vec::new();
                        match dev.flush().await {
                            Ok(()) => push_reply(&mut f, h.id, false, &[]),
                            Err(e) => push_error(&mut f, h.id, &e),
                        }
                        let _ = wr.lock().await.write_all(&f).await;
                    });
                    continue;
                }
                data_op(&**dev, h, &payload, &mut out).await;
            }
        }
    }
}

/// Runs one data request and appends its reply to `out`; a read lands
/// directly in `out`, behind its header (no intermediate buffer).
async fn data_op(dev: &dyn BlockDevice, h: RequestHeader, payload: &[u8], out: &mut Vec<u8>) {
    let fua = h.flags & proto::FLAG_FUA != 0;
    let r = match h.op {
        Op::Read => {
            let start = out.len();
            let len = h.length as usize;
            out.resize(start + proto::REPLY_LEN + len, 0);
            match dev
                .read_at(&mut out[start + proto::REPLY_LEN..], h.offset)
                .await
            {
                Ok(()) => {
                    let data = &out[start + proto::REPLY_LEN..];
                    let head = proto::ReplyHeader {
                        error: false,
                        id: h.id,
                        payload_len: len as u32,
                        crc: crc32c::crc32c(data),
                    }
                    .encode();
                    out[start..start + proto::REPLY_LEN].copy_from_slice(&head);
                    return;
                }
                Err(e) => {
                    out.truncate(start);
                    Err(e)
                }
            }
        }
        Op::Write => dev
            .write_at(payload, h.offset, WriteFlags { fua })
            .await
            .map(|()| Vec::new()),
        Op::Discard => dev.discard(h.offset, h.length).await.map(|()| Vec::new()),
        Op::WriteZeroes => {
            let flags = ZeroFlags {
                fua,
                no_hole: h.flags & proto::FLAG_NO_HOLE != 0,
            };
            dev.write_zeroes(h.offset, h.length, flags)
                .await
                .map(|()| Vec::new())
        }
        Op::BlockStatus => dev
            .block_status(h.offset, h.length)
            .await
            .map(|e| proto::to_json(&proto::encode_extents(&e))),
        Op::Flush | Op::Ping | Op::Call => Ok(Vec::new()),
    };
    match r {
        Ok(body) => push_reply(out, h.id, false, &body),
        Err(e) => push_error(out, h.id, &e),
    }
}

async fn handle_call(
    node: &Arc<LocalNode>,
    call: Call,
    device: &mut Option<Arc<dyn BlockDevice>>,
) -> Result<Vec<u8>> {
    let b = node.local();
    let key = |k: Option<Vec<u8>>| k.map(EncryptionKey::new);
    Ok(match call {
        Call::Create {
            volume,
            size,
            key: k,
        } => {
            let info = b
                .create(
                    &volume,
                    CreateVolume {
                        size,
                        encryption_key: key(k),
                    },
                )
                .await?;
            proto::to_json(&proto::WireVolumeInfo::from(info))
        }
        Call::Open {
            volume,
            generation,
            read_only,
            key: k,
        } => {
            let dev = node
                .open_fenced(
                    &volume,
                    generation,
                    OpenVolume {
                        read_only,
                        encryption_key: key(k),
                    },
                )
                .await?;
            let size = dev.size();
            *device = Some(dev);
            proto::to_json(&size)
        }
        Call::OpenSnapshot {
            volume,
            snapshot,
            key: k,
        } => {
            let dev = b
                .open_snapshot(
                    &volume,
                    &snapshot,
                    OpenVolume {
                        read_only: true,
                        encryption_key: key(k),
                    },
                )
                .await?;
            let size = dev.size();
            *device = Some(dev);
            proto::to_json(&size)
        }
        Call::Info { volume } => {
            proto::to_json(&proto::WireVolumeInfo::from(b.info(&volume).await?))
        }
        Call::List => {
            let v: Vec<proto::WireVolumeInfo> =
                b.list().await?.into_iter().map(Into::into).collect();
            proto::to_json(&v)
        }
        Call::Delete { volume } => {
            b.delete(&volume).await?;
            node.forget(&volume);
            proto::to_json(&())
        }
        Call::Snapshot { volume, snapshot } => proto::to_json(&proto::WireSnapshotInfo::from(
            b.snapshot(&volume, &snapshot).await?,
        )),
        Call::ListSnapshots { volume } => {
            let v: Vec<proto::WireSnapshotInfo> = b
                .list_snapshots(&volume)
                .await?
                .into_iter()
                .map(Into::into)
                .collect();
            proto::to_json(&v)
        }
        Call::DeleteSnapshot { volume, snapshot } => {
            b.delete_snapshot(&volume, &snapshot).await?;
            proto::to_json(&())
        }
        Call::Revert { volume, snapshot } => {
            b.revert(&volume, &snapshot).await?;
            proto::to_json(&())
        }
        Call::Clone {
            volume,
            snapshot,
            new_name,
        } => proto::to_json(&proto::WireVolumeInfo::from(
            b.clone_snapshot(&volume, &snapshot, &new_name).await?,
        )),
        Call::Expand { volume, size } => {
            proto::to_json(&proto::WireVolumeInfo::from(b.expand(&volume, size).await?))
        }
        Call::ChangedBlocks { volume, from, to } => {
            let v: Vec<(u64, u64)> = b
                .changed_blocks(&volume, from.as_deref(), &to)
                .await?
                .into_iter()
                .map(|r| (r.offset, r.len))
                .collect();
            proto::to_json(&v)
        }
        Call::FenceState { volume } => proto::to_json(&node.fence_state(&volume).await?),
        Call::Fence { volume, generation } => {
            proto::to_json(&node.fence(&volume, generation).await?)
        }
        Call::SetEpoch {
            volume,
            generation,
            epoch,
        } => {
            node.set_epoch(&volume, generation, epoch).await?;
            proto::to_json(&())
        }
        Call::MarkClean { volume, generation } => {
            node.mark_clean(&volume, generation).await?;
            proto::to_json(&())
        }
        Call::DirtyRegions { volume } => proto::to_json(&node.dirty_regions(&volume).await?),
        Call::UpdateDirty {
            volume,
            generation,
            update,
        } => {
            node.update_dirty(&volume, generation, update).await?;
            proto::to_json(&())
        }
    })
}
