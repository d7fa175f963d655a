//! Conformance suite for [`NetworkBackend`].
//!
//! Every case is a public async function taking the backend under test; a
//! backend crate runs them all with one `#[test]` per case through
//! [`network_backend_conformance!`](crate::network_backend_conformance):
//!
//! ```ignore
//! async fn make() -> MyFixture { /* a fresh backend (e.g. in a new namespace) */ }
//! hci_core::network_backend_conformance!(make);
//! ```
//!
//! `make` is called once per case and returns anything that dereferences to
//! the backend (the backend itself in a `Box`/`Arc`, or a fixture that also
//! owns what the backend needs, such as a network namespace). Cases use only
//! isolated bridge networks (`NetworkKind::Bridge { uplink: None }`, no L3),
//! which every backend can realise, and network names unique to the case, so
//! they may share one node. The calling crate needs `tokio` (with the
//! `macros` and `rt-multi-thread` features) as a dev-dependency.

use std::ops::Deref;

use crate::error::Error;
use crate::net::{NetworkBackend, NetworkConfig, NetworkKind, PortConfig};

/// Names of every case, in the order [`network_backend_suite`] runs them.
pub const NETWORK_BACKEND_CASES: &[&str] = &[
    "ensure_network_is_idempotent",
    "ensure_network_updates_in_place",
    "remove_absent_network_is_not_found",
    "remove_network_removes_ports_and_forgets_it",
    "list_networks_lists_each_once",
    "attach_and_detach_port",
    "attach_same_port_twice_is_idempotent",
    "attach_with_another_mac_is_refused",
    "attach_to_absent_network_is_not_found",
    "detach_absent_port_is_not_found",
    "multi_queue_port_keeps_one_fd_per_queue",
    "ports_belong_to_their_network",
    "invalid_network_name_is_refused",
];

/// An isolated L2 bridge network called `name`.
pub fn isolated_network(name: &str) -> NetworkConfig {
    NetworkConfig {
        name: name.to_string(),
        kind: NetworkKind::Bridge { uplink: None },
        cidr: None,
        gateway: None,
        dhcp: None,
        mtu: None,
    }
}

/// A single-queue port with a locally administered MAC ending in `last`.
pub fn port(name: &str, last: u8) -> PortConfig {
    PortConfig {
        name: name.to_string(),
        mac: [0x02, 0x68, 0x63, 0xcc, 0x00, last],
        queues: 1,
    }
}

fn status_of<'a>(
    list: &'a [crate::net::NetworkStatus],
    name: &str,
) -> Option<&'a crate::net::NetworkStatus> {
    list.iter().find(|s| s.name == name)
}

/// `ensure_network` twice with the same config returns the same status and
/// leaves one network.
pub async fn ensure_network_is_idempotent<B: NetworkBackend + ?Sized>(backend: &B) {
    let cfg = isolated_network("conf-idem");
    let a = backend
        .ensure_network(&cfg)
        .await
        .expect("first ensure_network");
    let b = backend
        .ensure_network(&cfg)
        .await
        .expect("second ensure_network");
    assert_eq!(a, b, "ensure_network is not idempotent");
    assert_eq!(a.name, "conf-idem");
    assert!(!a.bridge.is_empty(), "status names no bridge");
    let list = backend.list_networks().await.expect("list_networks");
    assert_eq!(
        list.iter().filter(|s| s.name == "conf-idem").count(),
        1,
        "{list:?}"
    );
}

/// An updated config (MTU) is applied to the existing network, not a new one.
pub async fn ensure_network_updates_in_place<B: NetworkBackend + ?Sized>(backend: &B) {
    let mut cfg = isolated_network("conf-update");
    let a = backend.ensure_network(&cfg).await.expect("ensure_network");
    let tap = backend
        .attach_port("conf-update", &port("conf-update-p", 1))
        .await
        .expect("attach_port");
    cfg.mtu = Some(1400);
    let b = backend
        .ensure_network(&cfg)
        .await
        .expect("ensure_network with a new MTU");
    assert_eq!(
        a.bridge, b.bridge,
        "an update must not create another bridge"
    );
    assert_eq!(
        b.ports,
        vec!["conf-update-p".to_string()],
        "an update must keep the ports"
    );
    let again = backend
        .attach_port("conf-update", &port("conf-update-p", 1))
        .await
        .expect("attach_port again");
    assert_eq!(again.ifname, tap.ifname);
    assert_eq!(again.mtu, 1400, "ports follow the network's MTU");
}

/// Removing a network that does not exist is `NotFound`.
pub async fn remove_absent_network_is_not_found<B: NetworkBackend + ?Sized>(backend: &B) {
    let r = backend.remove_network("conf-absent").await;
    assert!(
        matches!(r, Err(Error::NotFound { .. })),
        "expected NotFound, got {r:?}"
    );
}

/// Removing a network removes its ports; removing it again is `NotFound`.
pub async fn remove_network_removes_ports_and_forgets_it<B: NetworkBackend + ?Sized>(backend: &B) {
    backend
        .ensure_network(&isolated_network("conf-rm"))
        .await
        .expect("ensure_network");
    backend
        .attach_port("conf-rm", &port("conf-rm-p", 2))
        .await
        .expect("attach_port");
    backend
        .remove_network("conf-rm")
        .await
        .expect("remove_network");
    let list = backend.list_networks().await.expect("list_networks");
    assert!(
        status_of(&list, "conf-rm").is_none(),
        "removed network still listed: {list:?}"
    );
    let r = backend.detach_port("conf-rm", "conf-rm-p").await;
    assert!(
        matches!(r, Err(Error::NotFound { .. })),
        "port outlived its network: {r:?}"
    );
    let r = backend.remove_network("conf-rm").await;
    assert!(
        matches!(r, Err(Error::NotFound { .. })),
        "second remove: expected NotFound, got {r:?}"
    );
    // The name can be used again.
    backend
        .ensure_network(&isolated_network("conf-rm"))
        .await
        .expect("ensure_network after remove");
    let st = &backend.list_networks().await.expect("list_networks");
    assert!(
        status_of(st, "conf-rm").is_some_and(|s| s.ports.is_empty()),
        "{st:?}"
    );
}

/// Every ensured network is listed once, each with its own bridge.
pub async fn list_networks_lists_each_once<B: NetworkBackend + ?Sized>(backend: &B) {
    let names = ["conf-list-a", "conf-list-b", "conf-list-c"];
    for n in names {
        backend
            .ensure_network(&isolated_network(n))
            .await
            .expect("ensure_network");
    }
    let list = backend.list_networks().await.expect("list_networks");
    let mut bridges = Vec::new();
    for n in names {
        assert_eq!(
            list.iter().filter(|s| s.name == n).count(),
            1,
            "{n} not listed once: {list:?}"
        );
        bridges.push(status_of(&list, n).map(|s| s.bridge.clone()));
    }
    bridges.sort();
    bridges.dedup();
    assert_eq!(
        bridges.len(),
        names.len(),
        "networks share a bridge: {list:?}"
    );
}

/// A port appears in its network's status after attach and disappears after detach.
pub async fn attach_and_detach_port<B: NetworkBackend + ?Sized>(backend: &B) {
    backend
        .ensure_network(&isolated_network("conf-port"))
        .await
        .expect("ensure_network");
    let p = port("conf-port-p", 3);
    let tap = backend
        .attach_port("conf-port", &p)
        .await
        .expect("attach_port");
    assert!(
        !tap.ifname.is_empty() && tap.ifname.len() <= 15,
        "bad interface name {:?}",
        tap.ifname
    );
    assert_eq!(tap.mac, p.mac);
    assert!(tap.mtu >= 68, "implausible MTU {}", tap.mtu);
    let list = backend.list_networks().await.expect("list_networks");
    assert_eq!(
        status_of(&list, "conf-port").map(|s| s.ports.clone()),
        Some(vec!["conf-port-p".to_string()])
    );
    backend
        .detach_port("conf-port", "conf-port-p")
        .await
        .expect("detach_port");
    let list = backend.list_networks().await.expect("list_networks");
    assert_eq!(
        status_of(&list, "conf-port").map(|s| s.ports.len()),
        Some(0),
        "{list:?}"
    );
}

/// Attaching the same port (same MAC) again returns the same port.
pub async fn attach_same_port_twice_is_idempotent<B: NetworkBackend + ?Sized>(backend: &B) {
    backend
        .ensure_network(&isolated_network("conf-twice"))
        .await
        .expect("ensure_network");
    let p = port("conf-twice-p", 4);
    let a = backend
        .attach_port("conf-twice", &p)
        .await
        .expect("attach_port");
    let b = backend
        .attach_port("conf-twice", &p)
        .await
        .expect("attach_port again");
    assert_eq!((a.ifname, a.mac, a.mtu), (b.ifname, b.mac, b.mtu));
    let list = backend.list_networks().await.expect("list_networks");
    assert_eq!(
        status_of(&list, "conf-twice").map(|s| s.ports.len()),
        Some(1),
        "{list:?}"
    );
}

/// Attaching an existing port name with another MAC is `AlreadyExists`.
pub async fn attach_with_another_mac_is_refused<B: NetworkBackend + ?Sized>(backend: &B) {
    backend
        .ensure_network(&isolated_network("conf-mac"))
        .await
        .expect("ensure_network");
    backend
        .attach_port("conf-mac", &port("conf-mac-p", 5))
        .await
        .expect("attach_port");
    let r = backend
        .attach_port("conf-mac", &port("conf-mac-p", 6))
        .await;
    assert!(
        matches!(r, Err(Error::AlreadyExists { .. })),
        "expected AlreadyExists, got {r:?}"
    );
}

/// Attaching to a network that does not exist is `NotFound`.
pub async fn attach_to_absent_network_is_not_found<B: NetworkBackend + ?Sized>(backend: &B) {
    let r = backend
        .attach_port("conf-nonet", &port("conf-nonet-p", 7))
        .await;
    assert!(
        matches!(r, Err(Error::NotFound { .. })),
        "expected NotFound, got {r:?}"
    );
}

/// Detaching a port that does not exist is `NotFound`.
pub async fn detach_absent_port_is_not_found<B: NetworkBackend + ?Sized>(backend: &B) {
    backend
        .ensure_network(&isolated_network("conf-noport"))
        .await
        .expect("ensure_network");
    let r = backend.detach_port("conf-noport", "conf-noport-p").await;
    assert!(
        matches!(r, Err(Error::NotFound { .. })),
        "expected NotFound, got {r:?}"
    );
}

/// A multi-queue port has one descriptor per queue, if the backend keeps them.
pub async fn multi_queue_port_keeps_one_fd_per_queue<B: NetworkBackend + ?Sized>(backend: &B) {
    backend
        .ensure_network(&isolated_network("conf-mq"))
        .await
        .expect("ensure_network");
    let p = PortConfig {
        queues: 4,
        ..port("conf-mq-p", 8)
    };
    let tap = backend
        .attach_port("conf-mq", &p)
        .await
        .expect("attach_port");
    assert!(
        tap.fds.is_empty() || tap.fds.len() == 4,
        "{} descriptors for 4 queues",
        tap.fds.len()
    );
}

/// A port is listed in its own network only, and cannot be detached through another.
pub async fn ports_belong_to_their_network<B: NetworkBackend + ?Sized>(backend: &B) {
    for n in ["conf-own-a", "conf-own-b"] {
        backend
            .ensure_network(&isolated_network(n))
            .await
            .expect("ensure_network");
    }
    backend
        .attach_port("conf-own-a", &port("conf-own-p", 9))
        .await
        .expect("attach_port");
    let list = backend.list_networks().await.expect("list_networks");
    assert_eq!(
        status_of(&list, "conf-own-b").map(|s| s.ports.len()),
        Some(0),
        "{list:?}"
    );
    let r = backend.detach_port("conf-own-b", "conf-own-p").await;
    assert!(
        matches!(r, Err(Error::NotFound { .. })),
        "detached through the wrong network: {r:?}"
    );
    backend
        .detach_port("conf-own-a", "conf-own-p")
        .await
        .expect("detach_port");
}

/// A network name that is not a DNS-1123 label is refused as `Invalid`.
pub async fn invalid_network_name_is_refused<B: NetworkBackend + ?Sized>(backend: &B) {
    for bad in ["Conf_Bad", "", "-conf"] {
        let r = backend.ensure_network(&isolated_network(bad)).await;
        assert!(
            matches!(r, Err(Error::Invalid { .. } | Error::InvalidSpec(_))),
            "{bad:?}: expected Invalid, got {r:?}"
        );
    }
}

/// Runs every case, each against a fresh backend from `make`.
pub async fn network_backend_suite<F, Fut, T, B>(make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T>,
    T: Deref<Target = B>,
    B: NetworkBackend + ?Sized,
{
    ensure_network_is_idempotent(&*make().await).await;
    ensure_network_updates_in_place(&*make().await).await;
    remove_absent_network_is_not_found(&*make().await).await;
    remove_network_removes_ports_and_forgets_it(&*make().await).await;
    list_networks_lists_each_once(&*make().await).await;
    attach_and_detach_port(&*make().await).await;
    attach_same_port_twice_is_idempotent(&*make().await).await;
    attach_with_another_mac_is_refused(&*make().await).await;
    attach_to_absent_network_is_not_found(&*make().await).await;
    detach_absent_port_is_not_found(&*make().await).await;
    multi_queue_port_keeps_one_fd_per_queue(&*make().await).await;
    ports_belong_to_their_network(&*make().await).await;
    invalid_network_name_is_refused(&*make().await).await;
}

/// Generates one `#[tokio::test]` per [`network_backend_suite`] case.
///
/// `$make` is an async function (or closure returning a future) producing a
/// fresh fixture that dereferences to the backend; it is called once per case.
#[macro_export]
macro_rules! network_backend_conformance {
    ($make:expr) => {
        $crate::network_backend_conformance!(@cases $make;
            ensure_network_is_idempotent,
            ensure_network_updates_in_place,
            remove_absent_network_is_not_found,
            remove_network_removes_ports_and_forgets_it,
            list_networks_lists_each_once,
            attach_and_detach_port,
            attach_same_port_twice_is_idempotent,
            attach_with_another_mac_is_refused,
            attach_to_absent_network_is_not_found,
            detach_absent_port_is_not_found,
            multi_queue_port_keeps_one_fd_per_queue,
            ports_belong_to_their_network,
            invalid_network_name_is_refused,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = ($make)().await;
                $crate::testing::network::$case(&*fixture).await;
            }
        )*
    };
}
