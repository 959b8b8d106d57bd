//! `finetune predict`: a saved model directory applied to raw texts or sentence pairs.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use finetune_core::{Answer, PredictInput, PredictOptions, Prediction};
use finetune_model::{ComputeDevice, ProblemType, hf, label_scores};
use finetune_trainer::DEFAULT_THRESHOLD;

/// `finetune predict`: a saved model directory (`config.json`, `model.safetensors` and the
/// `tokenizer.json` it was trained with, as `train` writes to `model/`) applied to raw texts.
pub struct ModelPredictor;

impl finetune_core::Predictor for ModelPredictor {
    fn predict(
        &self,
        model_dir: &Path,
        inputs: &[PredictInput],
        options: &PredictOptions,
    ) -> Result<Vec<Prediction>> {
        let mut compute = finetune_model::device(&options.device)?;
        if options.bf16 {
            compute.use_bf16()?;
        }
        finetune_kernels::on_own_pool(|| {
            compute.run(|| self.predict_on(&compute, model_dir, inputs, options))
        })
    }
}

impl ModelPredictor {
    fn predict_on(
        &self,
        compute: &ComputeDevice,
        model_dir: &Path,
        inputs: &[PredictInput],
        options: &PredictOptions,
    ) -> Result<Vec<Prediction>> {
        let (batch_size, threshold) = (options.batch_size, options.threshold);
        let tokenizer_file = model_dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_file)
            .map_err(|err| anyhow!("cannot load {}: {err}", tokenizer_file.display()))?;
        let device = compute.device();
        let (model, _) = hf::load(model_dir, None, 0, device)
            .with_context(|| format!("cannot load the model in {}", model_dir.display()))?;
        // A copy of the tokenizer without truncation, made at the first pair.
        let mut pair_encoder = None;
        let (mut rows, mut type_ids) = (Vec::new(), Vec::new());
        for input in inputs {
            let encoding = match &input.text_pair {
                Some(pair) => {
                    let encoder = match &mut pair_encoder {
                        Some(encoder) => encoder,
                        empty => empty.insert(finetune_tokenize::PairEncoder::new(&tokenizer)?),
                    };
                    let (text, pair) = (
                        std::slice::from_ref(&input.text),
                        std::slice::from_ref(pair),
                    );
                    encoder
                        .encode(text, pair)
                        .and_then(|mut one| one.pop().context("no encoding"))
                }
                None => tokenizer
                    .encode(input.text.as_str(), true)
                    .map_err(|err| anyhow!("{err}")),
            }
            .with_context(|| format!("cannot tokenize {input:?}"))?;
            rows.push(encoding.get_ids().iter().map(|&id| id as i32).collect());
            type_ids.push(match input.text_pair {
                Some(_) => encoding.get_type_ids().iter().map(|&t| t as i32).collect(),
                None => Vec::new(),
            });
        }
        let labels = &model.config.labels;
        let problem = model.config.problem_type;
        if threshold.is_some() && problem != ProblemType::MultiLabelClassification {
            bail!("--threshold is for multi-label models; this one's task is {problem}");
        }
        let threshold = threshold
            .or(model.config.decision_threshold)
            .unwrap_or(DEFAULT_THRESHOLD);
        Ok(label_scores(&model, &rows, &type_ids, batch_size, device)
            .into_iter()
            .map(|scores| {
                let row = &scores.outputs;
                let answer = match problem {
                    ProblemType::SingleLabelClassification => {
                        let best = row
                            .iter()
                            .enumerate()
                            .fold(0, |best, (i, p)| if *p > row[best] { i } else { best });
                        Answer::Label(labels[best].clone())
                    }
                    ProblemType::MultiLabelClassification => Answer::Labels(
                        labels
                            .iter()
                            .zip(row)
                            .filter(|(_, p)| f64::from(**p) >= threshold)
                            .map(|(label, _)| label.clone())
                            .collect(),
                    ),
                    ProblemType::Regression => Answer::Values,
                };
                Prediction {
                    answer,
                    outputs: labels.iter().cloned().zip(scores.outputs).collect(),
                    logits: scores.logits,
                }
            })
            .collect())
    }
}
