//! `hcictl` against a real `hci-daemon` process: the quickstart, output
//! formats, apply semantics, and the errors users see.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::kill_vmms_under;
use serde_json::Value;

struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // VMs run in their own hci-vmm processes and outlive their daemon
        // by design: end the ones this test started.
        kill_vmms_under(self._dir.path());
    }
}

fn daemon() -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("hci.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_hci-daemon"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--node")
        .arg("ctl-test")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn hci-daemon");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "hci-daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon {
        child,
        socket,
        _dir: dir,
    }
}

fn hcictl(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hcictl"))
        .arg("--server")
        .arg(format!("unix:{}", socket.display()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run hcictl")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "hcictl failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "hcictl should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn quickstart() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/quickstart.yaml").to_string()
}

fn kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

#[test]
fn quickstart_apply_get_describe_console_delete() {
    let d = daemon();
    let s = &d.socket;
    let out = ok(&hcictl(s, &["apply", "-f", &quickstart()]));
    assert_eq!(out, "volume/demo-disk created\nvm/demo created\n");
    let out = ok(&hcictl(s, &["apply", "-f", &quickstart()]));
    assert_eq!(out, "volume/demo-disk unchanged\nvm/demo unchanged\n");

    // Table, JSON and YAML views of the same resources.
    let table = ok(&hcictl(s, &["get", "volumes"]));
    assert!(table.starts_with("NAME "), "{table}");
    assert!(
        table.contains("demo-disk") && table.contains("256Mi"),
        "{table}"
    );
    let json = ok(&hcictl(s, &["get", "vm", "demo", "-o", "json"]));
    let v: Value = serde_json::from_str(&json).expect("json output parses");
    assert_eq!(v["kind"], "VirtualMachine");
    assert_eq!(v["spec"]["memory"], "64Mi");
    let yaml = ok(&hcictl(s, &["get", "vms", "-o", "yaml"]));
    let v: Value = serde_norway::from_str(&yaml).expect("yaml output parses");
    assert_eq!(v["metadata"]["name"], "demo");
    let nodes = ok(&hcictl(s, &["get", "nodes"]));
    assert!(
        nodes.contains("ctl-test") && nodes.contains("Ready"),
        "{nodes}"
    );

    if kvm() {
        let out = hcictl(s, &["vm", "console", "demo", "--until", "virtio-blk OK"]);
        let text = ok(&out);
        assert!(text.contains("virtio-blk OK"), "{text}");
        let described = ok(&hcictl(s, &["describe", "vm", "demo"]));
        assert!(described.contains("Phase:    Running"), "{described}");
        assert!(described.contains("Conditions:"), "{described}");
        let out = ok(&hcictl(s, &["vm", "pause", "demo"]));
        assert_eq!(out, "vm/demo pause requested\n");
    } else {
        eprintln!("skipping the console part: /dev/kvm is not usable");
    }

    // A changed label is "configured"; a snapshot and a clone by command.
    let changed = std::fs::read_to_string(quickstart())
        .expect("read")
        .replace("app: quickstart", "app: changed");
    let file = d._dir.path().join("changed.yaml");
    std::fs::write(&file, changed).expect("write");
    let out = ok(&hcictl(s, &["apply", "-f", &file.display().to_string()]));
    assert_eq!(out, "volume/demo-disk unchanged\nvm/demo configured\n");
    let out = ok(&hcictl(s, &["volume", "snapshot", "demo-disk", "snap1"]));
    assert_eq!(out, "snapshot/snap1 created\n");
    let out = ok(&hcictl(s, &["volume", "clone", "demo-disk", "copy"]));
    assert_eq!(out, "volume/copy created\n");

    // edit: $EDITOR changes the document, the change is applied.
    let out = Command::new(env!("CARGO_BIN_EXE_hcictl"))
        .arg("--server")
        .arg(format!("unix:{}", s.display()))
        .args(["edit", "vm", "demo"])
        .env("EDITOR", "sed -i s/runStrategy:.*/runStrategy:\\ Halted/")
        .stdin(Stdio::null())
        .output()
        .expect("run hcictl edit");
    assert_eq!(ok(&out), "vm/demo edited\n");
    let json = ok(&hcictl(s, &["get", "vm", "demo", "-o", "json"]));
    let v: Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["spec"]["runStrategy"], "Halted");

    let out = ok(&hcictl(s, &["delete", "-f", &quickstart()]));
    assert_eq!(out, "volume/demo-disk deleted\nvm/demo deleted\n");
    let e = err(&hcictl(s, &["get", "vm", "demo"]));
    assert!(e.contains("vm/demo: not found"), "{e}");
}

#[test]
fn errors_say_what_is_wrong() {
    let d = daemon();
    let s = &d.socket;
    let dir = tempfile::tempdir().expect("tempdir");

    // Bad YAML: the file, the document and the line.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: hci.dev/v1\nkind: Volume\nmetadata:\n  name: v\nspec:\n  size: lots\n",
    )
    .expect("write");
    let e = err(&hcictl(s, &["apply", "-f", &bad.display().to_string()]));
    assert!(
        e.contains("bad.yaml") && e.contains("spec.size") && e.contains("line 6"),
        "{e}"
    );

    // Invalid spec: the server's field path.
    let vm = dir.path().join("vm.json");
    std::fs::write(
        &vm,
        r#"{"apiVersion":"hci.dev/v1","kind":"VirtualMachine","metadata":{"name":"x"},
            "spec":{"cpus":0,"memory":"64Mi","boot":{"type":"kernel","path":"guest:hello"}}}"#,
    )
    .expect("write");
    let e = err(&hcictl(s, &["apply", "-f", &vm.display().to_string()]));
    assert!(e.contains("spec.cpus"), "{e}");

    // A VM on a volume that does not exist: refused with the reference.
    let dangling = dir.path().join("dangling.yaml");
    std::fs::write(
        &dangling,
        "apiVersion: hci.dev/v1\nkind: VirtualMachine\nmetadata: {name: y}\nspec:\n  cpus: 1\n  memory: 64Mi\n  boot: {type: kernel, path: 'guest:hello'}\n  disks: [{name: d, volume: ghost}]\n",
    )
    .expect("write");
    let e = err(&hcictl(
        s,
        &["apply", "-f", &dangling.display().to_string()],
    ));
    assert!(e.contains("ghost"), "{e}");

    // Unknown kinds and missing arguments.
    let e = err(&hcictl(s, &["get", "pods"]));
    assert!(e.contains("unknown kind"), "{e}");
    let e = err(&hcictl(s, &["delete"]));
    assert!(e.contains("KIND NAME"), "{e}");

    // No daemon there.
    let e = err(&hcictl(&dir.path().join("nothing.sock"), &["get", "vms"]));
    assert!(e.contains("is hci-daemon running?"), "{e}");
}

#[test]
fn completions_print_without_a_daemon() {
    let out = Command::new(env!("CARGO_BIN_EXE_hcictl"))
        .args(["completions", "bash"])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("hcictl"));
}

/// TCP needs TLS and a token: with both, hcictl works over https; without
/// the token or with a wrong one, calls are refused; the daemon refuses to
/// serve TCP without its TLS material.
#[test]
fn https_with_tls_and_a_bearer_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let token = dir.path().join("token");
    let wrong = dir.path().join("wrong");
    std::fs::write(&cert, certified.cert.pem()).expect("write");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write");
    std::fs::write(&token, "0123456789abcdef-right\n").expect("write");
    std::fs::write(&wrong, "0123456789abcdef-wrong\n").expect("write");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let socket = dir.path().join("hci.sock");
    let spawn = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hci-daemon"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--no-controllers")
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--listen")
            .arg(format!("https://127.0.0.1:{port}"))
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hci-daemon")
    };
    // No TLS material: refuses to start, saying why.
    let out = spawn(&[]).wait_with_output().expect("wait");
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--tls-cert"), "{e}");

    let child = spawn(&[
        "--tls-cert",
        &cert.display().to_string(),
        "--tls-key",
        &key.display().to_string(),
        "--token-file",
        &token.display().to_string(),
    ]);
    let _d = Daemon {
        child,
        socket: socket.clone(),
        _dir: tempfile::tempdir().expect("tempdir"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the https listener did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let over_https = |token: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hcictl"));
        cmd.arg("--server")
            .arg(format!("https://localhost:{port}"))
            .arg("--ca-cert")
            .arg(&cert);
        if let Some(t) = token {
            cmd.arg("--token-file").arg(t);
        }
        cmd.args(["get", "volumes"]).output().expect("run hcictl")
    };
    let out = ok(&over_https(Some(&token)));
    assert!(out.contains("No Volume found"), "{out}");
    let e = err(&over_https(Some(&wrong)));
    assert!(e.contains("refused") && e.contains("token is wrong"), "{e}");
    let e = err(&over_https(None));
    assert!(e.contains("--token-file"), "{e}");
    // The Unix socket needs no token.
    let out = ok(&hcictl(&socket, &["get", "volumes"]));
    assert!(out.contains("No Volume found"), "{out}");
}

fn pid_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// In process mode (the default), a VM outlives a crashed daemon: the next daemon
/// adopts it (same process, console history intact), and deleting the VM
/// ends its process.
#[test]
fn vms_in_their_own_processes_survive_a_daemon_crash() {
    if !kvm() {
        eprintln!("skipped: /dev/kvm is not usable");
        return;
    }
    let vmm = std::path::Path::new(env!("CARGO_BIN_EXE_hci-daemon")).with_file_name("hci-vmm");
    if !vmm.is_file() {
        eprintln!(
            "skipped: {} is not built (build the workspace)",
            vmm.display()
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("hci.sock");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_hci-daemon"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(["--node", "crashy", "--vm-processes", "--vmm"])
            .arg(&vmm)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hci-daemon")
    };
    let wait_socket = || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while hcictl(&socket, &["get", "nodes"]).status.code() != Some(0) {
            assert!(Instant::now() < deadline, "hci-daemon did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut first = spawn();
    wait_socket();
    ok(&hcictl(&socket, &["apply", "-f", &quickstart()]));
    let out = ok(&hcictl(
        &socket,
        &["vm", "console", "demo", "--until", "virtio-blk OK"],
    ));
    assert!(out.contains("virtio-blk OK"), "{out}");
    let info = || {
        let json = ok(&hcictl(&socket, &["get", "vm", "demo", "-o", "json"]));
        serde_json::from_str::<Value>(&json).expect("json")
    };
    assert_eq!(info()["status"]["phase"], "Running");
    let api = dir.path().join("data/run/demo/api.sock");
    let pid = {
        let vm = hci_compute::vmm_api::VmmClient::new(&api);
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(vm.call(&hci_compute::vmm_api::Request::Info))
            .expect("the VMM answers")
            .pid
            .expect("pid") as i32
    };

    // The daemon crashes: the VM's process does not notice.
    first.kill().expect("kill -9 the daemon");
    first.wait().expect("reap");
    std::thread::sleep(Duration::from_millis(300));
    assert!(pid_alive(pid), "the VM died with the daemon");

    let second = spawn();
    let _second = Daemon {
        child: second,
        socket: socket.clone(),
        _dir: tempfile::tempdir().expect("tempdir"),
    };
    wait_socket();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = info();
        if v["status"]["message"] == "re-adopted after a daemon restart" {
            assert_eq!(v["status"]["phase"], "Running");
            break;
        }
        assert!(Instant::now() < deadline, "not re-adopted: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Same process, and its console history is still there.
    assert!(pid_alive(pid));
    // The events tell the story: started in its own process, then adopted.
    let described = ok(&hcictl(&socket, &["describe", "vm", "demo"]));
    assert!(described.contains("Events:"), "{described}");
    assert!(
        described.contains("Started") && described.contains("in its own hci-vmm process"),
        "{described}"
    );
    assert!(described.contains("Adopted"), "{described}");
    let all = ok(&hcictl(&socket, &["events"]));
    assert!(all.contains("VirtualMachine/demo"), "{all}");
    assert!(all.contains("Volume/demo-disk"), "{all}");
    let none = ok(&hcictl(&socket, &["events", "image", "nope"]));
    assert!(none.contains("No events"), "{none}");
    // The VMM process owns the running VM's volume; the daemon snapshots,
    // clones and grows it online through the volume's control socket.
    ok(&hcictl(
        &socket,
        &["volume", "snapshot", "demo-disk", "live"],
    ));
    ok(&hcictl(
        &socket,
        &["volume", "clone", "demo-disk", "demo-copy"],
    ));
    ok(&hcictl(
        &socket,
        &["volume", "expand", "demo-disk", "512Mi"],
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let get = |args: &[&str]| -> Value {
            let out = hcictl(&socket, args);
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
        };
        let snap = get(&["get", "snapshot", "live", "-o", "json"]);
        let copy = get(&["get", "volume", "demo-copy", "-o", "json"]);
        let disk = get(&["get", "volume", "demo-disk", "-o", "json"]);
        if snap["status"]["phase"] == "Ready"
            && copy["status"]["phase"] == "Detached"
            && disk["status"]["size"] == "512Mi"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "online operations on the attached volume did not finish:\n{snap}\n{copy}\n{disk}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = ok(&hcictl(
        &socket,
        &["vm", "console", "demo", "--until", "virtio-blk OK"],
    ));
    assert!(out.contains("virtio-blk OK"), "{out}");
    ok(&hcictl(&socket, &["delete", "vm", "demo"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while pid_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "deleting the VM did not end its process"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `len` bytes at `offset` of pool volume `name` in a data directory
/// (with the daemon stopped: a running daemon holds its volumes' locks).
fn read_pool_volume(data: &Path, name: &str, offset: u64, len: usize) -> Vec<u8> {
    read_local(&data.join("volumes"), name, offset, len)
}

#[test]
fn backup_create_list_restore_with_progress() {
    let mut d = daemon();
    let s = d.socket.clone();
    let s = &s;
    let dir = d._dir.path().to_path_buf();
    // Content to back up comes in through an image import.
    let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let seed = dir.join("seed.raw");
    std::fs::write(&seed, &data).expect("write the image");
    let yaml = dir.join("backup.yaml");
    std::fs::write(
        &yaml,
        format!(
            "apiVersion: hci.dev/v1\nkind: BackupTarget\nmetadata: {{name: offsite}}\n\
             spec: {{url: 'file://{}'}}\n---\n\
             apiVersion: hci.dev/v1\nkind: Image\nmetadata: {{name: seed}}\n\
             spec: {{url: 'file://{}', format: raw}}\n---\n\
             apiVersion: hci.dev/v1\nkind: Volume\nmetadata: {{name: data}}\n\
             spec: {{size: 16Mi, source: {{type: image, name: seed}}}}\n",
            dir.join("target").display(),
            seed.display()
        ),
    )
    .expect("write yaml");
    let out = ok(&hcictl(
        s,
        &["apply", "-f", yaml.to_str().expect("utf-8"), "--wait"],
    ));
    assert!(out.contains("image/seed ready"), "{out}");
    assert!(out.contains("volume/data detached"), "{out}");

    let out = ok(&hcictl(
        s,
        &[
            "backup", "create", "first", "--volume", "data", "--target", "offsite",
        ],
    ));
    assert!(out.starts_with("backup/first completed: read "), "{out}");
    let out = ok(&hcictl(s, &["backup", "list"]));
    assert!(out.contains("first"), "{out}");
    let out = ok(&hcictl(s, &["backup", "list", "--source", "other"]));
    assert_eq!(out, "No Backup found.\n");
    let out = ok(&hcictl(
        s,
        &["backup", "list", "--target", "offsite", "-o", "json"],
    ));
    let list: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{out}");

    let out = ok(&hcictl(
        s,
        &["backup", "restore", "first", "--volume", "copy"],
    ));
    assert_eq!(
        out,
        "volume/copy created from backup/first\nvolume/copy restored\n"
    );
    let out = ok(&hcictl(s, &["wait", "volume", "copy", "--timeout", "30"]));
    assert_eq!(out, "volume/copy detached\n");

    // Mistakes are explained.
    let e = err(&hcictl(
        s,
        &["backup", "restore", "missing", "--volume", "x"],
    ));
    assert!(e.contains("backup/missing: not found"), "{e}");
    let e = err(&hcictl(
        s,
        &["backup", "create", "b", "--target", "offsite"],
    ));
    assert!(e.contains("--volume"), "{e}");
    let e = err(&hcictl(s, &["wait", "volume", "nope", "--timeout", "5"]));
    assert!(e.contains("volume/nope: not found"), "{e}");

    // The restored volume holds what was backed up.
    let _ = d.child.kill();
    let _ = d.child.wait();
    let back = read_pool_volume(&dir.join("data"), "copy", 0, data.len());
    assert!(back == data, "the restored volume differs from the backup");
}

#[test]
fn replicated_volumes_spread_over_disks_and_serve_a_vm_process() {
    let vmm = Path::new(env!("CARGO_BIN_EXE_hci-daemon")).with_file_name("hci-vmm");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("hci.sock");
    let disks: Vec<PathBuf> = (1..=3)
        .map(|i| dir.path().join(format!("disk{i}")))
        .collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hci-daemon"));
    cmd.arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .args(["--node", "repl-test"]);
    for d in &disks {
        cmd.arg("--replica-disk").arg(d);
    }
    let process = vmm.is_file() && kvm();
    if process {
        cmd.args(["--vm-mode", "process", "--vmm"]).arg(&vmm);
    }
    let child = cmd
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn hci-daemon");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "hci-daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let d = Daemon {
        child,
        socket,
        _dir: dir,
    };
    let s = &d.socket;
    let get = |kind: &str, name: &str| -> Value {
        serde_json::from_str(&ok(&hcictl(s, &["get", kind, name, "-o", "json"]))).expect("json")
    };
    let node: Value = get("node", "repl-test");
    let servers = node["status"]["replicaServers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(servers.len(), 3, "{node}");

    let yaml = d._dir.path().join("repl.yaml");
    let mut doc = String::from(
        "apiVersion: hci.dev/v1\nkind: Volume\nmetadata: {name: rep}\nspec: {size: 64Mi, replicas: 3}\n---\n\
         apiVersion: hci.dev/v1\nkind: Volume\nmetadata: {name: wide}\nspec: {size: 16Mi, replicas: 4}\n",
    );
    if process {
        doc.push_str(
            "---\napiVersion: hci.dev/v1\nkind: VirtualMachine\nmetadata: {name: rvm}\n\
             spec:\n  cpus: 1\n  memory: 64Mi\n  boot: {type: kernel, path: 'guest:blk', cmdline: stay=1}\n  \
             disks: [{name: data, volume: rep}]\n  runStrategy: Always\n",
        );
    }
    std::fs::write(&yaml, doc).expect("write yaml");
    ok(&hcictl(s, &["apply", "-f", yaml.to_str().expect("utf-8")]));
    ok(&hcictl(s, &["wait", "volume", "rep", "--timeout", "60"]));
    ok(&hcictl(s, &["wait", "volume", "wide", "--timeout", "60"]));

    // Three replicas, one per disk; every disk holds one.
    let rep = get("volume", "rep");
    let replicas = rep["status"]["replicas"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let addrs: std::collections::BTreeSet<_> = replicas
        .iter()
        .filter_map(|r| r["address"].as_str())
        .collect();
    assert_eq!(addrs.len(), 3, "{rep}");
    for disk in &disks {
        assert!(
            disk.join("rep").is_dir(),
            "no replica in {}",
            disk.display()
        );
    }
    // More replicas than disks: as many as there are, and the status says so.
    let wide = get("volume", "wide");
    assert_eq!(
        wide["status"]["replicas"].as_array().map(Vec::len),
        Some(3),
        "{wide}"
    );
    let replicated = wide["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Replicated"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(replicated["reason"], "NotEnoughDisks", "{wide}");

    if process {
        // The guest writes, flushes and reads back its disk through the
        // engine in its VMM process.
        let out = ok(&hcictl(
            s,
            &["vm", "console", "rvm", "--until", "virtio-blk OK"],
        ));
        assert!(out.contains("virtio-blk OK"), "{out}");
        // The daemon reads the replicas' health from that engine.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rep = get("volume", "rep");
            let healthy = rep["status"]["replicas"]
                .as_array()
                .map_or(0, |r| r.iter().filter(|r| r["healthy"] == true).count());
            if rep["status"]["phase"] == "Attached" && healthy == 3 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "never attached and healthy: {rep}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let sock = d._dir.path().join("data/run/rvm/rep.engine.sock");
        assert!(
            sock.exists(),
            "no engine control socket at {}",
            sock.display()
        );
    } else {
        eprintln!("skipping the VM part: no hci-vmm binary or /dev/kvm is not usable");
    }

    // A detached replicated volume is snapshotted on every replica.
    ok(&hcictl(s, &["volume", "snapshot", "wide", "wide-s1"]));
    ok(&hcictl(
        s,
        &["wait", "snapshot", "wide-s1", "--timeout", "30"],
    ));
    if process {
        // One in use is snapshotted by the engine in the VM's process.
        ok(&hcictl(s, &["volume", "snapshot", "rep", "rep-s1"]));
        ok(&hcictl(
            s,
            &["wait", "snapshot", "rep-s1", "--timeout", "30"],
        ));
        for disk in &disks {
            let meta = std::fs::read_to_string(disk.join("rep/volume.json")).expect("metadata");
            assert!(
                meta.contains("rep-s1"),
                "the replica in {} lacks the snapshot: {meta}",
                disk.display()
            );
        }
        ok(&hcictl(s, &["delete", "snapshot", "rep-s1"]));
    }
    ok(&hcictl(s, &["delete", "snapshot", "wide-s1"]));
    // Deleting a Snapshot removes it from every replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    while disks.iter().any(|d| {
        std::fs::read_to_string(d.join("wide/volume.json")).is_ok_and(|m| m.contains("wide-s1"))
    }) {
        assert!(
            Instant::now() < deadline,
            "snapshot wide-s1 left on a replica"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Deleting a volume removes its replicas from every disk.
    ok(&hcictl(s, &["delete", "volume", "wide"]));
    let deadline = Instant::now() + Duration::from_secs(60);
    while disks.iter().any(|d| d.join("wide").exists()) {
        assert!(
            Instant::now() < deadline,
            "replicas left behind after delete"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A backup of the replicated volume (through its engine while the VM
    // runs) restores as a new replicated volume with the same content.
    let target = d._dir.path().join("target");
    let t = d._dir.path().join("target.yaml");
    std::fs::write(
        &t,
        format!(
            "apiVersion: hci.dev/v1\nkind: BackupTarget\nmetadata: {{name: t}}\nspec: {{url: 'file://{}'}}\n",
            target.display()
        ),
    )
    .expect("write yaml");
    ok(&hcictl(s, &["apply", "-f", t.to_str().expect("utf-8")]));
    let out = ok(&hcictl(
        s,
        &["backup", "create", "rb", "--volume", "rep", "--target", "t"],
    ));
    assert!(out.contains("completed"), "{out}");

    // Clones copy a replicated source: a snapshot into a 2-replica volume,
    // and the volume itself (in use: its engine takes the snapshot) into a
    // local one.
    ok(&hcictl(s, &["volume", "snapshot", "rep", "rep-s2"]));
    let clones = d._dir.path().join("clones.yaml");
    std::fs::write(
        &clones,
        "apiVersion: hci.dev/v1\nkind: Volume\nmetadata: {name: rep-clone}\n\
         spec: {size: 64Mi, replicas: 2, source: {type: snapshot, name: rep-s2}}\n---\n\
         apiVersion: hci.dev/v1\nkind: Volume\nmetadata: {name: rep-local}\n\
         spec: {size: 64Mi, source: {type: volume, name: rep}}\n",
    )
    .expect("write yaml");
    ok(&hcictl(
        s,
        &["apply", "-f", clones.to_str().expect("utf-8")],
    ));
    ok(&hcictl(
        s,
        &["wait", "volume", "rep-clone", "--timeout", "60"],
    ));
    ok(&hcictl(
        s,
        &["wait", "volume", "rep-local", "--timeout", "60"],
    ));
    let clone = get("volume", "rep-clone");
    assert_eq!(
        clone["status"]["replicas"].as_array().map(Vec::len),
        Some(2),
        "{clone}"
    );
    if process {
        // A whole-VM backup of a VM on a replicated volume restores as a
        // new VM whose disk is replicated the same way.
        let out = ok(&hcictl(
            s,
            &["backup", "create", "vb", "--vm", "rvm", "--target", "t"],
        ));
        assert!(out.contains("completed"), "{out}");
        let out = ok(&hcictl(s, &["backup", "restore", "vb", "--vm", "rvm2"]));
        assert!(out.contains("volume/rvm2-rep restored"), "{out}");
        let restored = get("volume", "rvm2-rep");
        assert_eq!(restored["spec"]["replicas"], 3, "{restored}");
        assert_eq!(
            restored["status"]["replicas"].as_array().map(Vec::len),
            Some(3),
            "{restored}"
        );
        ok(&hcictl(s, &["delete", "vm", "rvm2"]));
    }
    if process {
        // Stop writing, so the volume and its backup can be compared.
        ok(&hcictl(s, &["delete", "vm", "rvm"]));
        let deadline = Instant::now() + Duration::from_secs(60);
        while get("volume", "rep")["status"]["attachedTo"].is_string() {
            assert!(Instant::now() < deadline, "rep stays attached");
            std::thread::sleep(Duration::from_millis(200));
        }
        // What the guest wrote after the backup: none (blk writes once).
    }
    let out = ok(&hcictl(
        s,
        &["backup", "restore", "rb", "--volume", "rep-back"],
    ));
    assert!(out.contains("volume/rep-back restored"), "{out}");
    let back = get("volume", "rep-back");
    assert_eq!(
        back["status"]["replicas"].as_array().map(Vec::len),
        Some(3),
        "{back}"
    );

    // Compare on disk with the daemon gone (it holds the replicas' locks).
    let mut d = d;
    let _ = d.child.kill();
    let _ = d.child.wait();
    kill_vmms_under(d._dir.path());
    let a = read_local(&disks[0], "rep", 0, 64 << 20);
    let b = read_local(&disks[1], "rep-back", 0, 64 << 20);
    assert!(
        a.iter().any(|&x| x != 0),
        "the guest wrote nothing to compare"
    );
    assert!(
        a == b,
        "the restored replicated volume differs from its source"
    );
    let on_disks = |name: &str| -> Vec<Vec<u8>> {
        disks
            .iter()
            .filter(|disk| disk.join(name).is_dir())
            .map(|disk| read_local(disk, name, 0, 64 << 20))
            .collect()
    };
    let clone = on_disks("rep-clone");
    assert_eq!(clone.len(), 2, "rep-clone is not on two disks");
    assert!(
        clone.iter().all(|c| *c == a),
        "a replica of the clone differs"
    );
    let local = read_pool_volume(&d._dir.path().join("data"), "rep-local", 0, 64 << 20);
    assert!(
        local == a,
        "the local clone of the replicated volume differs"
    );
    if process {
        let vm_restored = on_disks("rvm2-rep");
        assert_eq!(vm_restored.len(), 3, "rvm2-rep is not on three disks");
        assert!(
            vm_restored.iter().all(|c| *c == a),
            "the VM restore's replicated disk differs"
        );
    }

    // A copy cut short by a daemon crash (its marker left, its replicas
    // partly written) is started over by the next daemon.
    let marker = d._dir.path().join("data/run/.filling/rep-clone");
    std::fs::create_dir_all(marker.parent().expect("parent")).expect("mkdir");
    std::fs::write(&marker, b"").expect("marker");
    for disk in disks.iter().filter(|disk| disk.join("rep-clone").is_dir()) {
        write_local(disk, "rep-clone", 0, &vec![0u8; 1 << 20]);
    }
    assert!(on_disks("rep-clone").iter().all(|c| *c != a));
    d.child = cmd.spawn().expect("spawn hci-daemon again");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !hcictl(&d.socket, &["get", "node", "repl-test"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "hci-daemon did not start again");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Created a second time (events outlive a daemon restart).
    let deadline = Instant::now() + Duration::from_secs(60);
    while ok(&hcictl(&d.socket, &["events", "volume", "rep-clone"]))
        .matches("Created")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "rep-clone was not copied again");
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&hcictl(
        &d.socket,
        &["wait", "volume", "rep-clone", "--timeout", "60"],
    ));
    let _ = d.child.kill();
    let _ = d.child.wait();
    kill_vmms_under(d._dir.path());
    assert!(!marker.exists(), "the copy's marker is left");
    let clone = on_disks("rep-clone");
    assert_eq!(clone.len(), 2, "rep-clone is not on two disks");
    assert!(
        clone.iter().all(|c| *c == a),
        "a clone copied again after a crash differs"
    );
}

/// Runs `f` on local volume `name` under `root`, opened in this process.
fn with_local<T>(
    root: &Path,
    name: &str,
    f: impl AsyncFnOnce(std::sync::Arc<dyn hci_core::block::BlockDevice>) -> T,
) -> T {
    use hci_core::volume::{OpenVolume, VolumeBackend};
    let pool = hci_storage::local::LocalVolumeBackend::new(root).expect("pool");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dev = pool
            .open(name, OpenVolume::default())
            .await
            .expect("open volume");
        f(dev).await
    })
}

/// Writes `data` at `offset` of local volume `name` under `root`.
fn write_local(root: &Path, name: &str, offset: u64, data: &[u8]) {
    with_local(root, name, async |dev| {
        dev.write_at(data, offset, Default::default())
            .await
            .expect("write");
        dev.flush().await.expect("flush");
    })
}

/// Reads `len` bytes at `offset` of local volume `name` under `root`.
fn read_local(root: &Path, name: &str, offset: u64, len: usize) -> Vec<u8> {
    with_local(root, name, async |dev| {
        let mut buf = vec![0u8; len];
        dev.read_at(&mut buf, offset).await.expect("read");
        buf
    })
}

/// With VMs in their own processes the replica servers run in their own
/// processes too: a daemon crash under a guest writing to a 2-replica
/// volume (both replicas on this node) leaves the servers running, the
/// next daemon keeps them (same pids, same addresses), and the guest's
/// writes go on without an error and without a rebuild.
#[test]
fn replica_servers_outlive_a_daemon_crash_under_a_writing_guest() {
    let vmm = Path::new(env!("CARGO_BIN_EXE_hci-daemon")).with_file_name("hci-vmm");
    let server = vmm.with_file_name("hci-storage");
    if !kvm() || !vmm.is_file() || !server.is_file() {
        eprintln!(
            "skipped: needs /dev/kvm and hci-vmm and hci-storage built (build the workspace)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // Ends what the daemons started here, even when an assertion fails.
    struct KillUnder(PathBuf);
    impl Drop for KillUnder {
        fn drop(&mut self) {
            kill_vmms_under(&self.0);
        }
    }
    let _cleanup = KillUnder(dir.path().to_path_buf());
    let socket = dir.path().join("hci.sock");
    let disks: Vec<PathBuf> = (1..=2)
        .map(|i| dir.path().join(format!("disk{i}")))
        .collect();
    let spawn = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hci-daemon"));
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(["--node", "repl-crash", "--vm-mode", "process", "--vmm"])
            .arg(&vmm);
        for d in &disks {
            cmd.arg("--replica-disk").arg(d);
        }
        cmd.env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hci-daemon")
    };
    let wait_up = || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while hcictl(&socket, &["get", "nodes"]).status.code() != Some(0) {
            assert!(Instant::now() < deadline, "hci-daemon did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let d = Daemon {
        child: spawn(),
        socket: socket.clone(),
        _dir: tempfile::tempdir().expect("tempdir"),
    };
    wait_up();
    let yaml = dir.path().join("repl.yaml");
    std::fs::write(
        &yaml,
        "apiVersion: hci.dev/v1\nkind: Volume\nmetadata: {name: rep}\nspec: {size: 16Mi, replicas: 2}\n---\n\
         apiVersion: hci.dev/v1\nkind: VirtualMachine\nmetadata: {name: rvm}\n\
         spec:\n  cpus: 1\n  memory: 64Mi\n  boot: {type: kernel, path: 'guest:blk', cmdline: 'stay=1 writes=1'}\n  \
         disks: [{name: data, volume: rep}]\n",
    )
    .expect("write yaml");
    ok(&hcictl(
        &socket,
        &["apply", "-f", yaml.to_str().expect("utf-8")],
    ));
    let console = dir.path().join("data/run/rvm/console.log");
    let rounds = || -> u64 {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(
            !text.contains("FAIL"),
            "the guest saw a disk error:\n{text}"
        );
        text.lines()
            .filter_map(|l| l.trim_start_matches('.').strip_prefix("writes "))
            .filter_map(|n| n.trim().parse().ok())
            .max()
            .unwrap_or(0)
    };
    let wait_rounds = |above: u64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while rounds() <= above {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_rounds(0, "the guest never wrote");
    let pids = || -> Vec<u32> {
        disks
            .iter()
            .map(|d| {
                std::fs::read_to_string(d.join("replica-server.pid"))
                    .expect("a replica server pid file")
                    .trim()
                    .parse()
                    .expect("a pid")
            })
            .collect()
    };
    let before = pids();
    let addresses = || {
        let node: Value = serde_json::from_str(&ok(&hcictl(
            &socket,
            &["get", "node", "repl-crash", "-o", "json"],
        )))
        .expect("json");
        node["status"]["replicaServers"].clone()
    };
    let servers_before = addresses();

    // The daemon crashes and stays down for a while; the guest writes on.
    let mut d = d;
    let _ = d.child.kill();
    let _ = d.child.wait();
    let at_crash = rounds();
    wait_rounds(
        at_crash,
        "the guest stopped writing while the daemon was down",
    );
    for pid in &before {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "replica server {pid} died with the daemon"
        );
    }
    d.child = spawn();
    wait_up();
    assert_eq!(pids(), before, "the next daemon keeps the running servers");
    assert_eq!(addresses(), servers_before);
    let after_restart = rounds();
    wait_rounds(after_restart, "the guest stopped writing after the restart");
    // Both replicas healthy, and none was rebuilt.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rep: Value = serde_json::from_str(&ok(&hcictl(
            &socket,
            &["get", "volume", "rep", "-o", "json"],
        )))
        .expect("json");
        let healthy = rep["status"]["replicas"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|r| r["healthy"] == true).count());
        if rep["status"]["phase"] == "Attached" && healthy == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "replicas not healthy: {rep}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let events = ok(&hcictl(&socket, &["events", "volume", "rep"]));
    assert!(!events.contains("Rebuil"), "{events}");

    // A server process dies under the running daemon (a crash, or killed
    // to upgrade it): the daemon starts it again on the same address, the
    // engine takes its replica back, and the guest never sees an error
    // (the other replica carried its writes meanwhile).
    let engine = dir.path().join("data/run/rvm/rep.engine.sock");
    let robustness = || -> String {
        hci_storage::control::call(&engine, &hci_storage::control::ControlRequest::Status)
            .ok()
            .and_then(|r| r.status)
            .map(|s| s.robustness)
            .unwrap_or_default()
    };
    assert_eq!(robustness(), "healthy");
    let victim = before[0];
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while robustness() == "healthy" {
        assert!(
            Instant::now() < deadline,
            "the engine never noticed its replica server died"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids()[0] == victim {
        assert!(
            Instant::now() < deadline,
            "the daemon never started the killed replica server again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(addresses(), servers_before, "same addresses");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rep: Value = serde_json::from_str(&ok(&hcictl(
            &socket,
            &["get", "volume", "rep", "-o", "json"],
        )))
        .expect("json");
        let healthy = rep["status"]["replicas"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|r| r["healthy"] == true).count());
        if healthy == 2 && robustness() == "healthy" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted server's replica never came back ({}): {rep}",
            robustness()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let now = rounds();
    wait_rounds(now, "the guest stopped writing after a replica server died");
    ok(&hcictl(&socket, &["delete", "vm", "rvm"]));
}

/// A VM snapshot holds every volume of the VM at one instant, with its
/// spec: taken of a stopped VM and of a running one (paused meanwhile,
/// running again after), restored as new VMs whose volumes are clones of
/// the snapshots, and deleted with the snapshots of its volumes.
#[test]
fn vm_snapshots_hold_every_volume_at_one_instant_and_restore_as_new_vms() {
    if !kvm() {
        eprintln!("skipped: /dev/kvm is not usable");
        return;
    }
    let d = daemon();
    let s = &d.socket;
    let yaml = d._dir.path().join("vm.yaml");
    std::fs::write(
        &yaml,
        "apiVersion: hci.dev/v1\nkind: Volume\nmetadata: {name: root}\nspec: {size: 16Mi}\n---\n\
         apiVersion: hci.dev/v1\nkind: Volume\nmetadata: {name: data}\nspec: {size: 8Mi}\n---\n\
         apiVersion: hci.dev/v1\nkind: VirtualMachine\nmetadata: {name: snapvm}\n\
         spec:\n  cpus: 1\n  memory: 64Mi\n  boot: {type: kernel, path: 'guest:blk', cmdline: stay=1}\n  \
         disks: [{name: root, volume: root}, {name: data, volume: data}]\n  runStrategy: Halted\n",
    )
    .expect("write yaml");
    ok(&hcictl(s, &["apply", "-f", yaml.to_str().expect("utf-8")]));
    ok(&hcictl(s, &["wait", "volume", "root", "--timeout", "60"]));
    ok(&hcictl(s, &["wait", "volume", "data", "--timeout", "60"]));
    let get = |kind: &str, name: &str| -> Value {
        serde_json::from_str(&ok(&hcictl(s, &["get", kind, name, "-o", "json"]))).expect("json")
    };

    // Of the stopped VM: before the guest ever wrote.
    let out = ok(&hcictl(s, &["vm", "snapshot", "snapvm", "before"]));
    assert!(out.contains("vmsnapshot/before ready: 2 volumes"), "{out}");
    let before = get("vmsnapshot", "before");
    assert_eq!(before["status"]["vm"]["runStrategy"], "Halted", "{before}");
    let snaps = ok(&hcictl(s, &["get", "snapshots"]));
    assert!(
        snaps.contains("before-root") && snaps.contains("before-data"),
        "{snaps}"
    );

    // Of the running VM, once the guest wrote its pattern to `root`.
    ok(&hcictl(s, &["vm", "start", "snapvm"]));
    let out = ok(&hcictl(
        s,
        &["vm", "console", "snapvm", "--until", "virtio-blk OK"],
    ));
    assert!(out.contains("virtio-blk OK"), "{out}");
    let out = ok(&hcictl(s, &["vm", "snapshot", "snapvm", "after"]));
    assert!(out.contains("vmsnapshot/after ready: 2 volumes"), "{out}");
    let vm = get("vm", "snapvm");
    assert_eq!(vm["status"]["phase"], "Running", "paused for good: {vm}");
    let after = get("vmsnapshot", "after");
    let volumes: Vec<&str> = after["status"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["snapshot"].as_str())
        .collect();
    assert_eq!(volumes, vec!["after-root", "after-data"], "{after}");
    let events = ok(&hcictl(s, &["events", "vmsnapshot", "after"]));
    assert!(events.contains("Taken"), "{events}");

    // Restored as new VMs on clones of the snapshots.
    let out = ok(&hcictl(s, &["vm", "restore", "before", "--as", "old"]));
    assert!(out.contains("volume/old-root ready"), "{out}");
    let old = get("vm", "old");
    assert_eq!(old["spec"]["runStrategy"], "Halted", "{old}");
    assert_eq!(old["spec"]["disks"][1]["volume"], "old-data", "{old}");
    let out = ok(&hcictl(s, &["vm", "restore", "after", "--as", "new"]));
    assert!(out.contains("volume/new-data ready"), "{out}");
    // The restored running VM boots from its own copy.
    let out = ok(&hcictl(
        s,
        &["vm", "console", "new", "--until", "virtio-blk OK"],
    ));
    assert!(out.contains("virtio-blk OK"), "{out}");

    // Mistakes are explained.
    let e = err(&hcictl(s, &["vm", "snapshot", "ghost", "x"]));
    assert!(e.contains("ghost"), "{e}");
    let e = err(&hcictl(s, &["vm", "restore", "after", "--as", "new"]));
    assert!(e.contains("already exists"), "{e}");

    // Deleting a VM snapshot deletes the snapshots of its volumes.
    ok(&hcictl(s, &["delete", "vmsnapshot", "before"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while ok(&hcictl(s, &["get", "snapshots"])).contains("before-") {
        assert!(
            Instant::now() < deadline,
            "the volume snapshots outlived their VM snapshot"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // On disk (the daemon and its VMs gone): the first snapshot is from
    // before the guest wrote, the second after.
    ok(&hcictl(s, &["delete", "vm", "snapvm"]));
    ok(&hcictl(s, &["delete", "vm", "new"]));
    let mut d = d;
    let _ = d.child.kill();
    let _ = d.child.wait();
    kill_vmms_under(d._dir.path());
    let data = d._dir.path().join("data");
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 31 + 7) as u8).collect();
    assert_eq!(read_pool_volume(&data, "root", 4096, 4096), pattern);
    assert_eq!(read_pool_volume(&data, "new-root", 4096, 4096), pattern);
    assert!(
        read_pool_volume(&data, "old-root", 4096, 4096)
            .iter()
            .all(|&b| b == 0),
        "the snapshot of the stopped VM holds a later write"
    );
}
