//! Adversarial Weight Perturbation (Wu, Xia & Wang, NeurIPS 2020) in the form used to fine-tune
//! transformers, written here from the paper.
//!
//! After the clean backward pass, each selected weight `w` with gradient `g` moves by
//! `adv_lr · g/‖g‖ · ‖w‖` (norms per tensor) and is clamped into
//! `[w₀ − adv_eps·|w₀|, w₀ + adv_eps·|w₀|]` around its value `w₀` before the attack. A second
//! forward/backward on the same samples, with the same dropout masks, gives the gradient the
//! optimizer steps with: the clean gradient only chooses the direction. With `steps > 1` the
//! gradient at each perturbed point chooses the next move.
//!
//! The perturbed weights live in a copy of the model: the model the optimizer steps is never
//! touched, so its weights are restored bit for bit by construction.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

/// One configured attack.
#[derive(Debug, Clone)]
pub struct Attack {
    pub adv_lr: f64,
    pub adv_eps: f64,
    /// Attack steps (at least 1), each a forward/backward pass at the perturbed weights.
    pub steps: usize,
    /// The weights to perturb.
    pub targets: Vec<ParamId>,
}

/// What an attack produced.
pub struct Adversarial<M> {
    /// The gradient at the (last) perturbed weights: the one to step with.
    pub grads: GradientsParams,
    /// The loss there (`awp_loss` in the logs).
    pub loss: f64,
    /// The perturbed copy of the model, for inspection.
    pub perturbed: M,
    /// How many tensors the last step moved (tensors with a zero or non-finite gradient norm
    /// stay where they are).
    pub moved: usize,
}

impl Attack {
    /// Attacks `model` from its `clean` gradient. `gradients` returns the gradient and loss of
    /// a model on the update's samples, with the same dropout masks on every call.
    pub fn run<M: Module>(
        &self,
        model: &M,
        clean: &GradientsParams,
        mut gradients: impl FnMut(&M) -> (GradientsParams, f64),
    ) -> Adversarial<M> {
        let origin = Origin::of(model, &self.targets);
        let (mut perturbed, mut moved) = self.perturb(model.clone(), &origin, clean);
        let (mut grads, mut loss) = gradients(&perturbed);
        for _ in 1..self.steps {
            (perturbed, moved) = self.perturb(perturbed, &origin, &grads);
            (grads, loss) = gradients(&perturbed);
        }
        Adversarial {
            grads,
            loss,
            perturbed,
            moved,
        }
    }

    /// One ascent step from `model` along `grads`, boxed around `origin`.
    pub fn perturb<M: Module>(
        &self,
        model: M,
        origin: &Origin,
        grads: &GradientsParams,
    ) -> (M, usize) {
        let mut step = Perturb {
            attack: self,
            origin,
            grads,
            moved: 0,
        };
        let model = model.map(&mut step);
        (model, step.moved)
    }
}

/// The selected weights before the attack (`w₀`), flattened, without autodiff.
pub struct Origin {
    weights: HashMap<ParamId, Tensor<1>>,
}

impl Origin {
    pub fn of<M: Module>(model: &M, targets: &[ParamId]) -> Origin {
        let mut collect = Collect {
            targets,
            weights: HashMap::new(),
        };
        model.visit(&mut collect);
        Origin {
            weights: collect.weights,
        }
    }
}

struct Collect<'a> {
    targets: &'a [ParamId],
    weights: HashMap<ParamId, Tensor<1>>,
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.targets.contains(&param.id) {
            let value = param.val().inner();
            let count: usize = value.dims().iter().product();
            self.weights.insert(param.id, value.reshape([count]));
        }
    }
}

struct Perturb<'a> {
    attack: &'a Attack,
    origin: &'a Origin,
    grads: &'a GradientsParams,
    moved: usize,
}

impl ModuleMapper for Perturb<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let id = param.id;
        let (Some(start), Some(grad)) = (self.origin.weights.get(&id), self.grads.get::<D>(id))
        else {
            return param;
        };
        let grad_norm = l2_norm(grad.clone());
        if !(grad_norm.is_finite() && grad_norm > 0.0) {
            return param;
        }
        let weight = param.val().inner();
        let start: Tensor<D> = start.clone().reshape(weight.dims());
        let ascent = grad.mul_scalar(self.attack.adv_lr * l2_norm(weight.clone()) / grad_norm);
        let radius = start.clone().abs().mul_scalar(self.attack.adv_eps);
        let lower = start.clone() - radius.clone();
        let upper = start + radius;
        let moved = (weight + ascent).max_pair(lower).min_pair(upper);
        self.moved += 1;
        Param::initialized(id, Tensor::from_inner(moved).require_grad())
    }
}

/// `‖t‖₂` of a whole tensor.
pub fn l2_norm<const D: usize>(tensor: Tensor<D>) -> f64 {
    f64::from(tensor.powi_scalar(2).sum().into_scalar::<f32>()).sqrt()
}
