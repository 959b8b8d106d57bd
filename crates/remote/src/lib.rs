//! A remote cache: cache entries kept beyond one machine, so that CI runners and laptops share
//! what any one of them computed. Built on `object_store`: a directory (a local disk, an NFS
//! mount) or S3-compatible object storage (AWS, MinIO, Ceph, R2).
//!
//! Layout under the remote's root:
//! - `v1/blobs/<aa>/<sha256>`: the content of one file, named by its SHA-256, so that a file
//!   shared by many entries (or pushed by many runners) is stored once;
//! - `v1/entries/<key>.json`: an entry's manifest, the same bytes as the local one.
//!
//! A push uploads the blobs first and the manifest last, the manifest by a conditional create:
//! whoever sees a manifest sees an entry whose blobs are all there, and of two runners pushing
//! one key at once the first wins and the second finds it there. Nothing downloaded is trusted:
//! every blob is hashed as it arrives and refused unless it is the bytes its name says. What a
//! manifest means (which files make an entry) is the engine's business; here it is bytes.

mod open;
mod transfer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

pub use transfer::Progress;

/// One file of an entry: its content digest, its size, and where it is (or goes) locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobFile {
    pub sha256: String,
    pub size: u64,
    pub path: PathBuf,
}

/// What pushing an entry's manifest found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPush {
    Uploaded,
    /// The remote had the same manifest already (another runner pushed it).
    AlreadyThere,
    /// The remote has a different manifest under this key (a stage whose output varies from
    /// run to run); the first one pushed is kept.
    Differs,
}

/// An object found by listing the remote: an entry (by key) or a blob (by digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub size: u64,
    /// When it was last written, in seconds since the Unix epoch.
    pub modified_unix_s: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote `{url}`: {why}")]
    BadUrl { url: String, why: String },
    #[error("{}: {why}", path.display())]
    AwsConfig { path: PathBuf, why: String },
    /// The store's own message already holds its causes, so it is not a `source` too (which
    /// would print each cause twice).
    #[error("remote {remote}: cannot {op} {object}: {cause}")]
    Store {
        remote: String,
        op: &'static str,
        object: String,
        cause: Box<object_store::Error>,
    },
    #[error("remote {remote}: {object} is not what its name says: {why}")]
    Corrupt {
        remote: String,
        object: String,
        why: String,
    },
    #[error("{}: {source}", path.display())]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = RemoteError> = std::result::Result<T, E>;

/// Whether opening a directory remote may create the directory (a push may; a pull from a
/// mistyped path should say so instead of finding an empty remote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

pub struct Remote {
    store: Arc<dyn ObjectStore>,
    root: ObjectPath,
    url: String,
    /// A directory remote's directory: uploads copy files into it with the kernel's copy
    /// (`copy_file_range`) rather than through memory.
    directory: Option<PathBuf>,
    runtime: tokio::runtime::Runtime,
    jobs: usize,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

/// Transfers at once, by default: enough to hide an object store's per-request latency.
pub const DEFAULT_JOBS: usize = 8;

impl Remote {
    /// Opens the remote at `url`: `s3://bucket/prefix` (credentials, region and endpoint from
    /// the AWS environment variables, then the AWS config and credentials files), `file:///dir`
    /// or a directory path (relative to `base`).
    pub fn open(url: &str, base: &Path, access: Access) -> Result<Remote> {
        let (store, root, directory) = open::store_for(url, base, access)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .map_err(|source| RemoteError::Local {
                path: PathBuf::from("(the transfer threads)"),
                source,
            })?;
        Ok(Remote {
            store,
            root,
            url: url.to_string(),
            directory,
            runtime,
            jobs: DEFAULT_JOBS,
        })
    }

    /// How many transfers run at once.
    pub fn with_jobs(mut self, jobs: usize) -> Remote {
        self.jobs = jobs.max(1);
        self
    }

    /// The URL it was opened with, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The manifest pushed for `key`, if the remote has one.
    pub fn entry(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let location = self.entry_path(key)?;
        self.runtime.block_on(async {
            let got = match self.store.get(&location).await {
                Ok(result) => result.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(err) => Err(err),
            };
            got.map(|bytes| bytes.map(|b| b.to_vec()))
                .map_err(|source| self.store_error("read", &location, source))
        })
    }

    /// Which of `keys` the remote has an entry for (one request each, several at once).
    pub fn has_entries(&self, keys: &[String]) -> Result<Vec<bool>> {
        self.runtime.block_on(async {
            futures::stream::iter(keys)
                .map(|key| async move {
                    let location = self.entry_path(key)?;
                    match self.store.head(&location).await {
                        Ok(_) => Ok(true),
                        Err(object_store::Error::NotFound { .. }) => Ok(false),
                        Err(source) => Err(self.store_error("look up", &location, source)),
                    }
                })
                .buffered(self.jobs)
                .try_collect()
                .await
        })
    }

    /// Publishes `manifest` as the entry for `key`. Push the entry's blobs first.
    pub fn put_entry(&self, key: &str, manifest: &[u8]) -> Result<EntryPush> {
        let location = self.entry_path(key)?;
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(manifest));
        let create = PutOptions::from(PutMode::Create);
        let put = self
            .runtime
            .block_on(self.store.put_opts(&location, payload.clone(), create));
        match put {
            Ok(_) => Ok(EntryPush::Uploaded),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(match self.entry(key)? {
                Some(existing) if existing == manifest => EntryPush::AlreadyThere,
                _ => EntryPush::Differs,
            }),
            // A store without conditional writes: look first, then write. Two pushers racing
            // here both write a complete manifest; the last one stays.
            Err(object_store::Error::NotImplemented { .. }) => match self.entry(key)? {
                Some(existing) if existing == manifest => Ok(EntryPush::AlreadyThere),
                Some(_) => Ok(EntryPush::Differs),
                None => {
                    self.runtime
                        .block_on(self.store.put(&location, payload))
                        .map_err(|source| self.store_error("write", &location, source))?;
                    Ok(EntryPush::Uploaded)
                }
            },
            Err(source) => Err(self.store_error("write", &location, source)),
        }
    }

    /// Uploads each blob the remote lacks (or holds at another size), several at once.
    /// Returns how many were uploaded; the rest were there.
    pub fn upload(&self, files: &[BlobFile], progress: &dyn Progress) -> Result<usize> {
        progress.begin(files.len(), files.iter().map(|f| f.size).sum());
        self.runtime.block_on(async {
            let uploaded: Vec<bool> = futures::stream::iter(files)
                .map(|file| transfer::upload_one(self, file, progress))
                .buffer_unordered(self.jobs)
                .try_collect()
                .await?;
            Ok(uploaded.into_iter().filter(|&u| u).count())
        })
    }

    /// Downloads each blob to its path, hashing it as it arrives: one whose bytes are not
    /// its digest is refused (and deleted from the remote, where allowed, so that the next
    /// push replaces it).
    pub fn download(&self, files: &[BlobFile], progress: &dyn Progress) -> Result<()> {
        progress.begin(files.len(), files.iter().map(|f| f.size).sum());
        self.runtime.block_on(async {
            futures::stream::iter(files)
                .map(|file| transfer::download_one(self, file, progress))
                .buffer_unordered(self.jobs)
                .try_collect::<Vec<()>>()
                .await?;
            Ok(())
        })
    }

    /// Every entry on the remote, by key.
    pub fn entries(&self) -> Result<Vec<Listed>> {
        self.list("entries", ".json")
    }

    /// Every blob on the remote, by digest.
    pub fn blobs(&self) -> Result<Vec<Listed>> {
        self.list("blobs", "")
    }

    pub fn delete_entry(&self, key: &str) -> Result<()> {
        let location = self.entry_path(key)?;
        self.delete(&location)
    }

    pub fn delete_blob(&self, sha256: &str) -> Result<()> {
        let location = self.blob_path(sha256)?;
        self.delete(&location)
    }

    fn delete(&self, location: &ObjectPath) -> Result<()> {
        match self.runtime.block_on(self.store.delete(location)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(self.store_error("delete", location, source)),
        }
    }

    /// The objects under `v1/<kind>/` named by a digest and then `suffix`.
    fn list(&self, kind: &str, suffix: &str) -> Result<Vec<Listed>> {
        let prefix = self.area(kind);
        let metas: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(self.store.list(Some(&prefix)).try_collect())
            .map_err(|source| self.store_error("list", &prefix, source))?;
        let mut listed: Vec<Listed> = metas
            .into_iter()
            .filter_map(|meta| {
                let file = meta.location.filename()?;
                let name = file.strip_suffix(suffix).filter(|n| is_digest(n))?;
                Some(Listed {
                    name: name.to_string(),
                    size: meta.size,
                    modified_unix_s: meta.last_modified.timestamp(),
                })
            })
            .collect();
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listed)
    }

    fn entry_path(&self, key: &str) -> Result<ObjectPath> {
        self.check_name("entry key", key)?;
        Ok(self.area("entries").join(format!("{key}.json")))
    }

    fn blob_path(&self, sha256: &str) -> Result<ObjectPath> {
        self.check_name("file digest", sha256)?;
        Ok(self.area("blobs").join(&sha256[..2]).join(sha256))
    }

    /// `v1/<kind>` under the remote's root: where its entries or its blobs are.
    fn area(&self, kind: &str) -> ObjectPath {
        self.root.clone().join("v1").join(kind)
    }

    /// Names come from manifests, which may have been tampered with: only a digest can name
    /// an object, never a path.
    fn check_name(&self, what: &str, name: &str) -> Result<()> {
        if is_digest(name) {
            return Ok(());
        }
        Err(RemoteError::Corrupt {
            remote: self.url.clone(),
            object: format!("`{name}`"),
            why: format!("a {what} must be 64 lowercase hex digits"),
        })
    }

    fn store_error(
        &self,
        op: &'static str,
        location: &ObjectPath,
        cause: object_store::Error,
    ) -> RemoteError {
        RemoteError::Store {
            remote: self.url.clone(),
            op,
            object: location.to_string(),
            cause: Box::new(cause),
        }
    }
}

/// A SHA-256 in hex: how entries and blobs are named.
fn is_digest(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
