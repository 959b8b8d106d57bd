//! Fresh weights, as Hugging Face's `_init_weights` makes them: normal(0, initializer_range)
//! for weights and embeddings (the padding row zeroed), ones and zeros for LayerNorm, zero
//! biases. Drawn from our seeded generator on the host, so a seed gives the same model on
//! every backend and every run.

use finetune_rng::SplitMix64;

use crate::ModelError;
use crate::config::ModelConfig;
use crate::weights::{HfName, Init, WeightSource};

/// Seeded fresh weights (see the module doc).
pub struct InitSource {
    rng: SplitMix64,
    std: f64,
    pad: usize,
}

impl InitSource {
    pub fn new(config: &ModelConfig, seed: u64) -> Self {
        InitSource {
            rng: SplitMix64::new(seed),
            std: config.initializer_range,
            pad: config.pad_token_id,
        }
    }

    /// A standard normal draw (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = ((self.rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

impl WeightSource for InitSource {
    fn take(
        &mut self,
        name: &HfName,
        shape: [usize; 2],
        init: Init,
    ) -> Result<Vec<f32>, ModelError> {
        let len = shape[0] * shape[1];
        Ok(match init {
            Init::Ones => vec![1.0; len],
            Init::Zeros => vec![0.0; len],
            Init::Normal | Init::Embedding => {
                let mut values: Vec<f32> = (0..len)
                    .map(|_| (self.normal() * self.std) as f32)
                    .collect();
                if init == Init::Embedding
                    && name.key.contains("word_embeddings")
                    && self.pad < shape[0]
                {
                    values[self.pad * shape[1]..(self.pad + 1) * shape[1]].fill(0.0);
                }
                values
            }
        })
    }
}
