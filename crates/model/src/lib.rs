//! BERT-family text classifiers in burn: what a model is, where its weights come from, and
//! what it predicts. It knows nothing of pipelines, training loops or data files.
//!
//! - [`ModelConfig`]: the configuration, from a Hugging Face `config.json` or a [`ScratchSpec`].
//! - [`Classifier`]: the encoder (BERT, MiniLM, DistilBERT, RoBERTa, ELECTRA) and its
//!   classification head, run on a [`Batch`] of token rows, with the fused kernels of
//!   `finetune-kernels`.
//! - [`build`] from a [`WeightSource`]: a checkpoint file ([`hf::load`]) or seeded
//!   initialisation ([`scratch`]); [`hf::save`] writes Hugging Face's layout back, and
//!   [`hf::save_with_tokenizer`] the tokenizer files beside it ([`tokenizer_files`]).
//! - [`named_parts`] and [`param_names`]: the model's modules under their checkpoint names.
//! - [`predict`] and [`label_scores`]: inference without autodiff, by the task ([`ProblemType`]).
//!
//! Nothing here assumes the CPU: every tensor is made on the device the caller passes, and
//! [`device`] turns a pipeline's `device:` string into one ([`DeviceSpec`], [`ComputeDevice`]):
//! the CPU with the fused kernels, or burn's own operations on the CPU or a GPU.

mod config;
mod deberta;
mod device;
pub mod hf;
mod inference;
mod init;
mod model;
mod modernbert;
mod tokenizer_files;
mod weights;

use std::path::{Path, PathBuf};

use burn::tensor::Device;

pub use config::{
    Activation, Family, ModelConfig, ModernBertLayout, RelativeAttention, ScratchError, ScratchSpec,
};
pub use deberta::RelativeEmbeddings;
pub use device::{ComputeDevice, DeviceReport, DeviceSpec, built_in as built_in_devices};
pub use finetune_task::ProblemType;
pub use inference::{
    Example, LabelScores, Predictions, label_scores, outputs_of, predict, vector_loss_sum,
};
pub use init::InitSource;
pub use model::{Batch, Classifier, Dense, Embeddings, EncoderLayer, Head, Output};
pub use modernbert::ModernLayer;
pub use tokenizer_files::{SpecialTokens, tokenizer_files};
pub use weights::{HfName, Init, Part, WeightSource, build, named_parts, param_names};

/// Everything that can go wrong reading or writing a model, naming the file and key.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", file.display())]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: key `{key}`: {message}", file.display())]
    Config {
        file: PathBuf,
        key: String,
        message: String,
    },
    #[error("{}: tensor `{key}`: {message}", file.display())]
    Weights {
        file: PathBuf,
        key: String,
        message: String,
    },
    /// A device name this build does not know or cannot open.
    #[error("{0}")]
    Device(String),
}

impl ModelError {
    pub fn io(file: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            file: file.to_path_buf(),
            source,
        }
    }
}

/// The device a pipeline's `device:` names, opened (see [`DeviceSpec`] for the names).
pub fn device(name: &str) -> Result<ComputeDevice, ModelError> {
    DeviceSpec::parse(name)?.open()
}

/// The device a pipeline gets without a `device:` key.
pub fn default_device_name() -> String {
    "cpu".into()
}

/// A model with fresh weights from `seed`.
pub fn scratch(config: &ModelConfig, seed: u64, device: &Device) -> Classifier {
    let mut source = InitSource::new(config, seed);
    build(config, &mut source, device).expect("fresh initialisation cannot fail")
}
