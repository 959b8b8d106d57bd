//! The remote cache in the engine's terms: which entries to push (those the lock files
//! reference), how a fetched entry becomes a local one (every file checked against the
//! manifest's digest, the manifest against the lock file, the fingerprint against the key),
//! and which remote entries `gc --remote` may delete. The object store itself is
//! `finetune_remote`'s.

pub mod commands;
pub mod config;
mod gc;
mod pull;
mod push;

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use finetune_remote::{Access, Progress, Remote};

use crate::workspace::Workspace;

pub use gc::{RemoteGcOptions, RemoteGcReport, gc_remote};
pub use pull::{Pulled, pull, pull_entry, remote_entry};
pub use push::{PushReport, push};

/// Opens the remote `chosen` names (a relative directory is relative to the workspace).
pub fn open(workspace: &Workspace, chosen: &config::Chosen, access: Access) -> Result<Remote> {
    Remote::open(&chosen.url, &workspace.root, access)
        .with_context(|| format!("cannot open the remote ({})", chosen.origin))
}

/// A transfer's progress on stderr: bytes, and files done of all; drawn only on a terminal.
pub struct TransferBar {
    bar: indicatif::ProgressBar,
    files_done: AtomicUsize,
    files: AtomicUsize,
}

impl TransferBar {
    pub fn new(verb: &str) -> TransferBar {
        let visible = std::io::IsTerminal::is_terminal(&std::io::stderr())
            && std::env::var_os("CI").is_none();
        let bar = if visible {
            indicatif::ProgressBar::new(0)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(verb.to_string());
        TransferBar {
            bar,
            files_done: AtomicUsize::new(0),
            files: AtomicUsize::new(0),
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for TransferBar {
    fn begin(&self, files: usize, bytes: u64) {
        self.files.fetch_add(files, Ordering::Relaxed);
        self.bar.inc_length(bytes);
    }

    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn file_done(&self) {
        let done = self.files_done.fetch_add(1, Ordering::Relaxed) + 1;
        let files = self.files.load(Ordering::Relaxed);
        self.bar.set_message(format!("{done}/{files} files"));
    }
}

/// `1 file`, `3 files`, `2 entries`.
pub fn count(n: usize, noun: &str) -> String {
    match (n, noun.strip_suffix('y')) {
        (1, _) => format!("1 {noun}"),
        (_, Some(stem)) => format!("{n} {stem}ies"),
        (_, None) => format!("{n} {noun}s"),
    }
}

/// Bytes for people: `91.3 MB`.
pub fn human_bytes(bytes: u64) -> String {
    indicatif::DecimalBytes(bytes).to_string()
}
