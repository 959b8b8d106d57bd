//! The kernels on burn's flex backend: raw f32 loops and gemm calls over `FlexTensor` storage,
//! parallel over the rayon pool.

use burn::backend::flex::FlexTensor;
use burn::backend::{Backend, Flex};
use burn::tensor::{DType, Shape};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use crate::slots::{Unwritten, slots, write_all, written};
use crate::{FusedOps, LANE, Mask, RowGradient, erf, expf, task_len};

/// The forward and backward pieces that the fused operations are made of, on one backend.
pub trait Kernels: Backend {
    fn dense_forward(
        x: Self::FloatTensorPrimitive,
        weight: Self::FloatTensorPrimitive,
        bias: Self::FloatTensorPrimitive,
    ) -> Self::FloatTensorPrimitive;
    /// The gradients of `x`, `weight` and `bias` that are asked for.
    fn dense_backward(
        x: Self::FloatTensorPrimitive,
        weight: Self::FloatTensorPrimitive,
        grad: Self::FloatTensorPrimitive,
        wanted: [bool; 3],
    ) -> [Option<Self::FloatTensorPrimitive>; 3];
    /// GELU's value, and its slope when asked for (sharing one erf per element).
    fn gelu_forward(
        x: Self::FloatTensorPrimitive,
        with_slope: bool,
    ) -> (
        Self::FloatTensorPrimitive,
        Option<Self::FloatTensorPrimitive>,
    );
    /// `grad ⊙ slope`.
    fn scale(
        grad: Self::FloatTensorPrimitive,
        slope: Self::FloatTensorPrimitive,
    ) -> Self::FloatTensorPrimitive;
    /// `x ⊙ mask` in row-major order.
    fn dropout(x: Self::FloatTensorPrimitive, mask: Mask) -> Self::FloatTensorPrimitive;
    fn embedding_rows(
        table: Self::FloatTensorPrimitive,
        ids: Self::IntTensorPrimitive,
    ) -> Self::FloatTensorPrimitive;
    /// The table's gradient: each id's row of `grad` added into a zeroed `[rows, dim]` table,
    /// in id order.
    fn embedding_grad(
        ids: Self::IntTensorPrimitive,
        grad: Self::FloatTensorPrimitive,
        rows: usize,
    ) -> Self::FloatTensorPrimitive;
    /// Multi-head attention's context and its probabilities before dropout (see
    /// [`super::attention`]), the scores with a `[batch, heads, rows, seq]` `bias` added
    /// ([`super::biased_attention`]) and keys beyond `window` masked ([`super::local_attention`])
    /// where given.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        q: Self::FloatTensorPrimitive,
        k: Self::FloatTensorPrimitive,
        v: Self::FloatTensorPrimitive,
        mask: Self::FloatTensorPrimitive,
        bias: Option<Self::FloatTensorPrimitive>,
        window: Option<usize>,
        heads: usize,
        divisor: f32,
        dropout: Option<Mask>,
    ) -> [Self::FloatTensorPrimitive; 2];
    /// The gradients of the queries, keys and values from the context's, and the bias's
    /// (the scores' gradient before the divisor) when `bias_grad` asks for it.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        q: Self::FloatTensorPrimitive,
        k: Self::FloatTensorPrimitive,
        v: Self::FloatTensorPrimitive,
        probs: Self::FloatTensorPrimitive,
        grad: Self::FloatTensorPrimitive,
        heads: usize,
        divisor: f32,
        dropout: Option<Mask>,
        bias_grad: bool,
    ) -> (
        [Self::FloatTensorPrimitive; 3],
        Option<Self::FloatTensorPrimitive>,
    );
    /// GeGLU: `gelu(a) ⊙ b` for the halves `[a, b]` of `x`'s last dimension, and what the
    /// backward needs when asked for (GELU's value and slope at `a`).
    fn geglu_forward(
        x: Self::FloatTensorPrimitive,
        with_backward: bool,
    ) -> (
        Self::FloatTensorPrimitive,
        Option<[Self::FloatTensorPrimitive; 2]>,
    );
    /// GeGLU's input gradient `[grad ⊙ b ⊙ slope, grad ⊙ gelu(a)]`.
    fn geglu_backward(
        x: Self::FloatTensorPrimitive,
        value: Self::FloatTensorPrimitive,
        slope: Self::FloatTensorPrimitive,
        grad: Self::FloatTensorPrimitive,
    ) -> Self::FloatTensorPrimitive;
    /// Rotary position embedding of `x: [batch, len, heads × head_dim]` by the angles whose
    /// `cos` and `sin` are `[len, head_dim]`; `inverse` rotates back (the backward).
    fn rotary(
        x: Self::FloatTensorPrimitive,
        cos: Self::FloatTensorPrimitive,
        sin: Self::FloatTensorPrimitive,
        heads: usize,
        inverse: bool,
    ) -> Self::FloatTensorPrimitive;
    /// `LayerNorm(x + residual)`, and what its backward needs: the normalized rows (before
    /// `gamma` and `beta`) and each row's standard deviation `√(var + ε)`.
    fn add_norm_forward(
        x: Self::FloatTensorPrimitive,
        residual: Self::FloatTensorPrimitive,
        gamma: Self::FloatTensorPrimitive,
        beta: Self::FloatTensorPrimitive,
        epsilon: f32,
    ) -> [Self::FloatTensorPrimitive; 3];
    /// The gradients of the norm's input (the sum `x + residual`), `gamma` and `beta`.
    fn add_norm_backward(
        normalized: Self::FloatTensorPrimitive,
        deviation: Self::FloatTensorPrimitive,
        gamma: Self::FloatTensorPrimitive,
        grad: Self::FloatTensorPrimitive,
    ) -> [Self::FloatTensorPrimitive; 3];
}

impl FusedOps for Flex {
    fn fused_dense(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        Self::dense_forward(x, weight, bias)
    }

    fn fused_gelu(x: FlexTensor) -> FlexTensor {
        Self::gelu_forward(x, false).0
    }

    fn fused_dropout(x: FlexTensor, mask: Mask) -> FlexTensor {
        Self::dropout(x, mask)
    }

    fn fused_embedding(table: FlexTensor, ids: FlexTensor) -> FlexTensor {
        Self::embedding_rows(table, ids)
    }

    fn fused_add_norm(
        x: FlexTensor,
        residual: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f32,
    ) -> FlexTensor {
        let [out, _, _] = Self::add_norm_forward(x, residual, gamma, beta, epsilon);
        out
    }

    fn fused_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        mask: FlexTensor,
        heads: usize,
        divisor: f32,
        window: Option<usize>,
        dropout: Option<Mask>,
    ) -> FlexTensor {
        let [context, _] =
            Self::attention_forward(q, k, v, mask, None, window, heads, divisor, dropout);
        context
    }

    fn fused_biased_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        mask: FlexTensor,
        bias: FlexTensor,
        heads: usize,
        divisor: f32,
        dropout: Option<Mask>,
    ) -> FlexTensor {
        let [context, _] =
            Self::attention_forward(q, k, v, mask, Some(bias), None, heads, divisor, dropout);
        context
    }

    fn fused_geglu(x: FlexTensor) -> FlexTensor {
        Self::geglu_forward(x, false).0
    }

    fn fused_rotary(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, heads: usize) -> FlexTensor {
        Self::rotary(x, cos, sin, heads, false)
    }
}

impl Kernels for Flex {
    fn dense_forward(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let (x, weight, bias) = (contiguous(x), contiguous(weight), contiguous(bias));
        let [rows, d_in] = dims2(&x);
        let [w_in, d_out] = dims2(&weight);
        assert_eq!(
            d_in, w_in,
            "dense: input width {d_in} against weight rows {w_in}"
        );
        assert_eq!(values(&bias).len(), d_out, "dense: bias length");
        let x = Operand::row_major(values(&x), d_in);
        let w = Operand::row_major(values(&weight), d_out);
        let mut out = Vec::with_capacity(rows * d_out);
        // SAFETY: `out` has room for rows × d_out values, and the product writes all of them
        // (each band its columns of the bias rows, then the product added onto them).
        unsafe {
            matmul(
                Cores::All,
                [rows, d_out],
                d_in,
                out.as_mut_ptr(),
                Start::Rows(values(&bias)),
                [x, w],
            );
            out.set_len(rows * d_out);
        }
        FlexTensor::from_data(burn::tensor::TensorData::new(out, [rows, d_out]))
    }

    fn dense_backward(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        [want_x, want_weight, want_bias]: [bool; 3],
    ) -> [Option<FlexTensor>; 3] {
        let (x, weight, grad) = (contiguous(x), contiguous(weight), contiguous(grad));
        let [rows, d_in] = dims2(&x);
        let [_, d_out] = dims2(&weight);
        let (x, weight, grad) = (values(&x), values(&weight), values(&grad));
        // With both wanted, the two products (equal in multiply-adds) run side by side, each
        // on one core: at a few hundred rows that beats splitting each product over both.
        let cores = match want_x && want_weight {
            true => Cores::One,
            false => Cores::All,
        };
        let grad_x = || {
            want_x.then(|| {
                // g · Wᵀ: Wᵀ is W read with its strides swapped.
                let g = Operand::row_major(grad, d_out);
                let w = Operand::row_major(weight, d_out).transposed();
                product(cores, [rows, d_in], d_out, g, w)
            })
        };
        let grad_weight_and_bias = || {
            let grad_weight = want_weight.then(|| {
                let xt = Operand::row_major(x, d_in).transposed();
                let g = Operand::row_major(grad, d_out);
                product(cores, [d_in, d_out], rows, xt, g)
            });
            let grad_bias = want_bias.then(|| {
                let sums = column_sums(grad, d_out);
                FlexTensor::from_data(burn::tensor::TensorData::new(sums, [d_out]))
            });
            (grad_weight, grad_bias)
        };
        let (grad_x, (grad_weight, grad_bias)) = match cores {
            Cores::One => rayon::join(grad_x, grad_weight_and_bias),
            Cores::All => (grad_x(), grad_weight_and_bias()),
        };
        [grad_x, grad_weight, grad_bias]
    }

    fn gelu_forward(x: FlexTensor, with_slope: bool) -> (FlexTensor, Option<FlexTensor>) {
        let x = contiguous(x);
        let shape = x.layout().shape().clone();
        let input = values(&x);
        let mut value = Unwritten::new(shape.clone());
        let task = task_len(input.len(), LANE);
        if !with_slope {
            value
                .slots()
                .par_chunks_mut(task)
                .zip(input.par_chunks(task))
                .for_each(|(out, input)| {
                    let out = erf::erf_scaled(input, out);
                    for (out, &x) in out.iter_mut().zip(input) {
                        *out = gelu_value(x, *out);
                    }
                });
            // SAFETY: the chunks cover the tensor, and `erf_scaled` writes every value of each.
            return (unsafe { value.into_tensor() }, None);
        }
        let mut slope = Unwritten::new(shape);
        value
            .slots()
            .par_chunks_mut(task)
            .zip(slope.slots().par_chunks_mut(task))
            .zip(input.par_chunks(task))
            .for_each(|((values, slopes), input)| {
                let values = erf::erf_scaled(input, values);
                assert_eq!(slopes.len(), input.len());
                for (slope, &x) in slopes.iter_mut().zip(input) {
                    slope.write(-0.5 * x * x);
                }
                // SAFETY: the loop wrote every slope of the chunk (as long as the input's).
                let slopes = unsafe { written(slopes) };
                expf::exp_in_place(slopes);
                for ((value, slope), &x) in values.iter_mut().zip(slopes).zip(input) {
                    let erf = *value;
                    *value = gelu_value(x, erf);
                    *slope = gelu_slope(x, erf, *slope);
                }
            });
        // SAFETY: the chunks cover both tensors, and each chunk of both is written whole
        // (by `erf_scaled`, and by the loop over the slopes).
        unsafe { (value.into_tensor(), Some(slope.into_tensor())) }
    }

    fn scale(grad: FlexTensor, slope: FlexTensor) -> FlexTensor {
        let (grad, slope) = (contiguous(grad), contiguous(slope));
        assert_eq!(
            values(&grad).len(),
            values(&slope).len(),
            "scale: slope shape"
        );
        let mut out = Unwritten::new(grad.layout().shape().clone());
        let task = task_len(values(&grad).len(), LANE);
        out.slots()
            .par_chunks_mut(task)
            .zip(values(&grad).par_chunks(task))
            .zip(values(&slope).par_chunks(task))
            .for_each(|((out, grad), slope)| {
                for ((out, &g), &s) in out.iter_mut().zip(grad).zip(slope) {
                    out.write(g * s);
                }
            });
        // SAFETY: the chunks of the three (of one length) cover the tensor, and every value of
        // each is written.
        unsafe { out.into_tensor() }
    }

    fn dropout(x: FlexTensor, mask: Mask) -> FlexTensor {
        let x = contiguous(x);
        let mut out = Unwritten::new(x.layout().shape().clone());
        mask.apply(values(&x), out.slots());
        // SAFETY: `apply` writes every value of `out`.
        unsafe { out.into_tensor() }
    }

    fn embedding_rows(table: FlexTensor, ids: FlexTensor) -> FlexTensor {
        let table = contiguous(table);
        let [rows, dim] = dims2(&table);
        let (ids, [batch, seq]) = ids_of(ids);
        assert_eq!(ids.len(), batch * seq, "embedding: ids shape");
        let mut out = Unwritten::new(Shape::new([batch, seq, dim]));
        let table = values(&table);
        for (out, &id) in out.slots().chunks_exact_mut(dim.max(1)).zip(&ids) {
            assert!(
                id < rows,
                "embedding: id {id} is outside the table's {rows} rows"
            );
            write_all(out, &table[id * dim..(id + 1) * dim]);
        }
        // SAFETY: one row per id (`batch × seq` of them), each copied whole from the table.
        unsafe { out.into_tensor() }
    }

    fn embedding_grad(ids: FlexTensor, grad: FlexTensor, rows: usize) -> FlexTensor {
        let grad = contiguous(grad);
        let (ids, _) = ids_of(ids);
        let dim = values(&grad).len() / ids.len().max(1);
        // The rows' sums as training by rows makes them, laid out densely: the two ways of
        // training a table share one summation.
        let sums = RowGradient::from_lookup(rows, dim, &ids, values(&grad)).to_dense();
        FlexTensor::from_data(burn::tensor::TensorData::new(sums, [rows, dim]))
    }

    fn attention_forward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        mask: FlexTensor,
        bias: Option<FlexTensor>,
        window: Option<usize>,
        heads: usize,
        divisor: f32,
        dropout: Option<Mask>,
    ) -> [FlexTensor; 2] {
        let (q, k, v, mask) = (
            contiguous(q),
            contiguous(k),
            contiguous(v),
            contiguous(mask),
        );
        let bias = bias.map(contiguous);
        let shape = AttentionShape::of(&q, &k, heads);
        let AttentionShape {
            rows, seq, hidden, ..
        } = shape;
        assert_eq!(
            values(&v).len(),
            values(&k).len(),
            "attention: values shape"
        );
        assert_eq!(
            values(&mask).len(),
            shape.batch * seq,
            "attention: mask shape"
        );
        let span = heads * rows * seq;
        if let Some(bias) = &bias {
            assert_eq!(
                values(bias).len(),
                shape.batch * span,
                "attention: bias shape"
            );
        }
        let mut context = Unwritten::new(q.layout().shape().clone());
        let mut probs = Unwritten::new(Shape::new([shape.batch, heads, rows, seq]));
        // One task per item: it owns the item's rows of the context and its probabilities.
        context
            .slots()
            .par_chunks_mut(rows * hidden)
            .zip(probs.slots().par_chunks_mut(heads * rows * seq))
            .enumerate()
            .for_each(|(item, (context, probs))| {
                let item = shape.item(item, values(&q), values(&k), values(&v));
                let scores = Scores {
                    mask: &values(&mask)[item.index * seq..(item.index + 1) * seq],
                    bias: bias
                        .as_ref()
                        .map(|bias| &values(bias)[item.index * span..(item.index + 1) * span]),
                    window,
                    divisor,
                };
                attend(&shape, &item, scores, dropout, context, probs);
            });
        // SAFETY: one task per item covers both tensors; `attend` writes each head's
        // probabilities (a softmax of every row) and its columns of every context row (a
        // product that overwrites them).
        unsafe { [context.into_tensor(), probs.into_tensor()] }
    }

    fn attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        probs: FlexTensor,
        grad: FlexTensor,
        heads: usize,
        divisor: f32,
        dropout: Option<Mask>,
        bias_grad: bool,
    ) -> ([FlexTensor; 3], Option<FlexTensor>) {
        let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
        let (probs, grad) = (contiguous(probs), contiguous(grad));
        let shape = AttentionShape::of(&q, &k, heads);
        let AttentionShape {
            rows, seq, hidden, ..
        } = shape;
        let span = heads * rows * seq;
        let mut grad_q = Unwritten::new(q.layout().shape().clone());
        let mut grad_k = Unwritten::new(k.layout().shape().clone());
        let mut grad_v = Unwritten::new(v.layout().shape().clone());
        let mut grad_bias = bias_grad.then(|| Unwritten::new(probs.layout().shape().clone()));
        // Each item's task gets its `span` of the bias's gradient, or `None`.
        let mut no_bias = Vec::new();
        let bias_slots = match &mut grad_bias {
            Some(grad_bias) => grad_bias.slots(),
            None => &mut no_bias[..],
        };
        grad_q
            .slots()
            .par_chunks_mut(rows * hidden)
            .zip(grad_k.slots().par_chunks_mut(seq * hidden))
            .zip(grad_v.slots().par_chunks_mut(seq * hidden))
            .zip(chunks_or_none(bias_slots, span, shape.batch))
            .enumerate()
            .for_each(|(item, (((grad_q, grad_k), grad_v), bias))| {
                let item = shape.item(item, values(&q), values(&k), values(&v));
                let probs = &values(&probs)[item.index * span..(item.index + 1) * span];
                let grad = &values(&grad)[item.index * rows * hidden..][..rows * hidden];
                let grads = ItemGrads {
                    q: grad_q,
                    k: grad_k,
                    v: grad_v,
                    bias,
                };
                attend_backward(&shape, &item, probs, grad, divisor, dropout, grads);
            });
        // SAFETY: one task per item covers the tensors; `attend_backward` writes each head's
        // columns of every row of the three with products that overwrite them, and each
        // head's `rows × seq` of the bias's gradient where it is asked for.
        unsafe {
            (
                [
                    grad_q.into_tensor(),
                    grad_k.into_tensor(),
                    grad_v.into_tensor(),
                ],
                grad_bias.map(|grad| grad.into_tensor()),
            )
        }
    }

    fn add_norm_forward(
        x: FlexTensor,
        residual: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f32,
    ) -> [FlexTensor; 3] {
        let (x, residual) = (contiguous(x), contiguous(residual));
        let (gamma, beta) = (contiguous(gamma), contiguous(beta));
        let shape = x.layout().shape().clone();
        assert_eq!(
            &shape,
            residual.layout().shape(),
            "add_norm: residual shape"
        );
        let (gamma, beta) = (values(&gamma), values(&beta));
        let width = gamma.len();
        assert!(
            width > 0 && shape[shape.num_dims() - 1] == width && beta.len() == width,
            "add_norm: gamma and beta must have the input's last dimension"
        );
        let rows = shape.num_elements() / width;
        let (mut out, mut normalized) = (Unwritten::new(shape.clone()), Unwritten::new(shape));
        let mut deviation = Unwritten::new(Shape::new([rows]));
        let block = rows_per_task(rows * width, width);
        out.slots()
            .par_chunks_mut(block * width)
            .zip(normalized.slots().par_chunks_mut(block * width))
            .zip(deviation.slots().par_chunks_mut(block))
            .zip(values(&x).par_chunks(block * width))
            .zip(values(&residual).par_chunks(block * width))
            .for_each(|((((out, normalized), deviation), x), residual)| {
                let rows = out
                    .chunks_exact_mut(width)
                    .zip(normalized.chunks_exact_mut(width))
                    .zip(x.chunks_exact(width).zip(residual.chunks_exact(width)));
                for (((out, normalized), (x, residual)), deviation) in rows.zip(deviation) {
                    let (normalized, row_deviation) = norm_row(x, residual, epsilon, normalized);
                    deviation.write(row_deviation);
                    for (((out, &n), &g), &b) in
                        out.iter_mut().zip(&*normalized).zip(gamma).zip(beta)
                    {
                        out.write(n * g + b);
                    }
                }
            });
        // SAFETY: the blocks cover all rows (a block's rows and deviations in step), and each
        // row's output, normalized values (`norm_row`) and deviation are written whole: the
        // rows are `width` long, as gamma and beta are (asserted above).
        unsafe {
            [
                out.into_tensor(),
                normalized.into_tensor(),
                deviation.into_tensor(),
            ]
        }
    }

    fn add_norm_backward(
        normalized: FlexTensor,
        deviation: FlexTensor,
        gamma: FlexTensor,
        grad: FlexTensor,
    ) -> [FlexTensor; 3] {
        let (normalized, deviation) = (contiguous(normalized), contiguous(deviation));
        let (gamma, grad) = (contiguous(gamma), contiguous(grad));
        let shape = normalized.layout().shape().clone();
        let gamma = values(&gamma);
        let width = gamma.len();
        assert!(
            width > 0 && shape[shape.num_dims() - 1] == width,
            "add_norm backward: gamma must have the input's last dimension"
        );
        let block = rows_per_task(shape.num_elements(), width);
        let mut grad_input = Unwritten::new(shape);
        // Each task's sums over its rows for gamma and beta, added in task order afterwards.
        let partial: Vec<(Vec<f32>, Vec<f32>)> = grad_input
            .slots()
            .par_chunks_mut(block * width)
            .zip(values(&normalized).par_chunks(block * width))
            .zip(values(&deviation).par_chunks(block))
            .zip(values(&grad).par_chunks(block * width))
            .map(|(((grad_input, normalized), deviation), grad)| {
                let (mut grad_gamma, mut grad_beta) = (vec![0f32; width], vec![0f32; width]);
                let rows = grad_input
                    .chunks_exact_mut(width)
                    .zip(normalized.chunks_exact(width))
                    .zip(grad.chunks_exact(width));
                for (((grad_input, normalized), grad), &deviation) in rows.zip(deviation) {
                    norm_row_backward(normalized, deviation, gamma, grad, grad_input);
                    for (((gg, gb), &n), &g) in grad_gamma
                        .iter_mut()
                        .zip(&mut grad_beta)
                        .zip(normalized)
                        .zip(grad)
                    {
                        *gg += g * n;
                        *gb += g;
                    }
                }
                (grad_gamma, grad_beta)
            })
            .collect();
        let (mut grad_gamma, mut grad_beta) = (vec![0f32; width], vec![0f32; width]);
        for (gg, gb) in partial {
            grad_gamma.iter_mut().zip(gg).for_each(|(s, v)| *s += v);
            grad_beta.iter_mut().zip(gb).for_each(|(s, v)| *s += v);
        }
        let vector = |v: Vec<f32>| FlexTensor::from_data(burn::tensor::TensorData::new(v, [width]));
        // SAFETY: the blocks cover all rows, and `norm_row_backward` writes each row whole.
        let grad_input = unsafe { grad_input.into_tensor() };
        [grad_input, vector(grad_gamma), vector(grad_beta)]
    }

    fn geglu_forward(x: FlexTensor, with_backward: bool) -> (FlexTensor, Option<[FlexTensor; 2]>) {
        let x = contiguous(x);
        let mut dims = x.layout().shape().to_vec();
        let width = dims.last().copied().unwrap_or(0) / 2;
        assert!(
            width > 0,
            "geglu: the last dimension {dims:?} has no two halves"
        );
        *dims.last_mut().expect("a last dimension") = width;
        let shape = Shape::from(dims);
        let input = values(&x);
        let rows = input.len() / (2 * width);
        let task_rows = task_len(rows * width, width) / width;
        let mut out = Unwritten::new(shape.clone());
        let mut value = Unwritten::new(if with_backward {
            shape.clone()
        } else {
            Shape::new([0])
        });
        let mut slope = Unwritten::new(if with_backward {
            shape
        } else {
            Shape::new([0])
        });
        // Without a backward the value and slope stay in each task's own buffers.
        let (values_out, slopes_out) = (value.slots(), slope.slots());
        out.slots()
            .par_chunks_mut(task_rows * width)
            .zip(input.par_chunks(task_rows * 2 * width))
            .zip(chunks_or_none(values_out, task_rows * width, rows))
            .zip(chunks_or_none(slopes_out, task_rows * width, rows))
            .for_each(|(((out, input), kept_value), kept_slope)| {
                let len = out.len();
                let (mut own_value, mut own_slope) = (Vec::new(), Vec::new());
                let value = kept_value.unwrap_or_else(|| {
                    own_value = slots(len);
                    &mut own_value
                });
                let slope = kept_slope.unwrap_or_else(|| {
                    own_slope = slots(len);
                    &mut own_slope
                });
                geglu_rows(input, width, GegluSlots { out, value, slope });
            });
        // SAFETY: the chunks cover `out` (and the value and slope where kept), and
        // `geglu_rows` writes every value of each.
        unsafe {
            let out = out.into_tensor();
            match with_backward {
                true => (out, Some([value.into_tensor(), slope.into_tensor()])),
                false => (out, None),
            }
        }
    }

    fn geglu_backward(
        x: FlexTensor,
        value: FlexTensor,
        slope: FlexTensor,
        grad: FlexTensor,
    ) -> FlexTensor {
        let (x, value, slope, grad) = (
            contiguous(x),
            contiguous(value),
            contiguous(slope),
            contiguous(grad),
        );
        let width = *value.layout().shape().last().expect("a last dimension");
        let rows = values(&value).len() / width.max(1);
        assert!(
            values(&x).len() == 2 * rows * width && values(&grad).len() == rows * width,
            "geglu backward: shapes"
        );
        let task_rows = task_len(rows * width, width) / width.max(1);
        let mut grad_x = Unwritten::new(x.layout().shape().clone());
        grad_x
            .slots()
            .par_chunks_mut(task_rows * 2 * width)
            .zip(values(&x).par_chunks(task_rows * 2 * width))
            .zip(values(&value).par_chunks(task_rows * width))
            .zip(values(&slope).par_chunks(task_rows * width))
            .zip(values(&grad).par_chunks(task_rows * width))
            .for_each(|((((out, x), value), slope), grad)| {
                for ((((out, x), value), slope), grad) in out
                    .chunks_exact_mut(2 * width)
                    .zip(x.chunks_exact(2 * width))
                    .zip(value.chunks_exact(width))
                    .zip(slope.chunks_exact(width))
                    .zip(grad.chunks_exact(width))
                {
                    let (out_a, out_b) = out.split_at_mut(width);
                    let gate = &x[width..];
                    for (((out, &g), &b), &s) in out_a.iter_mut().zip(grad).zip(gate).zip(slope) {
                        out.write(g * b * s);
                    }
                    for ((out, &g), &v) in out_b.iter_mut().zip(grad).zip(value) {
                        out.write(g * v);
                    }
                }
            });
        // SAFETY: the chunks cover the gradient, and both halves of every row are written.
        unsafe { grad_x.into_tensor() }
    }

    fn rotary(
        x: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        heads: usize,
        inverse: bool,
    ) -> FlexTensor {
        let (x, cos, sin) = (contiguous(x), contiguous(cos), contiguous(sin));
        let dims = x.layout().shape().to_vec();
        let [_, len, hidden] = dims[..] else {
            panic!("rotary: x is {dims:?}, not [batch, len, hidden]")
        };
        assert!(
            heads > 0 && hidden % heads == 0 && (hidden / heads).is_multiple_of(2),
            "rotary: {hidden} is not {heads} heads of an even width"
        );
        let head_dim = hidden / heads;
        assert!(
            values(&cos).len() == len * head_dim && values(&sin).len() == len * head_dim,
            "rotary: the tables are not [{len}, {head_dim}]"
        );
        let (cos, sin) = (values(&cos), values(&sin));
        let mut out = Unwritten::new(x.layout().shape().clone());
        out.slots()
            .par_chunks_mut(hidden)
            .zip(values(&x).par_chunks(hidden))
            .enumerate()
            .for_each(|(token, (out, x))| {
                let position = token % len;
                let angles = position * head_dim..(position + 1) * head_dim;
                let (cos, sin) = (&cos[angles.clone()], &sin[angles]);
                for (out, x) in out.chunks_exact_mut(head_dim).zip(x.chunks_exact(head_dim)) {
                    rotate_head(out, x, cos, sin, inverse);
                }
            });
        // SAFETY: one task per token covers the tensor, and `rotate_head` writes every value
        // of each head.
        unsafe { out.into_tensor() }
    }
}

/// One task's rows of GeGLU and where its results go: `out`, GELU's `value` and `slope` at
/// the first halves, each `[rows, width]`.
struct GegluSlots<'a> {
    out: &'a mut [MaybeUninit<f32>],
    value: &'a mut [MaybeUninit<f32>],
    slope: &'a mut [MaybeUninit<f32>],
}

/// GeGLU of `input`'s `[rows, 2 × width]`: per row, `gelu(a) ⊙ b` for its halves `a` and `b`,
/// with GELU bit for bit burn's (as [`super::gelu`]'s kernel).
fn geglu_rows(input: &[f32], width: usize, slots: GegluSlots) {
    for (((input, out), value), slope) in input
        .chunks_exact(2 * width)
        .zip(slots.out.chunks_exact_mut(width))
        .zip(slots.value.chunks_exact_mut(width))
        .zip(slots.slope.chunks_exact_mut(width))
    {
        let (a, b) = input.split_at(width);
        let erf = erf::erf_scaled(a, value);
        for (slope, &x) in slope.iter_mut().zip(a) {
            slope.write(-0.5 * x * x);
        }
        // SAFETY: the loop wrote every slope of the row (as long as `a`).
        let slope = unsafe { written(slope) };
        expf::exp_in_place(slope);
        for ((((out, value), slope), &x), &b) in out.iter_mut().zip(erf).zip(slope).zip(a).zip(b) {
            let erf = *value;
            *value = gelu_value(x, erf);
            *slope = gelu_slope(x, erf, *slope);
            out.write(*value * b);
        }
    }
}

/// `len`'s chunks of `slots`, each `Some`, or (where `slots` is empty) `count` `None`s.
fn chunks_or_none(
    slots: &mut [MaybeUninit<f32>],
    len: usize,
    count: usize,
) -> impl IndexedParallelIterator<Item = Option<&mut [MaybeUninit<f32>]>> {
    let none = if slots.is_empty() { count } else { 0 };
    slots
        .par_chunks_mut(len.max(1))
        .map(Some)
        .chain((0..none).into_par_iter().map(|_| None))
}

/// One head of rotary position embedding: with `(x₁, x₂)` the head's halves,
/// `x ⊙ cos + (−x₂, x₁) ⊙ sin` as transformers computes it (`rotate_half`), or with
/// `inverse` the transpose of that rotation, `(x₁ ⊙ cos₁ + x₂ ⊙ sin₂, x₂ ⊙ cos₂ − x₁ ⊙ sin₁)`,
/// which is the backward.
fn rotate_head(out: &mut [MaybeUninit<f32>], x: &[f32], cos: &[f32], sin: &[f32], inverse: bool) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (out1, out2) = out.split_at_mut(half);
    let (cos1, cos2) = cos.split_at(half);
    let (sin1, sin2) = sin.split_at(half);
    for j in 0..half {
        let (a, b) = (x1[j], x2[j]);
        match inverse {
            false => {
                out1[j].write(a * cos1[j] + -b * sin1[j]);
                out2[j].write(b * cos2[j] + a * sin2[j]);
            }
            true => {
                out1[j].write(a * cos1[j] + b * sin2[j]);
                out2[j].write(b * cos2[j] - a * sin1[j]);
            }
        }
    }
}

/// What an item's scores get before the softmax: `scores / divisor (+ bias) + mask`, and
/// `-1e9` more at keys farther than `window` from the query.
#[derive(Clone, Copy)]
struct Scores<'a> {
    /// Per key (`seq` values), shared by every head and query.
    mask: &'a [f32],
    /// The item's `[heads, rows, seq]` learned bias.
    bias: Option<&'a [f32]>,
    window: Option<usize>,
    divisor: f32,
}

/// What a masked-out score gets (as the model's padding mask): exp() of it is exactly 0.
const MASKED: f32 = -1e9;

impl Scores<'_> {
    /// One row of `softmax(scores / divisor + bias + mask)` for `query`, as burn computes it:
    /// shift by the maximum, exponentiate (in vector instructions, bit for bit `f32::exp`),
    /// divide by the sum. `bias` is the row's bias, if any.
    fn softmax_row(
        &self,
        out: &mut [MaybeUninit<f32>],
        scores: &[f32],
        bias: Option<&[f32]>,
        query: usize,
    ) {
        let (mask, divisor) = (self.mask, self.divisor);
        assert!(
            out.len() == scores.len() && out.len() == mask.len(),
            "softmax: a row of {} scores against {} outputs and {} mask values",
            scores.len(),
            out.len(),
            mask.len()
        );
        match bias {
            None => {
                for ((out, &s), &m) in out.iter_mut().zip(scores).zip(mask) {
                    out.write(s / divisor + m);
                }
            }
            Some(bias) => {
                assert_eq!(bias.len(), scores.len(), "softmax: bias row");
                for (((out, &s), &b), &m) in out.iter_mut().zip(scores).zip(bias).zip(mask) {
                    out.write(s / divisor + b + m);
                }
            }
        }
        // SAFETY: the loops wrote every value of the row (the lengths are equal).
        let out = unsafe { written(out) };
        if let Some(window) = self.window {
            let near = query.saturating_sub(window)..(query + window + 1).min(out.len());
            for (key, out) in out.iter_mut().enumerate() {
                if !near.contains(&key) {
                    *out += MASKED;
                }
            }
        }
        let max = out.iter().fold(f32::NEG_INFINITY, |max, &v| max.max(v));
        out.iter_mut().for_each(|out| *out -= max);
        expf::exp_in_place(out);
        let sum: f32 = out.iter().sum();
        for out in out.iter_mut() {
            *out /= sum;
        }
    }
}

/// The sizes of an attention: `q: [batch, rows, hidden]`, `k` and `v: [batch, seq, hidden]`,
/// `heads` heads of `head_dim` side by side in `hidden`.
#[derive(Debug, Clone, Copy)]
struct AttentionShape {
    batch: usize,
    rows: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
}

/// One item's queries, keys and values (`[rows, hidden]`, `[seq, hidden]`, `[seq, hidden]`).
struct Item<'a> {
    index: usize,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

/// One item's gradients, laid out as its [`Item`] (the bias's as its probabilities), to be
/// written.
struct ItemGrads<'a> {
    q: &'a mut [MaybeUninit<f32>],
    k: &'a mut [MaybeUninit<f32>],
    v: &'a mut [MaybeUninit<f32>],
    bias: Option<&'a mut [MaybeUninit<f32>]>,
}

impl AttentionShape {
    fn of(q: &FlexTensor, k: &FlexTensor, heads: usize) -> Self {
        let (q_shape, k_shape) = (q.layout().shape(), k.layout().shape());
        assert!(
            q_shape.num_dims() == 3 && k_shape.num_dims() == 3,
            "attention: queries and keys must be [batch, len, hidden]"
        );
        let (batch, rows, hidden, seq) = (q_shape[0], q_shape[1], q_shape[2], k_shape[1]);
        assert!(
            k_shape[0] == batch && k_shape[2] == hidden,
            "attention: keys {k_shape:?} against queries {q_shape:?}"
        );
        assert!(
            heads > 0 && hidden % heads == 0,
            "attention: {hidden} is not {heads} heads wide"
        );
        AttentionShape {
            batch,
            rows,
            seq,
            hidden,
            heads,
            head_dim: hidden / heads,
        }
    }

    fn item<'a>(&self, index: usize, q: &'a [f32], k: &'a [f32], v: &'a [f32]) -> Item<'a> {
        let (queries, keys) = (self.rows * self.hidden, self.seq * self.hidden);
        Item {
            index,
            q: &q[index * queries..(index + 1) * queries],
            k: &k[index * keys..(index + 1) * keys],
            v: &v[index * keys..(index + 1) * keys],
        }
    }

    /// Head `head`'s columns of an item's `[len, hidden]` matrix, as a `[len, head_dim]` one.
    fn head(&self, matrix: &[f32], head: usize) -> Operand {
        Operand::row_major(&matrix[head * self.head_dim..], self.hidden)
    }

    /// [`AttentionShape::head`] to write into.
    fn head_dst<'a>(&self, matrix: &'a mut [MaybeUninit<f32>], head: usize) -> Dst<'a> {
        Dst::rows(&mut matrix[head * self.head_dim..], self.hidden)
    }

    /// Where the dropout mask of `probs[item, head, 0, 0]` starts (the head's `rows × seq`
    /// follow): the masks are those of a `[batch, heads, rows, seq]` tensor of probabilities
    /// in row-major order.
    fn mask_offset(&self, item: usize, head: usize) -> u64 {
        ((item * self.heads + head) * self.rows * self.seq) as u64
    }
}

/// One item's attention, head by head: the scores `Q·Kᵀ`, each row's masked softmax (kept in
/// `probs`) and dropout, and the context `P·V` written into the head's columns of `context`.
/// The products read and write the heads in place, through strides.
fn attend(
    shape: &AttentionShape,
    item: &Item,
    scores_of: Scores,
    dropout: Option<Mask>,
    context: &mut [MaybeUninit<f32>],
    probs: &mut [MaybeUninit<f32>],
) {
    let (rows, seq) = (shape.rows, shape.seq);
    let mut scores = slots(rows * seq);
    let mut dropped = slots(rows * seq);
    for (head, probs) in probs.chunks_exact_mut(rows * seq).enumerate() {
        let (q, k, v) = (
            shape.head(item.q, head),
            shape.head(item.k, head),
            shape.head(item.v, head),
        );
        small_product(
            [rows, seq],
            shape.head_dim,
            q,
            k.transposed(),
            Dst::rows(&mut scores, seq),
        );
        // SAFETY: the product wrote the whole `rows × seq` of scores.
        let scores = unsafe { written(&mut scores) };
        let bias = scores_of
            .bias
            .map(|bias| &bias[head * rows * seq..(head + 1) * rows * seq]);
        for (query, (probs, scores)) in probs
            .chunks_exact_mut(seq)
            .zip(scores.chunks_exact(seq))
            .enumerate()
        {
            let bias = bias.map(|bias| &bias[query * seq..(query + 1) * seq]);
            scores_of.softmax_row(probs, scores, bias, query);
        }
        // SAFETY: the softmax wrote every row of the head's probabilities.
        let probs = unsafe { written(probs) };
        let weights = match dropout {
            Some(mask) => {
                &*mask.apply_from(shape.mask_offset(item.index, head), probs, &mut dropped)
            }
            None => &probs[..],
        };
        let out = shape.head_dst(context, head);
        small_product(
            [rows, shape.head_dim],
            seq,
            Operand::row_major(weights, seq),
            v,
            out,
        );
    }
}

/// [`attend`]'s backward for one item, head by head: with `G` the context's gradient and `P′`
/// the probabilities after dropout, `dV = P′ᵀ·G`; `dP = (G·Vᵀ) ⊙ mask`; the softmax's
/// `dS = P ⊙ (dP − Σ dP⊙P) / divisor`; `dQ = dS·K`, `dK = dSᵀ·Q`.
fn attend_backward(
    shape: &AttentionShape,
    item: &Item,
    probs: &[f32],
    grad: &[f32],
    divisor: f32,
    dropout: Option<Mask>,
    mut grads: ItemGrads,
) {
    let (rows, seq, head_dim) = (shape.rows, shape.seq, shape.head_dim);
    // The head's mask values, computed once for both of their uses.
    let mut kept = slots(rows * seq);
    let mut dropped = slots(rows * seq);
    let mut grad_scores = slots(rows * seq);
    for (head, probs) in probs.chunks_exact(rows * seq).enumerate() {
        let (q, k, v) = (
            shape.head(item.q, head),
            shape.head(item.k, head),
            shape.head(item.v, head),
        );
        let g = shape.head(grad, head);
        let kept =
            dropout.map(|mask| &*mask.fill_from(shape.mask_offset(item.index, head), &mut kept));
        let weights = match kept {
            Some(kept) => {
                for ((d, &p), &kept) in dropped.iter_mut().zip(probs).zip(kept) {
                    d.write(p * kept);
                }
                // SAFETY: the loop wrote all `rows × seq` (the probabilities and the mask are
                // as long).
                &*unsafe { written(&mut dropped) }
            }
            None => probs,
        };
        let dropped_t = Operand::row_major(weights, seq).transposed();
        small_product(
            [seq, head_dim],
            rows,
            dropped_t,
            g,
            shape.head_dst(grads.v, head),
        );
        small_product(
            [rows, seq],
            head_dim,
            g,
            v.transposed(),
            Dst::rows(&mut grad_scores, seq),
        );
        // SAFETY: the product wrote the whole `rows × seq` of score gradients.
        let grad_scores = unsafe { written(&mut grad_scores) };
        if let Some(kept) = kept {
            for (gs, &kept) in grad_scores.iter_mut().zip(kept) {
                *gs *= kept;
            }
        }
        for (grad_scores, probs) in grad_scores
            .chunks_exact_mut(seq)
            .zip(probs.chunks_exact(seq))
        {
            let dot: f32 = probs.iter().zip(&*grad_scores).map(|(p, g)| p * g).sum();
            for (gs, &p) in grad_scores.iter_mut().zip(probs) {
                *gs = p * (*gs - dot);
            }
        }
        // The bias enters after the divisor: its gradient is the softmax's input gradient.
        if let Some(grad_bias) = grads.bias.as_deref_mut() {
            write_all(
                &mut grad_bias[head * rows * seq..(head + 1) * rows * seq],
                grad_scores,
            );
        }
        grad_scores.iter_mut().for_each(|gs| *gs /= divisor);
        let ds = Operand::row_major(grad_scores, seq);
        small_product([rows, head_dim], seq, ds, k, shape.head_dst(grads.q, head));
        small_product(
            [seq, head_dim],
            rows,
            ds.transposed(),
            q,
            shape.head_dst(grads.k, head),
        );
    }
}

/// A row-major view to write a product into (gemm writes without reading): element `(i, j)`
/// at `ptr + i·row_stride + j`, inside `len` elements from `ptr` (checked against the
/// product's extent before each write).
struct Dst<'a> {
    ptr: *mut f32,
    row_stride: usize,
    len: usize,
    _slice: std::marker::PhantomData<&'a mut [MaybeUninit<f32>]>,
}

impl<'a> Dst<'a> {
    /// A whole slice as rows of `width`.
    fn rows(slice: &'a mut [MaybeUninit<f32>], width: usize) -> Self {
        Dst {
            ptr: slice.as_mut_ptr().cast::<f32>(),
            row_stride: width,
            len: slice.len(),
            _slice: std::marker::PhantomData,
        }
    }
}

/// `dst = lhs (m × k) · rhs (k × n)` on the calling thread, for the products of one head
/// (a few thousand multiply-adds: gemm's small kernels, no packing worth splitting).
fn small_product([m, n]: [usize; 2], k: usize, lhs: Operand, rhs: Operand, dst: Dst) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst.row_stride + n <= dst.len,
        "attention: a {m} × {n} product outside its destination"
    );
    // SAFETY: every element written, (i, j) for i < m and j < n, lies within the `len`
    // elements `dst` borrows (checked above); the operands view matrices inside the item's
    // slices (AttentionShape derives both from the tensors' shapes).
    unsafe {
        gemm_into(
            [m, n],
            k,
            (dst.ptr, dst.row_stride),
            false,
            [lhs, rhs],
            gemm::Parallelism::None,
        )
    };
}

/// Whole rows of `width` per parallel task over `len` values ([`task_len`]).
fn rows_per_task(len: usize, width: usize) -> usize {
    task_len(len, width) / width.max(1)
}

/// One row of LayerNorm as burn's decomposition computes it: `normalized = (s − mean) / √(var
/// + ε)` for `s = x + residual`, with the mean and the (biased) variance over the row. Returns
/// the row as written, and `√(var + ε)`.
fn norm_row<'a>(
    x: &[f32],
    residual: &[f32],
    epsilon: f32,
    normalized: &'a mut [MaybeUninit<f32>],
) -> (&'a mut [f32], f32) {
    assert!(
        x.len() == residual.len() && x.len() == normalized.len(),
        "add_norm: rows of unequal widths"
    );
    let width = x.len() as f32;
    for ((n, &x), &r) in normalized.iter_mut().zip(x).zip(residual) {
        n.write(x + r);
    }
    // SAFETY: the loop wrote every value of the row (the three lengths are equal).
    let normalized = unsafe { written(normalized) };
    let mean = lane_sum(normalized) / width;
    normalized.iter_mut().for_each(|n| *n -= mean);
    let variance = lane_dot(normalized, normalized) / width;
    let deviation = (variance + epsilon).sqrt();
    normalized.iter_mut().for_each(|n| *n /= deviation);
    (normalized, deviation)
}

/// The gradient of one row's LayerNorm input: with `d = grad ⊙ gamma`,
/// `(d − mean(d) − normalized · mean(d ⊙ normalized)) / deviation`.
fn norm_row_backward(
    normalized: &[f32],
    deviation: f32,
    gamma: &[f32],
    grad: &[f32],
    grad_input: &mut [MaybeUninit<f32>],
) {
    assert!(
        [gamma.len(), grad.len(), grad_input.len()] == [normalized.len(); 3],
        "add_norm backward: rows of unequal widths"
    );
    let width = normalized.len() as f32;
    for ((d, &g), &gamma) in grad_input.iter_mut().zip(grad).zip(gamma) {
        d.write(g * gamma);
    }
    // SAFETY: the loop wrote every value of the row (the lengths are equal).
    let grad_input = unsafe { written(grad_input) };
    let mean = lane_sum(grad_input) / width;
    let projection = lane_dot(grad_input, normalized) / width;
    for (d, &n) in grad_input.iter_mut().zip(normalized) {
        *d = (*d - mean - n * projection) / deviation;
    }
}

/// `Σ a ⊙ b` in eight interleaved lanes, so that the additions vectorise (one running sum
/// waits on each addition in turn).
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a_groups, b_groups) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_groups
        .remainder()
        .iter()
        .zip(b_groups.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in a_groups.zip(b_groups) {
        for ((lane, a), b) in lanes.iter_mut().zip(a).zip(b) {
            *lane += a * b;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ values` in eight interleaved lanes (see [`lane_dot`]).
fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let groups = values.chunks_exact(8);
    let tail: f32 = groups.remainder().iter().sum();
    for group in groups {
        lanes.iter_mut().zip(group).for_each(|(lane, v)| *lane += v);
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ_rows grad[row, j]` for each column `j`, in f32 like burn's `sum_dim`. Blocks of rows are
/// summed in parallel and the block sums added in order, so the result does not depend on
/// scheduling.
fn column_sums(grad: &[f32], width: usize) -> Vec<f32> {
    let rows_per_task = rows_per_task(grad.len(), width);
    let partial: Vec<Vec<f32>> = grad
        .par_chunks(rows_per_task * width)
        .map(|block| {
            let mut sums = vec![0f32; width];
            for row in block.chunks_exact(width) {
                sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            sums
        })
        .collect();
    let mut sums = vec![0f32; width];
    for block in partial {
        sums.iter_mut().zip(&block).for_each(|(s, b)| *s += b);
    }
    sums
}

/// burn-flex's GELU expression.
fn gelu_value(x: f32, erf: f32) -> f32 {
    0.5 * x * (1.0 + erf)
}

/// burn-flex's GELU derivative expression: `Φ(x) + x·φ(x)`, given `erf(x/√2)` and
/// `exp(-x²/2)`.
fn gelu_slope(x: f32, erf: f32, exp: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf);
    let inv_sqrt_2pi = 1.0 / (2.0 * core::f32::consts::PI).sqrt();
    let pdf = inv_sqrt_2pi * exp;
    cdf + x * pdf
}

fn contiguous(t: FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "the fused kernels take f32 tensors");
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The elements of a contiguous tensor, from its start offset.
fn values(t: &FlexTensor) -> &[f32] {
    let start = t.layout().start_offset();
    &t.storage::<f32>()[start..start + t.layout().num_elements()]
}

/// Token ids (`[batch, seq]`, any integer type burn stores them as) as row indices.
fn ids_of(ids: FlexTensor) -> (Vec<usize>, [usize; 2]) {
    let ids = if ids.is_contiguous() {
        ids
    } else {
        ids.to_contiguous()
    };
    let shape = ids.layout().shape();
    assert_eq!(
        shape.num_dims(),
        2,
        "token ids must be [batch, seq], got {shape:?}"
    );
    let dims = [shape[0], shape[1]];
    let (start, len) = (ids.layout().start_offset(), ids.layout().num_elements());
    let rows: Vec<usize> = match ids.dtype() {
        DType::I64 => ids.storage::<i64>()[start..start + len]
            .iter()
            .map(|&i| i as usize)
            .collect(),
        DType::I32 => ids.storage::<i32>()[start..start + len]
            .iter()
            .map(|&i| i as usize)
            .collect(),
        other => panic!("token ids of type {other:?}"),
    };
    (rows, dims)
}

fn dims2(t: &FlexTensor) -> [usize; 2] {
    let shape = t.layout().shape();
    assert_eq!(
        shape.num_dims(),
        2,
        "a matrix was expected, got shape {shape:?}"
    );
    [shape[0], shape[1]]
}

/// A read-only matrix: element `(i, j)` at `ptr + i·row_stride + j·col_stride`.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

// SAFETY: a read-only view of values that outlive the product reading them (its callers
// build it from a slice they hold for the call), so other threads may read through it.
unsafe impl Send for Operand {}
// SAFETY: as for `Send`: shared, it is only read through.
unsafe impl Sync for Operand {}

impl Operand {
    fn row_major(values: &[f32], width: usize) -> Self {
        Operand {
            ptr: values.as_ptr(),
            row_stride: width as isize,
            col_stride: 1,
        }
    }

    /// The columns from `start` on.
    fn columns_from(self, start: usize) -> Self {
        Operand {
            ptr: self.ptr.wrapping_offset(start as isize * self.col_stride),
            ..self
        }
    }

    fn transposed(self) -> Self {
        Operand {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// From this many multiply-adds on, gemm splits a product over the cores (burn's threshold).
const PARALLEL_THRESHOLD: usize = 192 * 192 * 192;

/// Which cores a product may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cores {
    /// The calling thread's alone (another product runs beside it).
    One,
    /// All of the pool's, for products of [`PARALLEL_THRESHOLD`] multiply-adds or more.
    All,
}

/// `lhs (m × k) · rhs (k × n)` as a new `[m, n]` tensor, on the cores given.
fn product(cores: Cores, [m, n]: [usize; 2], k: usize, lhs: Operand, rhs: Operand) -> FlexTensor {
    // gemm writes every element without reading it (zeros when k is 0), so the buffer starts
    // uninitialised: zeroing it first cost as much as a tenth of a step's matmul time.
    let mut out = Vec::with_capacity(m * n);
    // SAFETY: `out` has room for m × n values, and the product writes all of them.
    unsafe {
        matmul(cores, [m, n], k, out.as_mut_ptr(), Start::Zero, [lhs, rhs]);
        out.set_len(m * n);
    }
    FlexTensor::from_data(burn::tensor::TensorData::new(out, [m, n]))
}

/// What a product's destination holds before the product is added onto it.
#[derive(Debug, Clone, Copy)]
enum Start<'a> {
    /// Nothing: the product overwrites it.
    Zero,
    /// Every row a copy of this one (a bias), written band by band just before each band's
    /// product, so that the copy runs on every core and the band is in cache when added onto.
    Rows(&'a [f32]),
}

/// `dst (m × n, row-major) = initial + lhs (m × k) · rhs (k × n)` on the cores given.
///
/// On all cores, each core computes a band of the output's columns as a product of its own:
/// gemm's own split has every thread pack the whole left operand (in our row-major products,
/// gemm's packed operand is `rhs`, the weight), where a band packs only its part. gemm blocks
/// `k` the same way whatever `n` is, so each output element sums its products in the same
/// order on one core or all, and the result is the same bit for bit.
///
/// # Safety
/// `dst` must be valid for writes of m × n values.
unsafe fn matmul(
    cores: Cores,
    [m, n]: [usize; 2],
    k: usize,
    dst: *mut f32,
    initial: Start,
    [lhs, rhs]: [Operand; 2],
) {
    if let Start::Rows(row) = initial {
        assert_eq!(row.len(), n, "matmul: the starting row's width");
    }
    let bands = match cores == Cores::All && m * n * k >= PARALLEL_THRESHOLD {
        true => rayon::current_num_threads().min(n / BAND_ALIGN).max(1),
        false => 1,
    };
    let band_width = n.div_ceil(bands).next_multiple_of(BAND_ALIGN);
    let dst = SendPtr(dst);
    let band = |start: usize| {
        let width = band_width.min(n - start);
        let rhs = rhs.columns_from(start);
        // SAFETY: the band's columns `start..start + width` of `dst` and of `rhs` lie inside
        // the matrices the caller vouched for, and bands do not overlap.
        unsafe {
            let accumulate = match initial {
                Start::Zero => false,
                Start::Rows(values) => {
                    let values = &values[start..start + width];
                    for i in 0..m {
                        let row = dst.at(i * n + start);
                        std::ptr::copy_nonoverlapping(values.as_ptr(), row, width);
                    }
                    true
                }
            };
            gemm_into(
                [m, width],
                k,
                (dst.at(start), n),
                accumulate,
                [lhs, rhs],
                gemm::Parallelism::None,
            )
        }
    };
    match bands {
        1 => band(0),
        _ => (0..n.div_ceil(band_width))
            .into_par_iter()
            .for_each(|i| band(i * band_width)),
    }
}

/// Bands start on a 64-byte boundary of a row (when the row does), so two threads never write
/// one cache line.
const BAND_ALIGN: usize = 16;

/// A destination pointer shared by bands that write disjoint elements.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: the bands write disjoint elements through it (see `matmul`).
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`: each band writes its own elements, and none reads another's.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `dst = [dst +] lhs (m × k) · rhs (k × n)` for a row-major `dst` with the row stride given:
/// the one call into gemm.
///
/// # Safety
/// `dst` must be valid for writes at every `(i, j)`, `i < m`, `j < n`, and the operands for
/// reads at every element of their `m × k` and `k × n` matrices.
unsafe fn gemm_into(
    [m, n]: [usize; 2],
    k: usize,
    (dst, dst_row_stride): (*mut f32, usize),
    accumulate: bool,
    [lhs, rhs]: [Operand; 2],
    parallelism: gemm::Parallelism,
) {
    // SAFETY: as the caller guarantees.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.col_stride,
            rhs.row_stride,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}
