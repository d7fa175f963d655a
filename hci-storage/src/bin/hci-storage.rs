//! `hci-storage`: create, inspect, snapshot and serve local replicas over NBD,
//! like `qemu-nbd` and `qemu-img` for hci volumes.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use hci_core::model::ByteSize;
use hci_core::volume::EncryptionKey;
use hci_storage::local::{Replica, ReplicaDevice, import_image};
use hci_storage::nbd::{ExportOptions, Listen, NbdServer};

#[derive(Parser)]
#[command(
    name = "hci-storage",
    version,
    about = "Local hci volumes: create, snapshot, serve over NBD"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an empty thin volume in DIR.
    Create {
        /// Replica directory (created).
        dir: PathBuf,
        /// Size, e.g. 10G (binary units: K, M, G, T are KiB, MiB, GiB, TiB).
        #[arg(long)]
        size: String,
        /// Encrypt at rest with the 64-byte key in this file.
        #[arg(long)]
        encrypt_key_file: Option<PathBuf>,
    },
    /// Serve the volume over NBD until interrupted.
    Serve {
        /// Replica directory.
        dir: PathBuf,
        /// HOST:PORT or unix:PATH; repeat to listen on several.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: Vec<String>,
        /// Export name.
        #[arg(long, default_value = "")]
        export: String,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Key file of an encrypted volume.
        #[arg(long)]
        encrypt_key_file: Option<PathBuf>,
    },
    /// Take a snapshot (O(1)).
    Snapshot {
        /// Replica directory.
        dir: PathBuf,
        /// Snapshot name.
        name: String,
    },
    /// List snapshots, oldest first.
    Snapshots {
        /// Replica directory.
        dir: PathBuf,
    },
    /// Discard changes since a snapshot.
    Revert {
        /// Replica directory.
        dir: PathBuf,
        /// Snapshot name.
        name: String,
    },
    /// Delete a snapshot (its data merges into newer layers).
    RmSnapshot {
        /// Replica directory.
        dir: PathBuf,
        /// Snapshot name.
        name: String,
    },
    /// Create a new volume from a snapshot: DIR@SNAPSHOT NEWDIR.
    Clone {
        /// Source, as DIR@SNAPSHOT.
        source: String,
        /// New replica directory.
        new_dir: PathBuf,
    },
    /// Grow the volume.
    Expand {
        /// Replica directory.
        dir: PathBuf,
        /// New size, e.g. 20G.
        #[arg(long)]
        size: String,
    },
    /// Import a raw or qcow2 image (any format qemu-img reads) into a new volume.
    Import {
        /// Image file.
        image: PathBuf,
        /// New replica directory.
        dir: PathBuf,
        /// Encrypt at rest with the 64-byte key in this file.
        #[arg(long)]
        encrypt_key_file: Option<PathBuf>,
    },
    /// Show size, allocation, revision and snapshots.
    Info {
        /// Replica directory.
        dir: PathBuf,
    },
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Sizes the way qemu-img reads them: a bare K/M/G/T suffix is binary.
fn size(s: &str) -> Res<u64> {
    let t = s.trim();
    let t = match t.chars().last() {
        Some(c) if "KMGTP".contains(c) => format!("{t}i"),
        Some('k') => format!("{}Ki", &t[..t.len() - 1]),
        _ => t.to_string(),
    };
    Ok(t.parse::<ByteSize>()?.bytes())
}

fn key(file: Option<&Path>) -> Res<Option<EncryptionKey>> {
    let Some(p) = file else { return Ok(None) };
    let bytes =
        std::fs::read(p).map_err(|e| format!("cannot read key file {}: {e}", p.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let hex = text.trim();
    let raw = if hex.len() == 128 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..64)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()?
    } else {
        bytes
    };
    if raw.len() != 64 {
        return Err(format!(
            "key file {} must hold 64 bytes (or 128 hex digits), found {}",
            p.display(),
            raw.len()
        )
        .into());
    }
    Ok(Some(EncryptionKey::new(raw)))
}

fn human(n: u64) -> String {
    ByteSize(n).to_string()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hci-storage: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Res<()> {
    match cli.cmd {
        Cmd::Create {
            dir,
            size: s,
            encrypt_key_file,
        } => {
            let k = key(encrypt_key_file.as_deref())?;
            let r = Replica::create(&dir, size(&s)?, k.as_ref())?;
            println!(
                "created {} ({}{})",
                dir.display(),
                human(r.size()),
                if k.is_some() { ", encrypted" } else { "" }
            );
        }
        Cmd::Serve {
            dir,
            listen,
            export,
            read_only,
            encrypt_key_file,
        } => {
            let k = key(encrypt_key_file.as_deref())?;
            let listen = listen
                .iter()
                .map(|l| l.parse::<Listen>())
                .collect::<Result<Vec<_>, _>>()?;
            let r = Replica::open(&dir, k.as_ref())?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let server = Arc::new(NbdServer::new());
                let dev = Arc::new(ReplicaDevice::new(r.clone(), read_only));
                server.add_export(
                    &export,
                    dev,
                    ExportOptions {
                        read_only,
                        description: dir.display().to_string(),
                    },
                )?;
                let mut handles = Vec::new();
                for l in listen {
                    let h = server.serve(l).await?;
                    println!("serving {} as {}", dir.display(), h.uri(&export));
                    handles.push(h);
                }
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    r = tokio::signal::ctrl_c() => r?,
                    _ = term.recv() => {}
                }
                for h in &handles {
                    h.shutdown();
                }
                r.flush()?;
                println!("stopped; data flushed");
                Ok::<(), Box<dyn std::error::Error>>(())
            })?;
        }
        Cmd::Snapshot { dir, name } => {
            let r = Replica::open(&dir, None)?;
            let t = std::time::Instant::now();
            r.snapshot(&name)?;
            println!("snapshot {name} taken in {:.2?}", t.elapsed());
        }
        Cmd::Snapshots { dir } => {
            let r = Replica::open(&dir, None)?;
            println!(
                "{:<24} {:<26} {:>10} {:>10}",
                "NAME", "CREATED", "SIZE", "OWN DATA"
            );
            for s in r.snapshots() {
                println!(
                    "{:<24} {:<26} {:>10} {:>10}",
                    s.name,
                    s.created.to_rfc3339(),
                    human(s.size),
                    human(s.allocated)
                );
            }
        }
        Cmd::Revert { dir, name } => {
            Replica::open(&dir, None)?.revert(&name)?;
            println!("reverted {} to {name}", dir.display());
        }
        Cmd::RmSnapshot { dir, name } => {
            Replica::open(&dir, None)?.delete_snapshot(&name)?;
            println!("deleted snapshot {name}");
        }
        Cmd::Clone { source, new_dir } => {
            let (dir, snap) = source
                .rsplit_once('@')
                .ok_or_else(|| format!("clone source {source:?} must be DIR@SNAPSHOT"))?;
            let r = Replica::open(Path::new(dir), None)?;
            let c = r.clone_snapshot(snap, &new_dir)?;
            println!(
                "cloned {source} into {} ({} allocated)",
                new_dir.display(),
                human(c.info("")?.allocated)
            );
        }
        Cmd::Expand { dir, size: s } => {
            let r = Replica::open(&dir, None)?;
            r.expand(size(&s)?)?;
            println!("{} is now {}", dir.display(), human(r.size()));
        }
        Cmd::Import {
            image,
            dir,
            encrypt_key_file,
        } => {
            let k = key(encrypt_key_file.as_deref())?;
            let t = std::time::Instant::now();
            let r = import_image(&image, &dir, k.as_ref())?;
            let info = r.info("")?;
            println!(
                "imported {} into {} in {:.1?}: size {}, {} allocated",
                image.display(),
                dir.display(),
                t.elapsed(),
                human(info.size),
                human(info.allocated)
            );
        }
        Cmd::Info { dir } => {
            let r = Replica::open(&dir, None)?;
            let info = r.info("")?;
            println!("directory:  {}", dir.display());
            println!("size:       {} ({} bytes)", human(info.size), info.size);
            println!(
                "allocated:  {} ({} bytes)",
                human(info.allocated),
                info.allocated
            );
            println!(
                "encrypted:  {}",
                if info.encrypted {
                    "yes (AES-XTS-256)"
                } else {
                    "no"
                }
            );
            println!("revision:   {}", info.revision);
            let snaps = r.snapshots();
            println!("chain:      {} snapshot(s) under the head", snaps.len());
            for s in snaps {
                println!(
                    "  {} ({}, {} own data)",
                    s.name,
                    s.created.to_rfc3339(),
                    human(s.allocated)
                );
            }
        }
    }
    Ok(())
}
