//! NumPy's `default_rng(seed).permutation(n)`, bit for bit, so that a split can pick exactly
//! the rows Hugging Face `datasets`' `train_test_split(seed=…)` picks: SeedSequence turns the
//! seed into PCG64's state (numpy/random/bit_generator.pyx), PCG64 is rand_pcg's `Pcg64` (the
//! same XSL-RR generator), and the shuffle is NumPy's Fisher-Yates with masked rejection
//! sampling over 32-bit draws that use both halves of each 64-bit output.

use rand_core::RngCore;
use rand_pcg::Pcg64;

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;
const POOL_SIZE: usize = 4;

/// `np.random.default_rng(seed).permutation(n)`.
pub fn permutation(seed: u64, n: usize) -> Vec<usize> {
    let mut rng = NumpyPcg64::new(seed);
    let mut items: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.interval(i as u64) as usize;
        items.swap(i, j);
    }
    items
}

/// PCG64 as NumPy's Generator draws from it.
struct NumpyPcg64 {
    pcg: Pcg64,
    /// The upper half of the last 64-bit output, not yet used by a 32-bit draw.
    spare: Option<u32>,
}

impl NumpyPcg64 {
    fn new(seed: u64) -> Self {
        let words = seed_sequence_state(seed);
        let word = |i: usize| u64::from(words[2 * i]) | (u64::from(words[2 * i + 1]) << 32);
        let state = (u128::from(word(0)) << 64) | u128::from(word(1));
        let stream = (u128::from(word(2)) << 64) | u128::from(word(3));
        NumpyPcg64 {
            pcg: Pcg64::new(state, stream),
            spare: None,
        }
    }

    fn next_u32(&mut self) -> u32 {
        if let Some(high) = self.spare.take() {
            return high;
        }
        let next = self.pcg.next_u64();
        self.spare = Some((next >> 32) as u32);
        next as u32
    }

    /// A uniform integer in `[0, max]`: NumPy's `random_interval`.
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        loop {
            let value = if max <= u64::from(u32::MAX) {
                u64::from(self.next_u32()) & mask
            } else {
                self.pcg.next_u64() & mask
            };
            if value <= max {
                return value;
            }
        }
    }
}

/// `SeedSequence(seed).generate_state(4, np.uint64)` as eight 32-bit words.
fn seed_sequence_state(seed: u64) -> [u32; 8] {
    let entropy: Vec<u32> = if seed >> 32 == 0 {
        vec![seed as u32]
    } else {
        vec![seed as u32, (seed >> 32) as u32]
    };
    let mut hash_const = INIT_A;
    let hashmix = |value: u32, hash_const: &mut u32| {
        let mut value = value ^ *hash_const;
        *hash_const = hash_const.wrapping_mul(MULT_A);
        value = value.wrapping_mul(*hash_const);
        value ^ (value >> XSHIFT)
    };
    let mix = |x: u32, y: u32| {
        let result = MIX_MULT_L
            .wrapping_mul(x)
            .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
        result ^ (result >> XSHIFT)
    };
    let mut pool = [0u32; POOL_SIZE];
    for (i, slot) in pool.iter_mut().enumerate() {
        *slot = hashmix(entropy.get(i).copied().unwrap_or(0), &mut hash_const);
    }
    for src in 0..POOL_SIZE {
        for dst in 0..POOL_SIZE {
            if src != dst {
                let hashed = hashmix(pool[src], &mut hash_const);
                pool[dst] = mix(pool[dst], hashed);
            }
        }
    }
    let mut hash_const = INIT_B;
    let mut state = [0u32; 8];
    for (i, word) in state.iter_mut().enumerate() {
        let mut value = pool[i % POOL_SIZE] ^ hash_const;
        hash_const = hash_const.wrapping_mul(MULT_B);
        value = value.wrapping_mul(hash_const);
        *word = value ^ (value >> XSHIFT);
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    // Printed by NumPy 2.4.6: `np.random.default_rng(seed).permutation(n)`. The first 200 of
    // (42, 1000) are the test rows of datasets' `train_test_split(test_size=0.2, seed=42)`.
    #[test]
    fn matches_numpy() {
        assert_eq!(permutation(42, 10), [5, 6, 0, 7, 3, 2, 4, 9, 1, 8]);
        assert_eq!(
            permutation(42, 1000)[..10],
            [978, 933, 859, 916, 127, 608, 856, 260, 147, 810]
        );
        assert_eq!(
            permutation((1 << 40) + 3, 1000)[..8],
            [517, 234, 394, 267, 297, 527, 685, 249]
        );
    }
}
