//! The object state machine: objects, their event history and the node registry in RocksDB.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Cursor};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::{Stream, TryStreamExt};
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rocksdb::{Direction, IteratorMode, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::recent_objects::{Cached, RecentObjects};
use super::{
    cf, decode_error, encode_error, index_from_key, index_key, rocks_error, CF_EVENTS, CF_OBJECTS,
    CF_SM_META,
};
use crate::object::ObjectKey;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{self, services, Decision, StoreError};
use crate::types::{
    Applied, Command, CommandResponse, Outcome, SharedObject, TypeConfig, UpdatePart,
};
use crate::watch::{WatchHub, WatchRecord};

/// How many log entries of event history are kept for watchers to resume from.
pub(crate) const EVENT_HISTORY_ENTRIES: u64 = 10_000;
/// History is compacted in steps of this many entries, not on every apply.
const EVENT_COMPACTION_STEP: u64 = 1_000;

const KEY_LAST_APPLIED: &[u8] = b"last_applied";
const KEY_LAST_MEMBERSHIP: &[u8] = b"last_membership";
const KEY_REGISTRY: &[u8] = b"registry";
const KEY_COMPACTED: &[u8] = b"compacted_rv";

/// Node names and their Raft ids. Ids are handed out in order and never reused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    pub cluster_id: String,
    /// The `/16` node pod subnets come from (empty: the default).
    #[serde(default)]
    pub cluster_cidr: String,
    pub next_node_id: u64,
    pub nodes: BTreeMap<String, u64>,
}

/// Everything a snapshot carries, in one JSON document.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotBody {
    pub registry: Registry,
    pub compacted_resource_version: u64,
    pub objects: Vec<Value>,
    pub events: Vec<WatchRecord>,
}

/// Read access to the state machine's data for the API: safe to use from any task while the
/// state machine applies (RocksDB batches are atomic).
#[derive(Clone, Debug)]
pub struct StoreReader {
    db: Arc<DB>,
    kind_writes: Arc<Mutex<KindWrites>>,
}

/// How many objects of each kind this process wrote to the store, and how many times it
/// replaced the whole store (a snapshot installed). Counted after each write is visible.
#[derive(Debug, Default)]
struct KindWrites {
    replaced: u64,
    writes: HashMap<String, u64>,
}

impl KindWrites {
    /// Counts a write of the object at `storage_key` (`Kind/namespace/name`).
    fn wrote(&mut self, storage_key: &str) {
        let kind = storage_key.split('/').next().unwrap_or_default();
        match self.writes.get_mut(kind) {
            Some(count) => *count += 1,
            None => {
                self.writes.insert(kind.to_string(), 1);
            }
        }
    }
}

/// The version of one kind's objects in this process's store (`StoreReader::kind_version`):
/// read before a scan of the kind, an equal version later means no object of the kind was
/// written since, so what the scan read still stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindVersion {
    /// Snapshots installed.
    pub replaced: u64,
    /// Objects of the kind written.
    pub writes: u64,
}

fn internal(error: io::Error) -> StoreError {
    StoreError::Invalid {
        reason: format!("storage error: {error}"),
    }
}

impl StoreReader {
    fn new(db: Arc<DB>, kind_writes: Arc<Mutex<KindWrites>>) -> StoreReader {
        StoreReader { db, kind_writes }
    }

    /// The version of the objects of `kind` (see `KindVersion`).
    pub fn kind_version(&self, kind: &str) -> KindVersion {
        let kind_writes = lock(&self.kind_writes);
        KindVersion {
            replaced: kind_writes.replaced,
            writes: kind_writes.writes.get(kind).copied().unwrap_or(0),
        }
    }

    fn meta<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> Result<Option<T>, io::Error> {
        read_json(&self.db, CF_SM_META, key)
    }

    /// The resourceVersion of the whole store: the last applied log index.
    pub fn applied_resource_version(&self) -> Result<u64, StoreError> {
        let applied: Option<LogIdOf<TypeConfig>> = self.meta(KEY_LAST_APPLIED).map_err(internal)?;
        Ok(applied.map(|id| id.index()).unwrap_or(0))
    }

    pub fn compacted_resource_version(&self) -> Result<u64, StoreError> {
        Ok(self
            .meta::<u64>(KEY_COMPACTED)
            .map_err(internal)?
            .unwrap_or(0))
    }

    pub fn registry(&self) -> Result<Registry, StoreError> {
        Ok(self
            .meta(KEY_REGISTRY)
            .map_err(internal)?
            .unwrap_or_default())
    }

    pub fn get(&self, key: &ObjectKey) -> Result<Option<Value>, StoreError> {
        read_json(&self.db, CF_OBJECTS, key.storage_key().as_bytes()).map_err(internal)
    }

    /// Objects of `kind` in `namespace` (all if `None`) matching both selectors, in key order,
    /// with the store's resourceVersion they were read at.
    pub fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Result<(Vec<Value>, u64), StoreError> {
        let snapshot = self.db.snapshot();
        let cf_objects = cf(&self.db, CF_OBJECTS).map_err(internal)?;
        let cf_meta = cf(&self.db, CF_SM_META).map_err(internal)?;
        let applied: Option<LogIdOf<TypeConfig>> = match snapshot.get_cf(cf_meta, KEY_LAST_APPLIED)
        {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes)
                .map_err(|e| internal(decode_error("last applied", e)))?,
            Ok(None) => None,
            Err(e) => return Err(internal(rocks_error(e))),
        };
        let prefix = ObjectKey::storage_prefix(kind, namespace);
        let mut items = Vec::new();
        let mut undecodable = None;
        scan_objects(
            &snapshot,
            cf_objects,
            &prefix,
            |_, value| match serde_json::from_slice::<Value>(value) {
                Ok(object) if labels.matches(&object) && fields.matches(&object) => {
                    items.push(object)
                }
                Ok(_) => {}
                Err(error) => {
                    undecodable.get_or_insert(error);
                }
            },
        )?;
        if let Some(error) = undecodable {
            return Err(internal(decode_error("object", error)));
        }
        Ok((items, applied.map(|id| id.index()).unwrap_or(0)))
    }

    /// Calls `visit` with the storage key and stored JSON of every object of `kind`, in key
    /// order, without parsing them (for callers that cache what they parsed before).
    pub fn for_each_raw(
        &self,
        kind: &str,
        mut visit: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), StoreError> {
        let snapshot = self.db.snapshot();
        let cf_objects = cf(&self.db, CF_OBJECTS).map_err(internal)?;
        let prefix = ObjectKey::storage_prefix(kind, None);
        scan_objects(&snapshot, cf_objects, &prefix, |key, value| {
            visit(key, value)
        })
    }

    /// The stored events with a resourceVersion above `after`; `Expired` when some of them
    /// were compacted away.
    pub fn events_after(&self, after: u64) -> Result<Vec<WatchRecord>, StoreError> {
        let compacted = self.compacted_resource_version()?;
        if after < compacted {
            return Err(StoreError::Expired {
                requested: after,
                oldest: compacted,
            });
        }
        let cf_events = cf(&self.db, CF_EVENTS).map_err(internal)?;
        let start = index_key(after.saturating_add(1));
        let mut records = Vec::new();
        for item in self
            .db
            .iterator_cf(cf_events, IteratorMode::From(&start, Direction::Forward))
        {
            let (_, value) = item.map_err(|e| internal(rocks_error(e)))?;
            records.push(
                serde_json::from_slice(&value).map_err(|e| internal(decode_error("event", e)))?,
            );
        }
        Ok(records)
    }

    /// A digest of every object and the registry, to compare nodes' states.
    pub fn state_digest(&self) -> Result<String, StoreError> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        let cf_objects = cf(&self.db, CF_OBJECTS).map_err(internal)?;
        let mut count = 0u64;
        for item in self.db.iterator_cf(cf_objects, IteratorMode::Start) {
            let (key, value) = item.map_err(|e| internal(rocks_error(e)))?;
            key.hash(&mut hasher);
            value.hash(&mut hasher);
            count += 1;
        }
        Ok(format!("{count}:{:016x}", hasher.finish()))
    }
}

/// Calls `visit` with the key and stored JSON of every object whose storage key starts with
/// `prefix`, in key order, as of `snapshot`.
fn scan_objects(
    snapshot: &rocksdb::Snapshot<'_>,
    cf_objects: &rocksdb::ColumnFamily,
    prefix: &str,
    mut visit: impl FnMut(&[u8], &[u8]),
) -> Result<(), StoreError> {
    // The raw iterator lends each key and value in place: the boxed iterator copied every
    // object of the kind into two fresh allocations, a tenth of a busy leader's CPU.
    let mut iter = snapshot.raw_iterator_cf(cf_objects);
    iter.seek(prefix.as_bytes());
    while let Some((key, value)) = iter.item() {
        if !key.starts_with(prefix.as_bytes()) {
            break;
        }
        visit(key, value);
        iter.next();
    }
    iter.status().map_err(|e| internal(rocks_error(e)))
}

fn read_json<T: for<'de> Deserialize<'de>>(
    db: &DB,
    cf_name: &str,
    key: &[u8],
) -> Result<Option<T>, io::Error> {
    let Some(bytes) = db.get_cf(cf(db, cf_name)?, key).map_err(rocks_error)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| decode_error(cf_name, e))
}

/// A lock on what the state machine shares with its readers besides the store (the recent
/// objects, the write counts), also after a panic elsewhere: neither is the store itself.
fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn to_json<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, io::Error> {
    serde_json::to_vec(value).map_err(|e| encode_error(what, e))
}

fn event_key(rv: u64, seq: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&rv.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// A snapshot as stored on disk: its metadata and its body.
type SnapshotFile = (SnapshotMetaOf<TypeConfig>, Vec<u8>);

/// The state machine. The only writer of the objects, events and registry column families.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    hub: WatchHub,
    snapshot_dir: PathBuf,
    /// Objects written lately, parsed; taken by each `apply` and put back after its write.
    recent: Arc<Mutex<RecentObjects>>,
    /// Shared with the readers.
    kind_writes: Arc<Mutex<KindWrites>>,
}

/// What an object command writes, for the spec fields the state machine assigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpecWrite {
    Create,
    /// Apply or update of the main part.
    Replace,
    StatusOnly,
}

/// Writes of one `apply` call, staged so that later commands in the batch see earlier ones.
struct Staged<'a> {
    db: &'a DB,
    batch: WriteBatch,
    objects: HashMap<String, Option<SharedObject>>,
    /// What the store held before this batch, for the keys written lately.
    recent: &'a RecentObjects,
    /// Whether each namespace asked about exists in the store (before this batch's writes).
    stored_namespaces: HashMap<String, bool>,
    registry: Registry,
    registry_changed: bool,
    events: Vec<WatchRecord>,
}

impl Staged<'_> {
    fn lookup(&self, key: &ObjectKey) -> Result<Option<SharedObject>, io::Error> {
        let storage_key = key.storage_key();
        if let Some(staged) = self.objects.get(&storage_key) {
            return Ok(staged.clone());
        }
        if let Cached::Known(object) = self.recent.get(&storage_key) {
            return Ok(object);
        }
        Ok(
            read_json::<Value>(self.db, CF_OBJECTS, storage_key.as_bytes())?
                .map(SharedObject::from),
        )
    }

    /// Whether `namespace` exists: the store is asked once per batch and namespace, without
    /// parsing the Namespace (every create asks).
    fn namespace_exists(&mut self, namespace: &str) -> Result<bool, io::Error> {
        if namespace.is_empty() {
            return Ok(true);
        }
        let storage_key = ObjectKey::new("Namespace", "", namespace).storage_key();
        if let Some(staged) = self.objects.get(&storage_key) {
            return Ok(staged.is_some());
        }
        if let Some(&stored) = self.stored_namespaces.get(namespace) {
            return Ok(stored);
        }
        let stored = match self.recent.get(&storage_key) {
            Cached::Known(object) => object.is_some(),
            Cached::Unknown => self
                .db
                .get_pinned_cf(cf(self.db, CF_OBJECTS)?, storage_key.as_bytes())
                .map_err(rocks_error)?
                .is_some(),
        };
        self.stored_namespaces.insert(namespace.to_string(), stored);
        Ok(stored)
    }

    fn write(&mut self, decision: Decision, rv: u64) -> Result<Applied, io::Error> {
        if let Some(mutation) = decision.mutation {
            let storage_key = mutation.key.storage_key();
            let cf_objects = cf(self.db, CF_OBJECTS)?;
            // The event carries the stored object itself (creates, updates) or its last state
            // (deletes): encoded once for both.
            let event_object_json = to_json("object", &*mutation.event_object)?;
            match &mutation.object {
                Some(object) if object.is_same(&mutation.event_object) => {
                    self.batch
                        .put_cf(cf_objects, storage_key.as_bytes(), &event_object_json)
                }
                Some(object) => self.batch.put_cf(
                    cf_objects,
                    storage_key.as_bytes(),
                    to_json("object", &**object)?,
                ),
                None => self.batch.delete_cf(cf_objects, storage_key.as_bytes()),
            }
            self.objects.insert(storage_key, mutation.object);
            // Events of one entry are staged in order: those of `rv` are the last ones.
            let seq = self
                .events
                .iter()
                .rev()
                .take_while(|e| e.resource_version == rv)
                .count() as u32;
            let record = WatchRecord {
                resource_version: rv,
                seq,
                event_type: mutation.event,
                key: mutation.key,
                object: mutation.event_object,
            };
            let record_json = record
                .encode_with_object_json(&event_object_json)
                .map_err(|e| encode_error("event", e))?;
            self.batch
                .put_cf(cf(self.db, CF_EVENTS)?, event_key(rv, seq), record_json);
            self.events.push(record);
        }
        Ok(Applied {
            outcome: decision.outcome,
            object: decision.object,
            node_id: None,
        })
    }

    /// Writes what was decided; a refusal is passed on as the command's result.
    fn write_decided(
        &mut self,
        decided: Result<Decision, StoreError>,
        rv: u64,
    ) -> Result<Result<Applied, StoreError>, io::Error> {
        match decided {
            Ok(decision) => Ok(Ok(self.write(decision, rv)?)),
            Err(error) => Ok(Err(error)),
        }
    }

    /// Applies one command at log index `rv`. `Err` is a storage failure (fatal); a refused
    /// command is `Ok(Err(..))`.
    fn apply(
        &mut self,
        command: Command,
        rv: u64,
    ) -> Result<Result<Applied, StoreError>, io::Error> {
        let done = |node_id| Applied {
            outcome: Outcome::Done,
            object: None,
            node_id,
        };
        Ok(match command {
            Command::Bootstrap {
                cluster_id,
                node_name,
                node_address: _,
                namespaces,
                cluster_cidr,
            } => {
                if self.registry.next_node_id != 0 {
                    return Ok(Ok(done(self.registry.nodes.get(&node_name).copied())));
                }
                self.registry = Registry {
                    cluster_id,
                    cluster_cidr,
                    next_node_id: 2,
                    nodes: BTreeMap::from([(node_name, 1)]),
                };
                self.registry_changed = true;
                for mut namespace in namespaces {
                    let key = ObjectKey::of(&namespace);
                    if store::validate(&mut namespace).is_err() {
                        continue;
                    }
                    let existing = self.lookup(&key)?;
                    if let Ok(decision) =
                        store::decide_create(&key, namespace, existing.as_deref(), true, rv)
                    {
                        self.write(decision, rv)?;
                    }
                }
                Ok(done(Some(1)))
            }
            Command::RegisterNode { name, address: _ } => {
                if self.registry.nodes.contains_key(&name) {
                    Err(StoreError::NodeNameTaken { name })
                } else {
                    let id = self.registry.next_node_id.max(2);
                    self.registry.next_node_id = id + 1;
                    self.registry.nodes.insert(name, id);
                    self.registry_changed = true;
                    Ok(done(Some(id)))
                }
            }
            Command::ForgetNode { name } => match self.registry.nodes.remove(&name) {
                Some(id) => {
                    self.registry_changed = true;
                    Ok(done(Some(id)))
                }
                None => Err(StoreError::NodeNotFound { name }),
            },
            Command::Create { object } => self.apply_object(
                &mut object.into_value(),
                SpecWrite::Create,
                |key, object, existing, ns_exists| {
                    store::decide_create(key, object, existing, ns_exists, rv)
                },
                rv,
            )?,
            Command::Apply { object } => self.apply_object(
                &mut object.into_value(),
                SpecWrite::Replace,
                |key, object, existing, ns_exists| {
                    store::decide_apply(key, object, existing, ns_exists, rv)
                },
                rv,
            )?,
            Command::Update { object, part } => self.apply_object(
                &mut object.into_value(),
                match part {
                    UpdatePart::Main => SpecWrite::Replace,
                    UpdatePart::Status => SpecWrite::StatusOnly,
                },
                |key, object, existing, _| {
                    store::decide_update(key, object, part, existing, true, rv)
                },
                rv,
            )?,
            Command::Batch(_) => Err(StoreError::Invalid {
                reason: "batches are applied by the state machine's caller".into(),
            }),
            Command::Bind {
                key,
                resource_version,
                node,
            } => {
                let existing = self.lookup(&key)?;
                let decided =
                    store::decide_bind(&key, resource_version, &node, existing.as_deref(), rv);
                self.write_decided(decided, rv)?
            }
            Command::Delete {
                key,
                resource_version,
            } => {
                let existing = self.lookup(&key)?;
                let decided = store::decide_delete(&key, resource_version, existing.as_deref(), rv);
                self.write_decided(decided, rv)?
            }
        })
    }

    /// A node keeps the pod subnet it was given; a new node gets the first free one. Done
    /// here, in log order, so that two nodes registering at once never get the same subnet.
    fn assign_pod_cidr(
        &self,
        node: &mut Value,
        existing: Option<&Value>,
    ) -> Result<Result<(), StoreError>, io::Error> {
        if let Some(cidr) = existing.and_then(store::pod_cidr) {
            store::set_pod_cidr(node, cidr);
            return Ok(Ok(()));
        }
        if store::pod_cidr(node).is_some() {
            return Ok(Ok(()));
        }
        let nodes = self.current_objects(&ObjectKey::storage_prefix("Node", Some("")))?;
        let used: Vec<&str> = nodes.values().filter_map(store::pod_cidr).collect();
        let cidr = if self.registry.cluster_cidr.is_empty() {
            store::DEFAULT_CLUSTER_CIDR
        } else {
            self.registry.cluster_cidr.as_str()
        };
        let prefix = store::cluster_cidr_prefix(cidr).unwrap_or_else(|| "10.244".to_string());
        match store::pick_pod_cidr(&prefix, used) {
            Some(cidr) => {
                store::set_pod_cidr(node, &cidr);
                Ok(Ok(()))
            }
            None => Ok(Err(StoreError::Invalid {
                reason: "no free pod subnet is left in the cluster CIDR".into(),
            })),
        }
    }

    /// Every object whose storage key starts with `prefix` as this batch sees it (staged writes
    /// and deletes included), by storage key.
    fn current_objects(&self, prefix: &str) -> Result<BTreeMap<String, Value>, io::Error> {
        let mut objects = BTreeMap::new();
        for item in self.db.iterator_cf(
            cf(self.db, CF_OBJECTS)?,
            IteratorMode::From(prefix.as_bytes(), Direction::Forward),
        ) {
            let (key, value) = item.map_err(rocks_error)?;
            if !key.starts_with(prefix.as_bytes()) {
                break;
            }
            let object: Value =
                serde_json::from_slice(&value).map_err(|e| decode_error("object", e))?;
            objects.insert(String::from_utf8_lossy(&key).into_owned(), object);
        }
        for (key, staged) in &self.objects {
            if key.starts_with(prefix) {
                match staged {
                    Some(object) => objects.insert(key.clone(), (**object).clone()),
                    None => objects.remove(key),
                };
            }
        }
        Ok(objects)
    }

    /// A Service's cluster IP and node ports, chosen here, in log order, against every other
    /// Service, so that two Services never share one (`store::services`).
    fn assign_service_addresses(
        &self,
        key: &ObjectKey,
        service: &mut Value,
        existing: Option<&Value>,
    ) -> Result<Result<(), StoreError>, io::Error> {
        let mut services = self.current_objects(&ObjectKey::storage_prefix("Service", None))?;
        services.remove(&key.storage_key());
        let others = services::Allocations::of(services.values());
        Ok(services::allocate(
            service,
            existing,
            &others,
            &services::ServiceCidr::default(),
        ))
    }

    fn apply_object(
        &mut self,
        object: &mut Value,
        write: SpecWrite,
        decide: impl FnOnce(&ObjectKey, Value, Option<&Value>, bool) -> Result<Decision, StoreError>,
        rv: u64,
    ) -> Result<Result<Applied, StoreError>, io::Error> {
        // Proposers validate the whole object; here only what the store itself relies on is
        // checked, so that applying stays cheap and cannot depend on schema details.
        let key = ObjectKey::of(object);
        if crate::kinds::by_kind(&key.kind).is_none() || key.name.is_empty() {
            return Ok(Err(StoreError::Invalid {
                reason: format!("cannot store an object without a known kind and a name ({key})"),
            }));
        }
        let existing = self.lookup(&key)?;
        // Fields the state machine assigns: not for a status write (its spec is ignored) nor
        // for a create of an existing object (refused below).
        let assigns = match write {
            SpecWrite::Create => existing.is_none(),
            SpecWrite::Replace => true,
            SpecWrite::StatusOnly => false,
        };
        let assigned = match key.kind.as_str() {
            "Node" if assigns => self.assign_pod_cidr(object, existing.as_deref())?,
            "Service" if assigns => {
                self.assign_service_addresses(&key, object, existing.as_deref())?
            }
            _ => Ok(()),
        };
        if let Err(error) = assigned {
            return Ok(Err(error));
        }
        let namespace_exists = self.namespace_exists(&key.namespace)?;
        let decided = decide(&key, object.take(), existing.as_deref(), namespace_exists);
        self.write_decided(decided, rv)
    }
}

impl StateMachine {
    pub fn new(
        db: Arc<DB>,
        snapshot_dir: PathBuf,
        hub: WatchHub,
    ) -> Result<StateMachine, io::Error> {
        for name in [CF_OBJECTS, CF_EVENTS, CF_SM_META] {
            cf(&db, name)?;
        }
        std::fs::create_dir_all(&snapshot_dir)?;
        Ok(StateMachine {
            db,
            hub,
            snapshot_dir,
            recent: Arc::default(),
            kind_writes: Arc::default(),
        })
    }

    pub fn reader(&self) -> StoreReader {
        StoreReader::new(self.db.clone(), self.kind_writes.clone())
    }

    fn snapshot_path(&self) -> PathBuf {
        self.snapshot_dir.join("current.snapshot")
    }

    fn write_snapshot_file(
        &self,
        meta: &SnapshotMetaOf<TypeConfig>,
        data: &[u8],
    ) -> Result<(), io::Error> {
        let header = to_json("snapshot meta", meta)?;
        let mut file = Vec::with_capacity(8 + header.len() + data.len());
        file.extend_from_slice(&(header.len() as u64).to_be_bytes());
        file.extend_from_slice(&header);
        file.extend_from_slice(data);
        let temporary = self.snapshot_dir.join("current.snapshot.tmp");
        std::fs::write(&temporary, &file)?;
        std::fs::File::open(&temporary)?.sync_all()?;
        std::fs::rename(&temporary, self.snapshot_path())
    }

    fn read_snapshot_file(&self) -> Result<Option<SnapshotFile>, io::Error> {
        let file = match std::fs::read(self.snapshot_path()) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        let header_len = index_from_key(&file)? as usize;
        let header_end = 8usize
            .checked_add(header_len)
            .filter(|end| *end <= file.len())
            .ok_or_else(|| decode_error("snapshot file", "header longer than the file"))?;
        let meta = serde_json::from_slice(&file[8..header_end])
            .map_err(|e| decode_error("snapshot meta", e))?;
        Ok(Some((meta, file[header_end..].to_vec())))
    }

    fn build_body(&self) -> Result<(SnapshotMetaOf<TypeConfig>, Vec<u8>), io::Error> {
        // Everything applied so far becomes durable before the log under it may be purged.
        self.db.flush_wal(true).map_err(rocks_error)?;
        let snapshot = self.db.snapshot();
        let get = |key: &[u8]| -> Result<Option<Vec<u8>>, io::Error> {
            snapshot
                .get_cf(cf(&self.db, CF_SM_META)?, key)
                .map_err(rocks_error)
        };
        let decode = |what: &str, bytes: Option<Vec<u8>>| -> Result<Option<Value>, io::Error> {
            bytes
                .map(|b| serde_json::from_slice(&b).map_err(|e| decode_error(what, e)))
                .transpose()
        };
        let last_applied: Option<LogIdOf<TypeConfig>> =
            decode("last applied", get(KEY_LAST_APPLIED)?)?
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| decode_error("last applied", e))?;
        let last_membership: StoredMembershipOf<TypeConfig> =
            decode("membership", get(KEY_LAST_MEMBERSHIP)?)?
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| decode_error("membership", e))?
                .unwrap_or_default();
        let registry: Registry = decode("registry", get(KEY_REGISTRY)?)?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| decode_error("registry", e))?
            .unwrap_or_default();
        let compacted_resource_version = decode("compacted", get(KEY_COMPACTED)?)?
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let mut objects = Vec::new();
        for item in snapshot.iterator_cf(cf(&self.db, CF_OBJECTS)?, IteratorMode::Start) {
            let (_, value) = item.map_err(rocks_error)?;
            objects.push(serde_json::from_slice(&value).map_err(|e| decode_error("object", e))?);
        }
        let mut events = Vec::new();
        for item in snapshot.iterator_cf(cf(&self.db, CF_EVENTS)?, IteratorMode::Start) {
            let (_, value) = item.map_err(rocks_error)?;
            events.push(serde_json::from_slice(&value).map_err(|e| decode_error("event", e))?);
        }
        let body = SnapshotBody {
            registry,
            compacted_resource_version,
            objects,
            events,
        };
        let meta = SnapshotMetaOf::<TypeConfig> {
            last_log_id: last_applied,
            last_membership,
        };
        Ok((meta, to_json("snapshot", &body)?))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(
        &mut self,
    ) -> Result<SnapshotOf<TypeConfig, Self::SnapshotData>, io::Error> {
        let machine = self.clone();
        let (meta, data) = tokio::task::spawn_blocking(move || -> Result<_, io::Error> {
            let (meta, data) = machine.build_body()?;
            machine.write_snapshot_file(&meta, &data)?;
            Ok((meta, data))
        })
        .await
        .map_err(io::Error::other)??;
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = data.len(), "built snapshot");
        Ok(SnapshotOf::<TypeConfig, Self::SnapshotData> {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        let applied = read_json(&self.db, CF_SM_META, KEY_LAST_APPLIED)?;
        let membership = read_json(&self.db, CF_SM_META, KEY_LAST_MEMBERSHIP)?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let registry = read_json(&self.db, CF_SM_META, KEY_REGISTRY)?.unwrap_or_default();
        // Taken out for this apply: should it fail half-way, the cache starts again empty
        // (always correct), never stale.
        let mut recent = std::mem::take(&mut *lock(&self.recent));
        let mut staged = Staged {
            db: &self.db,
            batch: WriteBatch::default(),
            objects: HashMap::new(),
            recent: &recent,
            stored_namespaces: HashMap::new(),
            registry,
            registry_changed: false,
            events: Vec::new(),
        };
        let mut last_applied = None;
        let mut last_membership = None;
        let mut responses = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id();
            let rv = log_id.index();
            let response = match entry.payload {
                EntryPayload::Blank => CommandResponse::default(),
                EntryPayload::Membership(membership) => {
                    last_membership = Some(StoredMembershipOf::<TypeConfig>::new(
                        Some(log_id),
                        membership,
                    ));
                    CommandResponse::default()
                }
                EntryPayload::Normal(Command::Batch(commands)) => {
                    let mut batch = Vec::with_capacity(commands.len());
                    for command in commands {
                        // Nested batches and membership bookkeeping are not batched.
                        let result = match command {
                            Command::Batch(_)
                            | Command::Bootstrap { .. }
                            | Command::RegisterNode { .. }
                            | Command::ForgetNode { .. } => Err(StoreError::Invalid {
                                reason: "a batch holds object commands only".into(),
                            }),
                            command => staged.apply(command, rv)?,
                        };
                        batch.push(result);
                    }
                    CommandResponse {
                        result: None,
                        batch,
                    }
                }
                EntryPayload::Normal(command) => CommandResponse {
                    result: Some(staged.apply(command, rv)?),
                    batch: Vec::new(),
                },
            };
            last_applied = Some(log_id);
            if let Some(responder) = responder {
                responses.push((responder, response));
            }
        }
        let Some(last_applied) = last_applied else {
            drop(staged);
            *lock(&self.recent) = recent;
            return Ok(());
        };
        let rv = last_applied.index();
        let cf_meta = cf(&self.db, CF_SM_META)?;
        let compacted: u64 = read_json(&self.db, CF_SM_META, KEY_COMPACTED)?.unwrap_or(0);
        if rv.saturating_sub(compacted) > EVENT_HISTORY_ENTRIES + EVENT_COMPACTION_STEP {
            // Deterministic in the log index, so every node keeps the same history.
            let new_compacted = rv - EVENT_HISTORY_ENTRIES;
            staged.batch.delete_range_cf(
                cf(&self.db, CF_EVENTS)?,
                event_key(0, 0),
                event_key(new_compacted + 1, 0),
            );
            staged.batch.put_cf(
                cf_meta,
                KEY_COMPACTED,
                to_json("compacted", &new_compacted)?,
            );
        }
        if staged.registry_changed {
            staged.batch.put_cf(
                cf_meta,
                KEY_REGISTRY,
                to_json("registry", &staged.registry)?,
            );
        }
        if let Some(membership) = &last_membership {
            staged.batch.put_cf(
                cf_meta,
                KEY_LAST_MEMBERSHIP,
                to_json("membership", membership)?,
            );
        }
        staged.batch.put_cf(
            cf_meta,
            KEY_LAST_APPLIED,
            to_json("last applied", &last_applied)?,
        );
        let Staged {
            batch,
            events,
            objects,
            ..
        } = staged;
        self.db.write(batch).map_err(rocks_error)?;
        let mut kind_writes = lock(&self.kind_writes);
        for (storage_key, object) in objects {
            kind_writes.wrote(&storage_key);
            recent.insert(storage_key, object);
        }
        drop(kind_writes);
        *lock(&self.recent) = recent;
        self.hub.publish(events);
        for (responder, response) in responses {
            responder.send(response);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let body: SnapshotBody =
            serde_json::from_slice(&data).map_err(|e| decode_error("snapshot", e))?;
        let db = self.db.clone();
        let meta_copy = meta.clone();
        tokio::task::spawn_blocking(move || -> Result<(), io::Error> {
            let cf_objects = cf(&db, CF_OBJECTS)?;
            let cf_events = cf(&db, CF_EVENTS)?;
            let cf_meta = cf(&db, CF_SM_META)?;
            let mut batch = WriteBatch::default();
            // Replace everything in one atomic batch: readers see the old state or the new one.
            for item in db.iterator_cf(cf_objects, IteratorMode::Start) {
                let (key, _) = item.map_err(rocks_error)?;
                batch.delete_cf(cf_objects, key);
            }
            batch.delete_range_cf(cf_events, event_key(0, 0), event_key(u64::MAX, u32::MAX));
            for object in &body.objects {
                batch.put_cf(
                    cf_objects,
                    ObjectKey::of(object).storage_key().as_bytes(),
                    to_json("object", object)?,
                );
            }
            for record in &body.events {
                batch.put_cf(
                    cf_events,
                    event_key(record.resource_version, record.seq),
                    to_json("event", record)?,
                );
            }
            batch.put_cf(cf_meta, KEY_REGISTRY, to_json("registry", &body.registry)?);
            batch.put_cf(
                cf_meta,
                KEY_COMPACTED,
                to_json("compacted", &body.compacted_resource_version)?,
            );
            batch.put_cf(
                cf_meta,
                KEY_LAST_MEMBERSHIP,
                to_json("membership", &meta_copy.last_membership)?,
            );
            match &meta_copy.last_log_id {
                Some(id) => batch.put_cf(cf_meta, KEY_LAST_APPLIED, to_json("last applied", id)?),
                None => batch.delete_cf(cf_meta, KEY_LAST_APPLIED),
            }
            db.write(batch).map_err(rocks_error)?;
            db.flush_wal(true).map_err(rocks_error)
        })
        .await
        .map_err(io::Error::other)??;
        lock(&self.recent).clear();
        lock(&self.kind_writes).replaced += 1;
        self.write_snapshot_file(meta, &data)?;
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot");
        self.hub.reset();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, Self::SnapshotData>>, io::Error> {
        Ok(self.read_snapshot_file()?.map(|(meta, data)| SnapshotOf::<
            TypeConfig,
            Self::SnapshotData,
        > {
            meta,
            snapshot: Cursor::new(data),
        }))
    }
}
