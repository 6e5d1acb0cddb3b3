//! The `flotilla` binary's library: a node (gRPC API, Raft member, membership manager) and the
//! CLI that talks to any node.
//!
//! Owns: the API servers, membership policy (learners, promotion), node startup and shutdown,
//! and the CLI's parsing and printing. Must not depend on RocksDB or openraft's storage
//! directly: everything about the store goes through `flotilla_raft::Replica`.

pub mod agent;
pub mod api;
pub mod cli;
pub mod control;
pub mod dns;
pub mod encryption;
pub mod events;
mod ip;
mod local_store;
pub mod membership;
pub mod proxy;
pub mod serve;
