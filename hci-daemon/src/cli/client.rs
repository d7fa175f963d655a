//! A connection to hci-daemon and kind-generic calls over the nine
//! resource services.

use std::fmt;
use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Status, Streaming};

use crate::proto;
use crate::proto::backup_service_client::BackupServiceClient;
use crate::proto::backup_target_service_client::BackupTargetServiceClient;
use crate::proto::event_service_client::EventServiceClient;
use crate::proto::image_service_client::ImageServiceClient;
use crate::proto::network_service_client::NetworkServiceClient;
use crate::proto::node_service_client::NodeServiceClient;
use crate::proto::schedule_service_client::ScheduleServiceClient;
use crate::proto::snapshot_service_client::SnapshotServiceClient;
use crate::proto::virtual_machine_service_client::VirtualMachineServiceClient;
use crate::proto::virtual_machine_snapshot_service_client::VirtualMachineSnapshotServiceClient;
use crate::proto::volume_service_client::VolumeServiceClient;

/// The daemon's default socket (`hci-daemon` with its default data directory).
pub const DEFAULT_SERVER: &str = "unix:/var/lib/hci/hci.sock";

/// A resource kind, as users type it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// VirtualMachine.
    Vm,
    /// Volume.
    Volume,
    /// Image.
    Image,
    /// Network.
    Network,
    /// Snapshot.
    Snapshot,
    /// Backup.
    Backup,
    /// BackupTarget.
    BackupTarget,
    /// Schedule.
    Schedule,
    /// Node.
    Node,
    /// VirtualMachineSnapshot.
    VmSnapshot,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 10] = [
        Kind::Vm,
        Kind::Volume,
        Kind::Image,
        Kind::Network,
        Kind::Snapshot,
        Kind::Backup,
        Kind::BackupTarget,
        Kind::Schedule,
        Kind::Node,
        Kind::VmSnapshot,
    ];

    /// The model's kind name (`VirtualMachine`, `Volume`, …).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Vm => "VirtualMachine",
            Kind::Volume => "Volume",
            Kind::Image => "Image",
            Kind::Network => "Network",
            Kind::Snapshot => "Snapshot",
            Kind::Backup => "Backup",
            Kind::BackupTarget => "BackupTarget",
            Kind::Schedule => "Schedule",
            Kind::Node => "Node",
            Kind::VmSnapshot => "VirtualMachineSnapshot",
        }
    }

    /// The short lower-case name used in output (`vm/web`).
    pub fn short(self) -> &'static str {
        match self {
            Kind::Vm => "vm",
            Kind::Volume => "volume",
            Kind::Image => "image",
            Kind::Network => "network",
            Kind::Snapshot => "snapshot",
            Kind::Backup => "backup",
            Kind::BackupTarget => "backuptarget",
            Kind::Schedule => "schedule",
            Kind::Node => "node",
            Kind::VmSnapshot => "vmsnapshot",
        }
    }

    /// The kind of a model kind name (`VirtualMachine`).
    pub fn from_model(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl std::str::FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let k = s.to_ascii_lowercase();
        Ok(match k.as_str() {
            "vm" | "vms" | "virtualmachine" | "virtualmachines" => Kind::Vm,
            "vol" | "vols" | "volume" | "volumes" => Kind::Volume,
            "img" | "image" | "images" => Kind::Image,
            "net" | "nets" | "network" | "networks" => Kind::Network,
            "snap" | "snaps" | "snapshot" | "snapshots" => Kind::Snapshot,
            "backup" | "backups" => Kind::Backup,
            "backuptarget" | "backuptargets" | "target" | "targets" => Kind::BackupTarget,
            "schedule" | "schedules" => Kind::Schedule,
            "node" | "nodes" | "no" => Kind::Node,
            "vmsnapshot"
            | "vmsnapshots"
            | "vmsnap"
            | "vmsnaps"
            | "virtualmachinesnapshot"
            | "virtualmachinesnapshots" => Kind::VmSnapshot,
            _ => {
                return Err(format!(
                    "unknown kind {s:?}: use one of vm, volume, image, network, snapshot, vmsnapshot, backup, backuptarget, schedule, node"
                ));
            }
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

/// Why the daemon could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server address is not understood.
    #[error("{0:?} is not a server address: use unix:/path/to/hci.sock or https://host:port")]
    BadAddress(String),
    /// The address is fine but nothing answers there.
    #[error("cannot reach hci-daemon at {server}: {reason}")]
    Unreachable {
        /// The address.
        server: String,
        /// Why.
        reason: String,
    },
}

/// How to reach the daemon beyond its address.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Bearer token (required over https).
    pub token: Option<String>,
    /// PEM CA certificate(s) to trust for https (else the web PKI roots).
    pub ca_pem: Option<Vec<u8>>,
}

/// A channel to the daemon that adds the bearer token to every request.
#[derive(Debug, Clone)]
pub struct Transport {
    channel: Channel,
    auth: Option<http::HeaderValue>,
}

impl tower::Service<http::Request<tonic::body::Body>> for Transport {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(v) = &self.auth {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, v.clone());
        }
        tower::Service::call(&mut self.channel, req)
    }
}

/// A connection to hci-daemon.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Transport,
}

/// Runs `$body` with `$c` bound to the generated client of `$kind`.
macro_rules! with_client {
    ($self:ident, $kind:expr, |$c:ident| $body:expr) => {
        match $kind {
            Kind::Vm => {
                let mut $c = VirtualMachineServiceClient::new($self.channel.clone());
                $body
            }
            Kind::Volume => {
                let mut $c = VolumeServiceClient::new($self.channel.clone());
                $body
            }
            Kind::Image => {
                let mut $c = ImageServiceClient::new($self.channel.clone());
                $body
            }
            Kind::Network => {
                let mut $c = NetworkServiceClient::new($self.channel.clone());
                $body
            }
            Kind::Snapshot => {
                let mut $c = SnapshotServiceClient::new($self.channel.clone());
                $body
            }
            Kind::Backup => {
                let mut $c = BackupServiceClient::new($self.channel.clone());
                $body
            }
            Kind::BackupTarget => {
                let mut $c = BackupTargetServiceClient::new($self.channel.clone());
                $body
            }
            Kind::Schedule => {
                let mut $c = ScheduleServiceClient::new($self.channel.clone());
                $body
            }
            Kind::Node => {
                let mut $c = NodeServiceClient::new($self.channel.clone());
                $body
            }
            Kind::VmSnapshot => {
                let mut $c = VirtualMachineSnapshotServiceClient::new($self.channel.clone());
                $body
            }
        }
    };
}

impl Client {
    /// Connects to `server` (`unix:PATH` or `https://HOST:PORT`).
    pub async fn connect(server: &str, options: ConnectOptions) -> Result<Self, ConnectError> {
        let unreachable = |reason: String| ConnectError::Unreachable {
            server: server.to_string(),
            reason,
        };
        let auth = match &options.token {
            Some(t) => Some(
                http::HeaderValue::from_str(&format!("Bearer {}", t.trim())).map_err(|_| {
                    unreachable("the token has characters a header cannot carry".into())
                })?,
            ),
            None => None,
        };
        if server.starts_with("http://") {
            return Err(unreachable(
                "the API is never served over plain http: use https://".into(),
            ));
        }
        if let Some(rest) = server.strip_prefix("https://") {
            crate::api::install_crypto_provider();
            if auth.is_none() {
                return Err(unreachable("https needs a token: pass --token-file".into()));
            }
            let host = rest
                .trim_end_matches('/')
                .rsplit_once(':')
                .map_or(rest, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let mut tls = tonic::transport::ClientTlsConfig::new().domain_name(host);
            tls = match &options.ca_pem {
                Some(pem) => tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
                None => tls.with_webpki_roots(),
            };
            let channel = Endpoint::from_shared(server.to_string())
                .map_err(|_| ConnectError::BadAddress(server.to_string()))?
                .tls_config(tls)
                .map_err(|e| unreachable(e.to_string()))?
                .connect()
                .await
                .map_err(|e| unreachable(format!("{e}: {}", source_chain(&e))))?;
            return Ok(Client {
                channel: Transport { channel, auth },
            });
        }
        let Some(path) = server.strip_prefix("unix:") else {
            return Err(ConnectError::BadAddress(server.to_string()));
        };
        let path = PathBuf::from(path);
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(unreachable(
                    "no such socket — is hci-daemon running? (set --server or HCI_SERVER)".into(),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(unreachable(
                    "permission denied — the socket is root-only (mode 0600)".into(),
                ));
            }
            _ => {}
        }
        // A first connection now, so a dead socket fails here with a clear
        // message rather than on the first call.
        UnixStream::connect(&path)
            .await
            .map_err(|e| unreachable(format!("{e} — is hci-daemon running?")))?;
        let channel =
            Endpoint::try_from("http://hci.invalid")
                .map_err(|e| unreachable(e.to_string()))?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        Ok(Client {
            channel: Transport { channel, auth },
        })
    }

    /// The underlying transport (for the kind-specific services).
    pub fn transport(&self) -> &Transport {
        &self.channel
    }

    /// Reads one resource.
    pub async fn get(&self, kind: Kind, name: &str) -> Result<proto::Resource, Status> {
        let req = proto::GetRequest {
            name: name.to_string(),
        };
        with_client!(self, kind, |c| c.get(req).await.map(|r| r.into_inner()))
    }

    /// Lists resources of a kind.
    pub async fn list(&self, kind: Kind) -> Result<proto::ListResponse, Status> {
        let req = proto::ListRequest::default();
        with_client!(self, kind, |c| c.list(req).await.map(|r| r.into_inner()))
    }

    /// Creates a resource from its JSON document.
    pub async fn create(&self, kind: Kind, json: String) -> Result<proto::Resource, Status> {
        let req = proto::CreateRequest { json };
        with_client!(self, kind, |c| c.create(req).await.map(|r| r.into_inner()))
    }

    /// Replaces a resource's metadata and spec, if it still has `version`.
    pub async fn update(
        &self,
        kind: Kind,
        json: String,
        version: u64,
    ) -> Result<proto::Resource, Status> {
        let req = proto::UpdateRequest {
            json,
            resource_version: version,
        };
        with_client!(self, kind, |c| c.update(req).await.map(|r| r.into_inner()))
    }

    /// Deletes a resource.
    pub async fn delete(&self, kind: Kind, name: &str) -> Result<u64, Status> {
        let req = proto::DeleteRequest {
            name: name.to_string(),
            resource_version: 0,
        };
        with_client!(self, kind, |c| c
            .delete(req)
            .await
            .map(|r| r.into_inner().revision))
    }

    /// Follows changes to a kind (or one resource of it).
    pub async fn watch(
        &self,
        kind: Kind,
        name: Option<&str>,
    ) -> Result<Streaming<proto::WatchEvent>, Status> {
        let req = proto::WatchRequest {
            from_revision: 0,
            name: name.unwrap_or_default().to_string(),
        };
        with_client!(self, kind, |c| c.watch(req).await.map(|r| r.into_inner()))
    }

    /// Follows changes to one resource from store revision `from`.
    pub async fn watch_from(
        &self,
        kind: Kind,
        name: &str,
        from: u64,
    ) -> Result<Streaming<proto::WatchEvent>, Status> {
        let req = proto::WatchRequest {
            from_revision: from,
            name: name.to_string(),
        };
        with_client!(self, kind, |c| c.watch(req).await.map(|r| r.into_inner()))
    }

    /// Kept events of `kind` (all kinds if `None`) and `name`, oldest first.
    pub async fn events(
        &self,
        kind: Option<Kind>,
        name: Option<&str>,
    ) -> Result<Vec<proto::Event>, Status> {
        let req = proto::ListEventsRequest {
            kind: kind.map(|k| k.name().to_string()).unwrap_or_default(),
            name: name.unwrap_or_default().to_string(),
        };
        let mut c = EventServiceClient::new(self.channel.clone());
        Ok(c.list(req).await?.into_inner().events)
    }

    /// Follows new events of `kind` and `name`.
    pub async fn watch_events(
        &self,
        kind: Option<Kind>,
        name: Option<&str>,
    ) -> Result<Streaming<proto::Event>, Status> {
        let req = proto::WatchEventsRequest {
            kind: kind.map(|k| k.name().to_string()).unwrap_or_default(),
            name: name.unwrap_or_default().to_string(),
            from_now: true,
        };
        let mut c = EventServiceClient::new(self.channel.clone());
        Ok(c.watch(req).await?.into_inner())
    }

    /// The VM service.
    pub fn vms(&self) -> VirtualMachineServiceClient<Transport> {
        VirtualMachineServiceClient::new(self.channel.clone())
    }

    /// The volume service.
    pub fn volumes(&self) -> VolumeServiceClient<Transport> {
        VolumeServiceClient::new(self.channel.clone())
    }

    /// The backup service.
    pub fn backups(&self) -> BackupServiceClient<Transport> {
        BackupServiceClient::new(self.channel.clone())
    }

    /// The VM snapshot service.
    pub fn vm_snapshots(&self) -> VirtualMachineSnapshotServiceClient<Transport> {
        VirtualMachineSnapshotServiceClient::new(self.channel.clone())
    }
}

/// The causes under an error, joined (TLS failures hide there).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        parts.push(c.to_string());
        cur = c.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_with_aliases() {
        for (s, k) in [
            ("vm", Kind::Vm),
            ("VirtualMachines", Kind::Vm),
            ("vol", Kind::Volume),
            ("nets", Kind::Network),
            ("snap", Kind::Snapshot),
            ("backuptargets", Kind::BackupTarget),
            ("nodes", Kind::Node),
            ("vmsnap", Kind::VmSnapshot),
            ("VirtualMachineSnapshots", Kind::VmSnapshot),
        ] {
            assert_eq!(s.parse::<Kind>(), Ok(k), "{s}");
        }
        assert!("pods".parse::<Kind>().is_err());
        for k in Kind::ALL {
            assert_eq!(Kind::from_model(k.name()), Some(k));
            assert_eq!(k.short().parse::<Kind>(), Ok(k));
        }
    }
}
