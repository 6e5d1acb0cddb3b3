//! A linearizability checker for histories of registers ([`crate::history`]).
//!
//! Linearizability is compositional (P-compositionality): a history is linearizable if and
//! only if the sub-history of each key is, so each key is checked on its own, in parallel.
//!
//! One key is checked with the search of Wing & Gong, with the memoization of Lowe, as in
//! Porcupine: the history becomes a doubly-linked list of call and return entries ordered by
//! time; the search repeatedly takes a call entry that comes before the first remaining return
//! entry (an operation that may take effect now), checks it against the register, and if it
//! fits "lifts" it (with its return entry) out of the list; reaching a return entry means the
//! operation returned before it could be placed, so the search backtracks (pops the last lifted
//! operation, "unlifts" it and tries the next candidate). A cache of the configurations (set
//! of placed operations as bitsets, register state) explored without success prunes the
//! search. Each key has a step budget; when it runs out the key is reported
//! [`Verdict::TimedOut`].
//!
//! How outcomes are modelled:
//! - [`Outcome::Fail`] (definitely not applied) and unknown reads are dropped;
//! - [`Outcome::CasConflict`] is an observation: the register did not hold `expected`;
//! - a write or compare-and-set of unknown outcome has an infinite return time: it may take
//!   effect at any point after its invocation, or never (it is then linearized after every
//!   other operation, where nothing observes it). So an unknown compare-and-set is only placed
//!   where it applies (where the register holds `expected`); the search ends as soon as only
//!   operations of unknown outcome are left.
//!
//! Reductions keep the search small without changing the verdict (a brute-force search agrees
//! on hundreds of thousands of small random histories; see the tests):
//! - a legal read or refused compare-and-set (which leaves the register as it is) is placed
//!   without trying alternatives: placing it earlier never hurts;
//! - written values that nothing observes (no read returned them, no compare-and-set expected
//!   them) are all one value to the search, and unknown writes of such values ("the pool")
//!   are interchangeable: only the earliest-invoked one not placed yet is tried;
//! - an operation of unknown outcome is only placed where a candidate that could come right
//!   after it observes its effect (a read of its value, a compare-and-set expecting it, or a
//!   refused compare-and-set expecting the value it replaces); otherwise it can move later or
//!   be left out. Such operations are tried after the definite ones, and a configuration is
//!   pruned when one with the same definite operations and register but a subset of its
//!   unknown operations (and no more of the pool) already failed;
//! - once the register leaves a value written only once, the unknown compare-and-sets
//!   expecting it can never apply and are placed at once as no-ops, so that whether they
//!   applied earlier or not leads to the same configuration.
//!
//! Values are meant to be unique per write (so that a compare-and-set by resourceVersion is one
//! by value); repeated values are still checked correctly, as a register of values.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use crate::history::{group_by_key, DisplayValue, Entry, History, OpId, Operation, Outcome};

/// The default step budget of one key.
pub const DEFAULT_STEP_BUDGET: u64 = 5_000_000;

/// How to check a history.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// The most search steps spent on one key before it is reported [`Verdict::TimedOut`].
    pub step_budget: u64,
    /// The value of keys that held one before the history started; other keys start absent.
    pub initial_values: HashMap<String, String>,
    /// How many keys are checked at once; 0 means one per available CPU.
    pub threads: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            step_budget: DEFAULT_STEP_BUDGET,
            initial_values: HashMap::new(),
            threads: 0,
        }
    }
}

/// The verdict on one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Some order of the operations is legal for a register and respects real time.
    Linearizable,
    /// No such order exists.
    NotLinearizable,
    /// The step budget ran out first: neither verdict is known.
    TimedOut,
    /// The history of the key cannot be checked (an outcome that does not fit its operation,
    /// or a return before the invocation).
    Malformed,
}

/// Why a key is not linearizable: how far the search got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// The longest sequence of operations the search could linearize, in order.
    pub longest_prefix: Vec<OpId>,
    /// The operations checked for the key (after dropping failed operations and unknown reads).
    pub operations_checked: usize,
    /// The register after the longest prefix.
    pub state_after_prefix: Option<String>,
    /// The operation that returned before it, or any operation concurrent with it, could be
    /// placed after the longest prefix.
    pub stuck: Option<Entry>,
    /// The operations that could have been placed next (concurrent with `stuck`, or
    /// invoked before it returned) and were not linearized yet; at most ten.
    pub candidates: Vec<Entry>,
}

/// The result for one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyReport {
    /// The key (object name).
    pub key: String,
    /// The verdict.
    pub verdict: Verdict,
    /// The operations recorded on the key.
    pub operations: usize,
    /// The operations the search considered (failed operations and unknown reads dropped).
    pub operations_checked: usize,
    /// The search steps spent.
    pub steps: u64,
    /// For every verdict but [`Verdict::Linearizable`], a short human-readable explanation.
    pub explanation: Option<String>,
    /// For [`Verdict::NotLinearizable`], the details.
    pub violation: Option<Violation>,
}

/// The result of a whole history, one entry per key, sorted by key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// One report per key, sorted by key.
    pub keys: Vec<KeyReport>,
}

impl Report {
    /// Whether every key was found linearizable (false if any key timed out).
    pub fn is_linearizable(&self) -> bool {
        self.keys
            .iter()
            .all(|key| key.verdict == Verdict::Linearizable)
    }

    /// Whether some key was found not linearizable or malformed: a definite failure.
    pub fn has_violation(&self) -> bool {
        self.keys
            .iter()
            .any(|key| matches!(key.verdict, Verdict::NotLinearizable | Verdict::Malformed))
    }

    /// How many keys got `verdict`.
    pub fn count(&self, verdict: Verdict) -> usize {
        self.keys
            .iter()
            .filter(|key| key.verdict == verdict)
            .count()
    }

    /// The keys whose verdict is not [`Verdict::Linearizable`].
    pub fn problems(&self) -> impl Iterator<Item = &KeyReport> {
        self.keys
            .iter()
            .filter(|key| key.verdict != Verdict::Linearizable)
    }
}

impl fmt::Display for Report {
    /// One summary line, then one paragraph per key that is not linearizable.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            formatter,
            "{} keys: {} linearizable, {} not linearizable, {} timed out, {} malformed",
            self.keys.len(),
            self.count(Verdict::Linearizable),
            self.count(Verdict::NotLinearizable),
            self.count(Verdict::TimedOut),
            self.count(Verdict::Malformed)
        )?;
        for key in self.problems() {
            writeln!(formatter, "key {:?}: {:?}", key.key, key.verdict)?;
            if let Some(explanation) = &key.explanation {
                writeln!(formatter, "{explanation}")?;
            }
        }
        Ok(())
    }
}

/// Checks every key of `history`.
pub fn check(history: &History, options: &CheckOptions) -> Report {
    check_entries(&history.entries(), options)
}

/// Checks every key of `entries` (e.g. read back with [`crate::history::read_jsonl`]).
pub fn check_entries(entries: &[Entry], options: &CheckOptions) -> Report {
    let by_key: Vec<(String, Vec<Entry>)> = group_by_key(entries).into_iter().collect();
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, |count| count.get()),
        threads => threads,
    }
    .clamp(1, by_key.len().max(1));
    let next = AtomicUsize::new(0);
    let mut keys: Vec<KeyReport> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut reports = Vec::new();
                    while let Some((key, entries)) =
                        by_key.get(next.fetch_add(1, Ordering::Relaxed))
                    {
                        let initial = options.initial_values.get(key).map(String::as_str);
                        reports.push(check_key(key, entries, initial, options.step_budget));
                    }
                    reports
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    keys.sort_by(|a, b| a.key.cmp(&b.key));
    Report { keys }
}

/// Checks the operations of one key (`entries` must all be on `key`; others are ignored),
/// starting from `initial` (`None`: absent), spending at most `step_budget` steps.
pub fn check_key(
    key: &str,
    entries: &[Entry],
    initial: Option<&str>,
    step_budget: u64,
) -> KeyReport {
    let entries: Vec<&Entry> = entries.iter().filter(|entry| entry.key == key).collect();
    let mut report = KeyReport {
        key: key.to_string(),
        verdict: Verdict::Linearizable,
        operations: entries.len(),
        operations_checked: 0,
        steps: 0,
        explanation: None,
        violation: None,
    };
    let prepared = match prepare(&entries, initial) {
        Ok(prepared) => prepared,
        Err(explanation) => {
            report.verdict = Verdict::Malformed;
            report.explanation = Some(explanation);
            return report;
        }
    };
    report.operations_checked = prepared.ops.len();
    let search = search(&prepared, step_budget);
    report.steps = search.steps;
    match search.result {
        SearchResult::Linearizable => {}
        SearchResult::TimedOut => {
            let deepest = search.deepest.map_or(0, |deepest| deepest.prefix.len());
            report.verdict = Verdict::TimedOut;
            report.explanation = Some(format!(
                "the step budget ({step_budget} steps) ran out before a verdict on {} \
                 operations (at most {deepest} linearized)",
                prepared.ops.len()
            ));
        }
        SearchResult::NotLinearizable => {
            let violation = violation(&prepared, initial, search.deepest);
            report.verdict = Verdict::NotLinearizable;
            report.explanation = Some(explain(&prepared, &violation));
            report.violation = Some(violation);
        }
    }
    report
}

/// A key that must hold an acknowledged value at the end and does not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostWrite {
    /// The key.
    pub key: String,
    /// The acknowledged value.
    pub acknowledged: String,
    /// What the key holds at the end (`None`: absent).
    pub found: Option<String>,
}

/// For write-once keys: every acknowledged create `(key, value)` must be present with its
/// value in `final_state` (a key missing from the map counts as absent). Returns the ones that
/// are not, in the order given.
pub fn lost_writes(
    acknowledged: &[(String, String)],
    final_state: &HashMap<String, Option<String>>,
) -> Vec<LostWrite> {
    acknowledged
        .iter()
        .filter_map(|(key, value)| {
            let found = final_state.get(key).cloned().flatten();
            (found.as_deref() != Some(value.as_str())).then(|| LostWrite {
                key: key.clone(),
                acknowledged: value.clone(),
                found,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Preparation: values interned to small integers, outcomes turned into step functions.

/// The register absent.
const ABSENT: u32 = 0;
/// Every written value that nothing observes.
const UNOBSERVED: u32 = 1;

#[derive(Clone, Copy, Debug)]
enum Step {
    /// A write that took effect, or one of unknown outcome (always legal).
    Write { new: u32 },
    /// A compare-and-set that took effect: legal when the register holds `expected`.
    CasApplied { expected: u32, new: u32 },
    /// A refused compare-and-set: legal when the register does not hold `expected`.
    CasRefused { expected: u32 },
    /// A compare-and-set of unknown outcome: placed only where it applies (where the register
    /// holds `expected`); one that never applies is placed last, as a no-op.
    CasUnknown { expected: u32, new: u32 },
    /// A read: legal when the register holds `value`.
    Read { value: u32 },
}

impl Step {
    fn apply(self, state: u32) -> Option<u32> {
        match self {
            Step::Write { new } => Some(new),
            Step::CasRefused { expected } => (state != expected).then_some(state),
            Step::CasApplied { expected, new } | Step::CasUnknown { expected, new } => {
                (state == expected).then_some(new)
            }
            Step::Read { value } => (state == value).then_some(state),
        }
    }
}

struct PreparedOp<'a> {
    entry: &'a Entry,
    step: Step,
    invoked: u64,
    /// `None`: unknown outcome, returns at infinity.
    returned: Option<u64>,
    slot: Slot,
}

/// How the search records that an operation is placed.
#[derive(Clone, Copy, Debug)]
enum Slot {
    /// A definite outcome: bit `n` of the definite set.
    Definite(usize),
    /// An unknown outcome: bit `n` of the unknown set.
    Unknown(usize),
    /// An unknown write of an unobserved value, `n`-th in invocation order: such writes are
    /// interchangeable, so only how many are placed matters, and they are placed in order.
    Pool(u32),
}

struct Prepared<'a> {
    /// In invocation order.
    ops: Vec<PreparedOp<'a>>,
    initial: u32,
    /// For each value number, the unknown compare-and-sets expecting it (indices into `ops`)
    /// when the value cannot come back once the register leaves it (it has one source: a
    /// single write, or the initial state). Once the register leaves the value they can never
    /// apply, so the search places them at once, as no-ops: whether they were placed before
    /// makes no difference to what follows, and the cache sees one configuration, not two.
    doomed_when_left: Vec<Vec<usize>>,
    /// How many operations have a definite outcome.
    definite_count: usize,
    /// How many operations of unknown outcome are not in the pool.
    unknown_count: usize,
    /// The pool writes (indices into `ops`) in invocation order.
    pool: Vec<usize>,
}

fn prepare<'a>(entries: &[&'a Entry], initial: Option<&str>) -> Result<Prepared<'a>, String> {
    // Keep the operations that can matter, and check that outcomes fit operations.
    let mut kept: Vec<&'a Entry> = Vec::with_capacity(entries.len());
    for &entry in entries {
        let fits = matches!(
            (&entry.operation, &entry.outcome),
            (_, Outcome::Fail | Outcome::Unknown)
                | (Operation::Write { .. } | Operation::Cas { .. }, Outcome::Ok)
                | (Operation::Cas { .. }, Outcome::CasConflict)
                | (Operation::Read, Outcome::ReadOk { .. })
        );
        if !fits {
            return Err(format!("the outcome does not fit the operation: {entry}"));
        }
        if entry
            .returned_ns
            .is_some_and(|returned| returned < entry.invoked_ns)
        {
            return Err(format!(
                "the operation returned before it was invoked: {entry}"
            ));
        }
        // A definite outcome always has a return time when it comes from `History`.
        if matches!(
            entry.outcome,
            Outcome::Ok | Outcome::ReadOk { .. } | Outcome::CasConflict
        ) && entry.returned_ns.is_none()
        {
            return Err(format!(
                "the operation has an outcome but no return time: {entry}"
            ));
        }
        let dropped = matches!(
            (&entry.operation, &entry.outcome),
            (_, Outcome::Fail) | (Operation::Read, Outcome::Unknown)
        );
        if !dropped {
            kept.push(entry);
        }
    }

    // Values that something observes get their own number; the others are all UNOBSERVED.
    let mut numbers: HashMap<&str, u32> = HashMap::new();
    let observe = |value: &'a str, numbers: &mut HashMap<&'a str, u32>| {
        let next = numbers.len() as u32 + 2;
        numbers.entry(value).or_insert(next);
    };
    for entry in &kept {
        match (&entry.operation, &entry.outcome) {
            (Operation::Read, Outcome::ReadOk { value: Some(value) }) => {
                observe(value, &mut numbers)
            }
            (
                Operation::Cas {
                    expected: Some(expected),
                    ..
                },
                _,
            ) => observe(expected, &mut numbers),
            _ => {}
        }
    }
    let number = |value: Option<&str>| match value {
        None => ABSENT,
        Some(value) => numbers.get(value).copied().unwrap_or(UNOBSERVED),
    };

    let mut ops: Vec<PreparedOp<'a>> = kept
        .iter()
        .map(|&entry| {
            let unknown = entry.outcome == Outcome::Unknown;
            let step = match (&entry.operation, &entry.outcome) {
                (Operation::Write { value }, _) => Step::Write {
                    new: number(Some(value)),
                },
                (Operation::Cas { expected, .. }, Outcome::CasConflict) => Step::CasRefused {
                    expected: number(expected.as_deref()),
                },
                (Operation::Cas { expected, new }, Outcome::Unknown) => Step::CasUnknown {
                    expected: number(expected.as_deref()),
                    new: number(Some(new)),
                },
                (Operation::Cas { expected, new }, _) => Step::CasApplied {
                    expected: number(expected.as_deref()),
                    new: number(Some(new)),
                },
                (Operation::Read, Outcome::ReadOk { value }) => Step::Read {
                    value: number(value.as_deref()),
                },
                // Unknown and failed reads were dropped, and outcomes checked above.
                (Operation::Read, _) => Step::Read { value: ABSENT },
            };
            PreparedOp {
                entry,
                step,
                invoked: entry.invoked_ns,
                returned: if unknown { None } else { entry.returned_ns },
                slot: Slot::Definite(0),
            }
        })
        .collect();
    // How many times each value can appear in the register.
    let initial = number(initial);
    let mut sources = vec![0usize; numbers.len() + 2];
    sources[initial as usize] += 1;
    for op in &ops {
        if let Step::Write { new } | Step::CasApplied { new, .. } | Step::CasUnknown { new, .. } =
            op.step
        {
            sources[new as usize] += 1;
        }
    }
    // An unknown compare-and-set expecting a value the register never holds never applies.
    ops.retain(|op| match op.step {
        Step::CasUnknown { expected, .. } => sources[expected as usize] > 0,
        _ => true,
    });
    ops.sort_by_key(|op| (op.invoked, op.entry.id));
    let mut doomed_when_left = vec![Vec::new(); sources.len()];
    for (index, op) in ops.iter().enumerate() {
        if let Step::CasUnknown { expected, .. } = op.step {
            if sources[expected as usize] == 1 {
                doomed_when_left[expected as usize].push(index);
            }
        }
    }
    let (mut definite_count, mut unknown_count) = (0, 0);
    let mut pool = Vec::new();
    for (index, op) in ops.iter_mut().enumerate() {
        op.slot = if op.returned.is_some() {
            definite_count += 1;
            Slot::Definite(definite_count - 1)
        } else if matches!(op.step, Step::Write { new: UNOBSERVED }) {
            pool.push(index);
            Slot::Pool(pool.len() as u32 - 1)
        } else {
            unknown_count += 1;
            Slot::Unknown(unknown_count - 1)
        };
    }
    Ok(Prepared {
        ops,
        initial,
        doomed_when_left,
        definite_count,
        unknown_count,
        pool,
    })
}

// ---------------------------------------------------------------------------------------------
// The search.

const NIL: usize = usize::MAX;
const HEAD: usize = 0;

/// One node of the doubly-linked list: a call or a return entry of operation `op`.
struct Node {
    op: usize,
    /// When the operation was invoked (call entry) or returned (return entry).
    time: u64,
    /// For a call entry, its return entry (NIL for an operation that never returns); for a
    /// return entry, NIL.
    matching: usize,
    is_call: bool,
}

struct List {
    nodes: Vec<Node>,
    /// The call entry of each operation.
    call_node: Vec<usize>,
    prev: Vec<usize>,
    next: Vec<usize>,
}

impl List {
    /// Call and return entries ordered by time, calls before returns at equal times (so that
    /// operations touching in time count as concurrent); node 0 is the head sentinel. Pool
    /// writes are left out: the search tries them apart, one at a time.
    fn new(ops: &[PreparedOp<'_>]) -> Self {
        // (time, 0 for call / 1 for return, op)
        let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(ops.len() * 2);
        for (index, op) in ops.iter().enumerate() {
            if matches!(op.slot, Slot::Pool(_)) {
                continue;
            }
            events.push((op.invoked, 0, index));
            if let Some(returned) = op.returned {
                events.push((returned, 1, index));
            }
        }
        events.sort_unstable();
        let mut nodes = Vec::with_capacity(events.len() + 1);
        nodes.push(Node {
            op: NIL,
            time: 0,
            matching: NIL,
            is_call: false,
        });
        let mut return_node = vec![NIL; ops.len()];
        let mut call_node = vec![NIL; ops.len()];
        for (position, &(_, kind, op)) in events.iter().enumerate() {
            if kind == 1 {
                return_node[op] = position + 1;
            } else {
                call_node[op] = position + 1;
            }
        }
        for &(time, kind, op) in &events {
            nodes.push(Node {
                op,
                time,
                matching: if kind == 0 { return_node[op] } else { NIL },
                is_call: kind == 0,
            });
        }
        let count = nodes.len();
        let prev = (0..count)
            .map(|index| index.checked_sub(1).unwrap_or(NIL))
            .collect();
        let next = (0..count)
            .map(|index| if index + 1 < count { index + 1 } else { NIL })
            .collect();
        Self {
            nodes,
            call_node,
            prev,
            next,
        }
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        if next != NIL {
            self.prev[next] = node;
        }
    }

    /// Removes a call entry and its return entry.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        let matching = self.nodes[call].matching;
        if matching != NIL {
            self.unlink(matching);
        }
    }

    /// Undoes the [`List::lift`] of `call`, which must be the last one not undone.
    fn unlift(&mut self, call: usize) {
        let matching = self.nodes[call].matching;
        if matching != NIL {
            self.relink(matching);
        }
        self.relink(call);
    }
}

/// A fast hasher for the cache keys (bitsets of u64 words).
#[derive(Default)]
struct WordHasher {
    hash: u64,
}

impl WordHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.hash
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        for &byte in chunks.remainder() {
            self.add(u64::from(byte));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.add(word);
    }

    fn write_usize(&mut self, word: usize) {
        self.add(word as u64);
    }
}

/// A configuration of the search that was explored without success.
struct Failed {
    state: u32,
    pool_placed: u32,
    unknown: Box<[u64]>,
}

/// The failed configurations, by their set of placed definite operations.
type Cache = HashMap<Vec<u64>, Vec<Failed>, BuildHasherDefault<WordHasher>>;

/// Where the search stands: the register, and which operations are placed.
struct Configuration {
    state: u32,
    definite: Vec<u64>,
    unknown: Vec<u64>,
    pool_placed: u32,
    definite_left: usize,
}

impl Configuration {
    fn place(&mut self, slot: Slot) {
        match slot {
            Slot::Definite(index) => {
                set_bit(&mut self.definite, index);
                self.definite_left -= 1;
            }
            Slot::Unknown(index) => set_bit(&mut self.unknown, index),
            Slot::Pool(_) => self.pool_placed += 1,
        }
    }

    fn unplace(&mut self, slot: Slot) {
        match slot {
            Slot::Definite(index) => {
                clear_bit(&mut self.definite, index);
                self.definite_left += 1;
            }
            Slot::Unknown(index) => clear_bit(&mut self.unknown, index),
            Slot::Pool(_) => self.pool_placed -= 1,
        }
    }

    fn is_placed(&self, slot: Slot) -> bool {
        match slot {
            Slot::Definite(index) => bit(&self.definite, index),
            Slot::Unknown(index) => bit(&self.unknown, index),
            Slot::Pool(rank) => rank < self.pool_placed,
        }
    }

    /// Whether a failed configuration is at least as promising as this one: the same placed
    /// definite operations and register, no more unknown operations placed (an operation of
    /// unknown outcome left unplaced can still be placed later, or never), and no more of the
    /// pool used (earlier-invoked pool writes can stand for later ones).
    fn failed_before(&self, cache: &Cache) -> bool {
        cache.get(self.definite.as_slice()).is_some_and(|failures| {
            failures.iter().any(|failed| {
                failed.state == self.state
                    && failed.pool_placed <= self.pool_placed
                    && failed
                        .unknown
                        .iter()
                        .zip(&self.unknown)
                        .all(|(old, new)| old & !new == 0)
            })
        })
    }

    fn record_failure(&self, cache: &mut Cache) {
        let failed = Failed {
            state: self.state,
            pool_placed: self.pool_placed,
            unknown: self.unknown.clone().into_boxed_slice(),
        };
        match cache.get_mut(self.definite.as_slice()) {
            Some(failures) => failures.push(failed),
            None => {
                cache.insert(self.definite.clone(), vec![failed]);
            }
        }
    }
}

enum SearchResult {
    Linearizable,
    NotLinearizable,
    TimedOut,
}

/// The deepest point the search reached before backtracking.
struct Deepest {
    /// Indices (into the prepared ops) of the linearized operations, in order.
    prefix: Vec<usize>,
    /// The operation whose return entry stopped the search, if any.
    stuck: Option<usize>,
    /// The operations that could have been placed next.
    candidates: Vec<usize>,
}

struct Search {
    result: SearchResult,
    steps: u64,
    deepest: Option<Deepest>,
}

/// One placed operation of the search.
struct Frame {
    /// The operation (an index into the prepared ops).
    op: usize,
    /// Its call entry; NIL for a pool write, which is not in the list.
    call: usize,
    /// The register before it.
    previous_state: u32,
    /// Where the operations it doomed (placed with it) start in the `doomed` stack.
    doomed_start: usize,
    /// Whether it was placed without a choice (see `next_candidate`).
    forced: bool,
}

fn search(prepared: &Prepared<'_>, step_budget: u64) -> Search {
    let ops = &prepared.ops;
    let mut list = List::new(ops);
    let mut cache = Cache::default();
    let mut frames: Vec<Frame> = Vec::new();
    // The unknown compare-and-sets placed as no-ops with the frame that doomed them.
    let mut doomed: Vec<usize> = Vec::new();
    let mut at = Configuration {
        state: prepared.initial,
        definite: vec![0; prepared.definite_count.div_ceil(64)],
        unknown: vec![0; prepared.unknown_count.div_ceil(64)],
        pool_placed: 0,
        definite_left: prepared.definite_count,
    };
    let mut deepest: Option<Deepest> = None;
    let mut steps = 0u64;

    // The candidates of a configuration are tried in three passes: those of definite outcome
    // (in list order), then those of unknown outcome, then the next pool write. A
    // configuration with fewer unknown operations placed is at least as promising as one with
    // more, so exploring it first lets the cache prune the others.
    //
    // `node` is the list entry to look at next; `forced` when it is a legal operation that
    // leaves the register as it is (a read, a refused compare-and-set): placing such an
    // operation at once never loses a linearization (moving it earlier changes no state, and
    // it is a candidate, so nothing must come before it), so the search does not branch on it.
    let (mut node, mut forced) = next_candidate(&list, ops, at.state);
    let mut unknown_pass = false;
    let mut pool_tried = false;
    // Set to backtrack without looking for other candidates.
    let mut backtrack = false;
    // In the unknown passes: what the definite candidates (and unknown compare-and-sets) need.
    let mut wanted = Wanted::default();

    loop {
        // Only operations of unknown outcome are left: place them last, where they are legal.
        if at.definite_left == 0 {
            return Search {
                result: SearchResult::Linearizable,
                steps,
                deepest,
            };
        }
        if steps >= step_budget {
            return Search {
                result: SearchResult::TimedOut,
                steps,
                deepest,
            };
        }
        steps += 1;

        let at_window_end = node == NIL || !list.nodes[node].is_call;
        let candidate = if backtrack {
            None
        } else if !at_window_end {
            let index = list.nodes[node].op;
            let in_pass = match ops[index].slot {
                Slot::Definite(_) => !unknown_pass,
                Slot::Unknown(_) | Slot::Pool(_) => unknown_pass,
            };
            if !in_pass {
                node = list.next[node];
                continue;
            }
            Some(index)
        } else if !unknown_pass {
            unknown_pass = true;
            wanted.collect(&list, ops, at.state);
            node = list.next[HEAD];
            continue;
        } else if !pool_tried {
            pool_tried = true;
            // The next pool write, if it was invoked before the window ends.
            let window_end = if node == NIL {
                u64::MAX
            } else {
                list.nodes[node].time
            };
            match prepared.pool.get(at.pool_placed as usize) {
                Some(&index) if ops[index].invoked <= window_end => Some(index),
                _ => continue,
            }
        } else {
            None
        };

        let Some(index) = candidate else {
            // The window ends at a return entry: that operation returned before it could be
            // placed. Backtrack.
            if !backtrack
                && deepest
                    .as_ref()
                    .is_none_or(|deepest| frames.len() > deepest.prefix.len())
            {
                deepest = Some(record_deepest(&list, &frames, node));
            }
            let Some(frame) = frames.pop() else {
                return Search {
                    result: SearchResult::NotLinearizable,
                    steps,
                    deepest,
                };
            };
            at.record_failure(&mut cache);
            for &index in doomed[frame.doomed_start..].iter().rev() {
                list.unlift(list.call_node[index]);
                at.unplace(ops[index].slot);
            }
            doomed.truncate(frame.doomed_start);
            at.unplace(ops[frame.op].slot);
            at.state = frame.previous_state;
            forced = false;
            if frame.call == NIL {
                // A pool write, the last candidate: this configuration failed too.
                backtrack = true;
            } else {
                list.unlift(frame.call);
                // Other candidates are only tried for a choice; a forced placement was none.
                backtrack = frame.forced;
                node = list.next[frame.call];
                unknown_pass = ops[frame.op].returned.is_none();
                pool_tried = false;
                if unknown_pass {
                    wanted.collect(&list, ops, at.state);
                }
            }
            continue;
        };

        let op = &ops[index];
        let call = if matches!(op.slot, Slot::Pool(_)) {
            NIL
        } else {
            node
        };
        let Some(new_state) = op
            .step
            .apply(at.state)
            .filter(|&new_state| !unknown_pass || wanted.needs(new_state))
        else {
            if call != NIL {
                node = list.next[node];
            }
            continue;
        };
        let previous_state = at.state;
        at.place(op.slot);
        at.state = new_state;
        let doomed_start = doomed.len();
        if new_state != previous_state {
            for &waiting in &prepared.doomed_when_left[previous_state as usize] {
                if !at.is_placed(ops[waiting].slot) {
                    at.place(ops[waiting].slot);
                    doomed.push(waiting);
                }
            }
        }
        if at.failed_before(&cache) {
            for &waiting in &doomed[doomed_start..] {
                at.unplace(ops[waiting].slot);
            }
            doomed.truncate(doomed_start);
            at.unplace(op.slot);
            at.state = previous_state;
            // If the placement was forced, this configuration fails too.
            backtrack = forced;
            if call != NIL {
                node = list.next[node];
            }
            continue;
        }
        frames.push(Frame {
            op: index,
            call,
            previous_state,
            doomed_start,
            forced,
        });
        if call != NIL {
            list.lift(call);
        }
        for &waiting in &doomed[doomed_start..] {
            list.lift(list.call_node[waiting]);
        }
        (node, forced) = next_candidate(&list, ops, at.state);
        unknown_pass = false;
        pool_tried = false;
    }
}

/// What the candidates of a configuration need from the register, to decide whether placing
/// an operation of unknown outcome there can help: it can only if the operation placed next
/// observes its effect. Otherwise (the next one overwrites the register, or is a refused
/// compare-and-set that could go first) the unknown operation can be moved later or left out,
/// so the search does not place it.
#[derive(Default)]
struct Wanted {
    /// Values that a candidate read returned or a candidate compare-and-set expects.
    values: Vec<u32>,
    /// Whether a candidate refused compare-and-set needs the register to leave its state.
    leave_state: bool,
}

impl Wanted {
    fn collect(&mut self, list: &List, ops: &[PreparedOp<'_>], state: u32) {
        self.values.clear();
        self.leave_state = false;
        let mut node = list.next[HEAD];
        while node != NIL && list.nodes[node].is_call {
            match ops[list.nodes[node].op].step {
                Step::Read { value } => self.values.push(value),
                Step::CasApplied { expected, .. } | Step::CasUnknown { expected, .. } => {
                    self.values.push(expected)
                }
                Step::CasRefused { expected } => self.leave_state |= expected == state,
                Step::Write { .. } => {}
            }
            node = list.next[node];
        }
    }

    /// Whether placing an operation that puts `new_state` in the register can help.
    fn needs(&self, new_state: u32) -> bool {
        self.leave_state || self.values.contains(&new_state)
    }
}

/// The first candidate of a new configuration: a legal operation that leaves the register as
/// it is if there is one (forced), else the first call entry.
fn next_candidate(list: &List, ops: &[PreparedOp<'_>], state: u32) -> (usize, bool) {
    let mut node = list.next[HEAD];
    while node != NIL && list.nodes[node].is_call {
        let step = ops[list.nodes[node].op].step;
        if matches!(step, Step::Read { .. } | Step::CasRefused { .. })
            && step.apply(state).is_some()
        {
            return (node, true);
        }
        node = list.next[node];
    }
    (list.next[HEAD], false)
}

fn record_deepest(list: &List, frames: &[Frame], stuck_node: usize) -> Deepest {
    const MAX_CANDIDATES: usize = 10;
    let mut candidates = Vec::new();
    let mut node = list.next[HEAD];
    while node != NIL && node != stuck_node && candidates.len() < MAX_CANDIDATES {
        if list.nodes[node].is_call {
            candidates.push(list.nodes[node].op);
        }
        node = list.next[node];
    }
    Deepest {
        prefix: frames.iter().map(|frame| frame.op).collect(),
        stuck: (stuck_node != NIL).then(|| list.nodes[stuck_node].op),
        candidates,
    }
}

fn bit(bits: &[u64], index: usize) -> bool {
    bits.get(index / 64)
        .is_some_and(|word| word & (1 << (index % 64)) != 0)
}

fn set_bit(bits: &mut [u64], index: usize) {
    if let Some(word) = bits.get_mut(index / 64) {
        *word |= 1 << (index % 64);
    }
}

fn clear_bit(bits: &mut [u64], index: usize) {
    if let Some(word) = bits.get_mut(index / 64) {
        *word &= !(1 << (index % 64));
    }
}

// ---------------------------------------------------------------------------------------------
// Explanations.

fn violation(
    prepared: &Prepared<'_>,
    initial: Option<&str>,
    deepest: Option<Deepest>,
) -> Violation {
    let ops = &prepared.ops;
    let deepest = deepest.unwrap_or(Deepest {
        prefix: Vec::new(),
        stuck: None,
        candidates: Vec::new(),
    });
    // Replay the prefix with the real values (the search only knows their numbers).
    let mut state: Option<String> = initial.map(str::to_string);
    for &index in &deepest.prefix {
        let entry = ops[index].entry;
        match (&entry.operation, &entry.outcome) {
            (Operation::Write { value }, _) => state = Some(value.clone()),
            (Operation::Cas { new, .. }, Outcome::Ok) => state = Some(new.clone()),
            (Operation::Cas { expected, new }, Outcome::Unknown) if *expected == state => {
                state = Some(new.clone())
            }
            _ => {}
        }
    }
    Violation {
        longest_prefix: deepest
            .prefix
            .iter()
            .map(|&index| ops[index].entry.id)
            .collect(),
        operations_checked: ops.len(),
        state_after_prefix: state,
        stuck: deepest.stuck.map(|index| ops[index].entry.clone()),
        candidates: deepest
            .candidates
            .iter()
            .map(|&index| ops[index].entry.clone())
            .collect(),
    }
}

fn explain(prepared: &Prepared<'_>, violation: &Violation) -> String {
    const SHOWN: usize = 3;
    let by_id: BTreeMap<OpId, &Entry> = prepared
        .ops
        .iter()
        .map(|op| (op.entry.id, op.entry))
        .collect();
    let mut text = String::new();
    let prefix = &violation.longest_prefix;
    let _ = write!(
        text,
        "not linearizable: the longest linearizable prefix found has {} of the {} operations \
         checked",
        prefix.len(),
        violation.operations_checked
    );
    if prefix.is_empty() {
        let _ = write!(text, "; ");
    } else {
        let _ = writeln!(text, ", ending with:");
        if prefix.len() > SHOWN {
            let _ = writeln!(text, "  ...");
        }
        for id in &prefix[prefix.len().saturating_sub(SHOWN)..] {
            if let Some(entry) = by_id.get(id) {
                let _ = writeln!(text, "  {entry}");
            }
        }
    }
    let _ = write!(
        text,
        "after which the register holds {}",
        DisplayValue(violation.state_after_prefix.as_deref())
    );
    match &violation.stuck {
        Some(stuck) => {
            let _ = write!(
                text,
                ", and this operation returned before it, or any operation invoked before it \
                 returned, could be placed:\n  {stuck}"
            );
        }
        None => {
            let _ = write!(text, ", and no remaining operation can be placed next");
        }
    }
    let others: Vec<&Entry> = violation
        .candidates
        .iter()
        .filter(|candidate| Some(candidate.id) != violation.stuck.as_ref().map(|stuck| stuck.id))
        .collect();
    if !others.is_empty() {
        let _ = write!(text, "\nother candidates:");
        for candidate in others {
            let _ = write!(text, "\n  {candidate}");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A builder of histories with explicit times.
    #[derive(Default)]
    struct Builder {
        entries: Vec<Entry>,
    }

    impl Builder {
        fn add(
            &mut self,
            client: u64,
            key: &str,
            operation: Operation,
            invoked: u64,
            returned: Option<u64>,
            outcome: Outcome,
        ) -> &mut Self {
            let id = OpId(self.entries.len() as u64);
            self.entries.push(Entry {
                id,
                client,
                key: key.to_string(),
                operation,
                invoked_ns: invoked,
                returned_ns: returned,
                outcome,
            });
            self
        }

        fn write(&mut self, client: u64, value: &str, invoked: u64, returned: u64) -> &mut Self {
            self.add(
                client,
                "k",
                write(value),
                invoked,
                Some(returned),
                Outcome::Ok,
            )
        }

        fn write_unknown(&mut self, client: u64, value: &str, invoked: u64) -> &mut Self {
            self.add(client, "k", write(value), invoked, None, Outcome::Unknown)
        }

        fn read(
            &mut self,
            client: u64,
            value: Option<&str>,
            invoked: u64,
            returned: u64,
        ) -> &mut Self {
            self.add(
                client,
                "k",
                Operation::Read,
                invoked,
                Some(returned),
                Outcome::ReadOk {
                    value: value.map(str::to_string),
                },
            )
        }

        fn cas(
            &mut self,
            client: u64,
            expected: Option<&str>,
            new: &str,
            invoked: u64,
            returned: u64,
            outcome: Outcome,
        ) -> &mut Self {
            self.add(
                client,
                "k",
                Operation::Cas {
                    expected: expected.map(str::to_string),
                    new: new.to_string(),
                },
                invoked,
                Some(returned),
                outcome,
            )
        }

        fn verdict(&self) -> Verdict {
            let report = check_entries(&self.entries, &CheckOptions::default());
            assert_eq!(report.keys.len(), 1);
            report.keys[0].verdict
        }
    }

    fn write(value: &str) -> Operation {
        Operation::Write {
            value: value.to_string(),
        }
    }

    #[test]
    fn an_empty_history_is_linearizable() {
        let report = check_entries(&[], &CheckOptions::default());
        assert!(report.is_linearizable());
        assert!(report.keys.is_empty());
    }

    #[test]
    fn a_read_of_the_initial_absent_value_is_linearizable() {
        let mut history = Builder::default();
        history.read(1, None, 0, 10).write(2, "a", 20, 30);
        assert_eq!(history.verdict(), Verdict::Linearizable);
    }

    #[test]
    fn reads_concurrent_with_a_write_may_see_either_value_in_either_order() {
        let mut history = Builder::default();
        history
            .write(1, "a", 0, 10)
            .write(2, "b", 20, 100)
            .read(3, Some("b"), 30, 40)
            .read(4, Some("a"), 30, 50);
        // The reads overlap each other and the write of b: the read of a may come first.
        assert_eq!(history.verdict(), Verdict::Linearizable);
        let mut history = Builder::default();
        history
            .write(1, "a", 0, 10)
            .write(2, "b", 20, 100)
            .read(3, Some("a"), 30, 40)
            .read(4, Some("b"), 50, 60);
        assert_eq!(history.verdict(), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_writes_may_take_effect_in_either_order() {
        for last in ["a", "b"] {
            let mut history = Builder::default();
            history
                .write(1, "a", 0, 50)
                .write(2, "b", 10, 40)
                .read(3, Some(last), 60, 70);
            assert_eq!(history.verdict(), Verdict::Linearizable, "last {last}");
        }
    }

    #[test]
    fn a_read_of_an_overwritten_value_after_the_write_returned_is_not_linearizable() {
        let mut history = Builder::default();
        history
            .write(1, "a", 0, 10)
            .write(1, "b", 20, 30)
            .read(2, Some("a"), 40, 50);
        assert_eq!(history.verdict(), Verdict::NotLinearizable);
    }

    #[test]
    fn a_read_that_sees_a_value_then_a_later_read_that_sees_the_older_one_is_not_linearizable() {
        let mut history = Builder::default();
        history
            .write(1, "a", 0, 10)
            .write(1, "b", 20, 100)
            .read(2, Some("b"), 30, 40)
            .read(3, Some("a"), 50, 60);
        assert_eq!(history.verdict(), Verdict::NotLinearizable);
    }

    #[test]
    fn a_read_of_a_value_never_written_is_not_linearizable() {
        let mut history = Builder::default();
        history.write(1, "a", 0, 10).read(2, Some("z"), 0, 20);
        assert_eq!(history.verdict(), Verdict::NotLinearizable);
    }

    #[test]
    fn two_compare_and_sets_from_the_same_expected_value_both_succeeding_is_not_linearizable() {
        let mut history = Builder::default();
        history
            .write(1, "a", 0, 10)
            .cas(2, Some("a"), "b", 20, 40, Outcome::Ok)
            .cas(3, Some("a"), "c", 20, 40, Outcome::Ok);
        assert_eq!(history.verdict(), Verdict::NotLinearizable);
        let mut creates = Builder::default();
        creates
            .cas(2, None, "b", 0, 40, Outcome::Ok)
            .cas(3, None, "c", 10, 30, Outcome::Ok);
        assert_eq!(creates.verdict(), Verdict::NotLinearizable);
    }

    #[test]
    fn a_compare_and_set_conflict_is_linearizable_when_another_update_came_first() {
        let mut history = Builder::default();
        history
            .write(1, "a", 0, 10)
            .cas(2, Some("a"), "b", 20, 40, Outcome::Ok)
            .cas(3, Some("a"), "c", 20, 40, Outcome::CasConflict)
            .read(1, Some("b"), 50, 60);
        assert_eq!(history.verdict(), Verdict::Linearizable);
        let mut create = Builder::default();
        create.cas(1, None, "a", 0, 10, Outcome::Ok).cas(
            2,
            None,
            "b",
            20,
            30,
            Outcome::CasConflict,
        );
        assert_eq!(create.verdict(), Verdict::Linearizable);
    }

    #[test]
    fn a_compare_and_set_conflict_while_the_register_holds_the_expected_value_is_not_linearizable()
    {
        let mut history = Builder::default();
        history
            .write(1, "a", 0, 10)
            .cas(2, Some("a"), "b", 20, 30, Outcome::CasConflict)
            .read(1, Some("a"), 40, 50);
        assert_eq!(history.verdict(), Verdict::NotLinearizable);
    }

    #[test]
    fn a_failed_operation_is_dropped() {
        let mut history = Builder::default();
        history
            .write(1, "a", 0, 10)
            .add(2, "k", write("b"), 20, Some(30), Outcome::Fail)
            .read(1, Some("a"), 40, 50);
        assert_eq!(history.verdict(), Verdict::Linearizable);
    }

    #[test]
    fn an_unknown_write_may_have_taken_effect_at_any_time_after_its_invocation() {
        // Applied, observed long after the client gave up.
        let mut applied = Builder::default();
        applied
            .write(1, "a", 0, 10)
            .write_unknown(2, "b", 20)
            .read(3, Some("a"), 30, 40)
            .read(3, Some("b"), 1_000, 1_010);
        assert_eq!(applied.verdict(), Verdict::Linearizable);
        // Never applied.
        let mut lost = Builder::default();
        lost.write(1, "a", 0, 10)
            .write_unknown(2, "b", 20)
            .read(3, Some("a"), 1_000, 1_010);
        assert_eq!(lost.verdict(), Verdict::Linearizable);
        // But not before its invocation.
        let mut early = Builder::default();
        early.read(3, Some("b"), 0, 10).write_unknown(2, "b", 20);
        assert_eq!(early.verdict(), Verdict::NotLinearizable);
    }

    #[test]
    fn an_unknown_compare_and_set_applies_only_from_its_expected_value() {
        let mut applied = Builder::default();
        applied
            .write(1, "a", 0, 10)
            .add(
                2,
                "k",
                Operation::Cas {
                    expected: Some("a".to_string()),
                    new: "b".to_string(),
                },
                20,
                Some(30),
                Outcome::Unknown,
            )
            .read(3, Some("b"), 40, 50);
        assert_eq!(applied.verdict(), Verdict::Linearizable);
        let mut wrong_expected = Builder::default();
        wrong_expected
            .write(1, "a", 0, 10)
            .write(1, "c", 11, 12)
            .add(
                2,
                "k",
                Operation::Cas {
                    expected: Some("a".to_string()),
                    new: "b".to_string(),
                },
                20,
                Some(30),
                Outcome::Unknown,
            )
            .read(3, Some("b"), 40, 50);
        assert_eq!(wrong_expected.verdict(), Verdict::NotLinearizable);
    }

    #[test]
    fn unknown_writes_of_unobserved_values_stay_interchangeable_with_conflicts() {
        // The conflict needs some unknown write to have applied between the two reads of a.
        let mut history = Builder::default();
        history
            .write(1, "a", 0, 10)
            .write_unknown(2, "x", 20)
            .write_unknown(3, "y", 21)
            .cas(4, Some("a"), "b", 30, 40, Outcome::CasConflict);
        assert_eq!(history.verdict(), Verdict::Linearizable);
        let mut without = Builder::default();
        without
            .write(1, "a", 0, 10)
            .cas(4, Some("a"), "b", 30, 40, Outcome::CasConflict);
        assert_eq!(without.verdict(), Verdict::NotLinearizable);
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut history = Builder::default();
        history
            .add(1, "good", write("a"), 0, Some(10), Outcome::Ok)
            .add(2, "good", Operation::Read, 20, Some(30), read_ok("a"))
            .add(1, "bad", write("b"), 0, Some(10), Outcome::Ok)
            .add(2, "bad", Operation::Read, 20, Some(30), read_ok("a"));
        let report = check_entries(&history.entries, &CheckOptions::default());
        assert_eq!(report.keys[0].key, "bad");
        assert_eq!(report.keys[0].verdict, Verdict::NotLinearizable);
        assert_eq!(report.keys[1].verdict, Verdict::Linearizable);
        assert!(!report.is_linearizable());
        assert!(report.has_violation());
    }

    #[test]
    fn an_outcome_that_does_not_fit_its_operation_is_malformed() {
        let mut history = Builder::default();
        history.add(1, "k", Operation::Read, 0, Some(10), Outcome::Ok);
        assert_eq!(history.verdict(), Verdict::Malformed);
        let mut backwards = Builder::default();
        backwards.write(1, "a", 10, 5);
        assert_eq!(backwards.verdict(), Verdict::Malformed);
    }

    #[test]
    fn initial_values_are_the_starting_state() {
        let mut history = Builder::default();
        history.cas(1, Some("seed"), "a", 0, 10, Outcome::Ok);
        let options = CheckOptions {
            initial_values: HashMap::from([("k".to_string(), "seed".to_string())]),
            ..CheckOptions::default()
        };
        assert!(check_entries(&history.entries, &options).is_linearizable());
        assert_eq!(history.verdict(), Verdict::NotLinearizable);
    }

    #[test]
    fn a_violation_names_the_longest_prefix_and_the_operation_that_cannot_be_placed() {
        let mut history = Builder::default();
        history
            .write(1, "a", 0, 10)
            .write(1, "b", 20, 30)
            .read(2, Some("a"), 40, 50);
        let report = check_entries(&history.entries, &CheckOptions::default());
        let key = &report.keys[0];
        let violation = key.violation.as_ref().unwrap();
        assert_eq!(violation.longest_prefix, vec![OpId(0), OpId(1)]);
        assert_eq!(violation.state_after_prefix.as_deref(), Some("b"));
        assert_eq!(violation.stuck.as_ref().unwrap().id, OpId(2));
        let explanation = key.explanation.as_ref().unwrap();
        assert!(
            explanation.contains("#2 client 2 read -> \"a\""),
            "{explanation}"
        );
        assert!(explanation.contains("2 of the 3"), "{explanation}");
        assert!(report.to_string().contains("1 not linearizable"));
    }

    #[test]
    fn a_key_runs_out_of_a_tiny_step_budget_and_times_out() {
        let history = simulate(&Simulation {
            seed: 7,
            clients: 10,
            operations: 300,
            keys: 1,
            unknown_percent: 5,
        });
        let options = CheckOptions {
            step_budget: 10,
            ..CheckOptions::default()
        };
        let report = check_entries(&history, &options);
        assert_eq!(report.keys[0].verdict, Verdict::TimedOut);
        assert_eq!(report.keys[0].steps, 10);
        assert!(!report.is_linearizable());
        assert!(!report.has_violation());
    }

    #[test]
    fn lost_writes_are_the_acknowledged_creates_missing_or_changed_at_the_end() {
        let acknowledged = vec![
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
            ("c".to_string(), "3".to_string()),
            ("d".to_string(), "4".to_string()),
        ];
        let final_state = HashMap::from([
            ("a".to_string(), Some("1".to_string())),
            ("b".to_string(), None),
            ("c".to_string(), Some("other".to_string())),
        ]);
        let lost = lost_writes(&acknowledged, &final_state);
        let summary: Vec<(&str, Option<&str>)> = lost
            .iter()
            .map(|lost| (lost.key.as_str(), lost.found.as_deref()))
            .collect();
        assert_eq!(
            summary,
            vec![("b", None), ("c", Some("other")), ("d", None)]
        );
    }

    fn read_ok(value: &str) -> Outcome {
        Outcome::ReadOk {
            value: Some(value.to_string()),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Random histories from a sequential simulation.

    /// SplitMix64: a small seeded generator, so that the histories are the same on every run.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, bound: u64) -> u64 {
            self.next() % bound
        }

        fn percent(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    struct Simulation {
        seed: u64,
        clients: usize,
        operations: usize,
        keys: usize,
        unknown_percent: u64,
    }

    enum Phase {
        Idle,
        /// Invoked, not yet taken effect.
        Invoked {
            entry: usize,
        },
        /// Taken effect (or lost), not yet returned.
        Applied {
            entry: usize,
            outcome: Outcome,
        },
    }

    /// A linearizable history: each operation takes effect atomically at a random point
    /// between its invocation and its return, on a sequential register per key; clients read
    /// values and use them (sometimes stale) as the expected value of compare-and-sets. Some
    /// operations time out (unknown), having taken effect or not.
    fn simulate(simulation: &Simulation) -> Vec<Entry> {
        let mut random = Random(simulation.seed);
        let mut entries: Vec<Entry> = Vec::new();
        let mut registers: Vec<Option<String>> = vec![None; simulation.keys];
        let mut seen: Vec<Vec<Option<String>>> =
            vec![vec![None; simulation.keys]; simulation.clients];
        let mut phases: Vec<Phase> = (0..simulation.clients).map(|_| Phase::Idle).collect();
        let mut now = 0u64;
        let mut next_value = 0u64;
        loop {
            let busy = phases.iter().any(|phase| !matches!(phase, Phase::Idle));
            if entries.len() >= simulation.operations && !busy {
                return entries;
            }
            now += 1 + random.below(10);
            let client = random.below(simulation.clients as u64) as usize;
            let phase = std::mem::replace(&mut phases[client], Phase::Idle);
            phases[client] = match phase {
                Phase::Idle if entries.len() < simulation.operations => {
                    let key = random.below(simulation.keys as u64) as usize;
                    let operation = match random.below(10) {
                        0..=3 => Operation::Read,
                        4..=5 => {
                            next_value += 1;
                            Operation::Write {
                                value: format!("v{next_value}"),
                            }
                        }
                        _ => {
                            next_value += 1;
                            let expected = if random.percent(70) {
                                registers[key].clone()
                            } else {
                                seen[client][key].clone()
                            };
                            Operation::Cas {
                                expected,
                                new: format!("v{next_value}"),
                            }
                        }
                    };
                    entries.push(Entry {
                        id: OpId(entries.len() as u64),
                        client: client as u64,
                        key: format!("key-{key}"),
                        operation,
                        invoked_ns: now,
                        returned_ns: None,
                        outcome: Outcome::Unknown,
                    });
                    Phase::Invoked {
                        entry: entries.len() - 1,
                    }
                }
                Phase::Idle => Phase::Idle,
                Phase::Invoked { entry } => {
                    let unknown = random.percent(simulation.unknown_percent);
                    let lost = unknown && random.percent(50);
                    let key = entries[entry].key["key-".len()..].parse::<usize>().unwrap();
                    let register = &mut registers[key];
                    let outcome = match &entries[entry].operation {
                        _ if lost => Outcome::Unknown,
                        Operation::Read => {
                            seen[client][key] = register.clone();
                            Outcome::ReadOk {
                                value: register.clone(),
                            }
                        }
                        Operation::Write { value } => {
                            *register = Some(value.clone());
                            Outcome::Ok
                        }
                        Operation::Cas { expected, new } => {
                            if register == expected {
                                *register = Some(new.clone());
                                Outcome::Ok
                            } else {
                                seen[client][key] = register.clone();
                                Outcome::CasConflict
                            }
                        }
                    };
                    let outcome = if unknown { Outcome::Unknown } else { outcome };
                    Phase::Applied { entry, outcome }
                }
                Phase::Applied { entry, outcome } => {
                    // Half of the unknown operations are never completed at all.
                    if outcome != Outcome::Unknown || random.percent(50) {
                        entries[entry].returned_ns = Some(now);
                    }
                    entries[entry].outcome = outcome;
                    Phase::Idle
                }
            };
        }
    }

    /// Makes one read of a definitely overwritten value: a read that returned a value, made to
    /// return the value of a definite write W1 although a definite write W2 was invoked after
    /// W1 returned and returned before the read was invoked. Returns the read's id.
    fn corrupt_one_read(entries: &mut [Entry]) -> OpId {
        let written = |entry: &Entry| match (&entry.operation, &entry.outcome) {
            (Operation::Write { value }, Outcome::Ok) => Some(value.clone()),
            (Operation::Cas { new, .. }, Outcome::Ok) => Some(new.clone()),
            _ => None,
        };
        for read in (0..entries.len()).rev() {
            if !matches!(entries[read].outcome, Outcome::ReadOk { .. }) {
                continue;
            }
            let key = &entries[read].key;
            let read_invoked = entries[read].invoked_ns;
            let writes: Vec<&Entry> = entries
                .iter()
                .filter(|entry| &entry.key == key && written(entry).is_some())
                .collect();
            let stale = writes.iter().find_map(|first| {
                let first_returned = first.returned_ns?;
                writes
                    .iter()
                    .any(|second| {
                        second.invoked_ns > first_returned
                            && second
                                .returned_ns
                                .is_some_and(|returned| returned < read_invoked)
                    })
                    .then(|| written(first))
                    .flatten()
            });
            if let Some(stale) = stale {
                entries[read].outcome = Outcome::ReadOk { value: Some(stale) };
                return entries[read].id;
            }
        }
        panic!("no read to corrupt");
    }

    #[test]
    fn a_random_history_of_a_sequential_register_is_linearizable_and_one_stale_read_is_caught() {
        for seed in 0..5 {
            let mut entries = simulate(&Simulation {
                seed,
                clients: 10,
                operations: 300,
                keys: 3,
                unknown_percent: 5,
            });
            let report = check_entries(&entries, &CheckOptions::default());
            assert!(report.is_linearizable(), "seed {seed}: {report}");
            assert!(report.keys.iter().all(|key| key.operations_checked > 50));

            let corrupted = corrupt_one_read(&mut entries);
            let report = check_entries(&entries, &CheckOptions::default());
            let bad: Vec<&KeyReport> = report.problems().collect();
            assert_eq!(bad.len(), 1, "seed {seed}: {report}");
            assert_eq!(bad[0].verdict, Verdict::NotLinearizable, "seed {seed}");
            let key = &entries[corrupted.0 as usize].key;
            assert_eq!(&bad[0].key, key);
        }
    }

    #[test]
    fn a_random_history_with_a_read_of_a_value_never_written_is_not_linearizable() {
        let mut entries = simulate(&Simulation {
            seed: 42,
            clients: 10,
            operations: 300,
            keys: 1,
            unknown_percent: 5,
        });
        let read = entries
            .iter_mut()
            .rev()
            .find(|entry| matches!(entry.outcome, Outcome::ReadOk { .. }))
            .unwrap();
        read.outcome = read_ok("never written");
        let report = check_entries(&entries, &CheckOptions::default());
        assert_eq!(report.keys[0].verdict, Verdict::NotLinearizable, "{report}");
    }

    #[test]
    fn a_two_thousand_operation_history_on_one_hot_key_with_eight_clients_is_checked() {
        let mut entries = simulate(&Simulation {
            seed: 2000,
            clients: 8,
            operations: 2000,
            keys: 1,
            unknown_percent: 2,
        });
        let report = check_entries(&entries, &CheckOptions::default());
        assert!(report.is_linearizable(), "{report}");
        assert_eq!(report.keys[0].operations, 2000);

        corrupt_one_read(&mut entries);
        let report = check_entries(&entries, &CheckOptions::default());
        assert_eq!(report.keys[0].verdict, Verdict::NotLinearizable, "{report}");
    }

    // -----------------------------------------------------------------------------------------
    // A brute-force reference on small histories.

    /// Whether some order of the operations is legal and respects real time, by trying them
    /// all: failed operations and unknown reads are dropped; an operation of unknown outcome
    /// may be left out; a compare-and-set of unknown outcome is placed only where it applies.
    fn brute_force_is_linearizable(entries: &[Entry]) -> bool {
        fn search(
            ops: &[&Entry],
            placed: u32,
            state: Option<String>,
            failed: &mut std::collections::HashSet<(u32, Option<String>)>,
        ) -> bool {
            let done = ops
                .iter()
                .enumerate()
                .all(|(index, op)| placed & (1 << index) != 0 || op.outcome == Outcome::Unknown);
            if done {
                return true;
            }
            if failed.contains(&(placed, state.clone())) {
                return false;
            }
            for (index, op) in ops.iter().enumerate() {
                if placed & (1 << index) != 0 {
                    continue;
                }
                let must_wait = ops.iter().enumerate().any(|(other_index, other)| {
                    other_index != index
                        && placed & (1 << other_index) == 0
                        && other.outcome != Outcome::Unknown
                        && other.returned_ns.unwrap() < op.invoked_ns
                });
                if must_wait {
                    continue;
                }
                let next = match (&op.operation, &op.outcome) {
                    (Operation::Write { value }, _) => Some(Some(value.clone())),
                    (Operation::Cas { expected, new }, Outcome::Ok | Outcome::Unknown) => {
                        (state == *expected).then(|| Some(new.clone()))
                    }
                    (Operation::Cas { expected, .. }, Outcome::CasConflict) => {
                        (state != *expected).then(|| state.clone())
                    }
                    (Operation::Read, Outcome::ReadOk { value }) => {
                        (state == *value).then(|| state.clone())
                    }
                    other => panic!("unexpected {other:?}"),
                };
                if let Some(next) = next {
                    if search(ops, placed | 1 << index, next, failed) {
                        return true;
                    }
                }
            }
            failed.insert((placed, state));
            false
        }
        let ops: Vec<&Entry> = entries
            .iter()
            .filter(|entry| {
                !matches!(
                    (&entry.operation, &entry.outcome),
                    (_, Outcome::Fail) | (Operation::Read, Outcome::Unknown)
                )
            })
            .collect();
        search(&ops, 0, None, &mut std::collections::HashSet::new())
    }

    /// A small history with random intervals, values and outcomes: mostly not linearizable.
    fn random_small_history(random: &mut Random) -> Vec<Entry> {
        let count = 3 + random.below(7) as usize;
        let value = |random: &mut Random| {
            let index = random.below(count as u64 + 1);
            (index < count as u64).then(|| format!("v{index}"))
        };
        (0..count)
            .map(|index| {
                let invoked = random.below(30);
                let returned = invoked + random.below(12);
                let (operation, outcome) = match random.below(3) {
                    0 => (
                        write(&format!("v{index}")),
                        match random.below(10) {
                            0..=6 => Outcome::Ok,
                            7..=8 => Outcome::Unknown,
                            _ => Outcome::Fail,
                        },
                    ),
                    1 => (
                        Operation::Cas {
                            expected: value(random),
                            new: format!("v{index}"),
                        },
                        match random.below(10) {
                            0..=3 => Outcome::Ok,
                            4..=6 => Outcome::CasConflict,
                            7..=8 => Outcome::Unknown,
                            _ => Outcome::Fail,
                        },
                    ),
                    _ => (
                        Operation::Read,
                        if random.percent(85) {
                            Outcome::ReadOk {
                                value: value(random),
                            }
                        } else {
                            Outcome::Unknown
                        },
                    ),
                };
                let returned =
                    (outcome != Outcome::Unknown || random.percent(50)).then_some(returned);
                Entry {
                    id: OpId(index as u64),
                    client: index as u64,
                    key: "k".to_string(),
                    operation,
                    invoked_ns: invoked,
                    returned_ns: returned,
                    outcome,
                }
            })
            .collect()
    }

    /// Changes one outcome of `entries` at random (a read value, a compare-and-set that
    /// succeeded or conflicted, a write made unknown).
    fn mutate_one(random: &mut Random, entries: &mut [Entry]) {
        let values: Vec<Option<String>> = std::iter::once(None)
            .chain(entries.iter().filter_map(|entry| match &entry.operation {
                Operation::Write { value } => Some(Some(value.clone())),
                Operation::Cas { new, .. } => Some(Some(new.clone())),
                Operation::Read => None,
            }))
            .collect();
        let index = random.below(entries.len() as u64) as usize;
        let entry = &mut entries[index];
        entry.outcome = match (&entry.operation, &entry.outcome) {
            (Operation::Read, _) => Outcome::ReadOk {
                value: values[random.below(values.len() as u64) as usize].clone(),
            },
            (Operation::Cas { .. }, Outcome::Ok) => Outcome::CasConflict,
            (Operation::Cas { .. }, _) => Outcome::Ok,
            (Operation::Write { .. }, Outcome::Ok) => Outcome::Unknown,
            (Operation::Write { .. }, _) => Outcome::Ok,
        };
        if entry.outcome != Outcome::Unknown && entry.returned_ns.is_none() {
            entry.returned_ns = Some(entry.invoked_ns + 1 + random.below(50));
        }
    }

    #[test]
    fn the_checker_agrees_with_a_brute_force_search_on_thousands_of_small_histories() {
        let mut random = Random(99);
        let (mut linearizable, mut not_linearizable) = (0, 0);
        for round in 0..6000u64 {
            let entries = if round % 2 == 0 {
                random_small_history(&mut random)
            } else {
                let mut entries = simulate(&Simulation {
                    seed: round,
                    clients: 2 + random.below(3) as usize,
                    operations: 4 + random.below(8) as usize,
                    keys: 1,
                    unknown_percent: 25,
                });
                if random.percent(60) {
                    mutate_one(&mut random, &mut entries);
                }
                entries
            };
            let expected = brute_force_is_linearizable(&entries);
            let report = check_entries(&entries, &CheckOptions::default());
            let verdict = report
                .keys
                .first()
                .map_or(Verdict::Linearizable, |key| key.verdict);
            let expected_verdict = if expected {
                linearizable += 1;
                Verdict::Linearizable
            } else {
                not_linearizable += 1;
                Verdict::NotLinearizable
            };
            assert_eq!(
                verdict,
                expected_verdict,
                "round {round}: {}",
                entries
                    .iter()
                    .map(|entry| format!("\n  {entry}"))
                    .collect::<String>()
            );
        }
        assert!(
            linearizable > 1000 && not_linearizable > 1000,
            "{linearizable} {not_linearizable}"
        );
    }
}
