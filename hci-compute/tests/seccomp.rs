//! The VMM's seccomp filter refuses what a running VMM never does, and says so.

use std::process::Command;

const CHILD: &str = "HCI_SECCOMP_TEST_CHILD";

#[test]
fn a_refused_call_stops_the_process_with_one_clear_line() {
    if std::env::var_os(CHILD).is_some() {
        hci_compute::seccomp::install(hci_compute::seccomp::Mode::Trap).expect("install");
        // Files still work under the filter...
        let dir = std::env::temp_dir();
        assert!(dir.is_dir());
        // ...but a Unix socket or a listening TCP socket is refused:
        // SIGSYS, the reporter exits 159 (TCP sockets may connect: migration).
        let _ = std::os::unix::net::UnixListener::bind(dir.join("hci-seccomp-test.sock"));
        std::process::exit(0);
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_refused_call_stops_the_process_with_one_clear_line",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(159), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("seccomp refused system call {}", libc::SYS_socket)),
        "{stderr}"
    );
}
