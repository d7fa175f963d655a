//! `hci-daemon`: serves the hci gRPC API on a Unix socket over the embedded
//! redb state store.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use hci_daemon::api::{Api, serve_unix};
use hci_daemon::resources::ResourceStore;
use hci_daemon::store::RedbStateStore;
use tracing_subscriber::EnvFilter;

/// The hci daemon: serves the hci gRPC API (VMs, volumes, images, networks,
/// snapshots, backups, backup targets, schedules, nodes) with gRPC health and
/// reflection, over an embedded state store.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  \
        hci-daemon --data-dir /var/lib/hci\n  \
        hci-daemon --data-dir ./state --listen unix:/run/hci/hci.sock\n\n\
        Logging follows RUST_LOG (default: info)."
)]
struct Args {
    /// Directory of the daemon's state (created with mode 0700 if missing).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Where to serve the API: unix:PATH (the socket gets mode 0600).
    /// Default: unix:DIR/hci.sock.
    #[arg(long, value_name = "unix:PATH", value_parser = parse_listen)]
    listen: Option<PathBuf>,
}

fn parse_listen(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("unix:") {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(format!(
            "{s:?} is not a listen address: use unix:PATH (TCP arrives with TLS and tokens)"
        )),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let dir = &args.data_dir;
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create data directory {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("failed to restrict data directory {}", dir.display()))?;
    }
    let db = dir.join("state.redb");
    let store = RedbStateStore::open(&db)
        .await
        .with_context(|| format!("failed to open the state store {}", db.display()))?;
    let socket = args.listen.unwrap_or_else(|| dir.join("hci.sock"));
    let api = Api::new(ResourceStore::new(Arc::new(store)));
    serve_unix(api, &socket, shutdown_signal()).await?;
    Ok(())
}
