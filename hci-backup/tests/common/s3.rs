//! A real S3-compatible server on 127.0.0.1 for tests: `s3s-fs` if installed,
//! else `moto_server` (PyPI `moto[server]`).

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};

use hci_backup::{S3Config, S3Target};

pub const ACCESS_KEY: &str = "hcitestaccess";
pub const SECRET_KEY: &str = "hcitestsecret";
pub const BUCKET: &str = "hci-backup-test";

/// A running server; killed on drop.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// Which server binary is available, if any.
pub fn server_binary() -> Option<&'static str> {
    ["s3s-fs", "moto_server"].into_iter().find(|c| have(c))
}

pub const MISSING: &str = "needs an S3-compatible server on PATH: s3s-fs 0.14.1 \
    (cargo install s3s-fs@0.14.1 --features binary) or moto_server (pip install 'moto[server]'); \
    scripts/install-deps.sh installs them";

/// Starts a server with bucket [`BUCKET`]; None if no server binary exists.
pub fn start() -> Option<S3Server> {
    let bin = server_binary()?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(bin);
    if bin == "s3s-fs" {
        std::fs::create_dir_all(dir.path().join(BUCKET)).expect("bucket dir");
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(dir.path());
    } else {
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start S3 server");
    let endpoint = format!("http://127.0.0.1:{port}");
    let server = S3Server {
        child,
        endpoint,
        _dir: dir,
    };
    // Wait until it accepts connections (bounded by attempts, not by time checks).
    let mut up = false;
    for _ in 0..600 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(up, "{bin} did not start listening on port {port}");
    if bin == "moto_server" {
        // moto needs the bucket created; it accepts unsigned requests.
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        write!(
            s,
            "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .expect("create bucket");
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
    }
    Some(server)
}

/// A target on the server under `prefix`.
pub fn target(server: &S3Server, prefix: &str) -> S3Target {
    S3Target::s3(&S3Config {
        bucket: BUCKET.into(),
        prefix: prefix.into(),
        endpoint: Some(server.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some(ACCESS_KEY.into()),
        secret_access_key: Some(SECRET_KEY.into()),
        virtual_hosted: false,
    })
    .expect("s3 target")
}
