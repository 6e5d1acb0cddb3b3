use serde_json::{json, Value};

use super::*;

/// Merges `patch` into `base` (objects key by key, anything else replaced).
fn merged(mut base: Value, patch: Value) -> Value {
    fn merge(base: &mut Value, patch: Value) {
        match (base, patch) {
            (Value::Object(base), Value::Object(patch)) => {
                for (key, value) in patch {
                    merge(base.entry(key).or_insert(Value::Null), value);
                }
            }
            (base, patch) => *base = patch,
        }
    }
    merge(&mut base, patch);
    base
}

/// A ready node with 4 cpus, 8Gi of memory and room for 110 pods, patched.
fn node_with(name: &str, patch: Value) -> Node {
    let base = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    });
    serde_json::from_value(merged(base, patch)).expect("node parses")
}

fn node(name: &str) -> Node {
    node_with(name, json!({}))
}

/// A pending pod in `default` with one container requesting `cpu` and `memory`, patched.
fn pod_with(name: &str, cpu: &str, memory: &str, patch: Value) -> Pod {
    let base = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "default", "uid": format!("uid-{name}"),
            "resourceVersion": "7", "creationTimestamp": "2026-01-01T00:00:00Z"
        },
        "spec": {"containers": [{
            "name": "main", "image": "flotilla/echo",
            "resources": {"requests": {"cpu": cpu, "memory": memory}}
        }]}
    });
    serde_json::from_value(merged(base, patch)).expect("pod parses")
}

fn pod(name: &str, cpu: &str, memory: &str) -> Pod {
    pod_with(name, cpu, memory, json!({}))
}

/// A pod already running on `node`.
fn bound(name: &str, node: &str, cpu: &str, memory: &str) -> Pod {
    pod_with(
        name,
        cpu,
        memory,
        json!({"spec": {"nodeName": node}, "status": {"phase": "Running"}}),
    )
}

/// A pod owned by the ReplicaSet with uid `owner`.
fn replica(name: &str, owner: &str) -> Pod {
    pod_with(
        name,
        "100m",
        "64Mi",
        json!({"metadata": {
            "labels": {"app": owner},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": owner, "uid": owner,
                "controller": true
            }]
        }}),
    )
}

const NOW_MS: i64 = 1_767_225_600_000;

/// The (pod, node) pairs bound, in decision order.
fn placements(nodes: &[Node], pods: &[Pod]) -> Vec<(String, String)> {
    schedule(nodes, pods, NOW_MS)
        .bindings
        .into_iter()
        .map(|binding| (binding.name, binding.node))
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(pod, node)| (pod.to_string(), node.to_string()))
        .collect()
}

/// The names of the nodes `pod` may go to, each tried alone with the given other pods.
fn feasible_nodes(nodes: &[Node], others: &[Pod], pod: &Pod) -> Vec<String> {
    nodes
        .iter()
        .filter(|node| {
            let mut pods = others.to_vec();
            pods.push(pod.clone());
            !schedule(std::slice::from_ref(*node), &pods, NOW_MS)
                .bindings
                .is_empty()
        })
        .map(|node| node.metadata.name.clone().unwrap_or_default())
        .collect()
}

/// The message for the only pod, which must be unschedulable.
fn unschedulable_message(nodes: &[Node], pods: &[Pod]) -> String {
    let decisions = schedule(nodes, pods, NOW_MS);
    assert!(decisions.bindings.is_empty(), "{decisions:?}");
    assert_eq!(decisions.unschedulable.len(), 1, "{decisions:?}");
    decisions.unschedulable[0].message.clone()
}

fn per_node_counts(bindings: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, node) in bindings {
        *counts.entry(node.clone()).or_insert(0) += 1;
    }
    counts
}

fn count_map(expected: &[(&str, usize)]) -> BTreeMap<String, usize> {
    expected
        .iter()
        .map(|(node, count)| (node.to_string(), *count))
        .collect()
}

// Quantities and requests.

#[test]
fn cpu_quantities_parse_to_millicores_rounding_up() {
    assert_eq!(cpu_millis("500m"), Some(500));
    assert_eq!(cpu_millis("1"), Some(1000));
    assert_eq!(cpu_millis("1.5"), Some(1500));
    assert_eq!(cpu_millis(".25"), Some(250));
    assert_eq!(cpu_millis("0.0001"), Some(1));
    assert_eq!(cpu_millis("100u"), Some(1));
    assert_eq!(cpu_millis("2e3"), Some(2_000_000));
    assert_eq!(cpu_millis("+3"), Some(3000));
    assert_eq!(cpu_millis("0"), Some(0));
}

#[test]
fn memory_quantities_parse_to_bytes() {
    assert_eq!(whole_units("128Mi"), Some(134_217_728));
    assert_eq!(whole_units("64Ki"), Some(65_536));
    assert_eq!(whole_units("1G"), Some(1_000_000_000));
    assert_eq!(whole_units("1.5Gi"), Some(1_610_612_736));
    assert_eq!(whole_units("1k"), Some(1000));
    assert_eq!(whole_units("1E"), Some(1_000_000_000_000_000_000));
    assert_eq!(whole_units("1e3"), Some(1000));
    assert_eq!(whole_units("1E-2"), Some(1));
    assert_eq!(whole_units("1000"), Some(1000));
    assert_eq!(whole_units("100Ei"), Some(i64::MAX));
    assert_eq!(whole_units("-1Ki"), Some(-1024));
}

#[test]
fn text_that_is_not_a_quantity_is_refused() {
    for text in [
        "", "lots", "1.2.3", "5x", "1KI", "Mi", "1e", "1e+", "--1", ".",
    ] {
        assert_eq!(whole_units(text), None, "{text}");
    }
}

#[test]
fn a_pod_requests_the_sum_of_its_containers_or_its_largest_init_container() {
    let pod = pod_with(
        "p",
        "200m",
        "100Mi",
        json!({"spec": {
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "200m", "memory": "100Mi"}}},
                {"name": "b", "resources": {"limits": {"cpu": "300m", "memory": "50Mi"}}}
            ],
            "initContainers": [
                {"name": "big-cpu", "resources": {"requests": {"cpu": "1", "memory": "10Mi"}}},
                {"name": "small", "resources": {"requests": {"cpu": "100m"}}}
            ]
        }}),
    );
    assert_eq!(
        pod_request(pod.spec.as_ref(), false),
        Resources {
            cpu_millis: 1000,
            memory_bytes: 150 * 1024 * 1024
        }
    );
}

#[test]
fn sidecar_init_containers_add_to_the_containers() {
    let pod = pod_with(
        "p",
        "0",
        "0",
        json!({"spec": {
            "containers": [{"name": "a", "resources": {"requests": {"cpu": "500m", "memory": "1Mi"}}}],
            "initContainers": [{
                "name": "proxy", "restartPolicy": "Always",
                "resources": {"requests": {"cpu": "250m", "memory": "2Mi"}}
            }]
        }}),
    );
    assert_eq!(
        pod_request(pod.spec.as_ref(), false),
        Resources {
            cpu_millis: 750,
            memory_bytes: 3 * 1024 * 1024
        }
    );
}

// Which pods are scheduled and which count.

#[test]
fn only_unbound_live_unfinished_pods_are_scheduled() {
    let nodes = [node("a")];
    let pods = [
        pod("pending", "100m", "1Mi"),
        bound("running", "a", "100m", "1Mi"),
        pod_with(
            "deleting",
            "100m",
            "1Mi",
            json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:01Z"}}),
        ),
        pod_with(
            "done",
            "100m",
            "1Mi",
            json!({"status": {"phase": "Succeeded"}}),
        ),
        pod_with(
            "failed",
            "100m",
            "1Mi",
            json!({"status": {"phase": "Failed"}}),
        ),
    ];
    let decisions = schedule(&nodes, &pods, NOW_MS);
    assert_eq!(
        decisions,
        Decisions {
            bindings: vec![Binding {
                namespace: "default".into(),
                name: "pending".into(),
                node: "a".into(),
                pod_resource_version: "7".into(),
            }],
            unschedulable: vec![],
        }
    );
}

#[test]
fn finished_pods_do_not_count_against_their_node() {
    let nodes = [node("a")];
    let pods = [
        pod_with(
            "finished",
            "4",
            "1Mi",
            json!({"spec": {"nodeName": "a"}, "status": {"phase": "Succeeded"}}),
        ),
        pod("new", "4", "1Mi"),
    ];
    assert_eq!(placements(&nodes, &pods), pairs(&[("new", "a")]));
}

#[test]
fn pods_are_taken_by_priority_then_age_then_namespace_and_name() {
    let nodes = [node_with(
        "a",
        json!({"status": {"allocatable": {"pods": "3"}}}),
    )];
    let pods = [
        pod_with(
            "late",
            "0",
            "0",
            json!({"metadata": {"creationTimestamp": "2026-01-01T00:00:09Z"}}),
        ),
        pod_with(
            "b-early",
            "0",
            "0",
            json!({"metadata": {"creationTimestamp": "2026-01-01T00:00:01Z"}}),
        ),
        pod_with(
            "a-early",
            "0",
            "0",
            json!({"metadata": {"creationTimestamp": "2026-01-01T00:00:01Z"}}),
        ),
        pod_with(
            "important",
            "0",
            "0",
            json!({
                "metadata": {"creationTimestamp": "2026-01-01T00:00:10Z"},
                "spec": {"priority": 1000}
            }),
        ),
    ];
    let decisions = schedule(&nodes, &pods, NOW_MS);
    let bound: Vec<&str> = decisions.bindings.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(bound, ["important", "a-early", "b-early"]);
    assert_eq!(decisions.unschedulable.len(), 1);
    assert_eq!(decisions.unschedulable[0].name, "late");
    assert_eq!(
        decisions.unschedulable[0].message,
        "0/1 nodes are available: 1 Too many pods."
    );
}

// Filters.

#[test]
fn a_node_that_is_not_ready_gets_no_pods() {
    let nodes = [
        node_with(
            "a",
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        ),
        node_with("b", json!({"status": {"conditions": []}})),
        node("c"),
    ];
    let pod = pod("p", "100m", "1Mi");
    assert_eq!(feasible_nodes(&nodes, &[], &pod), ["c"]);
}

#[test]
fn a_pod_tolerating_the_not_ready_taint_may_go_to_a_node_that_is_not_ready() {
    let nodes = [node_with(
        "a",
        json!({"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}),
    )];
    let pod = pod_with(
        "p",
        "100m",
        "1Mi",
        json!({"spec": {"tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}]}}),
    );
    assert_eq!(feasible_nodes(&nodes, &[], &pod), ["a"]);
}

#[test]
fn a_cordoned_node_gets_no_pods() {
    let nodes = [
        node_with("a", json!({"spec": {"unschedulable": true}})),
        node_with("b", json!({"spec": {"unschedulable": false}})),
    ];
    let pod = pod("p", "100m", "1Mi");
    assert_eq!(feasible_nodes(&nodes, &[], &pod), ["b"]);
    assert_eq!(
        unschedulable_message(&nodes[..1], &[pod]),
        "0/1 nodes are available: 1 node(s) were unschedulable."
    );
}

#[test]
fn a_pod_tolerating_the_unschedulable_taint_may_go_to_a_cordoned_node() {
    let nodes = [node_with("a", json!({"spec": {"unschedulable": true}}))];
    let pod = pod_with(
        "p",
        "100m",
        "1Mi",
        json!({"spec": {"tolerations": [{
            "key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"
        }]}}),
    );
    assert_eq!(feasible_nodes(&nodes, &[], &pod), ["a"]);
}

#[test]
fn a_node_without_enough_free_cpu_is_skipped() {
    let nodes = [node("a"), node("b")];
    let others = [bound("busy", "a", "3500m", "1Mi")];
    assert_eq!(
        feasible_nodes(&nodes, &others, &pod("p", "501m", "1Mi")),
        ["b"]
    );
    assert_eq!(
        feasible_nodes(&nodes, &others, &pod("p", "500m", "1Mi")),
        ["a", "b"]
    );
}

#[test]
fn a_node_without_enough_free_memory_is_skipped() {
    let nodes = [node("a"), node("b")];
    let others = [bound("busy", "b", "0", "7Gi")];
    assert_eq!(
        feasible_nodes(&nodes, &others, &pod("p", "0", "1025Mi")),
        ["a"]
    );
    assert_eq!(
        feasible_nodes(&nodes, &others, &pod("p", "0", "1Gi")),
        ["a", "b"]
    );
}

#[test]
fn a_pod_without_requests_fits_on_an_overcommitted_node() {
    let nodes = [node("a")];
    let others = [bound("huge", "a", "8", "16Gi")];
    let pod = pod_with(
        "p",
        "0",
        "0",
        json!({"spec": {"containers": [{"name": "main"}]}}),
    );
    assert_eq!(feasible_nodes(&nodes, &others, &pod), ["a"]);
}

#[test]
fn a_node_at_its_pod_limit_is_skipped() {
    let nodes = [
        node_with("a", json!({"status": {"allocatable": {"pods": "2"}}})),
        node_with("b", json!({"status": {"allocatable": {"pods": "3"}}})),
    ];
    let others = [
        bound("a1", "a", "0", "0"),
        bound("a2", "a", "0", "0"),
        bound("b1", "b", "0", "0"),
        bound("b2", "b", "0", "0"),
    ];
    assert_eq!(feasible_nodes(&nodes, &others, &pod("p", "0", "0")), ["b"]);
}

#[test]
fn a_node_without_a_pod_limit_takes_110_pods() {
    let mut without_limit = node("a");
    let status = without_limit.status.as_mut().expect("status");
    status
        .allocatable
        .as_mut()
        .expect("allocatable")
        .remove("pods");
    let nodes = [without_limit];
    let pods: Vec<Pod> = (0..111)
        .map(|index| pod(&format!("p{index:03}"), "0", "0"))
        .collect();
    let decisions = schedule(&nodes, &pods, NOW_MS);
    assert_eq!(decisions.bindings.len(), 110);
    assert_eq!(decisions.unschedulable.len(), 1);
    assert_eq!(decisions.unschedulable[0].name, "p110");
}

#[test]
fn a_node_selector_needs_every_label() {
    let nodes = [
        node_with(
            "a",
            json!({"metadata": {"labels": {"disk": "ssd", "zone": "z1"}}}),
        ),
        node_with(
            "b",
            json!({"metadata": {"labels": {"disk": "ssd", "zone": "z2"}}}),
        ),
        node_with("c", json!({"metadata": {"labels": {"zone": "z1"}}})),
    ];
    let pod = pod_with(
        "p",
        "0",
        "0",
        json!({"spec": {"nodeSelector": {"disk": "ssd", "zone": "z1"}}}),
    );
    assert_eq!(feasible_nodes(&nodes, &[], &pod), ["a"]);
    assert_eq!(
        unschedulable_message(&nodes[1..], &[pod]),
        "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."
    );
}

/// Nodes for the node affinity operators: ssd with 8 cores, hdd with 2, and one unlabelled.
fn labelled_nodes() -> [Node; 3] {
    [
        node_with(
            "ssd",
            json!({"metadata": {"labels": {"disk": "ssd", "cores": "8"}}}),
        ),
        node_with(
            "hdd",
            json!({"metadata": {"labels": {"disk": "hdd", "cores": "2"}}}),
        ),
        node_with("bare", json!({})),
    ]
}

/// The nodes of `labelled_nodes` a pod with these required node selector terms may go to.
fn feasible_for_terms(terms: Value) -> Vec<String> {
    let pod = pod_with(
        "p",
        "0",
        "0",
        json!({"spec": {"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
        }}}}),
    );
    feasible_nodes(&labelled_nodes(), &[], &pod)
}

fn feasible_for_expression(expression: Value) -> Vec<String> {
    feasible_for_terms(json!([{"matchExpressions": [expression]}]))
}

#[test]
fn required_node_affinity_in_needs_one_of_the_values() {
    assert_eq!(
        feasible_for_expression(
            json!({"key": "disk", "operator": "In", "values": ["ssd", "nvme"]})
        ),
        ["ssd"]
    );
}

#[test]
fn required_node_affinity_not_in_also_admits_nodes_without_the_label() {
    assert_eq!(
        feasible_for_expression(json!({"key": "disk", "operator": "NotIn", "values": ["ssd"]})),
        ["hdd", "bare"]
    );
}

#[test]
fn required_node_affinity_exists_needs_the_label() {
    assert_eq!(
        feasible_for_expression(json!({"key": "disk", "operator": "Exists"})),
        ["ssd", "hdd"]
    );
}

#[test]
fn required_node_affinity_does_not_exist_needs_the_label_absent() {
    assert_eq!(
        feasible_for_expression(json!({"key": "disk", "operator": "DoesNotExist"})),
        ["bare"]
    );
}

#[test]
fn required_node_affinity_gt_compares_as_integers() {
    assert_eq!(
        feasible_for_expression(json!({"key": "cores", "operator": "Gt", "values": ["4"]})),
        ["ssd"]
    );
    assert_eq!(
        feasible_for_expression(json!({"key": "cores", "operator": "Gt", "values": ["many"]})),
        Vec::<String>::new()
    );
}

#[test]
fn required_node_affinity_lt_compares_as_integers() {
    assert_eq!(
        feasible_for_expression(json!({"key": "cores", "operator": "Lt", "values": ["4"]})),
        ["hdd"]
    );
}

#[test]
fn required_node_affinity_match_fields_select_by_node_name() {
    assert_eq!(
        feasible_for_terms(json!([{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": ["hdd", "bare"]}
        ]}])),
        ["hdd", "bare"]
    );
    assert_eq!(
        feasible_for_terms(json!([{"matchFields": [
            {"key": "metadata.name", "operator": "NotIn", "values": ["hdd"]}
        ]}])),
        ["ssd", "bare"]
    );
}

#[test]
fn required_node_affinity_ors_terms_and_ands_expressions() {
    assert_eq!(
        feasible_for_terms(json!([
            {"matchExpressions": [
                {"key": "disk", "operator": "Exists"},
                {"key": "cores", "operator": "Gt", "values": ["4"]}
            ]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["bare"]}]}
        ])),
        ["ssd", "bare"]
    );
}

#[test]
fn an_empty_node_selector_term_matches_no_node() {
    assert_eq!(feasible_for_terms(json!([{}])), Vec::<String>::new());
}

fn tainted(name: &str, key: &str, value: &str, effect: &str) -> Node {
    node_with(
        name,
        json!({"spec": {"taints": [{"key": key, "value": value, "effect": effect}]}}),
    )
}

fn tolerating(tolerations: Value) -> Pod {
    pod_with("p", "0", "0", json!({"spec": {"tolerations": tolerations}}))
}

#[test]
fn a_no_schedule_taint_keeps_out_pods_that_do_not_tolerate_it() {
    let nodes = [
        tainted("gpu", "dedicated", "gpu", "NoSchedule"),
        node("plain"),
    ];
    assert_eq!(feasible_nodes(&nodes, &[], &pod("p", "0", "0")), ["plain"]);
    assert_eq!(
        unschedulable_message(&nodes[..1], &[pod("p", "0", "0")]),
        "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}."
    );
}

#[test]
fn a_no_schedule_taint_admits_a_pod_with_an_equal_toleration() {
    let nodes = [tainted("gpu", "dedicated", "gpu", "NoSchedule")];
    let matching = tolerating(json!([
        {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
    ]));
    let other_value = tolerating(json!([
        {"key": "dedicated", "operator": "Equal", "value": "cpu", "effect": "NoSchedule"}
    ]));
    let other_effect = tolerating(json!([
        {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoExecute"}
    ]));
    let any_effect = tolerating(json!([{"key": "dedicated", "value": "gpu"}]));
    assert_eq!(feasible_nodes(&nodes, &[], &matching), ["gpu"]);
    assert!(feasible_nodes(&nodes, &[], &other_value).is_empty());
    assert!(feasible_nodes(&nodes, &[], &other_effect).is_empty());
    assert_eq!(feasible_nodes(&nodes, &[], &any_effect), ["gpu"]);
}

#[test]
fn a_no_execute_taint_keeps_out_pods_that_do_not_tolerate_it() {
    let nodes = [tainted("draining", "maintenance", "", "NoExecute")];
    assert!(feasible_nodes(&nodes, &[], &pod("p", "0", "0")).is_empty());
    assert_eq!(
        unschedulable_message(&nodes, &[pod("p", "0", "0")]),
        "0/1 nodes are available: 1 node(s) had untolerated taint {maintenance: }."
    );
}

#[test]
fn a_no_execute_taint_admits_a_pod_with_an_exists_toleration() {
    let nodes = [tainted("draining", "maintenance", "soon", "NoExecute")];
    let exists = tolerating(json!([{"key": "maintenance", "operator": "Exists"}]));
    let wrong_key = tolerating(json!([{"key": "other", "operator": "Exists"}]));
    assert_eq!(feasible_nodes(&nodes, &[], &exists), ["draining"]);
    assert!(feasible_nodes(&nodes, &[], &wrong_key).is_empty());
}

#[test]
fn an_exists_toleration_without_a_key_tolerates_every_taint() {
    let nodes = [node_with(
        "everything",
        json!({"spec": {"unschedulable": false, "taints": [
            {"key": "a", "value": "1", "effect": "NoSchedule"},
            {"key": "b", "effect": "NoExecute"}
        ]}}),
    )];
    let pod = tolerating(json!([{"operator": "Exists"}]));
    assert_eq!(feasible_nodes(&nodes, &[], &pod), ["everything"]);
}

/// A pod labelled `app` with required anti-affinity to pods labelled `app` on the same host.
fn anti_affine(name: &str, app: &str, namespaces: Option<&[&str]>) -> Pod {
    let mut term = json!({
        "topologyKey": "kubernetes.io/hostname",
        "labelSelector": {"matchLabels": {"app": app}}
    });
    if let Some(namespaces) = namespaces {
        term["namespaces"] = json!(namespaces);
    }
    pod_with(
        name,
        "0",
        "0",
        json!({
            "metadata": {"labels": {"app": app}},
            "spec": {"affinity": {"podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [term]
            }}}
        }),
    )
}

fn labelled_bound(name: &str, node: &str, namespace: &str, labels: Value) -> Pod {
    pod_with(
        name,
        "0",
        "0",
        json!({
            "metadata": {"namespace": namespace, "labels": labels},
            "spec": {"nodeName": node}
        }),
    )
}

#[test]
fn required_anti_affinity_keeps_a_pod_off_hosts_with_a_matching_pod() {
    let nodes = [node("a"), node("b"), node("c")];
    let others = [
        labelled_bound("web-1", "a", "default", json!({"app": "web"})),
        labelled_bound("db-1", "b", "default", json!({"app": "db"})),
        labelled_bound("web-other-namespace", "c", "other", json!({"app": "web"})),
    ];
    let pod = anti_affine("web-2", "web", None);
    assert_eq!(feasible_nodes(&nodes, &others, &pod), ["b", "c"]);
    let across = anti_affine("web-2", "web", Some(&["default", "other"]));
    assert_eq!(feasible_nodes(&nodes, &others, &across), ["b"]);
}

#[test]
fn required_anti_affinity_label_selector_expressions_are_honoured() {
    let nodes = [node("a"), node("b"), node("c"), node("d")];
    let others = [
        labelled_bound(
            "x",
            "a",
            "default",
            json!({"tier": "front", "canary": "yes"}),
        ),
        labelled_bound("y", "b", "default", json!({"tier": "back"})),
        labelled_bound("z", "c", "default", json!({"tier": "cache"})),
    ];
    let pod = pod_with(
        "p",
        "0",
        "0",
        json!({"spec": {"affinity": {"podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["front", "back"]},
                    {"key": "tier", "operator": "NotIn", "values": ["back"]},
                    {"key": "tier", "operator": "Exists"},
                    {"key": "canary", "operator": "Exists"}
                ]}
            }, {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchExpressions": [
                    {"key": "canary", "operator": "DoesNotExist"},
                    {"key": "tier", "operator": "In", "values": ["cache"]}
                ]}
            }]
        }}}}),
    );
    assert_eq!(feasible_nodes(&nodes, &others, &pod), ["b", "d"]);
}

#[test]
fn required_anti_affinity_sees_pods_bound_earlier_in_the_same_call() {
    let nodes = [node("a"), node("b")];
    let pods = [
        anti_affine("web-1", "web", None),
        anti_affine("web-2", "web", None),
        anti_affine("web-3", "web", None),
    ];
    let decisions = schedule(&nodes, &pods, NOW_MS);
    let bound: Vec<(&str, &str)> = decisions
        .bindings
        .iter()
        .map(|b| (b.name.as_str(), b.node.as_str()))
        .collect();
    assert_eq!(bound, [("web-1", "a"), ("web-2", "b")]);
    assert_eq!(
        decisions.unschedulable,
        [Unschedulable {
            namespace: "default".into(),
            name: "web-3".into(),
            pod_resource_version: "7".into(),
            message: "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules."
                .into(),
        }]
    );
}

#[test]
fn a_placed_pods_required_anti_affinity_keeps_matching_pods_off_its_host() {
    let nodes = [node("a"), node("b")];
    let mut loner = anti_affine("loner", "batch", None);
    loner.spec.as_mut().expect("spec").node_name = Some("a".into());
    let batch = pod_with(
        "job",
        "0",
        "0",
        json!({"metadata": {"labels": {"app": "batch"}}}),
    );
    assert_eq!(feasible_nodes(&nodes, &[loner.clone()], &batch), ["b"]);
    assert_eq!(
        unschedulable_message(&nodes[..1], &[loner, batch]),
        "0/1 nodes are available: 1 node(s) didn't satisfy existing pods anti-affinity rules."
    );
}

#[test]
fn required_pod_affinity_needs_a_matching_pod_in_the_zone() {
    let zone = |name: &str, zone: &str| {
        node_with(
            name,
            json!({"metadata": {"labels": {"topology.kubernetes.io/zone": zone}}}),
        )
    };
    let nodes = [zone("a", "z1"), zone("b", "z1"), zone("c", "z2"), node("d")];
    let others = [labelled_bound(
        "cache",
        "a",
        "default",
        json!({"app": "cache"}),
    )];
    let pod = pod_with(
        "web",
        "0",
        "0",
        json!({"spec": {"affinity": {"podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{
                "topologyKey": "topology.kubernetes.io/zone",
                "labelSelector": {"matchLabels": {"app": "cache"}}
            }]
        }}}}),
    );
    let mut all = others.to_vec();
    all.push(pod.clone());
    let decisions = schedule(&nodes, &all, NOW_MS);
    assert_eq!(decisions.bindings.len(), 1);
    assert!(["a", "b"].contains(&decisions.bindings[0].node.as_str()));
    let message = unschedulable_message(&nodes[2..], &[others[0].clone(), pod]);
    assert_eq!(
        message,
        "0/2 nodes are available: 2 node(s) didn't match pod affinity rules."
    );
}

#[test]
fn the_first_pod_of_a_self_affine_group_may_go_anywhere() {
    let nodes = [node("a"), node("b")];
    let group = |name: &str| {
        pod_with(
            name,
            "0",
            "0",
            json!({
                "metadata": {"labels": {"app": "chatty"}},
                "spec": {"affinity": {"podAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [{
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app": "chatty"}}
                    }]
                }}}
            }),
        )
    };
    // The second follows the first even though spreading would rather use the other node.
    assert_eq!(
        placements(&nodes, &[group("one"), group("two")]),
        pairs(&[("one", "a"), ("two", "a")])
    );
}

// Scores.

#[test]
fn the_least_allocated_node_wins() {
    let nodes = [node("a"), node("b"), node("c")];
    let pods = [
        bound("a-load", "a", "2", "1Gi"),
        bound("b-load", "b", "1", "1Gi"),
        bound("c-load", "c", "1", "2Gi"),
        pod("p", "100m", "128Mi"),
    ];
    assert_eq!(placements(&nodes, &pods), pairs(&[("p", "b")]));
}

#[test]
fn the_least_allocated_node_wins_also_when_memory_is_counted_in_exabytes() {
    let huge = |name: &str| {
        node_with(
            name,
            json!({"status": {"allocatable": {"cpu": "4", "memory": "7Ei"}}}),
        )
    };
    let nodes = [huge("a"), huge("b")];
    let pods = [
        bound("a-load", "a", "1", "3Ei"),
        bound("b-load", "b", "1", "1Ei"),
        pod("p", "100m", "128Mi"),
    ];
    assert_eq!(placements(&nodes, &pods), pairs(&[("p", "b")]));
}

#[test]
fn a_bigger_node_is_preferred_for_the_same_load() {
    let nodes = [
        node("a"),
        node_with(
            "b",
            json!({"status": {"allocatable": {"cpu": "16", "memory": "32Gi"}}}),
        ),
    ];
    let pods = [pod("p", "1", "1Gi")];
    assert_eq!(placements(&nodes, &pods), pairs(&[("p", "b")]));
}

#[test]
fn equal_nodes_are_chosen_by_name() {
    let nodes = [node("c"), node("a"), node("b")];
    assert_eq!(
        placements(&nodes, &[pod("p", "1", "1Gi")]),
        pairs(&[("p", "a")])
    );
}

#[test]
fn six_replicas_of_one_owner_spread_two_per_node() {
    let nodes = [node("a"), node("b"), node("c")];
    let pods: Vec<Pod> = (1..=6)
        .map(|index| replica(&format!("web-{index}"), "rs-web"))
        .collect();
    let bindings = placements(&nodes, &pods);
    assert_eq!(bindings.len(), 6);
    assert_eq!(
        per_node_counts(&bindings),
        count_map(&[("a", 2), ("b", 2), ("c", 2)])
    );
}

#[test]
fn spreading_beats_small_resource_differences() {
    let nodes = [node("a"), node("b")];
    // b is busier, but a already runs a replica of the same owner.
    let mut existing = replica("web-1", "rs-web");
    existing.spec.as_mut().expect("spec").node_name = Some("a".into());
    let pods = [
        existing,
        bound("other", "b", "500m", "512Mi"),
        replica("web-2", "rs-web"),
    ];
    assert_eq!(placements(&nodes, &pods), pairs(&[("web-2", "b")]));
}

#[test]
fn pods_without_an_owner_spread_by_their_labels() {
    let nodes = [node("a"), node("b")];
    let labelled = |name: &str| {
        pod_with(
            name,
            "0",
            "0",
            json!({"metadata": {"labels": {"app": "x"}}}),
        )
    };
    let bindings = placements(&nodes, &[labelled("x-1"), labelled("x-2")]);
    assert_eq!(per_node_counts(&bindings), count_map(&[("a", 1), ("b", 1)]));
}

#[test]
fn preferred_node_affinity_adds_its_weight() {
    let nodes = [
        node("a"),
        node_with("b", json!({"metadata": {"labels": {"disk": "ssd"}}})),
        node_with(
            "c",
            json!({"metadata": {"labels": {"disk": "ssd", "zone": "z1"}}}),
        ),
    ];
    let pod = pod_with(
        "p",
        "0",
        "0",
        json!({"spec": {"affinity": {"nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "preference": {"matchExpressions": [
                    {"key": "disk", "operator": "In", "values": ["ssd"]}
                ]}},
                {"weight": 5, "preference": {"matchExpressions": [
                    {"key": "zone", "operator": "Exists"}
                ]}}
            ]
        }}}}),
    );
    // c is slightly busier but matches both preferences.
    let pods = [bound("load", "c", "200m", "0"), pod];
    assert_eq!(placements(&nodes, &pods), pairs(&[("p", "c")]));
}

#[test]
fn a_prefer_no_schedule_taint_is_avoided_unless_tolerated() {
    let nodes = [tainted("a", "spot", "true", "PreferNoSchedule"), node("b")];
    // b is much busier, but a carries an untolerated PreferNoSchedule taint.
    let busy = bound("load", "b", "1", "2Gi");
    assert_eq!(
        placements(&nodes, &[busy.clone(), pod("p", "0", "0")]),
        pairs(&[("p", "b")])
    );
    let tolerant =
        tolerating(json!([{"key": "spot", "operator": "Exists", "effect": "PreferNoSchedule"}]));
    assert_eq!(placements(&nodes, &[busy, tolerant]), pairs(&[("p", "a")]));
}

#[test]
fn preferred_pod_anti_affinity_steers_away_from_matching_pods() {
    let nodes = [node("a"), node("b")];
    let pods = [
        labelled_bound("noisy", "a", "default", json!({"app": "noisy"})),
        bound("load", "b", "1", "1Gi"),
        pod_with(
            "p",
            "0",
            "0",
            json!({"spec": {"affinity": {"podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 50,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app": "noisy"}}
                    }
                }]
            }}}}),
        ),
    ];
    assert_eq!(placements(&nodes, &pods), pairs(&[("p", "b")]));
}

// Several pods in one call, messages, determinism, scale.

#[test]
fn bindings_made_earlier_in_the_call_count_against_the_node() {
    let nodes = [node_with(
        "a",
        json!({"status": {"allocatable": {"cpu": "1", "memory": "1Gi"}}}),
    )];
    let pods = [
        pod("p1", "400m", "100Mi"),
        pod("p2", "400m", "100Mi"),
        pod("p3", "400m", "100Mi"),
    ];
    let decisions = schedule(&nodes, &pods, NOW_MS);
    assert_eq!(
        decisions
            .bindings
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>(),
        ["p1", "p2"]
    );
    assert_eq!(
        decisions.unschedulable,
        [Unschedulable {
            namespace: "default".into(),
            name: "p3".into(),
            pod_resource_version: "7".into(),
            message: "0/1 nodes are available: 1 Insufficient cpu.".into(),
        }]
    );
}

#[test]
fn many_pods_of_one_call_fill_the_nodes_evenly() {
    let nodes = [node("a"), node("b")];
    let pods: Vec<Pod> = (0..10)
        .map(|index| pod(&format!("p{index}"), "100m", "100Mi"))
        .collect();
    let bindings = placements(&nodes, &pods);
    assert_eq!(per_node_counts(&bindings), count_map(&[("a", 5), ("b", 5)]));
}

#[test]
fn a_pod_that_fits_nowhere_is_told_why_per_node() {
    let nodes = [
        node_with(
            "a",
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        ),
        node("b"),
        node("c"),
    ];
    let pods = [
        bound("b-load", "b", "3", "0"),
        bound("c-load", "c", "3500m", "0"),
        pod("big", "2", "1Gi"),
    ];
    assert_eq!(
        unschedulable_message(&nodes, &pods),
        "0/3 nodes are available: 1 node(s) were not ready, 2 Insufficient cpu."
    );
}

#[test]
fn a_node_short_of_several_resources_reports_each() {
    let nodes = [
        node_with("a", json!({"status": {"allocatable": {"pods": "1"}}})),
        node_with("b", json!({"spec": {"unschedulable": true}})),
    ];
    let pods = [bound("a-load", "a", "0", "0"), pod("big", "5", "9Gi")];
    assert_eq!(
        unschedulable_message(&nodes, &pods),
        "0/2 nodes are available: 1 Insufficient cpu, 1 Insufficient memory, 1 Too many pods, \
         1 node(s) were unschedulable."
    );
}

#[test]
fn a_cluster_without_nodes_says_so() {
    assert_eq!(
        unschedulable_message(&[], &[pod("p", "0", "0")]),
        "no nodes available to schedule pods"
    );
}

#[test]
fn the_same_input_gives_the_same_decisions_whatever_its_order() {
    let nodes: Vec<Node> = ["n1", "n2", "n3", "n4"].into_iter().map(node).collect();
    let mut pods: Vec<Pod> = (0..20)
        .map(|index| replica(&format!("web-{index:02}"), "rs-web"))
        .chain((0..7).map(|index| pod(&format!("solo-{index}"), "300m", "300Mi")))
        .chain([pod("huge", "64", "1Gi")])
        .collect();
    let first = schedule(&nodes, &pods, NOW_MS);
    assert_eq!(first.bindings.len(), 27);
    assert_eq!(first.unschedulable.len(), 1);
    assert_eq!(schedule(&nodes, &pods, NOW_MS), first);
    pods.reverse();
    let mut reversed_nodes = nodes.clone();
    reversed_nodes.reverse();
    assert_eq!(schedule(&reversed_nodes, &pods, NOW_MS), first);
}

#[test]
fn ten_thousand_pods_onto_a_thousand_nodes_in_reasonable_time() {
    let nodes: Vec<Node> = (0..1000)
        .map(|index| {
            node_with(
                &format!("node-{index:04}"),
                json!({"status": {"allocatable": {"cpu": "16", "memory": "64Gi"}}}),
            )
        })
        .collect();
    let pods: Vec<Pod> = (0..10_000)
        .map(|index| replica(&format!("pod-{index:05}"), &format!("rs-{}", index % 100)))
        .collect();
    let started = std::time::Instant::now();
    let decisions = schedule(&nodes, &pods, NOW_MS);
    let elapsed = started.elapsed();
    assert_eq!(decisions.bindings.len(), 10_000);
    let pairs: Vec<(String, String)> = decisions
        .bindings
        .into_iter()
        .map(|binding| (binding.name, binding.node))
        .collect();
    let counts = per_node_counts(&pairs);
    assert_eq!(counts.len(), 1000);
    assert!(counts.values().all(|count| *count == 10), "{counts:?}");
    assert!(elapsed < std::time::Duration::from_secs(60), "{elapsed:?}");
}
