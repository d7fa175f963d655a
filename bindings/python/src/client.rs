//! The daemon client: a thin layer over hci-daemon's gRPC client. Resources
//! cross as their JSON documents; `hci.client` (Python) turns them into
//! typed objects.

use std::collections::HashMap;
use std::time::Duration;

use hci_daemon::cli::client::{Client as GrpcClient, ConnectOptions, Kind, Transport};
use hci_daemon::proto;
use hci_daemon::proto::backup_service_client::BackupServiceClient;
use hci_daemon::proto::backup_target_service_client::BackupTargetServiceClient;
use hci_daemon::proto::image_service_client::ImageServiceClient;
use hci_daemon::proto::network_service_client::NetworkServiceClient;
use hci_daemon::proto::node_service_client::NodeServiceClient;
use hci_daemon::proto::schedule_service_client::ScheduleServiceClient;
use hci_daemon::proto::snapshot_service_client::SnapshotServiceClient;
use hci_daemon::proto::virtual_machine_service_client::VirtualMachineServiceClient;
use hci_daemon::proto::virtual_machine_snapshot_service_client::VirtualMachineSnapshotServiceClient;
use hci_daemon::proto::volume_service_client::VolumeServiceClient;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::error::{HciError, InvalidSpec, StatusResultExt, from_connect};
use crate::runtime::wait;

/// Runs `$body` with `$c` bound to the generated client of `$kind`.
macro_rules! with_client {
    ($t:expr, $kind:expr, |$c:ident| $body:expr) => {
        match $kind {
            Kind::Vm => {
                let mut $c = VirtualMachineServiceClient::new($t);
                $body
            }
            Kind::Volume => {
                let mut $c = VolumeServiceClient::new($t);
                $body
            }
            Kind::Image => {
                let mut $c = ImageServiceClient::new($t);
                $body
            }
            Kind::Network => {
                let mut $c = NetworkServiceClient::new($t);
                $body
            }
            Kind::Snapshot => {
                let mut $c = SnapshotServiceClient::new($t);
                $body
            }
            Kind::Backup => {
                let mut $c = BackupServiceClient::new($t);
                $body
            }
            Kind::BackupTarget => {
                let mut $c = BackupTargetServiceClient::new($t);
                $body
            }
            Kind::Schedule => {
                let mut $c = ScheduleServiceClient::new($t);
                $body
            }
            Kind::Node => {
                let mut $c = NodeServiceClient::new($t);
                $body
            }
            Kind::VmSnapshot => {
                let mut $c = VirtualMachineSnapshotServiceClient::new($t);
                $body
            }
        }
    };
}

fn kind(name: &str) -> PyResult<Kind> {
    Kind::from_model(name)
        .or_else(|| name.parse().ok())
        .ok_or_else(|| InvalidSpec::new_err(format!("unknown resource kind {name:?}")))
}

/// One resource as the daemon returned it: `(json, resource_version)`.
type Doc = (String, u64);

fn doc(r: proto::Resource) -> Doc {
    (r.json, r.resource_version)
}

/// A connection to hci-daemon (`unix:PATH`, `unix:///PATH` or
/// `https://HOST:PORT` with a token). Low level: resources are JSON
/// strings; use `hci.Client` for typed objects.
#[pyclass(frozen, module = "hci._hci")]
#[derive(Debug)]
pub struct RawClient {
    server: String,
    transport: Transport,
}

impl RawClient {
    fn t(&self) -> Transport {
        self.transport.clone()
    }
}

#[pymethods]
impl RawClient {
    /// Connects to the daemon at `server`.
    #[new]
    #[pyo3(signature = (server, *, token = None, ca_pem = None))]
    fn new(
        py: Python<'_>,
        server: &str,
        token: Option<String>,
        ca_pem: Option<PyBackedBytes>,
    ) -> PyResult<Self> {
        // `unix:///run/hci.sock` (URI form) and `unix:/run/hci.sock` both work.
        let server = match server.strip_prefix("unix://") {
            Some(path) if path.starts_with('/') => format!("unix:{path}"),
            _ => server.to_string(),
        };
        let options = ConnectOptions {
            token,
            ca_pem: ca_pem.map(|p| p.to_vec()),
        };
        let s = server.clone();
        let client = wait(py, async move { GrpcClient::connect(&s, options).await })?
            .map_err(from_connect)?;
        Ok(RawClient {
            server,
            transport: client.transport().clone(),
        })
    }

    /// The server address.
    #[getter]
    fn server(&self) -> &str {
        &self.server
    }

    /// Reads one resource: `(json, resource_version)`.
    fn get(&self, py: Python<'_>, kind_name: &str, name: &str) -> PyResult<Doc> {
        let k = kind(kind_name)?;
        let req = proto::GetRequest {
            name: name.to_string(),
        };
        let t = self.t();
        let r = wait(py, async move {
            with_client!(t, k, |c| c.get(req).await.map(|r| r.into_inner()))
        })?
        .py_err()?;
        Ok(doc(r))
    }

    /// Lists resources of a kind with all of `labels`: `([json, …], revision)`.
    #[pyo3(signature = (kind_name, labels = None))]
    fn list(
        &self,
        py: Python<'_>,
        kind_name: &str,
        labels: Option<HashMap<String, String>>,
    ) -> PyResult<(Vec<Doc>, u64)> {
        let k = kind(kind_name)?;
        let req = proto::ListRequest {
            label_selector: labels.unwrap_or_default(),
        };
        let t = self.t();
        let r = wait(py, async move {
            with_client!(t, k, |c| c.list(req).await.map(|r| r.into_inner()))
        })?
        .py_err()?;
        Ok((r.items.into_iter().map(doc).collect(), r.revision))
    }

    /// Creates a resource from its JSON document.
    fn create(&self, py: Python<'_>, kind_name: &str, json: String) -> PyResult<Doc> {
        let k = kind(kind_name)?;
        let req = proto::CreateRequest { json };
        let t = self.t();
        let r = wait(py, async move {
            with_client!(t, k, |c| c.create(req).await.map(|r| r.into_inner()))
        })?
        .py_err()?;
        Ok(doc(r))
    }

    /// Replaces a resource's metadata and spec if it still has
    /// `resource_version` (0: the document's metadata.resourceVersion).
    #[pyo3(signature = (kind_name, json, resource_version = 0))]
    fn update(
        &self,
        py: Python<'_>,
        kind_name: &str,
        json: String,
        resource_version: u64,
    ) -> PyResult<Doc> {
        let k = kind(kind_name)?;
        let req = proto::UpdateRequest {
            json,
            resource_version,
        };
        let t = self.t();
        let r = wait(py, async move {
            with_client!(t, k, |c| c.update(req).await.map(|r| r.into_inner()))
        })?
        .py_err()?;
        Ok(doc(r))
    }

    /// Deletes a resource (only if it still has `resource_version`, unless 0);
    /// returns the store revision of the deletion.
    #[pyo3(signature = (kind_name, name, resource_version = 0))]
    fn delete(
        &self,
        py: Python<'_>,
        kind_name: &str,
        name: &str,
        resource_version: u64,
    ) -> PyResult<u64> {
        let k = kind(kind_name)?;
        let req = proto::DeleteRequest {
            name: name.to_string(),
            resource_version,
        };
        let t = self.t();
        let r = wait(py, async move {
            with_client!(t, k, |c| c.delete(req).await.map(|r| r.into_inner()))
        })?
        .py_err()?;
        Ok(r.revision)
    }

    /// Follows changes to a kind (or to resource `name`), from store
    /// revision `from_revision` (0: from now on).
    #[pyo3(signature = (kind_name, name = None, from_revision = 0))]
    fn watch(
        &self,
        py: Python<'_>,
        kind_name: &str,
        name: Option<String>,
        from_revision: u64,
    ) -> PyResult<WatchStream> {
        let k = kind(kind_name)?;
        let req = proto::WatchRequest {
            from_revision,
            name: name.unwrap_or_default(),
        };
        let t = self.t();
        let s = wait(py, async move {
            with_client!(t, k, |c| c.watch(req).await.map(|r| r.into_inner()))
        })?
        .py_err()?;
        Ok(WatchStream {
            stream: Mutex::new(Some(s)),
        })
    }

    /// A power action on VM `name`: `start`, `stop`, `restart`, `pause` or
    /// `resume`. Returns the updated VM.
    #[pyo3(signature = (action, name, resource_version = 0))]
    fn vm_action(
        &self,
        py: Python<'_>,
        action: &str,
        name: &str,
        resource_version: u64,
    ) -> PyResult<Doc> {
        let req = proto::VmActionRequest {
            name: name.to_string(),
            resource_version,
        };
        let mut c = VirtualMachineServiceClient::new(self.t());
        let action = action.to_string();
        let r = wait(py, async move {
            match action.as_str() {
                "start" => c.start(req).await,
                "stop" => c.stop(req).await,
                "restart" => c.restart(req).await,
                "pause" => c.pause(req).await,
                "resume" => c.resume(req).await,
                other => Err(tonic::Status::invalid_argument(format!(
                    "unknown VM action {other:?}: use start, stop, restart, pause or resume"
                ))),
            }
            .map(|r| r.into_inner())
        })?
        .py_err()?;
        Ok(doc(r))
    }

    /// Asks for a live migration of VM `name` (to `target_node`, or the
    /// best node when empty), or with `cancel` for the cancel of the one
    /// under way. Returns the updated VM; the migration's progress and
    /// outcome appear in its `status.migration`.
    #[pyo3(signature = (name, target_node = "", cancel = false, resource_version = 0))]
    fn migrate_vm(
        &self,
        py: Python<'_>,
        name: &str,
        target_node: &str,
        cancel: bool,
        resource_version: u64,
    ) -> PyResult<Doc> {
        let req = proto::MigrateVmRequest {
            name: name.to_string(),
            target_node: target_node.to_string(),
            resource_version,
            cancel,
        };
        let mut c = VirtualMachineServiceClient::new(self.t());
        let r = wait(
            py,
            async move { c.migrate(req).await.map(|r| r.into_inner()) },
        )?
        .py_err()?;
        Ok(doc(r))
    }

    /// Snapshots volume `volume` as Snapshot resource `snapshot`.
    #[pyo3(signature = (volume, snapshot, labels = None))]
    fn snapshot_volume(
        &self,
        py: Python<'_>,
        volume: &str,
        snapshot: &str,
        labels: Option<HashMap<String, String>>,
    ) -> PyResult<Doc> {
        let req = proto::SnapshotVolumeRequest {
            volume: volume.to_string(),
            snapshot: snapshot.to_string(),
            labels: labels.unwrap_or_default(),
        };
        let mut c = VolumeServiceClient::new(self.t());
        let r = wait(py, async move { c.snapshot_volume(req).await })?.py_err()?;
        Ok(doc(r.into_inner()))
    }

    /// Creates volume `name` with the content of volume `volume`.
    fn clone_volume(&self, py: Python<'_>, volume: &str, name: &str) -> PyResult<Doc> {
        let req = proto::CloneVolumeRequest {
            volume: volume.to_string(),
            name: name.to_string(),
        };
        let mut c = VolumeServiceClient::new(self.t());
        let r = wait(py, async move { c.clone_volume(req).await })?.py_err()?;
        Ok(doc(r.into_inner()))
    }

    /// Grows volume `volume` to `size` bytes.
    #[pyo3(signature = (volume, size, resource_version = 0))]
    fn expand_volume(
        &self,
        py: Python<'_>,
        volume: &str,
        size: u64,
        resource_version: u64,
    ) -> PyResult<Doc> {
        let req = proto::ExpandVolumeRequest {
            volume: volume.to_string(),
            size,
            resource_version,
        };
        let mut c = VolumeServiceClient::new(self.t());
        let r = wait(py, async move { c.expand_volume(req).await })?.py_err()?;
        Ok(doc(r.into_inner()))
    }

    /// Restores backup `backup` into new volume `volume` (`size` 0: the
    /// backup's size), or a whole-VM backup as new VM `vm`.
    #[pyo3(signature = (backup, volume, size = 0, vm = ""))]
    fn restore_backup(
        &self,
        py: Python<'_>,
        backup: &str,
        volume: &str,
        size: u64,
        vm: &str,
    ) -> PyResult<Doc> {
        let req = proto::RestoreBackupRequest {
            backup: backup.to_string(),
            volume: volume.to_string(),
            size,
            vm: vm.to_string(),
        };
        let mut c = BackupServiceClient::new(self.t());
        let r = wait(py, async move { c.restore_backup(req).await })?.py_err()?;
        Ok(doc(r.into_inner()))
    }

    /// Restores VirtualMachineSnapshot `snapshot` as new VM `vm`.
    fn restore_vm_snapshot(&self, py: Python<'_>, snapshot: &str, vm: &str) -> PyResult<Doc> {
        let req = proto::RestoreVmSnapshotRequest {
            snapshot: snapshot.to_string(),
            vm: vm.to_string(),
        };
        let mut c = VirtualMachineSnapshotServiceClient::new(self.t());
        let r = wait(py, async move { c.restore_vm_snapshot(req).await })?.py_err()?;
        Ok(doc(r.into_inner()))
    }

    /// Attaches to the serial console of VM `name`.
    fn console(&self, py: Python<'_>, name: &str) -> PyResult<ConsoleStream> {
        let (tx, rx) = mpsc::channel::<proto::ConsoleInput>(64);
        let first = proto::ConsoleInput {
            name: name.to_string(),
            data: Vec::new(),
        };
        let mut c = VirtualMachineServiceClient::new(self.t());
        let out = wait(py, async move {
            tx.send(first)
                .await
                .map_err(|_| tonic::Status::cancelled("console input closed"))?;
            let out = c.console(ReceiverStream::new(rx)).await?.into_inner();
            Ok::<_, tonic::Status>((out, tx))
        })?
        .py_err()?;
        Ok(ConsoleStream {
            vm: name.to_string(),
            output: Mutex::new(Some(out.0)),
            input: std::sync::Mutex::new(Some(out.1)),
        })
    }

    fn __repr__(&self) -> String {
        format!("RawClient({:?})", self.server)
    }
}

/// A stream of watch events: iterate to get `(type, name, json,
/// resource_version, revision)` tuples, `type` being `"PUT"` or `"DELETE"`
/// (whose `json` may be empty).
#[pyclass(frozen, module = "hci._hci")]
#[derive(Debug)]
pub struct WatchStream {
    stream: Mutex<Option<Streaming<proto::WatchEvent>>>,
}

/// One watch event: `(type, name, json, resource_version, store_revision)`.
type Event = (&'static str, String, String, u64, u64);

#[pymethods]
impl WatchStream {
    /// The next event, waiting at most `timeout` seconds (None: forever);
    /// None on timeout or when the stream has ended.
    #[pyo3(signature = (timeout = None))]
    fn next(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Event>> {
        let limit = timeout.map(|t| Duration::from_secs_f64(t.max(0.0)));
        let r = wait(py, async {
            let mut guard = self.stream.lock().await;
            let Some(s) = guard.as_mut() else {
                return Ok(None);
            };
            let msg = match limit {
                Some(l) => match tokio::time::timeout(l, s.message()).await {
                    Ok(m) => m,
                    Err(_) => return Ok(None),
                },
                None => s.message().await,
            };
            match msg {
                Ok(Some(ev)) => Ok(Some(ev)),
                Ok(None) => {
                    *guard = None;
                    Ok(None)
                }
                Err(e) => {
                    *guard = None;
                    Err(e)
                }
            }
        })?
        .py_err()?;
        Ok(r.map(|ev| {
            let t = match proto::watch_event::Type::try_from(ev.r#type) {
                Ok(proto::watch_event::Type::Delete) => "DELETE",
                _ => "PUT",
            };
            let (name, json, rv) = ev.resource.map_or((String::new(), String::new(), 0), |r| {
                (r.name, r.json, r.resource_version)
            });
            (t, name, json, rv, ev.revision)
        }))
    }

    /// Ends the watch.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        wait(py, async {
            *self.stream.lock().await = None;
        })
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Event>> {
        self.next(py, None)
    }
}

/// A serial console session: `read()` guest output, `write()` keystrokes.
#[pyclass(frozen, module = "hci._hci")]
#[derive(Debug)]
pub struct ConsoleStream {
    vm: String,
    output: Mutex<Option<Streaming<proto::ConsoleOutput>>>,
    input: std::sync::Mutex<Option<mpsc::Sender<proto::ConsoleInput>>>,
}

#[pymethods]
impl ConsoleStream {
    /// The next chunk of console output, waiting at most `timeout` seconds
    /// (None: forever). Returns `b""` on timeout; None once the console closed.
    #[pyo3(signature = (timeout = None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let limit = timeout.map(|t| Duration::from_secs_f64(t.max(0.0)));
        let r = wait(py, async {
            let mut guard = self.output.lock().await;
            let Some(s) = guard.as_mut() else {
                return Ok(None);
            };
            let msg = match limit {
                Some(l) => match tokio::time::timeout(l, s.message()).await {
                    Ok(m) => m,
                    Err(_) => return Ok(Some(Vec::new())),
                },
                None => s.message().await,
            };
            match msg {
                Ok(Some(out)) => Ok(Some(out.data)),
                Ok(None) => {
                    *guard = None;
                    Ok(None)
                }
                Err(e) => {
                    *guard = None;
                    Err(e)
                }
            }
        })?
        .py_err()?;
        Ok(r.map(|d| PyBytes::new(py, &d)))
    }

    /// Sends `data` to the guest's serial port.
    fn write(&self, py: Python<'_>, data: PyBackedBytes) -> PyResult<()> {
        let tx = self
            .input
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| HciError::new_err(format!("the console of {:?} is closed", self.vm)))?;
        let msg = proto::ConsoleInput {
            name: String::new(),
            data: data.to_vec(),
        };
        wait(py, async move { tx.send(msg).await })?
            .map_err(|_| HciError::new_err(format!("the console of {:?} is closed", self.vm)))
    }

    /// Closes the session (the VM keeps running).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.input.lock().unwrap_or_else(|e| e.into_inner()).take();
        wait(py, async {
            *self.output.lock().await = None;
        })
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        self.read(py, None)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<Bound<'_, PyAny>>,
        _exc: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("ConsoleStream(vm={:?})", self.vm)
    }
}
