//! The etcd state store: cluster state in an etcd cluster (v3 API, only what
//! etcd 3.4 has), through the `etcd-client` crate.
//!
//! The mapping is direct, because [`StateStore`] was modelled on etcd:
//!
//! | `StateStore` | etcd |
//! |---|---|
//! | revision, `mod_revision`, `create_revision` | the same fields of etcd's MVCC store |
//! | `put` with `MustNotExist` / `Revision(r)` | a `Txn` comparing `version == 0` / `mod_revision == r`; the `else` branch reads the key to tell `NotFound` from `Conflict` |
//! | `list(prefix)` | ranges of at most [`PAGE`] keys, every page read at the first page's revision (one consistent snapshot) |
//! | `watch(prefix, from)` | a watch with `start_revision = from`; compacted history is [`Error::Compacted`] (callers relist) |
//! | leases | etcd leases (etcd rounds TTLs up to its minimum, 2 s with default settings) |
//!
//! Connection loss is [`Error::Unavailable`]; requests time out after
//! [`EtcdOptions::request_timeout`]; the client reconnects by itself when
//! etcd comes back. A watch ends with an error when its stream breaks, and
//! the caller (the controllers' loop) relists and watches again.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions as EtcdPut, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use hci_core::store::{
    KeyValue, LeaseId, ListResult, Precondition, PutOptions, StateStore, WatchEvent, WatchStream,
};
use hci_core::{Error, Result};

/// Keys per range request of a `list` (keeps each reply well under gRPC's
/// 4 MiB message limit for resource-sized values).
pub const PAGE: i64 = 500;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs (`http://HOST:PORT`), any member of the cluster.
    pub endpoints: Vec<String>,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
    /// How long one request (not a watch) may take.
    pub request_timeout: Duration,
}

impl EtcdOptions {
    /// Options for the given endpoints with default timeouts (5 s to
    /// connect, 10 s per request).
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        }
    }

    /// Parses `etcd://HOST:PORT[,HOST:PORT…]` (also `http://…`).
    pub fn from_url(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("etcd://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| {
                Error::invalid(
                    "etcd URL",
                    format!("{url:?} does not start with etcd:// (e.g. etcd://127.0.0.1:2379)"),
                )
            })?;
        let mut endpoints = Vec::new();
        for hostport in rest.trim_end_matches('/').split(',') {
            let valid = hostport
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(Error::invalid(
                    "etcd URL",
                    format!("{hostport:?} in {url:?} is not HOST:PORT"),
                ));
            }
            endpoints.push(format!("http://{hostport}"));
        }
        Ok(EtcdOptions::new(endpoints))
    }
}

/// A [`StateStore`] on etcd; see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStateStore {
    client: Client,
    endpoints: Vec<String>,
}

impl fmt::Debug for EtcdStateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStateStore")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn kv_of(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    let key = kv
        .key_str()
        .map_err(|_| Error::Corrupt {
            what: format!(
                "etcd key {:?} (not UTF-8)",
                String::from_utf8_lossy(kv.key())
            ),
            source: None,
        })?
        .to_string();
    Ok(KeyValue {
        key,
        value: kv.value().to_vec(),
        create_revision: rev(kv.create_revision()),
        mod_revision: rev(kv.mod_revision()),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    })
}

/// The first key after every key starting with `prefix` (etcd's range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty prefix (or all 0xff): to the end of the key space.
    vec![0]
}

/// Maps an etcd client error; `what` names the operation.
fn etcd_err(what: &str, e: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => {
            let msg = status.message().to_string();
            match status.code() {
                tonic::Code::NotFound => Error::not_found("lease", msg),
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                    if msg.contains("compacted") =>
                {
                    Error::Compacted {
                        requested: 0,
                        oldest: 0,
                    }
                }
                tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
                | tonic::Code::OutOfRange => Error::invalid(what.to_string(), msg),
                _ => Error::Unavailable {
                    what: format!("etcd ({what})"),
                    source: Some(Box::new(status)),
                },
            }
        }
        E::LeaseKeepAliveError(msg) if msg.contains("not found") => Error::not_found("lease", msg),
        other => Error::Unavailable {
            what: format!("etcd ({what})"),
            source: Some(Box::new(other)),
        },
    }
}

fn header_rev(h: Option<&etcd_client::ResponseHeader>) -> Result<u64> {
    h.map(|h| rev(h.revision())).ok_or_else(|| Error::Backend {
        backend: "etcd",
        message: "a reply without a header".into(),
        source: None,
    })
}

impl EtcdStateStore {
    /// Connects to etcd (the connection itself is made lazily by the
    /// first request; [`EtcdStateStore::current_revision`] checks it).
    pub async fn connect(options: EtcdOptions) -> Result<Self> {
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_timeout(options.request_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(|e| etcd_err("connect", e))?;
        Ok(EtcdStateStore {
            client,
            endpoints: options.endpoints,
        })
    }

    /// Connects to `etcd://HOST:PORT` and checks that etcd answers.
    pub async fn open(url: &str) -> Result<Self> {
        let store = Self::connect(EtcdOptions::from_url(url)?).await?;
        store.current_revision().await?;
        Ok(store)
    }

    /// The endpoints this store talks to.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Compacts history up to `revision`: watches from older revisions fail
    /// with [`Error::Compacted`] afterwards.
    pub async fn compact(&self, revision: u64) -> Result<()> {
        let mut kv = self.client.kv_client();
        kv.compact(i64::try_from(revision).unwrap_or(i64::MAX), None)
            .await
            .map_err(|e| etcd_err("compact", e))?;
        Ok(())
    }

    /// Reads `key` inside a failed transaction's reply.
    fn txn_get(resp: &etcd_client::TxnResponse) -> Option<etcd_client::KeyValue> {
        resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        })
    }

    /// The compare of a precondition (`None` for unconditional writes).
    fn compare(key: &str, p: Precondition) -> Option<Compare> {
        match p {
            Precondition::None => None,
            Precondition::MustNotExist => Some(Compare::version(key, CompareOp::Equal, 0)),
            Precondition::Revision(r) => Some(Compare::mod_revision(
                key,
                CompareOp::Equal,
                i64::try_from(r).unwrap_or(i64::MAX),
            )),
        }
    }

    /// The error of a failed precondition, from the key as it is now.
    fn refused(key: &str, p: Precondition, now: Option<etcd_client::KeyValue>) -> Error {
        match (p, now) {
            (Precondition::MustNotExist, _) => Error::already_exists("key", key),
            (Precondition::Revision(_), None) | (Precondition::None, None) => {
                Error::not_found("key", key)
            }
            (Precondition::Revision(expected), Some(kv)) => Error::Conflict {
                kind: "key",
                name: key.to_string(),
                expected,
                actual: rev(kv.mod_revision()),
            },
            (Precondition::None, Some(kv)) => Error::Conflict {
                kind: "key",
                name: key.to_string(),
                expected: 0,
                actual: rev(kv.mod_revision()),
            },
        }
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("key", "must not be empty"));
    }
    Ok(())
}

/// Turns an etcd watch into [`WatchEvent`]s; see [`StateStore::watch`].
struct Watching {
    stream: etcd_client::WatchStream,
    pending: VecDeque<WatchEvent>,
    from: u64,
    done: bool,
}

impl Watching {
    async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some((Ok(ev), self));
            }
            if self.done {
                return None;
            }
            let resp = match self.stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    self.done = true;
                    let e = Error::Unavailable {
                        what: "etcd watch (stream closed)".into(),
                        source: None,
                    };
                    return Some((Err(e), self));
                }
                Err(e) => {
                    self.done = true;
                    return Some((Err(etcd_err("watch", e)), self));
                }
            };
            if resp.compact_revision() > 0 {
                self.done = true;
                let e = Error::Compacted {
                    requested: self.from,
                    oldest: rev(resp.compact_revision()),
                };
                return Some((Err(e), self));
            }
            if resp.canceled() {
                self.done = true;
                let e = Error::Unavailable {
                    what: format!("etcd watch (cancelled: {})", resp.cancel_reason()),
                    source: None,
                };
                return Some((Err(e), self));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let item = match ev.event_type() {
                    EventType::Put => kv_of(kv).map(WatchEvent::Put),
                    EventType::Delete => match kv.key_str() {
                        Ok(key) => Ok(WatchEvent::Delete {
                            key: key.to_string(),
                            mod_revision: rev(kv.mod_revision()),
                        }),
                        Err(_) => continue,
                    },
                };
                match item {
                    Ok(item) => self.pending.push_back(item),
                    Err(e) => tracing::warn!(error = %e, "skipping an etcd watch event"),
                }
            }
        }
    }
}

#[async_trait]
impl StateStore for EtcdStateStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut kv = self.client.kv_client();
        let resp = kv.get(key, None).await.map_err(|e| etcd_err("get", e))?;
        resp.kvs().first().map(kv_of).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<ListResult> {
        let mut kv = self.client.kv_client();
        let end = prefix_end(prefix.as_bytes());
        let mut from = if prefix.is_empty() {
            vec![0]
        } else {
            prefix.as_bytes().to_vec()
        };
        let mut revision = 0i64;
        let mut items = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = kv
                .get(from.clone(), Some(opts))
                .await
                .map_err(|e| etcd_err("list", e))?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                items.push(kv_of(kv)?);
            }
            match (resp.more(), resp.kvs().last()) {
                (true, Some(last)) => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(ListResult {
            items,
            revision: rev(revision),
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, options: PutOptions) -> Result<u64> {
        check_key(key)?;
        let mut put = EtcdPut::new();
        if let Some(lease) = options.lease {
            put = put.with_lease(lease);
        }
        let mut kv = self.client.kv_client();
        let Some(compare) = Self::compare(key, options.precondition) else {
            let resp = kv
                .put(key, value, Some(put))
                .await
                .map_err(|e| etcd_err("put", e))?;
            return header_rev(resp.header());
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key, value, Some(put))])
            .or_else([TxnOp::get(key, None)]);
        let resp = kv.txn(txn).await.map_err(|e| etcd_err("put", e))?;
        if resp.succeeded() {
            header_rev(resp.header())
        } else {
            Err(Self::refused(
                key,
                options.precondition,
                Self::txn_get(&resp),
            ))
        }
    }

    async fn delete(&self, key: &str, precondition: Precondition) -> Result<u64> {
        check_key(key)?;
        // "Delete" needs the key to exist even without a precondition.
        let compare = Self::compare(key, precondition)
            .unwrap_or_else(|| Compare::version(key, CompareOp::Greater, 0));
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::delete(key, None)])
            .or_else([TxnOp::get(key, None)]);
        let mut kv = self.client.kv_client();
        let resp = kv.txn(txn).await.map_err(|e| etcd_err("delete", e))?;
        if resp.succeeded() {
            header_rev(resp.header())
        } else {
            let now = Self::txn_get(&resp);
            if now.is_none() {
                return Err(Error::not_found("key", key));
            }
            Err(Self::refused(key, precondition, now))
        }
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream> {
        let mut opts = WatchOptions::new();
        opts = if prefix.is_empty() {
            opts.with_all_keys()
        } else {
            opts.with_prefix()
        };
        if from_revision > 0 {
            opts = opts.with_start_revision(i64::try_from(from_revision).unwrap_or(i64::MAX));
        }
        let mut watch = self.client.watch_client();
        let mut stream = watch
            .watch(prefix, Some(opts))
            .await
            .map_err(|e| etcd_err("watch", e))?;
        // The first reply confirms the watch (or refuses compacted history).
        let first = stream
            .message()
            .await
            .map_err(|e| etcd_err("watch", e))?
            .ok_or_else(|| Error::Unavailable {
                what: "etcd watch (closed at creation)".into(),
                source: None,
            })?;
        if first.compact_revision() > 0 {
            return Err(Error::Compacted {
                requested: from_revision,
                oldest: rev(first.compact_revision()),
            });
        }
        if first.canceled() {
            return Err(Error::Unavailable {
                what: format!("etcd watch (refused: {})", first.cancel_reason()),
                source: None,
            });
        }
        let mut state = Watching {
            stream,
            pending: VecDeque::new(),
            from: from_revision,
            done: false,
        };
        for ev in first.events() {
            if let (Some(kv), EventType::Put) = (ev.kv(), ev.event_type()) {
                state.pending.push_back(WatchEvent::Put(kv_of(kv)?));
            }
        }
        Ok(futures::stream::unfold(state, Watching::next).boxed())
    }

    async fn current_revision(&self) -> Result<u64> {
        let mut kv = self.client.kv_client();
        let resp = kv
            .get("\0", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| etcd_err("read the revision", e))?;
        header_rev(resp.header())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut lease = self.client.lease_client();
        let resp = lease
            .grant(secs, None)
            .await
            .map_err(|e| etcd_err("grant a lease", e))?;
        if !resp.error().is_empty() {
            return Err(Error::Backend {
                backend: "etcd",
                message: format!("lease grant refused: {}", resp.error()),
                source: None,
            });
        }
        Ok(resp.id())
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<()> {
        let mut lease = self.client.lease_client();
        match lease.keep_alive(id).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => {
                Err(Error::not_found("lease", id.to_string()))
            }
            Err(e) => Err(etcd_err("renew a lease", e)),
        }
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        let mut lease = self.client.lease_client();
        match lease.revoke(id).await {
            Ok(_) => Ok(()),
            Err(e) => match etcd_err("revoke a lease", e) {
                Error::NotFound { .. } => Err(Error::not_found("lease", id.to_string())),
                other => Err(other),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn urls() {
        let o = EtcdOptions::from_url("etcd://127.0.0.1:2379,10.0.0.2:2379").expect("parse");
        assert_eq!(
            o.endpoints,
            ["http://127.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert!(EtcdOptions::from_url("redb:///x").is_err());
        assert!(EtcdOptions::from_url("etcd://host").is_err());
        assert!(EtcdOptions::from_url("etcd://:12").is_err());
    }
}
