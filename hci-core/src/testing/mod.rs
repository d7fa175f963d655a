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
//! | `BlockDevice` (read-only) | [`block`] | [`read_only_block_device_conformance!`](crate::read_only_block_device_conformance) |
//! | `VolumeBackend` | [`volume`] | [`volume_backend_conformance!`](crate::volume_backend_conformance) |
//! | `StateStore` | [`store`] | [`state_store_conformance!`](crate::state_store_conformance) |
//! | `Hypervisor` | [`hypervisor`] | [`hypervisor_conformance!`](crate::hypervisor_conformance) (takes a [`hypervisor::HypervisorFixture`]) |
//! | `BackupTarget` | [`backup`] | [`backup_target_conformance!`](crate::backup_target_conformance) |
//! | `NetworkBackend` | [`network`] | [`network_backend_conformance!`](crate::network_backend_conformance) |
//!
//! Every macro takes `make`, an async function (or a closure returning a
//! future) called once per case: `Fn() -> impl Future<Output = T>` where `T`
//! dereferences to the implementation (`Box<MyBackend>`, `Arc<dyn Trait>`, or a
//! fixture that also owns what the backend needs, such as a temporary
//! directory). The block, volume, store and backup macros hold the one list of
//! their cases; their `*_CASES` lists and `*_suite` functions are generated from
//! it, so they cannot drift apart.
//! A case that cannot run against a backend says so on stderr (`SKIPPED …`)
//! rather than passing silently.
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
