//! `hci.v1.EventService`: the event log ([`crate::events`]).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::Api;
use super::status::to_status;
use crate::events;
use crate::proto;
use crate::proto::event_service_server::EventService;

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;

#[tonic::async_trait]
impl EventService for Api {
    async fn list(
        &self,
        req: Request<proto::ListEventsRequest>,
    ) -> Result<Response<proto::ListEventsResponse>, Status> {
        let req = req.into_inner();
        let store = self.resources().state_store();
        let events = events::list(store.as_ref(), &req.kind, &req.name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::ListEventsResponse {
            events: events.into_iter().map(Into::into).collect(),
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<proto::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let req = req.into_inner();
        let store = self.resources().state_store();
        let stream = events::watch(store.as_ref(), &req.kind, &req.name, req.from_now)
            .await
            .map_err(to_status)?;
        Ok(Response::new(
            stream.map(|e| e.map(Into::into).map_err(to_status)).boxed(),
        ))
    }
}
