//! Models from scratch: HF's initialisation, deterministic by seed, saved as a loadable checkpoint.

use finetune_model::ScratchSpec;
use finetune_model::hf::{load, named_tensors, save};
use finetune_model::scratch;

fn spec() -> ScratchSpec {
    serde_json::from_value(serde_json::json!({"layers": 2, "hidden": 64, "heads": 4})).unwrap()
}

#[test]
fn a_scratch_model_is_initialised_like_transformers_and_reproducible() {
    let device = finetune_model::device("cpu").unwrap().device().clone();
    let config = spec()
        .to_config(500, 0, vec!["neg".into(), "pos".into()])
        .unwrap();
    assert_eq!(config.intermediate_size, 256);
    let model = scratch(&config, 7, &device);
    let tensors = named_tensors(&model);
    let find = |key: &str| {
        tensors
            .iter()
            .find(|(k, _, _)| k == key)
            .unwrap_or_else(|| panic!("{key}"))
            .2
            .clone()
    };
    let query = find("bert.encoder.layer.0.attention.self.query.weight");
    let mean = query.iter().sum::<f32>() / query.len() as f32;
    let std = (query.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / query.len() as f32).sqrt();
    assert!(
        mean.abs() < 0.002 && (std - 0.02).abs() < 0.002,
        "mean {mean}, std {std}"
    );
    assert!(
        find("bert.encoder.layer.0.output.LayerNorm.weight")
            .iter()
            .all(|&v| v == 1.0)
    );
    assert!(
        find("bert.encoder.layer.0.output.dense.bias")
            .iter()
            .all(|&v| v == 0.0)
    );
    assert!(
        find("bert.embeddings.word_embeddings.weight")[..64]
            .iter()
            .all(|&v| v == 0.0),
        "the padding row is zero"
    );
    let again = named_tensors(&scratch(&config, 7, &device));
    assert!(
        tensors.iter().zip(&again).all(|(a, b)| a.2 == b.2),
        "same seed, different weights"
    );
    let other = named_tensors(&scratch(&config, 8, &device));
    assert_ne!(tensors[0].2, other[0].2);

    let dir = tempfile::tempdir().unwrap();
    save(&model, dir.path()).unwrap();
    let (loaded, report) = load(dir.path(), None, 0, &device).unwrap();
    assert!(report.newly_initialized.is_empty() && report.unexpected.is_empty());
    assert_eq!(loaded.config.labels, ["neg", "pos"]);
    assert!(
        named_tensors(&loaded)
            .iter()
            .zip(&tensors)
            .all(|(a, b)| a == b)
    );
}

#[test]
fn bad_scratch_specs_are_refused() {
    let bad: ScratchSpec =
        serde_json::from_value(serde_json::json!({"layers": 2, "hidden": 65, "heads": 4})).unwrap();
    assert!(
        bad.to_config(10, 0, vec![])
            .unwrap_err()
            .to_string()
            .contains("multiple of heads")
    );
    assert!(
        serde_json::from_value::<ScratchSpec>(
            serde_json::json!({"layers": 2, "hidden": 64, "heads": 4, "hiden": 1})
        )
        .is_err()
    );
}
