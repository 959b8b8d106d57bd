//! Pipeline files: `name`, `params`, `stages` (each with `uses`, `needs`, `with`), read with
//! positions so that every error names the file, line, column, stage and key at fault.

mod interpolate;
mod matrix;
mod overrides;
pub mod yaml;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json};

use interpolate::{Scope, interpolate};
pub use overrides::{Override, Target};
use yaml::{Mark, Node, Value};

/// A pipeline file, validated for shape and interpolated, not yet checked against plugins.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file as the user named it (for messages).
    pub file: PathBuf,
    pub name: String,
    pub params: Json,
    /// In file order.
    pub stages: Vec<StageDecl>,
    /// The environment variables that hold signing keys: `FINETUNE_HMAC_KEY` and every
    /// `key_env` a stage names. Never interpolated, never passed to a command.
    pub key_variables: Vec<String>,
    /// The `--set` overrides applied, as written (recorded in the lock file).
    pub overrides: Vec<String>,
}

/// One entry of `stages:`.
#[derive(Debug, Clone)]
pub struct StageDecl {
    pub id: String,
    pub uses: String,
    pub needs: Vec<String>,
    /// `with:` after interpolation (an empty mapping when absent).
    pub with: Json,
    /// The position of the stage's own key, and of each key it contains.
    pub mark: Mark,
    marks: HashMap<String, Mark>,
    /// For one combination of a `matrix:` stage, the id it was declared under.
    pub matrix_of: Option<String>,
}

impl StageDecl {
    /// Where a dotted key path inside the stage ("with.split.seed", "needs[1]") is written;
    /// the nearest enclosing key when the exact one is absent (an unknown field's parent).
    pub fn mark_of(&self, key: &str) -> Mark {
        let mut path = key;
        loop {
            if let Some(mark) = self.marks.get(path) {
                return *mark;
            }
            match path.rfind(['.', '[']) {
                Some(cut) => path = &path[..cut],
                None => return self.mark,
            }
        }
    }
}

/// Anything wrong with a pipeline file, pinned to a place in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineError {
    pub file: PathBuf,
    pub mark: Mark,
    pub stage: Option<String>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: ",
            self.file.display(),
            self.mark.line,
            self.mark.col
        )?;
        match (&self.stage, &self.key) {
            (Some(stage), Some(key)) => write!(f, "stage `{stage}`, key `{key}`: ")?,
            (Some(stage), None) => write!(f, "stage `{stage}`: ")?,
            (None, Some(key)) => write!(f, "key `{key}`: ")?,
            (None, None) => {}
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for PipelineError {}

impl Pipeline {
    /// Reads and validates `file`. `env` resolves `${env.NAME}` (the process environment in
    /// the CLI; a fixed map in tests).
    pub fn load(
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Pipeline, PipelineError> {
        Self::load_with(file, env, &[])
    }

    /// [`Pipeline::load`] with `--set` overrides applied.
    pub fn load_with(
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        overrides: &[Override],
    ) -> Result<Pipeline, PipelineError> {
        let source = std::fs::read_to_string(file).map_err(|err| PipelineError {
            file: file.to_path_buf(),
            mark: Mark { line: 0, col: 0 },
            stage: None,
            key: None,
            message: format!("cannot read the pipeline file: {err}"),
        })?;
        Self::parse_with(file, &source, env, overrides)
    }

    pub fn parse(
        file: &Path,
        source: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Pipeline, PipelineError> {
        Self::parse_with(file, source, env, &[])
    }

    /// [`Pipeline::parse`] with `--set` overrides applied (see [`Override`]).
    pub fn parse_with(
        file: &Path,
        source: &str,
        env: &dyn Fn(&str) -> Option<String>,
        overrides: &[Override],
    ) -> Result<Pipeline, PipelineError> {
        let reader = Reader { file, overrides };
        // Editors on Windows save UTF-8 with a byte-order mark; it is no part of the YAML.
        let source = source.strip_prefix('\u{feff}').unwrap_or(source);
        let root =
            yaml::parse(source).map_err(|err| reader.error(err.mark, None, None, err.message))?;
        reader.pipeline(&root, env)
    }

    pub fn stage(&self, id: &str) -> Option<&StageDecl> {
        self.stages.iter().find(|s| s.id == id)
    }

    /// An error located at `key` of stage `stage` (a dotted path such as "with.split.seed").
    pub fn error_at(
        &self,
        stage: &StageDecl,
        key: &str,
        message: impl Into<String>,
    ) -> PipelineError {
        PipelineError {
            file: self.file.clone(),
            mark: stage.mark_of(key),
            stage: Some(stage.id.clone()),
            key: (!key.is_empty()).then(|| key.to_string()),
            message: message.into(),
        }
    }
}

struct Reader<'a> {
    file: &'a Path,
    overrides: &'a [Override],
}

const TOP_KEYS: &[&str] = &["name", "description", "params", "stages"];
const STAGE_KEYS: &[&str] = &["uses", "needs", "with", "description", "matrix"];

impl Reader<'_> {
    fn error(
        &self,
        mark: Mark,
        stage: Option<&str>,
        key: Option<&str>,
        message: impl Into<String>,
    ) -> PipelineError {
        PipelineError {
            file: self.file.to_path_buf(),
            mark,
            stage: stage.map(str::to_string),
            key: key.map(str::to_string),
            message: message.into(),
        }
    }

    fn mapping<'n>(
        &self,
        node: &'n Node,
        stage: Option<&str>,
        key: Option<&str>,
    ) -> Result<&'n [(String, Mark, Node)], PipelineError> {
        match &node.value {
            Value::Map(entries) => Ok(entries),
            _ => Err(self.error(
                node.mark,
                stage,
                key,
                format!("expected a mapping, found {}", node.kind()),
            )),
        }
    }

    fn check_keys(
        &self,
        entries: &[(String, Mark, Node)],
        allowed: &[&str],
        stage: Option<&str>,
    ) -> Result<(), PipelineError> {
        for (key, mark, _) in entries {
            if !allowed.contains(&key.as_str()) {
                return Err(self.error(
                    *mark,
                    stage,
                    Some(key),
                    format!("unknown key; expected one of: {}", allowed.join(", ")),
                ));
            }
        }
        Ok(())
    }

    fn string(&self, node: &Node, stage: Option<&str>, key: &str) -> Result<String, PipelineError> {
        match &node.value {
            Value::Str(s) if !s.is_empty() => Ok(s.clone()),
            _ => Err(self.error(
                node.mark,
                stage,
                Some(key),
                format!("expected a non-empty string, found {}", node.kind()),
            )),
        }
    }

    fn pipeline(
        &self,
        root: &Node,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Pipeline, PipelineError> {
        if root.value == Value::Null {
            return Err(self.error(
                root.mark,
                None,
                None,
                "the pipeline file is empty; it needs `name:` and `stages:`",
            ));
        }
        let entries = self.mapping(root, None, None)?;
        self.check_keys(entries, TOP_KEYS, None)?;
        let get = |name: &str| entries.iter().find(|(k, _, _)| k == name);

        let name = match get("name") {
            Some((_, _, node)) => {
                let name = self.string(node, None, "name")?;
                // The name becomes `<name>.lock` and `artifacts/runs/<name>/`: it must stay a
                // plain file name inside the workspace.
                if !is_plain_name(&name) || name.starts_with('.') {
                    return Err(self.error(
                        node.mark,
                        None,
                        Some("name"),
                        format!(
                            "`{name}` would leave the workspace or hide its files; a pipeline name may use only letters, digits, `_`, `-` and `.`, and may not start with `.`"
                        ),
                    ));
                }
                name
            }
            None => return Err(self.error(root.mark, None, Some("name"), "missing required key")),
        };
        let key_variables = key_variables(root);
        let params = match get("params") {
            Some((_, _, node)) => {
                self.mapping(node, None, Some("params"))?;
                let mut ignored = HashMap::new();
                let scope = Scope {
                    params: None,
                    env,
                    secrets: &key_variables,
                    item: None,
                };
                self.to_json(node, &scope, None, "params", &mut ignored)?
            }
            None => Json::Object(Map::new()),
        };
        let mut params = params;
        for o in self.overrides.iter().filter(|o| o.target == Target::Params) {
            o.apply_to_params(&mut params)
                .map_err(|message| self.error(root.mark, None, Some("params"), message))?;
        }
        let (stages_mark, stage_entries) = match get("stages") {
            Some((_, _, node)) => (node.mark, self.mapping(node, None, Some("stages"))?),
            None => {
                return Err(self.error(root.mark, None, Some("stages"), "missing required key"));
            }
        };
        if stage_entries.is_empty() {
            return Err(self.error(
                stages_mark,
                None,
                Some("stages"),
                "a pipeline needs at least one stage",
            ));
        }
        let scope = Scope {
            params: Some(&params),
            env,
            secrets: &key_variables,
            item: None,
        };
        let stages = stage_entries
            .iter()
            .map(|(id, mark, node)| self.stages_of(id, *mark, node, &scope))
            .collect::<Result<Vec<_>, _>>()?;
        let stages = matrix::fan_in(stages.into_iter().flatten().collect());
        let stages = self.override_stages(stages, stages_mark)?;
        Ok(Pipeline {
            file: self.file.to_path_buf(),
            name,
            params,
            stages,
            key_variables,
            overrides: self.overrides.iter().map(|o| o.text.clone()).collect(),
        })
    }

    /// Applies the `--set stages.ID.with…` overrides.
    fn override_stages(
        &self,
        mut stages: Vec<StageDecl>,
        mark: Mark,
    ) -> Result<Vec<StageDecl>, PipelineError> {
        for o in self.overrides {
            let Target::Stage(id) = &o.target else {
                continue;
            };
            let mut matched = stages
                .iter_mut()
                .filter(|s| s.id == *id || s.matrix_of.as_deref() == Some(id))
                .peekable();
            if matched.peek().is_none() {
                drop(matched);
                let ids: Vec<&str> = stages.iter().map(|s| s.id.as_str()).collect();
                return Err(self.error(
                    mark,
                    None,
                    Some("stages"),
                    format!(
                        "--set {}: no stage `{id}`; stages: {}",
                        o.text,
                        ids.join(", ")
                    ),
                ));
            }
            for decl in matched {
                o.apply_to_with(&mut decl.with)
                    .map_err(|message| self.error(mark, Some(id), Some("with"), message))?;
            }
        }
        Ok(stages)
    }

    /// The stage declared as `id`: one, or with `matrix:` one per combination of its values,
    /// each with `${item.NAME}` bound and its own id (`train@lr=1e-5,seed=1`).
    fn stages_of(
        &self,
        id: &str,
        mark: Mark,
        node: &Node,
        scope: &Scope,
    ) -> Result<Vec<StageDecl>, PipelineError> {
        let matrix = match &node.value {
            Value::Map(entries) => entries.iter().find(|(k, _, _)| k == "matrix"),
            _ => None,
        };
        let Some((_, _, matrix)) = matrix else {
            return Ok(vec![self.stage(id, id, mark, node, scope)?]);
        };
        let combinations = matrix::combinations(matrix)
            .map_err(|(at, message)| self.error(at, Some(id), Some("matrix"), message))?;
        combinations
            .iter()
            .map(|combination| {
                let scope = Scope {
                    item: Some(&combination.item),
                    ..*scope
                };
                let mut decl = self.stage(id, &combination.id(id), mark, node, &scope)?;
                decl.matrix_of = Some(id.to_string());
                Ok(decl)
            })
            .collect()
    }

    fn stage(
        &self,
        declared: &str,
        id: &str,
        mark: Mark,
        node: &Node,
        scope: &Scope,
    ) -> Result<StageDecl, PipelineError> {
        if !is_plain_name(declared) || declared.contains('.') {
            return Err(self.error(
                mark,
                Some(id),
                None,
                "stage ids may use only letters, digits, `_` and `-`",
            ));
        }
        let entries = self.mapping(node, Some(id), None)?;
        self.check_keys(entries, STAGE_KEYS, Some(id))?;
        let mut marks = HashMap::new();
        let mut uses = None;
        let mut needs = Vec::new();
        let mut with = Json::Object(Map::new());
        for (key, key_mark, value) in entries {
            marks.insert(key.clone(), *key_mark);
            match key.as_str() {
                "uses" => uses = Some(self.string(value, Some(id), "uses")?),
                "needs" => needs = self.needs(id, value, &mut marks)?,
                "with" => {
                    self.mapping(value, Some(id), Some("with"))?;
                    with = self.to_json(value, scope, Some(id), "with", &mut marks)?;
                }
                _ => {}
            }
        }
        let uses = uses.ok_or_else(|| {
            self.error(
                mark,
                Some(id),
                Some("uses"),
                "missing required key: which plugin runs this stage",
            )
        })?;
        Ok(StageDecl {
            id: id.to_string(),
            uses,
            needs,
            with,
            mark,
            marks,
            matrix_of: None,
        })
    }

    fn needs(
        &self,
        id: &str,
        node: &Node,
        marks: &mut HashMap<String, Mark>,
    ) -> Result<Vec<String>, PipelineError> {
        let items = match &node.value {
            Value::Seq(items) => items.as_slice(),
            Value::Str(_) => std::slice::from_ref(node),
            _ => {
                return Err(self.error(
                    node.mark,
                    Some(id),
                    Some("needs"),
                    format!("expected a list of stage ids, found {}", node.kind()),
                ));
            }
        };
        let mut needs = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let key = format!("needs[{index}]");
            let need = self.string(item, Some(id), &key)?;
            marks.insert(key.clone(), item.mark);
            if needs.contains(&need) {
                return Err(self.error(
                    item.mark,
                    Some(id),
                    Some(&key),
                    format!("`{need}` is listed twice"),
                ));
            }
            needs.push(need);
        }
        Ok(needs)
    }

    /// Converts a YAML subtree to JSON, interpolating strings and recording the mark of every
    /// key path (serde_path_to_error's notation: `a.b[2].c`).
    fn to_json(
        &self,
        node: &Node,
        scope: &Scope,
        stage: Option<&str>,
        path: &str,
        marks: &mut HashMap<String, Mark>,
    ) -> Result<Json, PipelineError> {
        marks.entry(path.to_string()).or_insert(node.mark);
        Ok(match &node.value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Int(i) => Json::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(Json::Number)
                .ok_or_else(|| {
                    self.error(
                        node.mark,
                        stage,
                        Some(path),
                        "infinite and NaN numbers are not allowed",
                    )
                })?,
            Value::Str(s) => interpolate(s, scope)
                .map_err(|err| self.error(node.mark, stage, Some(path), err.to_string()))?,
            Value::Seq(items) => Json::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        self.to_json(item, scope, stage, &format!("{path}[{i}]"), marks)
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Value::Map(entries) => {
                let mut object = Map::new();
                for (key, key_mark, value) in entries {
                    let child = format!("{path}.{key}");
                    marks.insert(child.clone(), *key_mark);
                    object.insert(
                        key.clone(),
                        self.to_json(value, scope, stage, &child, marks)?,
                    );
                }
                Json::Object(object)
            }
        })
    }
}

/// Letters, digits, `_`, `-` and `.` only: safe as one path component on every platform.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// `FINETUNE_HMAC_KEY` and the value of every `key_env:` in the file, wherever it stands.
fn key_variables(root: &Node) -> Vec<String> {
    fn walk(node: &Node, found: &mut Vec<String>) {
        match &node.value {
            Value::Map(entries) => {
                for (key, _, value) in entries {
                    if let (KEY_ENV, Value::Str(name)) = (key.as_str(), &value.value)
                        && !found.contains(name)
                    {
                        found.push(name.clone());
                    }
                    walk(value, found);
                }
            }
            Value::Seq(items) => items.iter().for_each(|item| walk(item, found)),
            _ => {}
        }
    }
    const KEY_ENV: &str = "key_env";
    let mut found = vec![finetune_core::integrity::DEFAULT_KEY_ENV.to_string()];
    walk(root, &mut found);
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(source: &str) -> Result<Pipeline, PipelineError> {
        Pipeline::parse(Path::new("p.yaml"), source, &|_| None)
    }

    #[test]
    fn reads_a_pipeline_with_interpolation() {
        let p = parse("name: demo\nparams: {seed: 7}\nstages:\n  a:\n    uses: ingest_csv\n    with:\n      seed: ${params.seed}\n  b:\n    uses: x\n    needs: [a]\n").unwrap();
        assert_eq!(p.name, "demo");
        assert_eq!(p.stages[0].with, json!({"seed": 7}));
        assert_eq!(p.stages[1].needs, vec!["a"]);
        assert_eq!(p.stages[0].mark_of("with.seed").line, 7);
        assert_eq!(p.stages[0].mark_of("with.seed.unknown").line, 7);
        assert_eq!(p.stages[1].mark_of("needs[0]").line, 10);
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = parse("name: demo\nstages:\n  a:\n    uses: x\n    wiht: {}\n").unwrap_err();
        assert_eq!(
            (err.mark.line, err.stage.as_deref(), err.key.as_deref()),
            (5, Some("a"), Some("wiht"))
        );
        assert!(
            err.to_string()
                .starts_with("p.yaml:5:5: stage `a`, key `wiht`: unknown key"),
            "{err}"
        );
        let err = parse("name: demo\nstagse: {}\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("stagse"));
    }

    #[test]
    fn wrong_types_and_missing_keys_are_errors() {
        assert!(
            parse("name: demo\nstages:\n  a: {needs: [b]}\n")
                .unwrap_err()
                .to_string()
                .contains("`uses`: missing")
        );
        assert!(
            parse("name: demo\nstages:\n  a: {uses: x, needs: 3}\n")
                .unwrap_err()
                .to_string()
                .contains("expected a list")
        );
        assert!(
            parse("name: demo\nstages: [a]\n")
                .unwrap_err()
                .to_string()
                .contains("expected a mapping")
        );
        assert!(parse("").unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn bad_interpolation_names_the_key() {
        let err =
            parse("name: demo\nstages:\n  a:\n    uses: x\n    with: {seed: \"${params.nope}\"}\n")
                .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("with.seed"));
        assert_eq!(err.mark.line, 5);
        assert!(err.message.contains("no param `nope`"));
    }
}
