//! The NBD server against real clients: qemu-io, qemu-img, nbdinfo and fio.
//! `scripts/install-deps.sh` installs them (qemu-utils, libnbd-bin, fio).

use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use hci_core::block::{BlockDevice, WriteFlags};
use hci_core::memory::MemBlockDevice;
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};
use hci_storage::local::LocalVolumeBackend;
use hci_storage::nbd::{ExportOptions, Listen, NbdServer, ServerHandle};
use tokio::process::Command;

async fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {cmd} ({e}); run scripts/install-deps.sh"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn serve(
    dir: &Path,
    exports: Vec<(&str, Arc<dyn BlockDevice>, ExportOptions)>,
) -> ServerHandle {
    let server = Arc::new(NbdServer::new());
    for (name, dev, opts) in exports {
        server.add_export(name, dev, opts).expect("export");
    }
    server
        .serve(Listen::Unix(dir.join("nbd.sock")))
        .await
        .expect("serve")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Arc::new(MemBlockDevice::new(64 << 20));
    let h = serve(
        dir.path(),
        vec![("disk", dev.clone(), ExportOptions::default())],
    )
    .await;
    let uri = h.uri("disk");
    let cmds = [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -z 64k 64k",
        "read -P 0 64k 64k",
        "write -P 0x11 128k 64k",
        "discard 128k 64k",
        "read -P 0 128k 64k",
        "write -f -P 0xcd 1M 4k",
        "read -P 0xcd 1M 4k",
        "write -P 0x5a 3000 5000",
        "read -P 0x5a 3000 5000",
        "flush",
    ];
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    let out = run("qemu-io", &args).await;
    let s = text(&out);
    assert!(
        !s.contains("verification failed") && !s.contains("error"),
        "{s}"
    );
    // The host sees what the client wrote.
    let mut b = vec![0u8; 4096];
    dev.read_at(&mut b, 1 << 20).await.expect("read");
    assert!(b.iter().all(|&x| x == 0xcd));
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_compare_and_map() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A sparse source image with a few data islands.
    let src = dir.path().join("src.img");
    run(
        "qemu-img",
        &["create", "-f", "raw", src.to_str().expect("utf8"), "32M"],
    )
    .await;
    let s = src.to_str().expect("utf8");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x42 1M 64k",
            "-c",
            "write -P 0x43 20M 4k",
            s,
        ],
    )
    .await;

    let dev = Arc::new(MemBlockDevice::new(32 << 20));
    let h = serve(
        dir.path(),
        vec![("disk", dev.clone(), ExportOptions::default())],
    )
    .await;
    let uri = h.uri("disk");
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", s, &uri],
    )
    .await;
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", s, &uri]).await;
    // Sparse in, sparse stored: only the islands are allocated.
    assert!(
        dev.allocated() <= 128 << 10,
        "allocated {}",
        dev.allocated()
    );

    // qemu-img map sees exactly the islands as data.
    let out = run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]).await;
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("map json");
    let data: Vec<(u64, u64)> = map
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["data"] == serde_json::Value::Bool(true))
        .map(|e| {
            (
                e["start"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(data, vec![(1 << 20, 64 << 10), (20 << 20, 4096)], "{map}");

    // nbdinfo --map reports holes and data the same way.
    let out = run("nbdinfo", &["--map", &uri]).await;
    let m = text(&out);
    assert!(m.contains("hole,zero"), "{m}");
    assert!(
        m.lines()
            .any(|l| l.split_whitespace().take(2).eq(["1048576", "65536"]) && l.contains("data")),
        "{m}"
    );
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_over_tcp() {
    let server = Arc::new(NbdServer::new());
    let opts = |d: &str| ExportOptions {
        read_only: false,
        description: d.into(),
    };
    server
        .add_export(
            "a",
            Arc::new(MemBlockDevice::new(1 << 20)),
            opts("first disk"),
        )
        .expect("a");
    server
        .add_export("b", Arc::new(MemBlockDevice::new(2 << 20)), opts(""))
        .expect("b");
    let h = server
        .serve("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve");
    let addr = h.tcp_addr.expect("tcp");
    let out = run("nbdinfo", &["--list", &format!("nbd://{addr}")]).await;
    let s = text(&out);
    assert!(
        s.contains("export=\"a\"") && s.contains("export=\"b\""),
        "{s}"
    );
    assert!(s.contains("first disk"), "{s}");
    let out = run("nbdinfo", &["--size", &format!("nbd://{addr}/b")]).await;
    assert_eq!(text(&out).trim(), "2097152");
    // Over TCP, qemu-io too.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 7 0 4k",
            "-c",
            "read -P 7 0 4k",
            &format!("nbd://{addr}/a"),
        ],
    )
    .await;
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_exports_refuse_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Arc::new(MemBlockDevice::new(1 << 20));
    dev.write_at(&[9u8; 4096], 0, WriteFlags::default())
        .await
        .expect("write");
    let ro = ExportOptions {
        read_only: true,
        description: String::new(),
    };
    let h = serve(dir.path(), vec![("ro", dev.clone(), ro)]).await;
    let uri = h.uri("ro");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k", &uri])
        .output()
        .await
        .expect("qemu-io");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            || all.contains("read-only")
            || all.contains("Operation not permitted"),
        "{all}"
    );
    run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 9 0 4k", &uri],
    )
    .await;
    let mut b = vec![0u8; 4096];
    dev.read_at(&mut b, 0).await.expect("read");
    assert!(b.iter().all(|&x| x == 9), "a read-only export was written");
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verifies_a_local_volume_over_nbd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = LocalVolumeBackend::new(dir.path().join("vols")).expect("backend");
    backend
        .create("v", CreateVolume::new(64 << 20))
        .await
        .expect("create");
    backend.snapshot("v", "base").await.expect("snapshot");
    let dev = backend
        .open("v", OpenVolume::default())
        .await
        .expect("open");
    let h = serve(dir.path(), vec![("v", dev, ExportOptions::default())]).await;
    let uri = h.uri("v");
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
    )
    .await;
    let s = text(&out);
    assert!(s.contains("verify") || s.contains("WRITE"), "{s}");
    assert!(!s.contains("verify: bad"), "{s}");
    // And a mixed sequential job with large blocks.
    run(
        "fio",
        &[
            "--name=seq",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=rw",
            "--bs=1M",
            "--size=32M",
            "--iodepth=8",
        ],
    )
    .await;
    h.shutdown();
}
