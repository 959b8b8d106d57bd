//! Hugging Face checkpoints: loading `model.safetensors` (with or without the family prefix,
//! reporting what HF reports), and saving back in the same layout so that
//! `AutoModelForSequenceClassification.from_pretrained` loads the result unchanged.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::ModelError;
use crate::config::{Family, ModelConfig};
use crate::init::InitSource;
use crate::model::Classifier;
use crate::tokenizer_files::tokenizer_files;
use crate::weights::{HfName, Init, Names, Part, WeightSource, build, named_parts, transpose};

/// What loading a checkpoint did, as Hugging Face reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Keys the checkpoint lacked, initialised fresh (the classification head of a base model).
    pub newly_initialized: Vec<String>,
    /// Keys in the checkpoint that the model does not use (buffers such as position_ids aside).
    pub unexpected: Vec<String>,
}

impl LoadReport {
    /// Whether the output layer (the projection to the labels) was initialised fresh.
    pub fn new_output_layer(&self, family: Family) -> bool {
        let out = Names(family).head_out().full(family);
        self.newly_initialized
            .iter()
            .any(|key| key.starts_with(&out))
    }
}

/// Reads tensors from a safetensors file; only classification-head keys may be missing.
struct FileSource<'a> {
    file: PathBuf,
    tensors: SafeTensors<'a>,
    family: Family,
    used: BTreeSet<String>,
    report: LoadReport,
    fresh: InitSource,
}

impl WeightSource for FileSource<'_> {
    fn take(
        &mut self,
        name: &HfName,
        shape: [usize; 2],
        init: Init,
    ) -> Result<Vec<f32>, ModelError> {
        let full = name.full(self.family);
        let candidates = if name.encoder {
            vec![full.clone(), name.key.clone()]
        } else {
            vec![full.clone()]
        };
        let Some(found) = candidates
            .into_iter()
            .find(|k| self.tensors.names().iter().any(|n| *n == k))
        else {
            if name.encoder && !name.key.starts_with("pooler") {
                return Err(ModelError::Weights {
                    file: self.file.clone(),
                    key: full,
                    message: "missing from the checkpoint".into(),
                });
            }
            // A stacked tensor (ModernBERT's Wqkv) is one key for several modules.
            if !self.report.newly_initialized.contains(&full) {
                self.report.newly_initialized.push(full);
            }
            return self.fresh.take(name, shape, init);
        };
        let view = self
            .tensors
            .tensor(&found)
            .map_err(|e| ModelError::Weights {
                file: self.file.clone(),
                key: found.clone(),
                message: e.to_string(),
            })?;
        let (part, of) = name.stacked.unwrap_or((0, 1));
        let rows = shape[0] * of;
        let expected: Vec<usize> = if shape[1] == 1 {
            vec![rows]
        } else {
            vec![rows, shape[1]]
        };
        if view.shape() != expected.as_slice() {
            return Err(ModelError::Weights {
                file: self.file.clone(),
                key: found,
                message: format!(
                    "the checkpoint has shape {:?}, but config.json implies {:?}",
                    view.shape(),
                    expected
                ),
            });
        }
        let values = to_f32(view.dtype(), view.data()).ok_or_else(|| ModelError::Weights {
            file: self.file.clone(),
            key: found.clone(),
            message: format!(
                "dtype {:?} is not a float type this loader reads (F32, F16, BF16)",
                view.dtype()
            ),
        })?;
        self.used.insert(found);
        let block = shape[0] * shape[1];
        Ok(match of {
            1 => values,
            _ => values[part * block..(part + 1) * block].to_vec(),
        })
    }
}

/// The little-endian floats in `bytes`, or `None` for a dtype that is not F32, F16 or BF16.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Loads `dir` (config.json + model.safetensors) onto `device`. `labels`, when given, replaces
/// the checkpoint's label set (a new head is then initialised if the count differs).
pub fn load(
    dir: &Path,
    labels: Option<&[String]>,
    seed: u64,
    device: &Device,
) -> Result<(Classifier, LoadReport), ModelError> {
    let mut config = ModelConfig::from_hf_json(&dir.join("config.json"))?;
    let weights_file = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights_file).map_err(|e| ModelError::io(&weights_file, e))?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Weights {
        file: weights_file.clone(),
        key: "-".into(),
        message: format!("not a complete safetensors file (truncated or corrupt): {e}"),
    })?;
    let relabel = labels.is_some_and(|l| l.len() != config.num_labels());
    if let Some(labels) = labels {
        config.labels = labels.to_vec();
    }
    let mut source = FileSource {
        file: weights_file,
        tensors,
        family: config.family,
        used: BTreeSet::new(),
        report: LoadReport::default(),
        fresh: InitSource::new(&config, seed),
    };
    let model = build(
        &config,
        &mut SkipHead {
            inner: &mut source,
            skip: relabel,
        },
        device,
    )?;
    let mut report = source.report;
    report.unexpected = source
        .tensors
        .names()
        .into_iter()
        .filter(|k| !source.used.contains(*k) && !k.ends_with("position_ids"))
        .filter(|k| !(relabel && k.starts_with(Names(config.family).head_out().key.as_str())))
        .map(|k| k.to_string())
        .collect();
    report.unexpected.sort();
    Ok((model, report))
}

/// Initialises the output projection afresh when the label count changed (HF's
/// `ignore_mismatched_sizes`), reading everything else from the file.
struct SkipHead<'a, 'b> {
    inner: &'a mut FileSource<'b>,
    skip: bool,
}

impl WeightSource for SkipHead<'_, '_> {
    fn take(
        &mut self,
        name: &HfName,
        shape: [usize; 2],
        init: Init,
    ) -> Result<Vec<f32>, ModelError> {
        if self.skip
            && name
                .key
                .starts_with(Names(self.inner.family).head_out().key.as_str())
        {
            self.inner
                .report
                .newly_initialized
                .push(name.full(self.inner.family));
            return self.inner.fresh.take(name, shape, init);
        }
        self.inner.take(name, shape, init)
    }
}

/// Every tensor of `model` under its checkpoint key, in Hugging Face's layout.
pub fn named_tensors(model: &Classifier) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let family = model.config.family;
    let values =
        |t: Tensor<2>| -> Vec<f32> { t.into_data().try_to_vec::<f32>().unwrap_or_default() };
    let vector =
        |t: Tensor<1>| -> Vec<f32> { t.into_data().try_to_vec::<f32>().unwrap_or_default() };
    let mut out = Vec::new();
    for (name, part) in named_parts(model) {
        let key = |leaf: &str| name.tensor(leaf).full(family);
        match part {
            Part::Dense(d) => {
                let [d_in, d_out] = d.weight.val().dims();
                out.push((
                    key("weight"),
                    vec![d_out, d_in],
                    transpose(&values(d.weight.val()), d_in, d_out),
                ));
                if let Some(bias) = &d.bias {
                    out.push((key("bias"), vec![d_out], vector(bias.val())));
                }
            }
            Part::Norm(n) => {
                let gamma = n.gamma.val();
                let d = gamma.dims()[0];
                out.push((key("weight"), vec![d], vector(gamma)));
                if let Some(beta) = &n.beta {
                    out.push((key("bias"), vec![d], vector(beta.val())));
                }
            }
            Part::Embedding(e) => {
                let w = e.weight.val();
                out.push((key("weight"), w.dims().to_vec(), values(w)));
            }
        }
    }
    stack_blocks(out)
}

/// Joins the entries of one key (the row blocks of a stacked tensor, as ModernBERT's query,
/// key and value are of `Wqkv`), in order, into one tensor where the first of them was.
fn stack_blocks(
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::with_capacity(tensors.len());
    for (key, shape, values) in tensors {
        match at.get(&key) {
            Some(&index) => {
                let (_, stacked_shape, stacked_values) = &mut out[index];
                stacked_shape[0] += shape[0];
                stacked_values.extend(values);
            }
            None => {
                at.insert(key.clone(), out.len());
                out.push((key, shape, values));
            }
        }
    }
    out
}

/// Writes `dir/config.json` and `dir/model.safetensors` in Hugging Face's format.
pub fn save(model: &Classifier, dir: &Path) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let tensors = named_tensors(model);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, shape, values)| {
            let bytes = values.iter().map(|v| v.to_le_bytes()).collect::<Vec<_>>();
            (k, shape, bytes.into_flattened())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, shape, data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ModelError::Weights {
            file: dir.join("model.safetensors"),
            key: "-".into(),
            message: e.to_string(),
        })?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let weights = dir.join("model.safetensors");
    // Straight to the file: serialising into one buffer first copied all the weights once more.
    finetune_atomic::write_with(&weights, |temp| {
        safetensors::tensor::serialize_to_file(views, metadata, temp).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(e) => e,
            e => std::io::Error::other(e),
        })
    })
    .map_err(|e| ModelError::io(&weights, e))?;
    write_json(&dir.join("config.json"), &model.config.to_hf_json())
}

/// [`save`], plus the tokenizer.json the model was trained with and the tokenizer_config.json
/// and special_tokens_map.json derived from it: a directory that `AutoTokenizer` (truncating at
/// the model's length), `AutoModelForSequenceClassification` and `pipeline(...)` load.
pub fn save_with_tokenizer(
    model: &Classifier,
    dir: &Path,
    tokenizer_json: &Path,
) -> Result<(), ModelError> {
    let bytes = std::fs::read(tokenizer_json).map_err(|e| ModelError::io(tokenizer_json, e))?;
    let tokenizer: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| ModelError::Config {
            file: tokenizer_json.to_path_buf(),
            key: "-".into(),
            message: format!("not a tokenizer.json: {e}"),
        })?;
    save(model, dir)?;
    write_atomic(&dir.join("tokenizer.json"), &bytes)?;
    let (tokenizer_config, special_tokens_map) = tokenizer_files(&model.config, &tokenizer);
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config)?;
    write_json(&dir.join("special_tokens_map.json"), &special_tokens_map)
}

/// `value` pretty-printed with a final newline, atomically.
fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ModelError> {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// `bytes` at `path`, atomically and durably ([`finetune_atomic`]).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    finetune_atomic::write(path, bytes).map_err(|e| ModelError::io(path, e))
}
