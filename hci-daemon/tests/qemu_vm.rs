//! VMs with `backend: qemu` run by a real hci-daemon: a QEMU-backed VM
//! boots hci's `kbd` test guest (a PVH ELF, TCG on a paravirtual KVM), its
//! console works through `hcictl`, stop/start/delete and a crash of QEMU
//! follow the run strategy, a daemon crash leaves no QEMU behind (the VM
//! starts again with the next daemon), and bad inputs give a Failed VM
//! with a clear message. With `--vm-mode process` a QEMU VM runs in its
//! own `hci-vmm` process: it survives a daemon crash and is adopted, its
//! volume snapshotted online through that process.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One hci-daemon (single node), killed on drop together with any QEMU or
/// hci-vmm it left.
struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl Daemon {
    /// VMs in the daemon (QEMU dies with it).
    fn start(extra: &[&str]) -> Daemon {
        let mut args = vec!["--vm-mode".to_string(), "in-process".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_with(args)
    }

    fn start_with(extra: Vec<String>) -> Daemon {
        let mut d = Daemon {
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            extra,
        };
        d.spawn();
        d
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("hci.sock")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_hci-daemon"))
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen")
            .arg(format!("unix:{}", self.socket().display()))
            .args(["--node", "qemu-test"])
            .args(["--stop-timeout", "2s"])
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn hci-daemon");
        self.child = Some(child);
        common::wait_for_socket(&self.socket(), || format!("no daemon: {}", self.log()));
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn run_dir(&self, vm: &str) -> PathBuf {
        self.dir.path().join("data/run").join(vm)
    }

    fn console(&self, vm: &str) -> String {
        std::fs::read_to_string(self.run_dir(vm).join("console.log")).unwrap_or_default()
    }

    fn hcictl(&self, args: &[&str]) -> (bool, String) {
        common::hcictl(&self.socket(), args)
    }

    fn apply(&self, yaml: &str) {
        let file = self.dir.path().join("apply.yaml");
        std::fs::write(&file, yaml).expect("write yaml");
        let (ok, out) = self.hcictl(&["apply", "-f", &file.display().to_string()]);
        assert!(ok, "apply failed: {out}");
    }

    fn vm(&self, name: &str) -> Value {
        let (ok, out) = self.hcictl(&["get", "vm", name, "-o", "json"]);
        assert!(ok, "{out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Waits until `check` holds for the VM's JSON; returns it.
    fn wait_vm(&self, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let vm = self.vm(name);
            if check(&vm) {
                return vm;
            }
            assert!(
                Instant::now() < deadline,
                "VM {name} never {what}: {vm:#}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        common::kill_vmms_under(self.dir.path());
        for pid in qemu_pids(self.dir.path()) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn phase(vm: &Value) -> &str {
    vm["status"]["phase"].as_str().unwrap_or("")
}

/// QEMU processes whose command line mentions `dir`.
fn qemu_pids(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

fn wait_no_qemu(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !qemu_pids(dir).is_empty() {
        assert!(Instant::now() < deadline, "QEMU still runs under {dir:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn have_qemu() -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()));
    if !found {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed (scripts/install-deps.sh)");
    }
    found
}

const KBD_VM: &str = r##"
apiVersion: hci.dev/v1
kind: VirtualMachine
metadata: { name: q1 }
spec:
  backend: qemu
  memory: 64Mi
  boot: { type: kernel, path: "guest:kbd" }
  runStrategy: RerunOnFailure
  cloudInit:
    userData: "#cloud-config\nhostname: q1\n"
    sshAuthorizedKeys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG test@hci"]
"##;

#[test]
fn a_qemu_backed_vm_runs_stops_starts_crashes_and_is_deleted() {
    if !have_qemu() {
        return;
    }
    let mut d = Daemon::start(&[]);
    d.apply(KBD_VM);
    d.wait_vm("q1", "ran", |v| {
        phase(v) == "Running" && d.console("q1").contains("kbd ready")
    });
    // QEMU runs it, with the cloud-init seed attached.
    let pids = qemu_pids(d.dir.path());
    assert_eq!(pids.len(), 1, "{pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("cidata.img"), "{cmdline}");
    assert!(d.run_dir("q1").join("cidata.img").is_file());

    // Console through the API.
    let (ok, out) = d.hcictl(&["vm", "console", "q1", "--until", "kbd ready"]);
    assert!(ok && out.contains("kbd ready"), "{out}");

    // QEMU crashes (kill -9 behind the daemon's back): Failed, then
    // restarted by RerunOnFailure.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let vm = d.wait_vm("q1", "restarted after the crash", |v| {
        v["status"]["restarts"].as_u64().unwrap_or(0) >= 1 && phase(v) == "Running"
    });
    eprintln!("after the crash: {}", vm["status"]);
    let (ok, events) = d.hcictl(&["events", "vm", "q1"]);
    assert!(ok, "{events}");
    assert!(events.contains("Crashed"), "{events}");

    // Stop (the guest ignores ACPI: killed after --stop-timeout), start.
    let (ok, out) = d.hcictl(&["vm", "stop", "q1"]);
    assert!(ok, "{out}");
    d.wait_vm("q1", "stopped", |v| phase(v) == "Stopped");
    wait_no_qemu(d.dir.path());
    let (ok, out) = d.hcictl(&["vm", "start", "q1"]);
    assert!(ok, "{out}");
    d.wait_vm("q1", "ran again", |v| phase(v) == "Running");

    // A daemon crash takes its QEMU VMs along (none is left behind); the
    // next daemon starts the VM again (its run strategy says Always now).
    d.kill();
    wait_no_qemu(d.dir.path());
    d.spawn();
    d.wait_vm("q1", "ran after the daemon restart", |v| {
        phase(v) == "Running" && qemu_pids(d.dir.path()).len() == 1
    });
    let (_, events) = d.hcictl(&["events", "vm", "q1"]);
    assert!(events.contains("QEMU VMs stop with the daemon"), "{events}");

    // Delete: QEMU goes.
    let (ok, out) = d.hcictl(&["delete", "vm", "q1"]);
    assert!(ok, "{out}");
    wait_no_qemu(d.dir.path());
}

#[test]
fn bad_qemu_inputs_fail_the_vm_with_a_clear_message() {
    if !have_qemu() {
        return;
    }
    let d = Daemon::start(&[]);
    d.apply(
        r#"
apiVersion: hci.dev/v1
kind: VirtualMachine
metadata: { name: nokernel }
spec:
  backend: qemu
  memory: 64Mi
  boot: { type: kernel, path: /nonexistent/vmlinuz }
---
apiVersion: hci.dev/v1
kind: VirtualMachine
metadata: { name: noinitrd }
spec:
  backend: qemu
  memory: 64Mi
  boot: { type: kernel, path: "guest:kbd", initrd: /nonexistent/initrd.img }
"#,
    );
    let vm = d.wait_vm("nokernel", "failed", |v| phase(v) == "Failed");
    let message = vm["status"]["message"].as_str().unwrap_or("");
    assert!(message.contains("/nonexistent/vmlinuz"), "{message}");
    let vm = d.wait_vm("noinitrd", "failed", |v| phase(v) == "Failed");
    let message = vm["status"]["message"].as_str().unwrap_or("");
    assert!(message.contains("/nonexistent/initrd.img"), "{message}");

    drop(d);

    // UEFI without OVMF (the daemon pointed at files that do not exist):
    // a clear error naming the package. `auto` picks QEMU for firmware
    // boots.
    let d = Daemon::start(&[
        "--ovmf",
        "/nonexistent/OVMF_CODE.fd,/nonexistent/OVMF_VARS.fd",
    ]);
    d.apply(
        r#"
apiVersion: hci.dev/v1
kind: VirtualMachine
metadata: { name: uefi }
spec:
  memory: 64Mi
  boot: { type: firmware, kind: uefi }
"#,
    );
    let vm = d.wait_vm("uefi", "failed", |v| phase(v) == "Failed");
    let message = vm["status"]["message"].as_str().unwrap_or("");
    assert!(message.contains("ovmf"), "{message}");
    drop(d);

    // A QEMU that dies at start (here a stand-in that prints an error and
    // exits): Failed with its words, and the daemon stays responsive.
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("qemu-system-x86_64");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'qemu-system-x86_64: -machine foo: unsupported machine type' >&2\nexit 1\n",
    )
    .expect("fake qemu");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let d = Daemon::start(&["--qemu", &fake.display().to_string()]);
    d.apply(
        r#"
apiVersion: hci.dev/v1
kind: VirtualMachine
metadata: { name: dies }
spec:
  backend: qemu
  memory: 64Mi
  boot: { type: kernel, path: "guest:kbd" }
"#,
    );
    let vm = d.wait_vm("dies", "failed", |v| phase(v) == "Failed");
    let message = vm["status"]["message"].as_str().unwrap_or("");
    assert!(message.contains("unsupported machine type"), "{message}");
    let (ok, out) = d.hcictl(&["get", "vms"]);
    assert!(ok && out.contains("dies"), "{out}");
}

/// `--vm-mode process`: the QEMU VM runs in its own `hci-vmm` process, which
/// owns its volume. A daemon crash leaves the guest running (the same QEMU
/// process); the next daemon adopts it (event `Adopted`), its console and
/// an online snapshot of its volume work through that process, and a stop
/// hands the volume back so the VM starts again.
#[test]
fn a_qemu_vm_in_its_own_process_survives_a_daemon_crash_and_is_adopted() {
    if !have_qemu() {
        return;
    }
    let mut d = Daemon::start_with(common::process_mode());
    d.apply(
        r##"
apiVersion: hci.dev/v1
kind: Volume
metadata: { name: qdisk }
spec: { size: 16Mi }
---
apiVersion: hci.dev/v1
kind: VirtualMachine
metadata: { name: q2 }
spec:
  backend: qemu
  memory: 64Mi
  boot: { type: kernel, path: "guest:kbd" }
  disks: [{ name: data, volume: qdisk }]
"##,
    );
    d.wait_vm("q2", "ran", |v| {
        phase(v) == "Running" && d.console("q2").contains("kbd ready")
    });
    let pids = qemu_pids(d.dir.path());
    assert_eq!(pids.len(), 1, "{pids:?}");
    let vmm_pids = |dir: &Path| {
        let needle = dir.join("data/run/q2").display().to_string();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("hci-vmm") && c.contains(&needle)
                })
            })
            .count()
    };
    assert_eq!(vmm_pids(d.dir.path()), 1, "one hci-vmm runs the QEMU VM");
    let (_, events) = d.hcictl(&["events", "vm", "q2"]);
    assert!(events.contains("in its own hci-vmm process"), "{events}");

    // The daemon crashes: the guest keeps running in the same QEMU.
    d.kill();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(qemu_pids(d.dir.path()), pids, "QEMU outlives the daemon");
    d.spawn();
    d.wait_vm("q2", "adopted", |v| {
        phase(v) == "Running" && v["status"]["message"] == "re-adopted after a daemon restart"
    });
    assert_eq!(
        qemu_pids(d.dir.path()),
        pids,
        "the same QEMU, not a new one"
    );
    let (_, events) = d.hcictl(&["events", "vm", "q2"]);
    assert!(events.contains("Adopted"), "{events}");
    let (ok, out) = d.hcictl(&["vm", "console", "q2", "--until", "kbd ready"]);
    assert!(ok && out.contains("kbd ready"), "{out}");

    // The VM's process owns the volume: the daemon snapshots it through it.
    let (ok, out) = d.hcictl(&["volume", "snapshot", "qdisk", "live"]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out) = d.hcictl(&["get", "snapshot", "live", "-o", "json"]);
        if ok && out.contains("\"Ready\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot never ready: {out}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Stop: QEMU and its hci-vmm go, the volume is free again; start again.
    let (ok, out) = d.hcictl(&["vm", "stop", "q2"]);
    assert!(ok, "{out}");
    d.wait_vm("q2", "stopped", |v| phase(v) == "Stopped");
    wait_no_qemu(d.dir.path());
    let (ok, out) = d.hcictl(&["vm", "start", "q2"]);
    assert!(ok, "{out}");
    d.wait_vm("q2", "ran again", |v| {
        phase(v) == "Running" && qemu_pids(d.dir.path()).len() == 1
    });
    let (ok, out) = d.hcictl(&["delete", "vm", "q2"]);
    assert!(ok, "{out}");
    wait_no_qemu(d.dir.path());
}
