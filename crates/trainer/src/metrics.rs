//! Classification metrics as `compute_metrics` users know them (scikit-learn's definitions):
//! accuracy; precision, recall and F1 per class, macro-averaged and support-weighted; and the
//! confusion matrix. A class with no predictions (or no support) scores 0, as scikit-learn's
//! `zero_division=0` does.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScores {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// True examples of this class.
    pub support: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    pub accuracy: f64,
    pub precision_macro: f64,
    pub recall_macro: f64,
    pub f1_macro: f64,
    pub precision_weighted: f64,
    pub recall_weighted: f64,
    pub f1_weighted: f64,
    pub per_class: Vec<ClassScores>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
}

impl Metrics {
    /// Scores `predictions` against `labels` (class ids into `names`).
    pub fn compute(labels: &[usize], predictions: &[usize], names: &[String]) -> Metrics {
        assert_eq!(labels.len(), predictions.len(), "one prediction per label");
        let k = names.len();
        let mut confusion = vec![vec![0u64; k]; k];
        for (&truth, &predicted) in labels.iter().zip(predictions) {
            confusion[truth][predicted] += 1;
        }
        let total = labels.len() as f64;
        let correct: u64 = (0..k).map(|c| confusion[c][c]).sum();
        let per_class: Vec<ClassScores> = (0..k)
            .map(|c| {
                let tp = confusion[c][c] as f64;
                let predicted: u64 = (0..k).map(|t| confusion[t][c]).sum();
                let support: u64 = confusion[c].iter().sum();
                let precision = ratio(tp, predicted as f64);
                let recall = ratio(tp, support as f64);
                let f1 = ratio(2.0 * precision * recall, precision + recall);
                ClassScores {
                    label: names[c].clone(),
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect();
        let macro_avg =
            |f: fn(&ClassScores) -> f64| per_class.iter().map(f).sum::<f64>() / k.max(1) as f64;
        let weighted = |f: fn(&ClassScores) -> f64| {
            ratio(
                per_class.iter().map(|c| f(c) * c.support as f64).sum(),
                total,
            )
        };
        Metrics {
            accuracy: ratio(correct as f64, total),
            precision_macro: macro_avg(|c| c.precision),
            recall_macro: macro_avg(|c| c.recall),
            f1_macro: macro_avg(|c| c.f1),
            precision_weighted: weighted(|c| c.precision),
            recall_weighted: weighted(|c| c.recall),
            f1_weighted: weighted(|c| c.f1),
            per_class,
            confusion,
        }
    }
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator == 0.0 {
        0.0
    } else {
        numerator / denominator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(k: usize) -> Vec<String> {
        (0..k).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn binary_scores_match_scikit_learn() {
        // sklearn: y_true=[0,0,0,1,1,1,1,1], y_pred=[0,1,0,1,1,0,1,1]
        let m = Metrics::compute(
            &[0, 0, 0, 1, 1, 1, 1, 1],
            &[0, 1, 0, 1, 1, 0, 1, 1],
            &names(2),
        );
        assert_eq!(m.confusion, [[2, 1], [1, 4]]);
        assert!((m.accuracy - 0.75).abs() < 1e-12);
        assert!((m.per_class[0].precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.per_class[1].recall - 0.8).abs() < 1e-12);
        // f1: class 0 = 2/3, class 1 = 0.8 → macro 0.7333…, weighted (3·2/3 + 5·0.8)/8 = 0.75
        assert!((m.f1_macro - (2.0 / 3.0 + 0.8) / 2.0).abs() < 1e-12);
        assert!((m.f1_weighted - 0.75).abs() < 1e-12);
    }

    #[test]
    fn multiclass_with_an_unpredicted_class_scores_zero_there() {
        let m = Metrics::compute(&[0, 1, 2, 2], &[0, 1, 1, 1], &names(3));
        assert_eq!(m.per_class[2].precision, 0.0);
        assert_eq!(m.per_class[2].f1, 0.0);
        assert_eq!(m.per_class[2].support, 2);
        assert!((m.per_class[1].precision - 1.0 / 3.0).abs() < 1e-12);
        assert!((m.accuracy - 0.5).abs() < 1e-12);
    }
}
