//! `exp` over many f32 elements at a time, bit for bit what `f32::exp` returns on x86-64 Linux.
//!
//! GELU's slope needs `exp(-x²/2)` for every element of the feed-forward layers; `f32::exp` is
//! one call into glibc per element, which no loop around it can vectorise. Where glibc runs its
//! FMA variant of `expf` (x86-64 with AVX2 and FMA, which is where this module's vector path
//! runs too), this is that algorithm written lane-wise: `x · 32/ln 2 = k + r` in double precision,
//! `2^(k/32)` from a 32-entry table, a cubic in `r`, the same fused multiply-adds in the same
//! places, one rounding to f32 at the end. Elsewhere it is `f32::exp` itself. The tests compare
//! the two across the f32 range.

/// `values[i] = exp(values[i])`.
pub fn exp_in_place(values: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked above); it implies AVX2 and FMA.
        unsafe { exp_avx512(values) };
        return;
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: AVX2 and FMA are present (checked above).
        unsafe { exp_fma(values) };
        return;
    }
    for value in values {
        *value = value.exp();
    }
}

/// The same loop in 16 lanes.
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(values: &mut [f32]) {
    for value in values {
        *value = glibc_expf_fma(*value);
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_fma(values: &mut [f32]) {
    for value in values {
        *value = glibc_expf_fma(*value);
    }
}

/// `2^(i/32)` for `i` in `0..32`, rounded to f64 (glibc's `__exp2f_data.tab` holds these less
/// `i << 47`, which is the same sum below).
const POW2_FRACTIONS: [u64; 32] = [
    0x3ff0000000000000,
    0x3ff059b0d3158574,
    0x3ff0b5586cf9890f,
    0x3ff11301d0125b51,
    0x3ff172b83c7d517b,
    0x3ff1d4873168b9aa,
    0x3ff2387a6e756238,
    0x3ff29e9df51fdee1,
    0x3ff306fe0a31b715,
    0x3ff371a7373aa9cb,
    0x3ff3dea64c123422,
    0x3ff44e086061892d,
    0x3ff4bfdad5362a27,
    0x3ff5342b569d4f82,
    0x3ff5ab07dd485429,
    0x3ff6247eb03a5585,
    0x3ff6a09e667f3bcd,
    0x3ff71f75e8ec5f74,
    0x3ff7a11473eb0187,
    0x3ff82589994cce13,
    0x3ff8ace5422aa0db,
    0x3ff93737b0cdc5e5,
    0x3ff9c49182a3f090,
    0x3ffa5503b23e255d,
    0x3ffae89f995ad3ad,
    0x3ffb7f76f2fb5e47,
    0x3ffc199bdd85529c,
    0x3ffcb720dcef9069,
    0x3ffd5818dcfba487,
    0x3ffdfc97337b9b5f,
    0x3ffea4afa2a490da,
    0x3fff50765b6e4540,
];
/// 32 / ln 2.
const INV_LN2_32: f64 = f64::from_bits(0x40471547652b82fe);
/// 1.5 · 2⁵²: adding it rounds to an integer and leaves that integer in the low bits.
const SHIFT: f64 = f64::from_bits(0x4338000000000000);
/// The cubic for `2^(r/32) - 1` in `r`, highest power first.
const C0: f64 = f64::from_bits(0x3ebc6af84b912394);
const C1: f64 = f64::from_bits(0x3f2ebfce50fac4f3);
const C2: f64 = f64::from_bits(0x3f962e42ff0c52d6);
/// Above this `exp` overflows; below `UNDERFLOW` it rounds to zero, below `LEAST` (and not
/// below `UNDERFLOW`) glibc returns the least subnormal.
const OVERFLOW: f32 = f32::from_bits(0x42b17217);
const UNDERFLOW: f32 = f32::from_bits(0xc2cff1b4);
const LEAST: f32 = f32::from_bits(0xc2ce8ecf);

/// glibc's `__expf_fma`: every lane runs the main path and the special cases are selected after.
#[inline(always)]
fn glibc_expf_fma(x: f32) -> f32 {
    let xd = f64::from(x);
    let shifted = INV_LN2_32.mul_add(xd, SHIFT);
    let ki = shifted.to_bits();
    let kd = shifted - SHIFT;
    let r = INV_LN2_32.mul_add(xd, -kd);
    let index = (ki & 31) as usize;
    let scale = f64::from_bits(
        POW2_FRACTIONS[index]
            .wrapping_sub((index as u64) << 47)
            .wrapping_add(ki << 47),
    );
    let z = r.mul_add(C0, C1);
    let r2 = r * r;
    let y = r.mul_add(C2, 1.0);
    let main = (z.mul_add(r2, y) * scale) as f32;
    let special = if x > OVERFLOW {
        f32::INFINITY
    } else if x < UNDERFLOW {
        0.0
    } else if x < LEAST {
        f32::from_bits(1)
    } else {
        main
    };
    if x.is_nan() { x + x } else { special }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_holds_the_powers_of_two() {
        for (i, &bits) in POW2_FRACTIONS.iter().enumerate() {
            assert_eq!(
                f64::from_bits(bits),
                2f64.powf(i as f64 / 32.0),
                "2^({i}/32)"
            );
        }
    }

    /// The dispatched path and, where this CPU has both, the AVX2 path beside AVX-512's.
    fn assert_same(input: &[f32]) {
        let mut out = input.to_vec();
        exp_in_place(&mut out);
        assert_each_is_f32_exp(input, &out);
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        if std::arch::is_x86_feature_detected!("avx512f") {
            out.copy_from_slice(input);
            // SAFETY: AVX-512F (checked above) implies AVX2 and FMA.
            unsafe { exp_fma(&mut out) };
            assert_each_is_f32_exp(input, &out);
        }
    }

    fn assert_each_is_f32_exp(input: &[f32], out: &[f32]) {
        for (&x, &ours) in input.iter().zip(out) {
            let theirs = x.exp();
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "exp({x:e}) [{:#010x}]: {ours:e} against f32::exp's {theirs:e}",
                x.to_bits()
            );
        }
    }

    #[test]
    fn exp_is_f32_exp_bit_for_bit_across_the_f32_range() {
        // Every 61st bit pattern of both signs (about 70 million values) and the edges of each
        // special case.
        let sweep: Vec<f32> = (0..=u32::MAX).step_by(61).map(f32::from_bits).collect();
        assert_same(&sweep);
        let mut edges = Vec::new();
        for edge in [
            OVERFLOW,
            UNDERFLOW,
            LEAST,
            88.0,
            -88.0,
            0.0,
            f32::MIN_POSITIVE,
        ] {
            let bits = edge.to_bits();
            edges.extend([bits - 1, bits, bits + 1].map(f32::from_bits));
        }
        edges.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -0.0, 1.0, -1.0]);
        assert_same(&edges);
    }

    #[test]
    fn exp_of_gelus_argument_is_f32_exp_for_every_input_that_reaches_it() {
        // The slope's argument is -x²/2: all of (-104, 0] matters. Every 7th bit pattern there.
        let sweep: Vec<f32> = (0..=UNDERFLOW.to_bits() - 0x8000_0000)
            .step_by(7)
            .map(|bits| f32::from_bits(bits | 0x8000_0000))
            .collect();
        assert_same(&sweep);
    }
}
