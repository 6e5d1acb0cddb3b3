//! `flotilla local`: a three-node cluster of node containers on this host's Docker daemon,
//! reached through each node, faulted, and removed without a trace.

use std::process::Command;

mod local_cluster;

use local_cluster::{flotilla, text, Down};

fn docker_lines(args: &[&str]) -> Vec<String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// The host's iptables rules (both backends, where present) that mention `needle`.
fn host_rules_mentioning(needle: &str) -> Vec<String> {
    ["iptables-save", "iptables-legacy-save"]
        .iter()
        .filter_map(|tool| Command::new(tool).output().ok())
        .flat_map(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter(|line| line.contains(needle))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The rules in a node container's own network namespace.
fn node_rules(container: &str) -> String {
    let pid = docker_lines(&["inspect", "-f", "{{.State.Pid}}", container]);
    let pid = pid.first().expect("the node container's pid");
    let output = Command::new("nsenter")
        .args(["-t", pid, "-n", "iptables-save"])
        .output()
        .expect("run iptables-save in the node's namespace");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn local_up_serves_every_node_and_local_down_leaves_nothing_behind() {
    let name = format!("lt{}", std::process::id());
    let _down = Down(name.clone());
    let up = flotilla(&["local", "up", "--nodes", "3", "--name", &name]);
    assert!(up.status.success(), "local up failed: {}", text(&up));
    let printed = text(&up);
    let servers = printed
        .lines()
        .find_map(|line| line.trim().strip_prefix("export FLOTILLA_SERVER="))
        .expect("local up prints how to point the CLI at the cluster")
        .to_owned();
    let config = printed
        .lines()
        .find_map(|line| line.trim().strip_prefix("export FLOTILLA_CONFIG="))
        .expect("local up prints where the admin's credentials are")
        .to_owned();
    let addresses: Vec<&str> = servers.split(',').collect();
    assert_eq!(addresses.len(), 3, "three node addresses: {servers}");
    // 10.P.0.1x:7070 → the cluster's range 10.P.
    let range = addresses[0]
        .rsplit_once(".0.")
        .map(|(prefix, _)| format!("{prefix}."))
        .expect("a 10.P.0.x address");

    for address in &addresses {
        let nodes = flotilla(&["--server", address, "--config", &config, "get", "nodes"]);
        assert!(
            nodes.status.success(),
            "get nodes through {address}: {}",
            text(&nodes)
        );
        let listing = text(&nodes);
        for index in 1..=3 {
            let node = format!("{name}-n{index}");
            assert!(
                listing
                    .lines()
                    .any(|line| line.starts_with(&node) && line.contains(" Ready ")),
                "{node} is not Ready through {address}:\n{listing}"
            );
        }
    }

    // Pods run on the node containers' pod networks; down must remove them too.
    let manifest = std::env::temp_dir().join(format!("{name}-sleepers.yaml"));
    std::fs::write(
        &manifest,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: sleepers}\nspec:\n  replicas: 3\n  \
         selector: {matchLabels: {app: sleepers}}\n  template:\n    metadata: {labels: {app: sleepers}}\n    \
         spec:\n      containers:\n      - {name: sleep, image: 'flotilla/busybox:latest', \
         imagePullPolicy: Never, command: [sleep, '3600']}\n",
    )
    .expect("write the manifest");
    let manifest_path = manifest.to_string_lossy().into_owned();
    let apply = flotilla(&[
        "--server",
        &servers,
        "--config",
        &config,
        "apply",
        "-f",
        &manifest_path,
    ]);
    let _ = std::fs::remove_file(&manifest);
    assert!(apply.status.success(), "apply: {}", text(&apply));
    let pod_label = "label=io.flotilla.container=sleep".to_string();
    let node_labels: Vec<String> = (1..=3)
        .map(|index| format!("label=io.flotilla.node={name}-n{index}"))
        .collect();
    let pod_containers = || -> usize {
        node_labels
            .iter()
            .map(|node| docker_lines(&["ps", "-q", "--filter", node, "--filter", &pod_label]).len())
            .sum()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pod_containers() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert_eq!(pod_containers(), 3, "three pod containers run");

    // A silent partition lives in the node's own namespace, and heal removes it.
    let isolate = flotilla(&["local", "isolate", "n2", "--name", &name]);
    assert!(isolate.status.success(), "isolate: {}", text(&isolate));
    let container = format!("flt-{name}-n2");
    let rules = node_rules(&container);
    assert!(
        rules.contains("-A FLOTILLA-ISOLATE-IN -s ") && rules.contains("-j DROP"),
        "no drop rules in the node's namespace:\n{rules}"
    );
    let heal = flotilla(&["local", "heal", "n2", "--name", &name]);
    assert!(heal.status.success(), "heal: {}", text(&heal));
    assert!(!node_rules(&container).contains("-A FLOTILLA-ISOLATE-IN -s "));

    let down = flotilla(&["local", "down", "--name", &name]);
    assert!(down.status.success(), "local down: {}", text(&down));
    let label = format!("label=io.flotilla.local={name}");
    assert_eq!(
        docker_lines(&["ps", "-aq", "--filter", &label]),
        Vec::<String>::new(),
        "node containers left behind"
    );
    for node in &node_labels {
        assert_eq!(
            docker_lines(&["ps", "-aq", "--filter", node]),
            Vec::<String>::new(),
            "pod containers left behind ({node})"
        );
    }
    assert_eq!(
        docker_lines(&["network", "ls", "-q", "--filter", &label]),
        Vec::<String>::new(),
        "networks left behind"
    );
    assert_eq!(
        host_rules_mentioning(&range),
        Vec::<String>::new(),
        "host iptables rules for {range}0.0/16 left behind"
    );
}
