//! The encoders against reference values from Python `transformers` (tests/fixtures/golden), the
//! save/load round trip, and bad checkpoints.

use std::path::PathBuf;

mod common;
use common::{fixtures, minilm};

use burn::tensor::Device;
use finetune_model::hf::{load, named_tensors, save, save_with_tokenizer};
use finetune_model::{Batch, Classifier};
use serde_json::Value;

fn device() -> Device {
    finetune_model::device("cpu").unwrap().device().clone()
}

/// Runs `check` on the fused CPU path, on the generic path (burn's own operations, as every
/// GPU runs them) and on `$FINETUNE_TEST_DEVICE` when set (`cuda` in scripts/gpu-check.sh).
fn on_each_device(check: impl Fn(&Device)) {
    let mut names = vec!["cpu".to_string(), "cpu-generic".to_string()];
    if let Ok(extra) = std::env::var("FINETUNE_TEST_DEVICE") {
        names.push(extra);
    }
    for name in names {
        let compute = finetune_model::device(&name).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("on {}", compute.describe());
        compute.run(|| check(compute.device()));
    }
}

fn json(path: PathBuf) -> Value {
    serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// Token rows without their padding, from a golden padded batch.
fn rows(expected: &Value) -> Vec<Vec<i32>> {
    let ids = expected["input_ids"].as_array().unwrap();
    let masks = expected["attention_mask"].as_array().unwrap();
    ids.iter()
        .zip(masks)
        .map(|(ids, mask)| {
            let n = mask
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m.as_i64() == Some(1))
                .count();
            ids.as_array().unwrap()[..n]
                .iter()
                .map(|v| v.as_i64().unwrap() as i32)
                .collect()
        })
        .collect()
}

fn floats(value: &Value) -> Vec<f32> {
    match value {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        other => panic!("not a number: {other}"),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length differs");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Hidden states at the unpadded positions of each row, flattened.
fn unpadded_hidden(
    model: &Classifier,
    rows: &[Vec<i32>],
) -> (
    Vec<f32>,
    burn::tensor::Tensor<2>,
    Option<burn::tensor::Tensor<2>>,
) {
    let device = model.embeddings.word.weight.device();
    let batch = Batch::from_rows(rows, &model.config, None, &device);
    let out = model.forward(&batch);
    let hidden = out.last_hidden_state.dims()[2];
    let width = batch.input_ids.dims()[1];
    let all: Vec<f32> = out.last_hidden_state.into_data().try_to_vec().unwrap();
    let mut values = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        values.extend_from_slice(&all[r * width * hidden..(r * width + row.len()) * hidden]);
    }
    (values, out.logits, out.pooler_output)
}

fn check_tiny(name: &str) {
    on_each_device(|device| check_tiny_on(name, device));
}

fn check_tiny_on(name: &str, device: &Device) {
    let dir = fixtures().join("golden").join(name);
    let expected = json(dir.join("expected.json"));
    let (model, report) = load(&dir, None, 0, device).unwrap();
    assert!(
        report.newly_initialized.is_empty() && report.unexpected.is_empty(),
        "{name}: {report:?}"
    );
    let rows = rows(&expected);
    let (hidden, logits, _) = unpadded_hidden(&model, &rows);
    let hidden_diff = max_abs_diff(&hidden, &floats(&expected["last_hidden_state"]));
    let logits: Vec<f32> = logits.into_data().try_to_vec().unwrap();
    let logits_diff = max_abs_diff(&logits, &floats(&expected["logits"]));
    eprintln!("{name}: max |diff| hidden {hidden_diff:e}, logits {logits_diff:e}");
    assert!(
        hidden_diff <= 1e-4 && logits_diff <= 1e-4,
        "{name}: hidden {hidden_diff:e}, logits {logits_diff:e}"
    );
    // The classification path computes the last layer for the first token only.
    let batch = Batch::from_rows(&rows, &model.config, None, device);
    let first_only: Vec<f32> = model.logits(&batch).into_data().try_to_vec().unwrap();
    let path_diff = max_abs_diff(&first_only, &logits);
    assert!(
        path_diff <= 1e-6,
        "{name}: logits() differs from forward() by {path_diff:e}"
    );
}

#[test]
fn tiny_bert_matches_transformers() {
    check_tiny("tiny-bert");
}

#[test]
fn tiny_distilbert_matches_transformers() {
    check_tiny("tiny-distilbert");
}

#[test]
fn tiny_roberta_matches_transformers() {
    check_tiny("tiny-roberta");
}

#[test]
fn tiny_electra_matches_transformers() {
    check_tiny("tiny-electra");
}

#[test]
fn tiny_deberta_v3_matches_transformers() {
    check_tiny("tiny-deberta-v3");
}

#[test]
fn tiny_modernbert_matches_transformers() {
    check_tiny("tiny-modernbert");
}

#[test]
fn minilm_hidden_states_and_pooler_match_transformers_with_padding() {
    on_each_device(minilm_matches_on);
}

fn minilm_matches_on(device: &Device) {
    let expected = json(fixtures().join("golden/minilm_hidden_states.json"));
    let (model, report) = load(
        &minilm(),
        Some(&["negative".into(), "positive".into()]),
        42,
        device,
    )
    .unwrap();
    assert_eq!(
        report.newly_initialized,
        ["classifier.weight", "classifier.bias"]
    );
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    let rows = rows(&expected);
    assert!(
        rows.iter().map(Vec::len).min() < rows.iter().map(Vec::len).max(),
        "the batch must contain padding"
    );
    let (hidden, _, pooled) = unpadded_hidden(&model, &rows);
    let hidden_diff = max_abs_diff(&hidden, &floats(&expected["last_hidden_state"]));
    let pooled_diff = max_abs_diff(
        &pooled.unwrap().into_data().try_to_vec::<f32>().unwrap(),
        &floats(&expected["pooler_output"]),
    );
    eprintln!("all-MiniLM-L6-v2: max |diff| last hidden {hidden_diff:e}, pooler {pooled_diff:e}");
    assert!(
        hidden_diff <= 1e-4,
        "last hidden state differs by {hidden_diff:e}"
    );
    assert!(
        pooled_diff <= 1e-4,
        "pooler output differs by {pooled_diff:e}"
    );
}

#[test]
fn save_then_load_is_bit_identical_in_each_family_layout() {
    for name in [
        "tiny-bert",
        "tiny-distilbert",
        "tiny-roberta",
        "tiny-electra",
        "tiny-deberta-v3",
        "tiny-modernbert",
    ] {
        let dir = fixtures().join("golden").join(name);
        let (model, _) = load(&dir, None, 0, &device()).unwrap();
        let out = tempfile::tempdir().unwrap();
        save(&model, out.path()).unwrap();
        let (again, report) = load(out.path(), None, 0, &device()).unwrap();
        assert!(report.newly_initialized.is_empty() && report.unexpected.is_empty());
        let (a, b) = (named_tensors(&model), named_tensors(&again));
        assert_eq!(a.len(), b.len());
        for ((ka, sa, va), (kb, sb, vb)) in a.iter().zip(&b) {
            assert_eq!((ka, sa), (kb, sb));
            assert!(
                va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name}: {ka} changed"
            );
        }
        // The saved keys are the original checkpoint's keys.
        let original = safetensors_keys(&dir.join("model.safetensors"));
        let saved = safetensors_keys(&out.path().join("model.safetensors"));
        assert_eq!(original, saved, "{name}: key layout differs");
        let config = json(out.path().join("config.json"));
        assert_eq!(config["id2label"]["2"], "LABEL_2");
    }
}

fn safetensors_keys(path: &std::path::Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let mut keys: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(|k| k.to_string())
        .collect();
    keys.sort();
    keys
}

#[test]
fn a_fine_tuned_minilm_saves_as_bert_for_sequence_classification() {
    let labels = vec!["negative".to_string(), "positive".to_string()];
    let (model, _) = load(&minilm(), Some(&labels), 42, &device()).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_with_tokenizer(&model, out.path(), &minilm().join("tokenizer.json")).unwrap();
    assert_eq!(
        std::fs::read(out.path().join("tokenizer.json")).unwrap(),
        std::fs::read(minilm().join("tokenizer.json")).unwrap()
    );
    let keys = safetensors_keys(&out.path().join("model.safetensors"));
    assert!(keys.contains(&"bert.encoder.layer.5.output.LayerNorm.weight".to_string()));
    assert!(
        keys.contains(&"classifier.weight".to_string())
            && keys.contains(&"bert.pooler.dense.weight".to_string())
    );
    let config = json(out.path().join("config.json"));
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    assert_eq!(config["label2id"]["positive"], 1);
    let (again, report) = load(out.path(), None, 0, &device()).unwrap();
    assert!(report.newly_initialized.is_empty());
    assert_eq!(again.config.labels, labels);
}

fn copy_tiny(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(
            fixtures().join("golden").join(name).join(file),
            dir.path().join(file),
        )
        .unwrap();
    }
    dir
}

fn load_error(dir: &std::path::Path) -> String {
    match load(dir, None, 0, &device()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(err) => err.to_string(),
    }
}

#[test]
fn bad_checkpoints_name_the_file_and_key() {
    let dir = copy_tiny("tiny-bert");
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );

    let dir = copy_tiny("tiny-bert");
    let config_path = dir.path().join("config.json");
    let mut config = json(config_path.clone());
    config["intermediate_size"] = Value::from(48);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("tensor `bert.encoder.layer.0.intermediate.dense.weight`: the checkpoint has shape [64, 32], but config.json implies [48, 32]"), "{err}");

    config["intermediate_size"] = Value::from(64);
    config["model_type"] = Value::from("gpt2");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("config.json: key `model_type`: `gpt2` is not supported"),
        "{err}"
    );
}

#[test]
fn electra_embedding_width_errors_name_the_key() {
    let dir = copy_tiny("tiny-electra");
    let config_path = dir.path().join("config.json");
    let mut config = json(config_path.clone());
    config["embedding_size"] = Value::from(8);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("tensor `electra.embeddings.word_embeddings.weight`: the checkpoint has shape [1000, 16], but config.json implies [1000, 8]"),
        "{err}"
    );

    // Left out, it is ElectraConfig's default, 128, which these weights are not.
    config.as_object_mut().unwrap().remove("embedding_size");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("config.json implies [1000, 128]"), "{err}");
}

/// A dropout probability outside [0, 1) in any family's config.json is a config error naming
/// the key, not a panic inside burn's dropout once training starts.
#[test]
fn dropout_probabilities_outside_zero_to_one_name_the_key() {
    for (family, key) in [
        ("tiny-bert", "hidden_dropout_prob"),
        ("tiny-distilbert", "seq_classif_dropout"),
        ("tiny-electra", "classifier_dropout"),
        ("tiny-deberta-v3", "pooler_dropout"),
        ("tiny-modernbert", "mlp_dropout"),
    ] {
        for value in [Value::from(1.0), Value::from(-0.1), Value::from("0.1")] {
            let dir = copy_tiny(family);
            let config_path = dir.path().join("config.json");
            let mut config = json(config_path.clone());
            config[key] = value.clone();
            std::fs::write(&config_path, config.to_string()).unwrap();
            let err = load_error(dir.path());
            assert!(
                err.contains("config.json")
                    && err.contains(key)
                    && err.contains("is not a dropout probability in [0, 1)"),
                "{family} {key}={value}: {err}"
            );
        }
    }
}

#[test]
fn deberta_settings_outside_v3_and_v2_base_are_refused_naming_the_key() {
    let dir = copy_tiny("tiny-deberta-v3");
    let config_path = dir.path().join("config.json");
    let original = json(config_path.clone());
    for (key, value, message) in [
        ("share_att_key", Value::from(false), "separate pos_key_proj"),
        ("conv_kernel_size", Value::from(3), "is not supported here"),
        (
            "pos_att_type",
            Value::from("p2c|p2p"),
            "`p2p` is not supported",
        ),
        (
            "pooler_hidden_act",
            Value::from("tanh"),
            "activation `tanh`",
        ),
    ] {
        let mut config = original.clone();
        config[key] = value;
        std::fs::write(&config_path, config.to_string()).unwrap();
        let err = load_error(dir.path());
        assert!(
            err.contains("config.json") && err.contains(key) && err.contains(message),
            "{key}: {err}"
        );
    }
    // Turned off, the relative table is no longer part of the model: its keys are reported.
    let mut config = original.clone();
    config["relative_attention"] = Value::from(false);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let (_, report) = load(dir.path(), None, 0, &device()).unwrap();
    assert_eq!(
        report.unexpected,
        [
            "deberta.encoder.LayerNorm.bias",
            "deberta.encoder.LayerNorm.weight",
            "deberta.encoder.rel_embeddings.weight"
        ]
    );
}
