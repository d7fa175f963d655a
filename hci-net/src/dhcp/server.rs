//! The DHCP server task: a UDP socket on port 67 bound to one bridge.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hci_core::{Error, Result};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::{Destination, DhcpSettings, Lease, LeaseDb, handle_packet};
use crate::netns::NetNs;

const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;

/// A running DHCP server; stopped when dropped.
#[derive(Debug)]
pub struct DhcpServer {
    db: Arc<Mutex<LeaseDb>>,
    task: JoinHandle<()>,
    ifname: String,
    ifindex: u32,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock(db: &Mutex<LeaseDb>) -> MutexGuard<'_, LeaseDb> {
    // A panic while holding the lock cannot leave the database inconsistent in
    // a way worse than losing the request, so keep serving.
    db.lock().unwrap_or_else(|p| p.into_inner())
}

fn bind_socket(ifname: &str) -> std::io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.bind_device(Some(ifname.as_bytes()))?;
    s.set_broadcast(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SERVER_PORT)).into())?;
    Ok(s.into())
}

impl DhcpServer {
    /// Starts serving `settings` on interface `ifname` (index `ifindex`) in
    /// `ns`, keeping leases in `lease_file` if given. Must be called inside a
    /// tokio runtime.
    pub async fn start(
        ns: &NetNs,
        ifname: &str,
        ifindex: u32,
        settings: DhcpSettings,
        lease_file: Option<PathBuf>,
    ) -> Result<Self> {
        let db = LeaseDb::open(settings, lease_file)?;
        let std_socket = ns
            .run(|| bind_socket(ifname))
            .and_then(|r| r)
            .map_err(|e| Error::io(format!("bind the DHCP server to {ifname}:{SERVER_PORT}"), e))?;
        let socket = UdpSocket::from_std(std_socket)
            .map_err(|e| Error::io(format!("register the DHCP socket of {ifname}"), e))?;
        let db = Arc::new(Mutex::new(db));
        let span = tracing::info_span!("dhcp_server", ifname = %ifname);
        let task = tokio::spawn(serve(socket, db.clone()).instrument(span));
        tracing::info!(ifname, "DHCP server started");
        Ok(Self {
            db,
            task,
            ifname: ifname.to_string(),
            ifindex,
        })
    }

    /// Interface index the socket is bound to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Interface name the socket is bound to.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Current settings.
    pub fn settings(&self) -> DhcpSettings {
        lock(&self.db).settings.clone()
    }

    /// Every lease (offered and bound).
    pub fn leases(&self) -> Vec<Lease> {
        lock(&self.db).leases()
    }

    /// Applies new settings, keeping the leases they still allow.
    pub fn reconfigure(&self, settings: DhcpSettings) {
        lock(&self.db).reconfigure(settings);
    }

    /// True while the serving task runs.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(socket: UdpSocket, db: Arc<Mutex<LeaseDb>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "DHCP receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(packet) = buf.get(..len).map(<[u8]>::to_vec) else {
            continue;
        };
        // Off the async threads: a lease change writes and syncs the lease file.
        let db2 = db.clone();
        let handled = tokio::task::spawn_blocking(move || {
            handle_packet(&mut lock(&db2), &packet, now_unix())
        })
        .await;
        let reply = match handled {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "DHCP request handling failed");
                None
            }
        };
        let Some(reply) = reply else { continue };
        let to = match reply.to {
            Destination::Broadcast => Ipv4Addr::BROADCAST,
            Destination::Unicast(ip) => ip,
        };
        tracing::debug!(?from, %to, kind = ?reply.kind, "DHCP reply");
        if let Err(e) = socket
            .send_to(&reply.packet, SocketAddrV4::new(to, CLIENT_PORT))
            .await
        {
            tracing::warn!(error = %e, %to, "DHCP send failed");
        }
    }
}
