//! The control channel of a running engine: `hci-storage serve --control PATH`
//! listens on a unix socket, and `hci-storage replicas list|add|remove` talks
//! to it.
//!
//! The protocol is one JSON [`ControlRequest`] per line from the client and
//! one JSON [`ControlReply`] per line back, on a connection that may carry
//! several requests. `add` starts a rebuild in the background and returns at
//! once; its progress shows in the status (`list`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use hci_core::block::BlockDevice;
use hci_core::{Error, Result};

use crate::engine::rebuild::RebuildProgress;
use crate::engine::{ReplicaState, ReplicatedVolume, Robustness};
use crate::replica::ReplicaNode;

/// Longest request line accepted.
const MAX_LINE: usize = 64 << 10;

/// A request on the control channel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The volume's robustness and every replica's state.
    Status,
    /// Add a replica (`HOST:PORT/VOLUME` or `ROOT/VOLUME`) and start its rebuild.
    Add {
        /// Where the replica lives.
        replica: String,
    },
    /// Remove a replica from the set (its data stays where it is).
    Remove {
        /// The replica as given to `add`/`--replica`, or its node label.
        replica: String,
    },
    /// Take a snapshot on every replica at the same instant (writes are
    /// held for that instant), so the replicas' snapshots are identical.
    Snapshot {
        /// The snapshot's name.
        name: String,
    },
}

/// Progress of a rebuild started through the control channel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RebuildView {
    /// Bytes compared so far.
    pub done: u64,
    /// Bytes to compare.
    pub total: u64,
    /// Bytes written to the new replica.
    pub sent: u64,
    /// Milliseconds since the rebuild started (until it ended, once it did).
    pub elapsed_ms: u64,
    /// True once it ended (successfully or not).
    pub finished: bool,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// One replica in a [`StatusView`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaView {
    /// The node's label (address, or directory of a local replica).
    pub node: String,
    /// `healthy`, `rebuilding`, `stale` or `failed`; `adding` while a replica
    /// added through the control channel has not joined the set yet.
    pub state: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// The last rebuild started through the control channel.
    pub rebuild: Option<RebuildView>,
}

/// The status of the served volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusView {
    /// Volume name.
    pub volume: String,
    /// Size in bytes.
    pub size: u64,
    /// `healthy`, `degraded` or `faulted`.
    pub robustness: String,
    /// Engine generation.
    pub generation: u64,
    /// Membership epoch.
    pub epoch: u64,
    /// Every replica.
    pub replicas: Vec<ReplicaView>,
}

/// A reply on the control channel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ControlReply {
    /// True if the request was carried out.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// The status after the request.
    pub status: Option<StatusView>,
}

/// Turns a replica location into a node and its label.
pub type Resolver = dyn Fn(&str) -> Result<Arc<dyn ReplicaNode>> + Send + Sync;

struct Rebuild {
    progress: Arc<RebuildProgress>,
    started: Instant,
    ended: Option<Instant>,
    error: Option<String>,
}

/// Serves the control channel of one engine.
pub struct Controller {
    volume: Arc<ReplicatedVolume>,
    resolve: Box<Resolver>,
    rebuilds: Mutex<HashMap<String, Rebuild>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("volume", &self.volume.name())
            .finish()
    }
}

fn state_name(s: &ReplicaState) -> (&'static str, Option<String>) {
    match s {
        ReplicaState::Healthy => ("healthy", None),
        ReplicaState::Rebuilding => ("rebuilding", None),
        ReplicaState::Stale => ("stale", None),
        ReplicaState::Failed(why) => ("failed", Some(why.clone())),
    }
}

impl Controller {
    /// A controller for `volume`; `resolve` turns a replica location given to
    /// `add` or `remove` into a node.
    pub fn new(volume: Arc<ReplicatedVolume>, resolve: Box<Resolver>) -> Arc<Self> {
        Arc::new(Controller {
            volume,
            resolve,
            rebuilds: Mutex::new(HashMap::new()),
        })
    }

    /// The volume's status, with rebuild progress.
    pub async fn status(&self) -> StatusView {
        let st = self.volume.status().await;
        let rebuilds = self.rebuilds.lock().unwrap_or_else(|e| e.into_inner());
        let replicas = st
            .replicas
            .into_iter()
            .map(|r| {
                let (state, reason) = state_name(&r.state);
                let rebuild = rebuilds.get(&r.node).map(|b| RebuildView {
                    done: b.progress.done.load(Ordering::Relaxed),
                    total: b.progress.total.load(Ordering::Relaxed),
                    sent: b.progress.sent.load(Ordering::Relaxed),
                    elapsed_ms: b
                        .ended
                        .unwrap_or_else(Instant::now)
                        .duration_since(b.started)
                        .as_millis() as u64,
                    finished: b.ended.is_some(),
                    error: b.error.clone(),
                });
                ReplicaView {
                    node: r.node,
                    state: state.into(),
                    reason,
                    rebuild,
                }
            })
            .collect();
        // A replica being added joins the member list only once its snapshot
        // layers are copied: show it meanwhile (or why it never joined).
        let mut replicas: Vec<ReplicaView> = replicas;
        for (label, b) in rebuilds.iter() {
            if replicas.iter().any(|r| &r.node == label) {
                continue;
            }
            let (state, reason) = match (&b.ended, &b.error) {
                (None, _) => ("adding", None),
                (Some(_), Some(e)) => ("failed", Some(e.clone())),
                (Some(_), None) => continue, // added, then removed
            };
            replicas.push(ReplicaView {
                node: label.clone(),
                state: state.into(),
                reason,
                rebuild: Some(RebuildView {
                    done: b.progress.done.load(Ordering::Relaxed),
                    total: b.progress.total.load(Ordering::Relaxed),
                    sent: b.progress.sent.load(Ordering::Relaxed),
                    elapsed_ms: b
                        .ended
                        .unwrap_or_else(Instant::now)
                        .duration_since(b.started)
                        .as_millis() as u64,
                    finished: b.ended.is_some(),
                    error: b.error.clone(),
                }),
            });
        }
        StatusView {
            volume: self.volume.name().to_string(),
            size: self.volume.size(),
            robustness: match st.robustness {
                Robustness::Healthy => "healthy",
                Robustness::Degraded => "degraded",
                Robustness::Faulted => "faulted",
            }
            .into(),
            generation: st.generation,
            epoch: st.epoch,
            replicas,
        }
    }

    /// Adds a replica and starts its rebuild in the background.
    pub async fn add(self: &Arc<Self>, replica: &str) -> Result<()> {
        let node = (self.resolve)(replica)?;
        let label = node.label();
        {
            let mut rb = self.rebuilds.lock().unwrap_or_else(|e| e.into_inner());
            if rb.get(&label).is_some_and(|b| b.ended.is_none()) {
                return Err(Error::Busy {
                    kind: "replica",
                    name: label,
                    reason: "its rebuild is already running".into(),
                });
            }
            rb.insert(
                label.clone(),
                Rebuild {
                    progress: Arc::new(RebuildProgress::default()),
                    started: Instant::now(),
                    ended: None,
                    error: None,
                },
            );
        }
        let progress = self
            .rebuilds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&label)
            .map(|b| b.progress.clone())
            .unwrap_or_default();
        let me = self.clone();
        tokio::spawn(async move {
            let r = me.volume.add_replica(node, progress).await;
            if let Err(e) = &r {
                tracing::warn!(volume = %me.volume.name(), replica = %label, error = %e, "rebuild failed");
            }
            let mut rb = me.rebuilds.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = rb.get_mut(&label) {
                b.ended = Some(Instant::now());
                b.error = r.err().map(|e| e.to_string());
            }
        });
        Ok(())
    }

    /// Removes a replica from the set.
    pub async fn remove(&self, replica: &str) -> Result<()> {
        let labels: Vec<String> = self
            .volume
            .status()
            .await
            .replicas
            .into_iter()
            .map(|r| r.node)
            .collect();
        let label = if labels.iter().any(|l| l == replica) {
            replica.to_string()
        } else {
            (self.resolve)(replica)?.label()
        };
        self.volume.remove_replica(&label).await
    }

    async fn handle(self: &Arc<Self>, line: &str) -> ControlReply {
        let r = match serde_json::from_str::<ControlRequest>(line) {
            Err(e) => Err(Error::invalid("control request", e.to_string())),
            Ok(ControlRequest::Status) => Ok(()),
            Ok(ControlRequest::Add { replica }) => self.add(&replica).await,
            Ok(ControlRequest::Remove { replica }) => self.remove(&replica).await,
            Ok(ControlRequest::Snapshot { name }) => self.volume.snapshot(&name).await.map(|_| ()),
        };
        match r {
            Ok(()) => ControlReply {
                ok: true,
                error: None,
                status: Some(self.status().await),
            },
            Err(e) => ControlReply {
                ok: false,
                error: Some(error_chain(&e)),
                status: None,
            },
        }
    }

    /// Listens on the unix socket `path` (replacing a stale one) and serves
    /// clients in the background until the returned task is aborted.
    pub fn serve(self: &Arc<Self>, path: &Path) -> Result<tokio::task::JoinHandle<()>> {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)
            .map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
        let me = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = l.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let (rd, mut wr) = sock.into_split();
                    let mut rd = BufReader::new(rd).take(u64::MAX);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        rd.set_limit(MAX_LINE as u64);
                        match rd.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if !line.ends_with('\n') && line.len() >= MAX_LINE {
                            return;
                        }
                        let reply = me.handle(line.trim()).await;
                        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
                        out.push(b'\n');
                        if wr.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Sends one request to the control socket at `path` and waits for the reply
/// (blocking; for command-line tools).
pub fn call(path: &Path, req: &ControlRequest) -> Result<ControlReply> {
    use std::io::{BufRead, Read, Write};
    let io = |what: String| move |e: std::io::Error| Error::io(what, e);
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(io(format!("connect to {}", path.display())))?;
    let mut line = serde_json::to_vec(req).map_err(|e| Error::Backend {
        backend: "control",
        message: "encode request".into(),
        source: Some(Box::new(e)),
    })?;
    line.push(b'\n');
    s.write_all(&line)
        .map_err(io(format!("send to {}", path.display())))?;
    let mut reply = String::new();
    std::io::BufReader::new(&s)
        .take(MAX_LINE as u64 * 16)
        .read_line(&mut reply)
        .map_err(io(format!("read from {}", path.display())))?;
    serde_json::from_str(&reply).map_err(|e| {
        Error::invalid(
            format!("control reply from {}", path.display()),
            e.to_string(),
        )
    })
}
