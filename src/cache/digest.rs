//! Content digests of workspace files, memoised by (path, size, mtime, inode) so that a rerun
//! with nothing changed hashes nothing, and a `touch` without a content change costs one hash.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use finetune_core::output::list_files;
use serde::{Deserialize, Serialize};

pub use finetune_core::digest::{sha256_bytes, sha256_file};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    sha256: String,
}

/// The memo, kept in `artifacts/digests.json`.
#[derive(Debug, Default)]
pub struct DigestMemo {
    file: PathBuf,
    stamps: BTreeMap<PathBuf, Stamp>,
    changed: bool,
    /// Files actually hashed in this process (for `--json` and the benchmarks).
    pub hashed: u64,
}

impl DigestMemo {
    /// Loads the memo; a missing or unreadable memo is simply empty (it is only a cache).
    pub fn load(file: &Path) -> Self {
        let stamps = std::fs::read(file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        DigestMemo {
            file: file.to_path_buf(),
            stamps,
            changed: false,
            hashed: 0,
        }
    }

    /// The digest of a file, from the memo when its stamp is unchanged.
    pub fn file_digest(&mut self, path: &Path) -> Result<String> {
        let absolute = std::path::absolute(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let meta = std::fs::metadata(&absolute)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        if let Some(stamp) = self.stamps.get(&absolute)
            && stamp.size == meta.size()
            && stamp.mtime_ns == mtime_ns
            && stamp.inode == meta.ino()
        {
            return Ok(stamp.sha256.clone());
        }
        let (size, sha256) =
            sha256_file(&absolute).with_context(|| format!("cannot read {}", path.display()))?;
        self.hashed += 1;
        // A file that changed while we read it gets no stamp: the next run hashes it again.
        let after = std::fs::metadata(&absolute)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if after.size() == size
            && after.mtime() == meta.mtime()
            && after.mtime_nsec() == meta.mtime_nsec()
        {
            self.stamps.insert(
                absolute,
                Stamp {
                    size,
                    mtime_ns,
                    inode: meta.ino(),
                    sha256: sha256.clone(),
                },
            );
            self.changed = true;
        }
        Ok(sha256)
    }

    /// The digest of a file, or of a directory as the sorted list of its files' relative paths
    /// and digests.
    pub fn path_digest(&mut self, path: &Path) -> Result<String> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if !meta.is_dir() {
            return self.file_digest(path);
        }
        let mut listing = String::new();
        for relative in list_files(path)? {
            let digest = self.file_digest(&path.join(&relative))?;
            listing.push_str(&format!("{}\0{digest}\n", relative.display()));
        }
        Ok(sha256_bytes(listing.as_bytes()))
    }

    /// Writes the memo back if anything was hashed (atomically; a failure only costs speed).
    pub fn save(&self) -> Result<()> {
        if !self.changed {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&self.stamps)?;
        super::write_atomic(&self.file, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest_and_memo_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        std::fs::write(&path, b"abc").unwrap();
        let mut memo = DigestMemo::load(&dir.path().join("memo.json"));
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(memo.file_digest(&path).unwrap(), expected);
        assert_eq!(memo.file_digest(&path).unwrap(), expected);
        assert_eq!(memo.hashed, 1);
        memo.save().unwrap();
        let mut reloaded = DigestMemo::load(&dir.path().join("memo.json"));
        assert_eq!(reloaded.file_digest(&path).unwrap(), expected);
        assert_eq!(reloaded.hashed, 0);
    }

    #[test]
    fn directory_digest_covers_names_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/x"), b"1").unwrap();
        let mut memo = DigestMemo::default();
        let before = memo.path_digest(&dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/y"), b"").unwrap();
        assert_ne!(before, memo.path_digest(&dir.path().join("d")).unwrap());
    }
}
