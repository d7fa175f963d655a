//! The CRUD and watch handlers every resource service shares, generic over
//! the resource type, and the macro that wires them into a generated service.

use std::collections::HashMap;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use hci_core::Error;
use hci_core::model::Resource;
use serde_json::Value;
use tonic::{Response, Status};

use super::status::{ResultExt, to_status};
use crate::proto;
use crate::resources::{ResourceEvent, ResourceStore};

/// The stream type of every `Watch` method.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::WatchEvent, Status>> + Send>>;

/// The wire form of a resource.
pub fn to_proto<R: Resource>(r: &R) -> Result<proto::Resource, Status> {
    let meta = r.metadata();
    Ok(proto::Resource {
        kind: R::KIND.to_string(),
        name: meta.name.clone(),
        resource_version: meta.resource_version,
        uid: meta.uid.map(|u| u.to_string()).unwrap_or_default(),
        json: r.to_json().or_status()?,
    })
}

/// Parses a client's JSON document as an `R`, dropping its status (which
/// only the system sets).
pub fn parse_document<R: Resource>(json: &str) -> Result<R, Status> {
    let what = format!("{} document", R::KIND);
    let mut doc: Value =
        serde_json::from_str(json).map_err(|e| to_status(Error::invalid(&what, e.to_string())))?;
    if let Some(obj) = doc.as_object_mut() {
        obj.remove("status");
    }
    serde_json::from_value(doc).map_err(|e| to_status(Error::invalid(&what, e.to_string())))
}

fn require_name(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        Err(Status::invalid_argument("name is required"))
    } else {
        Ok(())
    }
}

/// `Get`.
pub async fn get<R: Resource>(
    store: &ResourceStore,
    req: proto::GetRequest,
) -> Result<Response<proto::Resource>, Status> {
    require_name(&req.name)?;
    let r: R = store.get(&req.name).await.or_status()?;
    Ok(Response::new(to_proto(&r)?))
}

/// `List`, filtered by the label selector.
pub async fn list<R: Resource>(
    store: &ResourceStore,
    req: proto::ListRequest,
) -> Result<Response<proto::ListResponse>, Status> {
    let list = store.list::<R>().await.or_status()?;
    let selected = |r: &R| matches_labels(&r.metadata().labels, &req.label_selector);
    let items = list
        .items
        .iter()
        .filter(|r| selected(r))
        .map(to_proto)
        .collect::<Result<_, _>>()?;
    Ok(Response::new(proto::ListResponse {
        items,
        revision: list.revision,
    }))
}

fn matches_labels(
    labels: &std::collections::BTreeMap<String, String>,
    selector: &HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `Create`.
pub async fn create<R: Resource>(
    store: &ResourceStore,
    req: proto::CreateRequest,
) -> Result<Response<proto::Resource>, Status> {
    let r: R = parse_document(&req.json)?;
    let r = store.create(r).await.or_status()?;
    Ok(Response::new(to_proto(&r)?))
}

/// `Update`: metadata and spec, at the version the client read.
pub async fn update<R: Resource>(
    store: &ResourceStore,
    req: proto::UpdateRequest,
) -> Result<Response<proto::Resource>, Status> {
    let mut r: R = parse_document(&req.json)?;
    if req.resource_version != 0 {
        r.metadata_mut().resource_version = req.resource_version;
    }
    let r = store.update_spec(r).await.or_status()?;
    Ok(Response::new(to_proto(&r)?))
}

/// `Delete`.
pub async fn delete<R: Resource>(
    store: &ResourceStore,
    req: proto::DeleteRequest,
) -> Result<Response<proto::DeleteResponse>, Status> {
    require_name(&req.name)?;
    if R::KIND == <hci_core::model::Node as Resource>::KIND
        && let Some(why) = crate::controllers::scheduler::node_removal_blocker(store, &req.name)
            .await
            .or_status()?
    {
        return Err(to_status(Error::Busy {
            kind: "node",
            name: req.name.clone(),
            reason: why,
        }));
    }
    let version = (req.resource_version != 0).then_some(req.resource_version);
    let revision = store.delete::<R>(&req.name, version).await.or_status()?;
    Ok(Response::new(proto::DeleteResponse { revision }))
}

/// `Watch`: changes to resources of kind `R` (or one of them).
pub async fn watch<R: Resource>(
    store: &ResourceStore,
    req: proto::WatchRequest,
) -> Result<Response<WatchStream>, Status> {
    let events = store.watch::<R>(req.from_revision).await.or_status()?;
    let only = req.name;
    let stream = events.filter_map(move |event| {
        let item = match event {
            Ok(event) if !only.is_empty() && event.name() != only => None,
            Ok(event) => Some(event_to_proto(&event)),
            Err(e) => Some(Err(to_status(e))),
        };
        std::future::ready(item)
    });
    Ok(Response::new(Box::pin(stream)))
}

fn event_to_proto<R: Resource>(event: &ResourceEvent<R>) -> Result<proto::WatchEvent, Status> {
    use proto::watch_event::Type;
    Ok(match event {
        ResourceEvent::Put(r) => proto::WatchEvent {
            r#type: Type::Put.into(),
            resource: Some(to_proto(r)?),
            revision: r.metadata().resource_version,
        },
        ResourceEvent::Delete { name, revision } => proto::WatchEvent {
            r#type: Type::Delete.into(),
            resource: Some(proto::Resource {
                kind: R::KIND.to_string(),
                name: name.clone(),
                resource_version: *revision,
                ..Default::default()
            }),
            revision: *revision,
        },
    })
}

/// Implements a generated resource service on [`super::Api`]: the six CRUD
/// and watch methods for resource type `$R`, plus the extra methods given.
macro_rules! resource_service {
    ($service:path, $R:ty { $($extra:tt)* }) => {
        #[tonic::async_trait]
        impl $service for $crate::api::Api {
            async fn get(
                &self,
                request: tonic::Request<$crate::proto::GetRequest>,
            ) -> Result<tonic::Response<$crate::proto::Resource>, tonic::Status> {
                $crate::api::crud::get::<$R>(self.resources(), request.into_inner()).await
            }

            async fn list(
                &self,
                request: tonic::Request<$crate::proto::ListRequest>,
            ) -> Result<tonic::Response<$crate::proto::ListResponse>, tonic::Status> {
                $crate::api::crud::list::<$R>(self.resources(), request.into_inner()).await
            }

            async fn create(
                &self,
                request: tonic::Request<$crate::proto::CreateRequest>,
            ) -> Result<tonic::Response<$crate::proto::Resource>, tonic::Status> {
                $crate::api::crud::create::<$R>(self.resources(), request.into_inner()).await
            }

            async fn update(
                &self,
                request: tonic::Request<$crate::proto::UpdateRequest>,
            ) -> Result<tonic::Response<$crate::proto::Resource>, tonic::Status> {
                $crate::api::crud::update::<$R>(self.resources(), request.into_inner()).await
            }

            async fn delete(
                &self,
                request: tonic::Request<$crate::proto::DeleteRequest>,
            ) -> Result<tonic::Response<$crate::proto::DeleteResponse>, tonic::Status> {
                $crate::api::crud::delete::<$R>(self.resources(), request.into_inner()).await
            }

            type WatchStream = $crate::api::crud::WatchStream;

            async fn watch(
                &self,
                request: tonic::Request<$crate::proto::WatchRequest>,
            ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
                $crate::api::crud::watch::<$R>(self.resources(), request.into_inner()).await
            }

            $($extra)*
        }
    };
}
pub(crate) use resource_service;

#[cfg(test)]
mod tests {
    use super::*;
    use hci_core::model::Volume;

    #[test]
    fn documents_drop_client_status() {
        let json = r#"{"apiVersion":"hci.dev/v1","kind":"Volume","metadata":{"name":"a"},
            "spec":{"size":"1Gi"},"status":{"phase":"Ready"}}"#;
        let v: Volume = parse_document(json).expect("parse");
        assert!(v.status.is_none());
        let wrong_kind = json.replace("\"Volume\"", "\"Network\"");
        let err = parse_document::<Volume>(&wrong_kind).expect_err("kind mismatch");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("kind"), "{}", err.message());
    }

    #[test]
    fn label_selectors_need_every_label() {
        let labels = [("a".to_string(), "1".to_string()), ("b".into(), "2".into())]
            .into_iter()
            .collect();
        let sel = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert!(matches_labels(&labels, &sel(&[])));
        assert!(matches_labels(&labels, &sel(&[("a", "1")])));
        assert!(!matches_labels(&labels, &sel(&[("a", "1"), ("c", "3")])));
        assert!(!matches_labels(&labels, &sel(&[("a", "2")])));
    }
}
