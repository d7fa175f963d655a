//! Conformance suites: one per backend trait, run by every implementation, and
//! fault-injecting wrappers for failure tests.
//!
//! Each suite module exposes one public async function per case, a `*_suite`
//! function running them all, a `*_CASES` list, and a `#[macro_export]` macro
//! generating one `#[tokio::test]` per case so no case can be skipped silently:
//!
//! | trait | module | macro |
//! |---|---|---|
//! | `BlockDevice` | [`block`] | [`block_device_conformance!`](crate::block_device_conformance) |
//! | `VolumeBackend` | [`volume`] | [`volume_backend_conformance!`](crate::volume_backend_conformance) |
//! | `StateStore` | [`store`] | [`state_store_conformance!`](crate::state_store_conformance) |
//! | `Hypervisor` | [`hypervisor`] | [`hypervisor_conformance!`](crate::hypervisor_conformance) |
//! | `BackupTarget` | [`backup`] | [`backup_target_conformance!`](crate::backup_target_conformance) |
//! | `NetworkBackend` | [`network`] | [`network_backend_conformance!`](crate::network_backend_conformance) |
//!
//! The calling crate needs `tokio` (features `macros`, `rt-multi-thread`) as a
//! dev-dependency.

pub mod backup;
pub mod block;
pub mod faulty;
pub mod hypervisor;
pub mod network;
pub mod store;
pub mod volume;
