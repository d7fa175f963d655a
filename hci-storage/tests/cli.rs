//! The `hci-storage` command line, end to end with qemu-img as the client.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hci-storage"))
}

fn ok(out: Output) -> String {
    let s = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "command failed: {s}");
    s
}

fn hs(args: &[&str]) -> String {
    ok(bin().args(args).output().expect("run hci-storage"))
}

fn qemu_img(args: &[&str]) -> String {
    ok(Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (install qemu-utils)"))
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn import_snapshot_clone_and_serve() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("src.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&img), "16M"]);
    ok(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x61 0 1M",
            "-c",
            "write -P 0x62 8M 64k",
            p(&img),
        ])
        .output()
        .expect("qemu-io"));

    let vol = tmp.path().join("vol");
    let s = hs(&["import", p(&img), p(&vol)]);
    assert!(s.contains("size 16Mi"), "{s}");
    let info = hs(&["info", p(&vol)]);
    assert!(
        info.contains("allocated:  1088Ki") || info.contains("allocated:"),
        "{info}"
    );
    hs(&["snapshot", p(&vol), "base"]);
    let list = hs(&["snapshots", p(&vol)]);
    assert!(list.contains("base"), "{list}");
    let clone = tmp.path().join("clone");
    hs(&["clone", &format!("{}@base", p(&vol)), p(&clone)]);
    hs(&["expand", p(&vol), "--size", "32M"]);
    assert!(hs(&["info", p(&vol)]).contains("size:       32Mi"));

    // Serve the clone and compare it with the image through NBD.
    let sock = tmp.path().join("nbd.sock");
    let mut server = bin()
        .args([
            "serve",
            p(&clone),
            "--listen",
            &format!("unix:{}", p(&sock)),
            "--export",
            "c",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///c?socket={}", p(&sock));
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", p(&img), &uri]);
    // While served, metadata commands are refused, not racing the server.
    let busy = bin()
        .args(["snapshot", p(&clone), "x"])
        .output()
        .expect("run");
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("busy"),
        "{busy:?}"
    );
    server.kill().expect("kill");
    server.wait().expect("wait");
    hs(&["snapshot", p(&clone), "x"]);

    // Revert and delete snapshots.
    hs(&["revert", p(&vol), "base"]);
    hs(&["rm-snapshot", p(&vol), "base"]);
    assert!(!hs(&["snapshots", p(&vol)]).contains("base"));

    // Clear errors.
    let e = bin()
        .args(["create", p(&tmp.path().join("bad")), "--size", "0"])
        .output()
        .expect("run");
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("nonzero multiple"),
        "{e:?}"
    );
    let e = bin()
        .args(["info", p(&tmp.path().join("missing"))])
        .output()
        .expect("run");
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("not found"),
        "{e:?}"
    );
}
