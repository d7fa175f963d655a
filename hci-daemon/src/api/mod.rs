//! The gRPC API: thin adapters from the `hci.v1` services to [`ResourceStore`].
//!
//! Every service converts request → domain call → response and nothing more;
//! errors become statuses in one place ([`status::to_status`]). The server
//! also serves standard gRPC health (`grpc.health.v1.Health`, one entry per
//! service) and reflection (`grpc.reflection.v1.ServerReflection`), so
//! `grpcurl` and friends work without the protos.
//!
//! Serving in-process on a Unix socket:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use hci_daemon::api::{Api, serve_unix};
//! use hci_daemon::resources::ResourceStore;
//! use hci_daemon::store::RedbStateStore;
//!
//! let store = RedbStateStore::open("/var/lib/hci/state.redb").await?;
//! let api = Api::new(ResourceStore::new(Arc::new(store)));
//! serve_unix(api, "/run/hci/hci.sock".as_ref(), std::future::pending()).await?;
//! # Ok(()) }
//! ```

pub mod auth;
mod console;
pub mod crud;
mod events;
mod services;
pub mod status;

use std::fmt;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tonic::transport::server::Router;

use self::auth::AuthLayer;
pub use self::console::{ConsoleIo, ConsoleProvider};
pub use self::services::{REQUESTED_ACTION, REQUESTED_AT};
use crate::metrics::{ApiLatency, LatencyLayer};
use crate::proto;
use crate::proto::backup_service_server::BackupServiceServer;
use crate::proto::backup_target_service_server::BackupTargetServiceServer;
use crate::proto::event_service_server::EventServiceServer;
use crate::proto::image_service_server::ImageServiceServer;
use crate::proto::network_service_server::NetworkServiceServer;
use crate::proto::node_service_server::NodeServiceServer;
use crate::proto::schedule_service_server::ScheduleServiceServer;
use crate::proto::snapshot_service_server::SnapshotServiceServer;
use crate::proto::virtual_machine_service_server::VirtualMachineServiceServer;
use crate::proto::virtual_machine_snapshot_service_server::VirtualMachineSnapshotServiceServer;
use crate::proto::volume_service_server::VolumeServiceServer;
use crate::resources::ResourceStore;

/// The state behind every service: resources, and optional backends for
/// operations that need a running VM.
#[derive(Clone)]
pub struct Api {
    resources: ResourceStore,
    console: Option<Arc<dyn ConsoleProvider>>,
    latency: ApiLatency,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("resources", &self.resources)
            .field("console", &self.console)
            .finish()
    }
}

impl Api {
    /// An API over `resources`, without a console backend.
    pub fn new(resources: ResourceStore) -> Self {
        Api {
            resources,
            console: None,
            latency: ApiLatency::default(),
        }
    }

    /// Latency of the calls it serves (for the metrics endpoint).
    pub fn latency(&self) -> &ApiLatency {
        &self.latency
    }

    /// Serves VM consoles through `provider`.
    pub fn with_console(mut self, provider: Arc<dyn ConsoleProvider>) -> Self {
        self.console = Some(provider);
        self
    }

    /// The resources it serves.
    pub fn resources(&self) -> &ResourceStore {
        &self.resources
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The listening socket could not be prepared.
    #[error("failed to listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Something else exists at the socket path.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// The reflection service could not load the descriptors.
    #[error("failed to build the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The gRPC transport failed.
    #[error("gRPC server failed")]
    Transport(#[source] tonic::transport::Error),
    /// TCP was asked for without what makes it safe.
    #[error("refusing to serve the API over TCP: {0}")]
    Insecure(String),
}

/// The router [`router`] builds: every service behind the latency and
/// authentication layers.
pub type ApiRouter = Router<
    tower::layer::util::Stack<
        AuthLayer,
        tower::layer::util::Stack<LatencyLayer, tower::layer::util::Identity>,
    >,
>;

/// Every service of the API, with health and reflection, ready to serve on
/// the Unix socket (no TLS, no token).
pub async fn router(api: Api) -> Result<ApiRouter, ServeError> {
    build(api, None, AuthLayer::open()).await
}

/// TLS material and the bearer token of the API over TCP.
#[derive(Clone)]
pub struct TcpSecurity {
    /// PEM certificate chain of the server.
    pub cert_pem: Vec<u8>,
    /// PEM private key of the server.
    pub key_pem: Vec<u8>,
    /// The token clients must send as `authorization: Bearer <token>`.
    pub token: String,
}

impl fmt::Debug for TcpSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpSecurity").finish_non_exhaustive()
    }
}

async fn build(
    api: Api,
    tls: Option<tonic::transport::ServerTlsConfig>,
    auth: AuthLayer,
) -> Result<ApiRouter, ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<VirtualMachineServiceServer<Api>>()
        .await;
    reporter.set_serving::<VolumeServiceServer<Api>>().await;
    reporter.set_serving::<ImageServiceServer<Api>>().await;
    reporter.set_serving::<SnapshotServiceServer<Api>>().await;
    reporter.set_serving::<NetworkServiceServer<Api>>().await;
    reporter.set_serving::<BackupServiceServer<Api>>().await;
    reporter
        .set_serving::<BackupTargetServiceServer<Api>>()
        .await;
    reporter.set_serving::<ScheduleServiceServer<Api>>().await;
    reporter.set_serving::<NodeServiceServer<Api>>().await;
    reporter
        .set_serving::<VirtualMachineSnapshotServiceServer<Api>>()
        .await;
    reporter.set_serving::<EventServiceServer<Api>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ServeError::Reflection)?;
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).map_err(ServeError::Transport)?;
    }
    Ok(server
        .layer(LatencyLayer(api.latency.clone()))
        .layer(auth)
        .add_service(health)
        .add_service(reflection)
        .add_service(VirtualMachineServiceServer::new(api.clone()))
        .add_service(VolumeServiceServer::new(api.clone()))
        .add_service(ImageServiceServer::new(api.clone()))
        .add_service(EventServiceServer::new(api.clone()))
        .add_service(SnapshotServiceServer::new(api.clone()))
        .add_service(NetworkServiceServer::new(api.clone()))
        .add_service(BackupServiceServer::new(api.clone()))
        .add_service(BackupTargetServiceServer::new(api.clone()))
        .add_service(ScheduleServiceServer::new(api.clone()))
        .add_service(VirtualMachineSnapshotServiceServer::new(api.clone()))
        .add_service(NodeServiceServer::new(api)))
}

/// Binds a Unix socket at `path` readable and writable by the owner only
/// (mode 0600), replacing a stale socket left by a previous run.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    let listen_err = |source| ServeError::Listen {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(listen_err)?;
        }
        Ok(_) => {
            return Err(ServeError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    Ok(listener)
}

/// Serves the API on a Unix socket at `path` (mode 0600) until `shutdown`
/// completes, then removes the socket.
pub async fn serve_unix(
    api: Api,
    path: &Path,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let listener = bind_unix(path)?;
    tracing::info!(socket = %path.display(), "serving the hci API");
    let result = serve_listener(api, listener, shutdown).await;
    if let Err(e) = std::fs::remove_file(path) {
        tracing::debug!(error = %e, "could not remove the socket");
    }
    result
}

/// How long a shutdown waits for open calls (watches, consoles) to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the API on an already bound Unix listener until `shutdown`
/// completes; calls still open [`SHUTDOWN_GRACE`] later are cut off.
pub async fn serve_listener(
    api: Api,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let stopping = Arc::new(tokio::sync::Notify::new());
    let signal = {
        let stopping = stopping.clone();
        async move {
            shutdown.await;
            stopping.notify_one();
        }
    };
    let serve = router(api)
        .await?
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal);
    tokio::select! {
        result = serve => result.map_err(ServeError::Transport),
        () = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("calls still open after the shutdown grace period; closing them");
            Ok(())
        }
    }
}

/// Serves the API over TCP on `listener` with TLS and a bearer token until
/// `shutdown` completes (TCP is never served without both).
pub async fn serve_tcp(
    api: Api,
    listener: tokio::net::TcpListener,
    security: TcpSecurity,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    if security.token.trim().is_empty() {
        return Err(ServeError::Insecure("the token is empty".into()));
    }
    install_crypto_provider();
    let identity = tonic::transport::Identity::from_pem(&security.cert_pem, &security.key_pem);
    let tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    let router = build(api, Some(tls), AuthLayer::bearer(security.token.trim())).await?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving the hci API over TLS");
    }
    router
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(ServeError::Transport)
}

/// Selects rustls' ring provider for the process. Several crates in the
/// tree enable rustls with different providers (ring through tonic and ureq,
/// aws-lc-rs through object_store), and rustls then refuses to guess.
pub fn install_crypto_provider() {
    // Already installed (by us or the embedding program) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
