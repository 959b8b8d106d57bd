//! Why a stage is stale: compares the inputs recorded in the lock file with today's.

use serde_json::Value;

use crate::cache::lockfile::{KeyInputs, LockEntry};

/// A short sentence naming what changed since the recorded run ("param `lr` changed: ...").
pub fn why_stale(recorded: Option<&LockEntry>, now: &KeyInputs, key: &str) -> String {
    let Some(old) = recorded else {
        return "never run".into();
    };
    if old.key == key {
        return "the cached output is gone (removed by `finetune gc`?)".into();
    }
    let mut reasons = Vec::new();
    if old.inputs.uses != now.uses {
        reasons.push(format!(
            "plugin changed: {} -> {}",
            old.inputs.uses, now.uses
        ));
    } else if old.inputs.version != now.version {
        reasons.push(format!(
            "plugin `{}` version changed: {} -> {}",
            now.uses, old.inputs.version, now.version
        ));
    }
    let mut params = Vec::new();
    diff_values("", &old.inputs.params, &now.params, &mut params);
    reasons.extend(
        params
            .into_iter()
            .map(|(path, before, after)| format!("param `{path}` changed: {before} -> {after}")),
    );
    for (path, digest) in &now.reads {
        match old.inputs.reads.get(path) {
            None => reasons.push(format!("now reads `{path}`")),
            Some(before) if before != digest => reasons.push(format!("file `{path}` changed")),
            _ => {}
        }
    }
    for path in old
        .inputs
        .reads
        .keys()
        .filter(|p| !now.reads.contains_key(*p))
    {
        reasons.push(format!("no longer reads `{path}`"));
    }
    for (stage, digest) in &now.needs {
        match old.inputs.needs.get(stage) {
            None => reasons.push(format!("now needs `{stage}`")),
            Some(before) if before != digest => {
                reasons.push(format!("upstream `{stage}` output changed"))
            }
            _ => {}
        }
    }
    for stage in old
        .inputs
        .needs
        .keys()
        .filter(|s| !now.needs.contains_key(*s))
    {
        reasons.push(format!("no longer needs `{stage}`"));
    }
    if old.inputs.extra != now.extra {
        let show = |v: &Option<Value>| v.as_ref().map_or("(none)".into(), Value::to_string);
        reasons.push(format!(
            "changed: {} -> {}",
            show(&old.inputs.extra),
            show(&now.extra)
        ));
    }
    if reasons.is_empty() {
        reasons.push("the order of `needs` changed".into());
    }
    reasons.join("; ")
}

/// Paths (dotted, `[i]` for list items) whose values differ, with both values as JSON text.
fn diff_values(path: &str, old: &Value, new: &Value, out: &mut Vec<(String, String, String)>) {
    let child = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in b {
                match a.get(key) {
                    Some(before) => diff_values(&child(key), before, value, out),
                    None => out.push((child(key), "(unset)".into(), value.to_string())),
                }
            }
            for (key, value) in a.iter().filter(|(k, _)| !b.contains_key(*k)) {
                out.push((child(key), value.to_string(), "(unset)".into()));
            }
        }
        (a, b) if a != b => out.push((path.to_string(), a.to_string(), b.to_string())),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::lockfile::OutputRecord;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn inputs(params: Value, read_digest: &str) -> KeyInputs {
        KeyInputs {
            extra: None,
            uses: "ingest_csv".into(),
            version: 1,
            params,
            needs: BTreeMap::new(),
            reads: BTreeMap::from([("data/x.tsv".to_string(), read_digest.to_string())]),
        }
    }

    #[test]
    fn names_changed_params_and_files() {
        let old = LockEntry {
            key: "old".into(),
            inputs: inputs(json!({"split": {"test": 0.2}, "trim": true}), "d1"),
            output: OutputRecord {
                digest: "o".into(),
                files: 1,
                bytes: 1,
            },
            duration_s: 0.0,
        };
        let now = inputs(json!({"split": {"test": 0.3}, "trim": true}), "d2");
        let why = why_stale(Some(&old), &now, "new");
        assert_eq!(
            why,
            "param `split.test` changed: 0.2 -> 0.3; file `data/x.tsv` changed"
        );
        assert_eq!(why_stale(None, &now, "new"), "never run");
    }
}
