//! The `ingest_csv` stage: reads a CSV or TSV file of labelled texts, cleans it (trim, drop
//! empty and duplicate texts, each counted), maps labels to ids and writes a deterministic,
//! seeded, optionally stratified train/validation/test split as Parquet.
//!
//! Output: `train.parquet`, `validation.parquet`, `test.parquet` (columns `text`, `label`),
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
        "Read a CSV/TSV of labelled texts into a seeded, stratified train/validation/test split (Parquet)"
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
        vec![self.params.path.clone()]
    }

    fn run(&self, ctx: &RunContext) -> anyhow::Result<()> {
        let path = ctx.resolve(&self.params.path);
        ctx.reporter
            .message(&format!("reading {}", self.params.path.display()));
        let mut table = read::read_table(&path, &self.params.path, &self.params, ctx.reporter)?;
        if let Some(names) = &self.params.label_names {
            table.labels = named(&table.labels, names, &self.params.path)?;
        }
        if table.dropped.total() > 0 {
            ctx.reporter.message(&format!(
                "dropped {} of {} rows: {}",
                table.dropped.total(),
                table.rows_read,
                table.dropped
            ));
        }
        let splits = split::split(&table, &self.params.split)?;
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

/// The labels (in id order) under the names `label_names` gives them. A label without a name,
/// or a name for a label the data does not hold (a typo), is an error.
fn named(
    labels: &[String],
    names: &std::collections::BTreeMap<String, String>,
    path: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    if let Some(unused) = names.keys().find(|k| !labels.contains(k)) {
        anyhow::bail!(
            "`label_names` names `{unused}`, a label {} does not hold (its labels: {})",
            path.display(),
            labels.join(", ")
        );
    }
    labels
        .iter()
        .map(|label| {
            names.get(label).cloned().ok_or_else(|| {
                anyhow::anyhow!(
                    "label `{label}` of {} has no name in `label_names`",
                    path.display()
                )
            })
        })
        .collect()
}
