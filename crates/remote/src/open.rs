//! From a remote's URL to an object store: a directory, or S3 configured the way the AWS tools
//! are (environment variables first, then `~/.aws/credentials` and `~/.aws/config` for the
//! profile in `AWS_PROFILE`), so the same settings serve AWS, MinIO, Ceph and R2.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};

use crate::{Access, RemoteError, Result};

/// The store for `url`, the path of the remote's root inside it, and for a directory remote
/// the directory (which uploads copy into directly).
pub(crate) fn store_for(
    url: &str,
    base: &Path,
    access: Access,
) -> Result<(Arc<dyn ObjectStore>, ObjectPath, Option<PathBuf>)> {
    let bad = |why: String| RemoteError::BadUrl {
        url: url.to_string(),
        why,
    };
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket: write s3://BUCKET/PREFIX".into()));
        }
        let root = ObjectPath::parse(prefix.trim_matches('/'))
            .map_err(|err| bad(format!("the prefix is not a valid object path: {err}")))?;
        return Ok((s3(url, bucket)?, root, None));
    }
    let dir = match url.strip_prefix("file://") {
        Some(path) if Path::new(path).is_absolute() => PathBuf::from(path),
        Some(_) => return Err(bad("a file:// URL needs an absolute path".into())),
        None if url.contains("://") => {
            return Err(bad(
                "unsupported scheme; a remote is a directory, file:///DIR or s3://BUCKET/PREFIX"
                    .into(),
            ));
        }
        None => base.join(url),
    };
    let store = directory(url, &dir, access)?;
    Ok((Arc::new(store), ObjectPath::default(), Some(dir)))
}

fn directory(url: &str, dir: &Path, access: Access) -> Result<LocalFileSystem> {
    if access == Access::Write {
        std::fs::create_dir_all(dir).map_err(|source| RemoteError::Local {
            path: dir.to_path_buf(),
            source,
        })?;
    } else if !dir.is_dir() {
        return Err(RemoteError::BadUrl {
            url: url.to_string(),
            why: format!("{} is not a directory", dir.display()),
        });
    }
    LocalFileSystem::new_with_prefix(dir).map_err(|err| RemoteError::BadUrl {
        url: url.to_string(),
        why: err.to_string(),
    })
}

fn s3(url: &str, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    for (key, value) in profile_settings()? {
        builder = builder.with_config(key, value);
    }
    // An endpoint the user wrote as http:// (a MinIO or test server) is meant as such.
    let plain_http = builder
        .get_config_value(&AmazonS3ConfigKey::Endpoint)
        .is_some_and(|endpoint| endpoint.starts_with("http://"));
    if plain_http && std::env::var_os("AWS_ALLOW_HTTP").is_none() {
        builder = builder.with_allow_http(true);
    }
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(120),
    };
    let store = builder
        .with_retry(retry)
        .build()
        .map_err(|err| RemoteError::BadUrl {
            url: url.to_string(),
            why: err.to_string(),
        })?;
    Ok(Arc::new(store))
}

/// The settings the AWS config and credentials files give the current profile, for each
/// setting no environment variable gives (the environment wins, as with the AWS CLI).
fn profile_settings() -> Result<Vec<(AmazonS3ConfigKey, String)>> {
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let file_from = |var: &str, name: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
    };
    // (file, section, its key, our key, the environment variables that take precedence)
    let config_section = if profile == "default" {
        profile.clone()
    } else {
        format!("profile {profile}")
    };
    let sources = [
        (
            file_from("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            profile.as_str(),
        ),
        (
            file_from("AWS_CONFIG_FILE", "config"),
            config_section.as_str(),
        ),
    ];
    let wanted: [(&str, AmazonS3ConfigKey, &[&str]); 5] = [
        (
            "aws_access_key_id",
            AmazonS3ConfigKey::AccessKeyId,
            &["AWS_ACCESS_KEY_ID"],
        ),
        (
            "aws_secret_access_key",
            AmazonS3ConfigKey::SecretAccessKey,
            &["AWS_SECRET_ACCESS_KEY"],
        ),
        (
            "aws_session_token",
            AmazonS3ConfigKey::Token,
            &["AWS_SESSION_TOKEN"],
        ),
        (
            "region",
            AmazonS3ConfigKey::Region,
            &["AWS_REGION", "AWS_DEFAULT_REGION"],
        ),
        (
            "endpoint_url",
            AmazonS3ConfigKey::Endpoint,
            &["AWS_ENDPOINT_URL", "AWS_ENDPOINT"],
        ),
    ];
    let mut settings: Vec<(AmazonS3ConfigKey, String)> = Vec::new();
    for (file, section) in sources {
        let Some(file) = file.filter(|f| f.is_file()) else {
            continue;
        };
        let ini = ini::Ini::load_from_file(&file).map_err(|err| RemoteError::AwsConfig {
            path: file.clone(),
            why: err.to_string(),
        })?;
        let Some(values) = ini.section(Some(section)) else {
            continue;
        };
        for (name, key, env) in &wanted {
            let set_by_env = env.iter().any(|var| std::env::var_os(var).is_some());
            let known = settings.iter().any(|(k, _)| k == key);
            if let Some(value) = values.get(name).filter(|_| !set_by_env && !known) {
                settings.push((*key, value.trim().to_string()));
            }
        }
    }
    Ok(settings)
}
