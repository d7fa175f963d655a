//! Seccomp filtering for the VMM process (Firecracker's model).
//!
//! Once a VM is built and its control socket bound, `hci-vmm` installs a
//! filter on every thread that allows only the system calls a running VMM
//! makes: vCPU ioctls, file and socket I/O on descriptors it already holds,
//! memory management, threads, signals, timers, and the file operations of a
//! local volume (open/rename/unlink/fallocate/fsync for snapshots and
//! metadata). It refuses everything a compromised VMM would want next:
//! `execve`, new sockets (`socket`, `connect`, `bind`), `ptrace`, `mount`,
//! `bpf`, `kexec`, `process_vm_*`, `userfaultfd`, `setuid` and friends,
//! killing other processes.
//!
//! A refused call raises `SIGSYS`; [`install`] sets a handler that writes one
//! line naming the call to stderr and exits with status 159 (128 + SIGSYS),
//! so a missing entry shows up in the VMM's log instead of as a silent crash.
//! [`Mode::Log`] allows everything but has the kernel log calls outside the
//! list (to find what a new feature needs).
//!
//! Not yet covered: argument filtering (e.g. restricting `ioctl` to KVM
//! requests); a VMM that hosts a replicated volume's engine will need
//! `socket`/`connect` for its replicas.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::error::{Result, VmmError};

/// How strictly to filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Refuse calls outside the list: `SIGSYS`, one line on stderr, exit 159.
    #[default]
    Trap,
    /// Allow everything; the kernel logs calls outside the list (audit log).
    Log,
    /// No filter.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "trap" | "on" => Ok(Mode::Trap),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(format!("{other:?}: use trap, log or off")),
        }
    }
}

/// The system calls a running VMM makes (x86_64).
const ALLOWED: &[libc::c_long] = &[
    // Descriptor I/O.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    // Files (console log, exit file, local volume metadata and snapshots).
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_fchmod,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    // Sockets already open (the control socket and its connections).
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // New connections: a replicated volume's engine reconnects to its
    // replica servers and connects to a replica being added.
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    // Polling.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mincore,
    libc::SYS_brk,
    // Threads and scheduling.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_prctl,
    libc::SYS_prlimit64,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Signals (vCPU kicks are signals to our own threads).
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    // Time and randomness.
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
];

/// The filter for `mode` (`None` for [`Mode::Off`]).
pub fn program(mode: Mode) -> Result<Option<BpfProgram>> {
    let mismatch = match mode {
        Mode::Off => return Ok(None),
        Mode::Trap => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| VmmError::Memory(format!("cannot build the seccomp filter: {e}")))?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e| VmmError::Memory(format!("cannot compile the seccomp filter: {e}")))?;
    Ok(Some(prog))
}

/// Installs the `SIGSYS` reporter, then the filter for `mode` on every
/// thread of the process (seccomp TSYNC). Irreversible.
pub fn install(mode: Mode) -> Result<()> {
    let Some(prog) = program(mode)? else {
        return Ok(());
    };
    install_sigsys_reporter()?;
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| VmmError::Device {
        device: "seccomp".into(),
        reason: format!("cannot install the filter: {e}"),
    })
}

fn install_sigsys_reporter() -> Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value;
    // the handler only makes async-signal-safe calls (write, _exit).
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(VmmError::io(
            "install the SIGSYS handler",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Offset of `si_syscall` in a `SIGSYS` siginfo on x86_64: signo, errno,
/// code and padding (16 bytes), then `_sigsys { void *call_addr; int syscall; }`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo for SIGSYS from seccomp,
        // whose `_sigsys.si_syscall` int sits at SI_SYSCALL_OFFSET.
        unsafe {
            info.cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<libc::c_int>()
                .read_unaligned()
        }
    };
    let mut msg = [0u8; 160];
    let mut len = 0;
    for part in [
        b"hci-vmm: seccomp refused system call ".as_slice(),
        itoa(nr, &mut [0u8; 12]),
        b" (the VMM stops; run hci-vmm with --seccomp log to find what a new feature needs)\n"
            .as_slice(),
    ] {
        let n = part.len().min(msg.len() - len);
        msg[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: write and _exit are async-signal-safe; `msg[..len]` is valid.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Formats `v` in decimal into `buf` without allocating.
fn itoa(v: libc::c_int, buf: &mut [u8; 12]) -> &[u8] {
    let mut n = i64::from(v).unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_compile() {
        assert_eq!("trap".parse::<Mode>().unwrap(), Mode::Trap);
        assert_eq!("off".parse::<Mode>().unwrap(), Mode::Off);
        assert!("maybe".parse::<Mode>().is_err());
        assert!(program(Mode::Off).unwrap().is_none());
        let prog = program(Mode::Trap).unwrap().unwrap();
        assert!(
            prog.len() > ALLOWED.len(),
            "one check per allowed call at least"
        );
    }

    #[test]
    fn dangerous_calls_are_not_allowed() {
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_bpf,
            libc::SYS_kill,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_setuid,
            libc::SYS_process_vm_writev,
            libc::SYS_userfaultfd,
        ] {
            assert!(!ALLOWED.contains(&nr), "syscall {nr} is allowed");
        }
    }

    #[test]
    fn itoa_formats_without_allocating() {
        assert_eq!(itoa(0, &mut [0; 12]), b"0");
        assert_eq!(itoa(59, &mut [0; 12]), b"59");
        assert_eq!(itoa(-1, &mut [0; 12]), b"-1");
        assert_eq!(itoa(i32::MIN, &mut [0; 12]), b"-2147483648");
    }
}
