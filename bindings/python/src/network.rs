//! In-process networks: [`Networks`] over hci-net's Linux bridge backend
//! (bridges, NAT, VXLAN, DHCP) for processes with CAP_NET_ADMIN.

use std::path::PathBuf;
use std::sync::Arc;

use hci_core::model::{AnyResource, Network};
use hci_core::net::{NetworkBackend, PortConfig};
use hci_net::{BackendOptions, LinuxBridgeBackend};
use pyo3::prelude::*;

use crate::error::{CoreResultExt, InvalidSpec};
use crate::runtime::run;

/// One network as it exists on this host.
#[pyclass(frozen, get_all, eq, module = "hci._hci")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    /// Network name.
    pub name: String,
    /// Its bridge interface.
    pub bridge: String,
    /// Ports attached to it.
    pub ports: Vec<String>,
    /// Whether its DHCP server runs.
    pub dhcp_running: bool,
}

#[pymethods]
impl NetworkInfo {
    fn __repr__(&self) -> String {
        format!(
            "NetworkInfo(name={:?}, bridge={:?}, ports={:?}, dhcp_running={})",
            self.name,
            self.bridge,
            self.ports,
            if self.dhcp_running { "True" } else { "False" }
        )
    }
}

impl From<hci_core::net::NetworkStatus> for NetworkInfo {
    fn from(s: hci_core::net::NetworkStatus) -> Self {
        NetworkInfo {
            name: s.name,
            bridge: s.bridge,
            ports: s.ports,
            dhcp_running: s.dhcp_running,
        }
    }
}

/// This host's networks, made the way hci-daemon makes them: a Linux bridge
/// per network (with NAT for management networks, VXLAN for overlays) and
/// hci's DHCP server. Needs CAP_NET_ADMIN. Networks persist until removed;
/// DHCP servers run while this object lives.
#[pyclass(frozen, module = "hci._hci")]
#[derive(Debug)]
pub struct Networks {
    backend: Arc<LinuxBridgeBackend>,
}

#[pymethods]
impl Networks {
    /// Connects to the kernel's netlink; DHCP leases are kept in `state_dir`.
    #[new]
    #[pyo3(signature = (state_dir = None))]
    fn new(py: Python<'_>, state_dir: Option<PathBuf>) -> PyResult<Self> {
        let options = BackendOptions {
            state_dir,
            ..BackendOptions::default()
        };
        let backend = run(py, LinuxBridgeBackend::new(options))?.py_err()?;
        Ok(Networks {
            backend: Arc::new(backend),
        })
    }

    /// Creates or updates the network a `Network` resource describes (JSON,
    /// as `hci.Network.to_json()` gives), idempotently.
    fn ensure(&self, py: Python<'_>, network_json: &str) -> PyResult<NetworkInfo> {
        let net: Network = match AnyResource::from_json(network_json) {
            Ok(AnyResource::Network(n)) => n,
            Ok(other) => {
                return Err(InvalidSpec::new_err(format!(
                    "expected a Network, got a {}",
                    other.kind()
                )));
            }
            Err(e) => return Err(InvalidSpec::new_err(e.to_string())),
        };
        let config = hci_daemon::controllers::resolve_network(&net, &[], "local").py_err()?;
        let b = self.backend.clone();
        Ok(run(py, async move { b.ensure_network(&config).await })?
            .py_err()?
            .into())
    }

    /// Removes network `name` and everything made for it.
    fn remove(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        let b = self.backend.clone();
        run(py, async move { b.remove_network(name).await })?.py_err()
    }

    /// The networks made here.
    fn list(&self, py: Python<'_>) -> PyResult<Vec<NetworkInfo>> {
        let b = self.backend.clone();
        let v = run(py, async move { b.list_networks().await })?.py_err()?;
        Ok(v.into_iter().map(Into::into).collect())
    }

    /// Creates TAP port `port` on `network` with MAC `mac`
    /// (`"52:54:00:12:34:56"`); returns the TAP's interface name.
    fn attach_port(
        &self,
        py: Python<'_>,
        network: &str,
        port: &str,
        mac: &str,
    ) -> PyResult<String> {
        let mac = parse_mac(mac)?;
        let config = PortConfig {
            name: port.to_string(),
            mac,
            queues: 1,
        };
        let b = self.backend.clone();
        let tap = run(py, async move { b.attach_port(network, &config).await })?.py_err()?;
        Ok(tap.ifname)
    }

    /// Removes port `port` from `network`.
    fn detach_port(&self, py: Python<'_>, network: &str, port: &str) -> PyResult<()> {
        let b = self.backend.clone();
        run(py, async move { b.detach_port(network, port).await })?.py_err()
    }

    fn __repr__(&self) -> String {
        "Networks()".to_string()
    }
}

fn parse_mac(s: &str) -> PyResult<[u8; 6]> {
    let bad = || InvalidSpec::new_err(format!("{s:?} is not a MAC address (52:54:00:12:34:56)"));
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}
