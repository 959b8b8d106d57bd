//! Regularizers for fine-tuning, written here from their papers, over any burn module.
//!
//! - [`Attack`]: Adversarial Weight Perturbation (Wu, Xia & Wang, 2020): a perturbed copy of a
//!   model whose gradient the optimizer steps with.
//! - [`Mixout`]: Mixout (Lee, Cho & Kang, 2020): a Linear layer's weight mixed with its
//!   pretrained target, element by element.
//! - `audit` (feature `audit`): the `syn` audit that shows both are this crate's own code; it
//!   is a feature so that a model that only uses Mixout does not compile `syn`.
//!
//! Which weights a regularizer applies to, and how a pipeline configures it, belong to the
//! trainer; this crate knows no model family.

mod awp;
mod mixout;

#[cfg(feature = "audit")]
pub mod audit;

pub use awp::{Adversarial, Attack, Origin, l2_norm};
pub use mixout::{Mixout, mix};
