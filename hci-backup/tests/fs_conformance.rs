//! hci-core's backup target conformance suite on the filesystem target.

use hci_backup::FsTarget;

struct Fixture {
    target: FsTarget,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Fixture {
    type Target = FsTarget;
    fn deref(&self) -> &FsTarget {
        &self.target
    }
}

async fn make() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = FsTarget::filesystem(dir.path()).expect("fs target");
    Fixture { target, _dir: dir }
}

hci_core::backup_target_conformance!(make);
