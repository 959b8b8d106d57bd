//! Every encoder family through the whole pipeline: the default pipeline with its model
//! swapped for a tiny checkpoint of the family (tests/fixtures/golden) trains with AWP and
//! Mixout, evaluates, saves a checkpoint of the family's own layout, predicts, and resumes
//! after a kill to the bytes of the uninterrupted run.

mod common;

use common::*;
use serde_json::Value;

/// The tiny checkpoints, with the architecture their saved config.json names.
const FAMILIES: [(&str, &str); 6] = [
    ("tiny-bert", "BertForSequenceClassification"),
    ("tiny-distilbert", "DistilBertForSequenceClassification"),
    ("tiny-roberta", "RobertaForSequenceClassification"),
    ("tiny-electra", "ElectraForSequenceClassification"),
    ("tiny-deberta-v3", "DebertaV2ForSequenceClassification"),
    ("tiny-modernbert", "ModernBertForSequenceClassification"),
];

/// The default pipeline fine-tuning `family` for 60 updates, checkpointing every 10. The
/// tokenizer is trained on the shipped reviews to the checkpoints' 1,000-token vocabulary
/// (their own tokenizers know only `tN` words).
fn fine_tune(ws: &Ws, family: &str) {
    short_run(ws);
    let yaml = std::fs::read_to_string(ws.file("pipelines/reviews.yaml")).unwrap();
    let yaml = yaml
        .replace(
            "model: { scratch: { layers: 2, hidden: 128, heads: 4 } }",
            &format!("model: {{ from: fixtures/golden/{family} }}"),
        )
        .replace("vocab_size: 4000", "vocab_size: 1000")
        .replace("lr: 1.0e-3", "lr: 3.0e-4");
    assert!(yaml.contains(family) && yaml.contains("vocab_size: 1000"));
    ws.write("pipelines/reviews.yaml", yaml);
}

fn messages(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["stage"] == "train")
        .filter_map(|e| Some(e["text"].as_str()?.to_string()))
        .collect()
}

#[test]
fn each_family_fine_tunes_with_awp_and_mixout_evaluates_and_predicts() {
    for (family, architecture) in FAMILIES {
        let ws = Ws::new();
        fine_tune(&ws, family);
        let events = ws.run_ok(&[]);
        let said = messages(&events);
        // 12 Linear layers in every tiny checkpoint, Mixout's default selection: 2 layers of 6,
        // or ModernBERT's 3 of 4 (Wqkv, Wo, Wi, Wo).
        assert!(
            said.iter()
                .any(|m| m.starts_with("mixout p=0.1 on 12 Linear layers")),
            "{family}: {said:?}"
        );
        let train = output_dir(&ws, "reviews", "train");
        let records = std::fs::read_to_string(train.join("logs/train.jsonl")).unwrap();
        assert!(
            records.contains("\"awp_loss\""),
            "{family}: AWP never attacked"
        );
        let losses: Vec<f64> = records
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["loss"].as_f64())
            .collect();
        assert!(
            losses.last() < losses.first(),
            "{family}: the training loss did not fall: {losses:?}"
        );

        let config = read_json(&train.join("model/config.json"));
        assert_eq!(config["architectures"][0], architecture, "{family}");
        assert_eq!(config["id2label"]["1"], "1", "{family}");
        let device = finetune_model::device("cpu").unwrap().device().clone();
        let (saved, report) =
            finetune_model::hf::load(&train.join("model"), None, 0, &device).unwrap();
        assert!(
            report.newly_initialized.is_empty() && report.unexpected.is_empty(),
            "{family}: {report:?}"
        );
        assert_awp_targets_every_layer_matrix(family, &saved);

        let evaluation = read_json(&output_dir(&ws, "reviews", "evaluate").join("metrics.json"));
        assert_eq!(evaluation["split"], "test", "{family}");
        assert_eq!(evaluation["examples"], 200, "{family}: {evaluation}");
        let accuracy = evaluation["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "{family}: {evaluation}");

        let out = ws.run(&[
            "predict",
            "--model",
            train.to_str().unwrap(),
            "The battery died within a week.",
        ]);
        assert!(out.status.success(), "{family}: {}", stderr(&out));
        let line = String::from_utf8(out.stdout).unwrap();
        let label = line.split('\t').next().unwrap();
        assert!(["0", "1"].contains(&label), "{family}: {line}");
    }
}

/// AWP's default targets are the weight matrices of the encoder layers, named as the family's
/// checkpoint names them.
fn assert_awp_targets_every_layer_matrix(family: &str, model: &finetune_model::Classifier) {
    let mut matrices: Vec<String> = finetune_model::param_names(model)
        .into_iter()
        .filter(|(_, _, layer_matrix)| *layer_matrix)
        .map(|(name, _, _)| name)
        .collect();
    // ModernBERT's query, key and value are three blocks of one tensor, Wqkv.
    matrices.dedup();
    assert_eq!(matrices.len(), 12, "{family}: {matrices:?}");
    let prefix = format!("{}.", model.config.family.prefix());
    assert!(
        matrices
            .iter()
            .all(|m| m.starts_with(&prefix) && m.ends_with(".weight")),
        "{family}: {matrices:?}"
    );
}

#[test]
fn each_family_resumes_after_a_kill_to_the_uninterrupted_bytes() {
    for (family, _) in FAMILIES {
        let (whole, killed) = (Ws::new(), Ws::new());
        fine_tune(&whole, family);
        fine_tune(&killed, family);
        whole.run_ok(&[]);
        let mut child = killed
            .command(&["run", "--json"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        kill_once_scratch_has(
            &killed,
            &mut child,
            "checkpoints/checkpoint-20/trainer_state.json",
        );
        let said = messages(&killed.run_ok(&[]));
        assert!(
            said.iter()
                .any(|m| m.starts_with("resuming from checkpoint-")),
            "{family}: the rerun did not resume: {said:?}"
        );
        let weights = |ws: &Ws| {
            std::fs::read(output_dir(ws, "reviews", "train").join("model/model.safetensors"))
                .unwrap()
        };
        assert!(
            weights(&whole) == weights(&killed),
            "{family}: the resumed model differs from the uninterrupted one"
        );
    }
}

#[test]
fn a_tokenizer_larger_than_the_models_vocabulary_is_refused_naming_both() {
    let ws = Ws::new();
    fine_tune(&ws, "tiny-electra");
    let yaml = std::fs::read_to_string(ws.file("pipelines/reviews.yaml")).unwrap();
    ws.write(
        "pipelines/reviews.yaml",
        yaml.replace("vocab_size: 1000", "vocab_size: 4000"),
    );
    let out = ws.run(&["run"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("tokenizer.json) has ")
            && err.contains("tiny-electra) embeds only 1000 (`vocab_size` in its config.json)"),
        "{err}"
    );
    assert!(!ws.file("artifacts/runs/reviews/train").exists());
}

/// `finetune predict --model` on a tiny checkpoint straight from Python (its WordLevel
/// tokenizer.json maps `tN` to id N) gives the logits transformers computed for the same
/// texts, each text in its own batch.
#[test]
fn predict_on_each_tiny_checkpoint_gives_pythons_logits() {
    let ws = Ws::new();
    for family in ["tiny-electra", "tiny-deberta-v3", "tiny-modernbert"] {
        let dir = format!("fixtures/golden/{family}");
        let expected = read_json(&ws.file(&format!("{dir}/expected.json")));
        let texts: Vec<&str> = expected["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let mut args = vec!["predict", "--json", "--batch-size", "1", "--model", &dir];
        args.extend(&texts);
        let out = ws.run(&args);
        assert!(out.status.success(), "{family}: {}", stderr(&out));
        let lines = String::from_utf8(out.stdout).unwrap();
        let found: Vec<Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(found.len(), texts.len(), "{family}: {lines}");
        for (prediction, logits) in found.iter().zip(expected["logits"].as_array().unwrap()) {
            let ours = prediction["logits"].as_array().unwrap();
            assert_eq!(ours.len(), logits.as_array().unwrap().len(), "{family}");
            for (a, b) in ours.iter().zip(logits.as_array().unwrap()) {
                let diff = (a.as_f64().unwrap() - b.as_f64().unwrap()).abs();
                assert!(diff <= 1e-4, "{family}: logit {a} vs Python's {b}");
            }
        }
    }
}

/// The shipped pipeline of each new family (pipelines/reviews-<family>.yaml), run as a user
/// runs it: its env var pointing at a directory shaped like the Hub's, here the family's tiny
/// checkpoint with a tokenizer in the format the family ships (tests/fixtures/tokenizers:
/// DeBERTa-v3's spm.model without tokenizer.json, ModernBERT's byte-level BPE, ELECTRA's
/// WordPiece). It trains, evaluates the test split, and saves a model whose tokenizer.json
/// encodes a review as the tokenize stage did.
#[test]
fn each_familys_pipeline_runs_on_a_hub_shaped_directory() {
    for (pipeline, variable, checkpoint, tokenizer) in [
        (
            "reviews-electra",
            "FINETUNE_ELECTRA_DIR",
            "tiny-electra",
            "electra",
        ),
        (
            "reviews-deberta-v3",
            "FINETUNE_DEBERTA_DIR",
            "tiny-deberta-v3",
            "deberta-v3",
        ),
        (
            "reviews-modernbert",
            "FINETUNE_MODERNBERT_DIR",
            "tiny-modernbert",
            "modernbert",
        ),
    ] {
        let ws = Ws::new();
        let model = ws.file("hub-model");
        copy_dir(&ws.file("fixtures/tokenizers").join(tokenizer), &model);
        for file in ["config.json", "model.safetensors"] {
            let from = ws.file(&format!("fixtures/golden/{checkpoint}/{file}"));
            std::fs::copy(from, model.join(file)).unwrap();
        }
        assert!(!model.join("tokenizer.json").exists() || tokenizer != "deberta-v3");
        let out = ws
            .command(&["run", "--json", &format!("pipelines/{pipeline}.yaml")])
            .env(variable, &model)
            .output()
            .unwrap();
        assert!(out.status.success(), "{pipeline}: {}", stderr(&out));

        let evaluation = read_json(&output_dir(&ws, pipeline, "evaluate").join("metrics.json"));
        assert_eq!(evaluation["examples"], 200, "{pipeline}: {evaluation}");
        let saved = output_dir(&ws, pipeline, "train").join("model");
        let tokenizer = tokenizers::Tokenizer::from_file(saved.join("tokenizer.json")).unwrap();
        let test_split = output_dir(&ws, pipeline, "tokenize").join("test.parquet");
        let (text, ids) = (
            &strings(&test_split, "text")[0],
            &int32_lists(&test_split, "input_ids")[0],
        );
        let encoding = tokenizer.encode(text.as_str(), true).unwrap();
        let saved_ids: Vec<i32> = encoding.get_ids().iter().map(|&i| i as i32).collect();
        assert_eq!(
            &saved_ids, ids,
            "{pipeline}: the saved tokenizer differs on {text:?}"
        );
    }
}
