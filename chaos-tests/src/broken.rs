//! A deliberately broken store, for testing the checker: a proxy in front of a real node
//! that acknowledges every write at once and commits it afterwards, in the background (the
//! classic bug of acknowledging before commit). Reads go through to the node. Never use it
//! for anything but showing that the checker catches such a store.

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_proto::objects_client::ObjectsClient;
use flotilla_proto::objects_server::{Objects, ObjectsServer};
use flotilla_proto::{
    DeleteRequest, GetRequest, ListReply, ListRequest, ObjectReply, ObjectRequest, WatchEvent,
    WatchRequest,
};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::cluster::connect;

struct AckBeforeCommit {
    node: ObjectsClient<Channel>,
}

impl AckBeforeCommit {
    /// Acknowledges `request` now and sends it to the node later, ignoring the outcome.
    fn acknowledge_then_forward<F>(
        &self,
        request: ObjectRequest,
        forward: F,
    ) -> Response<ObjectReply>
    where
        F: FnOnce(ObjectsClient<Channel>, ObjectRequest) -> JoinHandle<()>,
    {
        let reply = ObjectReply {
            object_json: request.object_json.clone(),
            outcome: "configured".into(),
        };
        // Detached: the acknowledgement does not wait for the commit; that is the bug.
        drop(forward(self.node.clone(), request));
        Response::new(reply)
    }
}

type WatchStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Objects for AckBeforeCommit {
    async fn create(
        &self,
        request: Request<ObjectRequest>,
    ) -> Result<Response<ObjectReply>, Status> {
        Ok(
            self.acknowledge_then_forward(request.into_inner(), |mut node, request| {
                tokio::spawn(async move {
                    let _ = node.create(request).await;
                })
            }),
        )
    }

    async fn apply(
        &self,
        request: Request<ObjectRequest>,
    ) -> Result<Response<ObjectReply>, Status> {
        Ok(
            self.acknowledge_then_forward(request.into_inner(), |mut node, request| {
                tokio::spawn(async move {
                    let _ = node.apply(request).await;
                })
            }),
        )
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<ObjectReply>, Status> {
        self.node.clone().get(request.into_inner()).await
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListReply>, Status> {
        self.node.clone().list(request.into_inner()).await
    }

    async fn update(
        &self,
        request: Request<ObjectRequest>,
    ) -> Result<Response<ObjectReply>, Status> {
        Ok(
            self.acknowledge_then_forward(request.into_inner(), |mut node, request| {
                tokio::spawn(async move {
                    let _ = node.update(request).await;
                })
            }),
        )
    }

    async fn update_status(
        &self,
        request: Request<ObjectRequest>,
    ) -> Result<Response<ObjectReply>, Status> {
        self.node.clone().update_status(request.into_inner()).await
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<ObjectReply>, Status> {
        self.node.clone().delete(request.into_inner()).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("the broken store serves no watches"))
    }
}

/// A running broken proxy; dropping it stops it.
pub struct BrokenProxy {
    pub addr: SocketAddr,
    server: JoinHandle<()>,
}

impl Drop for BrokenProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl BrokenProxy {
    /// Starts a proxy on 127.0.0.1 in front of the node at `node`.
    pub async fn start(node: SocketAddr) -> anyhow::Result<BrokenProxy> {
        let channel = connect(node, Duration::from_secs(3)).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        crate::cluster::serves_plain(addr);
        let service = ObjectsServer::new(AckBeforeCommit {
            node: ObjectsClient::new(channel),
        });
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(BrokenProxy { addr, server })
    }
}
