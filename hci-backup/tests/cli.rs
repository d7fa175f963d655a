//! The `hci-backup` binary end to end on local volume directories.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use hci_core::volume::{OpenVolume, VolumeBackend};
use hci_storage::local::LocalVolumeBackend;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hci-backup"))
}

fn run(args: &[&str]) -> Output {
    let out = bin().args(args).output().expect("run hci-backup");
    assert!(
        out.status.success(),
        "hci-backup {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

async fn read_volume(root: &Path, name: &str, snapshot: Option<&str>) -> Vec<u8> {
    let b = LocalVolumeBackend::new(root).expect("backend");
    let dev = match snapshot {
        Some(s) => b.open_snapshot(name, s, OpenVolume::default()).await,
        None => b.open(name, OpenVolume::default()).await,
    }
    .expect("open");
    common::read_all(&*dev, dev.size()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_backup_incremental_restore_verify_prune_gc() {
    let work = tempfile::tempdir().expect("tempdir");
    let vols_root = work.path().join("vols");
    let repo_dir = work.path().join("repo");
    let key = work.path().join("key");
    std::fs::write(&key, [7u8; 32]).expect("key");
    let url = format!("file://{}", repo_dir.display());
    let keyf = key.to_str().expect("utf8");
    {
        let v = common::Vols {
            backend: std::sync::Arc::new(LocalVolumeBackend::new(&vols_root).expect("backend")),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        let dev = common::make_volume(&v, "disk", 8 << 20).await;
        v.backend.snapshot("disk", "s1").await.expect("snapshot");
        common::scatter(&dev, 20, 1).await;
        v.backend.snapshot("disk", "s2").await.expect("snapshot");
    }
    run(&["init", "--target", &url, "--encrypt-key-file", keyf]);
    let vol = format!("{}/disk", vols_root.display());
    let b1 = stdout(&run(&[
        "backup",
        "--target",
        &url,
        "--key-file",
        keyf,
        &format!("{vol}@s1"),
    ]));
    let b2 = stdout(&run(&[
        "backup",
        "--target",
        &url,
        "--key-file",
        keyf,
        &format!("{vol}@s2"),
        "--base",
        &b1,
    ]));
    assert_ne!(b1, b2);
    let listed = stdout(&run(&[
        "list",
        "--target",
        &url,
        "--key-file",
        keyf,
        "-o",
        "json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&listed).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(2));

    for (id, snap) in [(&b1, "s1"), (&b2, "s2")] {
        let dest = vols_root.join(format!("restored-{snap}"));
        run(&[
            "restore",
            "--target",
            &url,
            "--key-file",
            keyf,
            id,
            dest.to_str().expect("utf8"),
        ]);
        let want = read_volume(&vols_root, "disk", Some(snap)).await;
        let got = read_volume(&vols_root, &format!("restored-{snap}"), None).await;
        assert!(want == got, "restored {snap} differs");
    }
    run(&["verify", "--target", &url, "--key-file", keyf]);

    // Wrong key: a clear error, non-zero exit.
    let bad = work.path().join("bad");
    std::fs::write(&bad, [8u8; 32]).expect("key");
    let out = bin()
        .args([
            "list",
            "--target",
            &url,
            "--key-file",
            bad.to_str().expect("utf8"),
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong key"));

    let pruned = stdout(&run(&[
        "prune",
        "--target",
        &url,
        "--key-file",
        keyf,
        "--keep-last",
        "1",
    ]));
    assert_eq!(pruned, format!("deleted {b1}"));
    run(&[
        "gc",
        "--target",
        &url,
        "--key-file",
        keyf,
        "--grace-secs",
        "0",
    ]);
    let dest = vols_root.join("restored-again");
    run(&[
        "restore",
        "--target",
        &url,
        "--key-file",
        keyf,
        &b2,
        dest.to_str().expect("utf8"),
    ]);
    let want = read_volume(&vols_root, "disk", Some("s2")).await;
    let got = read_volume(&vols_root, "restored-again", None).await;
    assert!(want == got, "restore after gc differs");

    // Flip a byte in a pack: verify exits non-zero naming it, restore refuses.
    let packs = walk(&repo_dir.join("packs"));
    let mut data = std::fs::read(&packs[0]).expect("read pack");
    data[50] ^= 1;
    std::fs::write(&packs[0], &data).expect("write pack");
    let out = bin()
        .args(["verify", "--target", &url, "--key-file", keyf])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    let pack_name = packs[0]
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&pack_name));
    let dest = vols_root.join("restored-bad");
    let out = bin()
        .args([
            "restore",
            "--target",
            &url,
            "--key-file",
            keyf,
            &b2,
            dest.to_str().expect("utf8"),
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("integrity"));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backup_process_leaves_target_consistent() {
    let work = tempfile::tempdir().expect("tempdir");
    let vols_root = work.path().join("vols");
    let repo_dir = work.path().join("repo");
    let url = format!("file://{}", repo_dir.display());
    {
        let v = common::Vols {
            backend: std::sync::Arc::new(LocalVolumeBackend::new(&vols_root).expect("backend")),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        common::make_volume(&v, "big", 128 << 20).await;
        v.backend.snapshot("big", "s1").await.expect("snapshot");
    }
    run(&["init", "--target", &url]);
    let vol = format!("{}/big@s1", vols_root.display());
    let mut child = bin()
        .args(["backup", "--target", &url, &vol])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Kill it once it has written its first pack (or it finished first).
    let mut killed = false;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if !walk(&repo_dir.join("packs")).is_empty() {
            child.kill().expect("kill");
            killed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let status = child.wait().expect("wait");
    eprintln!("backup process killed mid-way: {killed} ({status})");
    let listed = stdout(&run(&["list", "--target", &url]));
    if killed {
        assert!(listed.is_empty(), "a killed backup is listed: {listed}");
    }
    let id = stdout(&run(&["backup", "--target", &url, &vol]));
    run(&["verify", "--target", &url]);
    let dest = vols_root.join("restored");
    run(&[
        "restore",
        "--target",
        &url,
        &id,
        dest.to_str().expect("utf8"),
    ]);
    let want = read_volume(&vols_root, "big", Some("s1")).await;
    let got = read_volume(&vols_root, "restored", None).await;
    assert!(want == got, "restore after a killed backup differs");
    run(&[
        "gc",
        "--target",
        &url,
        "--grace-secs",
        "0",
        "--stale-lock-secs",
        "0",
    ]);
    run(&["verify", "--target", &url]);
}
