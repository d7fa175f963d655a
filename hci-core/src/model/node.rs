//! `Node`: a server in the pool.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::resource::{Envelope, EnvelopeRef, Resource, check_envelope, resource};
use super::{ByteSize, Condition, ObjectMeta, ValidationErrors};

resource! {
    /// A node (server) that runs VMs and holds replicas.
    Node, "Node", NodeSpec, NodeStatus
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Desired state of a node (what operators set).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// No new VMs or replicas are placed here.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cordoned: bool,
    /// Cordoned and drained, and kept so until maintenance is turned off.
    #[serde(default, skip_serializing_if = "is_false")]
    pub maintenance: bool,
    /// Addresses other nodes reach it at (replication, migration, overlay underlay).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// Amounts of node resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeResources {
    /// CPUs.
    pub cpus: u32,
    /// Memory.
    pub memory: ByteSize,
    /// Storage for replicas.
    pub storage: ByteSize,
}

/// Observed state of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeStatus {
    /// Everything the node has.
    #[serde(default)]
    pub capacity: NodeResources,
    /// What VMs and replicas may use (capacity minus reservations).
    #[serde(default)]
    pub allocatable: NodeResources,
    /// Conditions (`Ready`, `KvmAvailable`…).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// hci version running there.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Its replica servers (`HOST:PORT`), one per disk that holds replicas
    /// of replicated volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_servers: Vec<String>,
}

impl Resource for Node {
    const KIND: &'static str = "Node";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }

    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::new();
        self.metadata.validate_into(&mut errs);
        if self.spec.maintenance && !self.spec.cordoned {
            errs.push("spec.cordoned", "a node in maintenance must be cordoned");
        }
        for (i, a) in self.spec.addresses.iter().enumerate() {
            if a.parse::<std::net::IpAddr>().is_err() {
                errs.push(
                    format!("spec.addresses[{i}]"),
                    format!("{a:?} is not an IP address"),
                );
            }
        }
        errs.into_result()
    }
}
