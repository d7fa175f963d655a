//! Malformed and hostile NBD clients: errors or closed connections, never a
//! panic, never a changed device.

use std::sync::Arc;
use std::time::Duration;

use hci_core::block::{BlockDevice, WriteFlags};
use hci_core::memory::MemBlockDevice;
use hci_storage::nbd::constants::*;
use hci_storage::nbd::{ExportOptions, NbdServer};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(5);

fn server(read_only: bool) -> (Arc<NbdServer>, Arc<MemBlockDevice>) {
    let dev = Arc::new(MemBlockDevice::new(1 << 20));
    let s = Arc::new(NbdServer::new());
    s.add_export(
        "disk",
        dev.clone(),
        ExportOptions {
            read_only,
            description: String::new(),
        },
    )
    .expect("export");
    (s, dev)
}

/// Connects an in-memory client; the server side runs in a task.
fn connect(s: &Arc<NbdServer>) -> (DuplexStream, tokio::task::JoinHandle<hci_core::Result<()>>) {
    let (client, srv) = tokio::io::duplex(1 << 20);
    let s = s.clone();
    (
        client,
        tokio::spawn(async move { s.serve_connection(srv).await }),
    )
}

async fn hello(c: &mut DuplexStream, flags: u32) {
    let mut h = [0u8; 18];
    c.read_exact(&mut h).await.expect("hello");
    assert_eq!(&h[..8], &NBDMAGIC.to_be_bytes());
    c.write_all(&flags.to_be_bytes()).await.expect("flags");
}

async fn option(c: &mut DuplexStream, opt: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    c.write_all(&b).await.expect("option");
}

/// Reads one option reply: (reply type, payload).
async fn reply(c: &mut DuplexStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    timeout(T, c.read_exact(&mut h))
        .await
        .expect("timely")
        .expect("reply");
    assert_eq!(&h[..8], &REPLY_MAGIC.to_be_bytes());
    let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
    let mut p = vec![0u8; len];
    c.read_exact(&mut p).await.expect("payload");
    (kind, p)
}

/// Handshakes to transmission on `disk` with simple replies.
async fn go(c: &mut DuplexStream) {
    hello(c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"disk");
    d.extend_from_slice(&0u16.to_be_bytes());
    option(c, OPT_GO, &d).await;
    loop {
        let (kind, _) = reply(c).await;
        if kind == REP_ACK {
            return;
        }
        assert_eq!(kind, REP_INFO);
    }
}

async fn request(c: &mut DuplexStream, kind: u16, offset: u64, length: u32, payload: &[u8]) {
    let r = Request {
        flags: 0,
        kind,
        cookie: 77,
        offset,
        length,
    };
    c.write_all(&r.encode()).await.expect("request");
    c.write_all(payload).await.expect("payload");
}

/// Reads a simple reply's error code.
async fn simple_error(c: &mut DuplexStream) -> u32 {
    let mut h = [0u8; 16];
    timeout(T, c.read_exact(&mut h))
        .await
        .expect("timely")
        .expect("reply");
    assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(
        u64::from_be_bytes(h[8..16].try_into().expect("8 bytes")),
        77
    );
    u32::from_be_bytes([h[4], h[5], h[6], h[7]])
}

async fn closed(c: &mut DuplexStream, srv: tokio::task::JoinHandle<hci_core::Result<()>>) {
    let mut b = [0u8; 64];
    let n = timeout(T, c.read(&mut b))
        .await
        .expect("server closes")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected a closed connection");
    let r = timeout(T, srv).await.expect("server task ends");
    assert!(r.is_ok(), "the server task panicked");
}

#[tokio::test]
async fn bad_handshakes_close_the_connection() {
    let (s, _) = server(false);
    // Old-style client flags.
    let (mut c, srv) = connect(&s);
    hello(&mut c, 0).await;
    closed(&mut c, srv).await;
    // Bad option magic.
    let (mut c, srv) = connect(&s);
    hello(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
    c.write_all(&[0xde; 16]).await.expect("write");
    closed(&mut c, srv).await;
    // An absurd option length.
    let (mut c, srv) = connect(&s);
    hello(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&0x8000_0000u32.to_be_bytes());
    c.write_all(&b).await.expect("write");
    closed(&mut c, srv).await;
    // Unknown export by EXPORT_NAME: closed.
    let (mut c, srv) = connect(&s);
    hello(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
    option(&mut c, OPT_EXPORT_NAME, b"nope").await;
    closed(&mut c, srv).await;
}

#[tokio::test]
async fn bad_options_get_errors_and_the_session_goes_on() {
    let (s, _) = server(false);
    let (mut c, _srv) = connect(&s);
    hello(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    option(&mut c, 999, b"").await;
    assert_eq!(reply(&mut c).await.0, REP_ERR_UNSUP);
    option(&mut c, OPT_GO, &[0, 0, 0, 50, 1]).await;
    assert_eq!(reply(&mut c).await.0, REP_ERR_INVALID);
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"nope");
    d.extend_from_slice(&0u16.to_be_bytes());
    option(&mut c, OPT_INFO, &d).await;
    assert_eq!(reply(&mut c).await.0, REP_ERR_UNKNOWN);
    option(&mut c, OPT_LIST, b"x").await;
    assert_eq!(reply(&mut c).await.0, REP_ERR_INVALID);
    option(&mut c, OPT_SET_META_CONTEXT, &[0; 8]).await;
    assert_eq!(
        reply(&mut c).await.0,
        REP_ERR_INVALID,
        "meta context before structured replies"
    );
    option(&mut c, OPT_LIST, b"").await;
    let (k, p) = reply(&mut c).await;
    assert_eq!((k, &p[4..]), (REP_SERVER, b"disk".as_slice()));
    assert_eq!(reply(&mut c).await.0, REP_ACK);
}

#[tokio::test]
async fn bad_requests_get_errors_and_change_nothing() {
    let (s, dev) = server(false);
    dev.write_at(&[5u8; 4096], 0, WriteFlags::default())
        .await
        .expect("seed");
    let (mut c, srv) = connect(&s);
    go(&mut c).await;
    request(&mut c, CMD_READ, 0, 64 << 20, &[]).await;
    assert_eq!(
        simple_error(&mut c).await,
        EINVAL,
        "read larger than the maximum"
    );
    request(&mut c, CMD_READ, (1 << 20) - 100, 4096, &[]).await;
    assert_eq!(simple_error(&mut c).await, EINVAL, "read past the end");
    request(&mut c, CMD_READ, u64::MAX - 10, 4096, &[]).await;
    assert_eq!(
        simple_error(&mut c).await,
        EINVAL,
        "read with overflowing offset"
    );
    request(&mut c, CMD_WRITE, 1 << 20, 512, &[1u8; 512]).await;
    assert_eq!(simple_error(&mut c).await, ENOSPC, "write past the end");
    request(&mut c, CMD_WRITE_ZEROES, 0, 0x7fff_ffff, &[]).await;
    assert_eq!(
        simple_error(&mut c).await,
        ENOSPC,
        "write-zeroes past the end"
    );
    request(&mut c, 99, 0, 0, &[]).await;
    assert_eq!(simple_error(&mut c).await, EINVAL, "unknown command");
    request(&mut c, CMD_BLOCK_STATUS, 0, 4096, &[]).await;
    assert_eq!(
        simple_error(&mut c).await,
        EINVAL,
        "block status without a context"
    );
    // A huge write payload: the stream cannot be trusted, so it is closed.
    request(&mut c, CMD_WRITE, 0, u32::MAX, &[]).await;
    closed(&mut c, srv).await;
    let mut b = vec![0u8; 4096];
    dev.read_at(&mut b, 0).await.expect("read");
    assert!(b.iter().all(|&x| x == 5), "the device changed");
    // The server still serves new connections.
    let (mut c, _srv) = connect(&s);
    go(&mut c).await;
    request(&mut c, CMD_READ, 0, 16, &[]).await;
    assert_eq!(simple_error(&mut c).await, 0);
}

#[tokio::test]
async fn read_only_exports_answer_eperm() {
    let (s, dev) = server(true);
    let (mut c, _srv) = connect(&s);
    go(&mut c).await;
    request(&mut c, CMD_WRITE, 0, 4096, &[1u8; 4096]).await;
    assert_eq!(simple_error(&mut c).await, EPERM);
    request(&mut c, CMD_TRIM, 0, 4096, &[]).await;
    assert_eq!(simple_error(&mut c).await, EPERM);
    request(&mut c, CMD_FLUSH, 0, 0, &[]).await;
    assert_eq!(simple_error(&mut c).await, 0);
    assert_eq!(dev.allocated(), 0);
}

#[tokio::test]
async fn truncated_requests_end_the_connection_quietly() {
    let (s, _) = server(false);
    let (mut c, srv) = connect(&s);
    go(&mut c).await;
    c.write_all(
        &Request {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: 4096,
        }
        .encode(),
    )
    .await
    .expect("header");
    c.write_all(&[0u8; 100]).await.expect("part of the payload");
    c.shutdown().await.expect("shutdown");
    let r = timeout(T, srv).await.expect("server task ends");
    assert!(r.is_ok(), "the server task panicked");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random bytes after a valid handshake never panic the server or hang it.
    #[test]
    fn random_streams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), handshake in any::<bool>()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let (s, _) = server(false);
            let (mut c, srv) = connect(&s);
            if handshake {
                go(&mut c).await;
            } else {
                let mut h = [0u8; 18];
                c.read_exact(&mut h).await.expect("hello");
            }
            let _ = c.write_all(&bytes).await;
            let _ = c.shutdown().await;
            // Drain whatever the server answers.
            let drain = async { let mut sink = Vec::new(); let _ = c.read_to_end(&mut sink).await; };
            let _ = timeout(T, drain).await;
            let r = timeout(T, srv).await.expect("the server task ends");
            assert!(r.is_ok(), "the server task panicked");
        });
    }
}
