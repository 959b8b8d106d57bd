//! Writing the outputs: one Parquet file per split, labels.json, stats.json.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{ArrayRef, Int64Array, ListArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Float32Type, Schema};
use finetune_core::output::write_json;
use finetune_task::ProblemType;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::json;

use crate::params::Params;
use crate::read::{Table, Target};
use crate::split::Splits;

pub fn write_outputs(out: &Path, table: &Table, splits: &Splits, params: &Params) -> Result<()> {
    let mut split_stats = serde_json::Map::new();
    for (name, rows) in [
        ("train", &splits.train),
        ("validation", &splits.validation),
        ("test", &splits.test),
    ] {
        let pairs = params.text_pair.is_some();
        let file = out.join(format!("{name}.parquet"));
        write_split(&file, table, rows, pairs, params.problem_type())?;
        split_stats.insert(name.to_string(), split_summary(table, rows));
    }
    let mut labels = json!({
        "names": table.labels,
        "id2label": table.labels.iter().enumerate().map(|(i, l)| (i.to_string(), json!(l))).collect::<serde_json::Map<_, _>>(),
        "label2id": table.labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect::<serde_json::Map<_, _>>(),
    });
    // Single-label classification is what a labels.json without `problem_type` means (as
    // before other tasks existed), so that its outputs keep their bytes.
    let problem = params.problem_type();
    if problem != ProblemType::SingleLabelClassification {
        labels["problem_type"] = json!(problem.as_str());
    }
    write_json(&out.join("labels.json"), &labels)?;
    let mut stats = json!({
        "rows_read": table.rows_read,
        "rows_kept": table.rows.len(),
        "dropped": table.dropped,
        "splits": split_stats,
    });
    // `source` for one file (as before splits could be given), `sources` by split otherwise.
    let (key, sources) = match &params.path {
        Some(path) => ("source", json!(path)),
        None => {
            let by_split: serde_json::Map<_, _> = params
                .sources()
                .iter()
                .map(|s| {
                    let split = s.split.map_or("train", |n| n.as_str());
                    (split.to_string(), json!(s.path))
                })
                .collect();
            ("sources", by_split.into())
        }
    };
    if let Some(object) = stats.as_object_mut() {
        object.shift_insert(0, key.to_string(), sources);
    }
    write_json(&out.join("stats.json"), &stats)
}

/// A split's rows, and per label its rows (for multi-label, the rows that have it), or per
/// regression target the mean, minimum and maximum.
fn split_summary(table: &Table, rows: &[usize]) -> serde_json::Value {
    let mut per_label: BTreeMap<&str, u64> = table.labels.iter().map(|l| (l.as_str(), 0)).collect();
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); table.labels.len()];
    for &i in rows {
        match &table.rows[i].target {
            Target::Class(class) => {
                *per_label.entry(&table.labels[*class as usize]).or_default() += 1
            }
            Target::Classes(classes) => {
                for &class in classes {
                    *per_label.entry(&table.labels[class as usize]).or_default() += 1;
                }
            }
            Target::Values(targets) => {
                for (column, &value) in values.iter_mut().zip(targets) {
                    column.push(f64::from(value));
                }
            }
        }
    }
    if !values.iter().all(Vec::is_empty) {
        let described: serde_json::Map<_, _> = table
            .labels
            .iter()
            .zip(&values)
            .map(|(name, column)| (name.clone(), describe(column)))
            .collect();
        return json!({ "rows": rows.len(), "targets": described });
    }
    json!({ "rows": rows.len(), "labels": per_label })
}

/// `{mean, min, max}` of a target's values.
fn describe(values: &[f64]) -> serde_json::Value {
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({ "mean": mean, "min": min, "max": max })
}

/// The split's rows as columns `text`, `text_pair` (for pairs only, so that one-text outputs
/// keep their bytes) and `label`.
fn write_split(
    path: &Path,
    table: &Table,
    rows: &[usize],
    pairs: bool,
    problem: ProblemType,
) -> Result<()> {
    let text = |i: usize| table.rows[i].text.as_str();
    let pair = |i: usize| table.rows[i].text_pair.as_deref().unwrap_or_default();
    let mut fields = vec![Field::new("text", DataType::Utf8, false)];
    let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(
        rows.iter().map(|&i| text(i)),
    ))];
    if pairs {
        fields.push(Field::new("text_pair", DataType::Utf8, false));
        columns.push(Arc::new(StringArray::from_iter_values(
            rows.iter().map(|&i| pair(i)),
        )));
    }
    let (field, column) = label_column(table, rows, problem);
    fields.push(field);
    columns.push(column);
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    write_batch(path, schema, &batch)
}

/// The `label` column: a label id (int64, single-label), or a list<float32> per row: 1 for each
/// label the row has and 0 for the rest (multi-label, as Hugging Face's multi-label `labels`),
/// or the targets' values (regression).
fn label_column(table: &Table, rows: &[usize], problem: ProblemType) -> (Field, ArrayRef) {
    if problem == ProblemType::SingleLabelClassification {
        let ids = rows.iter().map(|&i| match table.rows[i].target {
            Target::Class(class) => Some(i64::from(class)),
            _ => None,
        });
        let column = Arc::new(Int64Array::from_iter(ids));
        return (Field::new("label", DataType::Int64, false), column);
    }
    let width = table.labels.len();
    let vectors = rows.iter().map(|&i| match &table.rows[i].target {
        Target::Class(class) => one_hot(width, std::slice::from_ref(class)),
        Target::Classes(classes) => one_hot(width, classes),
        Target::Values(values) => values.iter().map(|&v| Some(v)).collect(),
    });
    let column = ListArray::from_iter_primitive::<Float32Type, _, _>(vectors.map(Some));
    let item = Arc::new(Field::new_list_field(DataType::Float32, true));
    (
        Field::new("label", DataType::List(item), false),
        Arc::new(column),
    )
}

fn one_hot(width: usize, classes: &[u32]) -> Vec<Option<f32>> {
    let mut vector = vec![Some(0.0); width];
    for &class in classes {
        vector[class as usize] = Some(1.0);
    }
    vector
}

fn write_batch(path: &Path, schema: Arc<Schema>, batch: &RecordBatch) -> Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(properties))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(())
}
