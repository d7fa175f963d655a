//! Network namespaces: where the backend's sockets and devices live.
//!
//! A socket (netlink, UDP) and a `/dev/net/tun` file belong to the network
//! namespace of the thread that created them, for their whole life. So the
//! backend creates each of them through [`NetNs::run`], which runs a closure on
//! a short-lived thread that has entered the namespace, and then uses the
//! resulting file descriptor from any thread.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A network namespace to operate in.
#[derive(Clone)]
pub struct NetNs {
    /// `None`: the namespace of the calling thread (the process's own, normally).
    file: Option<Arc<File>>,
    path: Option<PathBuf>,
}

impl fmt::Debug for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "NetNs({})", p.display()),
            None => f.write_str("NetNs(current)"),
        }
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::current()
    }
}

impl NetNs {
    /// The namespace of the calling thread.
    pub fn current() -> Self {
        Self {
            file: None,
            path: None,
        }
    }

    /// Opens a namespace by path (e.g. `/proc/PID/ns/net`).
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        Ok(Self {
            file: Some(Arc::new(file)),
            path: Some(path),
        })
    }

    /// Opens a namespace created by `ip netns add NAME` (`/run/netns/NAME`).
    pub fn named(name: &str) -> io::Result<Self> {
        Self::open(Path::new("/run/netns").join(name))
    }

    /// True for the calling thread's namespace.
    pub fn is_current(&self) -> bool {
        self.file.is_none()
    }

    /// Runs `f` on a thread inside this namespace and returns its result. For
    /// [`NetNs::current`] `f` runs on the calling thread. Blocking: call it from
    /// `spawn_blocking` in async code when `f` may block.
    pub fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let Some(file) = &self.file else {
            return Ok(f());
        };
        std::thread::scope(|scope| {
            let handle = scope.spawn(|| {
                // SAFETY: `file` is an open namespace file for the duration of
                // the call; setns only changes this (fresh, scoped) thread's
                // network namespace, which ends with the thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            });
            handle
                .join()
                .map_err(|_| io::Error::other("namespace worker thread panicked"))?
        })
    }
}
