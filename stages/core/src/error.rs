use std::fmt;

/// Where in a stage's declaration a configuration problem lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigKey {
    /// A dotted path inside `with:` ("split.validation", "outs[0]"); empty for `with:` itself.
    With(String),
    /// The stage's `needs:` list.
    Needs,
}

/// A problem with a stage's configuration, located so that the engine can point at the line in
/// the pipeline file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub key: ConfigKey,
    pub message: String,
}

impl ConfigError {
    /// A problem with the value at `key` (a dotted path inside `with:`).
    pub fn at(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: ConfigKey::With(key.into()),
            message: message.into(),
        }
    }

    /// A problem with the stage's `needs:` list.
    pub fn needs(message: impl Into<String>) -> Self {
        ConfigError {
            key: ConfigKey::Needs,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            ConfigKey::With(key) if key.is_empty() => f.write_str(&self.message),
            ConfigKey::With(key) => write!(f, "`{key}`: {}", self.message),
            ConfigKey::Needs => write!(f, "`needs`: {}", self.message),
        }
    }
}
