//! Bad input against real `flotilla serve` processes: an object too large, one nested too
//! deep, garbage on the gRPC port, malformed RPCs, and a client writing faster than its rate
//! limit. Each gets a clear error, and the node keeps serving.

mod common;

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use common::{config_map, must_apply, must_get, Cluster};
use flotilla_proto::{DeleteRequest, GetRequest, ObjectRequest};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};

/// The tests start processes; on a 2-core machine they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The limits the node enforces, as its errors name them.
const MAX_OBJECT_BYTES: usize = 1536 * 1024;
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
const MAX_OBJECT_DEPTH: usize = 64;

/// One node, started with `extra_args`, ready for writes.
async fn start_one_node(extra_args: &[&str]) -> anyhow::Result<Cluster> {
    let mut cluster = Cluster::new()?;
    cluster.add_node(extra_args)?;
    cluster
        .must_wait_for(
            |s| {
                s["leader"].is_string() && s["cluster_id"].as_str().is_some_and(|id| !id.is_empty())
            },
            "the node to lead",
        )
        .await?;
    Ok(cluster)
}

/// Fails unless every node process is still running.
fn must_be_running(cluster: &mut Cluster) -> anyhow::Result<()> {
    for node in &mut cluster.nodes {
        if let Some(process) = node.process.as_mut() {
            if let Some(status) = process.try_wait()? {
                anyhow::bail!("{} exited: {status}", node.name);
            }
        }
    }
    Ok(())
}

/// A ConfigMap named `name` with `extra` as an (untyped, so unchecked) top-level field.
fn config_map_with(name: &str, extra: &str) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}"}},"extra":{extra}}}"#
    )
}

/// `levels` lists one inside the other.
fn nested_lists(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

fn request(json: impl Into<Vec<u8>>) -> ObjectRequest {
    ObjectRequest {
        object_json: json.into(),
    }
}

/// Runs the CLI and returns its stderr, failing if the command succeeded.
fn must_fail(cluster: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    let output = cluster.cli(args)?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    anyhow::ensure!(!output.status.success(), "{args:?} must fail");
    anyhow::ensure!(
        stderr.trim().lines().count() == 1,
        "one line of error: {stderr:?}"
    );
    Ok(stderr)
}

async fn must_not_exist(cluster: &Cluster, name: &str) -> anyhow::Result<()> {
    let missing = must_get(&mut cluster.objects(0).await?, "ConfigMap", name)
        .await
        .expect_err("a refused object must not be stored");
    let status = missing
        .downcast_ref::<Status>()
        .map(Status::code)
        .unwrap_or(Code::Unknown);
    anyhow::ensure!(status == Code::NotFound, "{name}: {missing}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_megabyte_object_is_refused_with_its_size_and_the_node_keeps_serving(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = start_one_node(&[]).await?;
    let blob = "x".repeat(10 * 1024 * 1024);

    // Through the CLI: refused before anything is sent, naming the object, its size and the limit.
    let path = cluster.dir.path().join("big.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: big}}\ndata:\n  blob: {blob}\n"
        ),
    )?;
    let stderr = must_fail(&cluster, &["apply", "-f", &path.display().to_string()])?;
    assert!(
        stderr.contains(&format!(
            "ConfigMap \"big\" is 10485865 bytes, more than the limit of {MAX_OBJECT_BYTES} bytes"
        )),
        "{stderr}"
    );

    // Raw over gRPC: the request itself is over the node's request limit.
    let mut client = cluster.objects(0).await?;
    let object = config_map("big", &blob);
    let refused = client
        .create(request(serde_json::to_vec(&object)?))
        .await
        .expect_err("a 10 MB create must fail");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("request to /flotilla.v1.Objects/Create is 104")
            && refused.message().ends_with(&format!(
                "bytes, more than the limit of {MAX_REQUEST_BYTES} bytes"
            )),
        "{}",
        refused.message()
    );

    // Under the request limit but over the object limit: the store's error.
    let two_megabytes = config_map("big", &"x".repeat(2 * 1024 * 1024));
    let refused = client
        .apply(request(serde_json::to_vec(&two_megabytes)?))
        .await
        .expect_err("a 2 MB object must fail");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains(&format!(
            "ConfigMap \"big\" is 2097254 bytes, more than the limit of {MAX_OBJECT_BYTES} bytes"
        )),
        "{}",
        refused.message()
    );

    must_not_exist(&cluster, "big").await?;
    must_apply(&mut client, &config_map("small", "1")).await?;
    assert_eq!(
        must_get(&mut client, "ConfigMap", "small").await?["data"]["v"],
        "1"
    );
    must_be_running(&mut cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_object_is_refused_and_one_at_the_limit_replicates_everywhere(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3).await?;
    let mut client = cluster.objects(0).await?;

    // 10,000 levels: beyond the JSON decoder's own limit. 100: decoded, refused by validation.
    for (levels, expect) in [
        (
            10_000,
            format!("the object is nested more than {MAX_OBJECT_DEPTH} levels deep"),
        ),
        (
            100,
            format!("ConfigMap \"deep\" is nested more than {MAX_OBJECT_DEPTH} levels deep"),
        ),
    ] {
        let json = config_map_with("deep", &nested_lists(levels));
        let refused = client
            .create(request(json))
            .await
            .expect_err("a deep object must fail");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(&expect), "{}", refused.message());
    }

    // The same as YAML through the CLI, flow lists and flow mappings.
    let yaml = |extra: String| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: deep}}\nextra: {extra}\n")
    };
    let deep_mappings = format!("{}1{}", "{a: ".repeat(10_000), "}".repeat(10_000));
    for (file, text, expect) in [
        (
            "lists.yaml",
            yaml(nested_lists(10_000)),
            format!("document 1 is nested more than {MAX_OBJECT_DEPTH} levels deep"),
        ),
        (
            "mappings.yaml",
            yaml(deep_mappings),
            format!("document 1 is nested more than {MAX_OBJECT_DEPTH} levels deep"),
        ),
        (
            "hundred.yaml",
            yaml(nested_lists(100)),
            format!("ConfigMap \"deep\" is nested more than {MAX_OBJECT_DEPTH} levels deep"),
        ),
    ] {
        let path = cluster.dir.path().join(file);
        std::fs::write(&path, text)?;
        let stderr = must_fail(&cluster, &["apply", "-f", &path.display().to_string()])?;
        assert!(stderr.contains(&expect), "{file}: {stderr}");
    }
    must_not_exist(&cluster, "deep").await?;

    // At the limit (the ConfigMap is one level, `extra` the other 63): stored, replicated,
    // read back from every node's own copy.
    let at_limit = config_map_with("at-limit", &nested_lists(MAX_OBJECT_DEPTH - 1));
    client.create(request(at_limit)).await?;
    for idx in 0..cluster.nodes.len() {
        let mut client = cluster.objects(idx).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = client
                .get(GetRequest {
                    kind: "ConfigMap".into(),
                    namespace: "default".into(),
                    name: "at-limit".into(),
                    local: true,
                })
                .await;
            match reply {
                Ok(reply) => {
                    let object: Value = serde_json::from_slice(&reply.into_inner().object_json)?;
                    assert!(object["extra"].is_array());
                    break;
                }
                Err(status) if Instant::now() < deadline => {
                    assert_eq!(status.code(), Code::NotFound, "{status:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => anyhow::bail!("n{}: {status:?}\n{}", idx + 1, cluster.logs()),
            }
        }
    }
    must_apply(&mut client, &config_map("after", "1")).await?;
    must_be_running(&mut cluster)
}

/// Writes `payload` on a new connection to `address` and waits until the node ends it.
async fn must_be_hung_up_on(address: &str, payload: Vec<u8>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    // The node may hang up before all of it is written.
    let _ = stream.write_all(&payload).await;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buffer = [0; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    anyhow::ensure!(
        ended.is_ok(),
        "the connection is still open after 20 s (payload of {} bytes)",
        payload.len()
    );
    Ok(started.elapsed())
}

/// Deterministic noise (xorshift64).
fn noise(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_grpc_port_is_hung_up_on_and_the_node_keeps_serving() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = start_one_node(&[]).await?;
    let address = cluster.nodes[0].address.clone();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let payloads = vec![
        ("random bytes", noise(4096)),
        (
            "an HTTP/1 request",
            b"GET /flotilla.v1.Objects/List HTTP/1.1\r\nHost: node\r\n\r\n".to_vec(),
        ),
        ("half an HTTP/2 preface", preface[..16].to_vec()),
        ("nothing at all", Vec::new()),
        ("a preface then silence", preface.clone()),
        // A SETTINGS frame header announcing 6 bytes, and 2 of them.
        (
            "a preface and half a frame",
            [preface.clone(), vec![0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3]].concat(),
        ),
        (
            "a preface and garbage frames",
            [preface, noise(512)].concat(),
        ),
    ];
    let connections: Vec<_> = payloads
        .into_iter()
        .map(|(what, payload)| {
            let address = address.clone();
            (
                what,
                tokio::spawn(async move { must_be_hung_up_on(&address, payload).await }),
            )
        })
        .collect();
    // While they are open, the node answers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut client = cluster.objects(0).await?;
    must_apply(&mut client, &config_map("during", "1")).await?;
    for (what, connection) in connections {
        let took = connection
            .await?
            .map_err(|error| anyhow::anyhow!("{what}: {error}"))?;
        eprintln!("{what}: hung up on after {took:?}");
    }
    let mut client = cluster.objects(0).await?;
    must_apply(&mut client, &config_map("after", "1")).await?;
    assert_eq!(
        must_get(&mut client, "ConfigMap", "during").await?["data"]["v"],
        "1"
    );
    must_be_running(&mut cluster)
}

/// Sends and receives message bytes as they are: a frame the generated clients cannot make.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rpcs_are_invalid_arguments_and_the_node_keeps_serving() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = start_one_node(&[]).await?;

    // Frames whose bytes are not the protobuf message the method takes.
    let mut grpc = tonic::client::Grpc::new(cluster.channel(0).await?);
    for (method, body) in [
        // Field 1 (object_json) says 16 bytes follow; one does.
        ("/flotilla.v1.Objects/Create", vec![0x0a, 0x10, 0x01]),
        // Wire type 7 does not exist.
        ("/flotilla.v1.Objects/Apply", vec![0x0f, 0x00]),
        // Field 1 (local) is a varint; none follows.
        ("/flotilla.v1.Cluster/Status", vec![0x08]),
    ] {
        grpc.ready().await?;
        let refused = grpc
            .unary::<_, Vec<u8>, _>(
                tonic::Request::new(body),
                PathAndQuery::from_static(method),
                RawCodec,
            )
            .await
            .expect_err("a malformed message must fail");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{method}: {refused:?}"
        );
        assert!(
            refused.message().starts_with(&format!(
                "request to {method} is not a valid protobuf message"
            )),
            "{method}: {}",
            refused.message()
        );
    }

    // Well-formed messages with bad content.
    let mut client = cluster.objects(0).await?;
    let cases: Vec<(&str, Result<_, Status>, &str)> = vec![
        (
            "invalid JSON",
            client.create(request("{\"kind\": ")).await.map(drop),
            "request body is not a JSON object",
        ),
        (
            "no bytes at all",
            client.apply(request(Vec::new())).await.map(drop),
            "request body is not a JSON object",
        ),
        (
            "not UTF-8",
            client.apply(request(vec![0xff, 0xfe, 0x00])).await.map(drop),
            "request body is not a JSON object",
        ),
        (
            "a list instead of an object",
            client.create(request("[1, 2]")).await.map(drop),
            "expected a JSON/YAML mapping",
        ),
        (
            "a wrongly typed field",
            client
                .apply(request(
                    r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d"},"spec":{"replicas":"three"}}"#,
                ))
                .await
                .map(drop),
            "spec.replicas",
        ),
        (
            "an unknown kind",
            client
                .create(request(r#"{"apiVersion":"v1","kind":"Widget","metadata":{"name":"w"}}"#))
                .await
                .map(drop),
            "unknown kind \"Widget\"",
        ),
        (
            "an unknown kind to delete",
            client
                .delete(DeleteRequest {
                    kind: "widgets".into(),
                    name: "w".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            "unknown kind \"widgets\"",
        ),
        (
            "a resourceVersion that is not a number",
            client
                .delete(DeleteRequest {
                    kind: "configmaps".into(),
                    name: "w".into(),
                    resource_version: "-1x".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            "resourceVersion \"-1x\" is not a resource version this cluster issued",
        ),
        (
            "a resourceVersion in the object that is not a number",
            client
                .update(request(
                    r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c","resourceVersion":"abc"}}"#,
                ))
                .await
                .map(drop),
            "ConfigMap \"c\"",
        ),
    ];
    for (what, result, expect) in cases {
        let refused = result.expect_err(what);
        assert_eq!(refused.code(), Code::InvalidArgument, "{what}: {refused:?}");
        assert!(
            refused.message().contains(expect),
            "{what}: {}",
            refused.message()
        );
    }
    must_apply(&mut client, &config_map("after", "1")).await?;
    must_be_running(&mut cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_a_clients_rate_limit_are_refused_and_pass_again_after_a_pause(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster =
        start_one_node(&["--write-rate-limit-per-second", "1", "--write-burst", "10"]).await?;
    let mut client = cluster.objects(0).await?;

    let started = Instant::now();
    let (mut passed, mut refused) = (0, Vec::new());
    for i in 0..40 {
        match client
            .apply(request(serde_json::to_vec(&config_map(
                &format!("c{i}"),
                "1",
            ))?))
            .await
        {
            Ok(_) => passed += 1,
            Err(status) => refused.push(status),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(passed >= 10, "the burst passes: {passed} of 40");
    assert!(
        f64::from(passed) <= 10.0 + elapsed + 1.0,
        "{passed} writes passed in {elapsed:.2} s"
    );
    let first = refused.first().expect("writes past the limit are refused");
    assert_eq!(first.code(), Code::ResourceExhausted, "{first:?}");
    assert!(
        first
            .message()
            .starts_with("write rate limit of 1 writes/s per client exceeded; retry in ")
            && first.message().ends_with(" ms"),
        "{}",
        first.message()
    );
    assert!(refused.iter().all(|s| s.code() == Code::ResourceExhausted));

    // The CLI shows the same message (a token comes back every second: take it first);
    // reads are not limited.
    let _ = client
        .apply(request(serde_json::to_vec(&config_map("c0", "2"))?))
        .await;
    let path = cluster.dir.path().join("one.yaml");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cli}\n",
    )?;
    let stderr = must_fail(&cluster, &["apply", "-f", &path.display().to_string()])?;
    assert!(
        stderr.contains("write rate limit of 1 writes/s per client exceeded"),
        "{stderr}"
    );
    must_get(&mut client, "ConfigMap", "c0").await?;

    // After a pause the bucket has refilled (two tokens: one write here, one by the CLI).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    must_apply(&mut client, &config_map("later", "1")).await?;
    let output = cluster.cli(&["apply", "-f", &path.display().to_string()])?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    must_be_running(&mut cluster)
}
