//! hci-core's conformance suites on replicas served over loopback TCP.

use std::ops::Deref;
use std::sync::Arc;

use hci_core::block::BlockDevice;
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};
use hci_storage::replica::ReplicaNode;
use hci_storage::replica::client::{RemoteNode, ServerAddr};
use hci_storage::replica::server::ReplicaServer;

const TOKEN: &[u8] = b"test-token";

/// A replica server on loopback in its own temporary directory.
struct Server {
    node: RemoteNode,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Deref for Server {
    type Target = RemoteNode;
    fn deref(&self) -> &RemoteNode {
        &self.node
    }
}

async fn server() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = ReplicaServer::new(dir.path(), TOKEN).expect("server");
    let (addr, task) = srv.spawn("127.0.0.1:0").await.expect("spawn");
    let node = RemoteNode::new(ServerAddr::new(addr.to_string(), TOKEN));
    Server {
        node,
        task,
        _dir: dir,
    }
}

mod remote_backend {
    hci_core::volume_backend_conformance!(super::server);
}

struct Dev {
    dev: Arc<dyn BlockDevice>,
    _s: Server,
}

impl Deref for Dev {
    type Target = dyn BlockDevice;
    fn deref(&self) -> &(dyn BlockDevice + 'static) {
        &*self.dev
    }
}

async fn device() -> Dev {
    let s = server().await;
    s.create("v", CreateVolume::new(32 << 20))
        .await
        .expect("create");
    let dev = s.open("v", OpenVolume::default()).await.expect("open");
    Dev { dev, _s: s }
}

mod remote_device {
    hci_core::block_device_conformance!(super::device);
}

#[tokio::test]
async fn wrong_token_is_refused() {
    let s = server().await;
    let bad = RemoteNode::new(ServerAddr::new(s.addr().addr.clone(), b"nope".to_vec()));
    let err = bad.list().await.expect_err("a wrong token must be refused");
    assert!(
        matches!(err, hci_core::Error::Invalid { .. }),
        "unexpected error {err:?}"
    );
    s.ping().await.expect("ping with the right token");
}

/// Garbage on the wire closes the connection; the server keeps serving others.
#[tokio::test]
async fn hostile_frames_close_only_their_connection() {
    use hci_storage::replica::proto;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server().await;
    let addr = s.addr().addr.clone();
    // A bad hello.
    let mut c = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    c.write_all(&[0xAB; 64]).await.expect("send");
    let mut buf = [0u8; 64];
    assert_eq!(
        c.read(&mut buf).await.unwrap_or(0),
        0,
        "bad hello not refused"
    );
    // A good hello, then a frame with a bad magic and one with a huge payload.
    for frame in [vec![0x5Au8; proto::REQUEST_LEN], {
        let mut h = proto::RequestHeader {
            op: proto::Op::Write,
            flags: 0,
            id: 1,
            offset: 0,
            length: 0,
            payload_len: 0,
            crc: 0,
        }
        .encode();
        h[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        h.to_vec()
    }] {
        let mut c = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        c.write_all(&proto::encode_hello(TOKEN).expect("hello"))
            .await
            .expect("send");
        let mut hb = [0u8; proto::HELLO_REPLY_LEN];
        c.read_exact(&mut hb).await.expect("hello reply");
        assert_eq!(
            proto::decode_hello_reply(&hb).ok(),
            Some((proto::VERSION, proto::HELLO_OK))
        );
        c.write_all(&frame).await.expect("send");
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "a hostile frame got a reply");
    }
    s.ping().await.expect("the server still serves");
}
