//! hci-core's `NetworkBackend` conformance suite against the Linux bridge
//! backend, each case in a fresh network namespace (a fresh "node").

mod common;

async fn fresh_node() -> common::Node {
    common::Node::new("conf").await
}

hci_core::network_backend_conformance!(fresh_node);

/// The whole suite in one run against one backend too (cases use distinct names).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_suite_on_one_node() {
    let node = common::Node::new("suite").await;
    hci_core::testing::network::network_backend_suite(|| async { &node.backend }).await;
}
