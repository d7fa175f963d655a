//! Small process facts read from `/proc` (thread ids, CPU time, memory), and
//! TAP devices ([`tap`]): every libc call of the crate outside `kvm`.

pub mod tap;

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

/// The calling thread's kernel thread ID.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// A new memfd named `name` (close-on-exec), backed by 2 MiB huge pages
/// when `hugepages` is set.
pub fn memfd(name: &str, hugepages: bool) -> io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    let mut flags = libc::MFD_CLOEXEC;
    if hugepages {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: `name` is a valid NUL-terminated string for the call; the
    // flags are valid memfd_create flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Allocates the first `len` bytes of `file` (fallocate mode 0).
pub fn fallocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(io::Error::other)?;
    // SAFETY: fallocate on a descriptor `file` owns; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lets the process `cmd` starts inherit descriptors `fds` (which must stay
/// open in this process until it is spawned) under the same numbers.
pub fn inherit_fds(cmd: &mut tokio::process::Command, fds: Vec<std::os::fd::RawFd>) {
    if fds.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the forked child before exec and only
    // calls fcntl (async-signal-safe) on descriptor numbers; clearing
    // FD_CLOEXEC in the child's table leaves the parent's flags alone.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Takes ownership of inherited descriptor `fd` (e.g. `--net fd=N`), after
/// checking it is open, and marks it close-on-exec.
pub fn adopt_inherited_fd(fd: std::os::fd::RawFd) -> io::Result<std::os::fd::OwnedFd> {
    if fd < 3 {
        return Err(io::Error::other(format!(
            "descriptor {fd} is a standard stream"
        )));
    }
    // SAFETY: F_GETFD only reads the descriptor's flags; an unknown number fails with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::other(format!(
            "descriptor {fd} is not open in this process: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: as above; sets FD_CLOEXEC on an open descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is open and was handed to this process to own
    // (nothing else in the process refers to an inherited number).
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// CPU time a thread of this process has used (`/proc/self/task/TID/schedstat`).
pub fn thread_cpu_time(tid: i32) -> Option<Duration> {
    let s = fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Resident set size of this process, bytes.
pub fn process_rss() -> u64 {
    let Ok(s) = fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * page_size()
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).unwrap_or(4096)
}

/// Resident bytes of the given host virtual ranges `(start, len)` (guest
/// RAM), from `mincore`. (Reading `/proc/self/smaps` by mapping start is
/// unreliable: adjacent anonymous mappings, e.g. another VM's RAM, merge.)
/// Unmapped parts count as not resident.
pub fn mapping_rss(ranges: &[(u64, u64)]) -> u64 {
    const CHUNK_PAGES: u64 = 1 << 16;
    let page = page_size();
    let mut resident = 0u64;
    let mut vec = Vec::new();
    for &(start, len) in ranges {
        if !start.is_multiple_of(page) {
            continue;
        }
        let pages = len.div_ceil(page);
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(CHUNK_PAGES);
            vec.resize(n as usize, 0u8);
            let addr = start + done * page;
            // SAFETY: mincore only queries page residency of `[addr, addr + n
            // pages)` (failing with ENOMEM where nothing is mapped, never
            // touching the memory) and writes one byte per page into `vec`,
            // which holds exactly `n` bytes for the call.
            let rc = unsafe {
                libc::mincore(
                    addr as *mut libc::c_void,
                    (n * page) as libc::size_t,
                    vec.as_mut_ptr(),
                )
            };
            if rc == 0 {
                resident += vec.iter().filter(|b| **b & 1 != 0).count() as u64 * page;
            }
            done += n;
        }
    }
    resident
}

/// Sends SIGKILL to process `pid` (a VMM this process started).
pub fn kill_process(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_facts_are_readable() {
        assert!(process_rss() > 0);
        assert!(thread_cpu_time(gettid()).is_some());
        assert_eq!(mapping_rss(&[(1, 4096)]), 0);
        // A fresh mapping is not resident until touched.
        let mut v = vec![0u8; 1 << 20];
        let addr = v.as_ptr() as u64;
        let aligned = addr.next_multiple_of(4096);
        v[(aligned - addr) as usize + 8192] = 1;
        assert!(mapping_rss(&[(aligned, 1 << 19)]) >= 4096);
        assert_eq!(mapping_rss(&[(1 << 46, 1 << 20)]), 0);
    }
}
