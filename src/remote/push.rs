//! `finetune push`: uploads cache entries, blobs first and each manifest last, skipping what
//! the remote has. Only whole, checked entries go up: a damaged one is never pushed.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use finetune_remote::{BlobFile, EntryPush, Remote};

use super::TransferBar;
use crate::cache::digest::{DigestMemo, sha256_bytes};
use crate::cache::store::{Entry, Lookup, MANIFEST, Store};

#[derive(Debug, Default)]
pub struct PushReport {
    /// Entries uploaded now.
    pub uploaded: Vec<String>,
    /// Entries the remote had already.
    pub present: usize,
    /// Entries the remote holds with other content (kept: the first push wins).
    pub differs: Vec<String>,
    /// Referenced entries not in the local cache (never run here, or removed).
    pub missing: Vec<String>,
    /// Referenced entries whose local files do not match their manifest: not pushed.
    pub damaged: Vec<(String, String)>,
    pub files_uploaded: usize,
    pub files_present: usize,
    pub bytes: u64,
}

/// Pushes the entries `keys` of the local cache to `remote`.
pub fn push(
    store: &Store,
    memo: &mut DigestMemo,
    remote: &Remote,
    keys: &[String],
) -> Result<PushReport> {
    let mut report = PushReport::default();
    let mut local = Vec::new();
    for key in keys {
        match store.lookup(key, memo)? {
            Lookup::Hit(entry) => local.push((key.clone(), entry)),
            Lookup::Missing => report.missing.push(key.clone()),
            Lookup::Damaged(why) => report.damaged.push((key.clone(), why)),
        }
    }
    let local_keys: Vec<String> = local.iter().map(|(k, _)| k.clone()).collect();
    let on_remote = remote.has_entries(&local_keys)?;
    let mut to_push = Vec::new();
    for ((key, entry), there) in local.into_iter().zip(on_remote) {
        if there {
            report.present += 1;
        } else {
            to_push.push((key, entry));
        }
    }
    let blobs = unique_blobs(&to_push);
    report.bytes = blobs.iter().map(|b| b.size).sum();
    let bar = TransferBar::new("push");
    let uploaded = remote.upload(&blobs, &bar);
    bar.finish();
    report.files_uploaded = uploaded?;
    report.files_present = blobs.len() - report.files_uploaded;
    for (key, entry) in &to_push {
        match remote.put_entry(key, &manifest_bytes(entry)?)? {
            EntryPush::Uploaded => report.uploaded.push(key.clone()),
            EntryPush::AlreadyThere => report.present += 1,
            EntryPush::Differs => report.differs.push(key.clone()),
        }
    }
    Ok(report)
}

/// Every file of the entries, once per digest.
fn unique_blobs(entries: &[(String, Entry)]) -> Vec<BlobFile> {
    let mut seen = BTreeSet::new();
    let mut blobs = Vec::new();
    for (_, entry) in entries {
        for file in &entry.manifest.files {
            if seen.insert(file.sha256.clone()) {
                blobs.push(BlobFile {
                    sha256: file.sha256.clone(),
                    size: file.size,
                    path: entry.dir.join(&file.path),
                });
            }
        }
    }
    blobs
}

/// The entry's manifest as it lies on disk, checked to be the one its lookup read.
fn manifest_bytes(entry: &Entry) -> Result<Vec<u8>> {
    let path = entry.dir.join(MANIFEST);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    if sha256_bytes(&bytes) != entry.digest {
        bail!("{} changed while it was being pushed", path.display());
    }
    Ok(bytes)
}
