//! The fused operations under burn's autodiff: each is one graph node whose backward calls the
//! backend's [`Kernels`]. States hold the backend tensors the backward needs (the layer's
//! input and weight, GELU's slope, the attention's probabilities, the norm's normalized rows,
//! GeGLU's input with GELU's value and slope, the rotary tables),
//! not checkpoints: these operations are the ones worth keeping.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, TensorMetadata};

use crate::{FusedOps, Kernels, Mask};

#[derive(Debug)]
struct DenseBackward;

impl<B: Kernels> Backward<B, 3> for DenseBackward {
    /// The layer's input and weight.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, weight) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let wanted = ops.parents.each_ref().map(Option::is_some);
        let computed = B::dense_backward(x, weight, grad, wanted);
        for (parent, grad) in ops.parents.into_iter().zip(computed) {
            if let (Some(parent), Some(grad)) = (parent, grad) {
                grads.register::<B>(parent.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct GeluBackward;

impl<B: Kernels> Backward<B, 1> for GeluBackward {
    /// GELU's slope at the input.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let slope = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| B::scale(grad, slope));
    }
}

#[derive(Debug)]
struct DropoutBackward;

impl<B: Kernels> Backward<B, 1> for DropoutBackward {
    /// The mask, recomputed from its seed rather than stored.
    type State = Mask;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let mask = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| B::dropout(grad, mask));
    }
}

#[derive(Debug)]
struct EmbeddingBackward;

impl<B: Kernels> Backward<B, 1> for EmbeddingBackward {
    /// The ids and the table's number of rows.
    type State = (IntTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (ids, rows) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::embedding_grad(ids, grad, rows)
        });
    }
}

#[derive(Debug)]
struct AttentionBackward;

/// What the attention's backward needs: the queries, keys and values, the probabilities
/// before dropout, and the attention's settings.
type AttentionState<B> = ([FloatTensor<B>; 4], usize, f32, Option<Mask>);

impl<B: Kernels> Backward<B, 3> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ([q, k, v, probs], heads, divisor, dropout) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let (computed, _) =
            B::attention_backward(q, k, v, probs, grad, heads, divisor, dropout, false);
        for (parent, grad) in ops.parents.into_iter().zip(computed) {
            if let Some(parent) = parent {
                grads.register::<B>(parent.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct BiasedAttentionBackward;

impl<B: Kernels> Backward<B, 4> for BiasedAttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ([q, k, v, probs], heads, divisor, dropout) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let [q_node, k_node, v_node, bias_node] = ops.parents;
        let (computed, grad_bias) = B::attention_backward(
            q,
            k,
            v,
            probs,
            grad,
            heads,
            divisor,
            dropout,
            bias_node.is_some(),
        );
        for (parent, grad) in [q_node, k_node, v_node].into_iter().zip(computed) {
            if let Some(parent) = parent {
                grads.register::<B>(parent.id, grad);
            }
        }
        if let (Some(parent), Some(grad)) = (bias_node, grad_bias) {
            grads.register::<B>(parent.id, grad);
        }
    }
}

#[derive(Debug)]
struct GegluBackward;

impl<B: Kernels> Backward<B, 1> for GegluBackward {
    /// The input, and GELU's value and slope at its first half.
    type State = [FloatTensor<B>; 3];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x, value, slope] = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::geglu_backward(x, value, slope, grad)
        });
    }
}

#[derive(Debug)]
struct RotaryBackward;

impl<B: Kernels> Backward<B, 1> for RotaryBackward {
    /// The angles' tables and the number of heads.
    type State = (FloatTensor<B>, FloatTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin, heads) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::rotary(grad, cos, sin, heads, true)
        });
    }
}

#[derive(Debug)]
struct AddNormBackward;

impl<B: Kernels> Backward<B, 4> for AddNormBackward {
    /// The normalized rows, their deviations and gamma.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (normalized, deviation, gamma) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let [input, grad_gamma, grad_beta] =
            B::add_norm_backward(normalized, deviation, gamma, grad);
        // The sum's two terms both get the gradient of the sum.
        let [x, residual, gamma, beta] = ops.parents;
        for (parent, grad) in [
            (x, input.clone()),
            (residual, input),
            (gamma, grad_gamma),
            (beta, grad_beta),
        ] {
            if let Some(parent) = parent {
                grads.register::<B>(parent.id, grad);
            }
        }
    }
}

/// Runs an attention's `forward` on the queries, keys and values and finishes its graph node,
/// whose backward keeps them and the probabilities with the attention's settings.
fn attention_node<B, BO, C, const N: usize>(
    prep: OpsKind<BO, B, AttentionState<B>, C, N>,
    [q, k, v]: [FloatTensor<B>; 3],
    (heads, divisor, dropout): (usize, f32, Option<Mask>),
    forward: impl FnOnce(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) -> [FloatTensor<B>; 2],
) -> FloatTensor<Autodiff<B, C>>
where
    B: Kernels,
    BO: Backward<B, N, State = AttentionState<B>>,
    C: CheckpointStrategy,
{
    let [context, probs] = forward(q.clone(), k.clone(), v.clone());
    match prep {
        OpsKind::Tracked(prep) => prep.finish(([q, k, v, probs], heads, divisor, dropout), context),
        OpsKind::UnTracked(prep) => prep.finish(context),
    }
}

impl<B: Kernels, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn fused_dense(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let prep = DenseBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful();
        let (x, weight, bias) = (
            x.into_primitive(),
            weight.into_primitive(),
            bias.into_primitive(),
        );
        match prep {
            OpsKind::Tracked(prep) => {
                let state = (x.clone(), weight.clone());
                prep.finish(state, B::dense_forward(x, weight, bias))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dense_forward(x, weight, bias)),
        }
    }

    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = GeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        match prep {
            OpsKind::Tracked(prep) => {
                let (value, slope) = B::gelu_forward(x.into_primitive(), true);
                let slope = slope.expect("the slope was asked for");
                prep.finish(slope, value)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_forward(x.into_primitive(), false).0),
        }
    }

    fn fused_dropout(x: FloatTensor<Self>, mask: Mask) -> FloatTensor<Self> {
        let prep = DropoutBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let out = B::dropout(x.into_primitive(), mask);
        match prep {
            OpsKind::Tracked(prep) => prep.finish(mask, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        heads: usize,
        divisor: f32,
        window: Option<usize>,
        dropout: Option<Mask>,
    ) -> FloatTensor<Self> {
        assert!(
            !mask.is_tracked(),
            "the attention mask is a constant: it gets no gradient"
        );
        let prep = AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful();
        let qkv = [q, k, v].map(|t| t.into_primitive());
        let mask = mask.into_primitive();
        attention_node(prep, qkv, (heads, divisor, dropout), |q, k, v| {
            B::attention_forward(q, k, v, mask, None, window, heads, divisor, dropout)
        })
    }

    fn fused_biased_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
        divisor: f32,
        dropout: Option<Mask>,
    ) -> FloatTensor<Self> {
        assert!(
            !mask.is_tracked(),
            "the attention mask is a constant: it gets no gradient"
        );
        let prep = BiasedAttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node(), bias.node()])
            .compute_bound()
            .stateful();
        let qkv = [q, k, v].map(|t| t.into_primitive());
        let (mask, bias) = (mask.into_primitive(), Some(bias.into_primitive()));
        attention_node(prep, qkv, (heads, divisor, dropout), |q, k, v| {
            B::attention_forward(q, k, v, mask, bias, None, heads, divisor, dropout)
        })
    }

    fn fused_geglu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = GegluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let x = x.into_primitive();
        match prep {
            OpsKind::Tracked(prep) => {
                let (out, kept) = B::geglu_forward(x.clone(), true);
                let [value, slope] = kept.expect("the backward's values were asked for");
                prep.finish([x, value, slope], out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::geglu_forward(x, false).0),
        }
    }

    fn fused_rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        assert!(
            !cos.is_tracked() && !sin.is_tracked(),
            "the rotary tables are constants: they get no gradient"
        );
        let prep = RotaryBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        let out = B::rotary(x.into_primitive(), cos.clone(), sin.clone(), heads, false);
        match prep {
            OpsKind::Tracked(prep) => prep.finish((cos, sin, heads), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn fused_add_norm(
        x: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f32,
    ) -> FloatTensor<Self> {
        let prep = AddNormBackward
            .prepare::<C>([x.node(), residual.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let gamma = gamma.into_primitive();
        let [out, normalized, deviation] = B::add_norm_forward(
            x.into_primitive(),
            residual.into_primitive(),
            gamma.clone(),
            beta.into_primitive(),
            epsilon,
        );
        match prep {
            OpsKind::Tracked(prep) => prep.finish((normalized, deviation, gamma), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn fused_embedding(table: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        let prep = EmbeddingBackward
            .prepare::<C>([table.node()])
            .compute_bound()
            .stateful();
        let table = table.into_primitive();
        let rows = table.shape().dims::<2>()[0];
        match prep {
            OpsKind::Tracked(prep) => {
                let out = B::embedding_rows(table, ids.clone());
                prep.finish((ids, rows), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::embedding_rows(table, ids)),
        }
    }
}
