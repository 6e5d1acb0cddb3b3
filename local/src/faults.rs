//! Silent partitions: iptables rules inside a node container's own network namespace
//! (entered with `nsenter` from the host), in chains of their own so that `heal` undoes exactly
//! what `isolate` did. The rules vanish with the container's namespace.

use std::net::Ipv4Addr;

use crate::{io_error, LocalError};

/// Drops what the node receives from its peers.
const INBOUND_CHAIN: &str = "FLOTILLA-ISOLATE-IN";
/// Drops what the node sends to its peers.
const OUTBOUND_CHAIN: &str = "FLOTILLA-ISOLATE-OUT";

/// The iptables invocations (arguments after `iptables`) that isolate a node from `peers`:
/// inbound always, outbound too unless `one_way`. Each chain is created if missing, emptied,
/// hooked into INPUT or OUTPUT once, and filled; `fallible` ones may fail harmlessly.
pub(crate) fn isolate_rules(peers: &[Ipv4Addr], one_way: bool) -> Vec<(Vec<String>, Fallible)> {
    let mut rules = Vec::new();
    let mut chain = |chain: &str, hook: &str, direction: &str| {
        rules.push((args(&["-w", "-N", chain]), Fallible::Yes));
        rules.push((args(&["-w", "-F", chain]), Fallible::No));
        rules.push((
            args(&["-w", "-C", hook, "-j", chain]),
            Fallible::CheckThenInsert,
        ));
        for peer in peers {
            let peer = peer.to_string();
            rules.push((
                args(&["-w", "-A", chain, direction, &peer, "-j", "DROP"]),
                Fallible::No,
            ));
        }
    };
    chain(INBOUND_CHAIN, "INPUT", "-s");
    if !one_way {
        chain(OUTBOUND_CHAIN, "OUTPUT", "-d");
    }
    rules
}

/// The iptables invocations that undo every isolation of a node.
pub(crate) fn heal_rules() -> Vec<(Vec<String>, Fallible)> {
    [INBOUND_CHAIN, OUTBOUND_CHAIN]
        .iter()
        .map(|chain| (args(&["-w", "-F", chain]), Fallible::Yes))
        .collect()
}

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|part| (*part).to_owned()).collect()
}

/// How a failing invocation is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fallible {
    /// A failure is an error.
    No,
    /// A failure is expected at times (creating a chain that exists, emptying a missing one).
    Yes,
    /// A `-C` check: if it fails, the same rule is inserted with `-I`.
    CheckThenInsert,
}

/// Runs `iptables` in the network namespace of process `pid`.
fn iptables_in_namespace(pid: i64, arguments: &[String]) -> Result<bool, LocalError> {
    let status = std::process::Command::new("nsenter")
        .arg("-t")
        .arg(pid.to_string())
        .arg("-n")
        .arg("iptables")
        .args(arguments)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(io_error(
            "run nsenter … iptables (util-linux and iptables are needed; scripts/setup.sh installs them)",
        ))?;
    Ok(status.success())
}

/// Applies `rules` in the network namespace of process `pid`.
pub(crate) fn apply(pid: i64, rules: &[(Vec<String>, Fallible)]) -> Result<(), LocalError> {
    for (arguments, fallible) in rules {
        let succeeded = iptables_in_namespace(pid, arguments)?;
        match fallible {
            Fallible::No if !succeeded => {
                return Err(LocalError::Command {
                    action: format!(
                        "iptables {} in the namespace of pid {pid}",
                        arguments.join(" ")
                    ),
                    message: "iptables failed".into(),
                })
            }
            Fallible::CheckThenInsert if !succeeded => {
                let mut insert = arguments.clone();
                if let Some(flag) = insert.iter_mut().find(|a| a.as_str() == "-C") {
                    *flag = "-I".into();
                }
                if !iptables_in_namespace(pid, &insert)? {
                    return Err(LocalError::Command {
                        action: format!(
                            "iptables {} in the namespace of pid {pid}",
                            insert.join(" ")
                        ),
                        message: "iptables failed".into(),
                    });
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(rules: &[(Vec<String>, Fallible)]) -> Vec<String> {
        rules
            .iter()
            .map(|(arguments, _)| arguments.join(" "))
            .collect()
    }

    #[test]
    fn isolating_both_ways_drops_each_peer_in_and_out() {
        let peers = [Ipv4Addr::new(10, 200, 0, 12), Ipv4Addr::new(10, 200, 0, 13)];
        let rules = commands(&isolate_rules(&peers, false));
        assert!(rules.contains(&"-w -C INPUT -j FLOTILLA-ISOLATE-IN".to_string()));
        assert!(rules.contains(&"-w -A FLOTILLA-ISOLATE-IN -s 10.200.0.12 -j DROP".to_string()));
        assert!(rules.contains(&"-w -A FLOTILLA-ISOLATE-IN -s 10.200.0.13 -j DROP".to_string()));
        assert!(rules.contains(&"-w -C OUTPUT -j FLOTILLA-ISOLATE-OUT".to_string()));
        assert!(rules.contains(&"-w -A FLOTILLA-ISOLATE-OUT -d 10.200.0.13 -j DROP".to_string()));
    }

    #[test]
    fn isolating_one_way_only_drops_what_the_node_receives() {
        let peers = [Ipv4Addr::new(10, 200, 0, 12)];
        let rules = commands(&isolate_rules(&peers, true));
        assert!(rules.iter().all(|rule| !rule.contains("OUT")));
        assert!(rules.contains(&"-w -A FLOTILLA-ISOLATE-IN -s 10.200.0.12 -j DROP".to_string()));
    }

    #[test]
    fn healing_empties_both_chains() {
        assert_eq!(
            commands(&heal_rules()),
            vec!["-w -F FLOTILLA-ISOLATE-IN", "-w -F FLOTILLA-ISOLATE-OUT"]
        );
    }
}
