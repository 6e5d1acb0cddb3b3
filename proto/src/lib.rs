//! Wire formats of Flotilla: the gRPC services for objects, the cluster and Raft, generated
//! from `proto/flotilla.proto`.
//!
//! This crate owns only message and service definitions. It must not depend on any other
//! Flotilla crate, on openraft, or on RocksDB: both sides of every connection link it.

#![allow(unreachable_pub, clippy::all)]

/// Version 1 of the Flotilla API.
pub mod v1 {
    tonic::include_proto!("flotilla.v1");
}

pub use v1::*;
