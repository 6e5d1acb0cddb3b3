//! The audit log: one JSON line per write (and per denied call) served by this node, in
//! `<data_dir>/audit.log`, rotated to `audit.log.1` past [`MAX_AUDIT_LOG_BYTES`]. One task owns
//! the file; callers send records through a bounded channel. Records carry who, the verb, the
//! object and the result, never an object's content.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const MAX_AUDIT_LOG_BYTES: u64 = 16 * 1024 * 1024;
const QUEUE_LENGTH: usize = 4096;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub time: String,
    pub user: String,
    pub verb: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// `allowed`, `denied: …` or `failed: …`.
    pub result: String,
}

/// The sending side, cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    sender: mpsc::Sender<AuditRecord>,
}

impl AuditLog {
    /// Starts the writer of `<data_dir>/audit.log`; it drains what was sent and stops on
    /// `shutdown`.
    pub fn start(data_dir: &Path, shutdown: CancellationToken) -> AuditLog {
        let (sender, receiver) = mpsc::channel(QUEUE_LENGTH);
        let path = data_dir.join("audit.log");
        tokio::spawn(write_records(path, receiver, shutdown));
        AuditLog { sender }
    }

    pub async fn record(&self, record: AuditRecord) {
        if self.sender.send(record).await.is_err() {
            tracing::warn!("the audit log is closed; a record was not written");
        }
    }
}

fn append(path: &Path, records: &[AuditRecord]) -> std::io::Result<()> {
    if std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) > MAX_AUDIT_LOG_BYTES {
        std::fs::rename(path, path.with_extension("log.1"))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut buffer = Vec::new();
    for record in records {
        serde_json::to_writer(&mut buffer, record)?;
        buffer.push(b'\n');
    }
    file.write_all(&buffer)
}

async fn write_records(
    path: PathBuf,
    mut receiver: mpsc::Receiver<AuditRecord>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            record = receiver.recv() => record,
            _ = shutdown.cancelled() => {
                receiver.close();
                receiver.recv().await
            }
        };
        let Some(first) = first else { return };
        let mut records = vec![first];
        while let Ok(record) = receiver.try_recv() {
            records.push(record);
        }
        let writing = path.clone();
        let result = tokio::task::spawn_blocking(move || append(&writing, &records)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(%error, path = %path.display(), "write audit records")
            }
            Err(error) => tracing::error!(%error, "audit writer task"),
        }
    }
}
