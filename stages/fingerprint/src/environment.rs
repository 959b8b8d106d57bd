//! The machine and code a fingerprint was made on: host name, OS, CPU model, finetune's
//! version and the workspace's git commit. Each is best effort: a field that cannot be read
//! is `null`, never a failure.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

pub fn describe(workspace: &Path) -> Value {
    json!({
        "host": host_name(),
        "os": os_name(),
        "arch": std::env::consts::ARCH,
        "cpu": cpu_model(),
        "finetune_version": env!("CARGO_PKG_VERSION"),
        "git": git_state(workspace),
    })
}

fn first_line(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.lines().next()?.trim().to_string()).filter(|line| !line.is_empty())
}

fn host_name() -> Option<String> {
    first_line("/proc/sys/kernel/hostname").or_else(|| std::env::var("HOSTNAME").ok())
}

/// `PRETTY_NAME` of os-release ("Debian GNU/Linux 12 (bookworm)"), else the OS family.
fn os_name() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("PRETTY_NAME="))
                .map(|value| value.trim_matches('"').to_string())
        });
    pretty.unwrap_or_else(|| std::env::consts::OS.to_string())
}

fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == "model name")
        .map(|(_, value)| value.trim().to_string())
}

/// The commit checked out in the workspace, and whether tracked files differ from it.
fn git_state(workspace: &Path) -> Value {
    let git = |args: &[&str]| -> Option<String> {
        let output = Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(commit) => json!({
            "commit": commit,
            "dirty": git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|status| !status.is_empty()),
        }),
        None => Value::Null,
    }
}
