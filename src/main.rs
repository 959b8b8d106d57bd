//! The `finetune` binary: registers the stage plugins and hands over to the engine's CLI.

use finetune::registry::Registry;

/// Every installed stage plugin: the one place that decides which exist (tests/fuzz_pipeline.rs
/// includes this file, so that every plugin's schema checks are fuzzed).
pub(crate) fn plugins() -> Registry {
    Registry::new()
        .with(finetune_ingest::IngestCsv)
        .with(finetune_tokenize::Tokenize)
        .with(finetune_train::Train)
        .with(finetune_evaluate::Evaluate)
        .with(finetune_fingerprint::Fingerprint)
        .with(finetune_command::Command)
        .with_predictor(finetune_evaluate::ModelPredictor)
}

fn main() -> std::process::ExitCode {
    finetune::cli::main(plugins())
}
