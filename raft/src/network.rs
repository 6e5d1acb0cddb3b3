//! The Raft network: one persistent gRPC channel per peer address, openraft's messages as JSON.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::raft_client::RaftClient;
use flotilla_proto::{RaftMessage, SnapshotChunk};
use openraft::alias::{SnapshotOf, VoteOf};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::RaftNetworkV2;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::types::{ClusterNode, TypeConfig};

/// Snapshot data is streamed in chunks of this size.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// gRPC messages between nodes may be large (snapshots are chunked, append batches are not).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("peer address {address:?} is not a valid HOST:PORT")]
    BadAddress {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// The gRPC channels to peers, keyed by address; a channel reconnects by itself and is shared
/// by every client of that peer (Raft replication, forwarded writes, reads).
#[derive(Clone, Debug)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Mutual TLS: this node's certificate, peers verified against the cluster's CAs.
    tls: Arc<rustls::ClientConfig>,
}

impl PeerChannels {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> PeerChannels {
        PeerChannels {
            channels: Arc::default(),
            tls,
        }
    }

    pub fn channel(&self, address: &str) -> Result<Channel, ChannelError> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|source| ChannelError::BadAddress {
                address: address.to_string(),
                source,
            })?
            .connect_timeout(Duration::from_millis(500))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = flotilla_pki::transport::lazy_channel(&endpoint, self.tls.clone());
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    pub fn raft_client(&self, address: &str) -> Result<RaftClient<Channel>, ChannelError> {
        Ok(RaftClient::new(self.channel(address)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// Creates a client per replication stream; all share the peer's channel.
#[derive(Clone)]
pub struct Network {
    pub channels: PeerChannels,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &ClusterNode) -> PeerClient {
        PeerClient {
            target,
            address: node.address.clone(),
            client: self
                .channels
                .raft_client(&node.address)
                .map_err(|e| e.to_string()),
        }
    }
}

/// The client of one peer.
pub struct PeerClient {
    target: u64,
    address: String,
    client: Result<RaftClient<Channel>, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PeerError(String);

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|e| format!("encode message: {e}"))
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("decode message: {e}"))
}

fn unreachable_error(message: String) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&PeerError(message)))
}

fn network_error(message: String) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&PeerError(message)))
}

fn status_error(status: tonic::Status) -> RPCError<TypeConfig> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            unreachable_error(status.message().to_string())
        }
        _ => network_error(format!("{}: {}", status.code(), status.message())),
    }
}

impl PeerClient {
    async fn call<Req, Resp, F, Fut>(
        &mut self,
        request: &Req,
        option: &RPCOption,
        rpc: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, RaftMessage) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftMessage>, tonic::Status>>,
    {
        let client = self.client.clone().map_err(unreachable_error)?;
        let message = RaftMessage {
            payload_json: encode(request).map_err(network_error)?,
        };
        let reply = tokio::time::timeout(option.hard_ttl(), rpc(client, message))
            .await
            .map_err(|_| {
                unreachable_error(format!(
                    "node {} at {} did not answer in time",
                    self.target, self.address
                ))
            })?
            .map_err(status_error)?;
        decode(&reply.into_inner().payload_json).map_err(network_error)
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = std::io::Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(
            &request,
            &option,
            |mut c, m| async move { c.append(m).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        request: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&request, &option, |mut c, m| async move { c.vote(m).await })
            .await
    }

    async fn pre_vote(
        &mut self,
        request: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(
            &request,
            &option,
            |mut c, m| async move { c.pre_vote(m).await },
        )
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, Self::SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client.clone().map_err(unreachable_error)?;
        let header = encode(&(vote, snapshot.meta)).map_err(network_error)?;
        let data = snapshot.snapshot.into_inner();
        let mut chunks = Vec::with_capacity(data.len() / SNAPSHOT_CHUNK_BYTES + 1);
        chunks.push(SnapshotChunk {
            header_json: header,
            data: Vec::new(),
        });
        for piece in data.chunks(SNAPSHOT_CHUNK_BYTES) {
            chunks.push(SnapshotChunk {
                header_json: Vec::new(),
                data: piece.to_vec(),
            });
        }
        let send = client.snapshot(tokio_stream::iter(chunks));
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            reply = tokio::time::timeout(option.hard_ttl().max(Duration::from_secs(30)), send) => reply,
        };
        let reply = reply
            .map_err(|_| {
                StreamingError::from(unreachable_error(format!(
                    "node {} did not take the snapshot in time",
                    self.target
                )))
            })?
            .map_err(|status| StreamingError::from(status_error(status)))?;
        decode(&reply.into_inner().payload_json).map_err(|e| StreamingError::from(network_error(e)))
    }
}
