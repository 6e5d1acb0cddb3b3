use std::io;

use futures::stream;
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::alias::EntryOf;
use openraft::type_config::TypeConfigExt;
use openraft::StorageError;
use serde_json::json;
use tempfile::TempDir;

use super::*;
use crate::selector::{FieldSelector, LabelSelector};
use crate::types::{Command, TypeConfig};
use crate::watch::WatchHub;

struct RocksBuilder;

fn open(dir: &Path) -> Result<(LogStore, StateMachine), io::Error> {
    let db = open_db(&dir.join("store")).map_err(io::Error::other)?;
    let log_store = LogStore::new(db.clone())?;
    let state_machine = StateMachine::new(db, dir.join("snapshots"), WatchHub::new())?;
    Ok((log_store, state_machine))
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = TempDir::new().map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        let (log_store, state_machine) =
            open(dir.path()).map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        Ok((dir, log_store, state_machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rocksdb_store_passes_openraft_storage_suite() {
    Suite::test_all(RocksBuilder).await.expect("storage suite");
}

fn entry(index: u64, command: Command) -> Result<EntryResponder<TypeConfig>, io::Error> {
    Ok((
        EntryOf::<TypeConfig>::new_normal(
            openraft::testing::log_id::<TypeConfig>(1, 1, index),
            command,
        ),
        None,
    ))
}

/// The entry at `index` creating the ConfigMap `name` holding `value`.
fn create_config_map(
    index: u64,
    name: &str,
    value: &str,
) -> Result<EntryResponder<TypeConfig>, io::Error> {
    entry(
        index,
        Command::Create {
            object: config_map(name, value).into(),
        },
    )
}

fn config_map(name: &str, value: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": "default", "labels": {"app": "x"}}, "data": {"v": value}})
}

fn bootstrap() -> Command {
    Command::Bootstrap {
        cluster_id: "c".into(),
        node_name: "n1".into(),
        node_address: "127.0.0.1:1".into(),
        namespaces: vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
        ],
        cluster_cidr: String::new(),
    }
}

#[tokio::test]
async fn objects_and_their_history_survive_a_reopen() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    {
        let (_log, mut machine) = open(dir.path())?;
        machine
            .apply(stream::iter(vec![
                entry(1, bootstrap()),
                create_config_map(2, "a", "1"),
                entry(
                    3,
                    Command::Apply {
                        object: config_map("a", "2").into(),
                    },
                ),
            ]))
            .await?;
    }
    let (_log, machine) = open(dir.path())?;
    let reader = machine.reader();
    let (items, rv) = reader.list(
        "ConfigMap",
        Some("default"),
        &LabelSelector::default(),
        &FieldSelector::default(),
    )?;
    assert_eq!(rv, 3);
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["data"]["v"], "2");
    assert_eq!(items[0]["metadata"]["resourceVersion"], "3");
    let history = reader.events_after(1)?;
    let kinds: Vec<_> = history
        .iter()
        .map(|e| (e.resource_version, e.event_type.as_str()))
        .collect();
    assert_eq!(kinds, vec![(2, "ADDED"), (3, "MODIFIED")]);
    Ok(())
}

#[tokio::test]
async fn a_refused_command_writes_nothing() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (_log, mut machine) = open(dir.path())?;
    machine
        .apply(stream::iter(vec![
            entry(1, bootstrap()),
            create_config_map(2, "a", "1"),
            create_config_map(3, "a", "other"),
        ]))
        .await?;
    let reader = machine.reader();
    let stored = reader
        .get(&crate::ObjectKey::new("ConfigMap", "default", "a"))?
        .expect("stored");
    assert_eq!(stored["data"]["v"], "1");
    assert_eq!(
        reader.events_after(2)?.len(),
        0,
        "a refused create records no event"
    );
    Ok(())
}

#[tokio::test]
async fn old_history_is_compacted_and_reported_expired() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (_log, mut machine) = open(dir.path())?;
    machine
        .apply(stream::iter(vec![entry(1, bootstrap())]))
        .await?;
    let total = crate::storage::state_machine::EVENT_HISTORY_ENTRIES + 1_200;
    let mut index = 2;
    while index <= total {
        let batch: Vec<_> = (index..(index + 500).min(total + 1))
            .map(|i| {
                entry(
                    i,
                    Command::Apply {
                        object: config_map("a", &i.to_string()).into(),
                    },
                )
            })
            .collect();
        index += batch.len() as u64;
        machine.apply(stream::iter(batch)).await?;
    }
    let reader = machine.reader();
    let compacted = reader.compacted_resource_version()?;
    assert!(
        compacted > 1,
        "history must be compacted, compacted at {compacted}"
    );
    assert!(matches!(
        reader.events_after(1),
        Err(crate::StoreError::Expired { .. })
    ));
    let recent = reader.events_after(compacted)?;
    assert_eq!(
        recent.first().map(|e| e.resource_version),
        Some(compacted + 1)
    );
    assert_eq!(recent.last().map(|e| e.resource_version), Some(total));
    Ok(())
}

fn node(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {}})
}

#[tokio::test]
async fn nodes_registered_together_get_distinct_pod_subnets_and_keep_them() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (_log, mut machine) = open(dir.path())?;
    machine
        .apply(stream::iter(vec![
            entry(1, bootstrap()),
            entry(
                2,
                Command::Apply {
                    object: node("a").into(),
                },
            ),
            entry(
                3,
                Command::Apply {
                    object: node("b").into(),
                },
            ),
            entry(
                4,
                Command::Apply {
                    object: node("a").into(),
                },
            ),
        ]))
        .await?;
    let reader = machine.reader();
    let cidr = |name: &str| -> anyhow::Result<String> {
        let object = reader
            .get(&crate::ObjectKey::new("Node", "", name))?
            .expect("node stored");
        Ok(object["spec"]["podCIDR"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    assert_eq!(
        cidr("a")?,
        "10.244.0.0/24",
        "re-applying a node keeps its subnet"
    );
    assert_eq!(cidr("b")?, "10.244.1.0/24");
    Ok(())
}

#[tokio::test]
async fn a_batch_applies_each_command_on_its_own_in_one_entry() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (_log, mut machine) = open(dir.path())?;
    let batch = Command::Batch(vec![
        Command::Create {
            object: config_map("a", "1").into(),
        },
        Command::Create {
            object: config_map("a", "again").into(),
        },
        Command::Create {
            object: config_map("b", "2").into(),
        },
    ]);
    machine
        .apply(stream::iter(vec![entry(1, bootstrap()), entry(2, batch)]))
        .await?;
    let reader = machine.reader();
    let a = reader
        .get(&crate::ObjectKey::new("ConfigMap", "default", "a"))?
        .expect("a stored");
    let b = reader
        .get(&crate::ObjectKey::new("ConfigMap", "default", "b"))?
        .expect("b stored");
    assert_eq!(
        a["data"]["v"], "1",
        "the failing second create changed nothing"
    );
    assert_eq!(a["metadata"]["resourceVersion"], "2");
    assert_eq!(b["metadata"]["resourceVersion"], "2");
    let events = reader.events_after(1)?;
    let positions: Vec<_> = events
        .iter()
        .map(|e| (e.resource_version, e.seq, e.key.name.clone()))
        .collect();
    assert_eq!(
        positions,
        vec![(2, 0, "a".to_string()), (2, 1, "b".to_string())]
    );
    Ok(())
}

fn service(name: &str, cluster_ip: Option<&str>) -> serde_json::Value {
    let mut spec = json!({"selector": {"app": name}, "ports": [{"port": 80}]});
    if let Some(ip) = cluster_ip {
        spec["clusterIP"] = json!(ip);
    }
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

#[tokio::test]
async fn services_get_distinct_cluster_ips_in_log_order_and_free_them_on_delete(
) -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (_log, mut machine) = open(dir.path())?;
    machine
        .apply(stream::iter(vec![
            entry(1, bootstrap()),
            entry(
                2,
                Command::Create {
                    object: service("a", None).into(),
                },
            ),
            entry(
                3,
                Command::Batch(vec![
                    Command::Create {
                        object: service("b", None).into(),
                    },
                    Command::Apply {
                        object: service("c", None).into(),
                    },
                ]),
            ),
            entry(
                4,
                Command::Apply {
                    object: service("b", None).into(),
                },
            ),
            entry(
                5,
                Command::Create {
                    object: service("taken", Some("10.96.0.3")).into(),
                },
            ),
            entry(
                6,
                Command::Delete {
                    key: crate::ObjectKey::new("Service", "default", "a"),
                    resource_version: None,
                },
            ),
            entry(
                7,
                Command::Create {
                    object: service("d", None).into(),
                },
            ),
        ]))
        .await?;
    let reader = machine.reader();
    let cluster_ip = |name: &str| -> anyhow::Result<Option<String>> {
        Ok(reader
            .get(&crate::ObjectKey::new("Service", "default", name))?
            .and_then(|s| s["spec"]["clusterIP"].as_str().map(str::to_string)))
    };
    assert_eq!(
        cluster_ip("b")?.as_deref(),
        Some("10.96.0.3"),
        "re-applying b kept its address"
    );
    assert_eq!(
        cluster_ip("c")?.as_deref(),
        Some("10.96.0.4"),
        "c saw b staged in the same entry"
    );
    assert_eq!(cluster_ip("taken")?, None, "a taken address is refused");
    assert_eq!(
        cluster_ip("d")?.as_deref(),
        Some("10.96.0.2"),
        "the deleted a's address is reused"
    );
    Ok(())
}

/// A state machine in `dir` holding the default namespace and the ConfigMap `name` (at 2).
async fn machine_holding(dir: &Path, name: &str) -> anyhow::Result<StateMachine> {
    let (_log, mut machine) = open(dir)?;
    machine
        .apply(stream::iter(vec![
            entry(1, bootstrap()),
            create_config_map(2, name, "1"),
        ]))
        .await?;
    Ok(machine)
}

#[tokio::test]
async fn a_snapshot_installed_over_recently_written_objects_replaces_them_for_later_commands(
) -> anyhow::Result<()> {
    use openraft::RaftSnapshotBuilder;

    let dir = TempDir::new()?;
    let mut machine = machine_holding(dir.path(), "written-lately").await?;
    // Another node's state, without that object, arrives as a snapshot.
    let other_dir = TempDir::new()?;
    let mut other = machine_holding(other_dir.path(), "elsewhere").await?;
    let snapshot = other.get_snapshot_builder().await.build_snapshot().await?;
    machine
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await?;
    // Creating the object again succeeds: the state machine does not remember it any more.
    machine
        .apply(stream::iter(vec![create_config_map(
            3,
            "written-lately",
            "again",
        )]))
        .await?;
    let reader = machine.reader();
    let stored = reader
        .get(&crate::ObjectKey::new(
            "ConfigMap",
            "default",
            "written-lately",
        ))?
        .expect("created again after the snapshot");
    assert_eq!(stored["data"]["v"], "again");
    assert_eq!(stored["metadata"]["resourceVersion"], "3");
    Ok(())
}

#[tokio::test]
async fn a_command_on_an_object_written_by_an_earlier_apply_sees_its_latest_state(
) -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let mut machine = machine_holding(dir.path(), "a").await?;
    let mut stale = config_map("a", "stale");
    stale["metadata"]["resourceVersion"] = json!("1");
    let mut current = config_map("a", "2");
    current["metadata"]["resourceVersion"] = json!("2");
    for (index, object) in [(3, stale), (4, current)] {
        machine
            .apply(stream::iter(vec![entry(
                index,
                Command::Update {
                    object: object.into(),
                    part: crate::types::UpdatePart::Main,
                },
            )]))
            .await?;
    }
    machine
        .apply(stream::iter(vec![entry(
            5,
            Command::Delete {
                key: crate::ObjectKey::new("ConfigMap", "default", "a"),
                resource_version: Some(4),
            },
        )]))
        .await?;
    let history: Vec<_> = machine
        .reader()
        .events_after(2)?
        .iter()
        .map(|e| (e.resource_version, e.event_type.as_str()))
        .collect();
    // The stale update was refused (Conflict), the current one and the delete applied.
    assert_eq!(history, vec![(4, "MODIFIED"), (5, "DELETED")]);
    assert!(machine
        .reader()
        .get(&crate::ObjectKey::new("ConfigMap", "default", "a"))?
        .is_none());
    Ok(())
}

/// The entry at `index` deleting the ConfigMap `name`.
fn delete_config_map(index: u64, name: &str) -> Result<EntryResponder<TypeConfig>, io::Error> {
    entry(
        index,
        Command::Delete {
            key: crate::ObjectKey::new("ConfigMap", "default", name),
            resource_version: None,
        },
    )
}

#[tokio::test]
async fn a_kind_version_moves_with_writes_of_that_kind_only_and_with_an_installed_snapshot(
) -> anyhow::Result<()> {
    use openraft::RaftSnapshotBuilder;

    let dir = TempDir::new()?;
    let mut machine = machine_holding(dir.path(), "a").await?;
    let reader = machine.reader();
    let config_maps = reader.kind_version("ConfigMap");
    let nodes = reader.kind_version("Node");
    machine
        .apply(stream::iter(vec![entry(
            3,
            Command::Create {
                object: node("n1").into(),
            },
        )]))
        .await?;
    assert_eq!(
        reader.kind_version("ConfigMap"),
        config_maps,
        "no ConfigMap written"
    );
    assert_ne!(reader.kind_version("Node"), nodes, "a Node created");

    let config_maps = reader.kind_version("ConfigMap");
    machine
        .apply(stream::iter(vec![delete_config_map(4, "a")]))
        .await?;
    assert_ne!(
        reader.kind_version("ConfigMap"),
        config_maps,
        "a ConfigMap deleted"
    );

    // A refused command writes nothing, so the version stands.
    let config_maps = reader.kind_version("ConfigMap");
    machine
        .apply(stream::iter(vec![delete_config_map(5, "a")]))
        .await?;
    assert_eq!(reader.kind_version("ConfigMap"), config_maps);

    let other_dir = TempDir::new()?;
    let mut other = machine_holding(other_dir.path(), "elsewhere").await?;
    let snapshot = other.get_snapshot_builder().await.build_snapshot().await?;
    let nodes = reader.kind_version("Node");
    machine
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await?;
    assert_ne!(
        reader.kind_version("ConfigMap"),
        config_maps,
        "the store was replaced"
    );
    assert_ne!(reader.kind_version("Node"), nodes, "the store was replaced");
    Ok(())
}
