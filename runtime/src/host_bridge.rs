//! Pod networking without an engine network: a Linux bridge of this host holds the pod
//! subnet's gateway, and each pod namespace is wired to it with a veth pair when its container
//! starts (what the CNI `bridge` plugin does for the kubelet). The container itself runs with
//! the engine's `none` network, so the engine sets up no network of its own for it: on a
//! user-defined Docker network that is an embedded DNS server and its iptables rules in every
//! container, a large share of Docker's container start.
//!
//! It drives `ip` (iproute2) and `nsenter` (util-linux), as root on the host. The bridge
//! carries `io.flotilla.cluster=<id>` as its interface alias and its iptables rules carry it as
//! their comment, so what a cluster made is found and removed by that label.

use std::net::Ipv4Addr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::RuntimeError;

/// A bridge of this host for a node's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBridge {
    /// The interface name (at most 15 bytes).
    pub name: String,
    /// The gateway address the bridge holds, which pods route through.
    pub gateway: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// `key=value`, the bridge's alias and its iptables rules' comment.
    pub label: String,
}

/// How many copies of one FORWARD rule `remove` deletes at most.
const MAX_RULE_COPIES: usize = 8;

/// The longest interface name Linux takes.
pub const MAX_INTERFACE_NAME_BYTES: usize = 15;

/// The iptables rules that let traffic in and out of the bridge through the FORWARD chain
/// (Docker sets its policy to DROP, and with `br_netfilter` even traffic between two ports of
/// one bridge passes it).
fn forward_rules(bridge: &HostBridge) -> [Vec<String>; 2] {
    let rule = |direction: &str| {
        [
            "FORWARD",
            direction,
            &bridge.name,
            "-m",
            "comment",
            "--comment",
            &bridge.label,
            "-j",
            "ACCEPT",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    [rule("-i"), rule("-o")]
}

/// Runs `program args`, with `stdin` written to it when given; an error carries its stderr.
async fn run(program: &str, args: &[String], stdin: Option<String>) -> Result<(), RuntimeError> {
    let operation = format!("run {program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| RuntimeError::Engine {
            operation: operation.clone(),
            message: error.to_string(),
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .map_err(|error| RuntimeError::Engine {
                operation: operation.clone(),
                message: format!("write its input: {error}"),
            })?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|error| RuntimeError::Engine {
            operation: operation.clone(),
            message: error.to_string(),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(RuntimeError::Engine {
            operation,
            message: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

/// Whether `program args` succeeds (a check such as `iptables -C`).
async fn succeeds(program: &str, args: &[String]) -> bool {
    run(program, args, None).await.is_ok()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

/// Creates the bridge with its gateway address, up, and its FORWARD rules, or completes what
/// an earlier run left half done.
pub async fn ensure(bridge: &HostBridge) -> Result<(), RuntimeError> {
    if bridge.name.len() > MAX_INTERFACE_NAME_BYTES {
        return Err(RuntimeError::Engine {
            operation: format!("create bridge {}", bridge.name),
            message: format!("an interface name has at most {MAX_INTERFACE_NAME_BYTES} bytes"),
        });
    }
    let name = bridge.name.as_str();
    if !succeeds("ip", &strings(&["link", "show", "dev", name])).await {
        run(
            "ip",
            &strings(&["link", "add", "name", name, "type", "bridge"]),
            None,
        )
        .await?;
    }
    let gateway = format!("{}/{}", bridge.gateway, bridge.prefix_len);
    let commands = format!(
        "link set dev {name} alias {label}\naddr replace {gateway} dev {name}\nlink set dev {name} up\n",
        label = bridge.label
    );
    run("ip", &strings(&["-batch", "-"]), Some(commands)).await?;
    for rule in forward_rules(bridge) {
        let mut check = vec!["-C".to_owned()];
        check.extend(rule.iter().cloned());
        if !succeeds("iptables", &check).await {
            let mut insert = vec!["-I".to_owned()];
            insert.extend(rule);
            run("iptables", &insert, None).await?;
        }
    }
    Ok(())
}

/// Removes the bridge (its pods' veth pairs go with their namespaces) and its FORWARD rules;
/// what is already gone is no error.
pub async fn remove(bridge: &HostBridge) -> Result<(), RuntimeError> {
    let bridge = bridge.clone();
    tokio::task::spawn_blocking(move || {
        delete_forward_rules_blocking(&bridge.name, &bridge.label);
        delete_link_blocking(&bridge.name)
    })
    .await
    .map_err(|error| RuntimeError::Engine {
        operation: "remove a bridge".to_owned(),
        message: error.to_string(),
    })?
}

/// Deletes the FORWARD rules of the bridge `name` commented `label`, every copy of them.
fn delete_forward_rules_blocking(name: &str, label: &str) {
    let bridge = HostBridge {
        name: name.to_owned(),
        gateway: Ipv4Addr::UNSPECIFIED,
        prefix_len: 0,
        label: label.to_owned(),
    };
    for rule in forward_rules(&bridge) {
        let mut delete = vec!["-D".to_owned()];
        delete.extend(rule);
        // Each pass deletes one copy; a few copies at most were ever inserted.
        for _ in 0..MAX_RULE_COPIES {
            if run_blocking("iptables", &delete).is_none() {
                break;
            }
        }
    }
}

/// Deletes the interface `name` if it exists.
fn delete_link_blocking(name: &str) -> Result<(), RuntimeError> {
    if run_blocking("ip", &strings(&["link", "show", "dev", name])).is_none() {
        return Ok(());
    }
    run_blocking("ip", &strings(&["link", "delete", "dev", name]))
        .map(drop)
        .ok_or_else(|| RuntimeError::Engine {
            operation: format!("delete bridge {name}"),
            message: "ip link delete failed".to_owned(),
        })
}

/// The names of the veth pair of the container `id`: the host end, and the end that becomes
/// `eth0` in the container's namespace (named so only until it is moved and renamed).
fn veth_names(id: &str) -> (String, String) {
    let short: String = id.chars().take(12).collect();
    (format!("flv{short}"), format!("flp{short}"))
}

/// Wires the network namespace of process `pid` (a container's) to `bridge`: a veth pair whose
/// inner end is `eth0` with `address`/prefix, up, with its default route via the gateway.
/// The namespace's loopback the engine has already brought up. Each start of a container is a
/// new namespace, so this runs at every start; the host end goes with the namespace.
pub async fn wire(
    bridge: &HostBridge,
    container_id: &str,
    pid: i64,
    address: Ipv4Addr,
) -> Result<(), RuntimeError> {
    let (host_end, inner_end) = veth_names(container_id);
    let wired = wire_pair(bridge, &host_end, &inner_end, pid, address).await;
    if wired.is_err() {
        // A pair made before the failure would stay on the host: its namespace lives on.
        let _ = run("ip", &strings(&["link", "delete", "dev", &host_end]), None).await;
    }
    wired
}

async fn wire_pair(
    bridge: &HostBridge,
    host_end: &str,
    inner_end: &str,
    pid: i64,
    address: Ipv4Addr,
) -> Result<(), RuntimeError> {
    let outside = format!(
        "link add {host_end} type veth peer name {inner_end}\n\
         link set {inner_end} netns {pid}\n\
         link set {host_end} master {bridge_name} up\n",
        bridge_name = bridge.name
    );
    run("ip", &strings(&["-batch", "-"]), Some(outside)).await?;
    let inside = format!(
        "link set {inner_end} name eth0\n\
         addr add {address}/{prefix} dev eth0\n\
         link set eth0 up\n\
         route add default via {gateway}\n",
        prefix = bridge.prefix_len,
        gateway = bridge.gateway
    );
    let namespace = format!("--net=/proc/{pid}/ns/net");
    run(
        "nsenter",
        &[
            namespace,
            "ip".to_owned(),
            "-batch".to_owned(),
            "-".to_owned(),
        ],
        Some(inside),
    )
    .await
}

/// Runs `program args` to its end; its output when it succeeded.
fn run_blocking(program: &str, args: &[String]) -> Option<std::process::Output> {
    std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
}

/// The names of the host bridges carrying `label` (`key=value`) as their alias. Blocking.
pub fn labelled_blocking(label: &str) -> Vec<String> {
    let listing = run_blocking(
        "ip",
        &strings(&["-details", "-oneline", "link", "show", "type", "bridge"]),
    );
    let text = listing
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default();
    bridges_with_alias(&text, label)
}

/// Removes every host bridge carrying `label` (`key=value`) as its alias, and their FORWARD
/// rules; returns how many bridges it removed. Blocking: for the cleanup of tests and tools,
/// which remove what a cluster made by its label, also from `Drop`.
pub fn remove_labelled_blocking(label: &str) -> usize {
    let names = labelled_blocking(label);
    // Rules of bridges already gone too.
    let rules = run_blocking("iptables", &strings(&["-S", "FORWARD"]))
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default();
    let mut with_rules = bridges_with_rules(&rules, label);
    with_rules.extend(names.iter().cloned());
    with_rules.sort();
    with_rules.dedup();
    for name in &with_rules {
        delete_forward_rules_blocking(name, label);
    }
    for name in &names {
        let _ = delete_link_blocking(name);
    }
    names.len()
}

/// The interfaces named by the rules of `iptables -S FORWARD` output commented `label`.
fn bridges_with_rules(text: &str, label: &str) -> Vec<String> {
    let quoted = format!("\"{label}\"");
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            if !words.iter().any(|word| *word == label || *word == quoted) {
                return None;
            }
            words
                .windows(2)
                .find(|pair| pair[0] == "-i" || pair[0] == "-o")
                .map(|pair| pair[1].to_owned())
        })
        .collect()
}

/// The bridges of `ip -details -oneline link show type bridge` output whose alias is `label`.
fn bridges_with_alias(text: &str, label: &str) -> Vec<String> {
    text.lines()
        .filter(|line| {
            line.split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|pair| pair[0] == "alias" && pair[1] == label)
        })
        .filter_map(|line| {
            let name = line.split(':').nth(1)?.trim();
            Some(name.split('@').next().unwrap_or(name).to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_gets_veth_names_that_fit_an_interface_name() {
        let (host_end, inner_end) = veth_names("0123456789abcdef0123");
        assert_eq!(host_end, "flv0123456789ab");
        assert_eq!(inner_end, "flp0123456789ab");
        assert!(host_end.len() <= MAX_INTERFACE_NAME_BYTES);
    }

    #[test]
    fn bridges_are_found_by_their_alias_only() {
        let text = "7: flt1: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP \\    link/ether 02:42:ac:11:00:01 brd ff:ff:ff:ff:ff:ff promiscuity 0 \\    alias io.flotilla.cluster=abc \\    bridge forward_delay 1500\n\
                    8: flt2: <BROADCAST> mtu 1500 \\    alias io.flotilla.cluster=abcd \\    bridge\n\
                    9: docker0: <BROADCAST> mtu 1500 \\    bridge\n";
        assert_eq!(
            bridges_with_alias(text, "io.flotilla.cluster=abc"),
            vec!["flt1"]
        );
        assert!(bridges_with_alias(text, "io.flotilla.cluster=zzz").is_empty());
    }

    #[test]
    fn rules_are_found_by_their_comment_also_without_their_bridge() {
        let text = "-P FORWARD DROP\n\
                    -A FORWARD -o fltx -m comment --comment \"io.flotilla.cluster=abc\" -j ACCEPT\n\
                    -A FORWARD -i fltx -m comment --comment \"io.flotilla.cluster=abc\" -j ACCEPT\n\
                    -A FORWARD -i flty -m comment --comment \"io.flotilla.cluster=abcd\" -j ACCEPT\n\
                    -A FORWARD -i docker0 -o docker0 -j ACCEPT\n";
        assert_eq!(
            bridges_with_rules(text, "io.flotilla.cluster=abc"),
            vec!["fltx", "fltx"]
        );
    }

    #[test]
    fn the_forward_rules_accept_both_directions_with_the_label_as_comment() {
        let bridge = HostBridge {
            name: "fltabc".to_owned(),
            gateway: Ipv4Addr::new(10, 244, 1, 1),
            prefix_len: 24,
            label: "io.flotilla.cluster=abc".to_owned(),
        };
        let [incoming, outgoing] = forward_rules(&bridge);
        assert_eq!(incoming[..3], strings(&["FORWARD", "-i", "fltabc"]));
        assert_eq!(outgoing[..3], strings(&["FORWARD", "-o", "fltabc"]));
        assert!(incoming.contains(&"io.flotilla.cluster=abc".to_owned()));
    }

    #[test]
    fn a_bridge_name_longer_than_an_interface_name_is_refused_before_anything_runs() {
        let bridge = HostBridge {
            name: "a-name-that-is-too-long".to_owned(),
            gateway: Ipv4Addr::new(10, 244, 1, 1),
            prefix_len: 24,
            label: "io.flotilla.cluster=abc".to_owned(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let error = runtime.block_on(ensure(&bridge)).unwrap_err();
        assert!(error.to_string().contains("at most 15 bytes"), "{error}");
    }
}
