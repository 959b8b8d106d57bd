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
        "finetune_transformer",
        "finetune_command",
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
        main.contains("finetune_transformer::train::Train"),
        "plugins are registered in main.rs"
    );
}
