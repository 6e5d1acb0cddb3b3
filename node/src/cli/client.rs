//! The CLI's connection to the cluster: tries each `--server` address in turn.

use std::time::Duration;

use anyhow::{anyhow, bail};
use flotilla_proto::cluster_client::ClusterClient;
use flotilla_proto::objects_client::ObjectsClient;
use tonic::transport::{Channel, Endpoint};

/// A connected client to one node of the cluster.
pub(super) struct Client {
    channel: Channel,
}

impl Client {
    /// Connects to the first reachable address of the comma-separated list.
    pub(super) async fn connect(servers: &str) -> anyhow::Result<Client> {
        let addresses: Vec<&str> = servers
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        if addresses.is_empty() {
            bail!("no server address given (--server HOST:PORT or FLOTILLA_SERVER)");
        }
        let mut failures = Vec::new();
        for address in &addresses {
            let endpoint = Endpoint::from_shared(format!("http://{address}"))
                .map_err(|_| anyhow!("server address {address:?} is not HOST:PORT"))?
                .connect_timeout(Duration::from_secs(2));
            match endpoint.connect().await {
                Ok(channel) => return Ok(Client { channel }),
                Err(error) => {
                    failures.push(format!("{address}: {}", describe_transport_error(&error)))
                }
            }
        }
        bail!("cannot reach any server ({})", failures.join("; "))
    }

    pub(super) fn objects(&self) -> ObjectsClient<Channel> {
        ObjectsClient::new(self.channel.clone())
            .max_decoding_message_size(256 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024)
    }

    pub(super) fn pods(&self) -> flotilla_proto::pods_client::PodsClient<Channel> {
        flotilla_proto::pods_client::PodsClient::new(self.channel.clone())
    }

    pub(super) fn cluster(&self) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel.clone())
    }
}

fn describe_transport_error(error: &tonic::transport::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// One line for a failed call: the server's message, which names the object and the problem.
pub(super) fn status_error(status: tonic::Status) -> anyhow::Error {
    let message = status.message();
    if message.is_empty() {
        anyhow!("{}", status.code())
    } else {
        anyhow!("{message}")
    }
}
