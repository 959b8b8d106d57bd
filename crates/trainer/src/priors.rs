//! Starting a new head at the training labels' base rates (`head_bias: priors`).
//!
//! A fresh head's zero bias says every label is as likely as not. Under binary cross-entropy
//! the first hundreds of updates then go to pulling 20-odd sigmoids down to their label
//! frequencies, and at fine-tuning learning rates a short run ends there, predicting the
//! frequencies for every text. Starting from the base rates leaves the updates to the texts.

use finetune_model::{Example, ProblemType};

/// The output bias that makes a zero-input head predict the training labels' base rates: the
/// log-odds of each label's frequency (multi-label), the log of each class's share
/// (single-label; softmax ignores a common shift), or each target's mean (regression). The
/// counts are add-one smoothed, so that a label absent from train gets a finite bias.
pub fn output_priors(problem: ProblemType, examples: &[Example], outputs: usize) -> Vec<f32> {
    let rows = examples.len() as f64;
    match problem {
        ProblemType::SingleLabelClassification => {
            let mut counts = vec![0.0f64; outputs];
            for example in examples {
                if let Some(count) = usize::try_from(example.label)
                    .ok()
                    .and_then(|label| counts.get_mut(label))
                {
                    *count += 1.0;
                }
            }
            let total = rows + outputs as f64;
            counts
                .iter()
                .map(|count| ((count + 1.0) / total).ln() as f32)
                .collect()
        }
        ProblemType::MultiLabelClassification => sums(examples, outputs)
            .iter()
            .map(|positives| {
                let share = (positives + 1.0) / (rows + 2.0);
                (share / (1.0 - share)).ln() as f32
            })
            .collect(),
        ProblemType::Regression => sums(examples, outputs)
            .iter()
            .map(|sum| (sum / rows.max(1.0)) as f32)
            .collect(),
    }
}

/// Each output's sum of targets over the examples.
fn sums(examples: &[Example], outputs: usize) -> Vec<f64> {
    let mut sums = vec![0.0f64; outputs];
    for example in examples {
        for (sum, &target) in sums.iter_mut().zip(&example.targets) {
            *sum += f64::from(target);
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(label: i64, targets: &[f32]) -> Example {
        Example {
            ids: vec![1],
            type_ids: Vec::new(),
            label,
            targets: targets.to_vec(),
        }
    }

    #[test]
    fn base_rates_per_task() {
        // 3 of 8 rows have label 0, none has label 1: log-odds of 4/10 and 1/10.
        let rows: Vec<Example> = (0..8)
            .map(|i| example(0, &[f32::from(u8::from(i < 3)), 0.0]))
            .collect();
        let multi = output_priors(ProblemType::MultiLabelClassification, &rows, 2);
        assert!((multi[0] - (0.4f32 / 0.6).ln()).abs() < 1e-6);
        assert!((multi[1] - (0.1f32 / 0.9).ln()).abs() < 1e-6);
        // Sigmoid of the bias is the smoothed frequency.
        assert!((1.0 / (1.0 + (-multi[0]).exp()) - 0.4).abs() < 1e-6);

        let classes: Vec<Example> = [0, 0, 0, 1].iter().map(|&l| example(l, &[])).collect();
        let single = output_priors(ProblemType::SingleLabelClassification, &classes, 3);
        let shares: Vec<f32> = single.iter().map(|b| b.exp()).collect();
        assert!((shares[0] - 4.0 / 7.0).abs() < 1e-6);
        assert!((shares[1] - 2.0 / 7.0).abs() < 1e-6);
        assert!((shares[2] - 1.0 / 7.0).abs() < 1e-6);

        let targets: Vec<Example> = [1.0, 2.0, 6.0].iter().map(|&t| example(0, &[t])).collect();
        assert_eq!(
            output_priors(ProblemType::Regression, &targets, 1),
            vec![3.0]
        );
    }
}
