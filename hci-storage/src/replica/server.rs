//! [`ReplicaServer`]: serves every replica under a root directory over TCP.
//!
//! One connection is bound (by an `Open` call) to at most one device at a
//! time; control calls are handled in order, data requests run concurrently
//! (at most [`MAX_IN_FLIGHT`] per connection, so memory per connection is
//! bounded by `MAX_IN_FLIGHT × MAX_PAYLOAD`) and replies are written whole, in
//! completion order.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use hci_core::block::{BlockDevice, WriteFlags, ZeroFlags};
use hci_core::volume::{CreateVolume, EncryptionKey, OpenVolume, VolumeBackend};
use hci_core::{Error, Result};

use super::proto::{self, Call, Op, RequestHeader, WireError};
use super::{LocalNode, ReplicaNode};

/// Most data requests running at once on one connection.
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
    let (mut rd, mut wr) = sock.into_split();
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

    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT * 2);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let result = read_loop(&node, &mut rd, &tx).await;
    drop(tx);
    let _ = writer.await;
    result
}

async fn read_loop(
    node: &Arc<LocalNode>,
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    tx: &mpsc::Sender<Vec<u8>>,
) -> Result<()> {
    let sem = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut device: Option<Arc<dyn BlockDevice>> = None;
    let mut hb = [0u8; proto::REQUEST_LEN];
    loop {
        match rd.read_exact(&mut hb).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(Error::io("read request", e)),
        }
        let h = RequestHeader::decode(&hb)?;
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Cancelled)?;
        let mut payload = vec![0u8; h.payload_len as usize];
        rd.read_exact(&mut payload)
            .await
            .map_err(|e| Error::io("read request payload", e))?;
        if let Err(e) = proto::check_crc(&payload, h.crc) {
            send_err(tx, h.id, &e).await;
            continue;
        }
        match h.op {
            Op::Ping => {
                let _ = tx.send(proto::reply_frame(h.id, false, &[])).await;
            }
            Op::Call => {
                let r = match proto::from_json::<Call>(&payload) {
                    Ok(call) => handle_call(node, call, &mut device).await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(body) => {
                        let _ = tx.send(proto::reply_frame(h.id, false, &body)).await;
                    }
                    Err(e) => send_err(tx, h.id, &e).await,
                }
            }
            _ => {
                let Some(dev) = device.clone() else {
                    send_err(
                        tx,
                        h.id,
                        &Error::invalid("replica request", "no volume is open on this connection"),
                    )
                    .await;
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let frame = match data_op(&*dev, h, payload).await {
                        Ok(body) => proto::reply_frame(h.id, false, &body),
                        Err(e) => {
                            proto::reply_frame(h.id, true, &proto::to_json(&WireError::from(&e)))
                        }
                    };
                    let _ = tx.send(frame).await;
                });
            }
        }
    }
}

async fn send_err(tx: &mpsc::Sender<Vec<u8>>, id: u64, e: &Error) {
    let _ = tx
        .send(proto::reply_frame(
            id,
            true,
            &proto::to_json(&WireError::from(e)),
        ))
        .await;
}

async fn data_op(dev: &dyn BlockDevice, h: RequestHeader, payload: Vec<u8>) -> Result<Vec<u8>> {
    match h.op {
        Op::Read => {
            let mut buf = vec![0u8; h.length as usize];
            dev.read_at(&mut buf, h.offset).await?;
            Ok(buf)
        }
        Op::Write => {
            let flags = WriteFlags {
                fua: h.flags & proto::FLAG_FUA != 0,
            };
            dev.write_at(&payload, h.offset, flags).await?;
            Ok(Vec::new())
        }
        Op::Flush => dev.flush().await.map(|()| Vec::new()),
        Op::Discard => dev.discard(h.offset, h.length).await.map(|()| Vec::new()),
        Op::WriteZeroes => {
            let flags = ZeroFlags {
                fua: h.flags & proto::FLAG_FUA != 0,
                no_hole: h.flags & proto::FLAG_NO_HOLE != 0,
            };
            dev.write_zeroes(h.offset, h.length, flags)
                .await
                .map(|()| Vec::new())
        }
        Op::BlockStatus => {
            let e = dev.block_status(h.offset, h.length).await?;
            Ok(proto::to_json(&proto::encode_extents(&e)))
        }
        Op::Ping | Op::Call => Ok(Vec::new()),
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
    })
}
