//! The CLI's connection to the cluster: mutual TLS with the credentials file's certificate,
//! each server address tried in turn.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use flotilla_proto::cluster_client::ClusterClient;
use flotilla_proto::objects_client::ObjectsClient;
use tonic::transport::{Channel, Endpoint};

use flotilla_pki::credentials::{default_path, CredentialsFile};

/// Which cluster the CLI talks to and as whom.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Node addresses to talk to, HOST:PORT[,HOST:PORT...]; the next is tried when one is down
    /// (default: the credentials file's servers).
    #[arg(long, global = true, env = "FLOTILLA_SERVER")]
    pub server: Option<String>,
    /// The credentials file (default: ~/.flotilla/config.json; `serve --init` writes the
    /// admin's to <data-dir>/admin.json).
    #[arg(long, global = true, env = "FLOTILLA_CONFIG")]
    pub config: Option<PathBuf>,
}

impl Target {
    pub(super) fn credentials_path(&self) -> anyhow::Result<PathBuf> {
        self.config
            .clone()
            .or_else(default_path)
            .context("no credentials file: pass --config or set FLOTILLA_CONFIG")
    }

    fn credentials(&self) -> anyhow::Result<CredentialsFile> {
        let path = self.credentials_path()?;
        if !path.exists() {
            bail!(
                "no credentials file at {} (`serve --init` writes the admin's to <data-dir>/admin.json; pass it with --config or FLOTILLA_CONFIG)",
                path.display()
            );
        }
        Ok(CredentialsFile::read(&path)?)
    }
}

/// A connected client to one node of the cluster.
pub(super) struct Client {
    channel: Channel,
}

impl Client {
    /// Connects to the first reachable address of `--server`, else of the credentials file.
    pub(super) async fn connect(target: &Target) -> anyhow::Result<Client> {
        let credentials = target.credentials()?;
        let servers = match &target.server {
            Some(servers) => servers.clone(),
            None => credentials.servers.join(","),
        };
        let addresses: Vec<&str> = servers
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        if addresses.is_empty() {
            bail!("no server address given (--server HOST:PORT, FLOTILLA_SERVER or the credentials file)");
        }
        let tls = credentials.client_tls()?;
        let mut failures = Vec::new();
        for address in &addresses {
            let endpoint = Endpoint::from_shared(format!("http://{address}"))
                .map_err(|_| anyhow!("server address {address:?} is not HOST:PORT"))?
                .connect_timeout(Duration::from_secs(2));
            match flotilla_pki::transport::connect(&endpoint, tls.clone()).await {
                Ok(channel) => return Ok(Client { channel }),
                Err(error) => failures.push(format!(
                    "{address}: {}",
                    crate::serve::describe_error(&error)
                )),
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

/// One line for a failed call: the server's message, which names the object and the problem.
pub(super) fn status_error(status: tonic::Status) -> anyhow::Error {
    let message = status.message();
    if message.is_empty() {
        anyhow!("{}", status.code())
    } else {
        anyhow!("{message}")
    }
}
