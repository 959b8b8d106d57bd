//! Integrity fingerprints: an HMAC-SHA256 over a canonical manifest (every covered file's
//! relative path, size and SHA-256, plus whatever context the signer adds), kept as
//! `fingerprint.json` in the directory it signs or beside the directories it covers.
//!
//! An HMAC proves to those who hold the key that nothing changed since it was made. It proves
//! nothing to anyone else about who made it: every key holder can sign. For authorship to the
//! public, sign with a private key (minisign, sigstore) on top.

mod key;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use key::{
    DEFAULT_KEY_ENV, KeyConfig, KeyError, KeySource, SigningKey, WORKSPACE_KEY, load, workspace_key,
};

use crate::digest::{canonical_json, sha256_file};
use crate::output::{ENGINE_MANIFEST, list_files, write_json};

pub const FINGERPRINT_FILE: &str = "fingerprint.json";
pub const SCHEMA: u32 = 1;
const ALGORITHM: &str = "HMAC-SHA256";
/// Prefixed to the signed bytes, so a MAC made for something else never verifies as this.
const DOMAIN: &[u8] = b"finetune fingerprint v1\n";

/// One covered file. `path` starts with the covered directory's name (none for `.`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// A directory the fingerprint covers, relative to the directory of `fingerprint.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Covered {
    /// The prefix of its files' paths in the manifest (a stage id), or `.` for the
    /// fingerprint's own directory.
    pub name: String,
    pub dir: String,
}

/// What the MAC is computed over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub key_id: String,
    pub covers: Vec<Covered>,
    pub files: Vec<FileRecord>,
    /// Signed, not checked against the disk: params, cache keys, environment.
    pub context: Value,
}

/// The content of `fingerprint.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fingerprint {
    pub algorithm: String,
    /// Where the key came from (a hint for `verify`, not signed: the key id is).
    pub key_source: KeySource,
    pub manifest: Manifest,
    pub mac: String,
}

impl Manifest {
    fn signed_bytes(&self) -> Result<Vec<u8>> {
        let value = serde_json::to_value(self)?;
        Ok([DOMAIN, canonical_json(&value).as_bytes()].concat())
    }
}

/// Hashes each covered directory (found now at the path paired with it; its `dir` is where
/// `verify` will look, relative to `fingerprint.json`) and signs the manifest. A directory
/// covered as `.` is the fingerprint's own: its `fingerprint.json` is left out.
pub fn sign(
    covers: Vec<(Covered, PathBuf)>,
    context: Value,
    key: &SigningKey,
) -> Result<Fingerprint> {
    let mut files = Vec::new();
    for (covered, now_at) in &covers {
        files.extend(hash_covered(now_at, covered)?);
    }
    let manifest = Manifest {
        schema: SCHEMA,
        key_id: key.id().to_string(),
        covers: covers.into_iter().map(|(covered, _)| covered).collect(),
        files,
        context,
    };
    let mac = key.sign(&manifest.signed_bytes()?);
    Ok(Fingerprint {
        algorithm: ALGORITHM.to_string(),
        key_source: key.source().clone(),
        manifest,
        mac,
    })
}

/// Signs everything under `dir` into `dir/fingerprint.json` (a checkpoint, a stage output).
pub fn sign_dir(dir: &Path, context: Value, key: &SigningKey) -> Result<()> {
    let fingerprint = sign(vec![(Covered::home(), dir.to_path_buf())], context, key)?;
    write_json(&dir.join(FINGERPRINT_FILE), &fingerprint)
}

impl Covered {
    /// The directory `fingerprint.json` is in.
    pub fn home() -> Covered {
        Covered {
            name: ".".into(),
            dir: ".".into(),
        }
    }
}

/// Every file of one covered directory (now at `dir`), with manifest paths.
fn hash_covered(dir: &Path, covered: &Covered) -> Result<Vec<FileRecord>> {
    let mut records = Vec::new();
    for relative in list_files(dir)? {
        if relative == Path::new(ENGINE_MANIFEST)
            || (covered.dir == "." && relative == Path::new(FINGERPRINT_FILE))
        {
            continue;
        }
        let path = dir.join(&relative);
        let (size, sha256) =
            sha256_file(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let relative = relative
            .to_str()
            .with_context(|| format!("file name is not UTF-8: {}", path.display()))?;
        let path = if covered.name == "." {
            relative.to_string()
        } else {
            format!("{}/{relative}", covered.name)
        };
        records.push(FileRecord { path, size, sha256 });
    }
    Ok(records)
}

pub fn read(dir: &Path) -> Result<Fingerprint> {
    let path = dir.join(FINGERPRINT_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
}

/// Why a fingerprint cannot be checked at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error(
        "wrong key: {} was made with key id {expected}, but {origin} has key id {actual}",
        fingerprint.display()
    )]
    WrongKey {
        fingerprint: PathBuf,
        expected: String,
        actual: String,
        origin: KeySource,
    },
    #[error(
        "{} names its own key ({origin}): a fingerprint cannot choose the key that vouches for \
         it; verify with --key-file or --key-env naming the key you trust",
        fingerprint.display()
    )]
    UntrustedKey {
        fingerprint: PathBuf,
        origin: KeySource,
    },
    #[error(transparent)]
    Unreadable(#[from] anyhow::Error),
}

/// One difference between a fingerprint and the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// `fingerprint.json` no longer matches its own MAC: its file list cannot be trusted.
    Tampered,
    Changed {
        path: String,
        detail: String,
    },
    Missing {
        path: String,
    },
    Extra {
        path: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Tampered => write!(
                f,
                "altered  {FINGERPRINT_FILE} (its manifest does not match its MAC)"
            ),
            Problem::Changed { path, detail } => write!(f, "changed  {path} ({detail})"),
            Problem::Missing { path } => write!(f, "missing  {path}"),
            Problem::Extra { path } => write!(f, "extra    {path}"),
        }
    }
}

/// The result of checking one fingerprint.
#[derive(Debug)]
pub struct Verification {
    pub key_id: String,
    pub files: usize,
    pub problems: Vec<Problem>,
}

impl Verification {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks `dir/fingerprint.json` with `key` when given (`--key-env`, `--key-file`), else with
/// the key its `key_source` names, as a hint that only the verifier's own sources satisfy: an
/// environment variable (the verifier's environment, which the files under test cannot set)
/// or the workspace key. A key file it names is refused: whoever can rewrite the fingerprint
/// can write a key file beside it.
pub fn verify(
    dir: &Path,
    workspace: &Path,
    key: Option<&SigningKey>,
) -> Result<Verification, VerifyError> {
    let fingerprint = read(dir)?;
    let loaded;
    let key = match key {
        Some(key) => key,
        None => {
            if !is_verifiers_own(&fingerprint.key_source) {
                return Err(VerifyError::UntrustedKey {
                    fingerprint: dir.join(FINGERPRINT_FILE),
                    origin: fingerprint.key_source.clone(),
                });
            }
            loaded = load(&fingerprint.key_source, workspace)?;
            &loaded
        }
    };
    if key.id() != fingerprint.manifest.key_id {
        return Err(VerifyError::WrongKey {
            fingerprint: dir.join(FINGERPRINT_FILE),
            expected: fingerprint.manifest.key_id.clone(),
            actual: key.id().to_string(),
            origin: key.source().clone(),
        });
    }
    let manifest = &fingerprint.manifest;
    if !key.verify(&manifest.signed_bytes()?, &fingerprint.mac) {
        // Nothing in an altered file is followed: its `covers` could point anywhere.
        return Ok(Verification {
            key_id: manifest.key_id.clone(),
            files: manifest.files.len(),
            problems: vec![Problem::Tampered],
        });
    }
    let mut now = Vec::new();
    for covered in &manifest.covers {
        now.extend(hash_covered(&inside(workspace, dir, covered)?, covered)?);
    }
    let problems = compare(&manifest.files, &now);
    Ok(Verification {
        key_id: manifest.key_id.clone(),
        files: manifest.files.len(),
        problems,
    })
}

/// The directory `covered` names, refused unless it lies inside the workspace: even a
/// signed fingerprint is never a reason to read elsewhere.
fn inside(workspace: &Path, dir: &Path, covered: &Covered) -> Result<PathBuf, VerifyError> {
    let target = dir.join(&covered.dir);
    let resolve = |path: &Path| {
        std::fs::canonicalize(path).with_context(|| format!("cannot resolve {}", path.display()))
    };
    let (root, resolved) = (resolve(workspace)?, resolve(&target)?);
    if !resolved.starts_with(&root) {
        return Err(VerifyError::Unreadable(anyhow::anyhow!(
            "{} covers `{}`, which is {}, outside the workspace; refusing to read it",
            dir.join(FINGERPRINT_FILE).display(),
            covered.dir,
            resolved.display()
        )));
    }
    Ok(resolved)
}

/// Whether `source` is one the verifier holds rather than one the fingerprint could supply.
fn is_verifiers_own(source: &KeySource) -> bool {
    match source {
        KeySource::Env { .. } => true,
        KeySource::Workspace { path } => path == Path::new(WORKSPACE_KEY),
        KeySource::File { .. } => false,
    }
}

/// Changed, missing and extra files, in path order.
fn compare(signed: &[FileRecord], now: &[FileRecord]) -> Vec<Problem> {
    let now: BTreeMap<&str, &FileRecord> = now.iter().map(|r| (r.path.as_str(), r)).collect();
    let signed_paths: BTreeMap<&str, &FileRecord> =
        signed.iter().map(|r| (r.path.as_str(), r)).collect();
    let mut problems = Vec::new();
    for (path, was) in &signed_paths {
        match now.get(path) {
            None => problems.push(Problem::Missing {
                path: path.to_string(),
            }),
            Some(is) if is.size != was.size => problems.push(Problem::Changed {
                path: path.to_string(),
                detail: format!("size {} -> {}", was.size, is.size),
            }),
            Some(is) if is.sha256 != was.sha256 => problems.push(Problem::Changed {
                path: path.to_string(),
                detail: "same size, other content".into(),
            }),
            Some(_) => {}
        }
    }
    for path in now.keys().filter(|p| !signed_paths.contains_key(*p)) {
        problems.push(Problem::Extra {
            path: path.to_string(),
        });
    }
    problems
}

#[cfg(test)]
mod tests;
