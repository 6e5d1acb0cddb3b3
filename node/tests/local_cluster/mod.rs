//! Helpers for tests that drive a `flotilla local` cluster through the CLI.

#![allow(dead_code, unreachable_pub)]

use std::process::{Command, Output};

pub const BINARY: &str = env!("CARGO_BIN_EXE_flotilla");

/// Runs the flotilla binary with `args`.
pub fn flotilla(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .output()
        .expect("run the flotilla binary")
}

/// Everything a command printed, stdout then stderr.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Removes the local cluster when the test ends, also when it fails.
pub struct Down(pub String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = flotilla(&["local", "down", "--name", &self.0]);
    }
}
