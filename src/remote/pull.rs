//! Fetching entries: `finetune pull`, `run --pull`, and what `status` asks of the remote.
//!
//! A fetched entry is published locally only when every check passes: the manifest is well
//! formed and (when a lock file records this key) has the recorded digest; every file has the
//! size and SHA-256 the manifest gives; and a `fingerprint.json` in it verifies with the key
//! this machine holds, when it holds one. Anything else is refused with the reason, and the
//! stage runs instead.

use anyhow::Result;
use finetune_core::integrity::{self, DEFAULT_KEY_ENV, KeyError, KeySource, VerifyError};
use finetune_remote::{BlobFile, Progress, Remote, RemoteError};

use super::TransferBar;
use crate::cache::digest::{DigestMemo, sha256_bytes};
use crate::cache::lockfile::References;
use crate::cache::store::{Entry, Lookup, Store, parse_foreign_manifest, remember};
use crate::workspace::Workspace;

/// What fetching one entry came to.
#[derive(Debug)]
pub enum Pulled {
    /// Fetched, checked and published in the local cache. The text, if any, is a caveat
    /// worth telling (its fingerprint could not be checked here).
    Entry(Entry, Option<String>),
    /// The remote has no entry for the key.
    Absent,
    /// The remote's entry failed a check: why. Nothing was published.
    Refused(String),
}

/// Fetches the entry for `key` into the local cache. `recorded` is the output digest a lock
/// file records for this key, which the fetched manifest must have. Errors are the remote's
/// or the disk's (unreachable, no permission, disk full); a bad entry is `Refused`.
pub fn pull_entry(
    remote: &Remote,
    store: &Store,
    workspace: &Workspace,
    key: &str,
    recorded: Option<&str>,
    progress: &dyn Progress,
) -> Result<Pulled> {
    let Some(bytes) = remote.entry(key)? else {
        return Ok(Pulled::Absent);
    };
    let manifest = match parse_foreign_manifest(&bytes) {
        Ok(manifest) => manifest,
        Err(why) => return Ok(Pulled::Refused(why)),
    };
    if let Some(recorded) = recorded.filter(|r| **r != sha256_bytes(&bytes)) {
        return Ok(Pulled::Refused(format!(
            "its manifest is not the output the lock file records (digest {})",
            crate::report::short(recorded)
        )));
    }
    let staged = store.stage_dir(key)?;
    let files: Vec<BlobFile> = manifest
        .files
        .iter()
        .map(|file| BlobFile {
            sha256: file.sha256.clone(),
            size: file.size,
            path: staged.join(&file.path),
        })
        .collect();
    let published = match remote.download(&files, progress) {
        Ok(()) => store.publish_fetched(key, &staged, manifest, &bytes),
        Err(RemoteError::Corrupt { object, why, .. }) => {
            let _ = std::fs::remove_dir_all(&staged);
            // The entry cannot be pulled by anyone as it is. Without its manifest it is merely
            // absent, and the next push of it uploads it whole again.
            let _ = remote.delete_entry(key);
            return Ok(Pulled::Refused(format!(
                "{object} is not what its name says: {why}"
            )));
        }
        Err(err) => Err(err.into()),
    };
    let entry = match published {
        Ok(entry) => entry,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(err);
        }
    };
    match check_fingerprint(&entry, workspace) {
        Ok(caveat) => Ok(Pulled::Entry(entry, caveat)),
        Err(why) => {
            store.set_aside(key)?;
            Ok(Pulled::Refused(why))
        }
    }
}

/// The entry the remote holds for `key`, as it would be once pulled (its manifest checked,
/// its files not fetched): what `status` needs to know the keys downstream of it.
pub fn remote_entry(remote: &Remote, store: &Store, key: &str) -> Result<Option<Entry>> {
    let Some(bytes) = remote.entry(key)? else {
        return Ok(None);
    };
    Ok(parse_foreign_manifest(&bytes).ok().map(|manifest| Entry {
        dir: store.entry_dir(key),
        digest: sha256_bytes(&bytes),
        manifest,
    }))
}

/// A pulled entry that holds a fingerprint must verify with the key this machine holds: the
/// one the fingerprint names if that is the verifier's own, else `FINETUNE_HMAC_KEY` or the
/// workspace key. With no key here it is accepted (its files matched their digests) and the
/// caveat says so. Err: why it is refused.
fn check_fingerprint(entry: &Entry, workspace: &Workspace) -> Result<Option<String>, String> {
    if !entry.dir.join(integrity::FINGERPRINT_FILE).is_file() {
        return Ok(None);
    }
    let verdict = match integrity::verify(&entry.dir, &workspace.root, None) {
        Err(VerifyError::Key(KeyError::Missing { .. }) | VerifyError::UntrustedKey { .. }) => {
            let Some(key) = own_key(workspace) else {
                return Ok(Some(format!(
                    "its {} was not checked: no HMAC key here (set {DEFAULT_KEY_ENV})",
                    integrity::FINGERPRINT_FILE
                )));
            };
            integrity::verify(&entry.dir, &workspace.root, Some(&key))
        }
        verdict => verdict,
    };
    match verdict {
        Ok(result) if result.passed() => Ok(None),
        Ok(result) => Err(format!(
            "its {} does not verify: {}",
            integrity::FINGERPRINT_FILE,
            result
                .problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )),
        Err(err) => Err(format!("its fingerprint does not verify: {err}")),
    }
}

/// A key this machine holds of its own accord, whatever a fingerprint names.
fn own_key(workspace: &Workspace) -> Option<integrity::SigningKey> {
    let sources = [
        KeySource::Env {
            name: DEFAULT_KEY_ENV.into(),
        },
        KeySource::Workspace {
            path: integrity::WORKSPACE_KEY.into(),
        },
    ];
    sources
        .iter()
        .find_map(|source| integrity::load(source, &workspace.root).ok())
}

#[derive(Debug, Default)]
pub struct PullReport {
    pub pulled: Vec<String>,
    /// Already in the local cache, whole.
    pub present: usize,
    /// Not on the remote.
    pub absent: Vec<String>,
    pub refused: Vec<(String, String)>,
    pub caveats: Vec<(String, String)>,
}

/// `finetune pull`: fetches each referenced entry the local cache lacks (or holds damaged).
pub fn pull(
    workspace: &Workspace,
    store: &Store,
    memo: &mut DigestMemo,
    remote: &Remote,
    references: &References,
) -> Result<PullReport> {
    let mut report = PullReport::default();
    let bar = TransferBar::new("pull");
    for key in references.entries.keys() {
        match store.lookup(key, memo)? {
            Lookup::Hit(_) => {
                report.present += 1;
                continue;
            }
            Lookup::Damaged(_) => {
                store.set_aside(key)?;
            }
            Lookup::Missing => {}
        }
        let recorded = references.digest_of(key);
        match pull_entry(remote, store, workspace, key, recorded, &bar)? {
            Pulled::Entry(entry, caveat) => {
                let _ = remember(memo, &entry);
                if let Some(caveat) = caveat {
                    report.caveats.push((key.clone(), caveat));
                }
                report.pulled.push(key.clone());
            }
            Pulled::Absent => report.absent.push(key.clone()),
            Pulled::Refused(why) => report.refused.push((key.clone(), why)),
        }
    }
    bar.finish();
    Ok(report)
}
