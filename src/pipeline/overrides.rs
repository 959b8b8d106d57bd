//! `--set KEY=VALUE`: a change to a pipeline made on the command line, for one run or a CI
//! job, without editing the file. `params.NAME[.SUB…]` replaces a param (which must exist: a
//! typo is an error, not a new param nobody reads) before the stages are interpolated, so
//! every `${params.NAME}` sees it; `stages.ID.with.KEY[.SUB…]` sets a stage param (the
//! plugin's schema then checks the key, as for one written in the file). VALUE is read as a
//! plain YAML scalar: `3` an integer, `3e-5` a number, `true` a boolean, anything else text.

use serde_json::{Map, Value as Json};

/// One `--set`, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// As the user wrote it, for the lock file and messages.
    pub text: String,
    pub target: Target,
    /// Path inside the params, or inside the stage's `with:`.
    pub path: Vec<String>,
    pub value: Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Params,
    Stage(String),
}

impl Override {
    pub fn parse(text: &str) -> Result<Override, String> {
        let bad = |why: &str| format!("--set {text}: {why}");
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| bad("expected KEY=VALUE"))?;
        let parts: Vec<String> = key.split('.').map(str::to_string).collect();
        if parts.iter().any(String::is_empty) {
            return Err(bad("the key has an empty part"));
        }
        let (target, path) = match parts.as_slice() {
            [params, path @ ..] if params == "params" && !path.is_empty() => {
                (Target::Params, path.to_vec())
            }
            [stages, id, with, path @ ..]
                if stages == "stages" && with == "with" && !path.is_empty() =>
            {
                (Target::Stage(id.clone()), path.to_vec())
            }
            _ => {
                return Err(bad(
                    "the key must be `params.NAME` or `stages.ID.with.KEY` (dotted for nested keys)",
                ));
            }
        };
        Ok(Override {
            text: text.to_string(),
            target,
            path,
            value: super::interpolate::typed(value.to_string()),
        })
    }

    /// Replaces the param this override names; it must exist.
    pub fn apply_to_params(&self, params: &mut Json) -> Result<(), String> {
        let (last, parents) = self.path.split_last().expect("parsed with a path");
        let mut node = params;
        for part in parents {
            node = node
                .get_mut(part)
                .filter(|n| n.is_object())
                .ok_or_else(|| self.no_param())?;
        }
        let slot = node
            .as_object_mut()
            .and_then(|map| map.get_mut(last))
            .ok_or_else(|| self.no_param())?;
        *slot = self.value.clone();
        Ok(())
    }

    /// Sets the stage param this override names, creating the mappings above it.
    pub fn apply_to_with(&self, with: &mut Json) -> Result<(), String> {
        let (last, parents) = self.path.split_last().expect("parsed with a path");
        let mut node = with;
        for part in parents {
            let map = as_mapping(node).ok_or_else(|| self.not_a_mapping(part))?;
            node = map
                .entry(part.clone())
                .or_insert_with(|| Json::Object(Map::new()));
        }
        let map = as_mapping(node).ok_or_else(|| self.not_a_mapping(last))?;
        map.insert(last.clone(), self.value.clone());
        Ok(())
    }

    fn no_param(&self) -> String {
        format!(
            "--set {}: the pipeline has no param `{}` (add it under `params:` first)",
            self.text,
            self.path.join(".")
        )
    }

    fn not_a_mapping(&self, part: &str) -> String {
        format!(
            "--set {}: `{part}` is inside a value that is not a mapping",
            self.text
        )
    }
}

/// `node` as a mapping; `null` (a `with:` left empty) becomes an empty one.
fn as_mapping(node: &mut Json) -> Option<&mut Map<String, Json>> {
    if node.is_null() {
        *node = Json::Object(Map::new());
    }
    node.as_object_mut()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_keys_and_types_values() {
        let o = Override::parse("params.lr=3e-5").unwrap();
        assert_eq!(
            (o.target, o.path, o.value),
            (Target::Params, vec!["lr".into()], json!(3e-5))
        );
        let o = Override::parse("stages.train.with.training.epochs=2").unwrap();
        assert_eq!(o.target, Target::Stage("train".into()));
        assert_eq!(
            (o.path.join("."), o.value),
            ("training.epochs".into(), json!(2))
        );
        assert_eq!(
            Override::parse("params.name=a=b").unwrap().value,
            json!("a=b")
        );
        for bad in [
            "params.lr",
            "lr=1",
            "stages.train.epochs=2",
            "params..x=1",
            "params=1",
        ] {
            assert!(Override::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn params_must_exist_and_with_keys_are_created() {
        let mut params = json!({ "seed": 42, "opt": { "lr": 0.1 } });
        Override::parse("params.opt.lr=0.2")
            .unwrap()
            .apply_to_params(&mut params)
            .unwrap();
        assert_eq!(params["opt"]["lr"], json!(0.2));
        let err = Override::parse("params.sed=1")
            .unwrap()
            .apply_to_params(&mut params);
        assert!(err.unwrap_err().contains("no param `sed`"));
        let mut with = json!(null);
        Override::parse("stages.t.with.training.epochs=2")
            .unwrap()
            .apply_to_with(&mut with)
            .unwrap();
        assert_eq!(with, json!({ "training": { "epochs": 2 } }));
    }
}
