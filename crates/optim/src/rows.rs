//! The word-embedding table, trained by rows.
//!
//! MiniLM's word embeddings are half its weights (30,522 × 384 = 11.7M), and a batch of 16
//! short sentences looks up a few hundred of those rows. Trained densely, every step zeroes a
//! 47 MB gradient table, adds the batch's rows into it, reads all of it for the gradient norm,
//! and runs AdamW over 11.7M weights and both of their moments. Here the gradient stays as the
//! rows the batch used ([`RowGradient`]) and [`RowAdamW`] steps the table row by row:
//!
//! - a row the batch used: AdamW's update with its gradient;
//! - a row used before but not in this batch: AdamW's update with a zero gradient (its moments
//!   are not zero, so the weight still moves);
//! - a row never used: its gradient and both moments have been exactly zero at every step, so
//!   AdamW's step `m̂ / (√v̂ + ε)` is exactly zero and only the weight decay is left.
//!
//! Each case computes what dense AdamW computes for that row, in the same f32 operations, so
//! the weights and moments are bit-identical to the dense update's (see the tests); the gradient
//! norm sums the same squares in another order (float reassociation). This is exact for AdamW
//! (and would be for Adam or SGD with momentum) because the update of a row without gradient
//! depends only on state that the row keeps. The lazy schemes that skip such rows altogether,
//! PyTorch's `SparseAdam` and TensorFlow's LazyAdam, are not exact: they leave the moments'
//! decay and the weight decay of skipped rows unapplied, which changes results, so none is
//! used here.

use std::collections::HashMap;
use std::path::Path;

use burn::optim::LearningRate;
use burn::tensor::Tensor;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use finetune_kernels::RowGradient;

use crate::StateError;
use crate::adamw::{FusedAdamW, decay_chunk, update_chunk};

/// AdamW over an embedding table trained by rows (see the module doc).
#[derive(Debug, Clone)]
pub struct RowAdamW {
    adamw: FusedAdamW,
    state: Option<Moments>,
}

/// AdamW's state for the whole table, as burn's `AdamWState` holds it.
#[derive(Debug, Clone, PartialEq)]
struct Moments {
    time: usize,
    moment_1: Vec<f32>,
    moment_2: Vec<f32>,
    /// Rows whose moments are not all zero; the others only decay.
    moved: Vec<bool>,
}

/// Rows per parallel task: 64 × 384 weights with their moments.
const ROWS_PER_TASK: usize = 64;

/// The name of the file [`RowAdamW::save`] writes into a checkpoint.
pub const STATE_FILE: &str = "word_embeddings_adamw.safetensors";

impl RowAdamW {
    pub fn new(adamw: FusedAdamW) -> Self {
        RowAdamW { adamw, state: None }
    }

    /// One step of `table` (`[rows, dim]`, without autodiff) from its gradient.
    pub fn step(&mut self, lr: LearningRate, table: Tensor<2>, grad: &RowGradient) -> Tensor<2> {
        let [rows, dim] = table.dims();
        assert_eq!(
            (rows, dim),
            (grad.table_rows(), grad.dim()),
            "the gradient of this table"
        );
        let device = table.device();
        let state = self.state.get_or_insert_with(|| Moments::zeros(rows, dim));
        state.time += 1;
        let c = self.adamw.coefficients(lr, state.time);
        let mut weights = table.into_data();
        let zeros = vec![0.0f32; dim];
        let span = ROWS_PER_TASK * dim;
        weights
            .as_mut_slice::<f32>()
            .expect("f32 embeddings")
            .par_chunks_mut(span)
            .zip(state.moment_1.par_chunks_mut(span))
            .zip(state.moment_2.par_chunks_mut(span))
            .zip(state.moved.par_chunks_mut(ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, (((w, m), v), moved))| {
                for (i, moved) in moved.iter_mut().enumerate() {
                    let id = task * ROWS_PER_TASK + i;
                    let at = i * dim..(i + 1) * dim;
                    let (w, m, v) = (&mut w[at.clone()], &mut m[at.clone()], &mut v[at]);
                    match grad.row(id) {
                        Some(g) => {
                            update_chunk(&c, w, g, m, v);
                            *moved = true;
                        }
                        None if *moved => update_chunk(&c, w, &zeros, m, v),
                        None => decay_chunk(&c, w),
                    }
                }
            });
        Tensor::from_data(weights, &device)
    }

    /// Writes the moments and the step count to `dir`/[`STATE_FILE`] (nothing before the first
    /// step).
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let rows = state.moved.len();
        let dim = state.moment_1.len() / rows.max(1);
        let bytes =
            |values: &[f32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
        let (first, second) = (bytes(&state.moment_1), bytes(&state.moment_2));
        let path = dir.join(STATE_FILE);
        let serialise_error = |source| StateError::Serialise {
            path: path.clone(),
            source,
        };
        let view = |data| safetensors::tensor::TensorView::new(Dtype::F32, vec![rows, dim], data);
        let views = [
            ("moment_1", view(&first).map_err(serialise_error)?),
            ("moment_2", view(&second).map_err(serialise_error)?),
        ];
        let metadata = HashMap::from([("time".to_string(), state.time.to_string())]);
        let serialized =
            safetensors::tensor::serialize(views, Some(metadata)).map_err(serialise_error)?;
        std::fs::write(&path, serialized).map_err(|source| StateError::Write { path, source })
    }

    /// Reads what [`RowAdamW::save`] wrote into `dir`, for a `[rows, dim]` table.
    pub fn load(&mut self, dir: &Path, rows: usize, dim: usize) -> Result<(), StateError> {
        let path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(|source| StateError::Read {
            path: path.clone(),
            source,
        })?;
        let at = |message: String| StateError::Invalid {
            path: path.clone(),
            message,
        };
        let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| at(e.to_string()))?;
        let time = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("time"))
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| at("no step count (`time`) in the metadata".into()))?;
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| at(e.to_string()))?;
        let moment = |name: &str| -> Result<Vec<f32>, StateError> {
            let tensor = tensors
                .tensor(name)
                .map_err(|e| at(format!("`{name}`: {e}")))?;
            if tensor.dtype() != Dtype::F32 || tensor.shape() != [rows, dim] {
                return Err(at(format!(
                    "`{name}` is {:?} {:?}, the table is F32 [{rows}, {dim}]",
                    tensor.dtype(),
                    tensor.shape()
                )));
            }
            Ok(tensor
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let (moment_1, moment_2) = (moment("moment_1")?, moment("moment_2")?);
        let moved = moment_1
            .chunks_exact(dim.max(1))
            .zip(moment_2.chunks_exact(dim.max(1)))
            .map(|(m, v)| m.iter().chain(v).any(|&x| x != 0.0))
            .collect();
        self.state = Some(Moments {
            time,
            moment_1,
            moment_2,
            moved,
        });
        Ok(())
    }
}

impl Moments {
    /// Zero moments: `vec![0.0; n]` maps zero pages, so the rows never used cost no memory.
    fn zeros(rows: usize, dim: usize) -> Moments {
        Moments {
            time: 0,
            moment_1: vec![0.0; rows * dim],
            moment_2: vec![0.0; rows * dim],
            moved: vec![false; rows],
        }
    }
}
