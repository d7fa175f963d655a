//! Events: what the controllers did to a resource and why, kept for an hour
//! (Kubernetes-style), so `hcictl describe` can say "StartFailed: volume
//! data is attached to VM web" instead of leaving users to read logs.
//!
//! Events live in the state store under `/events/<kind>/<name>/<time>-<node>`
//! on a lease: the recorder takes a new lease every [`LEASE_ROTATE`] with a
//! time-to-live of [`KEEP`] + [`LEASE_ROTATE`], so every event is kept at
//! least [`KEEP`] and expires on its own (also in a cluster store). Recording
//! is best effort: a store failure is logged, never returned to the
//! controller.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use hci_core::store::{LeaseId, PutOptions, StateStore, WatchEvent};
use hci_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// How long events are kept at least.
pub const KEEP: Duration = Duration::from_secs(3600);
/// How often the recorder starts a new lease.
pub const LEASE_ROTATE: Duration = Duration::from_secs(600);
/// Key prefix of all events.
pub const PREFIX: &str = "/events/";

/// Whether an event is routine or needs attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    /// Routine.
    Normal,
    /// Something failed or needs attention.
    Warning,
}

impl EventType {
    /// `Normal` or `Warning`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When.
    pub time: DateTime<Utc>,
    /// Resource kind.
    pub kind: String,
    /// Resource name.
    pub name: String,
    /// Normal or Warning.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// Short CamelCase reason.
    pub reason: String,
    /// What happened.
    pub message: String,
    /// The node that recorded it.
    pub node: String,
}

impl From<Event> for crate::proto::Event {
    fn from(e: Event) -> Self {
        crate::proto::Event {
            time: e.time.to_rfc3339_opts(SecondsFormat::Millis, true),
            kind: e.kind,
            name: e.name,
            r#type: e.event_type.as_str().to_string(),
            reason: e.reason,
            message: e.message,
            node: e.node,
        }
    }
}

/// The key prefix selecting events of `kind` (all if empty) and `name` (all
/// of the kind if empty).
pub fn prefix(kind: &str, name: &str) -> Result<String> {
    match (kind, name) {
        ("", "") => Ok(PREFIX.to_string()),
        ("", _) => Err(Error::invalid("events filter", "a name needs a kind")),
        (k, "") => Ok(format!("{PREFIX}{k}/")),
        (k, n) => Ok(format!("{PREFIX}{k}/{n}/")),
    }
}

/// Records events for one node.
/// A resource's last event: type, reason, message, when.
type LastEvent = (EventType, String, String, Instant);

/// Repeats of a resource's last event (same type, reason and message) are
/// not recorded again: a controller retrying every second does not flood
/// the log.
#[derive(Clone)]
pub struct EventRecorder {
    store: Arc<dyn StateStore>,
    node: String,
    lease: Arc<Mutex<Option<(LeaseId, Instant)>>>,
    last: Arc<std::sync::Mutex<HashMap<(String, String), LastEvent>>>,
}

impl std::fmt::Debug for EventRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRecorder")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl EventRecorder {
    /// A recorder writing to `store` on behalf of `node`.
    pub fn new(store: Arc<dyn StateStore>, node: impl Into<String>) -> Self {
        EventRecorder {
            store,
            node: node.into(),
            lease: Arc::default(),
            last: Arc::default(),
        }
    }

    /// Records a routine event.
    pub async fn normal(&self, kind: &str, name: &str, reason: &str, message: impl Into<String>) {
        self.record(kind, name, EventType::Normal, reason, message.into())
            .await;
    }

    /// Records a warning.
    pub async fn warning(&self, kind: &str, name: &str, reason: &str, message: impl Into<String>) {
        self.record(kind, name, EventType::Warning, reason, message.into())
            .await;
    }

    async fn record(
        &self,
        kind: &str,
        name: &str,
        event_type: EventType,
        reason: &str,
        message: String,
    ) {
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let key = (kind.to_string(), name.to_string());
            if let Some((t, r, m, at)) = last.get(&key)
                && (*t, r.as_str(), m.as_str()) == (event_type, reason, message.as_str())
                && at.elapsed() < KEEP
            {
                return;
            }
            if last.len() > 10_000 {
                last.clear();
            }
            last.insert(
                key,
                (
                    event_type,
                    reason.to_string(),
                    message.clone(),
                    Instant::now(),
                ),
            );
        }
        let event = Event {
            time: Utc::now(),
            kind: kind.to_string(),
            name: name.to_string(),
            event_type,
            reason: reason.to_string(),
            message,
            node: self.node.clone(),
        };
        if let Err(e) = self.put(&event).await {
            tracing::warn!(kind, name, reason, error = %e, "cannot record an event");
        }
    }

    async fn put(&self, event: &Event) -> Result<()> {
        let lease = self.lease().await?;
        let nanos = event.time.timestamp_nanos_opt().unwrap_or(0);
        let key = format!(
            "{}{nanos:020}-{}",
            prefix(&event.kind, &event.name)?,
            self.node
        );
        let value =
            serde_json::to_vec(event).map_err(|e| Error::invalid("event", e.to_string()))?;
        self.store
            .put(
                &key,
                value,
                PutOptions {
                    lease: Some(lease),
                    ..PutOptions::default()
                },
            )
            .await
            .map(drop)
    }

    async fn lease(&self) -> Result<LeaseId> {
        let mut current = self.lease.lock().await;
        if let Some((id, since)) = *current
            && since.elapsed() < LEASE_ROTATE
        {
            return Ok(id);
        }
        let id = self.store.grant_lease(KEEP + LEASE_ROTATE).await?;
        *current = Some((id, Instant::now()));
        Ok(id)
    }
}

/// The kept events of `kind`/`name` (see [`prefix`]), oldest first.
pub async fn list(store: &dyn StateStore, kind: &str, name: &str) -> Result<Vec<Event>> {
    let listed = store.list(&prefix(kind, name)?).await?;
    let mut events: Vec<Event> = listed
        .items
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    events.sort_by_key(|e| e.time);
    Ok(events)
}

/// New events of `kind`/`name` as they are recorded (after the kept ones
/// unless `from_now`).
pub async fn watch(
    store: &dyn StateStore,
    kind: &str,
    name: &str,
    from_now: bool,
) -> Result<futures::stream::BoxStream<'static, Result<Event>>> {
    let p = prefix(kind, name)?;
    let from = if from_now {
        store.current_revision().await? + 1
    } else {
        0
    };
    let stream = store.watch(&p, from).await?;
    Ok(stream
        .filter_map(|ev| async move {
            match ev {
                Ok(WatchEvent::Put(kv)) => serde_json::from_slice(&kv.value).ok().map(Ok),
                Ok(WatchEvent::Delete { .. }) => None,
                Err(e) => Some(Err(e)),
            }
        })
        .boxed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hci_core::memory::MemStateStore;

    #[tokio::test]
    async fn events_are_listed_per_resource_and_followed() {
        let store: Arc<dyn StateStore> = Arc::new(MemStateStore::new());
        let rec = EventRecorder::new(Arc::clone(&store), "n1");
        let mut w = watch(store.as_ref(), "VirtualMachine", "", true)
            .await
            .expect("watch");
        rec.normal("VirtualMachine", "web", "Started", "guest running")
            .await;
        rec.warning("VirtualMachine", "db", "StartFailed", "volume missing")
            .await;
        rec.normal("Volume", "data", "Created", "1 GiB").await;
        // A repeat is not recorded again.
        rec.warning("VirtualMachine", "db", "StartFailed", "volume missing")
            .await;
        let web = list(store.as_ref(), "VirtualMachine", "web")
            .await
            .expect("list");
        assert_eq!(web.len(), 1);
        assert_eq!(web[0].reason, "Started");
        assert_eq!(web[0].node, "n1");
        assert_eq!(
            list(store.as_ref(), "VirtualMachine", "")
                .await
                .expect("list")
                .len(),
            2
        );
        assert_eq!(list(store.as_ref(), "", "").await.expect("list").len(), 3);
        assert!(list(store.as_ref(), "", "web").await.is_err());
        let first = w.next().await.expect("event").expect("ok");
        assert_eq!(
            (first.name.as_str(), first.event_type),
            ("web", EventType::Normal)
        );
        let second = w.next().await.expect("event").expect("ok");
        assert_eq!(second.event_type, EventType::Warning);
        // Every event is on a lease, so it expires by itself.
        let kv = store.list(PREFIX).await.expect("list");
        assert!(kv.items.iter().all(|kv| kv.lease.is_some()));
    }
}
