//! Waiting for a resource to settle, with a progress bar for the long jobs
//! (image imports, backups, restores, replica rebuilds).

use std::io::IsTerminal;
use std::time::Duration;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use super::client::{Client, Kind};
use super::{CliError, explain, proto};

/// How far a resource has come, read from its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// `status.phase` (or "-").
    pub phase: String,
    /// Percent done, when the resource reports it.
    pub percent: Option<u8>,
    /// Whether it settled.
    pub outcome: Outcome,
}

/// Where a wait ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Still working.
    Pending,
    /// Settled well (ready, completed, running).
    Done,
    /// Settled badly, with the reason.
    Failed(String),
}

fn ready_condition(status: &Value) -> Option<(bool, String)> {
    status
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        .map(|c| {
            (
                c.get("status").and_then(Value::as_str) == Some("True"),
                c.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            )
        })
}

/// Reads a resource's progress from its JSON document.
pub fn assess(kind: Kind, doc: &Value) -> Progress {
    let status = doc.get("status").cloned().unwrap_or(Value::Null);
    let phase = status
        .get("phase")
        .and_then(Value::as_str)
        .unwrap_or("-")
        .to_string();
    let ready = ready_condition(&status);
    let message = status
        .get("message")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .or_else(|| ready.as_ref().map(|r| r.1.clone()))
        .unwrap_or_default();
    let pct = |v: Option<&Value>| v.and_then(Value::as_u64).map(|p| p.min(100) as u8);
    let mut percent = pct(status.get("progress"));
    if kind == Kind::Volume && percent.is_none() {
        // A rebuild: the slowest rebuilding replica.
        percent = status
            .get("replicas")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| pct(r.get("rebuildPercent")))
            .min();
    }
    let outcome = match (kind, phase.as_str()) {
        (_, "Failed") => Outcome::Failed(if message.is_empty() {
            "failed".into()
        } else {
            message
        }),
        (Kind::Image, "Ready")
        | (Kind::Backup, "Completed")
        | (Kind::Snapshot | Kind::VmSnapshot, "Ready") => Outcome::Done,
        (Kind::Image | Kind::Backup | Kind::Snapshot | Kind::VmSnapshot, _) => Outcome::Pending,
        (Kind::Vm, "Running") => Outcome::Done,
        (Kind::Vm, _) => Outcome::Pending,
        (Kind::Volume, "Detached" | "Attached") if ready.as_ref().is_some_and(|r| r.0) => {
            Outcome::Done
        }
        (Kind::Volume, _) => Outcome::Pending,
        _ if ready.as_ref().is_some_and(|r| r.0) => Outcome::Done,
        _ => Outcome::Pending,
    };
    Progress {
        phase,
        percent,
        outcome,
    }
}

/// Shows progress on stderr: a bar on a terminal, a line per change
/// otherwise (logs of scripts stay readable).
struct Display {
    bar: Option<ProgressBar>,
    last: Option<(String, Option<u8>)>,
    label: String,
}

impl Display {
    fn new(label: String) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(100);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} {spinner} [{elapsed_precise}] [{bar:30}] {pos:>3}% {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(label.clone());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Display {
            bar,
            last: None,
            label,
        }
    }

    fn show(&mut self, p: &Progress) {
        let now = (p.phase.clone(), p.percent);
        if self.last.as_ref() == Some(&now) {
            return;
        }
        self.last = Some(now);
        match &self.bar {
            Some(bar) => {
                bar.set_position(u64::from(p.percent.unwrap_or(0)));
                bar.set_message(p.phase.clone());
            }
            None => {
                let pct = p.percent.map(|v| format!(" {v}%")).unwrap_or_default();
                eprintln!("{} {}{pct}", self.label, p.phase);
            }
        }
    }

    fn finish(&self, p: &Progress) {
        if let Some(bar) = &self.bar {
            if p.outcome == Outcome::Done {
                bar.set_position(100);
            }
            bar.finish_and_clear();
        }
    }
}

/// Waits until `kind/name` settles (ready, completed, running) or fails,
/// showing its progress; `timeout` bounds the wait. Returns the final
/// document.
pub async fn wait(
    c: &Client,
    kind: Kind,
    name: &str,
    timeout: Option<Duration>,
) -> Result<Value, CliError> {
    let what = format!("{kind}/{name}");
    let fut = async {
        let r = c.get(kind, name).await.map_err(|s| explain(&what, &s))?;
        let mut events = c
            .watch_from(kind, name, r.resource_version + 1)
            .await
            .map_err(|s| explain(&what, &s))?;
        let mut display = Display::new(what.clone());
        let mut doc = parse(&r.json)?;
        loop {
            let p = assess(kind, &doc);
            display.show(&p);
            match &p.outcome {
                Outcome::Done => {
                    display.finish(&p);
                    return Ok(doc);
                }
                Outcome::Failed(why) => {
                    display.finish(&p);
                    return Err(CliError::Failed(format!("{what} failed: {why}")));
                }
                Outcome::Pending => {}
            }
            let Some(ev) = events.next().await else {
                display.finish(&p);
                return Err(CliError::Failed(format!(
                    "{what}: the daemon closed the watch"
                )));
            };
            let ev = ev.map_err(|s| explain(&what, &s))?;
            if proto::watch_event::Type::try_from(ev.r#type) == Ok(proto::watch_event::Type::Delete)
            {
                display.finish(&p);
                return Err(CliError::Failed(format!("{what} was deleted")));
            }
            if let Some(r) = ev.resource {
                doc = parse(&r.json)?;
            }
        }
    };
    match timeout {
        Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| {
            CliError::Failed(format!("{what} did not settle within {}s", t.as_secs()))
        })?,
        None => fut.await,
    }
}

fn parse(json: &str) -> Result<Value, CliError> {
    serde_json::from_str(json)
        .map_err(|e| CliError::Failed(format!("the daemon sent a resource that is not JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn backups_finish_on_completed_and_report_percent() {
        let p = assess(
            Kind::Backup,
            &json!({"status": {"phase": "InProgress", "progress": 42}}),
        );
        assert_eq!((p.percent, p.outcome), (Some(42), Outcome::Pending));
        let p = assess(Kind::Backup, &json!({"status": {"phase": "Completed"}}));
        assert_eq!(p.outcome, Outcome::Done);
        let p = assess(
            Kind::Backup,
            &json!({"status": {"phase": "Failed", "message": "target gone"}}),
        );
        assert_eq!(p.outcome, Outcome::Failed("target gone".into()));
    }

    #[test]
    fn volumes_need_the_ready_condition_and_report_rebuilds() {
        let ready = json!({"type": "Ready", "status": "True"});
        let p = assess(
            Kind::Volume,
            &json!({"status": {"phase": "Detached", "conditions": [ready]}}),
        );
        assert_eq!(p.outcome, Outcome::Done);
        let p = assess(Kind::Volume, &json!({"status": {"phase": "Detached"}}));
        assert_eq!(p.outcome, Outcome::Pending);
        let p = assess(
            Kind::Volume,
            &json!({"status": {"phase": "Rebuilding", "replicas": [
                {"node": "a", "healthy": true},
                {"node": "b", "healthy": false, "rebuildPercent": 30},
            ]}}),
        );
        assert_eq!((p.percent, p.outcome), (Some(30), Outcome::Pending));
        let p = assess(
            Kind::Volume,
            &json!({"status": {"phase": "Failed", "conditions": [
                {"type": "Ready", "status": "False", "message": "backup b is corrupt"}
            ]}}),
        );
        assert_eq!(p.outcome, Outcome::Failed("backup b is corrupt".into()));
    }

    #[test]
    fn documents_without_status_are_pending() {
        for kind in [Kind::Vm, Kind::Volume, Kind::Image, Kind::Network] {
            assert_eq!(assess(kind, &json!({})).outcome, Outcome::Pending);
        }
    }
}
