//! The Tokio runtime every call runs on, and the helpers that run Rust
//! futures from Python with the GIL released.

use std::future::Future;
use std::pin::pin;
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::error::HciError;

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// How often a long wait wakes up to let Python handle signals (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// The process-wide runtime (two worker threads: the module shares the
/// machine with the interpreter).
pub fn runtime() -> PyResult<&'static Runtime> {
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hci-python")
            .enable_all()
            .build()
            .map_err(|e| format!("failed to start the Tokio runtime: {e}"))
    });
    rt.as_ref().map_err(|e| HciError::new_err(e.clone()))
}

/// Runs a short future to completion with the GIL released (block I/O,
/// metadata calls).
pub fn run<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let rt = runtime()?;
    Ok(py.detach(|| rt.block_on(fut)))
}

/// Runs a possibly long future (backups, restores, RPCs, watches) with the
/// GIL released, waking every 100 ms to check for signals: Ctrl-C raises
/// `KeyboardInterrupt` and drops (cancels) the future.
pub fn wait<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let rt = runtime()?;
    let mut fut = pin!(fut);
    loop {
        let step = py.detach(|| {
            rt.block_on(async { tokio::time::timeout(SIGNAL_CHECK, fut.as_mut()).await })
        });
        match step {
            Ok(out) => return Ok(out),
            Err(_) => py.check_signals()?,
        }
    }
}
