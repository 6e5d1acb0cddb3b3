//! The server side of node-to-node traffic: Raft RPCs, forwarded writes and read indexes.

use std::io::Cursor;
use std::pin::Pin;

use flotilla_proto::raft_server;
use flotilla_proto::{
    NodeHeartbeatReply, NodeHeartbeatRequest, RaftMessage, ReadIndexReply, ReadIndexRequest,
    SnapshotChunk,
};
use futures::Stream;
use openraft::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::ReadPolicy;
use serde::Serialize;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::liveness::{self, NodeHeartbeats};
use crate::network::{decode, encode};
use crate::proposer::Proposer;
use crate::types::{Command, TypeConfig};
use crate::Raft;

/// The most commands one forwarded `Propose` call may carry (a follower sends at most 128).
const MAX_FORWARDED_COMMANDS: usize = 1024;

/// The largest snapshot a node accepts from a peer.
const MAX_SNAPSHOT_BYTES: usize = 4 * 1024 * 1024 * 1024;

/// Serves `flotilla.v1.Raft` for one node.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
    heartbeats: NodeHeartbeats,
    proposer: Proposer,
}

impl RaftService {
    pub fn new(raft: Raft, heartbeats: NodeHeartbeats, proposer: Proposer) -> RaftService {
        RaftService {
            raft,
            heartbeats,
            proposer,
        }
    }
}

fn reply<T: Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    Ok(Response::new(RaftMessage {
        payload_json: encode(value).map_err(Status::internal)?,
    }))
}

fn bad_message(error: String) -> Status {
    Status::invalid_argument(format!("malformed Raft message: {error}"))
}

/// The status a forwarder retries on: the write was not taken, ask the leader again.
pub(crate) const NOT_LEADER_PREFIX: &str = "not the leader";

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let request: AppendEntriesRequest<TypeConfig> =
            decode(&request.into_inner().payload_json).map_err(bad_message)?;
        let response = self
            .raft
            .append_entries(request)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        reply(&response)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let request: VoteRequest<TypeConfig> =
            decode(&request.into_inner().payload_json).map_err(bad_message)?;
        let response = self
            .raft
            .vote(request)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        reply(&response)
    }

    async fn pre_vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let request: VoteRequest<TypeConfig> =
            decode(&request.into_inner().payload_json).map_err(bad_message)?;
        let response = self
            .raft
            .pre_vote(request)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        reply(&response)
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut chunks = request.into_inner();
        let first = chunks
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let (vote, meta): (VoteOf<TypeConfig>, SnapshotMetaOf<TypeConfig>) =
            decode(&first.header_json).map_err(bad_message)?;
        let mut data = first.data;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if data.len() + chunk.data.len() > MAX_SNAPSHOT_BYTES {
                return Err(Status::resource_exhausted("snapshot larger than the limit"));
            }
            data.extend_from_slice(&chunk.data);
        }
        let snapshot = SnapshotOf::<TypeConfig, Cursor<Vec<u8>>> {
            meta,
            snapshot: Cursor::new(data),
        };
        let response = self
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        reply(&response)
    }

    async fn propose(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let commands = forwarded_commands(&request.into_inner().payload_json)?;
        // Each command goes to the proposer on its own (so forwarded writes share log entries
        // with everyone else's) and has its own outcome; queued in order.
        let outcomes = futures::future::join_all(
            commands
                .into_iter()
                .map(|command| self.proposer.propose(command)),
        )
        .await;
        reply(&outcomes)
    }

    async fn read_index(
        &self,
        _request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexReply>, Status> {
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(read_log_id) => Ok(Response::new(ReadIndexReply {
                read_index: read_log_id.index(),
            })),
            Err(error) if error.forward_to_leader().is_some() => {
                Err(Status::unavailable(format!("{NOT_LEADER_PREFIX}: {error}")))
            }
            Err(error) => Err(Status::unavailable(format!("confirm leadership: {error}"))),
        }
    }

    async fn heartbeat(
        &self,
        request: Request<NodeHeartbeatRequest>,
    ) -> Result<Response<NodeHeartbeatReply>, Status> {
        let node_name = request.into_inner().node_name;
        if node_name.is_empty() {
            return Err(Status::invalid_argument("a heartbeat must name its node"));
        }
        if !self.raft.is_leader() {
            return Err(Status::unavailable(format!(
                "{NOT_LEADER_PREFIX}: heartbeats go to the leader"
            )));
        }
        self.heartbeats.record(&node_name, liveness::now_ms());
        Ok(Response::new(NodeHeartbeatReply {}))
    }
}

/// The commands of a forwarded `Propose` call: a JSON list of at most
/// `MAX_FORWARDED_COMMANDS`.
fn forwarded_commands(payload_json: &[u8]) -> Result<Vec<Command>, Status> {
    let commands: Vec<Command> = decode(payload_json).map_err(bad_message)?;
    if commands.len() > MAX_FORWARDED_COMMANDS {
        return Err(bad_message(format!(
            "{} forwarded commands in one call, at most {MAX_FORWARDED_COMMANDS} allowed",
            commands.len()
        )));
    }
    Ok(commands)
}

/// A stream type for servers that send boxed streams.
pub type BoxedStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn delete(name: &str) -> Command {
        Command::Delete {
            key: crate::ObjectKey::new("ConfigMap", "default", name),
            resource_version: None,
        }
    }

    #[test]
    fn a_forwarded_call_carries_a_list_of_commands() {
        let payload = encode(&vec![delete("a"), delete("b")]).unwrap_or_default();
        let commands = forwarded_commands(&payload).map_err(|status| status.message().to_owned());
        assert_eq!(commands, Ok(vec![delete("a"), delete("b")]));
    }

    #[test]
    fn a_forwarded_call_that_is_not_a_list_or_too_long_is_refused_as_malformed() {
        let single = encode(&delete("a")).unwrap_or_default();
        let too_many = encode(&vec![delete("a"); MAX_FORWARDED_COMMANDS + 1]).unwrap_or_default();
        for (payload, says) in [
            (single, "malformed Raft message: decode message"),
            (
                b"{not json".to_vec(),
                "malformed Raft message: decode message",
            ),
            (
                too_many,
                "1025 forwarded commands in one call, at most 1024 allowed",
            ),
        ] {
            let Err(status) = forwarded_commands(&payload) else {
                panic!("{says}: accepted");
            };
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains(says), "{}", status.message());
        }
    }
}
