//! The `finetune` engine: pipeline files, the stage DAG, the content-hash cache and the runner.
//!
//! The engine knows stages only through `finetune_core::Stage`; which plugins exist is decided
//! by the binary (`src/main.rs`), the one place where they are registered.

pub mod cache;
pub mod cli;
pub mod dag;
mod explain;
pub mod gc;
pub mod metrics;
pub mod pipeline;
pub mod plan;
pub mod registry;
pub mod remote;
pub mod report;
pub mod runner;
pub mod status;
pub mod verify;
pub mod workspace;

/// A mistake in how finetune was called (unknown stage on the command line): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
