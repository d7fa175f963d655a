//! The backup engine against a real local volume backend and the fs target.

mod common;

use std::sync::Arc;

use common::*;
use hci_backup::{FsTarget, GcOptions, Repository};
use hci_core::Error;
use hci_core::backup::{BackupEngine, BackupProgress, BackupTarget, VolumeBackupRequest};
use hci_core::volume::VolumeBackend;

const SIZE: u64 = 16 << 20;

struct Repo {
    repo: Repository,
    target: Arc<FsTarget>,
    dir: tempfile::TempDir,
}

async fn repo(key: Option<&[u8; 32]>) -> Repo {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = Arc::new(FsTarget::filesystem(dir.path()).expect("target"));
    let repo = Repository::init(target.clone(), key).await.expect("init");
    Repo { repo, target, dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_backup_restores_byte_identical() {
    for key in [None, Some(&[9u8; 32])] {
        let r = repo(key).await;
        let v = vols();
        make_volume(&v, "vm-disk", SIZE).await;
        v.backend.snapshot("vm-disk", "s1").await.expect("snapshot");
        let (tx, rx) = tokio::sync::watch::channel(BackupProgress::default());
        let info = r
            .repo
            .backup(
                v.backend.clone(),
                VolumeBackupRequest {
                    volume: "vm-disk".into(),
                    snapshot: "s1".into(),
                    base: None,
                    metadata: vec![("vm".into(), "{\"name\":\"a\"}".into())],
                },
                Some(tx),
            )
            .await
            .expect("backup");
        let p = rx.borrow().clone();
        assert_eq!(p.done_bytes, p.total_bytes);
        assert!(
            p.total_bytes >= SIZE * 3 / 4,
            "allocated ranges read: {p:?}"
        );
        assert_eq!(info.size, SIZE);
        assert_eq!(
            info.metadata,
            vec![("vm".into(), "{\"name\":\"a\"}".into())]
        );
        // Random half stored (incompressible), zeroes free, text compressed.
        assert!(
            info.added_bytes < SIZE * 6 / 10,
            "added {}",
            info.added_bytes
        );
        assert_restores(&r.repo, &v, &info.id, "vm-disk", "s1").await;
        let report = r.repo.verify(&info.id).await.expect("verify");
        assert!(report.bad_chunks.is_empty(), "{report:?}");
        assert!(report.chunks_checked > 0);
        let listed = r.repo.list().await.expect("list");
        assert_eq!(listed, vec![info]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_chain_stores_about_the_changed_bytes() {
    let r = repo(Some(&[3u8; 32])).await;
    let v = vols();
    let dev = make_volume(&v, "d", SIZE).await;
    v.backend.snapshot("d", "s0").await.expect("snapshot");
    let mut prev = backup(&r.repo, &v, "d", "s0", None).await;
    let mut ids = vec![(prev.id.clone(), "s0".to_string())];
    for round in 1..=4u64 {
        let changed = scatter(&dev, 100, round).await;
        let snap = format!("s{round}");
        v.backend.snapshot("d", &snap).await.expect("snapshot");
        let info = backup(&r.repo, &v, "d", &snap, Some(&prev.id)).await;
        assert_eq!(info.base.as_deref(), Some(prev.id.as_str()));
        assert!(
            info.added_bytes <= 3 * changed,
            "round {round}: added {} for {changed} changed bytes",
            info.added_bytes
        );
        ids.push((info.id.clone(), snap));
        prev = info;
    }
    // Every backup of the chain restores on its own.
    for (id, snap) in &ids {
        assert_restores(&r.repo, &v, id, "d", snap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_gc_keep_remaining_backups_restorable() {
    let r = repo(None).await;
    let v = vols();
    let dev = make_volume(&v, "d", SIZE).await;
    v.backend.snapshot("d", "s1").await.expect("snapshot");
    let b1 = backup(&r.repo, &v, "d", "s1", None).await;
    // Rewrite the whole volume so b1's packs become garbage once it is gone.
    dev.write_at(&random(SIZE as usize, 99), 0, Default::default())
        .await
        .expect("rewrite");
    scatter(&dev, 50, 5).await;
    v.backend.snapshot("d", "s2").await.expect("snapshot");
    let b2 = backup(&r.repo, &v, "d", "s2", Some(&b1.id)).await;
    scatter(&dev, 50, 6).await;
    v.backend.snapshot("d", "s3").await.expect("snapshot");
    let b3 = backup(&r.repo, &v, "d", "s3", Some(&b2.id)).await;

    let packs_before = r.target.list("packs/").await.expect("list").len();
    r.repo.delete(&b1.id).await.expect("delete b1");
    assert!(matches!(
        r.repo.delete(&b1.id).await,
        Err(Error::NotFound { .. })
    ));
    let report = r
        .repo
        .gc(GcOptions {
            grace: std::time::Duration::ZERO,
            ..Default::default()
        })
        .await
        .expect("gc");
    assert!(report.deleted_packs > 0, "{report:?}");
    let packs_after = r.target.list("packs/").await.expect("list").len();
    assert!(packs_after < packs_before);
    assert_restores(&r.repo, &v, &b2.id, "d", "s2").await;
    assert_restores(&r.repo, &v, &b3.id, "d", "s3").await;
    for b in [&b2, &b3] {
        let rep = r.repo.verify(&b.id).await.expect("verify");
        assert!(rep.bad_chunks.is_empty(), "{rep:?}");
    }
    // Retention: keep only the newest.
    let pruned = r
        .repo
        .prune(&hci_backup::RetentionPolicy {
            keep_last: 1,
            ..Default::default()
        })
        .await
        .expect("prune");
    assert_eq!(pruned, vec![b2.id.clone()]);
    r.repo
        .gc(GcOptions {
            grace: std::time::Duration::ZERO,
            ..Default::default()
        })
        .await
        .expect("gc");
    assert_restores(&r.repo, &v, &b3.id, "d", "s3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_is_reported_and_restore_refuses() {
    for key in [None, Some(&[4u8; 32])] {
        let r = repo(key).await;
        let v = vols();
        make_volume(&v, "d", 8 << 20).await;
        v.backend.snapshot("d", "s1").await.expect("snapshot");
        let b = backup(&r.repo, &v, "d", "s1", None).await;
        let packs = r.target.list("packs/").await.expect("list");
        let pack = &packs[0];
        let path = r.dir.path().join(&pack.key);
        let mut data = std::fs::read(&path).expect("read pack");
        data[100] ^= 0x40;
        std::fs::write(&path, &data).expect("write pack");

        let rep = r.repo.verify(&b.id).await.expect("verify");
        assert_eq!(rep.bad_chunks.len(), 1, "{rep:?}");
        let pack_id = pack.key.rsplit('/').next().unwrap_or_default();
        assert!(rep.bad_chunks[0].contains(pack_id), "{rep:?}");
        assert!(rep.bad_chunks[0].starts_with("piece "), "{rep:?}");

        v.backend
            .create("r", hci_core::volume::CreateVolume::new(8 << 20))
            .await
            .expect("create");
        let dev = v.backend.open("r", Default::default()).await.expect("open");
        let err = r
            .repo
            .restore(&b.id, dev, None)
            .await
            .expect_err("restore must fail");
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(pack_id), "{err}");

        // A damaged manifest is named too.
        let mpath = r.dir.path().join(format!("backups/{}", b.id));
        let mut m = std::fs::read(&mpath).expect("read manifest");
        m[20] ^= 1;
        std::fs::write(&mpath, &m).expect("write manifest");
        let err = r
            .repo
            .verify(&b.id)
            .await
            .expect_err("verify damaged manifest");
        assert!(
            err.to_string()
                .contains(&format!("manifest backups/{}", b.id)),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_refused() {
    let r = repo(Some(&[1u8; 32])).await;
    let target: Arc<dyn BackupTarget> = r.target.clone();
    let err = Repository::open(target.clone(), Some(&[2u8; 32]))
        .await
        .expect_err("wrong key");
    assert!(err.to_string().contains("wrong key"), "{err}");
    let err = Repository::open(target.clone(), None)
        .await
        .expect_err("no key");
    assert!(err.to_string().contains("key file is required"), "{err}");
    Repository::open(target, Some(&[1u8; 32]))
        .await
        .expect("right key");
    assert!(matches!(
        Repository::init(r.target.clone(), None).await,
        Err(Error::AlreadyExists { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_backup_leaves_target_consistent() {
    let r = repo(None).await;
    let v = vols();
    let dev = make_volume(&v, "d", 64 << 20).await;
    v.backend.snapshot("d", "s1").await.expect("snapshot");
    let b1 = backup(&r.repo, &v, "d", "s1", None).await;
    dev.write_at(&random(48 << 20, 1234), 0, Default::default())
        .await
        .expect("rewrite");
    v.backend.snapshot("d", "s2").await.expect("snapshot");

    // Cancel a backup once it has uploaded at least one pack.
    let (tx, mut rx) = tokio::sync::watch::channel(BackupProgress::default());
    let repo2 = r.repo.clone();
    let backend = v.backend.clone();
    let task = tokio::spawn(async move {
        repo2
            .backup(
                backend,
                VolumeBackupRequest {
                    volume: "d".into(),
                    snapshot: "s2".into(),
                    base: Some(b1.id.clone()),
                    metadata: vec![],
                },
                Some(tx),
            )
            .await
    });
    let mut cancelled = false;
    while rx.changed().await.is_ok() {
        let p = rx.borrow().clone();
        if p.uploaded_bytes > (hci_backup::repo::PACK_TARGET as u64) + (1 << 20) {
            task.abort();
            cancelled = true;
            break;
        }
    }
    let _ = task.await;
    assert!(
        cancelled,
        "the backup finished before it could be cancelled"
    );
    assert_eq!(
        r.repo.list().await.expect("list").len(),
        1,
        "no partial backup listed"
    );

    let b1_id = r.repo.list().await.expect("list")[0].id.clone();
    let b2 = backup(&r.repo, &v, "d", "s2", Some(&b1_id)).await;
    assert_restores(&r.repo, &v, &b1_id, "d", "s1").await;
    assert_restores(&r.repo, &v, &b2.id, "d", "s2").await;
    // A stale lock and orphan packs are cleaned once the lock is considered stale.
    r.repo
        .gc(GcOptions {
            grace: std::time::Duration::ZERO,
            stale_lock: std::time::Duration::ZERO,
            ..Default::default()
        })
        .await
        .expect("gc");
    assert_restores(&r.repo, &v, &b2.id, "d", "s2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_skips_overlapping_runs_and_chains_incrementals() {
    use hci_backup::{BackupSchedule, RetentionPolicy, RunOutcome, Scheduler};
    let r = repo(None).await;
    let v = vols();
    let dev = make_volume(&v, "d", 4 << 20).await;
    let sched = BackupSchedule::new(
        "nightly",
        "0 2 * * *",
        "d",
        RetentionPolicy {
            keep_last: 2,
            ..Default::default()
        },
    )
    .expect("schedule");
    let s = Scheduler::new(sched, Arc::new(r.repo.clone()), v.backend.clone());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let t0 = chrono::Utc::now();
    // The second trigger comes while the first run is still going: skipped.
    s.trigger(t0, tx.clone());
    s.trigger(t0 + chrono::Duration::seconds(1), tx.clone());
    let mut outcomes = vec![
        rx.recv().await.expect("outcome"),
        rx.recv().await.expect("outcome"),
    ];
    outcomes.sort_by_key(|o| matches!(o, RunOutcome::Completed { .. }));
    assert!(
        matches!(outcomes[0], RunOutcome::Skipped { .. }),
        "{outcomes:?}"
    );
    let RunOutcome::Completed { backup: first, .. } = &outcomes[1] else {
        panic!("first run: {outcomes:?}");
    };
    assert!(first.base.is_none());
    let mut ids = vec![first.id.clone()];
    for i in 2..=3i64 {
        scatter(&dev, 10, i as u64).await;
        s.trigger(t0 + chrono::Duration::days(i), tx.clone());
        match rx.recv().await.expect("outcome") {
            RunOutcome::Completed { backup, .. } => {
                assert_eq!(backup.base.as_deref(), ids.last().map(String::as_str));
                ids.push(backup.id);
            }
            other => panic!("run {i}: {other:?}"),
        }
    }
    // Retention kept the last two; only the newest run's snapshot remains.
    let listed: Vec<String> = r
        .repo
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(listed, ids[1..].to_vec());
    let snaps = v.backend.list_snapshots("d").await.expect("snapshots");
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    let last = r
        .repo
        .list()
        .await
        .expect("list")
        .pop()
        .expect("one backup");
    assert_restores(&r.repo, &v, &last.id, "d", &last.snapshot).await;
}

fn progress_job() -> (
    hci_backup::Job,
    tokio::sync::watch::Receiver<hci_backup::JobProgress>,
) {
    let (tx, rx) = tokio::sync::watch::channel(hci_backup::JobProgress::default());
    (hci_backup::Job::new().with_progress(tx), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chacha20_poly1305_repository_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = Arc::new(FsTarget::filesystem(dir.path()).expect("target"));
    let key = [5u8; 32];
    let repo = Repository::init_with_cipher(
        target.clone(),
        Some(&key),
        hci_backup::Cipher::ChaCha20Poly1305,
    )
    .await
    .expect("init");
    let v = vols();
    make_volume(&v, "d", 8 << 20).await;
    v.backend.snapshot("d", "s1").await.expect("snapshot");
    let b = backup(&repo, &v, "d", "s1", None).await;
    // Reopened, it uses the cipher its config names.
    let again = Repository::open(target.clone(), Some(&key))
        .await
        .expect("open");
    assert_eq!(again.cipher(), Some(hci_backup::Cipher::ChaCha20Poly1305));
    assert_restores(&again, &v, &b.id, "d", "s1").await;
    let rep = again.verify(&b.id).await.expect("verify");
    assert!(rep.bad_chunks.is_empty(), "{rep:?}");
    let err = Repository::open(target, Some(&[6u8; 32]))
        .await
        .expect_err("wrong key");
    assert!(err.to_string().contains("wrong key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_reports_progress_with_a_rate() {
    let r = repo(None).await;
    let v = vols();
    make_volume(&v, "d", SIZE).await;
    v.backend.snapshot("d", "s1").await.expect("snapshot");
    let b = backup(&r.repo, &v, "d", "s1", None).await;
    v.backend
        .create("r", hci_core::volume::CreateVolume::new(SIZE))
        .await
        .expect("create");
    let dev = v.backend.open("r", Default::default()).await.expect("open");
    let (job, rx) = progress_job();
    r.repo
        .restore_with(&b.id, dev, &job)
        .await
        .expect("restore");
    let p = rx.borrow().clone();
    assert_eq!(p.done_bytes, p.total_bytes);
    assert!(p.total_bytes > 0 && p.bytes_per_second > 0, "{p:?}");
    assert!((p.fraction() - 1.0).abs() < f64::EPSILON);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_job_stops_and_leaves_target_consistent() {
    let r = repo(None).await;
    let v = vols();
    let dev = make_volume(&v, "d", 64 << 20).await;
    dev.write_at(&random(64 << 20, 77), 0, Default::default())
        .await
        .expect("fill");
    v.backend.snapshot("d", "s1").await.expect("snapshot");
    let (job, mut rx) = progress_job();
    let repo2 = r.repo.clone();
    let backend = v.backend.clone();
    let job2 = job.clone();
    let task = tokio::spawn(async move {
        repo2
            .backup_with(
                backend,
                VolumeBackupRequest {
                    volume: "d".into(),
                    snapshot: "s1".into(),
                    base: None,
                    metadata: vec![],
                },
                &job2,
            )
            .await
    });
    while rx.changed().await.is_ok() {
        if rx.borrow().uploaded_bytes > (hci_backup::repo::PACK_TARGET as u64) + (1 << 20) {
            job.cancel.cancel();
            break;
        }
    }
    let res = task.await.expect("join");
    assert!(matches!(res, Err(Error::Cancelled)), "{res:?}");
    assert!(r.repo.list().await.expect("list").is_empty());
    assert!(
        r.target.list("locks/").await.expect("locks").is_empty(),
        "a cancelled backup removes its lock"
    );
    // A cancelled restore stops too.
    let b = backup(&r.repo, &v, "d", "s1", None).await;
    v.backend
        .create("r", hci_core::volume::CreateVolume::new(64 << 20))
        .await
        .expect("create");
    let out = v.backend.open("r", Default::default()).await.expect("open");
    let job = hci_backup::Job::new();
    job.cancel.cancel();
    assert!(matches!(
        r.repo.restore_with(&b.id, out, &job).await,
        Err(Error::Cancelled)
    ));
    // GC reclaims what the cancelled run uploaded; the finished one stays whole.
    r.repo
        .gc(GcOptions {
            grace: std::time::Duration::ZERO,
            ..Default::default()
        })
        .await
        .expect("gc");
    assert_restores(&r.repo, &v, &b.id, "d", "s1").await;
    let rep = r.repo.verify(&b.id).await.expect("verify");
    assert!(rep.bad_chunks.is_empty(), "{rep:?}");
}

async fn pack_bytes(t: &FsTarget) -> u64 {
    t.list("packs/")
        .await
        .expect("list")
        .iter()
        .map(|m| m.size)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_repacks_mostly_dead_packs() {
    let r = repo(Some(&[8u8; 32])).await;
    let v = vols();
    let size = 32u64 << 20;
    v.backend
        .create("d", hci_core::volume::CreateVolume::new(size))
        .await
        .expect("create");
    let dev = v.backend.open("d", Default::default()).await.expect("open");
    dev.write_at(&random(size as usize, 1), 0, Default::default())
        .await
        .expect("fill");
    v.backend.snapshot("d", "s1").await.expect("snapshot");
    let b1 = backup(&r.repo, &v, "d", "s1", None).await;
    // Rewrite every other 64 KiB: each of b1's packs becomes about half dead.
    for i in (0..size / 65536).step_by(2) {
        dev.write_at(&random(65536, 1000 + i), i * 65536, Default::default())
            .await
            .expect("rewrite");
    }
    // ... and a bit more, so live bytes fall below half.
    for i in (1..size / 65536).step_by(8) {
        dev.write_at(&random(65536, 5000 + i), i * 65536, Default::default())
            .await
            .expect("rewrite");
    }
    v.backend.snapshot("d", "s2").await.expect("snapshot");
    let b2 = backup(&r.repo, &v, "d", "s2", Some(&b1.id)).await;
    r.repo.delete(&b1.id).await.expect("delete");
    let before = pack_bytes(&r.target).await;
    let report = r
        .repo
        .gc(GcOptions {
            grace: std::time::Duration::ZERO,
            ..Default::default()
        })
        .await
        .expect("gc");
    assert!(report.repacked_packs > 0, "{report:?}");
    assert!(report.deleted_packs >= report.repacked_packs, "{report:?}");
    let after = pack_bytes(&r.target).await;
    assert!(
        after < before * 3 / 4,
        "repacking reclaims partly dead packs: {before} -> {after} ({report:?})"
    );
    assert_restores(&r.repo, &v, &b2.id, "d", "s2").await;
    let rep = r.repo.verify(&b2.id).await.expect("verify");
    assert!(rep.bad_chunks.is_empty(), "{rep:?}");
    // A second run finds nothing more to do.
    let again = r
        .repo
        .gc(GcOptions {
            grace: std::time::Duration::ZERO,
            ..Default::default()
        })
        .await
        .expect("gc");
    assert_eq!(
        (again.repacked_packs, again.deleted_packs),
        (0, 0),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_does_not_sweep_under_a_backup_that_may_have_missed_the_mark() {
    let r = repo(None).await;
    let v = vols();
    make_volume(&v, "d", 8 << 20).await;
    v.backend.snapshot("d", "s1").await.expect("snapshot");
    let b1 = backup(&r.repo, &v, "d", "s1", None).await;
    // A backup in progress (its lock, as a running backup writes it).
    let lock = serde_json::json!({ "created": chrono::Utc::now() - chrono::Duration::seconds(5) });
    r.target
        .put_new("locks/running", bytes::Bytes::from(lock.to_string()))
        .await
        .expect("lock");
    r.repo.delete(&b1.id).await.expect("delete");
    let opts = GcOptions {
        grace: std::time::Duration::ZERO,
        ..Default::default()
    };
    let report = r.repo.gc(opts).await.expect("gc");
    assert!(report.marked_packs > 0, "{report:?}");
    assert_eq!(
        report.deleted_packs, 0,
        "swept under a running backup: {report:?}"
    );
    // The backup ends: the next run sweeps.
    r.target.delete("locks/running").await.expect("unlock");
    let report = r.repo.gc(opts).await.expect("gc");
    assert!(report.deleted_packs > 0, "{report:?}");
    assert!(r.target.list("packs/").await.expect("list").is_empty());
    assert!(r.target.list("gc/").await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_vm_backup_restores_under_a_new_name() {
    use hci_backup::{VmBackupRequest, VmVolumeRequest};
    use hci_core::model::{BootSpec, ByteSize, Resource, VolumeSpec};
    let r = repo(Some(&[2u8; 32])).await;
    let v = vols();
    let root = make_volume(&v, "web-root", 8 << 20).await;
    make_volume(&v, "web-data", 4 << 20).await;
    let spec = hci_core::model::VirtualMachine::builder("web")
        .memory(ByteSize::mib(64))
        .boot(BootSpec::kernel("guest:blk", "stay=1"))
        .disk("root", "web-root")
        .disk("data", "web-data")
        .build()
        .spec;
    let mut snaps = Vec::new();
    for (round, snap) in ["s1", "s2"].iter().enumerate() {
        if round == 1 {
            scatter(&root, 10, 3).await;
        }
        for vol in ["web-root", "web-data"] {
            v.backend.snapshot(vol, snap).await.expect("snapshot");
        }
        snaps.push(*snap);
    }
    let req = |snap: &str, base: Option<&hci_backup::VmManifest>| VmBackupRequest {
        vm_name: "web".into(),
        vm: spec.clone(),
        volumes: [("web-root", 8u64 << 20), ("web-data", 4 << 20)]
            .iter()
            .map(|(vol, size)| VmVolumeRequest {
                volume: vol.to_string(),
                spec: VolumeSpec::blank(ByteSize(*size)),
                snapshot: snap.into(),
                base: base.and_then(|m| {
                    m.volumes
                        .iter()
                        .find(|x| x.volume == *vol)
                        .map(|x| x.backup.clone())
                }),
            })
            .collect(),
    };
    let job = hci_backup::Job::new();
    let m1 = r
        .repo
        .backup_vm(v.backend.clone(), req("s1", None), &job)
        .await
        .expect("vm backup");
    let m2 = r
        .repo
        .backup_vm(v.backend.clone(), req("s2", Some(&m1)), &job)
        .await
        .expect("vm backup");
    assert_eq!(m2.volumes.len(), 2);
    assert_eq!(m2.vm, spec);
    assert!(
        m2.added_bytes < 1 << 20,
        "incremental VM backup: {}",
        m2.added_bytes
    );
    assert_eq!(r.repo.list_vm_backups().await.expect("list").len(), 2);
    // A member volume backup cannot be deleted on its own.
    let err = r
        .repo
        .delete(&m2.volumes[0].backup)
        .await
        .expect_err("member");
    assert!(err.to_string().contains("VM backup"), "{err}");

    let plan = r
        .repo
        .restore_vm(&m2.id, "web2", v.backend.clone(), &job)
        .await
        .expect("restore vm");
    assert_eq!(plan.vm.name(), "web2");
    let disks: Vec<&str> = plan
        .vm
        .spec
        .disks
        .iter()
        .map(|d| d.volume.as_str())
        .collect();
    assert_eq!(disks, vec!["web2-web-root", "web2-web-data"]);
    for vol in ["web-root", "web-data"] {
        let want = v
            .backend
            .open_snapshot(vol, "s2", Default::default())
            .await
            .expect("snap");
        let got = v
            .backend
            .open(&format!("web2-{vol}"), Default::default())
            .await
            .expect("restored");
        let size = want.size();
        assert_eq!(got.size(), size);
        assert!(
            read_all(&*want, size).await == read_all(&*got, size).await,
            "{vol} differs"
        );
    }
    // Restoring again under the same name fails and leaves what exists alone.
    assert!(
        r.repo
            .restore_vm(&m2.id, "web2", v.backend.clone(), &job)
            .await
            .is_err()
    );
    assert!(
        v.backend
            .open("web2-web-root", Default::default())
            .await
            .is_ok()
    );

    // A listing taken before a deletion still lists what was deleted; the
    // repository skips those entries instead of failing the whole list.
    let stale = StaleListing::new(r.target.clone());
    let stale_repo = Repository::open(stale.clone(), Some(&[2u8; 32]))
        .await
        .expect("open");
    stale.freeze(&["backups/", "vms/"]).await;

    // Retention counts VM backups per VM, not their volume backups per volume.
    let pruned = r
        .repo
        .prune(&hci_backup::RetentionPolicy {
            keep_last: 1,
            ..Default::default()
        })
        .await
        .expect("prune");
    assert_eq!(pruned, vec![m1.id.clone()]);
    assert_eq!(r.repo.list().await.expect("list").len(), 2);
    assert_eq!(stale.list("vms/").await.expect("list").len(), 2);
    let vms = stale_repo.list_vm_backups().await.expect("stale vm list");
    assert_eq!(vms.iter().map(|m| &m.id).collect::<Vec<_>>(), vec![&m2.id]);
    assert_eq!(stale_repo.list().await.expect("stale list").len(), 2);
    stale_repo
        .gc(GcOptions {
            grace: std::time::Duration::ZERO,
            ..Default::default()
        })
        .await
        .expect("gc");
    let again = r.repo.load_vm_backup(&m2.id).await.expect("load");
    for vb in &again.volumes {
        let rep = r.repo.verify(&vb.backup).await.expect("verify");
        assert!(rep.bad_chunks.is_empty(), "{rep:?}");
    }
}

/// A target whose listings of some prefixes were taken at one moment and
/// not refreshed: what a reader racing a deleter sees.
#[derive(Debug)]
struct StaleListing {
    target: Arc<FsTarget>,
    frozen:
        tokio::sync::Mutex<std::collections::HashMap<String, Vec<hci_core::backup::ObjectMeta>>>,
}

impl StaleListing {
    fn new(target: Arc<FsTarget>) -> Arc<Self> {
        Arc::new(StaleListing {
            target,
            frozen: Default::default(),
        })
    }

    async fn freeze(&self, prefixes: &[&str]) {
        let mut frozen = self.frozen.lock().await;
        for p in prefixes {
            let list = self.target.list(p).await.expect("list");
            frozen.insert(p.to_string(), list);
        }
    }
}

#[async_trait::async_trait]
impl BackupTarget for StaleListing {
    async fn put_new(&self, key: &str, data: bytes::Bytes) -> hci_core::Result<()> {
        self.target.put_new(key, data).await
    }
    async fn get(&self, key: &str) -> hci_core::Result<bytes::Bytes> {
        self.target.get(key).await
    }
    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> hci_core::Result<bytes::Bytes> {
        self.target.get_range(key, range).await
    }
    async fn head(&self, key: &str) -> hci_core::Result<hci_core::backup::ObjectMeta> {
        self.target.head(key).await
    }
    async fn list(&self, prefix: &str) -> hci_core::Result<Vec<hci_core::backup::ObjectMeta>> {
        if let Some(list) = self.frozen.lock().await.get(prefix) {
            return Ok(list.clone());
        }
        self.target.list(prefix).await
    }
    async fn delete(&self, key: &str) -> hci_core::Result<()> {
        self.target.delete(key).await
    }
}
