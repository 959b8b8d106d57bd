//! Cache entries: `artifacts/cache/<key>/`, each a stage output directory with a manifest
//! (relative path, size and SHA-256 of every file). An entry is built under `artifacts/tmp/`
//! and published by one rename once complete, so no reader ever sees a partial entry.
//!
//! Nothing on disk is taken on trust: every lookup checks the entry against its manifest
//! (each file present, regular, of its size and digest, nothing extra), and one that fails is
//! reported [`Lookup::Damaged`] and never used; the runner sets it aside and runs the stage
//! again.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use finetune_core::UpstreamReads;
use finetune_core::output::{list_files, list_tree, sync_dir, sync_tree};

use super::digest::{DigestMemo, sha256_bytes, sha256_file};

pub use finetune_core::output::ENGINE_MANIFEST as MANIFEST;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: Vec<ManifestFile>,
}

impl Manifest {
    /// Hashes every file under `dir` (except the manifest itself).
    pub fn of_dir(dir: &Path) -> Result<Manifest> {
        let mut files = Vec::new();
        for relative in list_files(dir)? {
            if relative == Path::new(MANIFEST) {
                continue;
            }
            let (size, sha256) = sha256_file(&dir.join(&relative))
                .with_context(|| format!("cannot read {}", dir.join(&relative).display()))?;
            let path = relative
                .to_str()
                .with_context(|| format!("output file name is not UTF-8: {}", relative.display()))?
                .to_string();
            files.push(ManifestFile { path, size, sha256 });
        }
        Ok(Manifest { files })
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A published entry, checked against its manifest.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
    /// SHA-256 of the manifest bytes: what downstream keys use.
    pub digest: String,
    pub manifest: Manifest,
}

impl Entry {
    /// The digest of the part of this entry a downstream job reads: the whole entry's, or
    /// one over the manifest lines of just those files.
    pub fn digest_of(&self, reads: &UpstreamReads) -> String {
        let UpstreamReads::Only(parts) = reads else {
            return self.digest.clone();
        };
        let read = |path: &str| {
            parts.iter().any(|part| {
                path == *part || path.strip_prefix(part).is_some_and(|r| r.starts_with('/'))
            })
        };
        let mut text = format!("only {}\n", parts.join("\0"));
        for file in self.manifest.files.iter().filter(|f| read(&f.path)) {
            text.push_str(&format!("{}\0{}\0{}\n", file.path, file.size, file.sha256));
        }
        sha256_bytes(text.as_bytes())
    }
}

/// What a lookup found under a key.
#[derive(Debug)]
pub enum Lookup {
    Hit(Entry),
    Missing,
    /// An entry that does not match its manifest, or has none that parses: never used. The
    /// text says what is wrong, naming the file.
    Damaged(String),
}

pub struct Store {
    cache: PathBuf,
    tmp: PathBuf,
    scratch: PathBuf,
    damaged: PathBuf,
}

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    pub fn new(artifacts: &Path) -> Store {
        Store {
            cache: artifacts.join("cache"),
            tmp: artifacts.join("tmp"),
            scratch: artifacts.join("scratch"),
            damaged: artifacts.join("damaged"),
        }
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.cache.join(key)
    }

    /// The entry for `key` if one was published and its files are what its manifest says:
    /// presence, type and size of every file, and its digest through `memo`, so a file whose
    /// (size, mtime, ctime, inode) stamp is unchanged since it was hashed is not read again.
    /// A fresh memo rehashes every file (`finetune verify --cache`).
    pub fn lookup(&self, key: &str, memo: &mut DigestMemo) -> Result<Lookup> {
        let dir = self.entry_dir(key);
        let (manifest, bytes) = match read_manifest(&dir)? {
            ManifestRead::Found(manifest, bytes) => (manifest, bytes),
            ManifestRead::Missing => return Ok(Lookup::Missing),
            ManifestRead::Unusable(problem) => return Ok(Lookup::Damaged(problem)),
        };
        Ok(match first_problem(&dir, &manifest, memo)? {
            Some(problem) => Lookup::Damaged(problem),
            None => Lookup::Hit(Entry {
                digest: sha256_bytes(&bytes),
                dir,
                manifest,
            }),
        })
    }

    /// Moves a damaged entry out of the cache into `artifacts/damaged/`, for a look and for
    /// `gc` to remove; the key is free to be computed again. Returns where it went.
    pub fn set_aside(&self, key: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.damaged)
            .with_context(|| format!("cannot create {}", self.damaged.display()))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let target = self
            .damaged
            .join(format!("{key}.{stamp}.{}.{n}", std::process::id()));
        let from = self.entry_dir(key);
        std::fs::rename(&from, &target)
            .with_context(|| format!("cannot move {} to {}", from.display(), target.display()))?;
        Ok(target)
    }

    /// A fresh, empty directory to build the entry for `key` in.
    pub fn stage_dir(&self, key: &str) -> Result<PathBuf> {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = self.tmp.join(format!("{key}.{}.{n}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// The crash-surviving scratch directory of `key` (see `RunContext::scratch_dir`).
    pub fn scratch_dir(&self, key: &str) -> Result<PathBuf> {
        let dir = self.scratch.join(key);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// Throws away what an interrupted run of `key` left in its scratch directory (for a
    /// forced rerun, which starts clean). Returns whether there was anything.
    pub fn discard_scratch(&self, key: &str) -> Result<bool> {
        let dir = self.scratch.join(key);
        let had_files = std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some());
        remove_dir_if_present(&dir)?;
        Ok(had_files)
    }

    /// Removes every scratch directory (for `gc`): what interrupted runs left to resume from.
    /// Returns how many there were.
    pub fn clear_scratch(&self) -> Result<usize> {
        let count = std::fs::read_dir(&self.scratch).map_or(0, |entries| entries.count());
        remove_dir_if_present(&self.scratch)?;
        Ok(count)
    }

    /// Seals `staged` with its manifest and publishes it as the entry for `key`, replacing an
    /// existing entry (a forced rerun). Everything is flushed to disk before the rename.
    pub fn publish(&self, key: &str, staged: &Path) -> Result<Entry> {
        refuse_links(staged)?;
        if staged.join(MANIFEST).exists() {
            bail!("the stage wrote a file named {MANIFEST}, a name finetune reserves");
        }
        let manifest = Manifest::of_dir(staged)?;
        let bytes = serde_json::to_vec_pretty(&manifest)?;
        self.install(key, staged, manifest, &bytes)
    }

    /// Publishes `staged`, whose files were fetched (and each checked against its digest) by
    /// another machine's manifest, as the entry for `key`: `manifest` as
    /// [`parse_foreign_manifest`] read it from `bytes`.
    pub fn publish_fetched(
        &self,
        key: &str,
        staged: &Path,
        manifest: Manifest,
        bytes: &[u8],
    ) -> Result<Entry> {
        let listed: Vec<PathBuf> = manifest
            .files
            .iter()
            .map(|f| PathBuf::from(&f.path))
            .collect();
        if list_files(staged)? != listed {
            bail!("the fetched files of {key} are not the ones its manifest lists");
        }
        self.install(key, staged, manifest, bytes)
    }

    /// Seals `staged` with `manifest` (whose serialised form is `bytes`) and moves it into
    /// the cache as the entry for `key`. Everything is flushed to disk before the rename.
    fn install(&self, key: &str, staged: &Path, manifest: Manifest, bytes: &[u8]) -> Result<Entry> {
        let manifest_path = staged.join(MANIFEST);
        std::fs::write(&manifest_path, bytes)
            .with_context(|| format!("cannot write {}", manifest_path.display()))?;
        sync_tree(staged)?;
        std::fs::create_dir_all(&self.cache)
            .with_context(|| format!("cannot create {}", self.cache.display()))?;
        let target = self.entry_dir(key);
        if std::fs::symlink_metadata(&target).is_ok() {
            self.replace(&target, staged)?;
        } else {
            std::fs::rename(staged, &target)
                .with_context(|| format!("cannot publish {}", target.display()))?;
        }
        sync_dir(&self.cache)?;
        let _ = std::fs::remove_dir_all(self.scratch.join(key));
        Ok(Entry {
            dir: target,
            digest: sha256_bytes(bytes),
            manifest,
        })
    }

    /// Swaps `staged` in for the entry at `target`, putting the old one back on failure rather
    /// than lose a good result.
    fn replace(&self, target: &Path, staged: &Path) -> Result<()> {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let trash = self
            .tmp
            .join(format!("{name}.replaced.{}.{n}", std::process::id()));
        std::fs::rename(target, &trash)
            .with_context(|| format!("cannot replace {}", target.display()))?;
        if let Err(err) = std::fs::rename(staged, target) {
            let _ = std::fs::rename(&trash, target);
            return Err(err).with_context(|| format!("cannot publish {}", target.display()));
        }
        let _ = remove_any(&trash);
        Ok(())
    }

    /// Every published key: the directories in the cache.
    pub fn keys(&self) -> Result<Vec<String>> {
        Ok(self
            .cache_items()?
            .into_iter()
            .filter(|(_, is_dir)| *is_dir)
            .map(|(name, _)| name)
            .collect())
    }

    /// Whatever else lies in the cache directory (a file copied there by hand): never an entry.
    pub fn strays(&self) -> Result<Vec<String>> {
        Ok(self
            .cache_items()?
            .into_iter()
            .filter(|(_, is_dir)| !*is_dir)
            .map(|(name, _)| name)
            .collect())
    }

    fn cache_items(&self) -> Result<Vec<(String, bool)>> {
        let mut items = Vec::new();
        match std::fs::read_dir(&self.cache) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry?;
                    let is_dir = entry.file_type()?.is_dir();
                    items.push((entry.file_name().to_string_lossy().into_owned(), is_dir));
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| format!("cannot list {}", self.cache.display()));
            }
        }
        items.sort();
        Ok(items)
    }

    /// The bytes an entry (or a stray) takes, by its manifest when it has a readable one.
    pub fn size_of(&self, name: &str) -> u64 {
        match read_manifest(&self.entry_dir(name)) {
            Ok(ManifestRead::Found(manifest, _)) => manifest.bytes(),
            _ => std::fs::symlink_metadata(self.entry_dir(name)).map_or(0, |m| m.len()),
        }
    }

    /// Removes an entry or a stray (for `gc`): renamed away first, so it vanishes in one step.
    pub fn remove(&self, name: &str) -> Result<u64> {
        let bytes = self.size_of(name);
        std::fs::create_dir_all(&self.tmp)
            .with_context(|| format!("cannot create {}", self.tmp.display()))?;
        let trash = self.tmp.join(format!("{name}.gc.{}", std::process::id()));
        let from = self.entry_dir(name);
        std::fs::rename(&from, &trash)
            .with_context(|| format!("cannot remove {}", from.display()))?;
        remove_any(&trash).with_context(|| format!("cannot remove {}", trash.display()))?;
        Ok(bytes)
    }

    /// Removes the entries set aside as damaged (for `gc`); returns how many there were.
    pub fn clear_damaged(&self) -> Result<usize> {
        let count = std::fs::read_dir(&self.damaged).map_or(0, |entries| entries.count());
        remove_dir_if_present(&self.damaged)?;
        Ok(count)
    }

    /// Removes leftovers of runs that were killed: only call while holding the workspace lock.
    pub fn clear_tmp(&self) -> Result<()> {
        remove_dir_if_present(&self.tmp)
    }
}

/// Removes `dir` and everything under it; a directory that is not there is no error.
fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Records the digests of a just-published entry in the memo, so its next lookup reads only
/// the files' stamps.
pub fn remember(memo: &mut DigestMemo, entry: &Entry) -> Result<()> {
    for file in &entry.manifest.files {
        memo.record(&entry.dir.join(&file.path), &file.sha256)?;
    }
    Ok(())
}

/// A manifest that came from elsewhere (a remote), checked before any of it is used: it
/// must parse, list plain relative paths, each once and in order, and be byte for byte what
/// this version writes for those files, so its digest is the one a local run would record.
pub fn parse_foreign_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|err| format!("its manifest is not valid: {err}"))?;
    for pair in manifest.files.windows(2) {
        if Path::new(&pair[0].path) >= Path::new(&pair[1].path) {
            return Err(format!(
                "its manifest lists `{}` out of order or twice",
                pair[1].path
            ));
        }
    }
    if let Some(file) = manifest.files.iter().find(|f| !is_inside(&f.path)) {
        return Err(format!(
            "its manifest names `{}`, a path outside the entry",
            file.path
        ));
    }
    if serde_json::to_vec_pretty(&manifest).ok().as_deref() != Some(bytes) {
        return Err("its manifest is not in the form finetune writes".into());
    }
    Ok(manifest)
}

enum ManifestRead {
    Found(Manifest, Vec<u8>),
    Missing,
    Unusable(String),
}

fn read_manifest(dir: &Path) -> Result<ManifestRead> {
    let path = dir.join(MANIFEST);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(if std::fs::symlink_metadata(dir).is_ok() {
                ManifestRead::Unusable(format!("it has no {MANIFEST}"))
            } else {
                ManifestRead::Missing
            });
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotADirectory => {
            return Ok(ManifestRead::Unusable(
                "it is a file, not a directory".into(),
            ));
        }
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    Ok(match serde_json::from_slice::<Manifest>(&bytes) {
        Ok(manifest) => ManifestRead::Found(manifest, bytes),
        Err(err) => ManifestRead::Unusable(format!("its {MANIFEST} is not valid: {err}")),
    })
}

/// What is wrong with the files of the entry in `dir`, if anything: first what a stat shows
/// (a missing, resized or foreign file, one the manifest does not list, a path out of the
/// entry), then the digests.
fn first_problem(dir: &Path, manifest: &Manifest, memo: &mut DigestMemo) -> Result<Option<String>> {
    let mut listed = BTreeSet::new();
    for file in &manifest.files {
        if !is_inside(&file.path) {
            return Ok(Some(format!(
                "its manifest names `{}`, a path outside the entry",
                file.path
            )));
        }
        listed.insert(PathBuf::from(&file.path));
        let path = dir.join(&file.path);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some(format!("`{}` is missing", file.path)));
            }
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        if !meta.is_file() {
            return Ok(Some(format!("`{}` is not a regular file", file.path)));
        }
        if meta.len() != file.size {
            return Ok(Some(format!(
                "`{}` is {} bytes; its manifest says {}",
                file.path,
                meta.len(),
                file.size
            )));
        }
    }
    for (relative, _) in list_tree(dir)? {
        if relative != Path::new(MANIFEST) && !listed.contains(&relative) {
            return Ok(Some(format!(
                "`{}` is not in its manifest",
                relative.display()
            )));
        }
    }
    for file in &manifest.files {
        if memo.file_digest(&dir.join(&file.path))? != file.sha256 {
            return Ok(Some(format!(
                "`{}` does not match its SHA-256 in the manifest: its content changed",
                file.path
            )));
        }
    }
    Ok(None)
}

/// A relative path of plain names: what a manifest may list.
fn is_inside(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// A stage's output holds regular files and directories only: a symlink would publish (and
/// hash) whatever it points at, perhaps outside the workspace.
fn refuse_links(staged: &Path) -> Result<()> {
    for (relative, kind) in list_tree(staged)? {
        if kind.is_symlink() {
            let target = std::fs::read_link(staged.join(&relative)).unwrap_or_default();
            bail!(
                "the stage's output `{}` is a symlink (to {}); outputs must be regular files: \
                 copy the file into the output directory instead",
                relative.display(),
                target.display()
            );
        }
        if !kind.is_file() {
            bail!(
                "the stage's output `{}` is not a regular file (a socket, fifo or device)",
                relative.display()
            );
        }
    }
    Ok(())
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_then_lookup() {
        let artifacts = tempfile::tempdir().unwrap();
        let store = Store::new(artifacts.path());
        let mut memo = DigestMemo::default();
        assert!(matches!(
            store.lookup("k", &mut memo).unwrap(),
            Lookup::Missing
        ));
        let staged = store.stage_dir("k").unwrap();
        std::fs::create_dir(staged.join("sub")).unwrap();
        std::fs::write(staged.join("sub/a.txt"), b"abc").unwrap();
        let published = store.publish("k", &staged).unwrap();
        assert!(!staged.exists());
        let Lookup::Hit(found) = store.lookup("k", &mut memo).unwrap() else {
            panic!("the published entry is not found whole");
        };
        assert_eq!(found.digest, published.digest);
        assert_eq!(found.manifest.files[0].path, "sub/a.txt");
        assert_eq!(found.manifest.bytes(), 3);
        assert_eq!(store.keys().unwrap(), ["k"]);
        store.remove("k").unwrap();
        assert!(matches!(
            store.lookup("k", &mut memo).unwrap(),
            Lookup::Missing
        ));
    }
}
