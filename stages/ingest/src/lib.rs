//! The `ingest_csv` stage: reads labelled texts from CSV, TSV, JSON Lines or Parquet (one
//! file, or the splits as files), cleans them (trim, drop empty and duplicate texts, each
//! counted), maps labels to ids and writes a deterministic, seeded, optionally stratified
//! train/validation/test split as Parquet. The name is older than the formats; it stays so
//! that existing pipelines and their cache keys do.
//!
//! Output: `train.parquet`, `validation.parquet`, `test.parquet` (columns `text`, `label`,
//! and `text_pair` between them for sentence pairs),
//! `labels.json` (names in id order, with HF-style `id2label`/`label2id`) and `stats.json`
//! (rows per split and label, rows dropped by reason).

mod numpy;
mod params;
mod read;
mod split;
mod write;

use std::path::PathBuf;

use finetune_core::{
    ConfigError, ConfigureContext, Job, RunContext, Stage, Value, parse_params, schema_for,
};

pub use params::Params;
use params::{Source, SplitName};

/// The `ingest_csv` plugin.
pub struct IngestCsv;

impl Stage for IngestCsv {
    fn name(&self) -> &'static str {
        "ingest_csv"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "Read labelled texts (CSV, TSV, JSON Lines, Parquet; one file or given splits) into a seeded, stratified train/validation/test split (Parquet)"
    }

    fn params_schema(&self) -> finetune_core::schemars::Schema {
        schema_for::<Params>()
    }

    fn configure(
        &self,
        with: &Value,
        _ctx: &ConfigureContext,
    ) -> Result<Box<dyn Job>, ConfigError> {
        let params: Params = parse_params(with)?;
        params.validate()?;
        Ok(Box::new(IngestJob { params }))
    }
}

struct IngestJob {
    params: Params,
}

impl Job for IngestJob {
    fn reads(&self) -> Vec<PathBuf> {
        self.params.sources().into_iter().map(|s| s.path).collect()
    }

    fn run(&self, ctx: &RunContext) -> anyhow::Result<()> {
        let sources: Vec<(Source, PathBuf)> = self
            .params
            .sources()
            .into_iter()
            .map(|s| {
                let path = ctx.resolve(&s.path);
                (s, path)
            })
            .collect();
        let shown: Vec<String> = sources
            .iter()
            .map(|(s, _)| s.path.display().to_string())
            .collect();
        ctx.reporter
            .message(&format!("reading {}", shown.join(", ")));
        let mut table = read::read_table(&sources, &self.params, ctx.reporter)?;
        if let Some(names) = &self.params.label_names {
            table.labels = named(&table.labels, names, &shown.join(", "))?;
        }
        if table.dropped.total() > 0 {
            ctx.reporter.message(&format!(
                "dropped {} of {} rows: {}",
                table.dropped.total(),
                table.rows_read,
                table.dropped
            ));
        }
        let splits = divide(&table, &sources, &self.params)?;
        write::write_outputs(&ctx.out_dir, &table, &splits, &self.params)?;
        let sampled = match self.params.split.sample {
            Some(rows) => format!("; a sample of {rows}"),
            None => String::new(),
        };
        ctx.reporter.message(&format!(
            "{} rows{sampled}: {} train, {} validation, {} test",
            table.rows.len(),
            splits.train.len(),
            splits.validation.len(),
            splits.test.len()
        ));
        Ok(())
    }
}

/// The rows of a split given as a file go to it whole; the rest (`path`, or the train file)
/// are split as the fractions say, with nothing split off for a split given as a file.
fn divide(
    table: &read::Table,
    sources: &[(Source, PathBuf)],
    params: &Params,
) -> anyhow::Result<split::Splits> {
    let given = |row: &read::Row| sources[row.source].0.split;
    let pool: Vec<usize> = (0..table.rows.len())
        .filter(|&i| matches!(given(&table.rows[i]), None | Some(SplitName::Train)))
        .collect();
    let mut splits = split::split(table, &pool, &params.split_fractions())?;
    for (i, row) in table.rows.iter().enumerate() {
        match given(row) {
            Some(SplitName::Validation) => splits.validation.push(i),
            Some(SplitName::Test) => splits.test.push(i),
            _ => {}
        }
    }
    for (source, _) in sources {
        let rows = match source.split {
            Some(SplitName::Validation) => &splits.validation,
            Some(SplitName::Test) => &splits.test,
            _ => continue,
        };
        if rows.is_empty() {
            anyhow::bail!(
                "the {} split is empty: every row of {} was dropped ({})",
                source.split.map_or("", SplitName::as_str),
                source.path.display(),
                table.dropped
            );
        }
    }
    Ok(splits)
}

/// The labels (in id order) under the names `label_names` gives them. A label without a name,
/// or a name for a label the data does not hold (a typo), is an error.
fn named(
    labels: &[String],
    names: &std::collections::BTreeMap<String, String>,
    shown: &str,
) -> anyhow::Result<Vec<String>> {
    if let Some(unused) = names.keys().find(|k| !labels.contains(k)) {
        anyhow::bail!(
            "`label_names` names `{unused}`, a label {shown} does not hold (its labels: {})",
            labels.join(", ")
        );
    }
    labels
        .iter()
        .map(|label| {
            names.get(label).cloned().ok_or_else(|| {
                anyhow::anyhow!("label `{label}` of {shown} has no name in `label_names`")
            })
        })
        .collect()
}
