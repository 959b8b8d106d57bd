//! `finetune predict`: a saved model directory applied to raw texts or sentence pairs.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use finetune_core::{PredictInput, PredictOptions, Prediction};
use finetune_model::{ComputeDevice, hf, label_scores};

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
            compute.run(|| self.predict_on(&compute, model_dir, inputs, options.batch_size))
        })
    }
}

impl ModelPredictor {
    fn predict_on(
        &self,
        compute: &ComputeDevice,
        model_dir: &Path,
        inputs: &[PredictInput],
        batch_size: usize,
    ) -> Result<Vec<Prediction>> {
        let tokenizer_file = model_dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_file)
            .map_err(|err| anyhow!("cannot load {}: {err}", tokenizer_file.display()))?;
        let device = compute.device();
        let (model, _) = hf::load(model_dir, None, 0, device)
            .with_context(|| format!("cannot load the model in {}", model_dir.display()))?;
        let (mut rows, mut type_ids) = (Vec::new(), Vec::new());
        for input in inputs {
            let encoding = match &input.text_pair {
                Some(pair) => tokenizer.encode((input.text.as_str(), pair.as_str()), true),
                None => tokenizer.encode(input.text.as_str(), true),
            }
            .map_err(|err| anyhow!("cannot tokenize {input:?}: {err}"))?;
            rows.push(encoding.get_ids().iter().map(|&id| id as i32).collect());
            type_ids.push(match input.text_pair {
                Some(_) => encoding.get_type_ids().iter().map(|&t| t as i32).collect(),
                None => Vec::new(),
            });
        }
        let labels = &model.config.labels;
        Ok(label_scores(&model, &rows, &type_ids, batch_size, device)
            .into_iter()
            .map(|scores| {
                let row = &scores.probabilities;
                let best = row
                    .iter()
                    .enumerate()
                    .fold(0, |best, (i, p)| if *p > row[best] { i } else { best });
                Prediction {
                    label: labels[best].clone(),
                    probabilities: labels.iter().cloned().zip(scores.probabilities).collect(),
                    logits: scores.logits,
                }
            })
            .collect())
    }
}
