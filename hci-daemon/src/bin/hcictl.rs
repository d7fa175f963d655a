//! `hcictl`: manage an hci node (or cluster) through hci-daemon's API.
#![allow(clippy::print_stdout)] // a CLI prints its results

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use hci_core::model::ByteSize;
use hci_daemon::cli::{
    self, CliError, Client, ConnectOptions, DEFAULT_SERVER, Format, Kind, VmAction,
};

/// Manage hci resources: VMs, volumes, images, networks, snapshots, backups,
/// schedules and nodes.
#[derive(Debug, Parser)]
#[command(
    name = "hcictl",
    version,
    after_help = "Examples:\n  \
        hcictl apply -f examples/quickstart.yaml\n  \
        hcictl get vms\n  \
        hcictl get volume data -o yaml\n  \
        hcictl describe vm demo\n  \
        hcictl vm console demo\n  \
        hcictl volume snapshot data before-upgrade\n  \
        hcictl backup create nightly --volume data --target offsite\n  \
        hcictl backup restore nightly --volume data-restored\n  \
        hcictl --server unix:/tmp/hci/hci.sock get nodes"
)]
struct Args {
    /// The daemon: unix:PATH or https://HOST:PORT. Also read from HCI_SERVER.
    #[arg(long, global = true, env = "HCI_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// File holding the bearer token (https servers).
    #[arg(long, global = true, value_name = "FILE", env = "HCI_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA certificate to trust for https (default: the web PKI roots).
    #[arg(long, global = true, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Output format of get.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List resources of a kind, or show one.
    Get {
        /// vm, volume, image, network, snapshot, backup, backuptarget, schedule or node.
        kind: Kind,
        /// One resource's name (all when omitted).
        name: Option<String>,
    },
    /// What the controllers did recently (kept an hour): all, one kind's,
    /// or one resource's.
    Events {
        /// Only this kind.
        kind: Option<Kind>,
        /// Only this resource (needs the kind).
        name: Option<String>,
        /// Keep following new events.
        #[arg(short, long)]
        watch: bool,
    },
    /// Show one resource in detail, conditions and recent events included.
    Describe {
        /// The kind.
        kind: Kind,
        /// Its name.
        name: String,
    },
    /// Create or update the resources in a YAML/JSON file (- for stdin).
    Apply {
        /// The file: one or more YAML documents separated by ---, or JSON.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Then wait for each resource to be ready (images imported,
        /// volumes created or restored, VMs running), showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// Wait until a resource is ready (an image imported, a volume created,
    /// restored or rebuilt, a backup completed, a VM running), showing
    /// progress; fails when it fails.
    Wait {
        /// The kind.
        kind: Kind,
        /// Its name.
        name: String,
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// Delete a resource, or every resource in a file.
    Delete {
        /// The kind (with NAME).
        kind: Option<Kind>,
        /// The name.
        name: Option<String>,
        /// Delete what this file describes instead.
        #[arg(short = 'f', long = "file", conflicts_with_all = ["kind", "name"])]
        file: Option<PathBuf>,
    },
    /// Edit a resource in $EDITOR and apply the result.
    Edit {
        /// The kind.
        kind: Kind,
        /// Its name.
        name: String,
    },
    /// Print changes to resources of a kind as they happen.
    Watch {
        /// The kind.
        kind: Kind,
        /// Only this resource.
        name: Option<String>,
    },
    /// Power actions and the serial console of a VM.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Volume snapshots, clones and growth.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Take, restore and list backups.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Cluster nodes: list, cordon, drain, maintenance, remove.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Start a VM.
    Start { name: String },
    /// Stop a VM (graceful shutdown, killed after a timeout).
    Stop { name: String },
    /// Restart a VM.
    Restart { name: String },
    /// Pause a running VM.
    Pause { name: String },
    /// Resume a paused VM.
    Resume { name: String },
    /// Live-migrate a running VM to another node (cluster mode), following
    /// its progress until it runs there.
    #[command(after_help = "Examples:\n  \
        hcictl vm migrate web              # to the best node by the placement rules\n  \
        hcictl vm migrate web --to node-b\n  \
        hcictl vm migrate web --no-wait    # progress: hcictl describe vm web\n  \
        hcictl vm migrate web --cancel")]
    Migrate {
        /// The VM.
        name: String,
        /// The node to move it to (default: the best node that fits).
        #[arg(long, value_name = "NODE")]
        to: Option<String>,
        /// Return once requested instead of following it.
        #[arg(long)]
        no_wait: bool,
        /// Cancel the migration under way (the VM stays where it runs).
        #[arg(long, conflicts_with_all = ["to", "no_wait"])]
        cancel: bool,
    },
    /// Snapshot every volume of a VM at one instant (the VM is paused
    /// meanwhile), with its spec: a VirtualMachineSnapshot.
    Snapshot {
        /// The VM.
        vm: String,
        /// Name of the new VirtualMachineSnapshot.
        name: String,
        /// Return once requested instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Restore a VirtualMachineSnapshot as a new VM, its volumes cloned
    /// from the snapshot's (named `<new VM>-<volume>`).
    Restore {
        /// The VirtualMachineSnapshot.
        snapshot: String,
        /// Name of the new VM.
        #[arg(long = "as", value_name = "NEW_VM")]
        new_vm: String,
        /// Return once requested instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Attach to the serial console (Ctrl-] detaches).
    Console {
        /// The VM.
        name: String,
        /// Exit as soon as the console shows this text (for scripts).
        #[arg(long, value_name = "TEXT")]
        until: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
#[command(after_help = "Examples:\n  \
    hcictl node list\n  \
    hcictl node drain node-b          # VMs shut down cleanly and restart elsewhere\n  \
    hcictl node uncordon node-b\n  \
    hcictl node maintenance on node-c # drain, and keep it out until 'off'\n  \
    hcictl node remove node-d         # a dead node with nothing left on it")]
enum NodeCommand {
    /// List nodes: readiness, scheduling, VMs placed and their CPUs/memory.
    List,
    /// Place no new VMs on a node.
    Cordon { name: String },
    /// Place VMs on a node again (ends a drain).
    Uncordon { name: String },
    /// Cordon a node and move its VMs off it (shut down cleanly, restarted
    /// elsewhere); prints progress until none is left.
    Drain {
        name: String,
        /// Give up waiting after this many seconds (the drain goes on).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Maintenance mode: `on` cordons and drains the node and keeps it out
    /// until `off`.
    Maintenance {
        /// on or off.
        #[arg(value_parser = ["on", "off"])]
        mode: String,
        name: String,
        /// Give up waiting for the drain after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Delete a node that is gone (refused while it is Ready, holds VMs or
    /// the only healthy replica of a volume).
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Take a snapshot of a volume (a new Snapshot resource).
    Snapshot { volume: String, snapshot: String },
    /// Create a new volume with a volume's current content.
    Clone { volume: String, new_name: String },
    /// Grow a volume (e.g. 20Gi).
    Expand { volume: String, size: ByteSize },
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Back up a volume or a whole VM to a backup target and follow it to
    /// the end with a progress bar.
    Create {
        /// Name of the new Backup.
        name: String,
        /// The volume to back up.
        #[arg(long, required_unless_present = "vm", conflicts_with = "vm")]
        volume: Option<String>,
        /// The VM to back up (its spec and every volume).
        #[arg(long)]
        vm: Option<String>,
        /// The BackupTarget to write to.
        #[arg(long)]
        target: String,
        /// Read every block, not only those changed since the last backup.
        #[arg(long)]
        full: bool,
        /// Return once the Backup is created instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Restore a backup as a new volume (or a VM backup as a new VM) and
    /// follow the restore with a progress bar.
    Restore {
        /// The Backup.
        backup: String,
        /// Name of the volume to create.
        #[arg(long, required_unless_present = "vm", conflicts_with = "vm")]
        volume: Option<String>,
        /// For a VM backup: name of the VM to create.
        #[arg(long)]
        vm: Option<String>,
        /// Size of the new volume (default: the backed-up size).
        #[arg(long)]
        size: Option<ByteSize>,
        /// Return once the restore is requested instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// List backups, oldest first.
    List {
        /// Only backups on this target.
        #[arg(long)]
        target: Option<String>,
        /// Only backups of this volume or VM.
        #[arg(long)]
        source: Option<String>,
    },
}

async fn run(args: Args) -> Result<(), CliError> {
    if let Command::Completions { shell } = args.command {
        clap_complete::generate(
            shell,
            &mut Args::command(),
            "hcictl",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| CliError::Input(format!("cannot read {}: {e}", p.display())))
    };
    let options = ConnectOptions {
        token: match &args.token_file {
            Some(p) => Some(
                String::from_utf8(read(p)?)
                    .map_err(|_| CliError::Input(format!("{} is not text", p.display())))?,
            ),
            None => None,
        },
        ca_pem: args.ca_cert.as_ref().map(read).transpose()?,
    };
    let c = Client::connect(&args.server, options).await?;
    let out = match args.command {
        Command::Get { kind, name } => cli::get(&c, kind, name.as_deref(), args.output).await?,
        Command::Describe { kind, name } => cli::describe(&c, kind, &name).await?,
        Command::Events { kind, name, watch } => {
            cli::events(&c, kind, name.as_deref(), watch).await?
        }
        Command::Apply { file, wait } => {
            let text = cli::read_input(&file)?;
            let origin = file.display().to_string();
            let out = cli::apply(&c, &text, &origin).await?;
            if wait {
                // Print what was applied before the bars appear.
                print!("{out}");
                cli::apply_wait(&c, &text, &origin).await?
            } else {
                out
            }
        }
        Command::Wait {
            kind,
            name,
            timeout,
        } => cli::wait(&c, kind, &name, timeout.map(std::time::Duration::from_secs)).await?,
        Command::Delete { kind, name, file } => match (kind, name, file) {
            (_, _, Some(file)) => {
                let text = cli::read_input(&file)?;
                cli::delete_file(&c, &text, &file.display().to_string()).await?
            }
            (Some(kind), Some(name), None) => cli::delete(&c, kind, &name).await?,
            _ => {
                return Err(CliError::Input(
                    "say what to delete: hcictl delete KIND NAME, or -f FILE".into(),
                ));
            }
        },
        Command::Edit { kind, name } => cli::edit(&c, kind, &name).await?,
        Command::Watch { kind, name } => {
            cli::watch(&c, kind, name.as_deref()).await?;
            String::new()
        }
        Command::Vm { command } => match command {
            VmCommand::Start { name } => cli::vm_action(&c, VmAction::Start, &name).await?,
            VmCommand::Stop { name } => cli::vm_action(&c, VmAction::Stop, &name).await?,
            VmCommand::Restart { name } => cli::vm_action(&c, VmAction::Restart, &name).await?,
            VmCommand::Pause { name } => cli::vm_action(&c, VmAction::Pause, &name).await?,
            VmCommand::Resume { name } => cli::vm_action(&c, VmAction::Resume, &name).await?,
            VmCommand::Migrate {
                name, cancel: true, ..
            } => cli::migrate::cancel(&c, &name).await?,
            VmCommand::Migrate {
                name, to, no_wait, ..
            } => cli::migrate::migrate(&c, &name, to.as_deref(), !no_wait).await?,
            VmCommand::Snapshot { vm, name, no_wait } => {
                cli::vm_snapshot(&c, &vm, &name, !no_wait).await?
            }
            VmCommand::Restore {
                snapshot,
                new_vm,
                no_wait,
            } => cli::vm_restore(&c, &snapshot, &new_vm, !no_wait).await?,
            VmCommand::Console { name, until } => {
                cli::console(&c, &name, until.as_deref()).await?;
                String::new()
            }
        },
        Command::Volume { command } => match command {
            VolumeCommand::Snapshot { volume, snapshot } => {
                cli::snapshot(&c, &volume, &snapshot).await?
            }
            VolumeCommand::Clone { volume, new_name } => cli::clone(&c, &volume, &new_name).await?,
            VolumeCommand::Expand { volume, size } => cli::expand(&c, &volume, size).await?,
        },
        Command::Backup { command } => match command {
            BackupCommand::Create {
                name,
                volume,
                vm,
                target,
                full,
                no_wait,
            } => {
                let of = match (volume, vm) {
                    (Some(v), _) => cli::BackupOf::Volume(v),
                    (None, Some(vm)) => cli::BackupOf::Vm(vm),
                    (None, None) => {
                        return Err(CliError::Input(
                            "say what to back up: --volume or --vm".into(),
                        ));
                    }
                };
                cli::backup_create(&c, &name, of, &target, full, !no_wait).await?
            }
            BackupCommand::Restore {
                backup,
                volume,
                vm,
                size,
                no_wait,
            } => {
                cli::backup_restore(
                    &c,
                    &backup,
                    volume.as_deref(),
                    vm.as_deref(),
                    size,
                    !no_wait,
                )
                .await?
            }
            BackupCommand::List { target, source } => {
                cli::backup_list(&c, target.as_deref(), source.as_deref(), args.output).await?
            }
        },
        Command::Node { command } => match command {
            NodeCommand::List => cli::node::list(&c).await?,
            NodeCommand::Cordon { name } => cli::node::cordon(&c, &name).await?,
            NodeCommand::Uncordon { name } => cli::node::uncordon(&c, &name).await?,
            NodeCommand::Drain { name, timeout } => {
                cli::node::drain(&c, &name, Duration::from_secs(timeout)).await?
            }
            NodeCommand::Maintenance {
                mode,
                name,
                timeout,
            } => {
                cli::node::maintenance(&c, &name, mode == "on", Duration::from_secs(timeout))
                    .await?
            }
            NodeCommand::Remove { name } => cli::node::remove(&c, &name).await?,
        },
        Command::Completions { .. } => String::new(),
    };
    print!("{out}");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
