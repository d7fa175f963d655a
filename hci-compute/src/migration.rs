//! Live migration between two VMMs over TCP (pre-copy), in the
//! [`snapshot`](mod@crate::snapshot) stream format.
//!
//! ```text
//! source                                         target (listening)
//!   HELLO {version, vCPUs, memory, token}   →      checks version, shape, token
//!                                           ←      REPLY ok | error
//!   dirty logging on (KVM + VMM bitmap)
//!   pass 1: every non-zero page             →      written into fresh guest memory
//!   pass n: pages dirtied since pass n-1    →      (zero pages as ZEROS)
//!   … until the dirty set fits max_downtime at the measured bandwidth,
//!     or the pass limit forces the switch-over
//!   pause vCPUs, quiesce devices, release disks
//!   last dirty pages, STATE, END            →      takes the disks over,
//!                                                  loads state, resumes
//!                                           ←      REPLY ok (running) | error
//!   stop (the guest lives on the target)           or: source resumes
//! ```
//!
//! Dirty pages are KVM's dirty log (guest writes) joined with the bits
//! guest memory's [`AtomicBitmap`](vm_memory::bitmap::AtomicBitmap) sets for
//! every write the VMM makes (virtio devices). Until the target answers the
//! final `REPLY`, any error or timeout leaves the source running (resumed if
//! it was paused for the switch-over). A cancel stops the migration only
//! before the switch-over begins; from the pause on it is ignored, so the
//! caller learns from the result alone where the guest runs.
//!
//! Disks are not copied: the volumes the source owns
//! ([`HandoverDisk`]s) are released once its
//! devices stopped, their release (a replicated engine's generation) goes
//! with the machine state, and the target — which prepared them before
//! accepting — takes them over before it runs the guest: a local volume's
//! lock, a replicated volume's engine with a newer fencing generation, so
//! the source's engine is refused from then on. If the target does not
//! answer "running", the source takes its volumes back and resumes.

use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use hci_core::compute::{MigrationOptions, MigrationProgress};
use tokio::sync::watch;
use tracing::{info, info_span, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Result, VmmError};
use crate::handover::HandoverDisk;
use crate::memory::GuestMemory;
use crate::snapshot::{self, Hello, MachineState, PAGE, PageWriter, tag};
use crate::vm::Vm;

/// Most pre-copy passes before the switch-over is forced.
pub const MAX_PASSES: u32 = 30;
/// How long a peer may stay silent before the migration fails.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a cancel request still stops the migration: it does until the
/// source commits to the switch-over (pauses the guest for the last pass),
/// never after, so a cancel either leaves the guest on the source or has
/// no effect at all.
struct CancelGate<'a> {
    requested: &'a (dyn Fn() -> bool + Sync),
    state: AtomicU8,
}

const COPYING: u8 = 0;
const COMMITTED: u8 = 1;
const CANCELLED: u8 = 2;

impl<'a> CancelGate<'a> {
    fn new(requested: &'a (dyn Fn() -> bool + Sync)) -> Self {
        CancelGate {
            requested,
            state: AtomicU8::new(COPYING),
        }
    }

    /// Whether a cancel took effect (it can only before the commit).
    fn cancelled(&self) -> bool {
        if (self.requested)() {
            let _ =
                self.state
                    .compare_exchange(COPYING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst);
        }
        self.state.load(Ordering::SeqCst) == CANCELLED
    }

    /// Commits to the switch-over; false if a cancel came first.
    fn commit(&self) -> bool {
        !self.cancelled()
            && self
                .state
                .compare_exchange(COPYING, COMMITTED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }
}

fn failed(why: impl Into<String>) -> VmmError {
    VmmError::Migration(why.into())
}

fn io_failed(what: &str) -> impl FnOnce(std::io::Error) -> VmmError + '_ {
    move |e| failed(format!("{what}: {e}"))
}

/// Writes a `REPLY` frame: status 0 is success.
fn reply(w: &mut impl Write, ok: bool, message: &str) -> std::io::Result<()> {
    snapshot::write_frame(w, tag::REPLY, &[&[u8::from(!ok)], message.as_bytes()])?;
    w.flush()
}

/// Reads a `REPLY` frame; an error reply becomes an error.
fn read_reply(r: &mut impl Read) -> Result<()> {
    let mut buf = Vec::new();
    let t = snapshot::read_frame(r, &mut buf)?;
    if t != tag::REPLY || buf.is_empty() {
        return Err(failed(format!("unexpected answer (frame tag {t})")));
    }
    if buf[0] == 0 {
        Ok(())
    } else {
        Err(failed(format!(
            "the target refused: {}",
            String::from_utf8_lossy(&buf[1..])
        )))
    }
}

/// Pages written since the last call: KVM's dirty log joined with the
/// VMM's own writes, as ascending guest addresses. Clears both.
fn take_dirty(vm: &Vm) -> Result<Vec<u64>> {
    let logs = vm.kvm().take_dirty_log()?;
    let mut out = Vec::new();
    for (region, log) in vm.memory().iter().zip(logs) {
        let start = region.start_addr().0;
        let pages = (region.len() / PAGE) as usize;
        let vmm = (**region).bitmap();
        for p in 0..pages {
            let by_guest = log.get(p / 64).is_some_and(|w| (w >> (p % 64)) & 1 == 1);
            let by_vmm = vmm.is_bit_set(p);
            if by_vmm {
                vmm.reset_bit(p);
            }
            if by_guest || by_vmm {
                out.push(start + p as u64 * PAGE);
            }
        }
    }
    Ok(out)
}

/// Clears the VMM-write bitmap of every region.
fn clear_vmm_dirty(mem: &GuestMemory) {
    for region in mem.iter() {
        let bm = (**region).bitmap();
        bm.reset_addr_range(0, region.len() as usize);
    }
}

/// Runs a migration of `vm` to `target` (`host:port`). On success the guest
/// runs on the target and `vm` is stopped; on any error, a timeout or
/// a cancel (`cancel` returning true) before the switch-over, `vm` keeps
/// running; a cancel after it is ignored. `disks` (the volumes `vm` owns) are
/// released at the switch-over, after the devices stopped and before the
/// machine state goes out, and taken back if the target does not answer
/// that it runs the guest.
pub fn send(
    vm: &Vm,
    disks: &[Arc<HandoverDisk>],
    target: &str,
    options: &MigrationOptions,
    progress: &watch::Sender<MigrationProgress>,
    cancel: &(dyn Fn() -> bool + Sync),
) -> Result<MigrationProgress> {
    let _span = info_span!("migrate", vm = %vm.name(), target).entered();
    let addr = target
        .to_socket_addrs()
        .map_err(io_failed("resolve the target"))?
        .next()
        .ok_or_else(|| failed(format!("{target} resolves to no address")))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| failed(format!("connect to {target}: {e}")))?;
    stream
        .set_nodelay(true)
        .map_err(io_failed("set TCP_NODELAY"))?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(io_failed("set a timeout"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(io_failed("set a timeout"))?;
    let mut reader = stream.try_clone().map_err(io_failed("clone the socket"))?;
    let watch_sock = stream.try_clone().map_err(io_failed("clone the socket"))?;
    let mut w = BufWriter::with_capacity(1 << 20, stream);
    let done = AtomicBool::new(false);
    let gate = CancelGate::new(cancel);
    std::thread::scope(|scope| {
        // A cancel must not wait for a stuck peer: shutting the socket down
        // fails a blocked write or read at once.
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if gate.cancelled() {
                    let _ = watch_sock.shutdown(std::net::Shutdown::Both);
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let r = run_migration(vm, disks, &mut w, &mut reader, options, progress, &gate);
        done.store(true, Ordering::SeqCst);
        // A failure caused by the shutdown is the cancel.
        match r {
            Err(_) if gate.cancelled() => Err(VmmError::Cancelled),
            other => other,
        }
    })
}

fn run_migration(
    vm: &Vm,
    disks: &[Arc<HandoverDisk>],
    w: &mut BufWriter<TcpStream>,
    reader: &mut TcpStream,
    options: &MigrationOptions,
    progress: &watch::Sender<MigrationProgress>,
    gate: &CancelGate<'_>,
) -> Result<MigrationProgress> {
    let hello = Hello {
        version: snapshot::FORMAT_VERSION,
        cpus: vm.cpus(),
        memory: vm.memory_size(),
        token: options.token.as_bytes().to_vec(),
    };
    snapshot::write_frame(w, tag::HELLO, &[&hello.encode()])
        .and_then(|()| w.flush())
        .map_err(io_failed("send the header"))?;
    read_reply(reader)?;

    vm.kvm().set_dirty_logging(true)?;
    let result = precopy_and_switch(vm, disks, w, reader, options, progress, gate);
    if result.is_err() {
        // The source carries on: stop logging (the dirty bitmaps are simply
        // cleared at the next migration's start).
        if let Err(e) = vm.kvm().set_dirty_logging(false) {
            warn!(error = %e, "cannot turn dirty logging off");
        }
    }
    result
}

fn precopy_and_switch(
    vm: &Vm,
    disks: &[Arc<HandoverDisk>],
    w: &mut BufWriter<TcpStream>,
    reader: &mut TcpStream,
    options: &MigrationOptions,
    progress: &watch::Sender<MigrationProgress>,
    gate: &CancelGate<'_>,
) -> Result<MigrationProgress> {
    let started = Instant::now();
    let mem = vm.memory();
    let check = |p: &MigrationProgress| -> Result<()> {
        if gate.cancelled() {
            return Err(VmmError::Cancelled);
        }
        if started.elapsed() > options.timeout {
            return Err(failed(format!(
                "not converged within {:?} (pass {}, {} bytes dirty)",
                options.timeout, p.iteration, p.bytes_remaining
            )));
        }
        Ok(())
    };
    // Clear what the VMM wrote before (boot loading): pass 1 sends everything.
    take_dirty(vm)?;
    clear_vmm_dirty(mem);
    let mut pw = PageWriter::default();
    let mut p = MigrationProgress {
        iteration: 1,
        ..Default::default()
    };
    progress.send_replace(p.clone());
    let t = Instant::now();
    {
        // Pass 1 in slices, so a cancel is seen within a few MiB.
        for region in mem.iter() {
            let start = region.start_addr().0;
            let pages = (region.len() / PAGE) as usize;
            let mut i = 0;
            while i < pages {
                let n = (pages - i).min(snapshot::RUN_PAGES);
                pw.run(w, mem, start + i as u64 * PAGE, n, true)?;
                i += n;
                if i % (16 * snapshot::RUN_PAGES) == 0 {
                    p.bytes_sent = pw.sent.bytes;
                    progress.send_replace(p.clone());
                    check(&p)?;
                }
            }
        }
        w.flush().map_err(io_failed("send pages"))?;
    }
    let mut pass_time = t.elapsed();
    let mut last_bytes = pw.sent.bytes;
    // Bytes per second the link took (page data), measured on real passes.
    let mut bandwidth = last_bytes as f64 / pass_time.as_secs_f64().max(1e-6);
    p.bytes_sent = pw.sent.bytes;
    progress.send_replace(p.clone());
    let mut dirty;
    loop {
        dirty = take_dirty(vm)?;
        let remaining = dirty.len() as u64 * PAGE;
        p.bytes_remaining = remaining;
        p.dirty_rate = remaining as f64 / pass_time.as_secs_f64().max(1e-6);
        let estimate = Duration::from_secs_f64(remaining as f64 / bandwidth.max(1.0));
        progress.send_replace(p.clone());
        check(&p)?;
        if estimate <= options.max_downtime || p.iteration >= MAX_PASSES {
            info!(
                pass = p.iteration,
                dirty = remaining,
                ?estimate,
                "switching over"
            );
            break;
        }
        p.iteration += 1;
        let t = Instant::now();
        for chunk in dirty.chunks(16 * snapshot::RUN_PAGES) {
            pw.pages(w, mem, chunk)?;
            p.bytes_sent = pw.sent.bytes;
            check(&p)?;
        }
        w.flush().map_err(io_failed("send pages"))?;
        pass_time = t.elapsed();
        let sent = pw.sent.bytes - last_bytes;
        last_bytes = pw.sent.bytes;
        if sent > (1 << 20) {
            bandwidth = sent as f64 / pass_time.as_secs_f64().max(1e-6);
        }
        p.bytes_sent = pw.sent.bytes;
        progress.send_replace(p.clone());
    }

    // Switch-over: from here the guest is paused until one side runs it,
    // and a cancel no longer stops the migration.
    if !gate.commit() {
        return Err(VmmError::Cancelled);
    }
    vm.pause()?;
    let paused = Instant::now();
    vm.quiesce_devices();
    let rt = if disks.is_empty() {
        None
    } else {
        Some(
            tokio::runtime::Handle::try_current()
                .map_err(|e| failed(format!("no runtime to release the disks on: {e}")))?,
        )
    };
    let mut released = Vec::new();
    let mut release_time = Duration::ZERO;
    let result = (|| -> Result<()> {
        let mut last = take_dirty(vm)?;
        last.extend_from_slice(&dirty);
        last.sort_unstable();
        last.dedup();
        pw.pages(w, mem, &last)?;
        let mut state = vm.capture()?;
        if let Some(rt) = &rt {
            // The devices are stopped: flush and let the volumes go, so the
            // target can take them when it has the state.
            let t = Instant::now();
            // All at once: each waits for its volume's requests in flight.
            let tasks: Vec<_> = disks
                .iter()
                .map(|d| {
                    let d = Arc::clone(d);
                    rt.spawn(async move { d.release().await })
                })
                .collect();
            let mut first_err = None;
            for (d, t) in disks.iter().zip(tasks) {
                match rt.block_on(t) {
                    Ok(Ok(r)) => released.push(r),
                    Ok(Err(e)) => {
                        first_err.get_or_insert(failed(format!(
                            "release disk {} for the target: {e}",
                            d.name()
                        )));
                    }
                    Err(e) => {
                        first_err.get_or_insert(failed(format!(
                            "release disk {} for the target: {e}",
                            d.name()
                        )));
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            release_time = t.elapsed();
            state.handover = released.clone();
        }
        snapshot::write_state_and_end(w, &state, pw.sent.pages)?;
        w.flush().map_err(io_failed("send the machine state"))?;
        read_reply(reader)
    })();
    if let Err(e) = result {
        warn!(error = %e, "switch-over failed; the source resumes");
        if let Some(rt) = &rt {
            // Take back what was released (a replicated volume with a newer
            // generation: a target that activated it is fenced again).
            for d in disks {
                if let Err(re) = rt.block_on(d.reacquire()) {
                    warn!(disk = d.name(), error = %re, "cannot take the disk back");
                    return Err(failed(format!(
                        "{e}; then the source could not take disk {} back ({re}), so the VM stays paused",
                        d.name()
                    )));
                }
            }
        }
        vm.unquiesce_devices()?;
        vm.resume()?;
        return Err(e);
    }
    let downtime = paused.elapsed();
    if !released.is_empty() {
        info!(?release_time, disks = released.len(), "disks handed over");
    }
    p.iteration += 1;
    p.bytes_sent = pw.sent.bytes;
    p.bytes_remaining = 0;
    p.downtime = Some(downtime);
    progress.send_replace(p.clone());
    info!(passes = p.iteration, bytes = p.bytes_sent, ?downtime, total = ?started.elapsed(), "migrated");
    // The guest runs on the target: this copy must never run again.
    vm.kill();
    Ok(p)
}

/// A migration that arrived: the filled guest memory and the machine
/// state; [`Incoming::finish`] answers the source.
#[derive(Debug)]
pub struct Incoming {
    /// Guest memory with every page the source sent.
    pub memory: Arc<GuestMemory>,
    /// The machine state to load.
    pub state: MachineState,
    stream: TcpStream,
}

impl Incoming {
    /// Tells the source whether the VM now runs here (`Ok`) or could not
    /// be started (the source then resumes).
    pub fn finish(mut self, outcome: std::result::Result<(), String>) -> Result<()> {
        let r = match &outcome {
            Ok(()) => reply(&mut self.stream, true, "running"),
            Err(e) => reply(&mut self.stream, false, e),
        };
        r.map_err(io_failed("answer the source"))
    }
}

/// Binds the migration listener (`host:port`).
pub fn listen(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| failed(format!("listen on {addr}: {e}")))
}

/// Compares tokens in time independent of where they differ.
fn token_matches(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A migration whose header was accepted: guest memory is allocated and
/// the source is sending pages ([`Accepted::read_state`] receives them).
#[derive(Debug)]
pub struct Accepted {
    /// Fresh guest memory the pages go into (a VM can be built on it now).
    pub memory: Arc<GuestMemory>,
    reader: std::io::BufReader<TcpStream>,
    stream: TcpStream,
}

/// Accepts one migration on `listener` for a VM with `cpus` vCPUs and
/// `memory` bytes (fresh memory from `backing`), checking the format
/// version, shape and `token`.
pub fn accept(
    listener: &TcpListener,
    token: &str,
    cpus: u32,
    memory: u64,
    backing: &crate::memory::MemoryBacking,
) -> Result<Accepted> {
    let (stream, peer) = listener
        .accept()
        .map_err(io_failed("accept the migration"))?;
    let _span = info_span!("receive_migration", %peer).entered();
    stream
        .set_nodelay(true)
        .map_err(io_failed("set TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(io_failed("set a timeout"))?;
    let mut answer = stream.try_clone().map_err(io_failed("clone the socket"))?;
    let mut reader = std::io::BufReader::with_capacity(
        1 << 20,
        stream.try_clone().map_err(io_failed("clone the socket"))?,
    );
    let mut buf = Vec::new();
    let first = snapshot::read_frame(&mut reader, &mut buf)?;
    let checked = if first != tag::HELLO {
        Err(failed("the peer did not start with a migration header"))
    } else {
        Hello::decode(&buf).and_then(|hello| {
            if !token_matches(&hello.token, token.as_bytes()) {
                return Err(failed("wrong migration token"));
            }
            snapshot::check_shape(&hello, cpus, memory)
        })
    };
    if let Err(e) = checked {
        let _ = reply(&mut answer, false, &e.to_string());
        return Err(e);
    }
    let mem = crate::memory::create_guest_memory_backed(memory, backing)?;
    reply(&mut answer, true, "ready").map_err(io_failed("answer the source"))?;
    Ok(Accepted {
        memory: mem,
        reader,
        stream,
    })
}

impl Accepted {
    /// Receives pages until the source sends the machine state (it is
    /// paused then, waiting for [`Incoming::finish`]).
    pub fn read_state(mut self) -> Result<Incoming> {
        let mut buf = Vec::with_capacity(snapshot::MAX_FRAME + 4);
        let t = Instant::now();
        let state = snapshot::read_body(&mut self.reader, &self.memory, &mut buf)?;
        info!(elapsed = ?t.elapsed(), "migration stream received");
        Ok(Incoming {
            memory: self.memory,
            state,
            stream: self.stream,
        })
    }
}

/// [`accept`] then [`Accepted::read_state`].
pub fn receive(
    listener: &TcpListener,
    token: &str,
    cpus: u32,
    memory: u64,
    backing: &crate::memory::MemoryBacking,
) -> Result<Incoming> {
    accept(listener, token, cpus, memory, backing)?.read_state()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_wins_only_before_the_commit() {
        let wanted = AtomicBool::new(false);
        let requested = || wanted.load(Ordering::SeqCst);
        let gate = CancelGate::new(&requested);
        assert!(!gate.cancelled());
        wanted.store(true, Ordering::SeqCst);
        assert!(gate.cancelled());
        assert!(!gate.commit(), "a cancelled migration cannot switch over");

        let wanted = AtomicBool::new(false);
        let requested = || wanted.load(Ordering::SeqCst);
        let gate = CancelGate::new(&requested);
        assert!(gate.commit());
        wanted.store(true, Ordering::SeqCst);
        assert!(!gate.cancelled(), "a cancel after the commit is ignored");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abc", b"abd"));
        assert!(!token_matches(b"abc", b"ab"));
        assert!(token_matches(b"", b""));
    }
}
