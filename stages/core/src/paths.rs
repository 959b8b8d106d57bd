//! Path rules shared by the engine and the plugins.

use std::path::{Component, Path, PathBuf};

/// Checks that `raw` names a place inside the directory it is relative to: relative, and no
/// `..` that climbs out. Used for everything a stage *writes*, so that no pipeline can write
/// outside its output directory.
pub fn contained_relative(raw: &str) -> Result<PathBuf, String> {
    let path = Path::new(raw);
    if raw.is_empty() {
        return Err("an empty path".into());
    }
    let mut depth = 0i32;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("`{raw}` escapes its directory through `..`"));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("`{raw}` is absolute; a relative path is required"));
            }
        }
    }
    if depth == 0 {
        return Err(format!(
            "`{raw}` names the directory itself, not a path inside it"
        ));
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
        assert!(contained_relative("../x").unwrap_err().contains("escapes"));
        assert!(
            contained_relative("a/../../x")
                .unwrap_err()
                .contains("escapes")
        );
        assert!(
            contained_relative("/etc/passwd")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(contained_relative("a/..").is_err());
        assert!(contained_relative("").is_err());
    }
}
