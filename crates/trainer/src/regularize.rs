//! Regularizers for fine-tuning, configured per train stage under `regularizers:`.
//!
//! - AWP: Adversarial Weight Perturbation (Wu, Xia & Wang, 2020), [`finetune_regularizers::Attack`].
//! - Mixout (Lee, Cho & Kang, 2020), [`finetune_regularizers::Mixout`].
//!
//! The algorithms live in `finetune-regularizers` (with the audit that shows they are written
//! there). This module holds what is not the algorithm: configuration, choosing a classifier's
//! parameters by name, and attaching the state to a model.

use burn::module::ParamId;
use finetune_core::ConfigError;
use finetune_core::schemars::{self, JsonSchema};
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use finetune_model::{Classifier, Part, named_parts, param_names};
use finetune_regularizers::{Attack, Mixout};

/// A regularizer's configuration that does not fit the model, or a name pattern that is not one.
#[derive(Debug, thiserror::Error)]
pub enum RegularizerError {
    #[error("`{pattern}`: {source}")]
    Pattern {
        pattern: String,
        source: globset::Error,
    },
    #[error("{0}")]
    Patterns(globset::Error),
    #[error("no parameter matches regularizers.awp.params {0:?}")]
    NoAwpTarget(Vec<String>),
    #[error("no Linear layer matches regularizers.mixout.layers {0:?}")]
    NoMixoutLayer(Vec<String>),
    #[error("`{0}`: the target's shape differs from the model's")]
    TargetShape(String),
}

/// `with.regularizers` of a train stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Regularizers {
    pub awp: Option<AwpConfig>,
    pub mixout: Option<MixoutConfig>,
}

/// Adversarial Weight Perturbation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AwpConfig {
    /// Size of the ascent step, relative to each weight's norm (Kaggle solutions use 1e-4 to 1).
    pub adv_lr: f64,
    /// Half-width of the box each weight stays in, relative to its magnitude (1e-3 to 1e-2).
    pub adv_eps: f64,
    /// The first epoch (0-based) that attacks (default 0; AWP is often held back one epoch).
    pub start_epoch: Option<usize>,
    /// Or the first update (0-based) that attacks.
    pub start_step: Option<usize>,
    /// Parameter name patterns (`*` matches anything, dots included), matched against the
    /// checkpoint key with or without the family prefix: `encoder.layer.*.attention.*.weight`.
    /// Default: every weight matrix of the encoder layers (no biases, LayerNorm, embeddings).
    #[serde(default)]
    pub params: Vec<String>,
    /// Attack steps, each one more forward/backward pass (default 1).
    #[serde(default = "one")]
    pub steps: usize,
}

/// Mixout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MixoutConfig {
    /// The probability of replacing a weight element by its target, in [0, 1).
    pub p: f64,
    /// Linear layer name patterns (`encoder.layer.*.attention.self.query`, `classifier`);
    /// default: every Linear of the encoder layers.
    #[serde(default)]
    pub layers: Vec<String>,
    /// Turn off the model's dropout, as the paper's experiments do: Mixout replaces it
    /// (default true).
    #[serde(default = "yes")]
    pub disable_dropout: bool,
}

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

impl Regularizers {
    /// Checks values, reporting the key at fault (`regularizers.awp.adv_eps`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at =
            |key: &str, message: String| ConfigError::at(format!("regularizers.{key}"), message);
        if let Some(awp) = &self.awp {
            for (key, value) in [("adv_lr", awp.adv_lr), ("adv_eps", awp.adv_eps)] {
                if !(value.is_finite() && value >= 0.0) {
                    return Err(at(
                        &format!("awp.{key}"),
                        format!("{value} must be a number ≥ 0"),
                    ));
                }
            }
            if awp.steps == 0 {
                return Err(at("awp.steps", "must be at least 1".into()));
            }
            if awp.start_epoch.is_some() && awp.start_step.is_some() {
                return Err(at(
                    "awp.start_step",
                    "give `start_epoch` or `start_step`, not both".into(),
                ));
            }
            patterns(&awp.params).map_err(|e| at("awp.params", e.to_string()))?;
        }
        if let Some(mixout) = &self.mixout {
            if !(0.0..1.0).contains(&mixout.p) {
                return Err(at("mixout.p", format!("{} is not in [0, 1)", mixout.p)));
            }
            patterns(&mixout.layers).map_err(|e| at("mixout.layers", e.to_string()))?;
        }
        Ok(())
    }
}

impl AwpConfig {
    /// Whether the update `step` (0-based) of epoch `epoch` (0-based) attacks.
    pub fn active(&self, epoch: usize, step: usize) -> bool {
        epoch >= self.start_epoch.unwrap_or(0) && step >= self.start_step.unwrap_or(0)
    }

    /// The attack on `model`'s selected parameters.
    pub fn attack(&self, model: &Classifier) -> Result<Attack, RegularizerError> {
        let prefix = format!("{}.", model.config.family.prefix());
        let matcher = patterns(&self.params)?;
        let targets: Vec<ParamId> = param_names(model)
            .into_iter()
            .filter(|(name, _, layer_matrix)| match &matcher {
                Some(set) => matches(set, name, &prefix),
                None => *layer_matrix,
            })
            .map(|(_, id, _)| id)
            .collect();
        if targets.is_empty() {
            return Err(RegularizerError::NoAwpTarget(self.params.clone()));
        }
        Ok(Attack {
            adv_lr: self.adv_lr,
            adv_eps: self.adv_eps,
            steps: self.steps,
            targets,
        })
    }
}

impl MixoutConfig {
    /// Mixes the selected Linear layers of `model` towards the same layers of `targets` (the
    /// pretrained or initial model: `model` itself on a fresh start, the model rebuilt from
    /// its source on a resume). Returns the names of the mixed layers.
    pub fn attach(
        &self,
        model: &mut Classifier,
        targets: &Classifier,
    ) -> Result<Vec<String>, RegularizerError> {
        let family = targets.config.family;
        let prefix = format!("{}.", family.prefix());
        let matcher = patterns(&self.layers)?;
        let target_layers =
            named_parts(targets)
                .into_iter()
                .filter_map(|(name, part)| match part {
                    Part::Dense(dense) => Some((name, dense)),
                    _ => None,
                });
        let mut mixed = Vec::new();
        for ((name, target), dense) in target_layers.zip(model.dense_layers_mut()) {
            let full = name.full(family);
            let selected = match &matcher {
                Some(set) => matches(set, &full, &prefix),
                None => name.in_layer,
            };
            let weight = target.weight.val();
            if selected {
                if weight.dims() != dense.weight.dims() {
                    return Err(RegularizerError::TargetShape(full));
                }
                dense.mixout = Some(Mixout::new(weight, self.p));
                mixed.push(full);
            }
        }
        // The blocks of one stacked tensor (ModernBERT's Wqkv) are one Linear layer.
        mixed.dedup();
        if mixed.is_empty() {
            return Err(RegularizerError::NoMixoutLayer(self.layers.clone()));
        }
        if self.disable_dropout {
            model.disable_dropout();
        }
        Ok(mixed)
    }
}

/// `model` with this update's Mixout masks drawn, one per mixed layer (from the device RNG, so
/// a pass reseeded alike draws the same masks), or `None` when no layer is mixed.
pub fn with_mixout_masks(model: &Classifier) -> Option<Classifier> {
    // Every update asks: a model without Mixout must not pay for a copy.
    let any_mixed = named_parts(model)
        .iter()
        .any(|(_, part)| matches!(part, Part::Dense(dense) if dense.mixout.is_some()));
    if !any_mixed {
        return None;
    }
    let mut drawn = model.clone();
    for dense in drawn.dense_layers_mut() {
        dense.mixout = dense.mixout.as_ref().map(Mixout::with_fresh_mask);
    }
    Some(drawn)
}

/// The compiled patterns, or `None` for none given (the default selection).
fn patterns(patterns: &[String]) -> Result<Option<GlobSet>, RegularizerError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        set.add(
            Glob::new(pattern).map_err(|source| RegularizerError::Pattern {
                pattern: pattern.clone(),
                source,
            })?,
        );
    }
    set.build().map(Some).map_err(RegularizerError::Patterns)
}

fn matches(set: &GlobSet, full_name: &str, prefix: &str) -> bool {
    set.is_match(full_name)
        || full_name
            .strip_prefix(prefix)
            .is_some_and(|short| set.is_match(short))
}
