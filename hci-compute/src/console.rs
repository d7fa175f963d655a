//! The serial console stream: history, live subscribers, optional log file.
//!
//! Guest output goes into a [`ConsoleHub`]: a bounded ring of recent history,
//! any number of attached readers (each an [`AsyncRead`]) and an optional log
//! file. Readers may attach and detach at any time; a reader that falls more
//! than [`SUBSCRIBER_BACKLOG`] chunks behind loses output rather than stalling
//! the guest.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

/// Bytes of output history kept for late readers.
pub const HISTORY_BYTES: usize = 64 * 1024;
/// Chunks a slow reader may lag before output is dropped for it.
pub const SUBSCRIBER_BACKLOG: usize = 4096;

/// Where guest input goes; returns how many bytes were accepted.
pub type InputSink = Box<dyn Fn(&[u8]) -> usize + Send + Sync>;

#[derive(Default)]
struct Inner {
    closed: bool,
    history: VecDeque<u8>,
    total: u64,
    subscribers: Vec<mpsc::Sender<Vec<u8>>>,
    log: Option<File>,
}

/// Fan-out of one serial port's output, and the way back in.
pub struct ConsoleHub {
    inner: Mutex<Inner>,
    grew: Condvar,
    first_output: OnceLock<Instant>,
    input: OnceLock<InputSink>,
}

impl fmt::Debug for ConsoleHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleHub")
            .field("total", &self.total_bytes())
            .finish_non_exhaustive()
    }
}

impl ConsoleHub {
    /// A hub that also appends output to `log`, if given.
    pub fn new(log: Option<File>) -> Arc<Self> {
        Arc::new(ConsoleHub {
            inner: Mutex::new(Inner {
                log,
                ..Default::default()
            }),
            grew: Condvar::new(),
            first_output: OnceLock::new(),
            input: OnceLock::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets where console input goes (once).
    pub fn set_input(&self, sink: InputSink) {
        let _ = self.input.set(sink);
    }

    /// Records guest output.
    pub fn push(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let _ = self.first_output.set(Instant::now());
        let mut inner = self.lock();
        inner.total += bytes.len() as u64;
        inner.history.extend(bytes);
        let excess = inner.history.len().saturating_sub(HISTORY_BYTES);
        inner.history.drain(..excess);
        inner.subscribers.retain(|s| {
            !matches!(
                s.try_send(bytes.to_vec()),
                Err(mpsc::error::TrySendError::Closed(_))
            )
        });
        if let Some(log) = inner.log.as_mut()
            && log.write_all(bytes).is_err()
        {
            inner.log = None;
        }
        drop(inner);
        self.grew.notify_all();
    }

    /// Recent output (up to [`HISTORY_BYTES`]).
    pub fn history(&self) -> Vec<u8> {
        self.lock().history.iter().copied().collect()
    }

    /// Bytes of output since the VM started.
    pub fn total_bytes(&self) -> u64 {
        self.lock().total
    }

    /// When the first output byte arrived.
    pub fn first_output(&self) -> Option<Instant> {
        self.first_output.get().copied()
    }

    /// Waits until the history contains `needle`; false on timeout.
    pub fn wait_for(&self, needle: &[u8], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        loop {
            let hay: Vec<u8> = inner.history.iter().copied().collect();
            if needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            inner = self
                .grew
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Ends every reader's stream (the VM stopped); later readers get the history, then the end.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.subscribers.clear();
    }

    /// Attaches a reader that starts with the current history.
    pub fn subscribe(self: &Arc<Self>) -> (ConsoleReader, ConsoleInput) {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BACKLOG);
        let mut inner = self.lock();
        let pending: Vec<u8> = inner.history.iter().copied().collect();
        if !inner.closed {
            inner.subscribers.push(tx);
        }
        (
            ConsoleReader {
                pending,
                pos: 0,
                rx,
            },
            ConsoleInput {
                hub: Arc::downgrade(self),
            },
        )
    }

    pub(crate) fn input(&self, bytes: &[u8]) -> usize {
        self.input.get().map_or(bytes.len(), |sink| sink(bytes))
    }
}

/// Guest output for one attached reader.
#[derive(Debug)]
pub struct ConsoleReader {
    pending: Vec<u8>,
    pos: usize,
    rx: mpsc::Receiver<Vec<u8>>,
}

impl AsyncRead for ConsoleReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.pos < self.pending.len() {
                let n = buf.remaining().min(self.pending.len() - self.pos);
                let start = self.pos;
                buf.put_slice(&self.pending[start..start + n]);
                self.pos += n;
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => {
                    self.pending = chunk;
                    self.pos = 0;
                }
                // The VM is gone: end of stream.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Guest input from one attached writer.
#[derive(Debug)]
pub struct ConsoleInput {
    hub: Weak<ConsoleHub>,
}

impl AsyncWrite for ConsoleInput {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(hub) = self.hub.upgrade() else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the VM is gone",
            )));
        };
        match hub.input(buf) {
            0 if !buf.is_empty() => {
                // The UART FIFO is full; try again shortly.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            n => Poll::Ready(Ok(n)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// `io::Write` into a hub (the UART's transmitter).
#[derive(Debug, Clone)]
pub struct HubWriter(pub Arc<ConsoleHub>);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn late_reader_gets_history_then_live_output() {
        let hub = ConsoleHub::new(None);
        hub.push(b"early ");
        let (mut reader, _input) = hub.subscribe();
        hub.push(b"late");
        let mut buf = vec![0u8; 10];
        reader.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"early late");
        assert!(hub.wait_for(b"y l", Duration::from_millis(1)));
        assert!(!hub.wait_for(b"never", Duration::from_millis(1)));
        assert_eq!(hub.total_bytes(), 10);
    }

    #[tokio::test]
    async fn close_ends_every_stream() {
        let hub = ConsoleHub::new(None);
        let (mut early, _) = hub.subscribe();
        hub.push(b"bye");
        hub.close();
        let (mut late, _) = hub.subscribe();
        for reader in [&mut early, &mut late] {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).await.unwrap();
            assert_eq!(all, b"bye");
        }
    }

    #[test]
    fn history_is_bounded() {
        let hub = ConsoleHub::new(None);
        hub.push(&vec![b'a'; HISTORY_BYTES]);
        hub.push(b"tail");
        let h = hub.history();
        assert_eq!(h.len(), HISTORY_BYTES);
        assert!(h.ends_with(b"tail"));
    }

    #[tokio::test]
    async fn input_reaches_the_sink() {
        let hub = ConsoleHub::new(None);
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        hub.set_input(Box::new(move |b| {
            g.lock().unwrap().extend_from_slice(b);
            b.len()
        }));
        let (_r, mut input) = hub.subscribe();
        input.write_all(b"ls\n").await.unwrap();
        assert_eq!(&*got.lock().unwrap(), b"ls\n");
    }
}
