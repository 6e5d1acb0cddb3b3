//! The control plane's event spam filter, as client-go's `EventSourceObjectSpamFilter`: each
//! controller may record at most `EVENT_BURST` Events about one object at once, and one more
//! every `EVENT_REFILL_MS` after that; the rest are dropped, not written. A ReplicaSet scaled
//! to 10,000 pods so records 25 `SuccessfulCreate` Events, as it would in Kubernetes, rather
//! than 10,000 writes through Raft. Pure: the shell keeps the budget and gives it `now`.

use std::collections::HashMap;

use super::Action;

/// Events about one object a controller may record at once (client-go's `defaultSpamBurst`).
pub const EVENT_BURST: u32 = 25;
/// After the burst, one more Event about the object per this many milliseconds (client-go's
/// `defaultSpamQPS`, 1/300 per second).
pub const EVENT_REFILL_MS: i64 = 300_000;
/// Objects whose budgets are kept at most (client-go's `maxLruCacheEntries`); when more, the
/// budgets that are whole again, then the least recently used, are forgotten.
pub const MAX_TRACKED_OBJECTS: usize = 4096;

/// The involved object of an Event: kind, namespace, name. The kind also names the controller
/// that records it.
type Involved = (String, String, String);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Events that may still be recorded now, before refilling since `refilled_ms`.
    tokens: u32,
    /// When the bucket last gained its tokens.
    refilled_ms: i64,
    /// When an Event about the object was last considered.
    used_ms: i64,
}

impl Bucket {
    /// The bucket as it stands at `now_ms`: a token per whole refill interval since.
    fn refilled(self, now_ms: i64) -> Bucket {
        if self.tokens >= EVENT_BURST {
            return self;
        }
        let intervals = (now_ms - self.refilled_ms).max(0) / EVENT_REFILL_MS;
        if intervals == 0 {
            return self;
        }
        let gained = u32::try_from(intervals).unwrap_or(u32::MAX);
        Bucket {
            tokens: self.tokens.saturating_add(gained).min(EVENT_BURST),
            refilled_ms: self.refilled_ms + intervals.saturating_mul(EVENT_REFILL_MS),
            used_ms: self.used_ms,
        }
    }
}

/// Per involved object, how many Events the control plane may still record.
#[derive(Debug, Default)]
pub struct EventBudget {
    buckets: HashMap<Involved, Bucket>,
}

impl EventBudget {
    /// Keeps the actions that are not Events, and the Events whose object still has budget at
    /// `now_ms`, in their order; spends the budget of those kept.
    pub fn admit(&mut self, actions: Vec<Action>, now_ms: i64) -> Vec<Action> {
        let admitted = actions
            .into_iter()
            .filter(|action| match action {
                Action::Event {
                    involved_kind,
                    namespace,
                    name,
                    ..
                } => self.spend(
                    (involved_kind.clone(), namespace.clone(), name.clone()),
                    now_ms,
                ),
                _ => true,
            })
            .collect();
        self.forget_beyond(MAX_TRACKED_OBJECTS, now_ms);
        admitted
    }

    /// Takes one token of `involved`'s budget, if it has one at `now_ms`.
    fn spend(&mut self, involved: Involved, now_ms: i64) -> bool {
        let bucket = self.buckets.entry(involved).or_insert(Bucket {
            tokens: EVENT_BURST,
            refilled_ms: now_ms,
            used_ms: now_ms,
        });
        let mut current = bucket.refilled(now_ms);
        current.used_ms = now_ms;
        let allowed = current.tokens > 0;
        if allowed {
            if current.tokens == EVENT_BURST {
                // Refilling starts from the first token taken out of a whole bucket.
                current.refilled_ms = now_ms;
            }
            current.tokens -= 1;
        }
        *bucket = current;
        allowed
    }

    /// Keeps at most `limit` budgets: whole ones go first (forgetting them changes nothing),
    /// then the least recently used.
    fn forget_beyond(&mut self, limit: usize, now_ms: i64) {
        if self.buckets.len() <= limit {
            return;
        }
        self.buckets
            .retain(|_, bucket| bucket.refilled(now_ms).tokens < EVENT_BURST);
        if self.buckets.len() <= limit {
            return;
        }
        let mut used: Vec<i64> = self.buckets.values().map(|b| b.used_ms).collect();
        used.sort_unstable();
        let cutoff = used[used.len() - limit];
        self.buckets.retain(|_, bucket| bucket.used_ms >= cutoff);
    }

    /// How many objects' budgets are kept.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, name: &str, message: &str) -> Action {
        Action::Event {
            involved_kind: kind.into(),
            namespace: "default".into(),
            name: name.into(),
            uid: String::new(),
            event_type: "Normal".into(),
            reason: "SuccessfulCreate".into(),
            message: message.into(),
        }
    }

    fn events(kind: &str, name: &str, count: usize) -> Vec<Action> {
        (0..count)
            .map(|i| event(kind, name, &format!("Created pod: web-{i}")))
            .collect()
    }

    #[test]
    fn a_replica_set_creating_many_pods_records_only_its_burst_of_events() {
        let mut budget = EventBudget::default();
        let admitted = budget.admit(events("ReplicaSet", "web", 500), 1_000);
        assert_eq!(admitted.len(), EVENT_BURST as usize);
        assert_eq!(
            admitted[0],
            event("ReplicaSet", "web", "Created pod: web-0")
        );
        let next_pass = budget.admit(events("ReplicaSet", "web", 500), 1_200);
        assert!(
            next_pass.is_empty(),
            "the burst is spent until the next refill"
        );
    }

    #[test]
    fn other_actions_are_never_held_back_and_keep_their_order() {
        let mut budget = EventBudget::default();
        let mut actions = events("ReplicaSet", "web", 30);
        actions.insert(0, Action::Create(serde_json::json!({"kind": "Pod"})));
        actions.push(Action::Delete {
            kind: "Pod".into(),
            namespace: "default".into(),
            name: "old".into(),
            resource_version: None,
        });
        let admitted = budget.admit(actions, 0);
        assert_eq!(admitted.len(), EVENT_BURST as usize + 2);
        assert!(matches!(admitted[0], Action::Create(_)));
        assert!(matches!(admitted.last(), Some(Action::Delete { .. })));
    }

    #[test]
    fn each_object_has_a_budget_of_its_own() {
        let mut budget = EventBudget::default();
        assert_eq!(budget.admit(events("ReplicaSet", "web", 40), 0).len(), 25);
        assert_eq!(budget.admit(events("ReplicaSet", "api", 40), 0).len(), 25);
        assert_eq!(budget.admit(events("Deployment", "web", 3), 0).len(), 3);
    }

    #[test]
    fn one_more_event_is_allowed_per_refill_interval_up_to_the_burst() {
        let mut budget = EventBudget::default();
        budget.admit(events("ReplicaSet", "web", 25), 0);
        assert!(budget
            .admit(events("ReplicaSet", "web", 1), EVENT_REFILL_MS - 1)
            .is_empty());
        assert_eq!(
            budget
                .admit(events("ReplicaSet", "web", 5), EVENT_REFILL_MS)
                .len(),
            1
        );
        assert_eq!(
            budget
                .admit(events("ReplicaSet", "web", 5), 3 * EVENT_REFILL_MS)
                .len(),
            2,
            "two more intervals, two more events"
        );
        let much_later = 1_000 * EVENT_REFILL_MS;
        assert_eq!(
            budget
                .admit(events("ReplicaSet", "web", 40), much_later)
                .len(),
            25
        );
    }

    #[test]
    fn budgets_are_bounded_and_whole_or_least_recently_used_ones_are_forgotten_first() {
        let mut budget = EventBudget::default();
        for i in 0..MAX_TRACKED_OBJECTS + 10 {
            let at = i64::try_from(i).expect("a small index");
            budget.admit(events("Pod", &format!("pod-{i}"), 1), at);
        }
        assert_eq!(budget.tracked(), MAX_TRACKED_OBJECTS);
        // The oldest were forgotten: their budgets start whole again.
        assert_eq!(budget.admit(events("Pod", "pod-0", 30), 10_000).len(), 25);
        // A budget that refilled completely is forgotten before any other.
        let later = 10_000 + EVENT_REFILL_MS;
        budget.admit(events("Pod", "fresh", 1), later);
        assert_eq!(
            budget.tracked(),
            2,
            "only pod-0 (spent at 10,000) and fresh are short of a whole budget"
        );
    }
}
