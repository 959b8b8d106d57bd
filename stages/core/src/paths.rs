//! Path rules shared by the engine and the plugins.

use std::path::{Component, Path, PathBuf};

/// A path that does not name a place inside its directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("an empty path")]
    Empty,
    #[error("`{0}` escapes its directory through `..`")]
    Escapes(String),
    #[error("`{0}` is absolute; a relative path is required")]
    Absolute(String),
    #[error("`{0}` names the directory itself, not a path inside it")]
    TheDirectoryItself(String),
}

/// Checks that `raw` names a place inside the directory it is relative to: relative, and no
/// `..` that climbs out. Used for everything a stage *writes*, so that no pipeline can write
/// outside its output directory.
pub fn contained_relative(raw: &str) -> Result<PathBuf, PathError> {
    let path = Path::new(raw);
    if raw.is_empty() {
        return Err(PathError::Empty);
    }
    let mut depth = 0i32;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err(PathError::Escapes(raw.to_string()));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::Absolute(raw.to_string()));
            }
        }
    }
    if depth == 0 {
        return Err(PathError::TheDirectoryItself(raw.to_string()));
    }
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::contained_relative;

    #[test]
    fn accepts_paths_inside() {
        assert!(contained_relative("a/b.txt").is_ok());
        assert!(contained_relative("./a/../b").is_ok());
    }

    #[test]
    fn rejects_escapes_and_absolutes() {
        assert!(
            contained_relative("../x")
                .unwrap_err()
                .to_string()
                .contains("escapes")
        );
        assert!(
            contained_relative("a/../../x")
                .unwrap_err()
                .to_string()
                .contains("escapes")
        );
        assert!(
            contained_relative("/etc/passwd")
                .unwrap_err()
                .to_string()
                .contains("absolute")
        );
        assert!(contained_relative("a/..").is_err());
        assert!(contained_relative("").is_err());
    }
}
