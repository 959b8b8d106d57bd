//! Parquet files (pandas' `to_parquet`, `datasets`' `to_parquet`, Spark): only the text, text pair and
//! label columns are read. Text must be a string column; a label column may hold strings,
//! integers or booleans (plain or dictionary-encoded, as pandas writes a categorical).

use std::path::Path;

use anyhow::{Context, Result, bail};
use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::{Cleaner, Fields, Place, resolve_column};

pub fn read(path: &Path, cleaner: &mut Cleaner) -> Result<()> {
    let (params, shown) = (cleaner.params, cleaner.shown);
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", shown.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("cannot read {} as Parquet", shown.display()))?;
    let schema = builder.schema().clone();
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let resolve = |column, role| {
        resolve_column(
            column,
            Some(&names),
            "its columns are",
            names.len(),
            shown,
            role,
        )
    };
    let (text_col, label_col) = (
        resolve(&params.text, "text")?,
        resolve(&params.label, "label")?,
    );
    let pair_col = match &params.text_pair {
        Some(column) => Some(resolve(column, "text pair")?),
        None => None,
    };
    for (column, role) in
        std::iter::once((text_col, "text")).chain(pair_col.map(|c| (c, "text pair")))
    {
        check_type(
            shown,
            &names[column],
            role,
            schema.field(column).data_type(),
        )?;
    }
    check_type(
        shown,
        &names[label_col],
        "label",
        schema.field(label_col).data_type(),
    )?;
    let total_rows = u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
    let projected = [Some(text_col), pair_col, Some(label_col)];
    let mask = ProjectionMask::roots(builder.parquet_schema(), projected.into_iter().flatten());
    let reader = builder
        .with_projection(mask)
        .build()
        .with_context(|| format!("cannot read {} as Parquet", shown.display()))?;
    let mut row = 0u64;
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: a damaged row group", shown.display()))?;
        let strings = |name: &str| -> Result<arrow::array::ArrayRef> {
            let column = batch.column_by_name(name).with_context(|| {
                format!(
                    "{}: column `{name}` is missing from a row group",
                    shown.display()
                )
            })?;
            cast(column, &DataType::Utf8).with_context(|| {
                format!(
                    "{}: column `{name}` cannot be read as text",
                    shown.display()
                )
            })
        };
        let texts = strings(&names[text_col])?;
        let pairs = pair_col.map(|c| strings(&names[c])).transpose()?;
        let labels = strings(&names[label_col])?;
        let (texts, labels) = (texts.as_string::<i32>(), labels.as_string::<i32>());
        let pairs = pairs.as_ref().map(|p| p.as_string::<i32>());
        for i in 0..batch.num_rows() {
            row += 1;
            let value = |column: &arrow::array::StringArray| {
                if column.is_null(i) {
                    String::new()
                } else {
                    column.value(i).to_string()
                }
            };
            let fields = Fields {
                text: value(texts),
                text_pair: pairs.map(value),
                label: value(labels),
            };
            cleaner.take(Place::Row(row), fields)?;
        }
        cleaner.progress(row, total_rows);
    }
    Ok(())
}

/// Text from string columns only (a number is not a text); labels from strings, integers and
/// booleans (a float label is a regression target, which this stage does not read).
fn check_type(shown: &Path, name: &str, role: &str, data_type: &DataType) -> Result<()> {
    let readable = |t: &DataType| match role {
        "text" | "text pair" => {
            matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
        }
        _ => {
            t.is_integer()
                || matches!(
                    t,
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Boolean
                )
        }
    };
    let ok = match data_type {
        DataType::Dictionary(_, values) => readable(values),
        other => readable(other),
    };
    if !ok {
        let expected = if role != "label" {
            "strings"
        } else {
            "strings, integers or booleans"
        };
        bail!(
            "{}: the {role} column `{name}` holds {data_type}; it must hold {expected}",
            shown.display()
        );
    }
    Ok(())
}
