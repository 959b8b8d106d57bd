//! Metrics as `compute_metrics` users know them (scikit-learn's and SciPy's definitions), one
//! set per task. Single-label: accuracy; precision, recall and F1 per class, macro-averaged
//! and support-weighted; the confusion matrix. Multi-label, at a decision threshold: subset
//! accuracy, Hamming loss, and precision, recall and F1 micro-, macro- and weighted-averaged
//! and per label. Regression: MSE, RMSE, MAE, R², Pearson's and Spearman's correlations, per
//! target and averaged over targets. A class with no predictions (or no support) scores 0, as
//! scikit-learn's `zero_division=0` does; a correlation with a constant side is 0 (SciPy: NaN).

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
                let predicted: u64 = (0..k).map(|t| confusion[t][c]).sum();
                let support: u64 = confusion[c].iter().sum();
                scores(&names[c], confusion[c][c], predicted, support)
            })
            .collect();
        let average = Averages::of(&per_class);
        Metrics {
            accuracy: ratio(correct as f64, total),
            precision_macro: average.precision_macro,
            recall_macro: average.recall_macro,
            f1_macro: average.f1_macro,
            precision_weighted: average.precision_weighted,
            recall_weighted: average.recall_weighted,
            f1_weighted: average.f1_weighted,
            per_class,
            confusion,
        }
    }
}

/// Multi-label scores at one decision threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MultiLabelMetrics {
    /// A label is predicted when its probability is at least this.
    pub threshold: f64,
    /// Texts whose every label decision is right.
    pub subset_accuracy: f64,
    /// The fraction of (text, label) decisions that are wrong.
    pub hamming_loss: f64,
    pub precision_micro: f64,
    pub recall_micro: f64,
    pub f1_micro: f64,
    pub precision_macro: f64,
    pub recall_macro: f64,
    pub f1_macro: f64,
    pub precision_weighted: f64,
    pub recall_weighted: f64,
    pub f1_weighted: f64,
    pub per_label: Vec<ClassScores>,
}

impl MultiLabelMetrics {
    /// Scores `probabilities` (per text, per label) at `threshold` against `truth` (per text,
    /// 1 or 0 per label), labels named by `names`.
    pub fn compute(
        truth: &[Vec<f32>],
        probabilities: &[Vec<f32>],
        names: &[String],
        threshold: f64,
    ) -> MultiLabelMetrics {
        assert_eq!(truth.len(), probabilities.len(), "one prediction per text");
        let k = names.len();
        // Per label: true positives, predicted positives, actual positives.
        let (mut tp, mut predicted, mut actual) = (vec![0u64; k], vec![0u64; k], vec![0u64; k]);
        let (mut exact, mut wrong) = (0u64, 0u64);
        for (labels, scores) in truth.iter().zip(probabilities) {
            let mut all_right = true;
            for c in 0..k {
                let (is, said) = (labels[c] >= 0.5, f64::from(scores[c]) >= threshold);
                tp[c] += u64::from(is && said);
                predicted[c] += u64::from(said);
                actual[c] += u64::from(is);
                if is != said {
                    wrong += 1;
                    all_right = false;
                }
            }
            exact += u64::from(all_right);
        }
        let per_label: Vec<ClassScores> = (0..k)
            .map(|c| scores(&names[c], tp[c], predicted[c], actual[c]))
            .collect();
        let micro = scores(
            "",
            tp.iter().sum(),
            predicted.iter().sum(),
            actual.iter().sum(),
        );
        let texts = truth.len() as f64;
        let average = Averages::of(&per_label);
        MultiLabelMetrics {
            threshold,
            subset_accuracy: ratio(exact as f64, texts),
            hamming_loss: ratio(wrong as f64, texts * k as f64),
            precision_micro: micro.precision,
            recall_micro: micro.recall,
            f1_micro: micro.f1,
            precision_macro: average.precision_macro,
            recall_macro: average.recall_macro,
            f1_macro: average.f1_macro,
            precision_weighted: average.precision_weighted,
            recall_weighted: average.recall_weighted,
            f1_weighted: average.f1_weighted,
            per_label,
        }
    }

    /// The threshold from 0.05 to 0.95 (in steps of 0.05) with the best micro F1 on `truth`:
    /// what train tunes on validation and saves with the model, and evaluate by default.
    pub fn tuned_threshold(
        truth: &[Vec<f32>],
        probabilities: &[Vec<f32>],
        names: &[String],
    ) -> f64 {
        let candidates: Vec<f64> = (1..20).map(|i| f64::from(i) * 0.05).collect();
        MultiLabelMetrics::best_threshold(truth, probabilities, names, &candidates)
    }

    /// The threshold among `candidates` with the best micro F1 on `truth` (the first of
    /// equals).
    pub fn best_threshold(
        truth: &[Vec<f32>],
        probabilities: &[Vec<f32>],
        names: &[String],
        candidates: &[f64],
    ) -> f64 {
        let mut best = (f64::NEG_INFINITY, 0.5);
        for &threshold in candidates {
            let f1 = MultiLabelMetrics::compute(truth, probabilities, names, threshold).f1_micro;
            if f1 > best.0 {
                best = (f1, threshold);
            }
        }
        best.1
    }
}

/// Precision, recall and F1 averaged over classes (or labels): plainly (macro) and weighted by
/// each one's support, as both classification tasks report them.
struct Averages {
    precision_macro: f64,
    recall_macro: f64,
    f1_macro: f64,
    precision_weighted: f64,
    recall_weighted: f64,
    f1_weighted: f64,
}

impl Averages {
    fn of(classes: &[ClassScores]) -> Averages {
        let support = classes.iter().map(|c| c.support).sum::<u64>() as f64;
        let plain = |f: fn(&ClassScores) -> f64| mean_of(classes, f);
        let weighted = |f: fn(&ClassScores) -> f64| {
            ratio(
                classes.iter().map(|c| f(c) * c.support as f64).sum(),
                support,
            )
        };
        Averages {
            precision_macro: plain(|c| c.precision),
            recall_macro: plain(|c| c.recall),
            f1_macro: plain(|c| c.f1),
            precision_weighted: weighted(|c| c.precision),
            recall_weighted: weighted(|c| c.recall),
            f1_weighted: weighted(|c| c.f1),
        }
    }
}

/// The mean of `f` over `items` (0 for none): the macro average of a class or target score.
fn mean_of<T>(items: &[T], f: fn(&T) -> f64) -> f64 {
    items.iter().map(f).sum::<f64>() / items.len().max(1) as f64
}

/// Precision, recall and F1 of a class from its true positives, predictions and support.
fn scores(label: &str, tp: u64, predicted: u64, support: u64) -> ClassScores {
    let precision = ratio(tp as f64, predicted as f64);
    let recall = ratio(tp as f64, support as f64);
    ClassScores {
        label: label.to_string(),
        precision,
        recall,
        f1: ratio(2.0 * precision * recall, precision + recall),
        support,
    }
}

/// One regression target's scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetScores {
    pub target: String,
    pub mse: f64,
    pub rmse: f64,
    pub mae: f64,
    pub r2: f64,
    pub pearson: f64,
    pub spearman: f64,
}

/// Regression scores: each the mean over targets of the per-target score (scikit-learn's
/// `multioutput="uniform_average"`), and per target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegressionMetrics {
    pub mse: f64,
    pub rmse: f64,
    pub mae: f64,
    pub r2: f64,
    pub pearson: f64,
    pub spearman: f64,
    pub per_target: Vec<TargetScores>,
}

impl RegressionMetrics {
    /// Scores `predicted` against `truth` (per text, one value per target named by `names`).
    pub fn compute(
        truth: &[Vec<f32>],
        predicted: &[Vec<f32>],
        names: &[String],
    ) -> RegressionMetrics {
        assert_eq!(truth.len(), predicted.len(), "one prediction per text");
        let column = |rows: &[Vec<f32>], t: usize| -> Vec<f64> {
            rows.iter().map(|row| f64::from(row[t])).collect()
        };
        let per_target: Vec<TargetScores> = names
            .iter()
            .enumerate()
            .map(|(t, name)| target_scores(name, &column(truth, t), &column(predicted, t)))
            .collect();
        let mean = |f: fn(&TargetScores) -> f64| mean_of(&per_target, f);
        RegressionMetrics {
            mse: mean(|t| t.mse),
            rmse: mean(|t| t.rmse),
            mae: mean(|t| t.mae),
            r2: mean(|t| t.r2),
            pearson: mean(|t| t.pearson),
            spearman: mean(|t| t.spearman),
            per_target,
        }
    }
}

fn target_scores(name: &str, truth: &[f64], predicted: &[f64]) -> TargetScores {
    let n = truth.len().max(1) as f64;
    let errors = truth.iter().zip(predicted).map(|(y, p)| p - y);
    let mse = errors.clone().map(|e| e * e).sum::<f64>() / n;
    let mae = errors.map(f64::abs).sum::<f64>() / n;
    let mean = truth.iter().sum::<f64>() / n;
    let total: f64 = truth.iter().map(|y| (y - mean).powi(2)).sum();
    let residual = mse * n;
    // scikit-learn's r2_score for a constant truth: 1 when it is predicted exactly, else 0.
    let r2 = match (total == 0.0, residual == 0.0) {
        (true, true) => 1.0,
        (true, false) => 0.0,
        _ => 1.0 - residual / total,
    };
    TargetScores {
        target: name.to_string(),
        mse,
        rmse: mse.sqrt(),
        mae,
        r2,
        pearson: pearson(truth, predicted),
        spearman: pearson(&ranks(truth), &ranks(predicted)),
    }
}

/// Pearson's r; 0 when either side is constant.
fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().max(1) as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    ratio(sxy, (sxx * syy).sqrt())
}

/// 1-based ranks, ties sharing their mean rank (SciPy's `rankdata(method="average")`).
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        let shared = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = shared;
        }
        start = end;
    }
    ranks
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
    fn multi_label_scores_match_scikit_learn() {
        // sklearn, y_true=[[1,0,1],[0,1,0],[1,1,0],[0,0,1]], y_pred at 0.5 =
        // [[1,0,0],[0,1,0],[1,0,1],[0,0,1]]: subset accuracy 0.5, hamming 3/12, f1 micro
        // 2·4/(5 predicted + 6 true) = 8/11, per label f1 [1, 2/3, 1/2], supports all 2.
        let truth =
            [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]].map(|r| r.map(|v| v as f32).to_vec());
        let scores = [
            [0.9, 0.1, 0.4],
            [0.2, 0.7, 0.1],
            [0.8, 0.3, 0.6],
            [0.1, 0.2, 0.9],
        ]
        .map(|r: [f32; 3]| r.to_vec());
        let m = MultiLabelMetrics::compute(&truth, &scores, &names(3), 0.5);
        assert!((m.subset_accuracy - 0.5).abs() < 1e-12);
        assert!((m.hamming_loss - 0.25).abs() < 1e-12);
        assert!((m.f1_micro - 8.0 / 11.0).abs() < 1e-12);
        assert!((m.f1_macro - (1.0 + 2.0 / 3.0 + 0.5) / 3.0).abs() < 1e-12);
        assert!((m.f1_weighted - m.f1_macro).abs() < 1e-12);
        assert_eq!(m.per_label[2].support, 2);
        // At 0.35 row 0's label 2 (0.4) turns on, right: micro F1 10/12.
        let best = MultiLabelMetrics::best_threshold(&truth, &scores, &names(3), &[0.35, 0.5]);
        assert_eq!(best, 0.35);
    }

    #[test]
    fn regression_scores_match_scipy_and_scikit_learn() {
        // y=[1,2,3,4], p=[1.5,2,2.5,5]: mse (0.25+0+0.25+1)/4 = 0.375, mae 0.5,
        // r2 1 - 1.5/5 = 0.7; pearson 5.5/√36.25 (scipy), spearman 1 (same order).
        let truth = [1.0, 2.0, 3.0, 4.0].map(|v| vec![v]);
        let predicted = [1.5, 2.0, 2.5, 5.0].map(|v| vec![v]);
        let m = RegressionMetrics::compute(&truth, &predicted, &names(1));
        assert!((m.mse - 0.375).abs() < 1e-12);
        assert!((m.rmse - 0.375f64.sqrt()).abs() < 1e-12);
        assert!((m.mae - 0.5).abs() < 1e-12);
        assert!((m.r2 - 0.7).abs() < 1e-12);
        assert!(
            (m.pearson - 5.5 / 36.25f64.sqrt()).abs() < 1e-12,
            "{}",
            m.pearson
        );
        assert!((m.spearman - 1.0).abs() < 1e-12);
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0]);
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
