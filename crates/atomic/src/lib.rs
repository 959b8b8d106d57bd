//! Writing a file so that a reader, or the next run after a crash, sees the old contents or
//! the new ones, never half of them: the one write policy of the cache, the stages' results
//! and the model files.
//!
//! The bytes go to a temporary file beside the target (same directory, so the rename cannot
//! cross file systems), which is flushed to disk before it is renamed over the target; the
//! directory is then flushed so that the rename itself survives a power cut. A failure at any
//! point removes the temporary file and leaves the target as it was.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically and durably.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(path, |temp| {
        let mut file = File::create(temp)?;
        file.write_all(bytes)
    })
}

/// Has `fill` write the file's contents to the temporary path it is given (for writers that
/// stream to a path of their own), then publishes it at `path` as [`write`] does.
pub fn write_with<E: From<io::Error>>(
    path: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let temp = temporary_path(path);
    let result = fill(&temp).and_then(|()| publish(&temp, path).map_err(E::from));
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// `.NAME.PID.tmp` beside `path`: hidden, and unique to this process, so that two runs that
/// write the same file do not write into each other's temporary file.
fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    parent(path).join(format!(".{name}.{}.tmp", std::process::id()))
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Flushes `temp`, renames it to `path` and flushes the directory's entries.
fn publish(temp: &Path, path: &Path) -> io::Result<()> {
    File::open(temp)?.sync_all()?;
    std::fs::rename(temp, path)?;
    File::open(parent(path))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("result.json");
        write(&path, b"old").unwrap();
        write(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("result.json")]);
    }

    #[test]
    fn a_failed_fill_keeps_the_old_file_and_removes_the_partial_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write(&path, b"good").unwrap();
        let failed = write_with(&path, |temp| {
            std::fs::write(temp, b"half")?;
            Err(io::Error::other("the disk filled up"))
        });
        assert_eq!(failed.unwrap_err().to_string(), "the disk filled up");
        assert_eq!(std::fs::read(&path).unwrap(), b"good");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_missing_directory_is_an_error_that_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent/result.json");
        assert!(write(&path, b"x").is_err());
        assert!(!path.exists());
    }
}
