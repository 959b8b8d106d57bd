//! Writing the outputs: one Parquet file per split, labels.json, stats.json.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use finetune_core::output::write_json;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::json;

use crate::params::Params;
use crate::read::Table;
use crate::split::Splits;

pub fn write_outputs(out: &Path, table: &Table, splits: &Splits, params: &Params) -> Result<()> {
    let mut split_stats = serde_json::Map::new();
    for (name, rows) in [
        ("train", &splits.train),
        ("validation", &splits.validation),
        ("test", &splits.test),
    ] {
        let pairs = params.text_pair.is_some();
        write_split(&out.join(format!("{name}.parquet")), table, rows, pairs)?;
        let mut per_label: BTreeMap<&str, u64> =
            table.labels.iter().map(|l| (l.as_str(), 0)).collect();
        for &i in rows {
            *per_label
                .entry(&table.labels[table.rows[i].label as usize])
                .or_default() += 1;
        }
        split_stats.insert(
            name.to_string(),
            json!({ "rows": rows.len(), "labels": per_label }),
        );
    }
    let labels = json!({
        "names": table.labels,
        "id2label": table.labels.iter().enumerate().map(|(i, l)| (i.to_string(), json!(l))).collect::<serde_json::Map<_, _>>(),
        "label2id": table.labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect::<serde_json::Map<_, _>>(),
    });
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

/// The split's rows as columns `text`, `text_pair` (for pairs only, so that one-text outputs
/// keep their bytes) and `label`.
fn write_split(path: &Path, table: &Table, rows: &[usize], pairs: bool) -> Result<()> {
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
    fields.push(Field::new("label", DataType::Int64, false));
    columns.push(Arc::new(Int64Array::from_iter_values(
        rows.iter().map(|&i| i64::from(table.rows[i].label)),
    )));
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(properties))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}
