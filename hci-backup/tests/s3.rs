//! The S3 target against a real S3-compatible server started on 127.0.0.1:
//! hci-core's target conformance suite and a backup/restore round trip.
//! Without a server binary the tests fail with a message saying what to install.

#[path = "common/mod.rs"]
mod common;
#[path = "common/s3.rs"]
mod s3;

use std::sync::Arc;

use hci_backup::{Repository, S3Target};
use hci_core::backup::BackupEngine;

struct Fixture {
    target: S3Target,
    _server: s3::S3Server,
}

impl std::ops::Deref for Fixture {
    type Target = S3Target;
    fn deref(&self) -> &S3Target {
        &self.target
    }
}

async fn make() -> Fixture {
    let Some(server) = s3::start() else {
        panic!("{}", s3::MISSING);
    };
    Fixture {
        target: s3::target(&server, "conf"),
        _server: server,
    }
}

mod conformance {
    hci_core::backup_target_conformance!(super::make);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backup_restore_round_trip() {
    let Some(server) = s3::start() else {
        panic!("{}", s3::MISSING);
    };
    let target = Arc::new(s3::target(&server, "repo/one"));
    let repo = Repository::init(target, Some(&[5u8; 32]))
        .await
        .expect("init");
    let v = common::vols();
    let dev = common::make_volume(&v, "d", 24 << 20).await;
    use hci_core::volume::VolumeBackend;
    v.backend.snapshot("d", "s1").await.expect("snapshot");
    let b1 = common::backup(&repo, &v, "d", "s1", None).await;
    let changed = common::scatter(&dev, 64, 3).await;
    v.backend.snapshot("d", "s2").await.expect("snapshot");
    let b2 = common::backup(&repo, &v, "d", "s2", Some(&b1.id)).await;
    assert!(b2.added_bytes <= 3 * changed, "added {}", b2.added_bytes);
    common::assert_restores(&repo, &v, &b1.id, "d", "s1").await;
    common::assert_restores(&repo, &v, &b2.id, "d", "s2").await;
    let rep = repo.verify(&b2.id).await.expect("verify");
    assert!(rep.bad_chunks.is_empty(), "{rep:?}");
    assert_eq!(repo.list().await.expect("list").len(), 2);
    // Delete + GC (mark, repack, sweep) over S3 keeps the rest restorable.
    repo.delete(&b1.id).await.expect("delete");
    let report = repo
        .gc(hci_backup::GcOptions {
            grace: std::time::Duration::ZERO,
            ..Default::default()
        })
        .await
        .expect("gc");
    assert!(report.live_packs >= 1, "{report:?}");
    common::assert_restores(&repo, &v, &b2.id, "d", "s2").await;
    let rep = repo.verify(&b2.id).await.expect("verify");
    assert!(rep.bad_chunks.is_empty(), "{rep:?}");
}
