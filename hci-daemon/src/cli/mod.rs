//! `hcictl`: the command-line client of hci-daemon.
//!
//! Each subcommand is a function here; `src/bin/hcictl.rs` only parses the
//! command line. Errors are [`CliError`]s whose messages are meant for the
//! person at the terminal.

pub mod client;
pub mod migrate;
pub mod node;
pub mod output;
pub mod wait;

use std::io::{IsTerminal, Read, Write};
use std::path::Path;

use chrono::Utc;
use futures::StreamExt;
use hci_core::model::{AnyResource, ByteSize};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tonic::{Code, Status};

pub use self::client::{Client, ConnectError, ConnectOptions, DEFAULT_SERVER, Kind};
pub use self::output::Format;
use crate::proto;

/// An error for the user: printed as `error: …`, exit status 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The daemon could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The daemon refused or failed a call.
    #[error("{0}")]
    Api(String),
    /// Bad input (files, arguments).
    #[error("{0}")]
    Input(String),
    /// What was asked for did not happen (a backup failed, a wait timed out).
    #[error("{0}")]
    Failed(String),
}

/// Explains a gRPC status in words.
pub fn explain(what: &str, s: &Status) -> CliError {
    let msg = s.message();
    CliError::Api(match s.code() {
        Code::NotFound => format!("{what}: not found: {msg}"),
        Code::AlreadyExists => format!("{what}: already exists: {msg}"),
        Code::Aborted => format!("{what}: conflict: {msg}"),
        Code::InvalidArgument => format!("{what}: invalid: {msg}"),
        Code::FailedPrecondition => format!("{what}: not possible now: {msg}"),
        Code::Unavailable => format!("{what}: unavailable: {msg}"),
        Code::Unauthenticated | Code::PermissionDenied => format!("{what}: refused: {msg}"),
        _ => format!("{what}: {msg} ({:?})", s.code()),
    })
}

fn doc(r: &proto::Resource) -> Result<Value, CliError> {
    serde_json::from_str(&r.json)
        .map_err(|e| CliError::Api(format!("the daemon sent an unreadable document: {e}")))
}

/// `hcictl get KIND [NAME]`.
pub async fn get(
    c: &Client,
    kind: Kind,
    name: Option<&str>,
    format: Format,
) -> Result<String, CliError> {
    let (docs, many) = match name {
        Some(name) => {
            let r = c
                .get(kind, name)
                .await
                .map_err(|s| explain(&format!("{kind}/{name}"), &s))?;
            (vec![doc(&r)?], false)
        }
        None => {
            let list = c
                .list(kind)
                .await
                .map_err(|s| explain(&format!("list {kind}"), &s))?;
            let docs = list.items.iter().map(doc).collect::<Result<Vec<_>, _>>()?;
            (docs, true)
        }
    };
    match format {
        Format::Table => {
            if docs.is_empty() {
                Ok(format!("No {} found.\n", kind.name()))
            } else {
                Ok(output::table(kind, &docs, Utc::now()))
            }
        }
        other => output::documents(&docs, other, many).map_err(CliError::Input),
    }
}

/// `hcictl describe KIND NAME`: the resource, then its recent events.
pub async fn describe(c: &Client, kind: Kind, name: &str) -> Result<String, CliError> {
    let r = c
        .get(kind, name)
        .await
        .map_err(|s| explain(&format!("{kind}/{name}"), &s))?;
    let now = Utc::now();
    let mut out = output::describe(kind, &doc(&r)?, now);
    // An older daemon without the event service still describes.
    let events = c.events(Some(kind), Some(name)).await.unwrap_or_default();
    out.push_str("Events:\n");
    if events.is_empty() {
        out.push_str("  <none>\n");
    } else {
        out.push_str(&indent(&output::events(&events, false, now)));
    }
    Ok(out)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// `hcictl events [KIND [NAME]] [--watch]`.
pub async fn events(
    c: &Client,
    kind: Option<Kind>,
    name: Option<&str>,
    watch: bool,
) -> Result<String, CliError> {
    let what = match (kind, name) {
        (Some(k), Some(n)) => format!("events of {k}/{n}"),
        (Some(k), None) => format!("events of {k}"),
        _ => "events".to_string(),
    };
    let events = c.events(kind, name).await.map_err(|s| explain(&what, &s))?;
    let text = if events.is_empty() {
        format!("No {what} in the last hour.\n")
    } else {
        output::events(&events, kind.is_none() || name.is_none(), Utc::now())
    };
    if !watch {
        return Ok(text);
    }
    let mut stdout = std::io::stdout();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    let mut stream = c
        .watch_events(kind, name)
        .await
        .map_err(|s| explain(&what, &s))?;
    while let Some(e) = stream.next().await {
        let e = e.map_err(|s| explain(&what, &s))?;
        let table = output::events(&[e], true, Utc::now());
        // Only the row: the header came with the list.
        let row: String = table.lines().skip(1).map(|l| format!("{l}\n")).collect();
        if stdout
            .write_all(row.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            break;
        }
    }
    Ok(String::new())
}

/// Reads a file argument (`-` is standard input).
pub fn read_input(path: &Path) -> Result<String, CliError> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::Input(format!("cannot read standard input: {e}")))?;
        return Ok(s);
    }
    std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("cannot read {}: {e}", path.display())))
}

/// Parses YAML (one or more documents) or a JSON document.
pub fn parse_documents(text: &str, origin: &str) -> Result<Vec<AnyResource>, CliError> {
    let parsed = if text.trim_start().starts_with('{') {
        AnyResource::from_json(text).map(|r| vec![r])
    } else {
        AnyResource::from_yaml_multi(text)
    };
    let docs = parsed.map_err(|e| CliError::Input(format!("{origin}: {e}")))?;
    if docs.is_empty() {
        return Err(CliError::Input(format!("{origin}: no documents")));
    }
    Ok(docs)
}

/// What `apply` did to one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It did not exist.
    Created,
    /// It existed with another spec, labels or annotations.
    Configured,
    /// It already matched.
    Unchanged,
}

/// The parts of a document `apply` manages: metadata labels and
/// annotations, and the spec.
fn managed(v: &Value) -> (Value, Value, Value) {
    let get = |p: &str| v.pointer(p).cloned().unwrap_or(Value::Null);
    let nonempty = |x: Value| match x {
        Value::Object(m) if m.is_empty() => Value::Null,
        other => other,
    };
    (
        nonempty(get("/metadata/labels")),
        nonempty(get("/metadata/annotations")),
        get("/spec"),
    )
}

/// Creates or updates one resource so that it matches `r`. A concurrent
/// change (a controller writing the status) makes it read and try again.
pub async fn apply_one(c: &Client, r: &AnyResource) -> Result<Applied, CliError> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match apply_once(c, r).await {
            Err(Conflict::Retry(_)) if attempt < ATTEMPTS => continue,
            Err(Conflict::Retry(e) | Conflict::Fatal(e)) => return Err(e),
            Ok(applied) => return Ok(applied),
        }
    }
}

enum Conflict {
    Retry(CliError),
    Fatal(CliError),
}

impl From<CliError> for Conflict {
    fn from(e: CliError) -> Self {
        Conflict::Fatal(e)
    }
}

async fn apply_once(c: &Client, r: &AnyResource) -> Result<Applied, Conflict> {
    let kind = Kind::from_model(r.kind())
        .ok_or_else(|| CliError::Input(format!("unknown kind {}", r.kind())))?;
    let name = r.name().to_string();
    let what = format!("{kind}/{name}");
    let json = r.to_json().map_err(|e| CliError::Input(e.to_string()))?;
    let desired: Value = serde_json::from_str(&json).map_err(|e| CliError::Input(e.to_string()))?;
    match c.get(kind, &name).await {
        Err(s) if s.code() == Code::NotFound => match c.create(kind, json).await {
            Ok(_) => Ok(Applied::Created),
            // Created meanwhile by someone else: compare with theirs.
            Err(s) if s.code() == Code::AlreadyExists => Err(Conflict::Retry(explain(&what, &s))),
            Err(s) => Err(explain(&what, &s).into()),
        },
        Err(s) => Err(explain(&what, &s).into()),
        Ok(current) => {
            let current_doc = doc(&current)?;
            if managed(&current_doc) == managed(&desired) {
                return Ok(Applied::Unchanged);
            }
            // Keep the server's identity fields; take labels, annotations
            // and spec from the file.
            let mut next = current_doc.clone();
            let (labels, annotations, spec) = managed(&desired);
            if let Some(meta) = next.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert("labels".into(), labels);
                meta.insert("annotations".into(), annotations);
                meta.retain(|_, v| !v.is_null());
            }
            if let Some(obj) = next.as_object_mut() {
                obj.insert("spec".into(), spec);
                obj.remove("status");
            }
            match c
                .update(kind, next.to_string(), current.resource_version)
                .await
            {
                Ok(_) => Ok(Applied::Configured),
                Err(s) if s.code() == Code::Aborted => Err(Conflict::Retry(explain(&what, &s))),
                Err(s) => Err(explain(&what, &s).into()),
            }
        }
    }
}

/// `hcictl apply -f FILE`: prints one line per document.
pub async fn apply(c: &Client, text: &str, origin: &str) -> Result<String, CliError> {
    let docs = parse_documents(text, origin)?;
    let mut out = String::new();
    for r in &docs {
        let result = apply_one(c, r).await?;
        let kind = Kind::from_model(r.kind()).map_or(r.kind(), Kind::short);
        let verb = match result {
            Applied::Created => "created",
            Applied::Configured => "configured",
            Applied::Unchanged => "unchanged",
        };
        out.push_str(&format!("{kind}/{} {verb}\n", r.name()));
    }
    Ok(out)
}

/// `hcictl delete KIND NAME`.
pub async fn delete(c: &Client, kind: Kind, name: &str) -> Result<String, CliError> {
    c.delete(kind, name)
        .await
        .map_err(|s| explain(&format!("{kind}/{name}"), &s))?;
    Ok(format!("{kind}/{name} deleted\n"))
}

/// `hcictl delete -f FILE`: deletes every document's resource.
pub async fn delete_file(c: &Client, text: &str, origin: &str) -> Result<String, CliError> {
    let mut out = String::new();
    for r in parse_documents(text, origin)? {
        let kind = Kind::from_model(r.kind())
            .ok_or_else(|| CliError::Input(format!("unknown kind {}", r.kind())))?;
        out.push_str(&delete(c, kind, r.name()).await?);
    }
    Ok(out)
}

/// `hcictl edit KIND NAME`: opens the resource in `$EDITOR` and applies the
/// result, if it changed.
pub async fn edit(c: &Client, kind: Kind, name: &str) -> Result<String, CliError> {
    let what = format!("{kind}/{name}");
    let current = c.get(kind, name).await.map_err(|s| explain(&what, &s))?;
    let yaml =
        serde_norway::to_string(&doc(&current)?).map_err(|e| CliError::Input(e.to_string()))?;
    let dir = tempfile::tempdir().map_err(|e| CliError::Input(format!("temp dir: {e}")))?;
    let file = dir.path().join(format!("{}-{name}.yaml", kind.short()));
    std::fs::write(&file, &yaml).map_err(|e| CliError::Input(e.to_string()))?;
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(&file)
        .status()
        .map_err(|e| CliError::Input(format!("cannot run the editor {editor:?}: {e}")))?;
    if !status.success() {
        return Err(CliError::Input(format!(
            "the editor {editor:?} failed ({status}); nothing changed"
        )));
    }
    let edited = std::fs::read_to_string(&file).map_err(|e| CliError::Input(e.to_string()))?;
    if edited == yaml {
        return Ok(format!("{what} unchanged (no edits)\n"));
    }
    let docs = parse_documents(&edited, "the edited document")?;
    let [r] = docs.as_slice() else {
        return Err(CliError::Input("edit one document only".into()));
    };
    if r.name() != name || Kind::from_model(r.kind()) != Some(kind) {
        return Err(CliError::Input(
            "the kind and name cannot be changed by edit".into(),
        ));
    }
    let json = r.to_json().map_err(|e| CliError::Input(e.to_string()))?;
    let original = managed(&doc(&current)?);
    let mut version = current.resource_version;
    for _ in 0..5 {
        match c.update(kind, json.clone(), version).await {
            Ok(_) => return Ok(format!("{what} edited\n")),
            Err(s) if s.code() == Code::Aborted => {
                // Only a status change (a controller at work) is harmless:
                // then the edit still applies to what the user saw.
                let now = c.get(kind, name).await.map_err(|s| explain(&what, &s))?;
                if managed(&doc(&now)?) != original {
                    return Err(CliError::Api(format!(
                        "{what} was changed by someone else while you were editing; your edit was not applied (run edit again): {}",
                        s.message()
                    )));
                }
                version = now.resource_version;
            }
            Err(s) => return Err(explain(&what, &s)),
        }
    }
    Err(CliError::Api(format!(
        "{what} keeps changing; your edit was not applied (try again)"
    )))
}

/// A VM power action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VmAction {
    /// Start.
    Start,
    /// Stop (graceful, then killed).
    Stop,
    /// Restart.
    Restart,
    /// Pause the vCPUs.
    Pause,
    /// Resume paused vCPUs.
    Resume,
}

/// `hcictl vm ACTION NAME`.
pub async fn vm_action(c: &Client, action: VmAction, name: &str) -> Result<String, CliError> {
    let req = proto::VmActionRequest {
        name: name.to_string(),
        resource_version: 0,
    };
    let mut vms = c.vms();
    let result = match action {
        VmAction::Start => vms.start(req).await,
        VmAction::Stop => vms.stop(req).await,
        VmAction::Restart => vms.restart(req).await,
        VmAction::Pause => vms.pause(req).await,
        VmAction::Resume => vms.resume(req).await,
    };
    result.map_err(|s| explain(&format!("vm/{name}"), &s))?;
    Ok(format!(
        "vm/{name} {} requested\n",
        format!("{action:?}").to_lowercase()
    ))
}

/// `hcictl volume snapshot VOLUME SNAPSHOT`.
pub async fn snapshot(c: &Client, volume: &str, snapshot: &str) -> Result<String, CliError> {
    c.volumes()
        .snapshot_volume(proto::SnapshotVolumeRequest {
            volume: volume.into(),
            snapshot: snapshot.into(),
            labels: Default::default(),
        })
        .await
        .map_err(|s| explain(&format!("volume/{volume}"), &s))?;
    Ok(format!("snapshot/{snapshot} created\n"))
}

/// `hcictl vm snapshot VM NAME`: takes a VM snapshot (every volume of the
/// VM at one instant, with its spec) and, with `wait`, follows it until
/// it is taken.
pub async fn vm_snapshot(c: &Client, vm: &str, name: &str, wait: bool) -> Result<String, CliError> {
    let doc = serde_json::json!({
        "apiVersion": hci_core::model::API_VERSION,
        "kind": "VirtualMachineSnapshot",
        "metadata": {"name": name},
        "spec": {"vm": vm},
    });
    c.create(Kind::VmSnapshot, doc.to_string())
        .await
        .map_err(|s| explain(&format!("vm/{vm}"), &s))?;
    let mut out = format!("vmsnapshot/{name} created\n");
    if wait {
        let d = wait::wait(c, Kind::VmSnapshot, name, None).await?;
        let volumes = d
            .pointer("/status/volumes")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        out.push_str(&format!("vmsnapshot/{name} ready: {volumes} volumes\n"));
    }
    Ok(out)
}

/// `hcictl vm restore SNAPSHOT --as NEW`: restores a VM snapshot as a new
/// VM (its volumes cloned from the snapshot's) and, with `wait`, follows
/// the new volumes until they are ready.
pub async fn vm_restore(
    c: &Client,
    snapshot: &str,
    new: &str,
    wait: bool,
) -> Result<String, CliError> {
    let what = format!("vmsnapshot/{snapshot}");
    let r = c
        .vm_snapshots()
        .restore_vm_snapshot(proto::RestoreVmSnapshotRequest {
            snapshot: snapshot.into(),
            vm: new.into(),
        })
        .await
        .map_err(|s| explain(&what, &s))?
        .into_inner();
    let created = doc(&r)?;
    let mut out = format!("vm/{new} created from {what}\n");
    if wait {
        for v in &disk_volumes(&created) {
            wait::wait(c, Kind::Volume, v, None).await?;
            out.push_str(&format!("volume/{v} ready\n"));
        }
    }
    Ok(out)
}

/// The volumes the disks of VM document `vm` use, in disk order.
fn disk_volumes(vm: &Value) -> Vec<String> {
    vm.pointer("/spec/disks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|d| d.pointer("/volume").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

/// `hcictl volume clone VOLUME NEW`.
pub async fn clone(c: &Client, volume: &str, new: &str) -> Result<String, CliError> {
    c.volumes()
        .clone_volume(proto::CloneVolumeRequest {
            volume: volume.into(),
            name: new.into(),
        })
        .await
        .map_err(|s| explain(&format!("volume/{volume}"), &s))?;
    Ok(format!("volume/{new} created\n"))
}

/// `hcictl volume expand VOLUME SIZE`.
pub async fn expand(c: &Client, volume: &str, size: ByteSize) -> Result<String, CliError> {
    c.volumes()
        .expand_volume(proto::ExpandVolumeRequest {
            volume: volume.into(),
            size: size.0,
            resource_version: 0,
        })
        .await
        .map_err(|s| explain(&format!("volume/{volume}"), &s))?;
    Ok(format!("volume/{volume} expanding to {size}\n"))
}

/// `hcictl watch KIND [NAME]`: prints a line per change until interrupted.
pub async fn watch(c: &Client, kind: Kind, name: Option<&str>) -> Result<(), CliError> {
    let mut events = c
        .watch(kind, name)
        .await
        .map_err(|s| explain(&format!("watch {kind}"), &s))?;
    let mut stdout = std::io::stdout();
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|s| explain(&format!("watch {kind}"), &s))?;
        let Some(r) = ev.resource else { continue };
        let line = match proto::watch_event::Type::try_from(ev.r#type) {
            Ok(proto::watch_event::Type::Delete) => {
                format!("{:<8} {kind}/{}\n", "DELETED", r.name)
            }
            _ => {
                let phase = serde_json::from_str::<Value>(&r.json)
                    .ok()
                    .and_then(|d| {
                        d.pointer("/status/phase")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    })
                    .unwrap_or_else(|| "-".into());
                format!(
                    "{:<8} {kind}/{} phase={phase} version={}\n",
                    "PUT", r.name, r.resource_version
                )
            }
        };
        if stdout
            .write_all(line.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// How long `vm console` waits for a VM that does not run yet.
pub const CONSOLE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The byte that detaches from a console (`Ctrl-]`).
pub const DETACH: u8 = 0x1d;

/// `hcictl vm console NAME`: copies the console to stdout and stdin to the
/// guest until `Ctrl-]` (on a terminal), end of input, or the VM stops.
/// With `until`, returns as soon as the output contains that text.
pub async fn console(c: &Client, name: &str, until: Option<&str>) -> Result<(), CliError> {
    // A VM that was just created may not run yet: wait a while for it.
    let deadline = std::time::Instant::now() + CONSOLE_WAIT;
    let mut said = false;
    let (tx, mut output) = loop {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let _ = tx
            .send(proto::ConsoleInput {
                name: name.to_string(),
                data: vec![],
            })
            .await;
        match c
            .vms()
            .console(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(stream) => break (tx, stream.into_inner()),
            Err(s) if s.code() == Code::Unavailable && std::time::Instant::now() < deadline => {
                if !said {
                    eprintln!("waiting for vm/{name} to run…");
                    said = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(s) => return Err(explain(&format!("vm/{name} console"), &s)),
        }
    };
    let tty = std::io::stdin().is_terminal();
    let raw = if tty {
        crate::sys::RawTerminal::enable(0)
    } else {
        None
    };
    if tty && until.is_none() {
        eprint!("Connected to vm/{name}; press Ctrl-] to detach.\r\n");
    }
    let (detach_tx, mut detach_rx) = tokio::sync::oneshot::channel::<()>();
    // Keystrokes (or piped input) to the guest.
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let data = &buf[..n];
            if tty && let Some(i) = data.iter().position(|&b| b == DETACH) {
                let _ = tx
                    .send(proto::ConsoleInput {
                        name: String::new(),
                        data: data[..i].to_vec(),
                    })
                    .await;
                let _ = detach_tx.send(());
                return;
            }
            if tx
                .send(proto::ConsoleInput {
                    name: String::new(),
                    data: data.to_vec(),
                })
                .await
                .is_err()
            {
                break;
            }
        }
        // Piped input ended: keep the session open for the output.
        std::future::pending::<()>().await;
    });
    let mut stdout = std::io::stdout();
    let mut seen = String::new();
    let result = loop {
        tokio::select! {
            msg = output.message() => match msg {
                Ok(Some(chunk)) => {
                    if stdout.write_all(&chunk.data).and_then(|()| stdout.flush()).is_err() {
                        break Ok(());
                    }
                    if let Some(needle) = until {
                        seen.push_str(&String::from_utf8_lossy(&chunk.data));
                        if seen.contains(needle) {
                            break Ok(());
                        }
                        // Keep only what could still be the start of a match.
                        if seen.len() > needle.len() * 4 + 4096 {
                            let cut = seen.len() - needle.len();
                            let cut = (cut..seen.len()).find(|i| seen.is_char_boundary(*i)).unwrap_or(seen.len());
                            seen.drain(..cut);
                        }
                    }
                }
                Ok(None) => break match until {
                    Some(needle) => Err(CliError::Api(format!("the console of vm/{name} closed before {needle:?} appeared"))),
                    None => Ok(()),
                },
                Err(s) => break Err(explain(&format!("vm/{name} console"), &s)),
            },
            _ = &mut detach_rx => break Ok(()),
        }
    };
    input.abort();
    drop(raw);
    if tty && until.is_none() {
        eprintln!("\r\nDetached from vm/{name}.");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_become_sentences() {
        let e = explain(
            "volume/x",
            &Status::not_found("Volume \"x\" does not exist"),
        );
        assert_eq!(
            e.to_string(),
            "volume/x: not found: Volume \"x\" does not exist"
        );
        let e = explain("vm/web", &Status::aborted("version 3 is not 5"));
        assert!(e.to_string().contains("conflict"));
    }

    #[test]
    fn bad_documents_name_the_file_and_line() {
        let err = parse_documents(
            "apiVersion: hci.dev/v1\nkind: Volume\nmetadata: {name: a}\nspec: {size: 1.5Gi}\n",
            "vol.yaml",
        )
        .expect_err("bad size");
        let msg = err.to_string();
        assert!(msg.starts_with("vol.yaml: "), "{msg}");
        assert!(msg.contains("spec.size") && msg.contains("line 4"), "{msg}");
        assert!(parse_documents("", "empty.yaml").is_err());
        assert!(parse_documents(": : :", "junk.yaml").is_err());
    }

    #[test]
    fn apply_compares_labels_annotations_and_spec() {
        let a = serde_json::json!({"metadata": {"name": "a", "labels": {}, "resourceVersion": 4}, "spec": {"size": "1Gi"}, "status": {"phase": "Detached"}});
        let b = serde_json::json!({"metadata": {"name": "a"}, "spec": {"size": "1Gi"}});
        assert_eq!(managed(&a), managed(&b));
        let c = serde_json::json!({"metadata": {"name": "a"}, "spec": {"size": "2Gi"}});
        assert_ne!(managed(&a), managed(&c));
    }
}

/// `hcictl wait KIND NAME`: waits until the resource settles, with progress.
pub async fn wait(
    c: &Client,
    kind: Kind,
    name: &str,
    timeout: Option<std::time::Duration>,
) -> Result<String, CliError> {
    let d = wait::wait(c, kind, name, timeout).await?;
    let phase = d
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("ready");
    Ok(format!("{kind}/{name} {}\n", phase.to_lowercase()))
}

/// What `hcictl backup create` backs up.
#[derive(Debug, Clone)]
pub enum BackupOf {
    /// One volume.
    Volume(String),
    /// A whole VM: its spec and every volume.
    Vm(String),
}

/// `hcictl backup create NAME (--volume V | --vm VM) --target T`: creates
/// the Backup and (with `wait`) follows it to the end.
pub async fn backup_create(
    c: &Client,
    name: &str,
    of: BackupOf,
    target: &str,
    full: bool,
    wait: bool,
) -> Result<String, CliError> {
    use hci_core::model::{Backup, BackupSource, BackupSpec};
    let source = match of {
        BackupOf::Volume(name) => BackupSource::Volume { name },
        BackupOf::Vm(name) => BackupSource::VirtualMachine { name },
    };
    let backup = Backup::new(
        name,
        BackupSpec {
            source,
            target: target.to_string(),
            incremental: !full,
        },
    );
    let what = format!("backup/{name}");
    let json = AnyResource::from(backup)
        .to_json()
        .map_err(|e| CliError::Input(e.to_string()))?;
    c.create(Kind::Backup, json)
        .await
        .map_err(|s| explain(&what, &s))?;
    if !wait {
        return Ok(format!("{what} created\n"));
    }
    let d = wait::wait(c, Kind::Backup, name, None).await?;
    let size = |p: &str| {
        d.pointer(p)
            .and_then(Value::as_u64)
            .map_or("-".to_string(), |b| ByteSize(b).to_string())
    };
    Ok(format!(
        "{what} completed: read {}, stored {} new\n",
        size("/status/read"),
        size("/status/added")
    ))
}

/// `hcictl backup restore BACKUP (--volume NEW | --vm NEW)`: restores and
/// (with `wait`) follows every restored volume to the end.
pub async fn backup_restore(
    c: &Client,
    backup: &str,
    volume: Option<&str>,
    vm: Option<&str>,
    size: Option<ByteSize>,
    wait: bool,
) -> Result<String, CliError> {
    let what = format!("backup/{backup}");
    let r = c
        .backups()
        .restore_backup(proto::RestoreBackupRequest {
            backup: backup.into(),
            volume: volume.unwrap_or_default().into(),
            size: size.map_or(0, |s| s.0),
            vm: vm.unwrap_or_default().into(),
        })
        .await
        .map_err(|s| explain(&what, &s))?
        .into_inner();
    let created = doc(&r)?;
    // The volumes to follow: the one restored, or the VM's disks.
    let volumes: Vec<String> = match vm {
        None => vec![r.name.clone()],
        Some(_) => disk_volumes(&created),
    };
    let mut out = match vm {
        Some(vm) => format!("vm/{vm} created from {what}\n"),
        None => format!("volume/{} created from {what}\n", r.name),
    };
    if wait {
        for v in &volumes {
            wait::wait(c, Kind::Volume, v, None).await?;
            out.push_str(&format!("volume/{v} restored\n"));
        }
    }
    Ok(out)
}

/// `hcictl backup list [--target T] [--source NAME]`: the backups, newest
/// last, optionally of one target or one source.
pub async fn backup_list(
    c: &Client,
    target: Option<&str>,
    source: Option<&str>,
    format: Format,
) -> Result<String, CliError> {
    let list = c
        .list(Kind::Backup)
        .await
        .map_err(|s| explain("list backups", &s))?;
    let mut docs = list.items.iter().map(doc).collect::<Result<Vec<_>, _>>()?;
    let field = |d: &Value, p: &str| d.pointer(p).and_then(Value::as_str).map(str::to_string);
    docs.retain(|d| {
        target.is_none_or(|t| field(d, "/spec/target").as_deref() == Some(t))
            && source.is_none_or(|s| field(d, "/spec/source/name").as_deref() == Some(s))
    });
    docs.sort_by_key(|d| field(d, "/metadata/creationTimestamp"));
    match format {
        Format::Table if docs.is_empty() => Ok("No Backup found.\n".into()),
        Format::Table => Ok(output::table(Kind::Backup, &docs, Utc::now())),
        other => output::documents(&docs, other, true).map_err(CliError::Input),
    }
}

/// `hcictl apply -f FILE --wait`: waits for each applied resource that
/// settles (images, volumes, backups, snapshots, VMs) in file order.
pub async fn apply_wait(c: &Client, text: &str, origin: &str) -> Result<String, CliError> {
    let mut out = String::new();
    for r in parse_documents(text, origin)? {
        let Some(kind) = Kind::from_model(r.kind()) else {
            continue;
        };
        if matches!(
            kind,
            Kind::Image
                | Kind::Volume
                | Kind::Backup
                | Kind::Snapshot
                | Kind::VmSnapshot
                | Kind::Vm
        ) {
            out.push_str(&wait(c, kind, r.name(), None).await?);
        }
    }
    Ok(out)
}
