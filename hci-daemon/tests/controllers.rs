//! The daemon end to end with real parts: the gRPC API over the redb store,
//! the volume/snapshot/VM controllers on a local storage pool, and VMs on
//! hci's KVM VMM running the `blk` test guest on daemon-managed volumes.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hci_compute::KvmHypervisor;
use hci_core::model::{
    BootSpec, ByteSize, Resource, RunStrategy, Snapshot, SnapshotPhase, VirtualMachine, VmPhase,
    Volume, VolumePhase,
};
use hci_daemon::api::{Api, bind_unix, serve_listener};
use hci_daemon::controllers::{Controllers, NodeInfo, Runtime};
use hci_daemon::metrics::{MetricsSource, serve_metrics};
use hci_daemon::proto;
use hci_daemon::proto::snapshot_service_client::SnapshotServiceClient;
use hci_daemon::proto::virtual_machine_service_client::VirtualMachineServiceClient;
use hci_daemon::proto::volume_service_client::VolumeServiceClient;
use hci_daemon::resources::ResourceStore;
use hci_daemon::store::RedbStateStore;
use hci_net::{BackendOptions, LinuxBridgeBackend, NetNs};
use hyper_util::rt::TokioIo;
use tempfile::TempDir;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint, Uri};

const WAIT: Duration = Duration::from_secs(60);

struct Daemon {
    channel: Channel,
    metrics: MetricsSource,
    resources: ResourceStore,
    dir: TempDir,
    controllers: Option<Controllers>,
    _stop: oneshot::Sender<()>,
}

async fn start() -> Daemon {
    start_with(None).await
}

/// A daemon; with `netns`, its networks live in that network namespace.
async fn start_with(netns: Option<&str>) -> Daemon {
    let dir = TempDir::new().expect("temp dir");
    let store = RedbStateStore::open(dir.path().join("state.redb"))
        .await
        .expect("open store");
    let resources = ResourceStore::new(Arc::new(store));
    let node = NodeInfo::detect("test-node", dir.path(), 0).expect("node");
    let kvm = KvmHypervisor::new().with_entropy(false);
    let mut rt =
        Runtime::new(resources.clone(), dir.path(), node, Arc::new(kvm.clone())).expect("runtime");
    if let Some(ns) = netns {
        let backend = LinuxBridgeBackend::new(BackendOptions {
            netns: NetNs::named(ns).expect("open netns"),
            state_dir: Some(dir.path().join("net")),
            ..Default::default()
        })
        .await
        .expect("network backend");
        rt.networks = Some(Arc::new(backend));
        rt.taps = Some(kvm.taps().clone());
    }
    // Most test guests ignore Ctrl-Alt-Del: do not wait long for them.
    rt.stop_timeout = Duration::from_secs(1);
    let controllers = Controllers::start(rt).await.expect("controllers");
    let api = Api::new(resources.clone()).with_console(controllers.vms().clone());
    let metrics = MetricsSource {
        resources: resources.clone(),
        latency: api.latency().clone(),
        vms: Some(controllers.vms().clone()),
    };
    let socket = dir.path().join("hci.sock");
    let listener = bind_unix(&socket).expect("bind");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_listener(api, listener, async {
        let _ = stopped.await;
    }));
    let path: PathBuf = socket.clone();
    let channel = Endpoint::try_from("http://hci.invalid")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect");
    Daemon {
        channel,
        metrics,
        resources,
        dir,
        controllers: Some(controllers),
        _stop: stop,
    }
}

/// Polls `R` named `name` until `done` holds, panicking with the last
/// state seen after [`WAIT`].
async fn wait_for<R: Resource + std::fmt::Debug>(
    d: &Daemon,
    name: &str,
    what: &str,
    done: impl Fn(&R) -> bool,
) -> R {
    common::wait_for(&d.resources, name, what, WAIT, done).await
}

fn vm_phase(vm: &VirtualMachine) -> VmPhase {
    vm.status_or_default().phase
}

fn blk_vm(name: &str, volume: &str, strategy: RunStrategy) -> VirtualMachine {
    VirtualMachine::builder(name)
        .memory(ByteSize::mib(64))
        .boot(BootSpec::kernel("guest:blk", "stay=1"))
        .disk("data", volume)
        .run_strategy(strategy)
        .build()
}

async fn create<R: Resource + serde::Serialize>(d: &Daemon, r: &R) {
    let json = serde_json::to_string(r).expect("json");
    let req = proto::CreateRequest { json };
    match R::KIND {
        "Volume" => {
            VolumeServiceClient::new(d.channel.clone())
                .create(req)
                .await
                .expect("create volume");
        }
        "VirtualMachine" => {
            VirtualMachineServiceClient::new(d.channel.clone())
                .create(req)
                .await
                .expect("create VM");
        }
        other => panic!("no client for {other}"),
    }
}

/// Reads the VM's console until `needle` shows up; returns what was read.
async fn console_until(d: &Daemon, vm: &str, needle: &str) -> String {
    let (tx, rx) = mpsc::channel(4);
    tx.send(proto::ConsoleInput {
        name: vm.to_string(),
        data: vec![],
    })
    .await
    .expect("send");
    let mut out = VirtualMachineServiceClient::new(d.channel.clone())
        .console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("console")
        .into_inner();
    let mut seen = String::new();
    let deadline = Instant::now() + WAIT;
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, out.message()).await {
            Ok(Ok(Some(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk.data)),
            other => panic!("console of {vm} ended before {needle:?} ({other:?}); got {seen:?}"),
        }
    }
    drop(tx);
    seen
}

/// `GET /metrics` with a bare HTTP/1.0 request.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
        .await
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("response");
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_vms_snapshots_and_clones_through_the_api() {
    if !KvmHypervisor::available() {
        eprintln!("skipped: /dev/kvm is not usable here");
        return;
    }
    let d = start().await;

    // A volume appears in the pool and reports itself.
    create(&d, &Volume::blank("data", ByteSize::mib(64))).await;
    let vol: Volume = wait_for(&d, "data", "ready", |v: &Volume| {
        v.status_or_default().phase == VolumePhase::Detached
    })
    .await;
    assert_eq!(vol.status_or_default().size, Some(ByteSize::mib(64)));
    assert!(d.dir.path().join("volumes/data").is_dir());

    // A VM on it runs the disk test guest, which writes, flushes and reads
    // back a pattern, then stays up.
    create(&d, &blk_vm("vm1", "data", RunStrategy::Always)).await;
    let vm: VirtualMachine = wait_for(&d, "vm1", "Running", |v: &VirtualMachine| {
        vm_phase(v) == VmPhase::Running
    })
    .await;
    assert_eq!(vm.status_or_default().node.as_deref(), Some("test-node"));
    let out = console_until(&d, "vm1", "staying up").await;
    assert!(out.contains("virtio-blk OK"), "{out}");
    let vol: Volume = d.resources.get("data").await.expect("volume");
    assert_eq!(vol.status_or_default().attached_to.as_deref(), Some("vm1"));
    assert_eq!(vol.status_or_default().phase, VolumePhase::Attached);

    // Metrics over HTTP: resources by phase, the VM's disk I/O, API latency.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve_metrics(
        listener,
        d.metrics.clone(),
        std::future::pending(),
    ));
    let text = scrape(addr).await;
    assert!(text.contains("hci_vms{phase=\"Running\"} 1"), "{text}");
    assert!(text.contains("hci_volumes{phase=\"Attached\"} 1"), "{text}");
    assert!(
        text.contains("hci_volume_robustness{robustness=\"healthy\"} 1"),
        "{text}"
    );
    assert!(text.contains("hci_node_vms_running 1"), "{text}");
    let written = text
        .lines()
        .find(|l| l.starts_with("hci_vm_disk_written_bytes_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        written >= 4096,
        "the guest's disk writes are counted: {text}"
    );
    assert!(
        text.contains(
            "hci_api_request_duration_seconds_count{method=\"/hci.v1.VirtualMachineService/Create\"} 1"
        ),
        "{text}"
    );

    // Pause and resume through the API.
    let mut vms = VirtualMachineServiceClient::new(d.channel.clone());
    let action = |name: &str| proto::VmActionRequest {
        name: name.to_string(),
        resource_version: 0,
    };
    vms.pause(action("vm1")).await.expect("pause");
    wait_for(&d, "vm1", "Paused", |v: &VirtualMachine| {
        vm_phase(v) == VmPhase::Paused
    })
    .await;
    vms.resume(action("vm1")).await.expect("resume");
    wait_for(&d, "vm1", "Running again", |v: &VirtualMachine| {
        vm_phase(v) == VmPhase::Running
            && !v
                .metadata
                .annotations
                .contains_key(hci_daemon::api::REQUESTED_ACTION)
    })
    .await;

    // Snapshot the volume while the VM runs, then clone it into a second
    // VM's disk: that VM boots too.
    let mut volumes = VolumeServiceClient::new(d.channel.clone());
    volumes
        .snapshot_volume(proto::SnapshotVolumeRequest {
            volume: "data".into(),
            snapshot: "data-snap".into(),
            labels: Default::default(),
        })
        .await
        .expect("snapshot");
    let snap: Snapshot = wait_for(&d, "data-snap", "Ready", |s: &Snapshot| {
        s.status_or_default().phase == SnapshotPhase::Ready
    })
    .await;
    assert_eq!(snap.status_or_default().size, Some(ByteSize::mib(64)));
    volumes
        .clone_volume(proto::CloneVolumeRequest {
            volume: "data".into(),
            name: "data2".into(),
        })
        .await
        .expect("clone");
    wait_for(&d, "data2", "ready", |v: &Volume| {
        v.status_or_default().phase == VolumePhase::Detached
    })
    .await;
    create(&d, &blk_vm("vm2", "data2", RunStrategy::Manual)).await;
    // Manual: created stopped, started by an action.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let vm2: VirtualMachine = d.resources.get("vm2").await.expect("vm2");
    assert_ne!(
        vm_phase(&vm2),
        VmPhase::Running,
        "Manual VMs wait for start"
    );
    vms.start(action("vm2")).await.expect("start vm2");
    wait_for(&d, "vm2", "Running", |v: &VirtualMachine| {
        vm_phase(v) == VmPhase::Running
    })
    .await;
    let out = console_until(&d, "vm2", "staying up").await;
    assert!(out.contains("virtio-blk OK"), "{out}");

    // A second read-write user of an attached volume waits.
    create(&d, &blk_vm("vm3", "data", RunStrategy::Always)).await;
    let vm3: VirtualMachine = wait_for(&d, "vm3", "waiting", |v: &VirtualMachine| {
        v.status_or_default()
            .message
            .contains("attached to VM \"vm1\"")
    })
    .await;
    assert_eq!(vm_phase(&vm3), VmPhase::Pending);

    // Stop vm1 (Always → Halted): it stops and releases its volume, and vm3
    // gets it.
    vms.stop(action("vm1")).await.expect("stop");
    wait_for(&d, "vm1", "Stopped", |v: &VirtualMachine| {
        vm_phase(v) == VmPhase::Stopped
    })
    .await;
    wait_for(&d, "vm3", "Running", |v: &VirtualMachine| {
        vm_phase(v) == VmPhase::Running
    })
    .await;

    // Deleting a VM kills it and detaches its volume; deleting a volume
    // removes it from the pool.
    for vm in ["vm2", "vm3"] {
        vms.delete(proto::DeleteRequest {
            name: vm.into(),
            resource_version: 0,
        })
        .await
        .expect("delete VM");
    }
    wait_for(&d, "data2", "detached", |v: &Volume| {
        v.status_or_default().attached_to.is_none()
    })
    .await;
    volumes
        .delete(proto::DeleteRequest {
            name: "data2".into(),
            resource_version: 0,
        })
        .await
        .expect("delete volume");
    let pool = d.dir.path().join("volumes/data2");
    let deadline = Instant::now() + WAIT;
    while pool.exists() {
        assert!(Instant::now() < deadline, "the pool volume was not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let controllers = {
        let mut d = d;
        d.controllers.take()
    };
    if let Some(c) = controllers {
        c.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_vms_fail_with_a_reason_and_dangling_references_are_refused() {
    let d = start().await;
    // A kernel that does not exist: Failed, with the path in the message.
    let vm = VirtualMachine::builder("nokernel")
        .memory(ByteSize::mib(64))
        .boot(BootSpec::kernel("/nonexistent/vmlinux", ""))
        .run_strategy(RunStrategy::Always)
        .build();
    create(&d, &vm).await;
    let vm: VirtualMachine = wait_for(&d, "nokernel", "Failed", |v: &VirtualMachine| {
        vm_phase(v) == VmPhase::Failed
    })
    .await;
    assert!(
        vm.status_or_default()
            .message
            .contains("/nonexistent/vmlinux"),
        "{vm:#?}"
    );
    // More memory than the node has: Pending, unschedulable.
    let vm = VirtualMachine::builder("huge")
        .memory(ByteSize::gib(64 * 1024))
        .boot(BootSpec::kernel("guest:hello", ""))
        .build();
    create(&d, &vm).await;
    let vm: VirtualMachine = wait_for(&d, "huge", "unschedulable", |v: &VirtualMachine| {
        v.status_or_default().message.contains("lacks room")
    })
    .await;
    assert_eq!(vm_phase(&vm), VmPhase::Pending);
    // A snapshot of a volume that does not exist is refused at the API.
    let mut snaps = SnapshotServiceClient::new(d.channel.clone());
    let err = snaps
        .create(proto::CreateRequest {
            json: r#"{"apiVersion":"hci.dev/v1","kind":"Snapshot","metadata":{"name":"s1"},"spec":{"volume":"ghost"}}"#.into(),
        })
        .await
        .expect_err("references are checked");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
}

/// A network namespace for the test, deleted on drop.
struct TestNetns(String);

impl TestNetns {
    fn new(tag: &str) -> Option<Self> {
        let name = format!("hcid-{tag}-{}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| TestNetns(name))
    }

    fn exec(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("run in netns")
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_a_daemon_network_answers_ping() {
    if !KvmHypervisor::available() {
        eprintln!("skipped: /dev/kvm is not usable here");
        return;
    }
    let Some(ns) = TestNetns::new("ping") else {
        eprintln!("skipped: cannot create a network namespace (needs CAP_NET_ADMIN)");
        return;
    };
    let d = start_with(Some(&ns.0)).await;
    let net: hci_core::model::Network = serde_json::from_str(
        r#"{"apiVersion":"hci.dev/v1","kind":"Network","metadata":{"name":"mgmt"},
            "spec":{"kind":{"type":"management"},"cidr":"10.97.0.0/24","gateway":"10.97.0.1","uplink":"lo"}}"#,
    )
    .expect("network");
    let json = serde_json::to_string(&net).expect("json");
    hci_daemon::proto::network_service_client::NetworkServiceClient::new(d.channel.clone())
        .create(proto::CreateRequest { json })
        .await
        .expect("create network");
    let net: hci_core::model::Network =
        wait_for(&d, "mgmt", "ready", |n: &hci_core::model::Network| {
            n.status_or_default().ready_nodes == ["test-node"]
        })
        .await;
    assert!(net.status.is_some());

    let vm = VirtualMachine::builder("pingable")
        .memory(ByteSize::mib(64))
        .boot(BootSpec::kernel("guest:net", "ip=10.97.0.2"))
        .nic("eth0", "mgmt")
        .run_strategy(RunStrategy::Always)
        .build();
    create(&d, &vm).await;
    wait_for(&d, "pingable", "Running", |v: &VirtualMachine| {
        vm_phase(v) == VmPhase::Running
    })
    .await;
    let mac = vm.nic_mac(0).expect("mac").to_string();
    let out = console_until(&d, "pingable", "net up").await;
    let out = if out.contains("ip 10.97.0.2") {
        out
    } else {
        console_until(&d, "pingable", "ip 10.97.0.2").await
    };
    assert!(
        out.contains(&mac),
        "the guest uses the MAC derived from vm/nic ({mac}): {out}"
    );
    let ping = ns.exec(&["ping", "-c", "3", "-W", "5", "10.97.0.2"]);
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success() && text.contains("3 received"),
        "{text}"
    );

    // Deleting the VM removes its port; deleting the network its bridge.
    VirtualMachineServiceClient::new(d.channel.clone())
        .delete(proto::DeleteRequest {
            name: "pingable".into(),
            resource_version: 0,
        })
        .await
        .expect("delete VM");
    hci_daemon::proto::network_service_client::NetworkServiceClient::new(d.channel.clone())
        .delete(proto::DeleteRequest {
            name: "mgmt".into(),
            resource_version: 0,
        })
        .await
        .expect("delete network");
    let deadline = Instant::now() + WAIT;
    loop {
        let links = ns.exec(&["ip", "-o", "link"]);
        let links = String::from_utf8_lossy(&links.stdout).to_string();
        if links.lines().count() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "devices left behind: {links}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A static HTTP server (Python's) over `dir`, killed on drop.
struct HttpServer(std::process::Child, u16);

impl HttpServer {
    async fn start(dir: &std::path::Path) -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 http.server");
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "http.server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        HttpServer(child, port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_import_over_http_with_checksums_and_volumes_clone_them() {
    let files = TempDir::new().expect("temp dir");
    let mut raw = vec![0u8; 8 << 20];
    raw[(1 << 20)..(1 << 20) + 4096].fill(0xab);
    std::fs::write(files.path().join("disk.raw"), &raw).expect("write image");
    let sum = sha256_hex(&raw);
    let http = HttpServer::start(files.path()).await;
    let d = start().await;
    let image_json = |name: &str, checksum: &str| {
        format!(
            r#"{{"apiVersion":"hci.dev/v1","kind":"Image","metadata":{{"name":"{name}"}},
                "spec":{{"url":"http://127.0.0.1:{}/disk.raw","checksum":"sha256:{checksum}"}}}}"#,
            http.1
        )
    };
    let mut images =
        hci_daemon::proto::image_service_client::ImageServiceClient::new(d.channel.clone());
    images
        .create(proto::CreateRequest {
            json: image_json("base", &sum),
        })
        .await
        .expect("create image");
    images
        .create(proto::CreateRequest {
            json: image_json("tampered", &sum.replace(&sum[..4], "0000")),
        })
        .await
        .expect("create image");
    // A volume from an image waits for the import, then clones it.
    create(
        &d,
        &Volume::new(
            "from-image",
            hci_core::model::VolumeSpec::from_image(ByteSize::mib(16), "base"),
        ),
    )
    .await;
    let img: hci_core::model::Image =
        wait_for(&d, "base", "Ready", |i: &hci_core::model::Image| {
            i.status_or_default().phase == hci_core::model::ImagePhase::Ready
        })
        .await;
    assert_eq!(img.status_or_default().size, Some(ByteSize::mib(8)));
    assert_eq!(img.status_or_default().progress, 100);
    let bad: hci_core::model::Image =
        wait_for(&d, "tampered", "Failed", |i: &hci_core::model::Image| {
            i.status_or_default().phase == hci_core::model::ImagePhase::Failed
        })
        .await;
    assert!(
        bad.status_or_default().message.contains("mismatch"),
        "{bad:#?}"
    );
    // A failed import is retried with backoff, not in a tight loop of
    // Importing/Failed status writes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later: hci_core::model::Image = d.resources.get("tampered").await.expect("get");
    assert!(
        later.metadata.resource_version <= bad.metadata.resource_version + 2,
        "the failed import kept rewriting its status: version {} → {}",
        bad.metadata.resource_version,
        later.metadata.resource_version
    );
    let vol: Volume = wait_for(&d, "from-image", "ready", |v: &Volume| {
        v.status_or_default().phase == VolumePhase::Detached
    })
    .await;
    assert_eq!(vol.status_or_default().size, Some(ByteSize::mib(16)));
    // Thin: only the image's one written block came along.
    assert!(
        vol.status_or_default()
            .allocated
            .is_some_and(|a| a.0 <= 64 << 10),
        "{vol:#?}"
    );
    // Read the clone back through the daemon's pool.
    let pool = d
        .controllers
        .as_ref()
        .expect("controllers")
        .runtime()
        .volumes
        .clone();
    let dev = hci_core::volume::VolumeBackend::open(
        pool.as_ref(),
        "from-image",
        hci_core::volume::OpenVolume::default(),
    )
    .await
    .expect("open the cloned volume");
    let mut buf = vec![0u8; 8192];
    dev.read_at(&mut buf, (1 << 20) - 4096).await.expect("read");
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert!(buf[4096..].iter().all(|&b| b == 0xab));
}

/// The README's quickstart: every document of `examples/quickstart.yaml`
/// created through the API; the VM boots on its volume and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_example_boots() {
    if !KvmHypervisor::available() {
        eprintln!("skipped: /dev/kvm is not usable here");
        return;
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/quickstart.yaml");
    let yaml = std::fs::read_to_string(path).expect("read quickstart.yaml");
    let docs = hci_core::model::AnyResource::from_yaml_multi(&yaml).expect("parse");
    let d = start().await;
    for doc in &docs {
        let json = doc.to_json().expect("json");
        let req = proto::CreateRequest { json };
        match doc.kind() {
            "Volume" => {
                VolumeServiceClient::new(d.channel.clone())
                    .create(req)
                    .await
                    .expect("create volume");
            }
            "VirtualMachine" => {
                VirtualMachineServiceClient::new(d.channel.clone())
                    .create(req)
                    .await
                    .expect("create VM");
            }
            other => panic!("the quickstart grew a {other}: teach this test"),
        }
    }
    wait_for(&d, "demo", "Running", |v: &VirtualMachine| {
        vm_phase(v) == VmPhase::Running
    })
    .await;
    let out = console_until(&d, "demo", "staying up").await;
    assert!(out.contains("virtio-blk OK"), "{out}");
}
