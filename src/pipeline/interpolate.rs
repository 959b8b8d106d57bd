//! `${params.x}` and `${env.NAME}` / `${env.NAME:-default}` in pipeline values.
//!
//! A string that is exactly one reference takes the referenced value with its type, so
//! `seed: "${params.seed}"` is the integer 42, not the string "42", and `epochs: "${env.EP}"`
//! reads the variable's text as a YAML scalar would be read (`3` an integer, `true` a
//! boolean, `1e-3` a number). A reference inside a longer string is spliced in as text.
//! `$${` writes a literal `${`.

use serde_json::Value;

/// Where references are looked up.
pub struct Scope<'a> {
    /// The pipeline's `params:`, or `None` while interpolating `params:` itself.
    pub params: Option<&'a Value>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Variables that hold signing keys (`FINETUNE_HMAC_KEY` and every `key_env` the pipeline
    /// names): never interpolated, since params are written to lock files and logs.
    pub secrets: &'a [String],
    /// The combination of a `matrix:` stage, for `${item.NAME}`; `None` elsewhere.
    pub item: Option<&'a Value>,
}

/// A reference that cannot be resolved; the caller adds the position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    #[error("unclosed `${{` in `{0}`")]
    Unclosed(String),
    #[error("`${{{0}}}` is a list or mapping and cannot be spliced into a string")]
    NotText(String),
    #[error("`${{{0}}}`: params cannot refer to other params")]
    ParamInParams(String),
    #[error("`${{{reference}}}`: no param `{path}` in the pipeline's `params:`")]
    NoParam { reference: String, path: String },
    #[error(
        "`${{{reference}}}`: environment variable `{name}` is not set (give a default with `${{env.{name}:-VALUE}}`)"
    )]
    EnvNotSet { reference: String, name: String },
    #[error(
        "`${{{0}}}`: unknown reference; use `${{params.NAME}}`, `${{env.NAME}}` or, in a stage with `matrix:`, `${{item.NAME}}`"
    )]
    Unknown(String),
    #[error(
        "`${{{0}}}`: the HMAC key cannot be put into params (they are written to lock files and \
         logs); the stages that sign read it from the environment themselves"
    )]
    SigningKey(String),
}

/// Interpolates one string.
pub fn interpolate(text: &str, scope: &Scope) -> Result<Value, InterpolateError> {
    if !text.contains("${") {
        return Ok(Value::String(text.to_string()));
    }
    let pieces = split(text)?;
    if let [Piece::Reference(reference)] = pieces.as_slice() {
        return Ok(match lookup(reference, scope)? {
            Value::String(text) if reference.starts_with("env.") => typed(text),
            value => value,
        });
    }
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Literal(literal) => out.push_str(&literal),
            Piece::Reference(reference) => match lookup(&reference, scope)? {
                Value::String(s) => out.push_str(&s),
                Value::Object(_) | Value::Array(_) => {
                    return Err(InterpolateError::NotText(reference));
                }
                other => out.push_str(&other.to_string()),
            },
        }
    }
    Ok(Value::String(out))
}

enum Piece {
    Literal(String),
    Reference(String),
}

fn split(text: &str) -> Result<Vec<Piece>, InterpolateError> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        literal.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(stripped) = after.strip_prefix("$${") {
            literal.push_str("${");
            rest = stripped;
        } else if let Some(body) = after.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| InterpolateError::Unclosed(text.to_string()))?;
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            pieces.push(Piece::Reference(body[..end].trim().to_string()));
            rest = &body[end + 1..];
        } else {
            literal.push('$');
            rest = &after[1..];
        }
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    Ok(pieces)
}

fn lookup(reference: &str, scope: &Scope) -> Result<Value, InterpolateError> {
    if let Some(path) = reference.strip_prefix("params.") {
        let params = scope
            .params
            .ok_or_else(|| InterpolateError::ParamInParams(reference.to_string()))?;
        let mut value = params;
        for part in path.split('.') {
            value = value.get(part).ok_or_else(|| InterpolateError::NoParam {
                reference: reference.to_string(),
                path: path.to_string(),
            })?;
        }
        return Ok(value.clone());
    }
    if let Some(spec) = reference.strip_prefix("env.") {
        let (name, default) = match spec.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (spec, None),
        };
        if scope.secrets.iter().any(|secret| secret == name) {
            return Err(InterpolateError::SigningKey(reference.to_string()));
        }
        return match ((scope.env)(name), default) {
            (Some(value), _) if !value.is_empty() => Ok(Value::String(value)),
            (_, Some(default)) => Ok(Value::String(default.to_string())),
            _ => Err(InterpolateError::EnvNotSet {
                reference: reference.to_string(),
                name: name.to_string(),
            }),
        };
    }
    if let Some(name) = reference.strip_prefix("item.")
        && let Some(value) = scope.item.and_then(|item| item.get(name))
    {
        return Ok(value.clone());
    }
    Err(InterpolateError::Unknown(reference.to_string()))
}

/// An environment variable's text as a plain YAML scalar reads: `3` is 3, `off` stays text.
pub(super) fn typed(text: String) -> Value {
    match super::yaml::resolve_plain(&text) {
        super::yaml::Value::Null => Value::Null,
        super::yaml::Value::Bool(b) => Value::Bool(b),
        super::yaml::Value::Int(i) => Value::from(i),
        super::yaml::Value::Float(f) => {
            serde_json::Number::from_f64(f).map_or(Value::String(text), Value::Number)
        }
        _ => Value::String(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_params(text: &str) -> Result<Value, InterpolateError> {
        let params = json!({ "seed": 42, "name": "x", "nested": { "lr": 0.5 } });
        let env = |name: &str| match name {
            "HOME_DIR" => Some("/home/me".to_string()),
            "EP" => Some("3".to_string()),
            "LR" => Some("1.0e-3".to_string()),
            "ON" => Some("true".to_string()),
            "TAG" => Some("007x".to_string()),
            _ => None,
        };
        interpolate(
            text,
            &Scope {
                params: Some(&params),
                env: &env,
                secrets: &["FINETUNE_HMAC_KEY".to_string(), "TEAM_KEY".to_string()],
                item: None,
            },
        )
    }

    #[test]
    fn whole_references_keep_their_type() {
        assert_eq!(with_params("${params.seed}").unwrap(), json!(42));
        assert_eq!(with_params("${params.nested.lr}").unwrap(), json!(0.5));
    }

    #[test]
    fn embedded_references_are_spliced() {
        assert_eq!(
            with_params("run-${params.seed}-${params.name}").unwrap(),
            json!("run-42-x")
        );
        assert_eq!(
            with_params("cost $5 and $${literal}").unwrap(),
            json!("cost $5 and ${literal}")
        );
    }

    #[test]
    fn env_references_take_defaults() {
        assert_eq!(
            with_params("${env.HOME_DIR}/m").unwrap(),
            json!("/home/me/m")
        );
        assert_eq!(
            with_params("${env.NOPE:-models/x}").unwrap(),
            json!("models/x")
        );
        assert!(
            with_params("${env.NOPE}")
                .unwrap_err()
                .to_string()
                .contains("`NOPE` is not set")
        );
    }

    #[test]
    fn a_whole_env_reference_reads_as_a_yaml_scalar() {
        assert_eq!(with_params("${env.EP}").unwrap(), json!(3));
        assert_eq!(with_params("${env.LR}").unwrap(), json!(1.0e-3));
        assert_eq!(with_params("${env.ON}").unwrap(), json!(true));
        assert_eq!(with_params("${env.TAG}").unwrap(), json!("007x"));
        assert_eq!(with_params("${env.NOPE:-8}").unwrap(), json!(8));
        assert_eq!(with_params("e${env.EP}").unwrap(), json!("e3"));
    }

    #[test]
    fn key_variables_are_never_interpolated() {
        for reference in ["${env.FINETUNE_HMAC_KEY}", "x-${env.TEAM_KEY:-d}"] {
            let err = with_params(reference).unwrap_err();
            assert!(matches!(err, InterpolateError::SigningKey(_)), "{err}");
        }
    }

    #[test]
    fn bad_references_are_explained() {
        assert!(
            with_params("${params.missing}")
                .unwrap_err()
                .to_string()
                .contains("no param `missing`")
        );
        assert!(
            with_params("${stages.x}")
                .unwrap_err()
                .to_string()
                .contains("unknown reference")
        );
        assert!(
            with_params("${params.seed")
                .unwrap_err()
                .to_string()
                .contains("unclosed")
        );
    }
}
