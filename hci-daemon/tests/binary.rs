//! The `hci-daemon` binary: starts on a private socket, answers health
//! checks, keeps its state across restarts, and exits cleanly on SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hci_daemon::proto;
use hci_daemon::proto::volume_service_client::VolumeServiceClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

fn spawn(data_dir: &Path, socket: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_hci-daemon"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        // This test is about the API and the store; controllers would
        // update statuses between the reads it compares.
        .arg("--no-controllers")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn hci-daemon")
}

async fn connect(socket: &Path) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the daemon did not create its socket"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let path: PathBuf = socket.to_path_buf();
    Endpoint::try_from("http://hci.invalid")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect")
}

fn terminate(mut child: Child) {
    // SAFETY: `kill` has no memory-safety preconditions; the pid is our own
    // child, not yet reaped, so it cannot name another process.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "daemon exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_persists_and_stops_cleanly() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let data = dir.path().join("data");
    let socket = dir.path().join("hci.sock");

    let daemon = spawn(&data, &socket);
    let channel = connect(&socket).await;
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(&data)
        .expect("data dir")
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health");
    let mut volumes = VolumeServiceClient::new(channel);
    let created = volumes
        .create(proto::CreateRequest {
            json: r#"{"apiVersion":"hci.dev/v1","kind":"Volume","metadata":{"name":"keep"},"spec":{"size":"1Gi"}}"#.into(),
        })
        .await
        .expect("create")
        .into_inner();
    drop((health, volumes));
    terminate(daemon);
    assert!(!socket.exists(), "socket left behind");

    let daemon = spawn(&data, &socket);
    let mut volumes = VolumeServiceClient::new(connect(&socket).await);
    let got = volumes
        .get(proto::GetRequest {
            name: "keep".into(),
        })
        .await
        .expect("volume kept across restart")
        .into_inner();
    assert_eq!(got, created);
    drop(volumes);
    terminate(daemon);
}
