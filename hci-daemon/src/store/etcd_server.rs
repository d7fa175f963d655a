//! A throw-away single-member etcd for tests, benchmarks and demos: Debian's
//! `etcd` binary on free local ports with its data in a directory of its
//! own, killed when the [`EtcdServer`] is dropped (also when a test panics).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hci_core::{Error, Result};

/// A running `etcd` process; see the module docs.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    data_dir: PathBuf,
    client: SocketAddr,
    peer: SocketAddr,
    binary: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("pick a free port", e))?;
    l.local_addr()
        .map_err(|e| Error::io("read a listener's address", e))
}

/// Finds the `etcd` binary (`$HCI_ETCD`, else `etcd` on PATH).
pub fn find_etcd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HCI_ETCD") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

impl EtcdServer {
    /// Starts etcd with its data in a fresh temporary directory and waits
    /// until it answers (about a second).
    pub fn start() -> Result<Self> {
        let temp = tempfile::TempDir::new().map_err(|e| Error::io("create a temp dir", e))?;
        let mut s = Self::start_in(&temp.path().join("etcd"))?;
        s._temp = Some(temp);
        Ok(s)
    }

    /// Starts etcd with its data in `data_dir`.
    pub fn start_in(data_dir: &Path) -> Result<Self> {
        let binary = find_etcd().ok_or_else(|| {
            Error::unsupported(
                "starting etcd",
                "this machine (no etcd binary on PATH: install Debian's etcd-server, or set HCI_ETCD)",
            )
        })?;
        if let Some(parent) = data_dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
        }
        let mut s = EtcdServer {
            child: None,
            data_dir: data_dir.to_path_buf(),
            client: free_port()?,
            peer: free_port()?,
            binary,
            _temp: None,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<()> {
        let client = format!("http://{}", self.client);
        let peer = format!("http://{}", self.peer);
        let log = std::fs::File::create(self.data_dir.with_extension("log"))
            .map_err(|e| Error::io("create the etcd log", e))?;
        let child = Command::new(&self.binary)
            .arg("--name")
            .arg("hci-test")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("hci-test={peer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| Error::io(format!("start {}", self.binary.display()), e))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.client, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let req = format!("GET /health HTTP/1.0\r\nHost: {}\r\n\r\n", self.client);
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply.contains("\"health\":\"true\"")
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.healthy() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log = std::fs::read_to_string(self.data_dir.with_extension("log"))
                    .unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                return Err(Error::Unavailable {
                    what: format!("etcd (exited with {status} at start: {tail})"),
                    source: None,
                });
            }
            if Instant::now() > deadline {
                return Err(Error::Unavailable {
                    what: "etcd (not healthy 30 s after start)".into(),
                    source: None,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `etcd://127.0.0.1:PORT`, for `hci-daemon --store`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client)
    }

    /// The client URL (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// The process id of etcd while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    /// Kills etcd (SIGKILL) without removing its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data (after [`kill`](Self::kill)).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
