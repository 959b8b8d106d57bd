//! The engine knows stages only through `finetune_core::Stage`: no file of src/ but main.rs
//! (where plugins are registered) may name a plugin crate or an ML/data dependency.

use std::path::Path;

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_engine_names_no_plugin_and_no_ml_crate() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 10, "the engine's sources were not found");
    let forbidden = [
        "burn",
        "tokenizers",
        "arrow",
        "parquet",
        "safetensors",
        "finetune_ingest",
        "finetune_tokenize",
        "finetune_command",
        "finetune_train",
        "finetune_evaluate",
        "finetune_fingerprint",
        "finetune_kernels",
        "finetune_model",
        "finetune_optim",
        "finetune_regularizers",
        "finetune_trainer",
    ];
    for file in files.iter().filter(|f| !f.ends_with("main.rs")) {
        let text = std::fs::read_to_string(file).unwrap();
        for name in forbidden {
            let used = text.lines().any(|line| {
                let code = line.split("//").next().unwrap_or("");
                code.contains(&format!("{name}::")) || code.contains(&format!("use {name}"))
            });
            assert!(
                !used,
                "{} uses `{name}`: the engine must know stages only through the Stage trait",
                file.display()
            );
        }
    }
    let main = std::fs::read_to_string(src.join("main.rs")).unwrap();
    assert!(
        main.contains("finetune_train::Train"),
        "plugins are registered in main.rs"
    );
}

/// The libraries `package` links, as `cargo tree` lists them (names only): normal
/// dependencies, without what only proc-macros use at compile time (serde's and burn's derives
/// use syn; nothing of it reaches the binary).
fn dependency_names(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal,no-proc-macro",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_model_compiles_no_data_report_or_audit_dependency() {
    let names = dependency_names("finetune-model");
    assert!(
        names.iter().any(|n| n == "burn"),
        "cargo tree listed {names:?}"
    );
    for heavy in ["parquet", "arrow", "syn", "plotters", "prost", "tokenizers"] {
        assert!(
            !names.iter().any(|n| n == heavy),
            "finetune-model depends on {heavy}: {names:?}"
        );
    }
}

#[test]
fn the_lower_crates_know_nothing_above_them() {
    // kernels and remote: nothing of ours; model: no optimizer, trainer or stage; trainer: no
    // stage.
    for (package, above) in [
        ("finetune-kernels", &["finetune-"][..]),
        ("finetune-remote", &["finetune-"][..]),
        (
            "finetune-model",
            &[
                "finetune-optim",
                "finetune-trainer",
                "finetune-core",
                "finetune-tokenize",
            ][..],
        ),
        (
            "finetune-optim",
            &["finetune-model", "finetune-trainer"][..],
        ),
        (
            "finetune-regularizers",
            &["finetune-model", "finetune-trainer"][..],
        ),
        (
            "finetune-trainer",
            &["finetune-train", "finetune-evaluate", "finetune-tokenize"][..],
        ),
    ] {
        let names = dependency_names(package);
        let ours = |n: &&String| n.as_str() != package && above.iter().any(|a| n.starts_with(a));
        let found: Vec<&String> = names.iter().filter(ours).collect();
        assert!(found.is_empty(), "{package} depends on {found:?}");
    }
}
