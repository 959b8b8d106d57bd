//! Placeholders in a shell script. A path pasted into `sh -c` text is parsed as code: a
//! workspace under `/tmp/a b` splits a word, one under `/tmp/x;touch y;` runs `touch`. So in
//! the script of a shell (`sh -c SCRIPT`, `bash -euc SCRIPT`, …) `{out}` and `{needs.ID}`
//! become references to the environment variables that hold the same paths, quoted for where
//! they stand; the shell expands them as data, never as code.

/// The programs whose `-c` argument is shell code.
const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ksh", "ash", "mksh"];

/// Which argument of `run` (counting the program as 0) is shell code, if any.
pub fn script_index(run: &[String]) -> Option<usize> {
    let program = run.first()?;
    let name = program.rsplit('/').next().unwrap_or(program);
    if !SHELLS.contains(&name) {
        return None;
    }
    let flags = run[1..]
        .iter()
        .position(|arg| arg.starts_with('-') && !arg.starts_with("--") && arg.contains('c'))?;
    let script = flags + 2;
    (script < run.len()).then_some(script)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Quoting {
    None,
    Single,
    Double,
}

/// `script` with each placeholder (`{out}`, `{needs.ID}`, as in `vars`: placeholder and
/// variable name) replaced by a reference to its variable that the shell reads as one word
/// and never parses: `"${VAR}"` outside quotes, `${VAR}` inside double quotes, and
/// `'"${VAR}"'` inside single quotes (closing them around it).
pub fn with_variables(script: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(script.len());
    let mut quoting = Quoting::None;
    let mut rest = script;
    while let Some(c) = rest.chars().next() {
        if let Some((placeholder, var)) = vars.iter().find(|(p, _)| rest.starts_with(p)) {
            out.push_str(&match quoting {
                Quoting::None => format!("\"${{{var}}}\""),
                Quoting::Double => format!("${{{var}}}"),
                Quoting::Single => format!("'\"${{{var}}}\"'"),
            });
            rest = &rest[placeholder.len()..];
            continue;
        }
        let mut taken = c.len_utf8();
        match (quoting, c) {
            (Quoting::None, '\'') => quoting = Quoting::Single,
            (Quoting::Single, '\'') => quoting = Quoting::None,
            (Quoting::None, '"') => quoting = Quoting::Double,
            (Quoting::Double, '"') => quoting = Quoting::None,
            // A backslash keeps the next character literal: take both.
            (Quoting::None | Quoting::Double, '\\') => {
                taken += rest[1..].chars().next().map_or(0, char::len_utf8);
            }
            _ => {}
        }
        out.push_str(&rest[..taken]);
        rest = &rest[taken..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vec<(String, String)> {
        vec![
            ("{out}".into(), "FINETUNE_OUT".into()),
            ("{needs.ingest}".into(), "FINETUNE_NEEDS_INGEST".into()),
        ]
    }

    #[test]
    fn finds_the_script_of_a_shell_only() {
        let run = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(script_index(&run(&["sh", "-c", "x"])), Some(2));
        assert_eq!(
            script_index(&run(&["/bin/bash", "-e", "-uc", "x", "n"])),
            Some(3)
        );
        assert_eq!(
            script_index(&run(&["bash", "-o", "pipefail", "-c", "x"])),
            Some(4)
        );
        assert_eq!(script_index(&run(&["sh", "script.sh", "{out}"])), None);
        assert_eq!(script_index(&run(&["cp", "-c", "{out}"])), None);
        assert_eq!(script_index(&run(&["sh", "-c"])), None);
    }

    #[test]
    fn placeholders_become_variables_quoted_for_where_they_stand() {
        assert_eq!(
            with_variables("wc -l < {needs.ingest}/a > {out}/b", &vars()),
            "wc -l < \"${FINETUNE_NEEDS_INGEST}\"/a > \"${FINETUNE_OUT}\"/b"
        );
        assert_eq!(
            with_variables("cat \"{out}/x y\" '{out}' \\{out}", &vars()),
            "cat \"${FINETUNE_OUT}/x y\" ''\"${FINETUNE_OUT}\"'' \\{out}"
        );
        assert_eq!(
            with_variables("echo \"it's {out}\" 'say \"{out}\"'", &vars()),
            "echo \"it's ${FINETUNE_OUT}\" 'say \"'\"${FINETUNE_OUT}\"'\"'"
        );
        assert_eq!(
            with_variables("echo ${X:-{y}} ü", &vars()),
            "echo ${X:-{y}} ü"
        );
    }
}
