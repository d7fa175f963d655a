//! The NBD server: handshake, option haggling and the transmission phase.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use hci_core::block::{BlockDevice, ExtentKind, WriteFlags, ZeroFlags, check_range};
use hci_core::{Error, Result};

use super::proto::*;

/// Largest read or write payload accepted (what we advertise as maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Reads at least this long are answered sparsely (holes as `OFFSET_HOLE`).
const SPARSE_READ_MIN: u64 = 64 * 1024;
/// Largest option payload accepted during the handshake.
const MAX_OPTION: u32 = 64 << 10;
/// The whole handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request served inline when nothing else is in flight.
const INLINE_MAX: u32 = 64 << 10;
/// Requests served concurrently per connection.
const IN_FLIGHT: usize = 128;

/// How an export is offered.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Refuse writes (`NBD_FLAG_READ_ONLY`).
    pub read_only: bool,
    /// Free text shown by `nbdinfo --list`.
    pub description: String,
}

#[derive(Debug)]
struct Export {
    name: String,
    device: Arc<dyn BlockDevice>,
    options: ExportOptions,
}

impl Export {
    fn read_only(&self) -> bool {
        self.options.read_only || self.device.is_read_only()
    }

    fn flags(&self, structured: bool) -> u16 {
        let caps = self.device.capabilities();
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE;
        if self.read_only() {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
            if caps.write_zeroes {
                f |= TF_SEND_FAST_ZERO;
            }
        }
        if structured {
            f |= TF_SEND_DF;
        }
        if caps.shared_flush {
            f |= TF_CAN_MULTI_CONN;
        }
        f
    }
}

/// Where to listen: `unix:/path/to.sock` or `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(Error::invalid("listen address", "unix: needs a path"));
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        use std::net::ToSocketAddrs;
        s.to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(Listen::Tcp)
            .ok_or_else(|| {
                Error::invalid(
                    "listen address",
                    format!("{s:?} is neither HOST:PORT nor unix:PATH"),
                )
            })
    }
}

/// A TCP listener whose accepted sockets get 4 MiB buffers, so a 1 MiB write
/// arrives in few wakeups.
fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.set_recv_buffer_size(4 << 20)?;
    sock.set_send_buffer_size(4 << 20)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// A running listener; dropping it does not stop it, [`ServerHandle::shutdown`] does.
#[derive(Debug)]
pub struct ServerHandle {
    /// The bound TCP address, for `Listen::Tcp` (port 0 resolved).
    pub tcp_addr: Option<SocketAddr>,
    /// The socket path, for `Listen::Unix`.
    pub unix_path: Option<PathBuf>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// An NBD URI for `export` on this listener.
    pub fn uri(&self, export: &str) -> String {
        match (&self.tcp_addr, &self.unix_path) {
            (Some(a), _) => format!("nbd://{a}/{export}"),
            (_, Some(p)) => format!("nbd+unix:///{export}?socket={}", p.display()),
            _ => String::new(),
        }
    }

    /// Stops accepting connections (open connections finish on their own).
    pub fn shutdown(&self) {
        self.task.abort();
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Waits until the accept loop ends.
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// An NBD server exporting [`BlockDevice`]s by name.
///
/// ```no_run
/// # async fn demo() -> hci_core::Result<()> {
/// use std::sync::Arc;
/// use hci_core::memory::MemBlockDevice;
/// use hci_storage::nbd::{ExportOptions, NbdServer};
///
/// let server = Arc::new(NbdServer::new());
/// server.add_export("disk", Arc::new(MemBlockDevice::new(1 << 30)), ExportOptions::default())?;
/// let handle = server.serve("127.0.0.1:10809".parse()?).await?;
/// println!("qemu-img info {}", handle.uri("disk"));
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct NbdServer {
    exports: RwLock<Vec<Arc<Export>>>,
}

impl NbdServer {
    /// A server with no exports.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an export. The first export also answers to the empty name.
    pub fn add_export(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        options: ExportOptions,
    ) -> Result<()> {
        if name.len() > 4096 {
            return Err(Error::invalid("export name", "must be at most 4096 bytes"));
        }
        let mut ex = self.exports.write().unwrap_or_else(|e| e.into_inner());
        if ex.iter().any(|e| e.name == name) {
            return Err(Error::already_exists("export", name));
        }
        ex.push(Arc::new(Export {
            name: name.to_string(),
            device,
            options,
        }));
        Ok(())
    }

    /// Removes an export (connections using it keep it until they close).
    pub fn remove_export(&self, name: &str) -> Result<()> {
        let mut ex = self.exports.write().unwrap_or_else(|e| e.into_inner());
        let before = ex.len();
        ex.retain(|e| e.name != name);
        if ex.len() == before {
            return Err(Error::not_found("export", name));
        }
        Ok(())
    }

    fn find(&self, name: &str) -> Option<Arc<Export>> {
        let ex = self.exports.read().unwrap_or_else(|e| e.into_inner());
        ex.iter()
            .find(|e| e.name == name)
            .or_else(|| if name.is_empty() { ex.first() } else { None })
            .cloned()
    }

    fn names(&self) -> Vec<(String, String)> {
        let ex = self.exports.read().unwrap_or_else(|e| e.into_inner());
        ex.iter()
            .map(|e| (e.name.clone(), e.options.description.clone()))
            .collect()
    }

    /// Binds `listen` and serves connections in the background.
    pub async fn serve(self: &Arc<Self>, listen: Listen) -> Result<ServerHandle> {
        match listen {
            Listen::Tcp(addr) => {
                let l =
                    tcp_listener(addr).map_err(|e| Error::io(format!("listen on {addr}"), e))?;
                let local = l
                    .local_addr()
                    .map_err(|e| Error::io("read the bound address", e))?;
                let me = self.clone();
                let task = tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, peer)) => {
                                let _ = s.set_nodelay(true);
                                let me = me.clone();
                                tokio::spawn(async move {
                                    tracing::debug!(%peer, "NBD connection");
                                    if let Err(e) = me.serve_split(s, |s| s.into_split()).await {
                                        tracing::debug!(%peer, error = %e, "NBD connection ended");
                                    }
                                });
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
                Ok(ServerHandle {
                    tcp_addr: Some(local),
                    unix_path: None,
                    task,
                })
            }
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(&path);
                let l = UnixListener::bind(&path)
                    .map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
                let me = self.clone();
                let task = tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, _)) => {
                                let me = me.clone();
                                tokio::spawn(async move {
                                    if let Err(e) = me.serve_split(s, |s| s.into_split()).await {
                                        tracing::debug!(error = %e, "NBD connection ended");
                                    }
                                });
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
                Ok(ServerHandle {
                    tcp_addr: None,
                    unix_path: Some(path),
                    task,
                })
            }
        }
    }

    /// Serves one connection to its end (the client disconnects or misbehaves).
    pub async fn serve_connection<S>(self: &Arc<Self>, stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve_split(stream, tokio::io::split).await
    }

    /// Like [`NbdServer::serve_connection`], splitting the stream with `split`
    /// once the handshake is done (sockets split without a shared lock).
    async fn serve_split<S, R, W>(
        self: &Arc<Self>,
        mut stream: S,
        split: impl FnOnce(S) -> (R, W),
    ) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let session =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut stream)).await {
                Ok(r) => r.map_err(|e| Error::io("NBD handshake", e))?,
                Err(_) => {
                    return Err(Error::Unavailable {
                        what: "NBD client (handshake timed out)".into(),
                        source: None,
                    });
                }
            };
        let Some(session) = session else {
            return Ok(());
        };
        let (rd, wr) = split(stream);
        transmission(rd, wr, session)
            .await
            .map_err(|e| Error::io("NBD transmission", e))
    }

    /// Runs the handshake; `None` if the client aborted or asked for nothing.
    async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: &mut S,
    ) -> io::Result<Option<Session>> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello).await?;
        let client_flags = s.read_u32().await?;
        if client_flags & FLAG_C_FIXED_NEWSTYLE == 0
            || client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unsupported client flags",
            ));
        }
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        let mut structured = false;
        let mut meta = false;
        loop {
            let magic = s.read_u64().await?;
            if magic != IHAVEOPT {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad option magic",
                ));
            }
            let option = s.read_u32().await?;
            let len = s.read_u32().await?;
            if len > MAX_OPTION {
                if len > 16 << 20 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "absurd option length",
                    ));
                }
                tokio::io::copy(&mut (&mut *s).take(u64::from(len)), &mut tokio::io::sink())
                    .await?;
                let mut out = Vec::new();
                option_reply(&mut out, option, REP_ERR_TOO_BIG, b"option too large");
                s.write_all(&out).await?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).await?;
            let mut out = Vec::new();
            match option {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    let Some(export) = self.find(&name) else {
                        return Ok(None); // the protocol's only answer: close
                    };
                    out.extend_from_slice(&export.device.size().to_be_bytes());
                    out.extend_from_slice(&export.flags(structured).to_be_bytes());
                    if !no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&out).await?;
                    return Ok(Some(Session {
                        export,
                        structured,
                        meta,
                        pool: Pool::default(),
                    }));
                }
                OPT_ABORT => {
                    option_reply(&mut out, option, REP_ACK, &[]);
                    let _ = s.write_all(&out).await;
                    return Ok(None);
                }
                OPT_LIST => {
                    if len != 0 {
                        option_reply(&mut out, option, REP_ERR_INVALID, b"LIST takes no data");
                    } else {
                        for (name, description) in self.names() {
                            let mut p = (name.len() as u32).to_be_bytes().to_vec();
                            p.extend_from_slice(name.as_bytes());
                            p.extend_from_slice(description.as_bytes());
                            option_reply(&mut out, option, REP_SERVER, &p);
                        }
                        option_reply(&mut out, option, REP_ACK, &[]);
                    }
                }
                OPT_INFO | OPT_GO => match parse_info(&data) {
                    None => option_reply(&mut out, option, REP_ERR_INVALID, b"malformed request"),
                    Some((name, wanted)) => match self.find(&name) {
                        None => option_reply(&mut out, option, REP_ERR_UNKNOWN, b"no such export"),
                        Some(export) => {
                            let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                            p.extend_from_slice(&export.device.size().to_be_bytes());
                            p.extend_from_slice(&export.flags(structured).to_be_bytes());
                            option_reply(&mut out, option, REP_INFO, &p);
                            if wanted.contains(&INFO_NAME) {
                                let mut p = INFO_NAME.to_be_bytes().to_vec();
                                p.extend_from_slice(export.name.as_bytes());
                                option_reply(&mut out, option, REP_INFO, &p);
                            }
                            if wanted.contains(&INFO_DESCRIPTION)
                                && !export.options.description.is_empty()
                            {
                                let mut p = INFO_DESCRIPTION.to_be_bytes().to_vec();
                                p.extend_from_slice(export.options.description.as_bytes());
                                option_reply(&mut out, option, REP_INFO, &p);
                            }
                            let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                            p.extend_from_slice(&1u32.to_be_bytes());
                            p.extend_from_slice(&4096u32.to_be_bytes());
                            p.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                            option_reply(&mut out, option, REP_INFO, &p);
                            option_reply(&mut out, option, REP_ACK, &[]);
                            if option == OPT_GO {
                                s.write_all(&out).await?;
                                return Ok(Some(Session {
                                    export,
                                    structured,
                                    meta,
                                    pool: Pool::default(),
                                }));
                            }
                        }
                    },
                },
                OPT_STRUCTURED_REPLY => {
                    if len != 0 {
                        option_reply(&mut out, option, REP_ERR_INVALID, b"takes no data");
                    } else {
                        structured = true;
                        option_reply(&mut out, option, REP_ACK, &[]);
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => match parse_meta(&data) {
                    None => option_reply(&mut out, option, REP_ERR_INVALID, b"malformed request"),
                    Some(_) if option == OPT_SET_META_CONTEXT && !structured => {
                        option_reply(
                            &mut out,
                            option,
                            REP_ERR_INVALID,
                            b"negotiate structured replies first",
                        );
                    }
                    Some((name, queries)) => {
                        if self.find(&name).is_none() {
                            option_reply(&mut out, option, REP_ERR_UNKNOWN, b"no such export");
                        } else {
                            let list = option == OPT_LIST_META_CONTEXT;
                            let matched = (list && queries.is_empty())
                                || queries
                                    .iter()
                                    .any(|q| q == BASE_ALLOCATION || (list && q == "base:"));
                            if option == OPT_SET_META_CONTEXT {
                                meta = matched;
                            }
                            if matched {
                                let id = if list { 0 } else { BASE_ALLOCATION_ID };
                                let mut p = id.to_be_bytes().to_vec();
                                p.extend_from_slice(BASE_ALLOCATION.as_bytes());
                                option_reply(&mut out, option, REP_META_CONTEXT, &p);
                            }
                            option_reply(&mut out, option, REP_ACK, &[]);
                        }
                    }
                },
                _ => option_reply(&mut out, option, REP_ERR_UNSUP, b"unsupported option"),
            }
            s.write_all(&out).await?;
        }
    }
}

/// Recycles request and reply buffers: a fresh 1 MiB allocation is an `mmap`
/// plus 256 page faults, which costs more than the copy it holds.
#[derive(Default)]
struct Pool(std::sync::Mutex<Vec<Vec<u8>>>);

impl Pool {
    const KEEP: usize = 64;
    /// Smaller buffers are cheap to allocate and not worth keeping.
    const MIN: usize = 64 << 10;

    /// A pooled buffer with room for `cap` bytes, if one exists.
    fn take(&self, cap: usize) -> Option<Vec<u8>> {
        if cap < Self::MIN {
            return None;
        }
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let i = p.iter().position(|v| v.capacity() >= cap)?;
        Some(p.swap_remove(i))
    }

    /// An empty buffer with room for `cap` bytes.
    fn empty(&self, cap: usize) -> Vec<u8> {
        let mut v = self.take(cap).unwrap_or_default();
        v.clear();
        v.reserve(cap);
        v
    }

    /// A buffer of exactly `len` bytes whose content the caller overwrites entirely.
    fn filled(&self, len: usize) -> Vec<u8> {
        let mut v = self.take(len).unwrap_or_default();
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0);
        }
        v
    }

    fn give(&self, v: Vec<u8>) {
        if v.capacity() >= Self::MIN && v.capacity() <= (MAX_PAYLOAD as usize) + 4096 {
            let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if p.len() < Self::KEEP {
                p.push(v);
            }
        }
    }
}

/// What the handshake settled.
struct Session {
    export: Arc<Export>,
    structured: bool,
    meta: bool,
    pool: Pool,
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|x| u16::from_be_bytes([x[0], x[1]]))
}

/// `NBD_OPT_INFO`/`GO` data: name and requested info types.
fn parse_info(d: &[u8]) -> Option<(String, Vec<u16>)> {
    let nlen = be_u32(d, 0)? as usize;
    let name = std::str::from_utf8(d.get(4..4usize.checked_add(nlen)?)?)
        .ok()?
        .to_string();
    let n = be_u16(d, 4 + nlen)? as usize;
    if d.len() != 6 + nlen + 2 * n {
        return None;
    }
    let wanted = (0..n)
        .map(|i| be_u16(d, 6 + nlen + 2 * i))
        .collect::<Option<Vec<_>>>()?;
    Some((name, wanted))
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data: export name and queries.
fn parse_meta(d: &[u8]) -> Option<(String, Vec<String>)> {
    let nlen = be_u32(d, 0)? as usize;
    let name = std::str::from_utf8(d.get(4..4usize.checked_add(nlen)?)?)
        .ok()?
        .to_string();
    let n = be_u32(d, 4 + nlen)? as usize;
    let mut at = 8 + nlen;
    let mut queries = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        let qlen = be_u32(d, at)? as usize;
        let q = std::str::from_utf8(d.get(at + 4..(at + 4).checked_add(qlen)?)?).ok()?;
        queries.push(q.to_string());
        at += 4 + qlen;
    }
    (at == d.len()).then_some((name, queries))
}

fn errno(e: &Error, write: bool) -> u32 {
    match e {
        Error::OutOfRange { .. } if write => ENOSPC,
        Error::OutOfRange { .. } | Error::Invalid { .. } => EINVAL,
        Error::ReadOnly { .. } => EPERM,
        Error::Unsupported { .. } => ENOTSUP,
        _ => EIO,
    }
}

/// The write side of a connection, shared by the requests in flight. A reply
/// finding the socket free is written at once, without a copy; one finding a
/// write in progress is queued, and the writer sends everything queued before
/// it lets go. A burst of completions thus goes out in one system call.
struct Replies<W> {
    out: Mutex<W>,
    /// Replies queued behind the current writer, and whether there is one.
    queued: std::sync::Mutex<(Vec<u8>, bool)>,
}

impl<W: AsyncWrite + Unpin> Replies<W> {
    fn new(w: W) -> Self {
        Replies {
            out: Mutex::new(w),
            queued: std::sync::Mutex::new((Vec::new(), false)),
        }
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, (Vec<u8>, bool)> {
        self.queued.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn send(&self, reply: &[u8]) -> io::Result<()> {
        {
            let mut q = self.queued();
            if q.1 {
                q.0.extend_from_slice(reply);
                return Ok(());
            }
            q.1 = true;
        }
        // Clears the writer flag however this future ends (error or drop),
        // so queued replies are never stranded behind a writer that is gone.
        struct Release<'a>(&'a std::sync::Mutex<(Vec<u8>, bool)>);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).1 = false;
            }
        }
        let release = Release(&self.queued);
        let mut w = self.out.lock().await;
        // Let the other requests that completed at the same moment (a
        // replicated volume's replica acknowledges a batch of writes at once)
        // queue their replies first, so they leave in this write instead of
        // one system call each. Costs one trip through the scheduler when
        // nothing else is ready.
        tokio::task::yield_now().await;
        let mut batch = std::mem::take(&mut self.queued().0);
        if batch.is_empty() {
            w.write_all(reply).await?;
        } else if reply.len() <= 64 << 10 {
            // Replies may go out in any order (the client matches cookies).
            batch.extend_from_slice(reply);
            w.write_all(&batch).await?;
            batch.clear();
        } else {
            w.write_all(reply).await?;
            w.write_all(&batch).await?;
            batch.clear();
        }
        loop {
            {
                let mut q = self.queued();
                if q.0.is_empty() {
                    q.1 = false;
                    std::mem::forget(release);
                    return Ok(());
                }
                std::mem::swap(&mut q.0, &mut batch);
            }
            w.write_all(&batch).await?;
            batch.clear();
        }
    }
}

async fn transmission<R, W>(rd: R, wr: W, session: Session) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let wr = Arc::new(Replies::new(wr));
    let session = Arc::new(session);
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let mut header = [0u8; REQUEST_LEN];
    let result = loop {
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
        if let Err(e) = rd.read_exact(&mut header).await {
            break if e.kind() == io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e)
            };
        }
        let Some(req) = Request::parse(&header) else {
            break Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad request magic",
            ));
        };
        if req.kind == CMD_DISC {
            break Ok(());
        }
        let mut payload = Vec::new();
        if req.kind == CMD_WRITE {
            if req.length > MAX_PAYLOAD {
                // We cannot trust the stream any more: close it.
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "write payload too large",
                ));
            }
            payload = session.pool.filled(req.length as usize);
            if let Err(e) = rd.read_exact(&mut payload).await {
                break Err(e);
            }
        }
        // Nothing else in flight and nothing more queued: serve inline, which saves
        // a task spawn and two thread hand-offs on every request at queue depth 1.
        // Large requests go to a task so the socket keeps being read meanwhile.
        if tasks.is_empty() && rd.buffer().is_empty() && req.length <= INLINE_MAX {
            let reply = handle(&session, req, payload).await;
            let r = wr.send(&reply).await;
            session.pool.give(reply);
            if let Err(e) = r {
                break Err(e);
            }
            continue;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break Ok(());
        };
        let (session, wr) = (session.clone(), wr.clone());
        tasks.spawn(async move {
            let reply = handle(&session, req, payload).await;
            drop(permit);
            // A failed write means the client is gone; the read side notices.
            let _ = wr.send(&reply).await;
            session.pool.give(reply);
        });
    };
    while tasks.join_next().await.is_some() {}
    let _ = wr.out.lock().await.shutdown().await;
    result
}

/// Serves one request and returns the whole reply, ready for a single write.
async fn handle(s: &Session, req: Request, payload: Vec<u8>) -> Vec<u8> {
    let dev = &*s.export.device;
    let simple = |r: Result<()>, write: bool| {
        let mut out = Vec::with_capacity(16);
        simple_reply(
            &mut out,
            r.as_ref().map_or_else(|e| errno(e, write), |_| 0),
            req.cookie,
        );
        out
    };
    let ro = s.export.read_only();
    match req.kind {
        CMD_READ => read(s, req).await,
        CMD_WRITE if ro => simple(
            Err(Error::ReadOnly {
                what: "export".into(),
            }),
            true,
        ),
        CMD_WRITE => {
            let flags = WriteFlags {
                fua: req.flags & CMD_FLAG_FUA != 0,
            };
            let r = dev.write_at(&payload, req.offset, flags).await;
            s.pool.give(payload);
            simple(r, true)
        }
        CMD_FLUSH => simple(dev.flush().await, false),
        CMD_TRIM if ro => simple(
            Err(Error::ReadOnly {
                what: "export".into(),
            }),
            true,
        ),
        CMD_TRIM => {
            let mut r = dev.discard(req.offset, u64::from(req.length)).await;
            if r.is_ok() && req.flags & CMD_FLAG_FUA != 0 {
                r = dev.flush().await;
            }
            simple(r, true)
        }
        CMD_WRITE_ZEROES if ro => simple(
            Err(Error::ReadOnly {
                what: "export".into(),
            }),
            true,
        ),
        CMD_WRITE_ZEROES => {
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && !dev.capabilities().write_zeroes {
                let mut out = Vec::new();
                simple_reply(&mut out, ENOTSUP, req.cookie);
                return out;
            }
            let flags = ZeroFlags {
                fua: req.flags & CMD_FLAG_FUA != 0,
                no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
            };
            simple(
                dev.write_zeroes(req.offset, u64::from(req.length), flags)
                    .await,
                true,
            )
        }
        CMD_CACHE => simple(
            check_range(req.offset, u64::from(req.length), dev.size()),
            false,
        ),
        CMD_BLOCK_STATUS => block_status(s, req).await,
        _ => simple(Err(Error::invalid("command", "unknown")), false),
    }
}

async fn read(s: &Session, req: Request) -> Vec<u8> {
    let dev = &*s.export.device;
    let len = u64::from(req.length);
    let fail = |e: u32, msg: &str| {
        let mut out = Vec::new();
        if s.structured {
            error_chunk(&mut out, req.cookie, e, msg);
        } else {
            simple_reply(&mut out, e, req.cookie);
        }
        out
    };
    if req.length > MAX_PAYLOAD {
        return fail(EINVAL, "read too large");
    }
    if check_range(req.offset, len, dev.size()).is_err() {
        return fail(EINVAL, "read past the end of the export");
    }
    if !s.structured {
        let mut out = s.pool.filled(16 + req.length as usize);
        let mut header = Vec::with_capacity(16);
        simple_reply(&mut header, 0, req.cookie);
        out[..16].copy_from_slice(&header);
        return match dev.read_at(&mut out[16..], req.offset).await {
            Ok(()) => out,
            Err(e) => fail(errno(&e, false), &e.to_string()),
        };
    }
    // Structured: holes as OFFSET_HOLE chunks, data as OFFSET_DATA, one write.
    let mut segs: Vec<(u64, u64, bool)> = Vec::new();
    if len == 0 {
        let mut out = Vec::new();
        chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
        return out;
    }
    // Small reads go out as one data chunk: looking up their allocation
    // costs more than the zeroes of a hole on the wire (for a replicated
    // volume it is a second engine round per read).
    if dev.capabilities().block_status && req.flags & CMD_FLAG_DF == 0 && len >= SPARSE_READ_MIN {
        let mut pos = req.offset;
        let end = req.offset + len;
        while pos < end {
            match dev.block_status(pos, end - pos).await {
                Ok(ext) if !ext.is_empty() => {
                    for e in ext {
                        let a = e.offset.max(pos);
                        let b = e.end().min(end);
                        if b > a {
                            let hole = e.kind != ExtentKind::Data;
                            match segs.last_mut() {
                                Some(l) if l.2 == hole && l.0 + l.1 == a => l.1 += b - a,
                                _ => segs.push((a, b - a, hole)),
                            }
                            pos = b;
                        }
                    }
                }
                _ => {
                    segs.push((pos, end - pos, false));
                    pos = end;
                }
            }
        }
    } else {
        segs.push((req.offset, len, false));
    }
    let data_bytes: u64 = segs.iter().filter(|s| !s.2).map(|s| s.1).sum();
    let mut out = s.pool.empty(segs.len() * 32 + data_bytes as usize);
    let last = segs.len() - 1;
    for (i, (off, n, hole)) in segs.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        if hole {
            chunk_header(&mut out, flags, REPLY_TYPE_OFFSET_HOLE, req.cookie, 12);
            out.extend_from_slice(&off.to_be_bytes());
            out.extend_from_slice(&(n as u32).to_be_bytes());
        } else {
            chunk_header(
                &mut out,
                flags,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + n as u32,
            );
            out.extend_from_slice(&off.to_be_bytes());
            let at = out.len();
            out.resize(at + n as usize, 0);
            if let Err(e) = dev.read_at(&mut out[at..], off).await {
                return fail(errno(&e, false), &e.to_string());
            }
        }
    }
    out
}

async fn block_status(s: &Session, req: Request) -> Vec<u8> {
    let dev = &*s.export.device;
    let mut out = Vec::new();
    if !s.structured || !s.meta {
        if s.structured {
            error_chunk(
                &mut out,
                req.cookie,
                EINVAL,
                "no metadata context negotiated",
            );
        } else {
            simple_reply(&mut out, EINVAL, req.cookie);
        }
        return out;
    }
    let len = u64::from(req.length);
    if len == 0 || check_range(req.offset, len, dev.size()).is_err() {
        error_chunk(
            &mut out,
            req.cookie,
            EINVAL,
            "block status range outside the export",
        );
        return out;
    }
    let extents = if dev.capabilities().block_status {
        match dev.block_status(req.offset, len).await {
            Ok(e) if !e.is_empty() => e,
            Ok(_) => vec![hci_core::block::Extent {
                offset: req.offset,
                len,
                kind: ExtentKind::Data,
            }],
            Err(e) => {
                error_chunk(&mut out, req.cookie, errno(&e, false), &e.to_string());
                return out;
            }
        }
    } else {
        vec![hci_core::block::Extent {
            offset: req.offset,
            len,
            kind: ExtentKind::Data,
        }]
    };
    let take = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        extents.len().min(1 << 16)
    };
    let mut descs = Vec::with_capacity(take * 8);
    for e in extents.iter().take(take) {
        let flags = match e.kind {
            ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
            ExtentKind::Zero => STATE_ZERO,
            ExtentKind::Data => 0,
        };
        descs.extend_from_slice(&(e.len.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        descs.extend_from_slice(&flags.to_be_bytes());
    }
    chunk_header(
        &mut out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        req.cookie,
        4 + descs.len() as u32,
    );
    out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    out.extend_from_slice(&descs);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_parsers_reject_garbage() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(parse_info(&d), Some(("disk".into(), vec![INFO_NAME])));
        assert_eq!(parse_info(&d[..d.len() - 1]), None);
        assert_eq!(parse_info(&u32::MAX.to_be_bytes()), None);
        assert_eq!(parse_meta(&[0, 0, 0, 9]), None);
        let mut m = 0u32.to_be_bytes().to_vec();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(
            parse_meta(&m),
            Some((String::new(), vec![BASE_ALLOCATION.to_string()]))
        );
        assert!("unix:/tmp/x".parse::<Listen>().is_ok());
        assert!("127.0.0.1:10809".parse::<Listen>().is_ok());
        assert!("nonsense".parse::<Listen>().is_err());
    }
}
