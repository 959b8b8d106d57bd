//! The deterministic, seeded, optionally stratified train/validation/test split.

use anyhow::{Result, bail};
use finetune_core::rng::SplitMix64;

use crate::params::{SplitLike, SplitParams};
use crate::read::{Table, Target};

/// Row indices of each split, each in file order.
pub struct Splits {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
    pub test: Vec<usize>,
}

/// How many rows of each group a sample of `rows` takes: shares proportional to the group
/// sizes, rounded by largest remainder so that they add up to `rows` exactly.
fn sample_quotas(groups: &[Vec<usize>], rows: usize) -> Result<Vec<usize>> {
    let total: usize = groups.iter().map(Vec::len).sum();
    if rows == 0 || rows > total {
        bail!("split.sample ({rows}) must be between 1 and the {total} rows read");
    }
    let exact: Vec<f64> = groups
        .iter()
        .map(|g| g.len() as f64 * rows as f64 / total as f64)
        .collect();
    let mut quotas: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut by_remainder: Vec<usize> = (0..groups.len()).collect();
    by_remainder.sort_by(|&a, &b| {
        let remainder = |i: usize| exact[i] - exact[i].floor();
        remainder(b).total_cmp(&remainder(a)).then(a.cmp(&b))
    });
    let missing = rows - quotas.iter().sum::<usize>();
    for &i in by_remainder.iter().take(missing) {
        quotas[i] += 1;
    }
    Ok(quotas)
}

/// Divides `pool` (indices into `table.rows`, in file order). With `stratify`, every label is
/// split on its own (so each split keeps the label shares); per label, `round(n · fraction)`
/// rows go to test and to validation. Rows are shuffled with SplitMix64 from `seed`, then each
/// split is put back in file order.
pub fn split(table: &Table, pool: &[usize], params: &SplitParams) -> Result<Splits> {
    if params.like == Some(SplitLike::Datasets) {
        return split_like_datasets(pool, params);
    }
    let groups: Vec<Vec<usize>> = if params.stratified() {
        (0..table.labels.len() as u32)
            .map(|label| {
                pool.iter()
                    .copied()
                    .filter(|&i| table.rows[i].target == Target::Class(label))
                    .collect()
            })
            .collect()
    } else {
        vec![pool.to_vec()]
    };
    let quotas = match params.sample {
        Some(rows) => sample_quotas(&groups, rows)?,
        None => groups.iter().map(Vec::len).collect(),
    };
    let mut rng = SplitMix64::new(params.seed);
    let mut splits = Splits {
        train: Vec::new(),
        validation: Vec::new(),
        test: Vec::new(),
    };
    for (mut group, quota) in groups.into_iter().zip(quotas) {
        rng.shuffle(&mut group);
        group.truncate(quota);
        let n = group.len() as f64;
        let n_test = (n * params.test()).round() as usize;
        let n_validation = ((n * params.validation()).round() as usize).min(group.len() - n_test);
        splits.test.extend_from_slice(&group[..n_test]);
        splits
            .validation
            .extend_from_slice(&group[n_test..n_test + n_validation]);
        splits
            .train
            .extend_from_slice(&group[n_test + n_validation..]);
    }
    for (name, rows, fraction) in [
        ("validation", &splits.validation, params.validation()),
        ("test", &splits.test, params.test()),
    ] {
        if fraction > 0.0 && rows.is_empty() {
            bail!(
                "the {name} split is empty: {} rows{} are too few for a {name} fraction of {fraction}; use more data or a larger fraction",
                pool.len(),
                if params.stratified() {
                    " split per label"
                } else {
                    ""
                }
            );
        }
    }
    if splits.train.is_empty() {
        bail!("the train split is empty: {} rows are too few", pool.len());
    }
    splits.train.sort_unstable();
    splits.validation.sort_unstable();
    splits.test.sort_unstable();
    Ok(splits)
}

/// datasets' `train_test_split(test_size, seed)` of the `n` rows of `pool`: `ceil(n · test)`
/// test rows, the first of `default_rng(seed).permutation(n)`, the rest for training.
fn split_like_datasets(pool: &[usize], params: &SplitParams) -> Result<Splits> {
    let n = pool.len();
    let order: Vec<usize> = crate::numpy::permutation(params.seed, n)
        .into_iter()
        .map(|i| pool[i])
        .collect();
    let n_test = (params.test() * n as f64).ceil() as usize;
    if n_test >= n {
        bail!("the train split is empty: {n} rows are too few");
    }
    if params.test() > 0.0 && n_test == 0 {
        bail!("the test split is empty: {n} rows");
    }
    let mut test = order[..n_test].to_vec();
    let mut train = order[n_test..].to_vec();
    test.sort_unstable();
    train.sort_unstable();
    Ok(Splits {
        train,
        validation: Vec::new(),
        test,
    })
}
