//! A replica whose network link is cut mid-workload: a replica server runs in
//! a network namespace reached over a veth pair; the host end goes down while
//! writes flow. The replica must be failed within the engine's bound and the
//! writer must see no error.
//!
//! Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2; without them the
//! test says so on stderr and does nothing.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hci_core::block::{BlockDevice, WriteFlags};
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};
use hci_storage::engine::{EngineOptions, ReplicaState, ReplicatedVolumeBackend, Robustness};
use hci_storage::replica::ReplicaNode;
use hci_storage::replica::client::{RemoteNode, ServerAddr};

const TOKEN: &str = "netns-token";

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("spawn {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A network namespace with a veth pair to the host, deleted on drop.
struct Link {
    ns: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth end inside it, and so the pair.
        let _ = run(&["ip", "netns", "del", &self.ns]);
        let _ = run(&["ip", "link", "del", &self.host_if]);
    }
}

impl Link {
    /// Sets up the namespace, or says why it cannot.
    fn new() -> Result<Link, String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root (needs CAP_NET_ADMIN and CAP_SYS_ADMIN)".into());
        }
        let id = std::process::id() % 100_000;
        let net = id % 250;
        let link = Link {
            ns: format!("hcirepl{id}"),
            host_if: format!("hrh{id}"),
            host_ip: format!("10.231.{net}.1"),
            ns_ip: format!("10.231.{net}.2"),
        };
        let ns_if = format!("hrn{id}");
        run(&["ip", "netns", "add", &link.ns])?;
        run(&["ip", "-n", &link.ns, "link", "set", "lo", "up"])?;
        run(&[
            "ip",
            "link",
            "add",
            &link.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        run(&["ip", "link", "set", &ns_if, "netns", &link.ns])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", link.host_ip),
            "dev",
            &link.host_if,
        ])?;
        run(&["ip", "link", "set", &link.host_if, "up"])?;
        run(&[
            "ip",
            "-n",
            &link.ns,
            "addr",
            "add",
            &format!("{}/30", link.ns_ip),
            "dev",
            &ns_if,
        ])?;
        run(&["ip", "-n", &link.ns, "link", "set", &ns_if, "up"])?;
        Ok(link)
    }

    fn cut(&self) {
        run(&["ip", "link", "set", &self.host_if, "down"]).expect("link down");
    }
}

struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A replica server, optionally inside network namespace `ns`.
fn replica_server(ns: Option<&str>, listen: &str, root: &Path, token_file: &Path) -> Kid {
    let exe = env!("CARGO_BIN_EXE_hci-storage");
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, exe]);
            c
        }
        None => Command::new(exe),
    };
    let mut child = cmd
        .args(["replica-server", "--listen", listen, "--root"])
        .arg(root)
        .arg("--token-file")
        .arg(token_file)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn replica-server");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).expect("read");
    assert!(line.contains("serving replicas"), "unexpected {line:?}");
    Kid(child)
}

fn block(i: u64, round: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|j| (i.wrapping_mul(13) ^ round.wrapping_mul(101) ^ j) as u8 | 1)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_a_cut_link_is_failed_within_the_bound() {
    let link = match Link::new() {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIPPED a_replica_behind_a_cut_link_is_failed_within_the_bound: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let tf = dir.path().join("token");
    std::fs::write(&tf, TOKEN).expect("token");
    let near_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let _near = replica_server(
        None,
        &format!("127.0.0.1:{near_port}"),
        &dir.path().join("near"),
        &tf,
    );
    let _far = replica_server(
        Some(&link.ns),
        &format!("{}:7000", link.ns_ip),
        &dir.path().join("far"),
        &tf,
    );
    let timeout = Duration::from_millis(800);
    let node = |addr: String| -> Arc<dyn ReplicaNode> {
        let mut sa = ServerAddr::new(addr, TOKEN);
        sa.timeout = timeout;
        Arc::new(RemoteNode::new(sa))
    };
    let nodes = vec![
        node(format!("127.0.0.1:{near_port}")),
        node(format!("{}:7000", link.ns_ip)),
    ];
    let backend = ReplicatedVolumeBackend::new(
        nodes,
        EngineOptions {
            timeout,
            keepalive: Some(Duration::from_millis(200)),
            rebuild_rate: None,
        },
    )
    .expect("backend");
    let blocks = 1024u64;
    backend
        .create("v", CreateVolume::new(blocks * 4096))
        .await
        .expect("create");
    let vol = backend
        .open_engine("v", OpenVolume::default())
        .await
        .expect("open");
    assert_eq!(vol.status().await.robustness, Robustness::Healthy);

    // Writes flow to both replicas; the link is cut half-way; not one fails.
    let mut cut_at = None;
    let mut worst = Duration::ZERO;
    for i in 0..blocks {
        if i == blocks / 2 {
            link.cut();
            cut_at = Some(Instant::now());
        }
        let t = Instant::now();
        vol.write_at(&block(i, 1), i * 4096, WriteFlags::default())
            .await
            .expect("no write may fail while a replica's link is cut");
        worst = worst.max(t.elapsed());
    }
    vol.flush().await.expect("flush");
    let st = vol.status().await;
    let failed_after = cut_at.map(|t| t.elapsed());
    eprintln!(
        "link cut: longest write stall {worst:?} (bound {timeout:?}); status {st:?} {failed_after:?} after the cut"
    );
    assert!(
        matches!(st.replicas[1].state, ReplicaState::Failed(_)),
        "{st:?}"
    );
    assert_eq!(st.replicas[0].state, ReplicaState::Healthy, "{st:?}");
    assert_eq!(st.robustness, Robustness::Degraded);
    let mut buf = vec![0u8; 4096];
    for i in (0..blocks).step_by(37) {
        vol.read_at(&mut buf, i * 4096).await.expect("read");
        assert!(buf == block(i, 1), "block {i} lost its write");
    }
}
