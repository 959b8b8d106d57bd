//! Cache entries: `artifacts/cache/<key>/`, each a stage output directory with a manifest
//! (relative path, size and SHA-256 of every file). An entry is built under `artifacts/tmp/`
//! and published by one rename once complete, so no reader ever sees a partial entry.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use finetune_core::output::{list_files, sync_dir, sync_tree};

use super::digest::{sha256_bytes, sha256_file};

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

/// A published entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
    /// SHA-256 of the manifest bytes: what downstream keys use.
    pub digest: String,
    pub manifest: Manifest,
}

pub struct Store {
    cache: PathBuf,
    tmp: PathBuf,
    scratch: PathBuf,
}

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    pub fn new(artifacts: &Path) -> Store {
        Store {
            cache: artifacts.join("cache"),
            tmp: artifacts.join("tmp"),
            scratch: artifacts.join("scratch"),
        }
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.cache.join(key)
    }

    /// The entry for `key`, if one was published.
    pub fn lookup(&self, key: &str) -> Result<Option<Entry>> {
        let dir = self.entry_dir(key);
        let bytes = match std::fs::read(dir.join(MANIFEST)) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("cannot read cache entry {}", dir.display()));
            }
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("corrupt manifest in {}", dir.display()))?;
        Ok(Some(Entry {
            digest: sha256_bytes(&bytes),
            dir,
            manifest,
        }))
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

    /// Seals `staged` with its manifest and publishes it as the entry for `key`, replacing an
    /// existing entry (a forced rerun). Everything is flushed to disk before the rename.
    pub fn publish(&self, key: &str, staged: &Path) -> Result<Entry> {
        if staged.join(MANIFEST).exists() {
            bail!("the stage wrote a file named {MANIFEST}, a name finetune reserves");
        }
        let manifest = Manifest::of_dir(staged)?;
        let bytes = serde_json::to_vec_pretty(&manifest)?;
        std::fs::write(staged.join(MANIFEST), &bytes)?;
        sync_tree(staged)?;
        std::fs::create_dir_all(&self.cache)?;
        let target = self.entry_dir(key);
        if target.exists() {
            let trash = self
                .tmp
                .join(format!("{key}.replaced.{}", std::process::id()));
            std::fs::rename(&target, &trash)
                .with_context(|| format!("cannot replace {}", target.display()))?;
            if let Err(err) = std::fs::rename(staged, &target) {
                // Put the old entry back rather than lose a good result.
                let _ = std::fs::rename(&trash, &target);
                return Err(err).with_context(|| format!("cannot publish {}", target.display()));
            }
            let _ = std::fs::remove_dir_all(&trash);
        } else {
            std::fs::rename(staged, &target)
                .with_context(|| format!("cannot publish {}", target.display()))?;
        }
        sync_dir(&self.cache)?;
        let _ = std::fs::remove_dir_all(self.scratch.join(key));
        Ok(Entry {
            dir: target,
            digest: sha256_bytes(&bytes),
            manifest,
        })
    }

    /// Every published key.
    pub fn keys(&self) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        match std::fs::read_dir(&self.cache) {
            Ok(entries) => {
                for entry in entries {
                    keys.push(entry?.file_name().to_string_lossy().into_owned());
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err.into()),
        }
        keys.sort();
        Ok(keys)
    }

    /// Removes an entry (for `gc`): renamed away first, so it vanishes in one step.
    pub fn remove(&self, key: &str) -> Result<u64> {
        let bytes = self.lookup(key)?.map(|e| e.manifest.bytes()).unwrap_or(0);
        std::fs::create_dir_all(&self.tmp)?;
        let trash = self.tmp.join(format!("{key}.gc.{}", std::process::id()));
        std::fs::rename(self.entry_dir(key), &trash)?;
        std::fs::remove_dir_all(&trash)?;
        Ok(bytes)
    }

    /// Removes leftovers of runs that were killed: only call while holding the workspace lock.
    pub fn clear_tmp(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.tmp) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_then_lookup() {
        let artifacts = tempfile::tempdir().unwrap();
        let store = Store::new(artifacts.path());
        assert!(store.lookup("k").unwrap().is_none());
        let staged = store.stage_dir("k").unwrap();
        std::fs::create_dir(staged.join("sub")).unwrap();
        std::fs::write(staged.join("sub/a.txt"), b"abc").unwrap();
        let published = store.publish("k", &staged).unwrap();
        assert!(!staged.exists());
        let found = store.lookup("k").unwrap().unwrap();
        assert_eq!(found.digest, published.digest);
        assert_eq!(found.manifest.files[0].path, "sub/a.txt");
        assert_eq!(found.manifest.bytes(), 3);
        assert_eq!(store.keys().unwrap(), ["k"]);
        store.remove("k").unwrap();
        assert!(store.lookup("k").unwrap().is_none());
    }
}
