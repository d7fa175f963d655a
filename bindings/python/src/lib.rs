//! # hci-python
//!
//! The native module `hci._hci` of the `hci` Python package: thin pyo3
//! bindings over hci-storage (local volumes, NBD exports), hci-backup
//! (repositories on file/S3 targets) and hci-daemon's gRPC client. The
//! Python package (`python/hci/`) adds typed resource objects on top.
//!
//! Every call that does I/O releases the GIL; long ones wake every 100 ms
//! so Ctrl-C interrupts them. Errors map to the `hci.HciError` hierarchy in
//! one place, [`error`].
#![deny(missing_docs)]

pub mod backup;
pub mod client;
pub mod error;
pub mod network;
pub mod resources;
pub mod runtime;
pub mod volume;

use pyo3::prelude::*;

/// The `hci._hci` extension module.
#[pymodule(name = "_hci")]
fn hci_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    error::register(m)?;
    m.add_function(wrap_pyfunction!(error::raise_core_error, m)?)?;
    m.add_function(wrap_pyfunction!(error::raise_status, m)?)?;
    m.add_class::<volume::VolumeStore>()?;
    m.add_class::<volume::VolumeHandle>()?;
    m.add_class::<volume::VolumeInfo>()?;
    m.add_class::<volume::SnapshotInfo>()?;
    m.add_class::<volume::Extent>()?;
    m.add_class::<volume::NbdExport>()?;
    m.add_class::<volume::ReplicaServer>()?;
    m.add_class::<network::Networks>()?;
    m.add_class::<network::NetworkInfo>()?;
    m.add_class::<backup::BackupRepository>()?;
    m.add_class::<backup::BackupInfo>()?;
    m.add_class::<backup::VerifyReport>()?;
    m.add_class::<client::RawClient>()?;
    m.add_class::<client::WatchStream>()?;
    m.add_class::<client::ConsoleStream>()?;
    m.add_function(wrap_pyfunction!(resources::validate_json, m)?)?;
    m.add_function(wrap_pyfunction!(resources::parse_yaml, m)?)?;
    m.add_function(wrap_pyfunction!(resources::to_yaml, m)?)?;
    m.add_function(wrap_pyfunction!(resources::kinds, m)?)?;
    Ok(())
}
