//! The chaos harness and benchmarks of Flotilla. It starts real clusters on 127.0.0.1, each
//! node a `flotilla serve` process (or an `etcd` member, for comparison) with its own temporary
//! data directory, kills and restarts their processes by the PIDs it spawned, and drives load
//! through the same gRPC APIs that clients use. Its binaries, such as `bench-writes`, are
//! programs run by hand, not tests.
//!
//! Every process and directory the harness creates belongs to a guard that kills the process
//! (by PID) and removes the directory when it is dropped, so an error or a panic never leaves a
//! cluster behind.

pub mod broken;
pub mod cluster;
pub mod docker;
pub mod history;
pub mod linearizability;
pub mod process;
pub mod runner;
pub mod scenarios;
pub mod simulated;
pub mod stats;
pub mod workload;

/// The subset of etcd's v3 gRPC API (`etcdserverpb`) that the benchmarks use: `KV.Put`.
pub mod etcdserverpb {
    #![allow(unreachable_pub, clippy::all)]
    tonic::include_proto!("etcdserverpb");
}
