//! Content digests of workspace files and cache entries, memoised by (path, size, mtime,
//! ctime, inode) so that a rerun with nothing changed hashes nothing, and a `touch` without a
//! content change costs one hash. The ctime is in the stamp because no user call can set it
//! back: a file rewritten and then `touch -r`'d to its old mtime is still hashed again.
//!
//! The memo is a speed-up, not a trust anchor: anyone who can write the cache can write the
//! memo too, which is why `finetune verify --cache` ignores it and rehashes everything.

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
    /// Missing in memos written before it was stamped: such stamps never match.
    #[serde(default)]
    ctime_ns: i128,
    inode: u64,
    sha256: String,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata, sha256: String) -> Stamp {
        Stamp {
            size: meta.size(),
            mtime_ns: mtime_ns(meta),
            ctime_ns: ctime_ns(meta),
            inode: meta.ino(),
            sha256,
        }
    }

    fn matches(&self, meta: &std::fs::Metadata) -> bool {
        self.size == meta.size()
            && self.mtime_ns == mtime_ns(meta)
            && self.ctime_ns == ctime_ns(meta)
            && self.inode == meta.ino()
    }
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

fn ctime_ns(meta: &std::fs::Metadata) -> i128 {
    i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec())
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
        if let Some(stamp) = self.stamps.get(&absolute)
            && stamp.matches(&meta)
        {
            return Ok(stamp.sha256.clone());
        }
        let (size, sha256) =
            sha256_file(&absolute).with_context(|| format!("cannot read {}", path.display()))?;
        self.hashed += 1;
        // A file that changed while we read it gets no stamp: the next run hashes it again.
        let after = std::fs::metadata(&absolute)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if after.size() == size && Stamp::of(&meta, String::new()).matches(&after) {
            self.stamps
                .insert(absolute, Stamp::of(&meta, sha256.clone()));
            self.changed = true;
        }
        Ok(sha256)
    }

    /// Records the digest of a file just written and hashed by this process (a published
    /// cache entry), so that the next lookup does not hash it again.
    pub fn record(&mut self, path: &Path, sha256: &str) -> Result<()> {
        let absolute = std::path::absolute(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let meta = std::fs::metadata(&absolute)
            .with_context(|| format!("cannot read {}", path.display()))?;
        self.stamps
            .insert(absolute, Stamp::of(&meta, sha256.to_string()));
        self.changed = true;
        Ok(())
    }

    /// Drops the stamps of files that no longer exist (after `gc`), so the memo does not grow
    /// with every entry ever published.
    pub fn forget_missing(&mut self) {
        let before = self.stamps.len();
        self.stamps.retain(|path, _| path.exists());
        self.changed |= self.stamps.len() != before;
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
