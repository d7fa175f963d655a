//! The gRPC API end to end: a server on a temporary Unix socket over the
//! redb store, driven through the generated tonic clients.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hci_core::model::{Resource, Volume};
use hci_daemon::api::{
    Api, ConsoleIo, ConsoleProvider, REQUESTED_ACTION, bind_unix, serve_listener,
};
use hci_daemon::proto;
use hci_daemon::proto::backup_service_client::BackupServiceClient;
use hci_daemon::proto::backup_target_service_client::BackupTargetServiceClient;
use hci_daemon::proto::virtual_machine_service_client::VirtualMachineServiceClient;
use hci_daemon::proto::volume_service_client::VolumeServiceClient;
use hci_daemon::proto::watch_event::Type;
use hci_daemon::resources::ResourceStore;
use hci_daemon::store::RedbStateStore;
use hyper_util::rt::TokioIo;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

/// A running server; stops when dropped.
struct Server {
    channel: Channel,
    socket: PathBuf,
    _stop: oneshot::Sender<()>,
    _dir: TempDir,
}

async fn start_with(configure: impl FnOnce(Api) -> Api) -> Server {
    let dir = TempDir::new().expect("temp dir");
    let store = RedbStateStore::open(dir.path().join("state.redb"))
        .await
        .expect("open store");
    let api = configure(Api::new(ResourceStore::new(Arc::new(store))));
    let socket = dir.path().join("hci.sock");
    let listener = bind_unix(&socket).expect("bind");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_listener(api, listener, async {
        let _ = stopped.await;
    }));
    let path = socket.clone();
    let channel = Endpoint::try_from("http://hci.invalid")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect");
    Server {
        channel,
        socket,
        _stop: stop,
        _dir: dir,
    }
}

async fn start() -> Server {
    start_with(|api| api).await
}

fn volume_json(name: &str, size: &str) -> String {
    format!(
        r#"{{"apiVersion":"hci.dev/v1","kind":"Volume","metadata":{{"name":"{name}"}},"spec":{{"size":"{size}"}}}}"#
    )
}

async fn create_volume(c: &mut VolumeServiceClient<Channel>, name: &str) -> proto::Resource {
    c.create(proto::CreateRequest {
        json: volume_json(name, "1Gi"),
    })
    .await
    .expect("create volume")
    .into_inner()
}

async fn next_event(w: &mut tonic::Streaming<proto::WatchEvent>) -> proto::WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("watch event in time")
        .expect("watch open")
        .expect("watch event")
}

#[tokio::test]
async fn volume_crud_conflict_and_watch() {
    let server = start().await;
    let mut c = VolumeServiceClient::new(server.channel.clone());

    let created = create_volume(&mut c, "data").await;
    assert_eq!(
        (created.kind.as_str(), created.name.as_str()),
        ("Volume", "data")
    );
    assert!(created.resource_version > 0);
    assert!(!created.uid.is_empty());
    let dup = c
        .create(proto::CreateRequest {
            json: volume_json("data", "1Gi"),
        })
        .await
        .expect_err("duplicate create");
    assert_eq!(dup.code(), Code::AlreadyExists);

    let got = c
        .get(proto::GetRequest {
            name: "data".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got, created);
    let list = c
        .list(proto::ListRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.items, vec![created.clone()]);
    let mut watch = c
        .watch(proto::WatchRequest {
            from_revision: list.revision + 1,
            name: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();

    // Update at the version read: accepted, new version.
    let mut v = Volume::from_json(&got.json).expect("document");
    v.spec.size = "2Gi".parse().expect("size");
    let updated = c
        .update(proto::UpdateRequest {
            json: v.to_json().expect("json"),
            resource_version: 0,
        })
        .await
        .expect("update")
        .into_inner();
    assert!(updated.resource_version > created.resource_version);
    assert!(updated.json.contains("\"2Gi\""), "{}", updated.json);

    // Update with the stale version: ABORTED naming both versions.
    let stale = c
        .update(proto::UpdateRequest {
            json: v.to_json().expect("json"),
            resource_version: created.resource_version,
        })
        .await
        .expect_err("stale update");
    assert_eq!(stale.code(), Code::Aborted);
    let expected = format!(
        "expected resource version {}, found {}",
        created.resource_version, updated.resource_version
    );
    assert!(stale.message().contains(&expected), "{}", stale.message());

    let stale_delete = c
        .delete(proto::DeleteRequest {
            name: "data".into(),
            resource_version: created.resource_version,
        })
        .await
        .expect_err("stale delete");
    assert_eq!(stale_delete.code(), Code::Aborted);
    let deleted = c
        .delete(proto::DeleteRequest {
            name: "data".into(),
            resource_version: updated.resource_version,
        })
        .await
        .expect("delete")
        .into_inner();
    let missing = c
        .get(proto::GetRequest {
            name: "data".into(),
        })
        .await
        .expect_err("get deleted");
    assert_eq!(missing.code(), Code::NotFound);

    let put = next_event(&mut watch).await;
    assert_eq!(put.r#type(), Type::Put);
    assert_eq!(
        put.resource.as_ref().map(|r| r.resource_version),
        Some(updated.resource_version)
    );
    let del = next_event(&mut watch).await;
    assert_eq!(del.r#type(), Type::Delete);
    assert_eq!(del.revision, deleted.revision);
    assert_eq!(del.resource.map(|r| r.name), Some("data".to_string()));
}

#[tokio::test]
async fn invalid_documents_name_every_field() {
    let server = start().await;
    let mut c = VolumeServiceClient::new(server.channel.clone());
    let err = c
        .create(proto::CreateRequest {
            json: volume_json("Bad_Name", "0"),
        })
        .await
        .expect_err("invalid volume");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("metadata.name"), "{}", err.message());
    assert!(err.message().contains("spec.size"), "{}", err.message());
    let err = c
        .create(proto::CreateRequest {
            json: "{not json".into(),
        })
        .await
        .expect_err("bad json");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .update(proto::UpdateRequest {
            json: volume_json("data", "1Gi"),
            resource_version: 0,
        })
        .await
        .expect_err("update of an absent volume");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn volume_and_backup_actions() {
    let server = start().await;
    let mut c = VolumeServiceClient::new(server.channel.clone());
    create_volume(&mut c, "src").await;
    let snap = c
        .snapshot_volume(proto::SnapshotVolumeRequest {
            volume: "src".into(),
            snapshot: "src-1".into(),
            labels: Default::default(),
        })
        .await
        .expect("snapshot")
        .into_inner();
    assert_eq!(
        (snap.kind.as_str(), snap.name.as_str()),
        ("Snapshot", "src-1")
    );
    let clone = c
        .clone_volume(proto::CloneVolumeRequest {
            volume: "src".into(),
            name: "copy".into(),
        })
        .await
        .expect("clone")
        .into_inner();
    assert!(
        clone
            .json
            .contains(r#""source":{"type":"volume","name":"src"}"#),
        "{}",
        clone.json
    );
    let grown = c
        .expand_volume(proto::ExpandVolumeRequest {
            volume: "copy".into(),
            size: 2 << 30,
            resource_version: 0,
        })
        .await
        .expect("expand")
        .into_inner();
    assert!(grown.json.contains("\"2Gi\""), "{}", grown.json);
    let shrink = c
        .expand_volume(proto::ExpandVolumeRequest {
            volume: "copy".into(),
            size: 1 << 30,
            resource_version: 0,
        })
        .await
        .expect_err("shrink");
    assert_eq!(shrink.code(), Code::InvalidArgument);
    let missing = c
        .snapshot_volume(proto::SnapshotVolumeRequest {
            volume: "nope".into(),
            snapshot: "x".into(),
            labels: Default::default(),
        })
        .await
        .expect_err("snapshot of an absent volume");
    assert_eq!(missing.code(), Code::NotFound);

    let mut targets = BackupTargetServiceClient::new(server.channel.clone());
    targets
        .create(proto::CreateRequest {
            json: r#"{"apiVersion":"hci.dev/v1","kind":"BackupTarget","metadata":{"name":"nfs"},"spec":{"url":"file:///backups"}}"#.into(),
        })
        .await
        .expect("create target");
    let mut backups = BackupServiceClient::new(server.channel.clone());
    backups
        .create(proto::CreateRequest {
            json: r#"{"apiVersion":"hci.dev/v1","kind":"Backup","metadata":{"name":"b1"},"spec":{"source":{"kind":"volume","name":"copy"},"target":"nfs"}}"#.into(),
        })
        .await
        .expect("create backup");
    let restored = backups
        .restore_backup(proto::RestoreBackupRequest {
            backup: "b1".into(),
            volume: "restored".into(),
            size: 0,
            vm: String::new(),
        })
        .await
        .expect("restore")
        .into_inner();
    assert!(
        restored
            .json
            .contains(r#""source":{"type":"backup","name":"b1"}"#),
        "{}",
        restored.json
    );
    assert!(
        restored.json.contains("\"2Gi\""),
        "takes the source's size: {}",
        restored.json
    );
}

fn vm_json(name: &str, strategy: &str) -> String {
    format!(
        r#"{{"apiVersion":"hci.dev/v1","kind":"VirtualMachine","metadata":{{"name":"{name}"}},
        "spec":{{"cpus":1,"memory":"256Mi","boot":{{"type":"firmware","kind":"uefi"}},"runStrategy":"{strategy}"}}}}"#
    )
}

#[tokio::test]
async fn vm_power_actions_record_intent() {
    let server = start().await;
    let mut c = VirtualMachineServiceClient::new(server.channel.clone());
    c.create(proto::CreateRequest {
        json: vm_json("web", "Halted"),
    })
    .await
    .expect("create vm");
    let action = |name: &str| proto::VmActionRequest {
        name: name.into(),
        resource_version: 0,
    };
    let started = c.start(action("web")).await.expect("start").into_inner();
    assert!(
        started.json.contains(r#""runStrategy":"Always""#),
        "{}",
        started.json
    );
    let restarted = c
        .restart(action("web"))
        .await
        .expect("restart")
        .into_inner();
    assert!(
        restarted.json.contains(REQUESTED_ACTION),
        "{}",
        restarted.json
    );
    let stopped = c.stop(action("web")).await.expect("stop").into_inner();
    assert!(
        stopped.json.contains(r#""runStrategy":"Halted""#),
        "{}",
        stopped.json
    );
    let stale = c
        .pause(proto::VmActionRequest {
            name: "web".into(),
            resource_version: started.resource_version,
        })
        .await
        .expect_err("stale action");
    assert_eq!(stale.code(), Code::Aborted);
    let err = c.start(action("nope")).await.expect_err("absent VM");
    assert_eq!(err.code(), Code::NotFound);

    // No console backend: a clear FAILED_PRECONDITION.
    let input = futures::stream::iter([proto::ConsoleInput {
        name: "web".into(),
        data: Vec::new(),
    }]);
    let err = c.console(input).await.expect_err("console without backend");
    assert_eq!(err.code(), Code::FailedPrecondition);
}

/// A console backend whose "guest" upper-cases what it is sent.
#[derive(Debug)]
struct ShoutingConsole;

#[tonic::async_trait]
impl ConsoleProvider for ShoutingConsole {
    async fn open(&self, _vm: &str) -> hci_core::Result<Box<dyn ConsoleIo>> {
        let (ours, mut guest) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            while let Ok(n) = guest.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                buf[..n].make_ascii_uppercase();
                if guest.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        Ok(Box::new(ours))
    }
}

#[tokio::test]
async fn console_streams_both_ways() {
    let server = start_with(|api| api.with_console(Arc::new(ShoutingConsole))).await;
    let mut c = VirtualMachineServiceClient::new(server.channel.clone());
    c.create(proto::CreateRequest {
        json: vm_json("web", "Always"),
    })
    .await
    .expect("create vm");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(proto::ConsoleInput {
        name: "web".into(),
        data: b"hello ".to_vec(),
    })
    .await
    .expect("send");
    let mut output = c
        .console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("console")
        .into_inner();
    tx.send(proto::ConsoleInput {
        name: String::new(),
        data: b"world".to_vec(),
    })
    .await
    .expect("send");
    let mut seen = Vec::new();
    while seen.len() < b"HELLO WORLD".len() {
        let chunk = tokio::time::timeout(Duration::from_secs(10), output.next())
            .await
            .expect("console output in time")
            .expect("console open")
            .expect("console chunk");
        seen.extend(chunk.data);
    }
    assert_eq!(seen, b"HELLO WORLD");
}

#[tokio::test]
async fn socket_is_private_and_health_and_reflection_answer() {
    let server = start().await;
    let mode = std::fs::metadata(&server.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel.clone());
    for service in [
        "hci.v1.VolumeService",
        "hci.v1.VirtualMachineService",
        "hci.v1.NodeService",
    ] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status();
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );
    }

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(server.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .next()
        .await
        .expect("a response")
        .expect("reflection answer");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "hci.v1.VirtualMachineService",
        "hci.v1.VolumeService",
        "hci.v1.ImageService",
        "hci.v1.SnapshotService",
        "hci.v1.NetworkService",
        "hci.v1.BackupService",
        "hci.v1.BackupTargetService",
        "hci.v1.ScheduleService",
        "hci.v1.NodeService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}
