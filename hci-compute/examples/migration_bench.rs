//! Live-migration benchmark: hci's VMM (two `hci-vmm` processes on
//! loopback) vs QEMU TCG (`migrate` over QMP to a `-incoming tcp:` QEMU),
//! the same `dirty` test guest, 1 GiB of memory with a 512 MiB area filled
//! and then rewritten at a chosen rate. Prints one line per run and the
//! ratios. Driven by `scripts/bench-migration.sh`.
//!
//! With `--disks`, each rate also runs ours with two disks handed over at
//! the switch-over — a local volume and a volume replicated on two replica
//! servers on loopback — while the guest writes to both (about 100 blocks
//! a second; not when idle).
//!
//! ```text
//! migration_bench --vmm target/release/hci-vmm [--rates idle,50,200] [--no-qemu] [--disks]
//! ```

// A benchmark's report is its standard output.
#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hci_compute::ProcessHypervisor;
use hci_compute::test_guests::{self, Guest};
use hci_core::compute::{
    BootSource, Hypervisor, MigrationOptions, MigrationProgress, ReceiveMigration, VmConfig,
};
use serde_json::{Value, json};
use tokio::sync::watch;

const MEMORY: u64 = 1 << 30;
const AREA_MIB: u64 = 512;

/// One migration's figures.
#[derive(Debug, Clone)]
struct Run {
    total: Duration,
    passes: u64,
    downtime: Duration,
    bytes: u64,
}

/// The host TSC frequency in kHz (the guest paces itself by it).
fn tsc_khz() -> u64 {
    let t = Instant::now();
    let a = rdtsc();
    std::thread::sleep(Duration::from_millis(200));
    let b = rdtsc();
    ((b - a) as f64 / t.elapsed().as_secs_f64() / 1000.0) as u64
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86_64; it reads a counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn cmdline(rate: Option<u64>, tsc: u64) -> String {
    let rate = rate.map_or("rate=0".to_string(), |r| format!("rate={r}"));
    format!("mib={AREA_MIB} fill=1 {rate} tsc_khz={tsc} every=100000000")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_file(path: &Path, needle: &str, within: Duration) -> Result<()> {
    let t = Instant::now();
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(needle)
    {
        if t.elapsed() > within {
            bail!("{} never showed {needle:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Disks for the runs with disks: replica servers on loopback.
struct Disks {
    dir: PathBuf,
    token_file: PathBuf,
    replicas: Vec<String>,
    nodes: Vec<std::sync::Arc<dyn hci_storage::replica::ReplicaNode>>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Disks {
    async fn new(dir: &Path) -> Result<Disks> {
        use hci_storage::replica::client::{RemoteNode, ServerAddr};
        use hci_storage::replica::server::ReplicaServer;
        let token_file = dir.join("replica.token");
        std::fs::write(&token_file, "bench")?;
        let (mut replicas, mut nodes, mut tasks) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..2 {
            let srv = ReplicaServer::new(dir.join(format!("replicas{i}")), "bench")?;
            let (addr, task) = srv.spawn("127.0.0.1:0").await?;
            let node: std::sync::Arc<dyn hci_storage::replica::ReplicaNode> =
                std::sync::Arc::new(RemoteNode::new(ServerAddr::new(addr.to_string(), "bench")));
            replicas.push(addr.to_string());
            nodes.push(node);
            tasks.push(task);
        }
        Ok(Disks {
            dir: dir.to_path_buf(),
            token_file,
            replicas,
            nodes,
            _tasks: tasks,
        })
    }

    /// A fresh local volume and replicated volume for run `tag`.
    async fn make(&self, tag: &str) -> Result<Vec<hci_core::compute::DiskConfig>> {
        use hci_core::compute::{DiskBackend, DiskBus, DiskConfig};
        use hci_core::volume::CreateVolume;
        let size = 256 << 20;
        let local = self.dir.join(format!("vol-{tag}"));
        drop(hci_storage::local::Replica::create(&local, size, None)?);
        let name = format!("rv-{tag}");
        for n in &self.nodes {
            n.backend().create(&name, CreateVolume::new(size)).await?;
        }
        let disk = |n: &str, backend| DiskConfig {
            name: n.into(),
            backend,
            bus: DiskBus::Virtio,
            read_only: false,
            boot_order: None,
        };
        Ok(vec![
            disk(
                "local",
                DiskBackend::Volume {
                    path: local,
                    key_file: None,
                },
            ),
            disk(
                "repl",
                DiskBackend::Replicated {
                    volume: name,
                    replicas: self.replicas.clone(),
                    token_file: self.token_file.clone(),
                    key_file: None,
                    control: None,
                },
            ),
        ])
    }
}

async fn ours(
    vmm: &Path,
    guest: &Path,
    line: &str,
    dir: &Path,
    disks: Vec<hci_core::compute::DiskConfig>,
) -> Result<Run> {
    let hv = ProcessHypervisor::with_vmm(vmm);
    let config = |name: &str| VmConfig {
        name: name.into(),
        cpus: 1,
        memory: MEMORY,
        boot: BootSource::Kernel {
            kernel: guest.to_path_buf(),
            initrd: None,
            cmdline: line.into(),
        },
        disks: disks.clone(),
        nics: vec![],
        cloud_init_seed: None,
        run_dir: dir.join(name),
    };
    let src_cfg = config("bench-src");
    let src = hv.create(src_cfg.clone()).await?;
    src.start().await?;
    wait_file(
        &src_cfg.run_dir.join("console.log"),
        "dirty counter at",
        Duration::from_secs(60),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let addr = format!("127.0.0.1:{}", free_port()?);
    let receiving = hv.receive(config("bench-dst"), &addr, "bench");
    let sending = async {
        loop {
            let (tx, _rx) = watch::channel(MigrationProgress::default());
            let options = MigrationOptions {
                token: "bench".into(),
                ..Default::default()
            };
            let t = Instant::now();
            let m = src.as_migratable().context("migratable")?;
            match m.migrate(&addr, options, tx).await {
                Ok(p) => return Ok::<_, anyhow::Error>((p, t.elapsed())),
                Err(e) if e.to_string().contains("connect to") => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let (dst, sent) = tokio::join!(receiving, sending);
    let dst = dst?;
    let (p, total) = sent?;
    dst.kill().await?;
    let _ = src.kill().await;
    let _ = dst.wait().await;
    Ok(Run {
        total,
        passes: u64::from(p.iteration),
        downtime: p.downtime.unwrap_or_default(),
        bytes: p.bytes_sent,
    })
}

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e).context("connect to QMP"),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        q.line()?; // greeting
        q.call("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            bail!("QMP closed");
        }
        Ok(serde_json::from_str(&l)?)
    }

    fn call(&mut self, cmd: &str, args: Value) -> Result<Value> {
        writeln!(self.w, "{}", json!({"execute": cmd, "arguments": args}))?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {e}");
            }
        }
    }
}

/// Kills child processes on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn qemu(guest: &Path, line: &str, dir: &Path) -> Result<Run> {
    let port = free_port()?;
    let (src_qmp, dst_qmp, log) = (
        dir.join("src.qmp"),
        dir.join("dst.qmp"),
        dir.join("src.log"),
    );
    let _ = std::fs::remove_file(&log);
    let base = |qmp: &Path, serial: &str| {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-accel",
            "tcg",
            "-M",
            "pc",
            "-m",
            "1G",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-serial", serial, "-no-reboot", "-kernel"])
        .arg(guest)
        .args(["-append", line, "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c
    };
    let mut kids = Children(Vec::new());
    kids.0.push(
        base(&dst_qmp, "null")
            .args(["-incoming", &format!("tcp:127.0.0.1:{port}")])
            .spawn()?,
    );
    kids.0
        .push(base(&src_qmp, &format!("file:{}", log.display())).spawn()?);
    wait_file(&log, "dirty counter at", Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(1));
    let mut q = Qmp::connect(&src_qmp)?;
    // Same downtime target as ours, no bandwidth cap (QEMU's default is 128 MiB/s).
    q.call(
        "migrate-set-parameters",
        json!({"downtime-limit": 50, "max-bandwidth": 100_000_000_000u64}),
    )?;
    let t = Instant::now();
    q.call("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let s = q.call("query-migrate", json!({}))?;
        match s.get("status").and_then(Value::as_str) {
            Some("completed") => {
                let ram = &s["ram"];
                return Ok(Run {
                    total: Duration::from_millis(s["total-time"].as_u64().unwrap_or(0)),
                    passes: ram["dirty-sync-count"].as_u64().unwrap_or(0),
                    downtime: Duration::from_millis(s["downtime"].as_u64().unwrap_or(0)),
                    bytes: ram["transferred"].as_u64().unwrap_or(0),
                });
            }
            Some("failed" | "cancelled") => bail!("QEMU migration failed: {s}"),
            _ if t.elapsed() > Duration::from_secs(120) => {
                let _ = q.call("migrate_cancel", json!({}));
                bail!("QEMU did not converge in 120 s: {s}");
            }
            _ => {}
        }
    }
}

fn show(who: &str, rate: &str, r: &Result<Run>) {
    match r {
        Ok(r) => println!(
            "{who:5} rate {rate:>5}: total {:7.1} ms  passes {:3}  downtime {:7.2} ms  sent {:6.1} MiB",
            r.total.as_secs_f64() * 1e3,
            r.passes,
            r.downtime.as_secs_f64() * 1e3,
            r.bytes as f64 / (1u64 << 20) as f64
        ),
        Err(e) => println!("{who:5} rate {rate:>5}: {e:#}"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let vmm = PathBuf::from(opt("--vmm").context("--vmm PATH to hci-vmm")?);
    let rates = opt("--rates").unwrap_or_else(|| "idle,50,200".into());
    let with_qemu = !args.iter().any(|a| a == "--no-qemu");
    let with_disks = args.iter().any(|a| a == "--disks");
    let dir = std::env::temp_dir().join(format!("hci-bench-migration-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let guest = test_guests::build(Guest::Dirty, &dir)?;
    let tsc = tsc_khz();
    let disks = if with_disks {
        Some(Disks::new(&dir).await?)
    } else {
        None
    };
    println!(
        "1 GiB guest, {AREA_MIB} MiB area filled then rewritten at RATE MiB/s (TSC {tsc} kHz); max downtime 50 ms both"
    );
    for rate in rates.split(',') {
        let r = if rate == "idle" {
            None
        } else {
            Some(rate.parse::<u64>().context("--rates: idle or MiB/s")?)
        };
        let line = cmdline(r, tsc);
        let run_dir = dir.join(format!("ours-{rate}"));
        let a = ours(&vmm, &guest, &line, &run_dir, vec![]).await;
        show("ours", rate, &a);
        if let Some(d) = &disks {
            // About 100 guest disk writes a second (none when idle).
            let every = r.map_or(1, |r| (r * 256 / 100).max(1));
            let line = format!("{line} disks=2 diskevery={every}");
            let run_dir = dir.join(format!("disks-{rate}"));
            let b = match d.make(rate).await {
                Ok(cfg) => ours(&vmm, &guest, &line, &run_dir, cfg).await,
                Err(e) => Err(e),
            };
            show("disks", rate, &b);
            if let (Ok(a), Ok(b)) = (&a, &b) {
                println!(
                    "disks rate {rate:>5}: downtime +{:.2} ms with the hand-over of 2 disks (local + 2 replicas)",
                    (b.downtime.as_secs_f64() - a.downtime.as_secs_f64()) * 1e3
                );
            }
        }
        if with_qemu {
            let qdir = dir.join(format!("qemu-{rate}"));
            std::fs::create_dir_all(&qdir)?;
            let q = qemu(&guest, &line, &qdir);
            show("qemu", rate, &q);
            if let (Ok(a), Ok(q)) = (&a, &q) {
                println!(
                    "ratio rate {rate:>5}: total {:.2}x  downtime {:.2}x (ours / qemu; < 1 is better)",
                    a.total.as_secs_f64() / q.total.as_secs_f64().max(1e-9),
                    a.downtime.as_secs_f64() / q.downtime.as_secs_f64().max(1e-9)
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
