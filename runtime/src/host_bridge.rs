//! Pod networking without an engine network: a Linux bridge of this host holds the pod
//! subnet's gateway, and each pod namespace is wired to it with a veth pair when its container
//! starts (what the CNI `bridge` plugin does for the kubelet). The container itself runs with
//! the engine's network disabled, so the engine sets up no network of its own for it: on a
//! user-defined Docker network that is an embedded DNS server and its iptables rules in every
//! container, and on any network (`none` included) a hook that re-executes the daemon twice
//! at every start; together most of Docker's container start. Nor does the engine write the
//! container's resolv.conf and hosts file then: the node mounts the pod's own.
//!
//! The bridge is made with `ip` (iproute2) and `iptables`, once per node; each pod is wired
//! in-process over rtnetlink (`netlink.rs`), as root on the host. The bridge
//! carries `io.flotilla.cluster=<id>` as its interface alias and its iptables rules carry it as
//! their comment, so what a cluster made is found and removed by that label.

use std::net::Ipv4Addr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::{netlink, RuntimeError};

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

/// Runs `program args`, with `stdin` written to it when given; its standard output, or an
/// error carrying its stderr.
async fn run(
    program: &str,
    args: &[String],
    stdin: Option<String>,
) -> Result<String, RuntimeError> {
    let operation = format!("run {program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
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
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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

/// The first address of the subnet of `address`/`prefix_len`.
fn subnet_of(address: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(u32::from(address) & mask)
}

/// The interfaces other than `bridge` in `ip -o -4 addr show to SUBNET` output: they hold
/// addresses of the subnet (another node's bridge, a Docker network), so a bridge for it here
/// would route the subnet two ways.
fn other_holders(text: &str, bridge: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter(|name| *name != bridge)
        .map(str::to_owned)
        .collect();
    names.dedup();
    names
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
    let subnet = format!(
        "{}/{}",
        subnet_of(bridge.gateway, bridge.prefix_len),
        bridge.prefix_len
    );
    let holders = run(
        "ip",
        &strings(&["-o", "-4", "addr", "show", "to", &subnet]),
        None,
    )
    .await?;
    let others = other_holders(&holders, name);
    if !others.is_empty() {
        return Err(RuntimeError::Engine {
            operation: format!("create bridge {name} for {subnet}"),
            message: format!(
                "the subnet overlaps addresses of {} on this host",
                others.join(", ")
            ),
        });
    }
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
    netlink::delete_link_blocking(name).map_err(|message| RuntimeError::Engine {
        operation: format!("delete bridge {name}"),
        message,
    })
}

/// The name of the host end of the veth pair of the container `id`.
fn host_end_name(id: &str) -> String {
    let short: String = id.chars().take(12).collect();
    format!("flv{short}")
}

/// Wires the network namespace of process `pid` (a container's) to `bridge`: a veth pair whose
/// inner end is born `eth0` there, up, with `address`/prefix and its default route via the
/// gateway; the host end is up on the bridge. In-process, over rtnetlink (`netlink.rs`). The
/// namespace's loopback runc has already brought up. Each start of a container is a new
/// namespace, so this runs at every start; the host end goes with the namespace.
pub async fn wire(
    bridge: &HostBridge,
    container_id: &str,
    pid: i64,
    address: Ipv4Addr,
) -> Result<(), RuntimeError> {
    let host_end = host_end_name(container_id);
    let operation = format!("wire container {container_id} to bridge {}", bridge.name);
    let pid = u32::try_from(pid).map_err(|_| RuntimeError::Engine {
        operation: operation.clone(),
        message: format!("{pid} is not a process id"),
    })?;
    netlink::wire(netlink::Wiring {
        bridge: bridge.name.clone(),
        host_end,
        pid,
        address,
        prefix_len: bridge.prefix_len,
        gateway: bridge.gateway,
    })
    .await
    .map_err(|message| RuntimeError::Engine { operation, message })
}

/// The inode of the kernel's initial PID namespace (`PROC_PID_INIT_INO`): a process in it sees
/// the host's process IDs, which the engine reports for its containers.
const INITIAL_PID_NAMESPACE: &str = "pid:[4026531836]";

/// The programs a node's bridge is made and removed with.
const PROGRAMS: [&str; 2] = ["ip", "iptables"];

/// What decides whether this process can wire pods to a host bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WiringHost {
    /// The effective user id, if known.
    pub effective_uid: Option<u32>,
    /// The target of `/proc/self/ns/pid`.
    pub pid_namespace: String,
    /// `PROGRAMS` not found on `PATH`.
    pub missing_programs: Vec<String>,
    /// `DOCKER_HOST`, when set.
    pub docker_host: Option<String>,
}

impl WiringHost {
    /// Reads this process's user, PID namespace, `PATH` and `DOCKER_HOST`.
    pub fn of_this_process() -> Self {
        let effective_uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| effective_uid(&status));
        let pid_namespace = std::fs::read_link("/proc/self/ns/pid")
            .map(|target| target.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = std::env::var_os("PATH").unwrap_or_default();
        let missing_programs = PROGRAMS
            .iter()
            .filter(|program| {
                !std::env::split_paths(&path).any(|directory| directory.join(program).is_file())
            })
            .map(|program| (*program).to_owned())
            .collect();
        Self {
            effective_uid,
            pid_namespace,
            missing_programs,
            docker_host: std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()),
        }
    }

    /// Why pods cannot be wired to a host bridge from here, or `None` when they can: the
    /// process is root in the host's PID namespace (it reaches a container's network
    /// namespace through `/proc/<pid>` of the pid the engine reports), has `ip` and
    /// `iptables`, and the engine runs on this host (a local socket).
    pub fn unusable_because(&self) -> Option<String> {
        if self.effective_uid != Some(0) {
            return Some("not running as root".to_owned());
        }
        if self.pid_namespace != INITIAL_PID_NAMESPACE {
            return Some(format!(
                "not in the host's PID namespace ({})",
                self.pid_namespace
            ));
        }
        if !self.missing_programs.is_empty() {
            return Some(format!(
                "{} not found on PATH",
                self.missing_programs.join(", ")
            ));
        }
        match &self.docker_host {
            Some(host) if !host.starts_with("unix://") => Some(format!(
                "the engine is not on this host (DOCKER_HOST={host})"
            )),
            _ => None,
        }
    }
}

/// The effective user id of a `/proc/<pid>/status` text (the second number of `Uid:`).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
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

    fn wiring_host() -> WiringHost {
        WiringHost {
            effective_uid: Some(0),
            pid_namespace: INITIAL_PID_NAMESPACE.to_owned(),
            missing_programs: Vec::new(),
            docker_host: None,
        }
    }

    #[test]
    fn root_on_the_host_with_the_tools_and_a_local_engine_can_wire_pods() {
        assert_eq!(wiring_host().unusable_because(), None);
        let local_socket = WiringHost {
            docker_host: Some("unix:///run/docker.sock".to_owned()),
            ..wiring_host()
        };
        assert_eq!(local_socket.unusable_because(), None);
    }

    #[test]
    fn each_missing_condition_is_named_as_the_reason_pods_cannot_be_wired() {
        let cases = [
            (
                WiringHost {
                    effective_uid: Some(1000),
                    ..wiring_host()
                },
                "not running as root",
            ),
            (
                WiringHost {
                    pid_namespace: "pid:[4026532200]".to_owned(),
                    ..wiring_host()
                },
                "PID namespace (pid:[4026532200])",
            ),
            (
                WiringHost {
                    missing_programs: vec!["iptables".to_owned()],
                    ..wiring_host()
                },
                "iptables not found",
            ),
            (
                WiringHost {
                    docker_host: Some("tcp://10.0.0.5:2375".to_owned()),
                    ..wiring_host()
                },
                "DOCKER_HOST=tcp://10.0.0.5:2375",
            ),
        ];
        for (host, reason) in cases {
            let said = host.unusable_because().unwrap_or_default();
            assert!(said.contains(reason), "{host:?}: {said}");
        }
    }

    #[test]
    fn the_effective_uid_is_the_second_number_of_the_uid_line() {
        let status = "Name:\tflotilla\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn a_subnet_held_by_another_interface_is_found_and_our_own_bridge_is_not() {
        let text = "7: br-0a1b2c3d4e5f    inet 10.244.1.1/24 brd 10.244.1.255 scope global br-0a1b2c3d4e5f\\       valid_lft forever preferred_lft forever\n\
                    9: flt1    inet 10.244.1.1/24 scope global flt1\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(other_holders(text, "flt1"), vec!["br-0a1b2c3d4e5f"]);
        assert!(other_holders("", "flt1").is_empty());
        assert_eq!(
            subnet_of(Ipv4Addr::new(10, 244, 1, 1), 24),
            Ipv4Addr::new(10, 244, 1, 0)
        );
        assert_eq!(
            subnet_of(Ipv4Addr::new(10, 244, 1, 1), 0),
            Ipv4Addr::UNSPECIFIED
        );
    }

    #[test]
    fn a_container_gets_a_veth_host_end_name_that_fits_an_interface_name() {
        let host_end = host_end_name("0123456789abcdef0123");
        assert_eq!(host_end, "flv0123456789ab");
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
