//! `matrix:` on a stage, as DVC has it: `matrix: { lr: [1e-5, 3e-5], seed: [1, 2] }` declares
//! one stage per combination (in file order, the last name varying fastest), each with its
//! own id (`train@lr=1e-5,seed=1`), its own cache key, and `${item.lr}` bound in its params.
//! A `needs` that names the declared id means every combination (a report over a sweep).

use serde_json::{Map, Value as Json};

use super::StageDecl;
use super::yaml::{Mark, Node, Value};

/// One combination of a matrix's values.
#[derive(Debug, Clone, PartialEq)]
pub struct Combination {
    /// `{ "lr": 1e-5, "seed": 1 }`, for `${item.NAME}`.
    pub item: Json,
}

impl Combination {
    /// The stage id of this combination of stage `base`.
    pub fn id(&self, base: &str) -> String {
        let parts: Vec<String> = self
            .item
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, value)| format!("{name}={}", text_of(value)))
            .collect();
        format!("{base}@{}", parts.join(","))
    }
}

/// A value as it appears in a stage id: learning rates read as people write them (`1e-5`,
/// not `0.00001`), other numbers as JSON writes them.
fn text_of(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        Json::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or_default();
            if f != 0.0 && (f.abs() < 1e-3 || f.abs() >= 1e6) {
                format!("{f:e}")
            } else {
                n.to_string()
            }
        }
        other => other.to_string(),
    }
}

/// Every combination of `matrix` (a mapping of names to non-empty lists of distinct scalars),
/// or the position and text of what is wrong with it.
pub fn combinations(matrix: &Node) -> Result<Vec<Combination>, (Mark, String)> {
    let Value::Map(entries) = &matrix.value else {
        return Err((
            matrix.mark,
            "expected a mapping of names to lists of values".into(),
        ));
    };
    if entries.is_empty() {
        return Err((matrix.mark, "a matrix needs at least one name".into()));
    }
    let mut combinations = vec![Map::new()];
    for (name, mark, values) in entries {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err((
                *mark,
                format!("`{name}`: matrix names use letters, digits and `_`"),
            ));
        }
        let values = scalars(name, values)?;
        combinations = combinations
            .into_iter()
            .flat_map(|done| {
                values.iter().map(move |value| {
                    let mut next = done.clone();
                    next.insert(name.clone(), value.clone());
                    next
                })
            })
            .collect();
    }
    Ok(combinations
        .into_iter()
        .map(|item| Combination {
            item: Json::Object(item),
        })
        .collect())
}

/// The values of one matrix name: scalars that can stand in a stage id, each once.
fn scalars(name: &str, node: &Node) -> Result<Vec<Json>, (Mark, String)> {
    let Value::Seq(items) = &node.value else {
        return Err((node.mark, format!("`{name}`: expected a list of values")));
    };
    if items.is_empty() {
        return Err((node.mark, format!("`{name}`: the list of values is empty")));
    }
    let mut values: Vec<Json> = Vec::new();
    for item in items {
        let value = match &item.value {
            Value::Int(i) => Json::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map(Json::Number).ok_or((
                item.mark,
                format!("`{name}`: infinite and NaN numbers are not allowed"),
            ))?,
            Value::Bool(b) => Json::Bool(*b),
            Value::Str(s) => Json::String(s.clone()),
            _ => {
                return Err((
                    item.mark,
                    format!("`{name}`: matrix values are numbers, booleans or strings"),
                ));
            }
        };
        let text = text_of(&value);
        if text.is_empty()
            || !text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+'))
        {
            return Err((
                item.mark,
                format!(
                    "`{name}`: `{text}` cannot stand in a stage id (letters, digits, `_`, `-`, `.`, `+`)"
                ),
            ));
        }
        if values.contains(&value) {
            return Err((item.mark, format!("`{name}`: `{text}` is listed twice")));
        }
        values.push(value);
    }
    Ok(values)
}

/// Replaces each need on a matrix stage's declared id by all of its combinations.
pub fn fan_in(mut stages: Vec<StageDecl>) -> Vec<StageDecl> {
    let expanded = |base: &str, stages: &[StageDecl]| -> Vec<String> {
        stages
            .iter()
            .filter(|s| s.matrix_of.as_deref() == Some(base))
            .map(|s| s.id.clone())
            .collect()
    };
    let needs: Vec<Vec<String>> = stages
        .iter()
        .map(|decl| {
            decl.needs
                .iter()
                .flat_map(|need| match expanded(need, &stages) {
                    ids if ids.is_empty() => vec![need.clone()],
                    ids => ids,
                })
                .collect()
        })
        .collect();
    for (decl, needs) in stages.iter_mut().zip(needs) {
        decl.needs = needs;
    }
    stages
}
