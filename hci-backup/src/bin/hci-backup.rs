//! `hci-backup`: back up hci volumes (local replica directories) to a
//! filesystem or S3 target, incrementally, and restore them.
#![deny(missing_docs)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use hci_backup::{
    CancelToken, Cipher, GcOptions, Job, JobProgress, Repository, RetentionPolicy, open_target,
    read_key_file,
};
use hci_core::backup::{BackupEngine, BackupTarget, VolumeBackupRequest};
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};
use hci_storage::local::LocalVolumeBackend;
use tokio::sync::watch;

const EXAMPLES: &str = "Examples:
  hci-backup init --target file:///mnt/nfs/backups --encrypt-key-file /etc/hci/backup.key
  hci-backup backup --target file:///mnt/nfs/backups --key-file /etc/hci/backup.key /var/lib/hci/volumes/vm1-disk@nightly-1
  hci-backup backup --target s3://bucket/hci?endpoint=http://127.0.0.1:9000 /var/lib/hci/volumes/vm1-disk@nightly-2 --base <ID>
  hci-backup restore --target file:///mnt/nfs/backups <ID> /var/lib/hci/volumes/vm1-restored
  hci-backup restore-vm --target file:///mnt/nfs/backups <VM-BACKUP-ID> web2 /var/lib/hci/volumes > web2.json
  hci-backup prune --target file:///mnt/nfs/backups --keep-last 3 --keep-daily 7
S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.";

/// Volume-aware incremental backups of hci volumes.
#[derive(Debug, Parser)]
#[command(name = "hci-backup", version, after_help = EXAMPLES)]
struct Cli {
    /// Backup target: file:///path or s3://bucket/prefix?endpoint=URL&region=R.
    #[arg(long, global = true)]
    target: Option<String>,
    /// 32-byte key file (raw or 64 hex digits) of an encrypted repository.
    #[arg(long, global = true, alias = "encrypt-key-file")]
    key_file: Option<PathBuf>,
    /// Output format for list/verify.
    #[arg(short, long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates a repository on the target (encrypted with --encrypt-key-file).
    Init {
        /// Cipher of an encrypted repository: aes-256-gcm or chacha20-poly1305.
        #[arg(long, default_value = "aes-256-gcm")]
        cipher: Cipher,
    },
    /// Backs up VOLUME_DIR@SNAPSHOT; prints the new backup id.
    Backup {
        /// A local volume directory and one of its snapshots.
        source: String,
        /// A previous backup of the same volume whose snapshot still exists.
        #[arg(long)]
        base: Option<String>,
        /// Metadata to store, as KEY=VALUE (repeatable).
        #[arg(long = "meta")]
        metadata: Vec<String>,
    },
    /// Restores a backup into a new volume directory.
    Restore {
        /// Backup id.
        backup_id: String,
        /// Directory of the new volume (must not exist).
        new_volume_dir: PathBuf,
    },
    /// Restores a whole-VM backup as a new VM: creates its volumes
    /// (NEW_NAME-<volume>) in VOLUMES_DIR and prints the new VM (JSON).
    RestoreVm {
        /// VM backup id.
        vm_backup_id: String,
        /// Name of the new VM.
        new_name: String,
        /// Directory holding volume directories.
        volumes_dir: PathBuf,
    },
    /// Lists backups (volume backups, then whole-VM backups), oldest first.
    List,
    /// Re-reads and checks every piece of the given backups (default: all).
    Verify {
        /// Backup ids.
        ids: Vec<String>,
    },
    /// Deletes backups the retention policy does not keep (per volume).
    Prune {
        /// Keep the newest N backups.
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
        /// Keep one backup per day for N days.
        #[arg(long, default_value_t = 0)]
        keep_daily: usize,
        /// Keep one backup per week for N weeks.
        #[arg(long, default_value_t = 0)]
        keep_weekly: usize,
        /// Keep one backup per month for N months.
        #[arg(long, default_value_t = 0)]
        keep_monthly: usize,
    },
    /// Deletes a backup (space is reclaimed by gc).
    Delete {
        /// Backup id.
        backup_id: String,
    },
    /// Reclaims packs no backup uses (after a grace period, safe against
    /// concurrent backups).
    Gc {
        /// Seconds a pack stays marked unreferenced before deletion.
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
        /// Backup locks older than this many seconds are considered stale.
        #[arg(long, default_value_t = 86400)]
        stale_lock_secs: u64,
        /// Repack packs whose live bytes are below this fraction (0 = never).
        #[arg(long, default_value_t = 0.5)]
        repack_below: f64,
    },
}

fn split_volume_dir(dir: &Path) -> Result<(PathBuf, String)> {
    let dir = std::path::absolute(dir).with_context(|| format!("resolve {}", dir.display()))?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no volume name", dir.display()))?
        .to_string();
    let parent = dir
        .parent()
        .with_context(|| format!("{} has no parent directory", dir.display()))?
        .to_path_buf();
    Ok((parent, name))
}

/// A job that Ctrl-C cancels, with a progress bar on a terminal.
fn job(what: &str) -> (Job, Option<tokio::task::JoinHandle<()>>) {
    let cancel = CancelToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("hci-backup: cancelling (the target stays consistent)");
            c.cancel();
        }
    });
    let job = Job::new().with_cancel(cancel);
    if !std::io::stderr().is_terminal() {
        return (job, None);
    }
    let (tx, mut rx) = watch::channel(JobProgress::default());
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    let task = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let p = rx.borrow().clone();
            bar.set_length(p.total_bytes);
            bar.set_position(p.done_bytes);
        }
        bar.finish_and_clear();
    });
    (job.with_progress(tx), Some(task))
}

/// Waits for the progress bar to finish (the job, and so its sender, is gone).
async fn finish(job: Job, bar: Option<tokio::task::JoinHandle<()>>) {
    drop(job);
    if let Some(b) = bar {
        let _ = b.await;
    }
}

async fn open_repo(cli: &Cli) -> Result<(Repository, Arc<dyn BackupTarget>)> {
    let url = cli.target.as_deref().context("--target URL is required")?;
    let target: Arc<dyn BackupTarget> = Arc::new(open_target(url)?);
    let key = cli.key_file.as_deref().map(read_key_file).transpose()?;
    if let Command::Init { cipher } = &cli.command {
        let repo = Repository::init_with_cipher(target.clone(), key.as_ref(), *cipher)
            .await
            .with_context(|| format!("initialize repository at {url}"))?;
        return Ok((repo, target));
    }
    let repo = Repository::open(target.clone(), key.as_ref())
        .await
        .with_context(|| format!("open repository at {url}"))?;
    Ok((repo, target))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HCI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hci-backup: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)]
async fn run(cli: Cli) -> Result<std::process::ExitCode> {
    let (repo, _target) = open_repo(&cli).await?;
    let json = matches!(cli.output, Output::Json);
    match &cli.command {
        Command::Init { .. } => {
            println!(
                "initialized repository at {}",
                cli.target.as_deref().unwrap_or("")
            );
        }
        Command::Backup {
            source,
            base,
            metadata,
        } => {
            let (dir, snapshot) = source
                .rsplit_once('@')
                .context("source must be VOLUME_DIR@SNAPSHOT")?;
            let (root, volume) = split_volume_dir(Path::new(dir))?;
            let backend = Arc::new(LocalVolumeBackend::new(&root)?);
            let mut meta = Vec::new();
            for m in metadata {
                let (k, v) = m.split_once('=').context("--meta must be KEY=VALUE")?;
                meta.push((k.to_string(), v.to_string()));
            }
            let (job, bar) = job("backup");
            let r = repo
                .backup_with(
                    backend,
                    VolumeBackupRequest {
                        volume,
                        snapshot: snapshot.to_string(),
                        base: base.clone(),
                        metadata: meta,
                    },
                    &job,
                )
                .await;
            finish(job, bar).await;
            let info = r.with_context(|| format!("back up {source}"))?;
            eprintln!(
                "backup {}: {} bytes volume, {} bytes added",
                info.id, info.size, info.added_bytes
            );
            println!("{}", info.id);
        }
        Command::Restore {
            backup_id,
            new_volume_dir,
        } => {
            let info = repo
                .list()
                .await?
                .into_iter()
                .find(|b| &b.id == backup_id)
                .with_context(|| format!("backup {backup_id:?} not found"))?;
            if new_volume_dir.exists() {
                bail!("{} already exists", new_volume_dir.display());
            }
            let (root, volume) = split_volume_dir(new_volume_dir)?;
            let backend = LocalVolumeBackend::new(&root)?;
            backend
                .create(&volume, CreateVolume::new(info.size))
                .await?;
            let dev = backend.open(&volume, OpenVolume::default()).await?;
            let (job, bar) = job("restore");
            let r = repo.restore_with(backup_id, dev, &job).await;
            finish(job, bar).await;
            if let Err(e) = r {
                let _ = backend.delete(&volume).await;
                return Err(e).with_context(|| format!("restore {backup_id}"));
            }
            eprintln!("restored {backup_id} into {}", new_volume_dir.display());
        }
        Command::RestoreVm {
            vm_backup_id,
            new_name,
            volumes_dir,
        } => {
            let backend = Arc::new(LocalVolumeBackend::new(volumes_dir)?);
            let (job, bar) = job("restore");
            let r = repo.restore_vm(vm_backup_id, new_name, backend, &job).await;
            finish(job, bar).await;
            let plan = r.with_context(|| format!("restore VM backup {vm_backup_id}"))?;
            println!("{}", serde_json::to_string_pretty(&plan.vm)?);
            for (v, _) in &plan.volumes {
                eprintln!(
                    "restored volume {}",
                    volumes_dir
                        .join(hci_core::model::Resource::name(v))
                        .display()
                );
            }
        }
        Command::List => {
            let list = repo.list().await?;
            let vms = repo.list_vm_backups().await?;
            if json {
                let v: Vec<serde_json::Value> = list
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "kind": "volume", "id": b.id, "volume": b.volume, "snapshot": b.snapshot,
                            "size": b.size, "created": b.created, "base": b.base,
                            "added_bytes": b.added_bytes, "metadata": b.metadata,
                        })
                    })
                    .collect();
                let mut v = v;
                v.extend(vms.iter().map(|m| {
                    serde_json::json!({
                        "kind": "vm", "id": m.id, "vm": m.vm_name, "created": m.created,
                        "added_bytes": m.added_bytes,
                        "volumes": m.volumes.iter().map(|v| serde_json::json!({
                            "volume": v.volume, "backup": v.backup,
                        })).collect::<Vec<_>>(),
                    })
                }));
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for b in list {
                    println!(
                        "{}  {}@{}  size={} added={} base={}",
                        b.id,
                        b.volume,
                        b.snapshot,
                        b.size,
                        b.added_bytes,
                        b.base.as_deref().unwrap_or("-")
                    );
                }
                for m in vms {
                    let vols: Vec<&str> = m.volumes.iter().map(|v| v.volume.as_str()).collect();
                    println!(
                        "{}  vm {}  volumes={} added={}",
                        m.id,
                        m.vm_name,
                        vols.join(","),
                        m.added_bytes
                    );
                }
            }
        }
        Command::Verify { ids } => {
            let ids: Vec<String> = if ids.is_empty() {
                repo.list().await?.into_iter().map(|b| b.id).collect()
            } else {
                ids.clone()
            };
            let mut damaged = false;
            let mut out = Vec::new();
            for id in ids {
                match repo.verify(&id).await {
                    Ok(r) => {
                        damaged |= !r.bad_chunks.is_empty();
                        if !json {
                            println!(
                                "{id}: {} pieces checked, {} damaged",
                                r.chunks_checked,
                                r.bad_chunks.len()
                            );
                            for b in &r.bad_chunks {
                                println!("  DAMAGED {b}");
                            }
                        }
                        out.push(serde_json::json!({"id": id, "checked": r.chunks_checked, "damaged": r.bad_chunks}));
                    }
                    Err(e) => {
                        damaged = true;
                        if !json {
                            println!("{id}: DAMAGED {e:#}");
                        }
                        out.push(serde_json::json!({"id": id, "error": format!("{e:#}")}));
                    }
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            if damaged {
                return Ok(std::process::ExitCode::from(3));
            }
        }
        Command::Prune {
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
        } => {
            let deleted = repo
                .prune(&RetentionPolicy {
                    keep_last: *keep_last,
                    keep_daily: *keep_daily,
                    keep_weekly: *keep_weekly,
                    keep_monthly: *keep_monthly,
                })
                .await?;
            for d in deleted {
                println!("deleted {d}");
            }
        }
        Command::Delete { backup_id } => {
            repo.delete(backup_id).await?;
            println!("deleted {backup_id}");
        }
        Command::Gc {
            grace_secs,
            stale_lock_secs,
            repack_below,
        } => {
            let r = repo
                .gc(GcOptions {
                    grace: Duration::from_secs(*grace_secs),
                    stale_lock: Duration::from_secs(*stale_lock_secs),
                    repack_below: *repack_below,
                })
                .await?;
            println!(
                "live packs {}, marked {}, repacked {} ({} bytes copied), deleted {} ({} bytes)",
                r.live_packs,
                r.marked_packs,
                r.repacked_packs,
                r.repacked_bytes,
                r.deleted_packs,
                r.deleted_bytes
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
