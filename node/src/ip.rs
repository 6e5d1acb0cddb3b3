//! The `ip` command (iproute2, or busybox's in a node image): the node's few changes to its
//! own network namespace (addresses, routes, the VIP interface) go through it.

/// Runs `ip ARGUMENTS...` and returns its output, or an error naming the command and what it
/// printed.
pub(crate) async fn ip(arguments: &[&str]) -> Result<String, String> {
    let output = tokio::process::Command::new("ip")
        .args(arguments)
        .output()
        .await
        .map_err(|error| format!("run ip {}: {error}", arguments.join(" ")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            arguments.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
