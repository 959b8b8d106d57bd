//! Mixout (Lee, Cho & Kang, ICLR 2020), written here from the paper's definition.
//!
//! In training, a Linear layer multiplies by
//! `((1 − m)·u + m·w − p·u) / (1 − p)`, `m ~ Bernoulli(1 − p)`,
//! where `w` is the trained weight and `u` the target: the pretrained weight (or, from scratch,
//! the initial one), held as a constant that moves and saves with the layer and that no
//! gradient reaches. Its expectation is `w`; at evaluation the layer uses `w` itself.
//!
//! Mask granularity: one Bernoulli draw per weight element, the paper's definition. (The
//! authors' code draws one per input column, shared by all output units.) One mask per
//! optimizer update, shared by its micro-batches, so that gradient accumulation (and a
//! micro-batch split after an out-of-memory failure) is exactly one large batch. Autodiff
//! gives the true derivative `∂/∂w = m / (1 − p)`; the authors' code leaves out `1 / (1 − p)`.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Distribution, Tensor};

/// Mixout's state in one Linear layer.
#[derive(Module, Debug)]
pub struct Mixout {
    /// `u`, stored without autodiff: a constant in every graph, never in the optimizer's view.
    pub target: Param<Tensor<2>>,
    /// The probability of taking the target's value for an element.
    #[module(skip)]
    pub p: f64,
    /// This update's mask, when drawn ahead (see [`Mixout::with_fresh_mask`]).
    #[module(skip)]
    pub mask: Option<Tensor<2>>,
}

impl Mixout {
    /// Mixout towards `target` (a copy of its values, detached from any graph).
    pub fn new(target: Tensor<2>, p: f64) -> Self {
        Mixout {
            target: Param::initialized(ParamId::new(), target.inner()),
            p,
            mask: None,
        }
    }

    /// The same layer state with a mask drawn now, used by every forward until the next draw.
    pub fn with_fresh_mask(&self) -> Self {
        Mixout {
            target: self.target.clone(),
            p: self.p,
            mask: Some(draw_mask(&self.target.val(), self.p)),
        }
    }

    /// The weight the layer multiplies by: mixed while training (an autodiff device), `weight`
    /// itself otherwise or when `p` is 0.
    pub fn mix(&self, weight: Tensor<2>) -> Tensor<2> {
        if self.p == 0.0 || !weight.is_autodiff() {
            return weight;
        }
        let target = self.target.val();
        let mask = match &self.mask {
            Some(mask) => mask.clone(),
            None => draw_mask(&target, self.p),
        };
        combine(weight, target, mask, self.p)
    }
}

/// `m ~ Bernoulli(1 − p)`, one draw per element, without autodiff.
pub fn draw_mask(target: &Tensor<2>, p: f64) -> Tensor<2> {
    target.random_like(Distribution::Bernoulli(1.0 - p))
}

/// The mixed weight with a fresh mask.
pub fn mix(weight: Tensor<2>, target: Tensor<2>, p: f64) -> Tensor<2> {
    let mask = draw_mask(&target, p);
    combine(weight, target, mask, p)
}

/// `((1 − m)·u + m·w − p·u) / (1 − p)`, rearranged as `(m·w + (1 − p − m)·u) / (1 − p)` so
/// that `u`'s part is one constant tensor.
pub fn combine(weight: Tensor<2>, target: Tensor<2>, mask: Tensor<2>, p: f64) -> Tensor<2> {
    let keep = 1.0 - p;
    let target_share = mask.clone().neg().add_scalar(keep);
    (weight * mask + target * target_share).div_scalar(keep)
}
