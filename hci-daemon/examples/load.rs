//! Load benchmark of the daemon's API: creates N VM definitions through gRPC
//! over a Unix socket (every write durable), reports p50/p99 latency and
//! throughput, then measures watch fan-out: W watchers follow VMs while M
//! more are created, and the delay from each create's acknowledgement to
//! its arrival at every watcher is reported. Runs once per state store:
//! the embedded redb store, and etcd (a fresh single-member etcd started
//! for the run, data on the same disk), so the two read side by side.
//!
//! ```text
//! cargo run --release -p hci-daemon --example load -- [VMS] [CONCURRENCY] [WATCHERS] [STORES]
//! ```
//! Defaults: 1000 VMs, 16 concurrent clients, 50 watchers, stores
//! `redb,etcd` (etcd is skipped with a message when no `etcd` binary is
//! installed).

#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hci_core::model::{BootSpec, ByteSize, RunStrategy, VirtualMachine};
use hci_core::store::StateStore;
use hci_daemon::api::{Api, bind_unix, serve_listener};
use hci_daemon::proto;
use hci_daemon::proto::virtual_machine_service_client::VirtualMachineServiceClient;
use hci_daemon::resources::ResourceStore;
use hci_daemon::store::{EtcdServer, EtcdStateStore, RedbStateStore};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint, Uri};

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn vm_json(name: &str) -> String {
    let vm = VirtualMachine::builder(name)
        .cpus(2)
        .memory(ByteSize::gib(1))
        .boot(BootSpec::kernel("guest:spin", ""))
        .run_strategy(RunStrategy::Halted)
        .label("bench", "load")
        .build();
    serde_json::to_string(&vm).unwrap_or_default()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

async fn connect(socket: PathBuf) -> Result<Channel, Box<dyn std::error::Error>> {
    Ok(Endpoint::try_from("http://hci.invalid")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?)
}

/// Creates `names` with `concurrency` clients; returns per-create latencies
/// and when each create was acknowledged.
async fn create_all(
    channel: &Channel,
    names: Vec<String>,
    concurrency: usize,
) -> Result<(Vec<Duration>, HashMap<String, Instant>), Box<dyn std::error::Error>> {
    let queue = Arc::new(Mutex::new(names));
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = VirtualMachineServiceClient::new(channel.clone());
        let queue = queue.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some(name) = queue.lock().await.pop() else {
                    break;
                };
                let json = vm_json(&name);
                let t = Instant::now();
                client
                    .create(proto::CreateRequest { json })
                    .await
                    .map_err(|e| format!("create {name}: {e}"))?;
                let done = Instant::now();
                latencies.push(done - t);
                acked.lock().await.insert(name, done);
            }
            Ok::<_, String>(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    let acked = std::mem::take(&mut *acked.lock().await);
    Ok((all, acked))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vms = arg(1, 1000);
    let concurrency = arg(2, 16).max(1);
    let watchers = arg(3, 50);
    let stores = std::env::args()
        .nth(4)
        .unwrap_or_else(|| "redb,etcd".to_string());
    let mut results = Vec::new();
    for kind in stores.split(',') {
        let dir = tempfile::tempdir()?;
        let (store, _etcd): (Arc<dyn StateStore>, Option<EtcdServer>) = match kind {
            "redb" => (
                Arc::new(RedbStateStore::open(dir.path().join("state.redb")).await?),
                None,
            ),
            "etcd" => match EtcdServer::start_in(&dir.path().join("etcd")) {
                Ok(etcd) => (
                    Arc::new(EtcdStateStore::open(&etcd.url()).await?),
                    Some(etcd),
                ),
                Err(e) => {
                    println!("# etcd skipped: {e}");
                    continue;
                }
            },
            other => return Err(format!("unknown store {other:?} (redb or etcd)").into()),
        };
        let r = run(kind, store, dir.path(), vms, concurrency, watchers).await?;
        results.push((kind.to_string(), r));
    }
    if let [(a, ra), (b, rb)] = results.as_slice() {
        println!(
            "# {b} vs {a}: creates/s {:.2}x (>1: {b} faster), p99 {:.2}x (>1: {b} slower)",
            rb.0 / ra.0,
            rb.1.as_secs_f64() / ra.1.as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}

/// One run against `store`; returns (creates/s, p99 create latency).
async fn run(
    kind: &str,
    store: Arc<dyn StateStore>,
    dir: &std::path::Path,
    vms: usize,
    concurrency: usize,
    watchers: usize,
) -> Result<(f64, Duration), Box<dyn std::error::Error>> {
    let api = Api::new(ResourceStore::new(store));
    let socket = dir.join("hci.sock");
    let listener = bind_unix(&socket)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_listener(api, listener, async move {
        let _ = stopped.await;
    }));
    let _stop = stop;
    let channel = connect(socket.clone()).await?;

    println!(
        "# hci-daemon API load: {vms} VM creates, {concurrency} concurrent clients, {kind} in {}",
        dir.display()
    );
    let names: Vec<String> = (0..vms).map(|i| format!("vm-{i:05}")).collect();
    let start = Instant::now();
    let (lat, _) = create_all(&channel, names, concurrency).await?;
    let took = start.elapsed();
    let rate = vms as f64 / took.as_secs_f64();
    let p99 = percentile(&lat, 0.99);
    println!(
        "creates: {vms} in {:.3} s = {:.0}/s; latency p50 {} p99 {} max {}",
        took.as_secs_f64(),
        vms as f64 / took.as_secs_f64(),
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        ms(percentile(&lat, 1.0)),
    );

    // Watch fan-out.
    let mut client = VirtualMachineServiceClient::new(channel.clone());
    let list = client
        .list(proto::ListRequest::default())
        .await?
        .into_inner();
    let more = vms.min(200);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    for _ in 0..watchers {
        let mut c = VirtualMachineServiceClient::new(connect(socket.clone()).await?);
        let mut stream = c
            .watch(proto::WatchRequest {
                from_revision: list.revision + 1,
                name: String::new(),
            })
            .await?
            .into_inner();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(ev)) = stream.next().await {
                if let Some(r) = ev.resource {
                    let _ = tx.send((r.name, Instant::now()));
                }
            }
        });
    }
    drop(tx);
    let names: Vec<String> = (0..more).map(|i| format!("watched-{i:05}")).collect();
    let start = Instant::now();
    let (_, acked) = create_all(&channel, names, concurrency).await?;
    let mut delays = Vec::new();
    let expected = more * watchers;
    let deadline = Instant::now() + Duration::from_secs(60);
    while delays.len() < expected && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some((name, at))) => {
                if let Some(ack) = acked.get(&name) {
                    delays.push(at.saturating_duration_since(*ack));
                }
            }
            _ => break,
        }
    }
    let took = start.elapsed();
    delays.sort();
    println!(
        "watch fan-out: {more} creates x {watchers} watchers = {} events delivered of {expected} in {:.3} s; delay after ack p50 {} p99 {} max {}",
        delays.len(),
        took.as_secs_f64(),
        ms(percentile(&delays, 0.50)),
        ms(percentile(&delays, 0.99)),
        ms(percentile(&delays, 1.0)),
    );
    Ok((rate, p99))
}
