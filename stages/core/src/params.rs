use serde::de::DeserializeOwned;

use crate::{ConfigError, Value};

/// Deserializes a stage's `with:` into its typed params. The params struct should use
/// `#[serde(deny_unknown_fields)]`; the error names the dotted key path at fault.
pub fn parse_params<T: DeserializeOwned>(with: &Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(with).map_err(|err| {
        let path = err.path().to_string();
        let key = if path == "." { String::new() } else { path };
        ConfigError::at(key, err.into_inner().to_string())
    })
}

/// The JSON Schema of a params type, for `finetune stages`.
pub fn schema_for<T: schemars::JsonSchema>() -> schemars::Schema {
    schemars::schema_for!(T)
}
