//! `hci-net`: bring hci networks up on this host, plug interfaces into them
//! and look at their DHCP leases — for integrators and debugging.
//!
//! `hci-net up -f NETWORK.yaml` ensures the network described by an hci-core
//! `Network` resource with [`hci_net::LinuxBridgeBackend`] and serves its DHCP
//! in the foreground until SIGINT/SIGTERM; the other commands work on what
//! exists in the kernel and on the lease files in `--state-dir`, so they can
//! run while `up` serves.
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use hci_core::model::{Network, NetworkKind as ModelKind, Resource};
use hci_core::net::{DhcpConfig, NetworkBackend, NetworkConfig, NetworkKind};
use hci_net::dhcp::{DhcpNames, Lease, read_lease_file};
use hci_net::{BackendOptions, LinuxBridgeBackend};

const EXAMPLES: &str = "\
Examples:
  # A NAT'd management network with DHCP, served until Ctrl-C:
  hci-net up -f mgmt.yaml
  # An overlay between this node and two others (this node's underlay
  # address is taken from the route to the first peer unless --local):
  hci-net up -f ovl.yaml --peer 192.0.2.11 --peer 192.0.2.12
  # A fixed address and host name for a VM NIC, and the network's domain:
  hci-net up -f lab.yaml --reserve 02:68:63:00:00:01=10.42.0.50,web-1 --domain lab.example
  # Plug the host end of a veth (or an existing TAP) into network lab:
  hci-net port add lab --ifname veth-vm1
  hci-net leases lab
  hci-net stats lab
  hci-net ls -o json
  hci-net down lab";

/// Virtual networks for hci VMs on this host (Linux bridges, VXLAN, NAT, DHCP).
#[derive(Debug, Parser)]
#[command(name = "hci-net", version, after_help = EXAMPLES)]
struct Cli {
    /// Directory for DHCP lease files and the records of running `up` commands.
    #[arg(
        long,
        env = "HCI_NET_STATE_DIR",
        default_value = "/var/lib/hci-net",
        global = true
    )]
    state_dir: PathBuf,
    /// Output format of `ls` and `leases`.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Ensure a network on this host and serve its DHCP until SIGINT/SIGTERM.
    ///
    /// On exit everything `up` made is removed, unless --keep.
    Up {
        /// The network: an hci `Network` resource (YAML).
        #[arg(short, long, value_name = "NETWORK.yaml")]
        file: PathBuf,
        /// Underlay address of another node (overlay networks); repeatable.
        #[arg(long = "peer", value_name = "NODE_ADDR")]
        peers: Vec<IpAddr>,
        /// This node's underlay address (overlay networks); default: the source
        /// address of the route to the first peer.
        #[arg(long, value_name = "ADDR")]
        local: Option<IpAddr>,
        /// VXLAN UDP port (overlay networks).
        #[arg(long, default_value_t = 4789)]
        vxlan_port: u16,
        /// A fixed DHCP address for a MAC, optionally with the host name DHCP
        /// gives it; repeatable.
        #[arg(long = "reserve", value_name = "MAC=IP[,HOSTNAME]")]
        reservations: Vec<String>,
        /// DNS domain announced by DHCP (option 15).
        #[arg(long, value_name = "DOMAIN")]
        domain: Option<String>,
        /// DNS server announced by DHCP; repeatable.
        #[arg(long = "dns", value_name = "IP")]
        dns: Vec<Ipv4Addr>,
        /// DHCP lease time in seconds.
        #[arg(long, default_value_t = 3600)]
        lease_time: u64,
        /// Leave the network in place on exit.
        #[arg(long)]
        keep: bool,
    },
    /// Ports that are not VM TAPs made by hci.
    Port {
        #[command(subcommand)]
        cmd: PortCmd,
    },
    /// Show the DHCP leases of a network (MAC, IP, host name, expiry).
    Leases {
        /// Network name.
        name: String,
    },
    /// Show traffic counters of every port of a network (rx/tx bytes,
    /// packets, drops; rx = from the VM or wire into the bridge).
    Stats {
        /// Network name.
        name: String,
    },
    /// Remove a network from this host (stopping its `up` command, if any).
    Down {
        /// Network name.
        name: String,
    },
    /// List the hci networks on this host.
    Ls,
}

#[derive(Debug, Subcommand)]
enum PortCmd {
    /// Attach an existing TAP or veth to a network's bridge.
    Add {
        /// Network name.
        name: String,
        /// The interface to attach.
        #[arg(long, value_name = "IF")]
        ifname: String,
        /// Set the interface's MAC address.
        #[arg(long)]
        mac: Option<String>,
    },
    /// Release an interface from a network's bridge (the device stays).
    Del {
        /// Network name.
        name: String,
        /// The interface to release.
        #[arg(long, value_name = "IF")]
        ifname: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hci-net: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hci-net: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Up {
            file,
            peers,
            local,
            vxlan_port,
            reservations,
            domain,
            dns,
            lease_time,
            keep,
        } => {
            let net = load_network(&file)?;
            let parsed = reservations
                .iter()
                .map(|r| parse_reservation(r))
                .collect::<Result<Vec<_>>>()?;
            let facts = NodeFacts {
                peers,
                local,
                vxlan_port,
                reservations: parsed.iter().map(|(m, ip, _)| (*m, *ip)).collect(),
                hostnames: parsed
                    .into_iter()
                    .filter_map(|(m, _, h)| Some((m, h?)))
                    .collect(),
                domain,
                dns,
                lease_time: Duration::from_secs(lease_time),
            };
            let config = network_config(&net, &facts)?;
            let names = DhcpNames {
                domain: facts.domain,
                hostnames: facts.hostnames,
            };
            names.validate()?;
            up(&cli.state_dir, config, names, keep).await
        }
        Cmd::Port {
            cmd: PortCmd::Add { name, ifname, mac },
        } => {
            sys::require_net_admin("port add")?;
            let mac = mac
                .map(|m| {
                    hci_net::mac::parse(&m).ok_or_else(|| {
                        anyhow!("--mac {m:?} is not a MAC address (02:68:63:00:00:01)")
                    })
                })
                .transpose()?;
            let backend = backend(None).await?;
            backend.attach_interface(&name, &ifname, mac).await?;
            println!("{ifname} attached to network {name}");
            Ok(())
        }
        Cmd::Port {
            cmd: PortCmd::Del { name, ifname },
        } => {
            sys::require_net_admin("port del")?;
            backend(None)
                .await?
                .detach_interface(&name, &ifname)
                .await?;
            println!("{ifname} released from network {name}");
            Ok(())
        }
        Cmd::Leases { name } => leases(&cli.state_dir, &name, cli.output),
        Cmd::Stats { name } => stats(&name, cli.output).await,
        Cmd::Down { name } => down(&cli.state_dir, &name).await,
        Cmd::Ls => ls(&cli.state_dir, cli.output).await,
    }
}

async fn backend(state_dir: Option<&Path>) -> Result<LinuxBridgeBackend> {
    Ok(LinuxBridgeBackend::new(BackendOptions {
        state_dir: state_dir.map(Path::to_path_buf),
        ..Default::default()
    })
    .await?)
}

/// Reads and validates a `Network` resource; errors name the file and, for
/// syntax errors, the line and column.
fn load_network(file: &Path) -> Result<Network> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("failed to read {}", file.display()))?;
    let net = Network::from_yaml(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    net.validate()
        .map_err(|e| anyhow!("{}: network {:?}: {e}", file.display(), net.name()))?;
    Ok(net)
}

/// What the resource does not say but this node must know.
#[derive(Debug, Default)]
struct NodeFacts {
    peers: Vec<IpAddr>,
    local: Option<IpAddr>,
    vxlan_port: u16,
    reservations: Vec<([u8; 6], IpAddr)>,
    /// Host names of reserved MACs.
    hostnames: Vec<([u8; 6], String)>,
    domain: Option<String>,
    dns: Vec<Ipv4Addr>,
    lease_time: Duration,
}

/// `MAC=IP[,HOSTNAME]`.
fn parse_reservation(s: &str) -> Result<([u8; 6], IpAddr, Option<String>)> {
    let (mac, rest) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("--reserve {s:?} is not MAC=IP[,HOSTNAME]"))?;
    let (ip, host) = match rest.split_once(',') {
        Some((ip, h)) => (ip, Some(h.trim().to_string())),
        None => (rest, None),
    };
    let mac = hci_net::mac::parse(mac.trim())
        .ok_or_else(|| anyhow!("--reserve {s:?}: {mac:?} is not a MAC address"))?;
    let ip: Ipv4Addr = ip
        .trim()
        .parse()
        .map_err(|_| anyhow!("--reserve {s:?}: {ip:?} is not an IPv4 address"))?;
    Ok((mac, IpAddr::V4(ip), host))
}

/// This node's address towards `peer`: the source the kernel would pick
/// (connecting a UDP socket sends nothing).
fn source_address_towards(peer: IpAddr) -> Result<IpAddr> {
    let any: SocketAddr = match peer {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any).context("failed to open a UDP socket")?;
    s.connect((peer, 4789))
        .with_context(|| format!("no route to peer {peer}; pass --local ADDR"))?;
    Ok(s.local_addr()
        .context("failed to read the local address")?
        .ip())
}

/// Resolves a `Network` resource into this node's [`NetworkConfig`].
fn network_config(net: &Network, facts: &NodeFacts) -> Result<NetworkConfig> {
    let s = &net.spec;
    let kind = match s.kind {
        ModelKind::Management => NetworkKind::Management {
            uplink: s.uplink.clone(),
        },
        ModelKind::Bridge => NetworkKind::Bridge {
            uplink: s.uplink.clone(),
        },
        ModelKind::Vlan { id } => NetworkKind::Vlan {
            id,
            uplink: s
                .uplink
                .clone()
                .ok_or_else(|| anyhow!("a VLAN network needs spec.uplink"))?,
        },
        ModelKind::Overlay { vni } => {
            let local = match (facts.local, facts.peers.first()) {
                (Some(l), _) => l,
                (None, Some(p)) => source_address_towards(*p)?,
                (None, None) => bail!(
                    "overlay network {:?} needs this node's underlay address: pass --local ADDR, or --peer NODE_ADDR to derive it",
                    net.name()
                ),
            };
            NetworkKind::Overlay {
                vni,
                local,
                peers: facts
                    .peers
                    .iter()
                    .copied()
                    .filter(|p| *p != local)
                    .collect(),
                port: facts.vxlan_port,
                underlay: s.uplink.clone(),
            }
        }
    };
    if !facts.peers.is_empty() && !matches!(kind, NetworkKind::Overlay { .. }) {
        bail!("--peer only applies to overlay networks");
    }
    let dhcp = match s.dhcp {
        Some(r) => Some(DhcpConfig {
            range_start: IpAddr::V4(r.start),
            range_end: IpAddr::V4(r.end),
            lease_time: facts.lease_time,
            dns: facts.dns.iter().copied().map(IpAddr::V4).collect(),
            reservations: facts.reservations.clone(),
        }),
        None if !facts.reservations.is_empty()
            || !facts.dns.is_empty()
            || facts.domain.is_some() =>
        {
            bail!("--reserve, --dns and --domain need spec.dhcp in the network")
        }
        None => None,
    };
    Ok(NetworkConfig {
        name: net.name().to_string(),
        kind,
        cidr: s.cidr.map(ipnet::IpNet::V4),
        gateway: s.gateway.map(IpAddr::V4),
        dhcp,
        mtu: s.mtu.map(u16::try_from).transpose().context("spec.mtu")?,
    })
}

fn pid_file(state_dir: &Path, network: &str) -> PathBuf {
    state_dir.join(format!("up-{network}.pid"))
}

/// The pid of the `up` command serving `network`, if it still runs.
fn running_up(state_dir: &Path, network: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(state_dir, network))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    sys::is_hci_net_process(pid).then_some(pid)
}

async fn up(state_dir: &Path, config: NetworkConfig, names: DhcpNames, keep: bool) -> Result<()> {
    sys::require_net_admin("up")?;
    let mut signals = sys::StopSignals::catch()?;
    let name = config.name.clone();
    if let Some(pid) = running_up(state_dir, &name) {
        bail!("network {name:?} is already served by `hci-net up` (pid {pid})");
    }
    let backend = backend(Some(state_dir)).await?;
    let existed = backend
        .list_networks()
        .await?
        .iter()
        .any(|n| n.name == name);
    backend.set_dhcp_names(&name, names).await?;
    let status = backend.ensure_network(&config).await?;
    let pidf = pid_file(state_dir, &name);
    let recorded = std::fs::create_dir_all(state_dir)
        .and_then(|()| std::fs::write(&pidf, format!("{}\n", std::process::id())));
    if let Err(e) = recorded {
        if !existed {
            let _ = backend.remove_network(&name).await;
        }
        return Err(e).with_context(|| format!("failed to write {}", pidf.display()));
    }
    let dhcp = config.dhcp.as_ref().map_or_else(
        || "no DHCP".to_string(),
        |d| format!("DHCP {}-{}", d.range_start, d.range_end),
    );
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "network {name} is up on bridge {} ({dhcp}); serving until SIGINT/SIGTERM",
            status.bridge
        );
        let _ = out.flush();
    }
    let sig = signals.wait().await;
    tracing::info!(signal = sig, "stopping");
    let _ = std::fs::remove_file(&pidf);
    if keep {
        println!("network {name} kept (remove it with `hci-net down {name}`)");
    } else if existed {
        println!(
            "network {name} existed before `up`: left in place (remove it with `hci-net down {name}`)"
        );
    } else {
        backend.remove_network(&name).await?;
        println!("network {name} removed");
    }
    Ok(())
}

async fn down(state_dir: &Path, name: &str) -> Result<()> {
    sys::require_net_admin("down")?;
    let stopped = match running_up(state_dir, name) {
        Some(pid) => {
            sys::terminate(pid)?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while sys::is_hci_net_process(pid) {
                if Instant::now() > deadline {
                    bail!("`hci-net up` (pid {pid}) serving {name:?} did not stop within 20 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            true
        }
        None => false,
    };
    let backend = backend(Some(state_dir)).await?;
    match backend.remove_network(name).await {
        Ok(()) => {}
        Err(hci_core::Error::NotFound { .. }) if stopped => {}
        Err(e) => return Err(e.into()),
    }
    println!("network {name} removed");
    Ok(())
}

async fn stats(name: &str, output: Output) -> Result<()> {
    sys::require_net_admin("stats")?;
    let ports = backend(None).await?.network_stats(name).await?;
    let text = match output {
        Output::Json => {
            let rows: Vec<serde_json::Value> = ports
                .iter()
                .map(|p| {
                    let s = &p.stats;
                    serde_json::json!({
                        "port": p.port, "ifname": p.ifname, "kind": p.kind,
                        "rxBytes": s.rx_bytes, "rxPackets": s.rx_packets, "rxDropped": s.rx_dropped,
                        "txBytes": s.tx_bytes, "txPackets": s.tx_packets, "txDropped": s.tx_dropped,
                    })
                })
                .collect();
            format!("{}\n", serde_json::to_string_pretty(&rows)?)
        }
        Output::Table => {
            let mut rows = vec![
                [
                    "PORT", "IFNAME", "KIND", "RX-BYTES", "RX-PKTS", "RX-DROP", "TX-BYTES",
                    "TX-PKTS", "TX-DROP",
                ]
                .map(String::from),
            ];
            for p in &ports {
                let s = &p.stats;
                rows.push([
                    p.port.clone(),
                    p.ifname.clone(),
                    p.kind.to_string(),
                    s.rx_bytes.to_string(),
                    s.rx_packets.to_string(),
                    s.rx_dropped.to_string(),
                    s.tx_bytes.to_string(),
                    s.tx_packets.to_string(),
                    s.tx_dropped.to_string(),
                ]);
            }
            table(&rows)
        }
    };
    print!("{text}");
    Ok(())
}

fn leases(state_dir: &Path, name: &str, output: Output) -> Result<()> {
    let path = state_dir.join(format!("dhcp-{name}.json"));
    if !path.exists() {
        bail!(
            "no leases recorded for network {name:?}: {} does not exist (is `hci-net up` serving it with this --state-dir?)",
            path.display()
        );
    }
    let mut leases = read_lease_file(&path)?;
    leases.sort_by_key(|l| l.ip);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&leases)?),
        Output::Table => print!("{}", lease_table(&leases, now_unix())),
    }
    Ok(())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lease_table(leases: &[Lease], now: u64) -> String {
    let mut rows = vec![[
        "MAC".to_string(),
        "IP".to_string(),
        "HOSTNAME".to_string(),
        "EXPIRES".to_string(),
    ]];
    for l in leases {
        let expires = chrono::DateTime::from_timestamp(i64::try_from(l.expires).unwrap_or(0), 0)
            .map_or_else(
                || l.expires.to_string(),
                |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            );
        let left = if l.expires > now {
            format!("{expires} (in {})", human_secs(l.expires - now))
        } else {
            format!("{expires} (expired)")
        };
        rows.push([
            hci_net::mac::format(l.mac),
            l.ip.to_string(),
            l.hostname.clone().unwrap_or_else(|| "-".into()),
            left,
        ]);
    }
    table(&rows)
}

fn human_secs(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

async fn ls(state_dir: &Path, output: Output) -> Result<()> {
    let nets = backend(None).await?.list_networks().await?;
    let served: Vec<Option<u32>> = nets
        .iter()
        .map(|n| running_up(state_dir, &n.name))
        .collect();
    match output {
        Output::Json => {
            let v: Vec<serde_json::Value> = nets
                .iter()
                .zip(&served)
                .map(|(n, pid)| {
                    serde_json::json!({
                        "name": n.name,
                        "bridge": n.bridge,
                        "ports": n.ports,
                        "upPid": pid,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Table => {
            let mut rows = vec![[
                "NAME".to_string(),
                "BRIDGE".to_string(),
                "PORTS".to_string(),
                "SERVED BY".to_string(),
            ]];
            for (n, pid) in nets.iter().zip(&served) {
                rows.push([
                    n.name.clone(),
                    n.bridge.clone(),
                    n.ports.len().to_string(),
                    pid.map_or_else(|| "-".into(), |p| format!("hci-net up (pid {p})")),
                ]);
            }
            print!("{}", table(&rows));
        }
    }
    Ok(())
}

/// Host facts and process control: capabilities, signals, other processes.
mod sys {
    use anyhow::{Result, bail};

    /// CAP_NET_ADMIN's bit in the capability sets (linux/capability.h).
    const CAP_NET_ADMIN: u32 = 12;

    /// Fails with a clear message unless this process may configure networking.
    pub fn require_net_admin(what: &str) -> Result<()> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
        match eff {
            Some(caps) if caps & (1 << CAP_NET_ADMIN) != 0 => Ok(()),
            Some(_) => bail!(
                "`hci-net {what}` needs CAP_NET_ADMIN to change bridges and interfaces: run it as root (e.g. with sudo) or grant the capability"
            ),
            None => bail!("cannot read this process's capabilities from /proc/self/status"),
        }
    }

    /// True if `pid` is a running `hci-net` process.
    pub fn is_hci_net_process(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "hci-net")
            && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
    }

    /// Sends SIGTERM to `pid`.
    pub fn terminate(pid: u32) -> Result<()> {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            bail!("pid {pid} is out of range");
        };
        // SAFETY: kill() takes plain integers and has no memory effects; the
        // pid was checked to be an hci-net process just before.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        if rc != 0 {
            bail!(
                "failed to signal `hci-net up` (pid {pid}): {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGINT and SIGTERM, caught from creation on (so a signal that arrives
    /// while the network is being set up is not lost, nor kills the process
    /// half-way).
    pub struct StopSignals {
        int: tokio::signal::unix::Signal,
        term: tokio::signal::unix::Signal,
    }

    impl StopSignals {
        /// Starts catching SIGINT and SIGTERM.
        pub fn catch() -> Result<Self> {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
            })
        }

        /// Waits for one of them; returns its name.
        pub async fn wait(&mut self) -> &'static str {
            tokio::select! {
                _ = self.int.recv() => "SIGINT",
                _ = self.term.recv() => "SIGTERM",
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(yaml_spec: &str) -> Network {
        let doc = format!(
            "apiVersion: hci.dev/v1\nkind: Network\nmetadata: {{ name: n1 }}\nspec:\n{yaml_spec}"
        );
        let n = Network::from_yaml(&doc).expect("parse");
        n.validate().expect("valid");
        n
    }

    #[test]
    fn management_network_resolves_with_dhcp_and_reservations() {
        let n = net(
            "  kind: { type: management }\n  cidr: 10.9.0.0/24\n  gateway: 10.9.0.1\n  dhcp: { start: 10.9.0.10, end: 10.9.0.20 }\n  mtu: 1400\n",
        );
        let facts = NodeFacts {
            reservations: vec![{
                let (m, ip, h) = parse_reservation("02:00:00:00:00:01=10.9.0.5").expect("res");
                assert_eq!(h, None);
                (m, ip)
            }],
            lease_time: Duration::from_secs(600),
            ..Default::default()
        };
        let c = network_config(&n, &facts).expect("config");
        assert_eq!(c.kind, NetworkKind::Management { uplink: None });
        assert_eq!(c.mtu, Some(1400));
        let d = c.dhcp.expect("dhcp");
        assert_eq!(d.reservations.len(), 1);
        assert_eq!(d.lease_time, Duration::from_secs(600));
    }

    #[test]
    fn overlay_needs_an_underlay_address_and_peers_only_fit_overlays() {
        let o = net("  kind: { type: overlay, vni: 7 }\n");
        let e = network_config(&o, &NodeFacts::default()).expect_err("no local");
        assert!(e.to_string().contains("--local"), "{e}");
        let facts = NodeFacts {
            local: Some("192.0.2.1".parse().expect("ip")),
            peers: vec![
                "192.0.2.1".parse().expect("ip"),
                "192.0.2.2".parse().expect("ip"),
            ],
            vxlan_port: 4789,
            ..Default::default()
        };
        match network_config(&o, &facts).expect("config").kind {
            NetworkKind::Overlay { peers, vni, .. } => {
                assert_eq!(vni, 7);
                assert_eq!(peers, vec!["192.0.2.2".parse::<IpAddr>().expect("ip")]);
            }
            k => panic!("{k:?}"),
        }
        let b = net("  kind: { type: bridge }\n");
        assert!(network_config(&b, &facts).is_err());
    }

    #[test]
    fn bad_reservations_are_refused() {
        for bad in [
            "02:00:00:00:00:01",
            "zz=10.0.0.1",
            "02:00:00:00:00:01=fe80::1",
        ] {
            assert!(parse_reservation(bad).is_err(), "{bad}");
        }
        let (_, ip, host) = parse_reservation("02:00:00:00:00:01=10.0.0.9,web-1").expect("ok");
        assert_eq!(
            (ip.to_string(), host.as_deref()),
            ("10.0.0.9".into(), Some("web-1"))
        );
    }

    #[test]
    fn lease_table_shows_hostname_and_expiry() {
        let l = Lease {
            mac: [2, 0, 0, 0, 0, 1],
            ip: "10.0.0.5".parse().expect("ip"),
            expires: 1_000_000 + 3599,
            bound: true,
            hostname: Some("vm1".into()),
        };
        let t = lease_table(&[l], 1_000_000);
        assert!(t.contains("02:00:00:00:00:01"), "{t}");
        assert!(t.contains("vm1"), "{t}");
        assert!(t.contains("in 59m59s"), "{t}");
    }
}
