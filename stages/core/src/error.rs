use std::fmt;

/// A problem with a stage's configuration, located by its key path inside `with:` so the
/// engine can point at the line in the pipeline file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// Where the problem is: a dotted path inside `with:` ("split.validation"), or a top-level
    /// stage key ("needs"), or empty for the stage as a whole.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    /// A problem with the value at `key` (a dotted path inside `with:`).
    pub fn at(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }

    /// A problem with the stage's `needs:` list.
    pub fn needs(message: impl Into<String>) -> Self {
        ConfigError {
            key: String::new(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "`{}`: {}", self.key, self.message)
        }
    }
}
