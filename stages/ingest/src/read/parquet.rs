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

use std::sync::Arc;

use arrow::datatypes::Field;
use finetune_task::ProblemType;

use super::{Cleaner, Fields, LabelField, Place, resolve_column};

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
    let text_col = resolve(&params.text, "text")?;
    let label_cols = params
        .label
        .columns()
        .iter()
        .map(|column| resolve(column, "label"))
        .collect::<Result<Vec<_>>>()?;
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
    let mut label_as = Vec::with_capacity(label_cols.len());
    for &column in &label_cols {
        let label_type = schema.field(column).data_type();
        check_label_type(shown, &names[column], label_type, params.problem_type())?;
        label_as.push(match label_type {
            DataType::List(_) | DataType::LargeList(_) => {
                DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true)))
            }
            _ => DataType::Utf8,
        });
    }
    let total_rows = u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
    let projected = std::iter::once(text_col)
        .chain(pair_col)
        .chain(label_cols.iter().copied());
    let mask = ProjectionMask::roots(builder.parquet_schema(), projected);
    let reader = builder
        .with_projection(mask)
        .build()
        .with_context(|| format!("cannot read {} as Parquet", shown.display()))?;
    let mut row = 0u64;
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: a damaged row group", shown.display()))?;
        let cast_column = |batch: &arrow::array::RecordBatch, name: &str, to: &DataType| {
            let column = batch.column_by_name(name).with_context(|| {
                format!(
                    "{}: column `{name}` is missing from a row group",
                    shown.display()
                )
            })?;
            cast(column, to).with_context(|| {
                format!(
                    "{}: column `{name}` cannot be read as text",
                    shown.display()
                )
            })
        };
        let strings = |name: &str| cast_column(&batch, name, &DataType::Utf8);
        let texts = strings(&names[text_col])?;
        let pairs = pair_col.map(|c| strings(&names[c])).transpose()?;
        let labels = label_cols
            .iter()
            .zip(&label_as)
            .map(|(&column, to)| cast_column(&batch, &names[column], to))
            .collect::<Result<Vec<_>>>()?;
        let texts = texts.as_string::<i32>();
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
                label: match params.label.is_several() {
                    false => label_field(&labels[0], i),
                    true => LabelField::List(
                        labels
                            .iter()
                            .flat_map(|column| label_field(column, i).into_list())
                            .collect(),
                    ),
                },
            };
            cleaner.take(Place::Row(row), fields)?;
        }
        cleaner.progress(row, total_rows);
    }
    Ok(())
}

/// Row `i` of a label column cast to text (or to a list of texts); null is an empty label.
fn label_field(labels: &arrow::array::ArrayRef, i: usize) -> LabelField {
    let text = |column: &arrow::array::StringArray, i: usize| {
        if column.is_null(i) {
            String::new()
        } else {
            column.value(i).to_string()
        }
    };
    match labels.as_list_opt::<i32>() {
        Some(lists) if lists.is_null(i) => LabelField::List(Vec::new()),
        Some(lists) => {
            let items = lists.value(i);
            let items = items.as_string::<i32>();
            LabelField::List((0..items.len()).map(|j| text(items, j)).collect())
        }
        None => LabelField::One(text(labels.as_string::<i32>(), i)),
    }
}

/// A label column holds what its `problem_type` reads: strings, integers or booleans (labels),
/// floats too for regression, and lists of either for multi-label and regression.
fn check_label_type(
    shown: &Path,
    name: &str,
    data_type: &DataType,
    problem: ProblemType,
) -> Result<()> {
    let scalar = |t: &DataType| {
        let t = match t {
            DataType::Dictionary(_, values) => values.as_ref(),
            other => other,
        };
        t.is_integer()
            || matches!(
                t,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Boolean
            )
            || (problem == ProblemType::Regression && t.is_floating())
    };
    let (ok, expected) = match (problem, data_type) {
        (ProblemType::SingleLabelClassification, t) => (
            scalar(t),
            "strings, integers or booleans (lists are multi-label data, floats regression targets: set `problem_type`)",
        ),
        (_, DataType::List(item) | DataType::LargeList(item)) => (
            scalar(item.data_type()),
            "labels or numbers, or lists of them",
        ),
        (_, t) => (scalar(t), "labels or numbers, or lists of them"),
    };
    if !ok {
        bail!(
            "{}: the label column `{name}` holds {data_type}; for {problem} it must hold {expected}",
            shown.display()
        );
    }
    Ok(())
}

/// Text from string columns only (a number is not a text).
fn check_type(shown: &Path, name: &str, role: &str, data_type: &DataType) -> Result<()> {
    let text =
        |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
    let ok = match data_type {
        DataType::Dictionary(_, values) => text(values),
        other => text(other),
    };
    if !ok {
        bail!(
            "{}: the {role} column `{name}` holds {data_type}; it must hold strings",
            shown.display()
        );
    }
    Ok(())
}
