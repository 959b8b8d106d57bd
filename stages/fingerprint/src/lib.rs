//! The `fingerprint` stage: an HMAC-SHA256 over everything the stages it `needs` produced
//! (checkpoints, logs, metrics, reports), their params and cache keys, the fingerprints they
//! carry themselves, and the environment that made them. It writes `fingerprint.json`;
//! `finetune verify` recomputes it. The primitives live in `finetune_core::integrity`.
//!
//! The key comes from `key_file`, else the environment variable `key_env`; with neither, the
//! workspace key (`.finetune/hmac.key`, created on first use, mode 0600) signs, and the run
//! says so.

mod environment;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use finetune_core::integrity::{
    self, Covered, FINGERPRINT_FILE, KeyConfig, SigningKey, WORKSPACE_KEY,
};
use finetune_core::schemars;
use finetune_core::{
    ConfigError, ConfigureContext, Job, RunContext, Stage, Upstream, Value, parse_params,
    schema_for,
};
use serde_json::json;

pub struct Fingerprint;

/// `with:` of a `fingerprint` stage: where its key comes from (`key_env`, `key_file`).
pub type FingerprintParams = KeyConfig;

impl Stage for Fingerprint {
    fn name(&self) -> &'static str {
        "fingerprint"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "HMAC-SHA256 over the outputs of the stages it needs; `finetune verify` checks it"
    }

    fn params_schema(&self) -> schemars::Schema {
        schema_for::<FingerprintParams>()
    }

    fn configure(&self, with: &Value, ctx: &ConfigureContext) -> Result<Box<dyn Job>, ConfigError> {
        let params: FingerprintParams = parse_params(with)?;
        if ctx.upstream.is_empty() {
            return Err(ConfigError::needs(format!(
                "stage `{}` signs the outputs of the stages it needs; list them in `needs:`",
                ctx.stage
            )));
        }
        // Loaded once: a bad key fails here, before any stage runs, and the key that signs is
        // the one whose id is in the cache key. None means the workspace key.
        let configured = params
            .configured(&ctx.workspace)
            .map_err(|err| ConfigError::at(params.param(), err.to_string()))?;
        Ok(Box::new(FingerprintJob {
            params: with.clone(),
            key_env: params.key_env,
            configured,
        }))
    }
}

struct FingerprintJob {
    params: Value,
    /// The variable a user would set, for the notice when the workspace key is created.
    key_env: String,
    /// The configured key; `None` when the workspace key will sign.
    configured: Option<SigningKey>,
}

impl Job for FingerprintJob {
    fn reads(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Another key means another fingerprint. The workspace key is named by its place, not
    /// its id: it may not exist yet, and its first run must not make the next one rerun.
    fn key_extra(&self) -> Option<Value> {
        Some(match &self.configured {
            Some(key) => json!({ "key_id": key.id() }),
            None => json!({ "key": WORKSPACE_KEY }),
        })
    }

    fn run(&self, ctx: &RunContext) -> Result<()> {
        let workspace_key;
        let key = match &self.configured {
            Some(key) => key,
            None => {
                workspace_key = self.workspace_key(ctx)?;
                &workspace_key
            }
        };
        ctx.reporter.message("hashing the outputs it covers");
        let mut covers = vec![(Covered::home(), ctx.out_dir.clone())];
        for upstream in &ctx.upstream {
            covers.push((covered(upstream)?, upstream.dir.clone()));
        }
        let context = json!({
            "stage": ctx.stage,
            "uses": "fingerprint",
            "params": self.params,
            "cache_key": ctx.cache_key,
            "upstream": ctx.upstream.iter().map(upstream_record).collect::<Result<Vec<_>>>()?,
            "environment": environment::describe(&ctx.workspace),
        });
        let fingerprint = integrity::sign(covers, context, key)?;
        let files = fingerprint.manifest.files.len();
        finetune_core::output::write_json(&ctx.out_dir.join(FINGERPRINT_FILE), &fingerprint)?;
        ctx.reporter.message(&format!(
            "signed {files} files with key id {} ({})",
            key.id(),
            key.source()
        ));
        Ok(())
    }
}

impl FingerprintJob {
    /// The workspace key, created (and announced) on first use.
    fn workspace_key(&self, ctx: &RunContext) -> Result<SigningKey> {
        let (key, created) = integrity::workspace_key(&ctx.workspace, true)?;
        if created {
            ctx.reporter.notice(&format!(
                "no HMAC key configured ({} is not set): created the workspace key {} \
                 (key id {}, readable by you only). Keep it: `finetune verify` needs it. \
                 Set {} to sign with a key of your own.",
                self.key_env,
                WORKSPACE_KEY,
                key.id(),
                self.key_env
            ));
        }
        Ok(key)
    }
}

/// Upstream outputs are cache entries, siblings of this stage's own once it is published.
fn covered(upstream: &Upstream) -> Result<Covered> {
    let name = upstream
        .dir
        .file_name()
        .with_context(|| format!("odd output directory {}", upstream.dir.display()))?;
    Ok(Covered {
        name: upstream.stage.clone(),
        dir: Path::new("..").join(name).to_string_lossy().into_owned(),
    })
}

/// An upstream stage as the manifest records it, with the MAC of its own fingerprint if it
/// carries one (a `train` stage run with a key does).
fn upstream_record(upstream: &Upstream) -> Result<Value> {
    let own = upstream.dir.join(FINGERPRINT_FILE);
    let fingerprint = if own.exists() {
        let carried = integrity::read(&upstream.dir)?;
        json!({ "mac": carried.mac, "key_id": carried.manifest.key_id })
    } else {
        Value::Null
    };
    Ok(json!({
        "stage": upstream.stage,
        "uses": upstream.uses,
        "cache_key": upstream.cache_key,
        "params": upstream.params,
        "fingerprint": fingerprint,
    }))
}
