//! HMAC keys: where they come from, how they are checked, and the workspace key a new user
//! gets on a first run. A key's bytes never leave this module except into the HMAC; what
//! other code sees is its id (a keyed hash, safe to print) and its source.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

pub const DEFAULT_KEY_ENV: &str = "FINETUNE_HMAC_KEY";
/// The generated key, relative to the workspace: outside `artifacts/`, which it signs.
pub const WORKSPACE_KEY: &str = ".finetune/hmac.key";
/// Shorter keys are refused: an HMAC is only as strong as its key.
const MIN_KEY_BYTES: usize = 16;
/// A key of fewer different bytes is a word or a pattern, not a random key (a hex key of 16
/// bytes or more has about 10 of the 16 digits in practice, nearly always 8 or more).
const MIN_DISTINCT_BYTES: usize = 6;
/// Variables the system or the shell set, whose values are known to anyone: never a key.
const WELL_KNOWN_VARIABLES: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "PWD",
    "OLDPWD",
    "TERM",
    "LANG",
    "LANGUAGE",
    "HOSTNAME",
    "HOST",
    "TMPDIR",
    "TMP",
    "TEMP",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "DISPLAY",
    "MAIL",
    "SHLVL",
    "TZ",
    "CI",
    "MANPATH",
    "INFOPATH",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "CARGO_HOME",
    "RUSTUP_HOME",
    "_",
];
/// Prefixes of the same kind: locale, desktop, loader variables.
const WELL_KNOWN_PREFIXES: &[&str] = &["LC_", "XDG_", "LD_", "DYLD_", "SSH_", "GIT_"];

fn distinct_bytes(bytes: &[u8]) -> usize {
    let mut seen = [false; 256];
    bytes.iter().for_each(|&b| seen[usize::from(b)] = true);
    seen.iter().filter(|&&s| s).count()
}

/// Whether `name` may hold a key: an environment variable's name, and none the system sets.
pub fn check_key_variable(name: &str) -> Result<(), KeyError> {
    let why = if name.is_empty()
        || name.starts_with(|c: char| c.is_ascii_digit())
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        Some("it is not an environment variable name (letters, digits and `_`)")
    } else if WELL_KNOWN_VARIABLES.contains(&name)
        || WELL_KNOWN_PREFIXES.iter().any(|p| name.starts_with(p))
    {
        Some("it is a well-known variable whose value is no secret")
    } else {
        None
    };
    match why {
        Some(why) => Err(KeyError::NotAKeyVariable {
            name: name.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// Where a fingerprinting stage takes its key from (`with:` of `fingerprint`, `train`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The environment variable that holds the key (its bytes, at least 16).
    #[serde(default = "default_key_env")]
    pub key_env: String,
    /// A file that holds the key, readable by its owner only; used instead of `key_env`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

fn default_key_env() -> String {
    DEFAULT_KEY_ENV.to_string()
}

impl Default for KeyConfig {
    fn default() -> Self {
        KeyConfig {
            key_env: default_key_env(),
            key_file: None,
        }
    }
}

/// Where a key came from. Recorded beside a MAC (never the key) so that `verify` looks in the
/// same place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KeySource {
    Env {
        name: String,
    },
    File {
        path: PathBuf,
    },
    /// The generated workspace key; `path` is relative to the workspace.
    Workspace {
        path: PathBuf,
    },
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Env { name } => write!(f, "environment variable {name}"),
            KeySource::File { path } => write!(f, "key file {}", path.display()),
            KeySource::Workspace { path } => write!(f, "workspace key {}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no HMAC key: {origin} {}", if matches!(origin, KeySource::Env { .. }) { "is not set" } else { "does not exist" })]
    Missing { origin: KeySource },
    #[error(
        "the HMAC key in {origin} is too short ({len} bytes); use at least {MIN_KEY_BYTES} random bytes, e.g. `openssl rand -hex 32`"
    )]
    TooShort { origin: KeySource, len: usize },
    #[error(
        "key file {} is readable by group or others (mode {mode:o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "`{name}` cannot hold an HMAC key: {why}; name a variable of your own, e.g. FINETUNE_HMAC_KEY"
    )]
    NotAKeyVariable { name: String, why: &'static str },
    #[error(
        "the HMAC key in {origin} does not look random (only {distinct} different bytes); use random bytes, e.g. `openssl rand -hex 32`"
    )]
    NotRandom { origin: KeySource, distinct: usize },
    #[error("cannot read key file {}: {err}", path.display())]
    Unreadable { path: PathBuf, err: std::io::Error },
    #[error("cannot create the workspace key {}: {err}", path.display())]
    Create { path: PathBuf, err: std::io::Error },
}

/// A loaded HMAC-SHA256 key. `Debug` shows its id and source only; the bytes are wiped on drop.
pub struct SigningKey {
    id: String,
    source: KeySource,
    secret: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SigningKey {{ id: {}, source: {} }}",
            self.id, self.source
        )
    }
}

impl SigningKey {
    fn new(secret: Vec<u8>, source: KeySource) -> Result<SigningKey, KeyError> {
        let secret = Zeroizing::new(secret);
        if secret.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort {
                origin: source,
                len: secret.len(),
            });
        }
        let distinct = distinct_bytes(&secret);
        if distinct < MIN_DISTINCT_BYTES {
            return Err(KeyError::NotRandom {
                origin: source,
                distinct,
            });
        }
        let mut key = SigningKey {
            id: String::new(),
            source,
            secret,
        };
        // A keyed hash names the key without revealing anything about it.
        key.id = key.sign(b"finetune key id v1")[..16].to_string();
        Ok(key)
    }

    /// A short name for the key, for rotation: the same key always has the same id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    fn hmac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length, so this cannot fail.
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC accepts any key length")
    }

    /// HMAC-SHA256 of `message`, as lowercase hex.
    pub fn sign(&self, message: &[u8]) -> String {
        let mut mac = self.hmac();
        mac.update(message);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `mac_hex` is the HMAC of `message`, compared in constant time.
    pub fn verify(&self, message: &[u8], mac_hex: &str) -> bool {
        let Ok(expected) = hex::decode(mac_hex) else {
            return false;
        };
        let mut mac = self.hmac();
        mac.update(message);
        mac.verify_slice(&expected).is_ok()
    }
}

impl KeyConfig {
    /// The key this config names: `key_file` if set, else `key_env` if set; `None` when the
    /// user configured no key (the caller decides whether the workspace key will do).
    pub fn configured(&self, workspace: &Path) -> Result<Option<SigningKey>, KeyError> {
        check_key_variable(&self.key_env)?;
        let source = match &self.key_file {
            Some(path) => KeySource::File { path: path.clone() },
            None if std::env::var_os(&self.key_env).is_some() => KeySource::Env {
                name: self.key_env.clone(),
            },
            None => return Ok(None),
        };
        load(&source, workspace).map(Some)
    }

    /// The param a key problem is reported at: `key_file` when given, else `key_env`.
    pub fn param(&self) -> &'static str {
        if self.key_file.is_some() {
            "key_file"
        } else {
            "key_env"
        }
    }
}

/// Loads the key from `source` (relative paths are relative to `workspace`).
pub fn load(source: &KeySource, workspace: &Path) -> Result<SigningKey, KeyError> {
    match source {
        KeySource::Env { name } => {
            match check_key_variable(name).map(|()| std::env::var_os(name))? {
                Some(value) => SigningKey::new(value.into_encoded_bytes(), source.clone()),
                None => Err(KeyError::Missing {
                    origin: source.clone(),
                }),
            }
        }
        KeySource::File { path } | KeySource::Workspace { path } => {
            let secret = read_key_file(&workspace.join(path), source)?;
            SigningKey::new(secret, source.clone())
        }
    }
}

fn read_key_file(path: &Path, source: &KeySource) -> Result<Vec<u8>, KeyError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyError::Missing {
                origin: source.clone(),
            });
        }
        Err(err) => {
            return Err(KeyError::Unreadable {
                path: path.to_path_buf(),
                err,
            });
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|err| KeyError::Unreadable {
        path: path.to_path_buf(),
        err,
    })?);
    Ok(bytes.trim_ascii().to_vec())
}

/// The workspace key, generated (32 random bytes, hex) into a 0600 file on first use when
/// `create` is set. Returns the key and whether this call created it.
pub fn workspace_key(workspace: &Path, create: bool) -> Result<(SigningKey, bool), KeyError> {
    let source = KeySource::Workspace {
        path: PathBuf::from(WORKSPACE_KEY),
    };
    match load(&source, workspace) {
        Err(KeyError::Missing { .. }) if create => {}
        other => return other.map(|key| (key, false)),
    }
    let path = workspace.join(WORKSPACE_KEY);
    let created = create_key_file(&path).map_err(|err| KeyError::Create {
        path: path.clone(),
        err,
    })?;
    Ok((load(&source, workspace)?, created))
}

/// Writes a new random key to `path` unless another process just did (then `Ok(false)`).
fn create_key_file(path: &Path) -> std::io::Result<bool> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // The directory ignores itself, so the key can never be committed by accident.
    let ignore = dir.join(".gitignore");
    if !ignore.exists() {
        std::fs::write(&ignore, "*\n")?;
    }
    let mut secret = Zeroizing::new([0u8; 32]);
    getrandom::fill(secret.as_mut_slice()).map_err(|err| std::io::Error::other(err.to_string()))?;
    let text = Zeroizing::new(hex::encode(secret.as_slice()));
    // Written whole under a name of this call's own, then linked into place: a reader (or a
    // crash) never finds the key file empty or half written, and of two processes (or
    // threads) creating it at once exactly one link succeeds.
    let mut unique = [0u8; 8];
    getrandom::fill(&mut unique).map_err(|err| std::io::Error::other(err.to_string()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("key");
    let temp = dir.join(format!(".{name}.{}.tmp", hex::encode(unique)));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        match std::fs::hard_link(&temp, path) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(err) => Err(err),
        }
    })();
    let _ = std::fs::remove_file(&temp);
    let created = written?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(created)
}
