//! Moving one blob: upload (one request, or a multipart upload for a large file), download
//! with the digest checked as the bytes arrive, and retries with backoff for what may pass.

use std::future::Future;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use object_store::{GetResultPayload, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::{BlobFile, Remote, RemoteError, Result};

/// Told of the bytes and files moved, for a progress bar.
pub trait Progress: Send + Sync {
    /// A transfer of `files` files, `bytes` bytes in all, begins.
    fn begin(&self, files: usize, bytes: u64);
    fn advance(&self, bytes: u64);
    fn file_done(&self);
}

/// Files up to this size go up in one request; larger ones in parts of this size, so memory
/// stays bounded by the number of transfers, not the size of a model.
const PART_BYTES: usize = 32 << 20;
/// Attempts of a download that failed for a reason that may pass: the S3 client retries each
/// request that fails to start, but not a body cut off midway.
const ATTEMPTS: u32 = 4;

/// A download fails at the remote (maybe transiently) or on the local disk (not retried).
enum FetchError {
    Remote(object_store::Error),
    Local(std::io::Error),
}

impl FetchError {
    /// Whether trying again may help: a remote failure of the generic kind (a connection
    /// dropped midway), not a missing object, a refusal or the local disk.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            FetchError::Remote(
                object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
            )
        )
    }
}

impl From<object_store::Error> for FetchError {
    fn from(err: object_store::Error) -> Self {
        FetchError::Remote(err)
    }
}

/// Runs `op` again after a growing pause while it fails transiently.
async fn retrying<T, F, Fut>(mut op: F) -> std::result::Result<T, FetchError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, FetchError>>,
{
    let mut pause = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match op().await {
            Err(err) if attempt < ATTEMPTS && err.is_transient() => {
                tokio::time::sleep(pause).await;
                pause *= 4;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Uploads `file` unless the remote has a blob of its digest and size. Returns whether it
/// uploaded.
pub(crate) async fn upload_one(
    remote: &Remote,
    file: &BlobFile,
    progress: &dyn Progress,
) -> Result<bool> {
    let location = remote.blob_path(&file.sha256)?;
    match remote.store.head(&location).await {
        Ok(meta) if meta.size == file.size => {
            progress.advance(file.size);
            progress.file_done();
            return Ok(false);
        }
        Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
        Err(source) => return Err(remote.store_error("look up", &location, source)),
    }
    let local_error = |source| RemoteError::Local {
        path: file.path.clone(),
        source,
    };
    if let Some(dir) = &remote.directory {
        copy_into(&dir.join(location.as_ref()), &file.path).map_err(local_error)?;
        progress.advance(file.size);
    } else if file.size <= PART_BYTES as u64 {
        let bytes = bytes::Bytes::from(std::fs::read(&file.path).map_err(local_error)?);
        remote
            .store
            .put(&location, PutPayload::from(bytes))
            .await
            .map_err(|source| remote.store_error("write", &location, source))?;
        progress.advance(file.size);
    } else {
        upload_in_parts(remote, file, &location, progress).await?;
    }
    progress.file_done();
    Ok(true)
}

/// Copies `from` to `to` through a temporary file beside it and one rename, so that a reader
/// sees no blob or a whole one; a blob already there is replaced by the same bytes.
fn copy_into(to: &Path, from: &Path) -> std::io::Result<()> {
    static COPIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let parent = to.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = to.file_name().unwrap_or_default().to_string_lossy();
    let temp = parent.join(format!(".{name}.{}.{n}.part", std::process::id()));
    let copied = std::fs::copy(from, &temp).and_then(|_| std::fs::rename(&temp, to));
    if copied.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    copied
}

async fn upload_in_parts(
    remote: &Remote,
    file: &BlobFile,
    location: &object_store::path::Path,
    progress: &dyn Progress,
) -> Result<()> {
    let write_error = |source| remote.store_error("write", location, source);
    let local_error = |source| RemoteError::Local {
        path: file.path.clone(),
        source,
    };
    let upload = remote
        .store
        .put_multipart(location)
        .await
        .map_err(write_error)?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let mut reader = std::fs::File::open(&file.path).map_err(local_error)?;
    let mut part = vec![0u8; PART_BYTES];
    loop {
        let read = read_full(&mut reader, &mut part).map_err(local_error)?;
        if read == 0 {
            break;
        }
        if let Err(err) = writer.wait_for_capacity(2).await {
            writer.abort().await.ok();
            return Err(write_error(err));
        }
        writer.write(&part[..read]);
        progress.advance(read as u64);
    }
    writer.finish().await.map_err(write_error)?;
    Ok(())
}

/// Fills `buf` as far as the file allows; 0 at its end.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Downloads the blob of `file` to `file.path`, refusing it unless its size and SHA-256 are
/// the ones it is named by. A blob that fails its digest is deleted from the remote (if the
/// credentials allow): it is provably not what its name says, and the next push replaces it.
pub(crate) async fn download_one(
    remote: &Remote,
    file: &BlobFile,
    progress: &dyn Progress,
) -> Result<()> {
    let location = remote.blob_path(&file.sha256)?;
    let fetched = retrying(|| fetch(remote, &location, &file.path)).await;
    let (size, digest) = match fetched {
        Ok(got) => got,
        Err(FetchError::Local(source)) => {
            return Err(RemoteError::Local {
                path: file.path.clone(),
                source,
            });
        }
        Err(FetchError::Remote(source)) => {
            return Err(remote.store_error("read", &location, source));
        }
    };
    let why = if size != file.size {
        Some(format!("{size} bytes, where {} were expected", file.size))
    } else if digest != file.sha256 {
        Some(format!("its content hashes to {digest}"))
    } else {
        None
    };
    if let Some(why) = why {
        let _ = std::fs::remove_file(&file.path);
        if size == file.size {
            let _ = remote.store.delete(&location).await;
        }
        return Err(RemoteError::Corrupt {
            remote: remote.url.clone(),
            object: location.to_string(),
            why,
        });
    }
    progress.advance(size);
    progress.file_done();
    Ok(())
}

/// One attempt: the blob at `location` written to `dest`, with its size and SHA-256.
async fn fetch(
    remote: &Remote,
    location: &object_store::path::Path,
    dest: &Path,
) -> std::result::Result<(u64, String), FetchError> {
    let local = FetchError::Local;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(local)?;
    }
    let mut out = std::fs::File::create(dest).map_err(local)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let result = remote.store.get(location).await?;
    match result.payload {
        // A directory remote: read the file straight, not in the stream's small chunks.
        GetResultPayload::File(mut file, _) => {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let read = read_full(&mut file, &mut buf).map_err(local)?;
                if read == 0 {
                    break;
                }
                hasher.update(&buf[..read]);
                out.write_all(&buf[..read]).map_err(local)?;
                size += read as u64;
            }
        }
        GetResultPayload::Stream(mut stream) => {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                out.write_all(&chunk).map_err(local)?;
                size += chunk.len() as u64;
            }
        }
    }
    out.flush().map_err(local)?;
    Ok((size, hex::encode(hasher.finalize())))
}
