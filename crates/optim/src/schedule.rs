//! Learning-rate schedules with Hugging Face's semantics: the learning rate of optimizer update
//! `k` (0-based) is `base · λ(k)`, so with warmup the first update uses 0, exactly as
//! `get_linear_schedule_with_warmup` and friends do. The schedule counts optimizer updates, not
//! micro-batches or extra passes, whatever accumulation or regularizers do.

use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear warmup, then linear decay to 0 at the last update (HF's default).
    #[default]
    Linear,
    /// Linear warmup, then half a cosine down to 0.
    Cosine,
    /// Linear warmup, then constant (TrainingArguments' `constant_with_warmup`).
    #[serde(alias = "constant_with_warmup")]
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// `warmup_steps` wins over `warmup_ratio`; the ratio rounds up, as HF's `get_warmup_steps`.
    pub fn new(
        kind: ScheduleKind,
        base_lr: f64,
        total_steps: usize,
        warmup_ratio: f64,
        warmup_steps: Option<usize>,
    ) -> Schedule {
        let warmup_steps =
            warmup_steps.unwrap_or_else(|| (warmup_ratio * total_steps as f64).ceil() as usize);
        Schedule {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
        }
    }

    /// The learning rate of optimizer update `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / decay_steps;
        match self.kind {
            ScheduleKind::Linear => (1.0 - progress).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
            ScheduleKind::Constant => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_transformers() {
        // get_linear_schedule_with_warmup(opt, 15, 150) with lr 5e-5, as the reference run uses.
        let s = Schedule::new(ScheduleKind::Linear, 5e-5, 150, 0.1, None);
        assert_eq!(s.warmup_steps, 15);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-5 * 5.0 / 15.0).abs() < 1e-18);
        assert!((s.lr(15) - 5e-5).abs() < 1e-18);
        assert!((s.lr(82) - 5e-5 * (150.0 - 82.0) / 135.0).abs() < 1e-18);
        assert_eq!(s.lr(150), 0.0);
    }

    #[test]
    fn cosine_and_constant() {
        let cosine = Schedule::new(ScheduleKind::Cosine, 1.0, 110, 0.0, Some(10));
        assert!((cosine.lr(60) - 0.5).abs() < 1e-12);
        assert!(cosine.lr(110).abs() < 1e-12);
        let constant = Schedule::new(ScheduleKind::Constant, 2.0, 100, 0.05, None);
        assert_eq!(constant.warmup_steps, 5);
        assert_eq!(
            (constant.lr(0), constant.lr(5), constant.lr(99)),
            (0.0, 2.0, 2.0)
        );
    }
}
