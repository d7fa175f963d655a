//! Backups through the daemon with real parts: the gRPC API over the redb
//! store, the controllers on a local storage pool, and a `file://` backup
//! target read back with hci-backup itself.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hci_backup::Repository;
use hci_compute::KvmHypervisor;
use hci_core::backup::BackupEngine;
use hci_core::block::WriteFlags;
use hci_core::model::{
    Backup, BackupPhase, BackupTarget, BootSpec, ByteSize, ConditionStatus, Resource, RunStrategy,
    Schedule, VirtualMachine, Volume, VolumePhase,
};
use hci_core::volume::{OpenVolume, VolumeBackend};
use hci_daemon::api::{Api, bind_unix, serve_listener};
use hci_daemon::controllers::schedule::RUN_NOW_ANNOTATION;
use hci_daemon::controllers::{Controllers, NodeInfo, Runtime};
use hci_daemon::proto;
use hci_daemon::proto::backup_service_client::BackupServiceClient;
use hci_daemon::proto::backup_target_service_client::BackupTargetServiceClient;
use hci_daemon::proto::schedule_service_client::ScheduleServiceClient;
use hci_daemon::proto::virtual_machine_service_client::VirtualMachineServiceClient;
use hci_daemon::proto::volume_service_client::VolumeServiceClient;
use hci_daemon::resources::ResourceStore;
use hci_daemon::store::RedbStateStore;
use hyper_util::rt::TokioIo;
use tempfile::TempDir;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint, Uri};

/// A hang guard, not a performance bound.
const WAIT: Duration = Duration::from_secs(120);

struct Daemon {
    channel: Channel,
    resources: ResourceStore,
    dir: TempDir,
    controllers: Controllers,
    _stop: oneshot::Sender<()>,
}

async fn start() -> Daemon {
    let dir = TempDir::new().expect("temp dir");
    let store = RedbStateStore::open(dir.path().join("state.redb"))
        .await
        .expect("open store");
    let resources = ResourceStore::new(Arc::new(store));
    let node = NodeInfo::detect("test-node", dir.path(), 0).expect("node");
    let kvm = KvmHypervisor::new().with_entropy(false);
    let rt = Runtime::new(resources.clone(), dir.path(), node, Arc::new(kvm)).expect("runtime");
    let controllers = Controllers::start(rt).await.expect("controllers");
    let api = Api::new(resources.clone());
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
        resources,
        dir,
        controllers,
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

async fn create(d: &Daemon, kind: &str, json: String) {
    let req = proto::CreateRequest { json };
    let r = match kind {
        "Volume" => VolumeServiceClient::new(d.channel.clone())
            .create(req)
            .await
            .map(|_| ()),
        "VirtualMachine" => VirtualMachineServiceClient::new(d.channel.clone())
            .create(req)
            .await
            .map(|_| ()),
        "Backup" => BackupServiceClient::new(d.channel.clone())
            .create(req)
            .await
            .map(|_| ()),
        "BackupTarget" => BackupTargetServiceClient::new(d.channel.clone())
            .create(req)
            .await
            .map(|_| ()),
        "Schedule" => ScheduleServiceClient::new(d.channel.clone())
            .create(req)
            .await
            .map(|_| ()),
        other => panic!("no client for {other}"),
    };
    r.unwrap_or_else(|e| panic!("create {kind}: {e}"));
}

async fn volume(d: &Daemon, name: &str, size: &str) {
    create(
        d,
        "Volume",
        format!(
            r#"{{"apiVersion":"hci.dev/v1","kind":"Volume","metadata":{{"name":"{name}"}},"spec":{{"size":"{size}"}}}}"#
        ),
    )
    .await;
    wait_for::<Volume>(d, name, "Detached (ready)", |v| {
        v.status_or_default().phase == VolumePhase::Detached
    })
    .await;
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            if i % 4096 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            (x >> (i % 8 * 8)) as u8 ^ (i / 7) as u8
        })
        .collect()
}

async fn write(d: &Daemon, name: &str, data: &[u8], offset: u64) {
    let dev = d
        .controllers
        .runtime()
        .volumes
        .open(name, OpenVolume::default())
        .await
        .expect("open pool volume");
    dev.write_at(data, offset, WriteFlags::default())
        .await
        .expect("write");
    dev.flush().await.expect("flush");
}

async fn read(d: &Daemon, name: &str, len: u64) -> Vec<u8> {
    let dev = d
        .controllers
        .runtime()
        .volumes
        .open(name, OpenVolume::default())
        .await
        .expect("open pool volume");
    let mut buf = vec![0u8; len as usize];
    dev.read_at(&mut buf, 0).await.expect("read");
    buf
}

async fn backup(d: &Daemon, name: &str, source: &str) -> Backup {
    create(
        d,
        "Backup",
        format!(
            r#"{{"apiVersion":"hci.dev/v1","kind":"Backup","metadata":{{"name":"{name}"}},"spec":{{"source":{source},"target":"nfs"}}}}"#
        ),
    )
    .await;
    wait_for::<Backup>(d, name, "Completed", |b| {
        let p = b.status_or_default().phase;
        assert_ne!(p, BackupPhase::Failed, "{b:#?}");
        p == BackupPhase::Completed
    })
    .await
}

async fn snapshots(d: &Daemon, volume: &str) -> Vec<String> {
    d.controllers
        .runtime()
        .volumes
        .list_snapshots(volume)
        .await
        .expect("snapshots")
        .into_iter()
        .map(|s| s.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restore_and_schedules_through_the_daemon() {
    let d = start().await;
    let target_dir = d.dir.path().join("backups");
    create(
        &d,
        "BackupTarget",
        format!(
            r#"{{"apiVersion":"hci.dev/v1","kind":"BackupTarget","metadata":{{"name":"nfs"}},"spec":{{"url":"file://{}"}}}}"#,
            target_dir.display()
        ),
    )
    .await;
    wait_for::<BackupTarget>(&d, "nfs", "Available", |t| {
        t.status_or_default()
            .conditions
            .iter()
            .any(|c| c.kind == "Available" && c.status == ConditionStatus::True)
    })
    .await;

    // A volume backup, then an incremental one.
    const MIB: u64 = 1 << 20;
    volume(&d, "data", "8Mi").await;
    let data = pattern(6 * MIB as usize, 1);
    write(&d, "data", &data, 0).await;
    assert!(
        read(&d, "data", 6 * MIB).await == data,
        "the write did not land"
    );
    let b1 = backup(&d, "b1", r#"{"kind":"volume","name":"data"}"#).await;
    let s1 = b1.status_or_default();
    assert_eq!(s1.progress, 100);
    assert!(s1.added.is_some_and(|a| a.0 > MIB), "{s1:?}");
    for i in 0..8u64 {
        write(
            &d,
            "data",
            &pattern(4096, 100 + i),
            i * 997 * 4096 % (8 * MIB),
        )
        .await;
    }
    let b2 = backup(&d, "b2", r#"{"kind":"volume","name":"data"}"#).await;
    let s2 = b2.status_or_default();
    assert!(
        s2.added.is_some_and(|a| a.0 < MIB / 2),
        "incremental: {s2:?}"
    );
    assert!(
        s2.read.is_some_and(|r| r.0 <= 64 * 4096),
        "read only the changed blocks: {s2:?}"
    );
    let snaps = snapshots(&d, "data").await;
    assert!(snaps.contains(&"hci.backup-b2".to_string()), "{snaps:?}");
    assert!(!snaps.contains(&"hci.backup-b1".to_string()), "{snaps:?}");

    // Restore it into a new volume through the API.
    BackupServiceClient::new(d.channel.clone())
        .restore_backup(proto::RestoreBackupRequest {
            backup: "b2".into(),
            volume: "restored".into(),
            size: 0,
            vm: String::new(),
        })
        .await
        .expect("restore");
    wait_for::<Volume>(&d, "restored", "Detached (ready)", |v| {
        v.status_or_default().phase == VolumePhase::Detached
    })
    .await;
    assert!(
        read(&d, "restored", 8 * MIB).await == read(&d, "data", 8 * MIB).await,
        "restored volume differs"
    );

    // A whole VM: its volumes and spec, restored as a new VM.
    volume(&d, "boot", "4Mi").await;
    write(&d, "boot", &pattern(3 * MIB as usize, 9), 0).await;
    let vm = VirtualMachine::builder("web")
        .memory(ByteSize::mib(64))
        .boot(BootSpec::kernel("guest:blk", "stay=1"))
        .disk("root", "boot")
        .disk("data", "data")
        .run_strategy(RunStrategy::Halted)
        .build();
    create(
        &d,
        "VirtualMachine",
        serde_json::to_string(&vm).expect("json"),
    )
    .await;
    let vb = backup(&d, "web-1", r#"{"kind":"virtualMachine","name":"web"}"#).await;
    assert!(vb.status_or_default().backup_id.is_some());
    let restored = BackupServiceClient::new(d.channel.clone())
        .restore_backup(proto::RestoreBackupRequest {
            backup: "web-1".into(),
            volume: String::new(),
            size: 0,
            vm: "web2".into(),
        })
        .await
        .expect("restore VM")
        .into_inner();
    assert!(restored.json.contains("web2-boot"), "{}", restored.json);
    let web2: VirtualMachine = d.resources.get("web2").await.expect("web2");
    let disks: Vec<&str> = web2.spec.disks.iter().map(|x| x.volume.as_str()).collect();
    assert_eq!(disks, vec!["web2-boot", "web2-data"]);
    for (new, old, size) in [
        ("web2-boot", "boot", 4 * MIB),
        ("web2-data", "data", 8 * MIB),
    ] {
        wait_for::<Volume>(&d, new, "Detached (ready)", |v| {
            v.status_or_default().phase == VolumePhase::Detached
        })
        .await;
        assert!(
            read(&d, new, size).await == read(&d, old, size).await,
            "{new} differs"
        );
    }

    // Deleting a Backup deletes it from the target.
    let repo = Repository::open(
        Arc::new(hci_backup::FsTarget::filesystem(&target_dir).expect("target")),
        None,
    )
    .await
    .expect("open repo");
    let id1 = s1.backup_id.clone().expect("id");
    assert!(repo.list().await.expect("list").iter().any(|b| b.id == id1));
    d.resources
        .delete::<Backup>("b1", None)
        .await
        .expect("delete b1");
    let deadline = Instant::now() + WAIT;
    while repo.list().await.expect("list").iter().any(|b| b.id == id1) {
        assert!(Instant::now() < deadline, "b1 never left the target");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(repo.list_vm_backups().await.expect("vm backups").len(), 1);

    // A schedule (run on demand here; cron decides otherwise), with retention.
    create(
        &d,
        "Schedule",
        r#"{"apiVersion":"hci.dev/v1","kind":"Schedule","metadata":{"name":"nightly"},"spec":{"cron":"0 3 * * *","task":{"type":"backup","target":"nfs"},"source":{"kind":"volume","name":"data"},"retain":1}}"#.into(),
    )
    .await;
    let s = wait_for::<Schedule>(&d, "nightly", "scheduled", |s| {
        s.status_or_default().next_run.is_some()
    })
    .await;
    assert!(s.status_or_default().last_run.is_none());
    let mut made: Vec<String> = Vec::new();
    for round in 0..3 {
        d.resources
            .modify::<Schedule, _>("nightly", None, |s| {
                s.metadata
                    .annotations
                    .insert(RUN_NOW_ANNOTATION.into(), round.to_string());
                Ok(())
            })
            .await
            .expect("run now");
        let s = wait_for::<Schedule>(&d, "nightly", "run", |s| {
            !s.metadata.annotations.contains_key(RUN_NOW_ANNOTATION)
        })
        .await;
        let result = s.status_or_default().last_result;
        assert!(result.starts_with("backup nightly-"), "{result}");
        let name = result
            .split_whitespace()
            .nth(1)
            .expect("backup name")
            .to_string();
        let b = wait_for::<Backup>(&d, &name, "Completed", |b| {
            b.status_or_default().phase == BackupPhase::Completed
        })
        .await;
        if round > 0 {
            assert!(
                b.status_or_default().read.is_some_and(|r| r.0 < MIB),
                "{b:#?}"
            );
        }
        made.push(name);
    }
    let left: Vec<String> = d
        .resources
        .list::<Backup>()
        .await
        .expect("list")
        .items
        .iter()
        .filter(|b| b.metadata.labels.contains_key("hci.dev/schedule"))
        .map(|b| b.name().to_string())
        .collect();
    assert_eq!(
        left,
        made[1..].to_vec(),
        "retain 1 (+ the base of the newest)"
    );
    d.controllers.shutdown().await;
}
