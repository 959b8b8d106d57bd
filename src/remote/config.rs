//! Which remote a command uses: `--remote`, else `FINETUNE_REMOTE`, else the default of the
//! workspace's `.finetune/config.toml` (committed, so that every clone shares it):
//!
//! ```toml
//! default_remote = "team"
//!
//! [remotes]
//! team = "s3://ml-cache/finetune"
//! nfs = "/mnt/team-cache"
//! ```
//!
//! `--remote` and `FINETUNE_REMOTE` take a name from that file or a URL.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::workspace::Workspace;

pub const CONFIG_FILE: &str = ".finetune/config.toml";
pub const REMOTE_ENV: &str = "FINETUNE_REMOTE";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    default_remote: Option<String>,
    #[serde(default)]
    remotes: BTreeMap<String, String>,
}

/// A remote as chosen: its URL and where the choice came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub url: String,
    pub origin: String,
}

/// The remote to use, if any is given or configured. `flag` is `--remote`.
pub fn choose(workspace: &Workspace, flag: Option<&str>) -> Result<Option<Chosen>> {
    let config_path = workspace.root.join(CONFIG_FILE);
    let config = load(&config_path)?;
    let named = |name: &str, origin: String| -> Chosen {
        match config.remotes.get(name) {
            Some(url) => Chosen {
                url: url.clone(),
                origin: format!("remote `{name}` of {CONFIG_FILE}, via {origin}"),
            },
            None => Chosen {
                url: name.to_string(),
                origin,
            },
        }
    };
    if let Some(flag) = flag {
        return Ok(Some(named(flag, "--remote".into())));
    }
    if let Some(value) = std::env::var(REMOTE_ENV).ok().filter(|v| !v.is_empty()) {
        return Ok(Some(named(&value, REMOTE_ENV.into())));
    }
    let default = match (&config.default_remote, config.remotes.len()) {
        (Some(name), _) => name.clone(),
        (None, 1) => config.remotes.keys().next().cloned().unwrap_or_default(),
        (None, _) => return Ok(None),
    };
    let Some(url) = config.remotes.get(&default) else {
        bail!(
            "{}: default_remote = \"{default}\" names no remote in [remotes] (there: {})",
            config_path.display(),
            config
                .remotes
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    Ok(Some(Chosen {
        url: url.clone(),
        origin: format!("remote `{default}` of {CONFIG_FILE}"),
    }))
}

/// Like [`choose`], for a command that cannot work without a remote.
pub fn require(workspace: &Workspace, flag: Option<&str>) -> Result<Chosen> {
    choose(workspace, flag)?.with_context(|| {
        format!(
            "no remote: give --remote URL, set {REMOTE_ENV}, or name one in {CONFIG_FILE} \
             ([remotes] team = \"s3://bucket/prefix\", default_remote = \"team\")"
        )
    })
}

fn load(path: &Path) -> Result<Config> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    toml::from_str(&text).map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))
}
