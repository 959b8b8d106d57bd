//! Hugging Face checkpoints: the key layout of each family, loading `model.safetensors` (with
//! or without the family prefix, reporting what HF reports), and saving back in the same layout
//! so that `AutoModelForSequenceClassification.from_pretrained` loads the result unchanged.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::module::{Param, ParamId};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::ModelError;
use crate::config::{Family, ModelConfig};
use crate::init::Init;
use crate::model::{Classifier, Dense, Embeddings, EncoderLayer, Head, dropout};

/// A parameter group's name in a checkpoint: `key` is the module path (`encoder.layer.0.
/// attention.self.query`); `encoder` ones carry the family prefix in classification checkpoints.
#[derive(Debug, Clone)]
pub struct HfName {
    pub key: String,
    pub encoder: bool,
}

impl HfName {
    fn encoder(key: impl Into<String>) -> Self {
        HfName {
            key: key.into(),
            encoder: true,
        }
    }
    fn head(key: impl Into<String>) -> Self {
        HfName {
            key: key.into(),
            encoder: false,
        }
    }
    fn tensor(&self, leaf: &str) -> HfName {
        HfName {
            key: format!("{}.{leaf}", self.key),
            encoder: self.encoder,
        }
    }
    /// The key as saved in a `*ForSequenceClassification` checkpoint.
    pub fn full(&self, family: Family) -> String {
        if self.encoder {
            format!("{}.{}", family.prefix(), self.key)
        } else {
            self.key.clone()
        }
    }
}

/// Module paths of one encoder layer.
struct LayerNames {
    query: HfName,
    key: HfName,
    value: HfName,
    attention_output: HfName,
    attention_norm: HfName,
    intermediate: HfName,
    output: HfName,
    output_norm: HfName,
}

/// Every module path of a family, in one place for loading and saving alike.
struct Names(Family);

impl Names {
    fn word(&self) -> HfName {
        HfName::encoder("embeddings.word_embeddings")
    }
    fn position(&self) -> HfName {
        HfName::encoder("embeddings.position_embeddings")
    }
    fn token_type(&self) -> HfName {
        HfName::encoder("embeddings.token_type_embeddings")
    }
    fn embeddings_norm(&self) -> HfName {
        HfName::encoder("embeddings.LayerNorm")
    }
    fn layer(&self, i: usize) -> LayerNames {
        let n = |suffix: &str| HfName::encoder(suffix);
        match self.0 {
            Family::DistilBert => {
                let p = format!("transformer.layer.{i}");
                LayerNames {
                    query: n(&format!("{p}.attention.q_lin")),
                    key: n(&format!("{p}.attention.k_lin")),
                    value: n(&format!("{p}.attention.v_lin")),
                    attention_output: n(&format!("{p}.attention.out_lin")),
                    attention_norm: n(&format!("{p}.sa_layer_norm")),
                    intermediate: n(&format!("{p}.ffn.lin1")),
                    output: n(&format!("{p}.ffn.lin2")),
                    output_norm: n(&format!("{p}.output_layer_norm")),
                }
            }
            Family::Bert | Family::Roberta => {
                let p = format!("encoder.layer.{i}");
                LayerNames {
                    query: n(&format!("{p}.attention.self.query")),
                    key: n(&format!("{p}.attention.self.key")),
                    value: n(&format!("{p}.attention.self.value")),
                    attention_output: n(&format!("{p}.attention.output.dense")),
                    attention_norm: n(&format!("{p}.attention.output.LayerNorm")),
                    intermediate: n(&format!("{p}.intermediate.dense")),
                    output: n(&format!("{p}.output.dense")),
                    output_norm: n(&format!("{p}.output.LayerNorm")),
                }
            }
        }
    }
    fn head_dense(&self) -> HfName {
        match self.0 {
            Family::Bert => HfName::encoder("pooler.dense"),
            Family::DistilBert => HfName::head("pre_classifier"),
            Family::Roberta => HfName::head("classifier.dense"),
        }
    }
    fn head_out(&self) -> HfName {
        match self.0 {
            Family::Bert | Family::DistilBert => HfName::head("classifier"),
            Family::Roberta => HfName::head("classifier.out_proj"),
        }
    }
}

/// Supplies parameter values by name, in Hugging Face's layout (Linear weights `[out, in]`).
pub trait WeightSource {
    fn take(
        &mut self,
        name: &HfName,
        shape: [usize; 2],
        init: Init,
    ) -> Result<Vec<f32>, ModelError>;
}

/// Builds a classifier whose every parameter comes from `source`.
pub fn build(
    config: &ModelConfig,
    source: &mut dyn WeightSource,
    device: &Device,
) -> Result<Classifier, ModelError> {
    let names = Names(config.family);
    let h = config.hidden_size;
    let mut builder = Builder {
        source,
        device,
        eps: config.layer_norm_eps,
        next_id: 0,
    };
    let embeddings = Embeddings {
        word: builder.embedding(&names.word(), config.vocab_size, h)?,
        position: builder.embedding(&names.position(), config.max_position_embeddings, h)?,
        token_type: match config.type_vocab_size {
            0 => None,
            n => Some(builder.embedding(&names.token_type(), n, h)?),
        },
        norm: builder.norm(&names.embeddings_norm(), h)?,
        dropout: dropout(config.hidden_dropout),
    };
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let n = names.layer(i);
        layers.push(EncoderLayer {
            query: builder.dense(&n.query, h, h)?,
            key: builder.dense(&n.key, h, h)?,
            value: builder.dense(&n.value, h, h)?,
            attention_output: builder.dense(&n.attention_output, h, h)?,
            attention_norm: builder.norm(&n.attention_norm, h)?,
            intermediate: builder.dense(&n.intermediate, h, config.intermediate_size)?,
            output: builder.dense(&n.output, config.intermediate_size, h)?,
            output_norm: builder.norm(&n.output_norm, h)?,
            attention_dropout: dropout(config.attention_dropout),
            dropout: dropout(config.hidden_dropout),
            num_heads: config.num_heads,
            activation: config.hidden_act,
        });
    }
    let head = Head {
        dense: builder.dense(&names.head_dense(), h, h)?,
        out: builder.dense(&names.head_out(), h, config.num_labels())?,
        dropout: dropout(config.classifier_dropout),
        family: config.family,
    };
    Ok(Classifier {
        embeddings,
        layers,
        head,
        config: config.clone(),
    })
}

struct Builder<'a> {
    source: &'a mut dyn WeightSource,
    device: &'a Device,
    eps: f64,
    next_id: u64,
}

impl Builder<'_> {
    /// Parameters are numbered in build order, so two models of one architecture share their
    /// ids: an optimizer state saved in a checkpoint then applies to the reloaded model.
    fn param<const D: usize>(&mut self, values: Vec<f32>, shape: [usize; D]) -> Param<Tensor<D>> {
        self.next_id += 1;
        let fresh = Param::from_tensor(Tensor::from_data(
            TensorData::new(values, shape),
            self.device,
        ));
        let (_, tensor, mapper) = fresh.consume();
        Param::from_mapped_value(ParamId::from(self.next_id), tensor, mapper)
    }

    fn dense(&mut self, name: &HfName, d_in: usize, d_out: usize) -> Result<Dense, ModelError> {
        let weight = self
            .source
            .take(&name.tensor("weight"), [d_out, d_in], Init::Normal)?;
        let bias = self
            .source
            .take(&name.tensor("bias"), [d_out, 1], Init::Zeros)?;
        Ok(Dense {
            weight: self.param(transpose(&weight, d_out, d_in), [d_in, d_out]),
            bias: self.param(bias, [d_out]),
            mixout: None,
        })
    }

    fn norm(&mut self, name: &HfName, d: usize) -> Result<LayerNorm, ModelError> {
        let gamma = self
            .source
            .take(&name.tensor("weight"), [d, 1], Init::Ones)?;
        let beta = self
            .source
            .take(&name.tensor("bias"), [d, 1], Init::Zeros)?;
        let mut norm = LayerNormConfig::new(d)
            .with_epsilon(self.eps)
            .init(self.device);
        norm.gamma = self.param(gamma, [d]);
        norm.beta = Some(self.param(beta, [d]));
        Ok(norm)
    }

    fn embedding(&mut self, name: &HfName, n: usize, d: usize) -> Result<Embedding, ModelError> {
        let weight = self
            .source
            .take(&name.tensor("weight"), [n, d], Init::Embedding)?;
        Ok(Embedding {
            weight: self.param(weight, [n, d]),
        })
    }
}

/// `[rows, cols]` row-major to `[cols, rows]`, in 16 × 16 tiles so that both sides are read
/// and written a cache line at a time (column by column, every write missed the cache).
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 16;
    let mut out = vec![0.0; values.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = values[r * cols + c];
                }
            }
        }
    }
    out
}

/// What loading a checkpoint did, as Hugging Face reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Keys the checkpoint lacked, initialised fresh (the classification head of a base model).
    pub newly_initialized: Vec<String>,
    /// Keys in the checkpoint that the model does not use (buffers such as position_ids aside).
    pub unexpected: Vec<String>,
}

/// Reads tensors from a safetensors file; only classification-head keys may be missing.
struct FileSource<'a> {
    file: PathBuf,
    tensors: SafeTensors<'a>,
    family: Family,
    used: BTreeSet<String>,
    report: LoadReport,
    fresh: crate::init::InitSource,
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
            self.report.newly_initialized.push(full);
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
        let expected: Vec<usize> = if shape[1] == 1 {
            vec![shape[0]]
        } else {
            shape.to_vec()
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
        let values = to_f32(view.dtype(), view.data()).map_err(|message| ModelError::Weights {
            file: self.file.clone(),
            key: found.clone(),
            message,
        })?;
        self.used.insert(found);
        Ok(values)
    }
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, String> {
    Ok(match dtype {
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
        other => {
            return Err(format!(
                "dtype {other:?} is not a float type this loader reads (F32, F16, BF16)"
            ));
        }
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
        fresh: crate::init::InitSource::new(&config, seed),
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

/// A module of the model that holds parameters.
#[derive(Clone, Copy)]
pub enum Part<'a> {
    Dense(&'a Dense),
    Norm(&'a LayerNorm),
    Embedding(&'a Embedding),
}

/// Every parameter-holding module of `model` under its checkpoint name, in checkpoint order.
pub fn named_parts(model: &Classifier) -> Vec<(HfName, Part<'_>)> {
    let names = Names(model.config.family);
    let embeddings = &model.embeddings;
    let mut parts = vec![
        (names.word(), Part::Embedding(&embeddings.word)),
        (names.position(), Part::Embedding(&embeddings.position)),
    ];
    if let Some(token_type) = &embeddings.token_type {
        parts.push((names.token_type(), Part::Embedding(token_type)));
    }
    parts.push((names.embeddings_norm(), Part::Norm(&embeddings.norm)));
    for (i, layer) in model.layers.iter().enumerate() {
        let n = names.layer(i);
        parts.extend([
            (n.query, Part::Dense(&layer.query)),
            (n.key, Part::Dense(&layer.key)),
            (n.value, Part::Dense(&layer.value)),
            (n.attention_output, Part::Dense(&layer.attention_output)),
            (n.attention_norm, Part::Norm(&layer.attention_norm)),
            (n.intermediate, Part::Dense(&layer.intermediate)),
            (n.output, Part::Dense(&layer.output)),
            (n.output_norm, Part::Norm(&layer.output_norm)),
        ]);
    }
    parts.push((names.head_dense(), Part::Dense(&model.head.dense)));
    parts.push((names.head_out(), Part::Dense(&model.head.out)));
    parts
}

/// Every parameter's checkpoint key (family prefix included) and id, and whether it is a
/// weight matrix of an encoder layer (AWP's default target).
pub fn param_names(model: &Classifier) -> Vec<(String, ParamId, bool)> {
    let family = model.config.family;
    let mut out = Vec::new();
    for (name, part) in named_parts(model) {
        let in_layer = name.key.contains(".layer.");
        let mut add = |leaf: &str, id: ParamId, layer_matrix: bool| {
            out.push((name.tensor(leaf).full(family), id, layer_matrix));
        };
        match part {
            Part::Dense(d) => {
                add("weight", d.weight.id, in_layer);
                add("bias", d.bias.id, false);
            }
            Part::Norm(n) => {
                add("weight", n.gamma.id, false);
                if let Some(beta) = &n.beta {
                    add("bias", beta.id, false);
                }
            }
            Part::Embedding(e) => add("weight", e.weight.id, false),
        }
    }
    out
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
                out.push((key("bias"), vec![d_out], vector(d.bias.val())));
            }
            Part::Norm(n) => {
                let gamma = n.gamma.val();
                let d = gamma.dims()[0];
                out.push((key("weight"), vec![d], vector(gamma)));
                let beta = n
                    .beta
                    .as_ref()
                    .map(|b| vector(b.val()))
                    .unwrap_or_else(|| vec![0.0; d]);
                out.push((key("bias"), vec![d], beta));
            }
            Part::Embedding(e) => {
                let w = e.weight.val();
                out.push((key("weight"), w.dims().to_vec(), values(w)));
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
    write_through_partial(&weights, |partial| {
        safetensors::tensor::serialize_to_file(views, metadata, partial).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(e) => ModelError::io(&weights, e),
            e => ModelError::Weights {
                file: weights.clone(),
                key: "-".into(),
                message: e.to_string(),
            },
        })
    })?;
    let mut config = serde_json::to_string_pretty(&model.config.to_hf_json()).unwrap_or_default();
    config.push('\n');
    write_atomic(&dir.join("config.json"), config.as_bytes())
}

/// [`save`], plus the tokenizer.json the model was trained with: a directory that
/// `AutoTokenizer` and `AutoModelForSequenceClassification` both load.
pub fn save_with_tokenizer(
    model: &Classifier,
    dir: &Path,
    tokenizer_json: &Path,
) -> Result<(), ModelError> {
    save(model, dir)?;
    let bytes = std::fs::read(tokenizer_json).map_err(|e| ModelError::io(tokenizer_json, e))?;
    write_atomic(&dir.join("tokenizer.json"), &bytes)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    write_through_partial(path, |temp| {
        std::fs::write(temp, bytes).map_err(|e| ModelError::io(path, e))
    })
}

/// Has `write` fill `path` with a `.partial` extension, then renames it to `path`: a reader
/// never sees half a file under the real name.
fn write_through_partial(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let temp = path.with_extension("partial");
    write(&temp)?;
    std::fs::rename(&temp, path).map_err(|e| ModelError::io(path, e))
}
