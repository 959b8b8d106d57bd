//! `erf` for GELU, many elements at a time, bit for bit libm's `erff`.
//!
//! GELU's erf was the largest cost of a training step after the matmuls: libm's `erff` is a
//! scalar function with data-dependent branches (a rational approximation near zero, two
//! `expf` calls in the tails). Here the same approximation is written without branches: every
//! element evaluates each piece with libm's constants and operation order, and selects the
//! piece its magnitude calls for. IEEE arithmetic without fused multiply-adds gives the same
//! result as libm in every lane (the tests sweep the f32 range), and the branch-free loop is
//! one the compiler vectorises, 16 lanes wide where AVX-512 is present.
//!
//! The tails (1.25 ≤ |x| < 6) cost four of the five divisions and both `expf`s, but hold only
//! about a fifth of GELU's inputs, spread so that nine 16-lane vectors in ten hold one. So a
//! block of inputs first gets the pieces without tails, in every lane, and then its tail
//! elements, gathered into vectors of their own, get the tails.

// The constants are written as libm (FreeBSD) writes them; each rounds to the same f32.
#![allow(clippy::excessive_precision)]

use std::mem::MaybeUninit;

use crate::slots::written;

/// `out[i] = erf(input[i] / √2)`; returns `out` as written.
pub fn erf_scaled<'a>(input: &[f32], out: &'a mut [MaybeUninit<f32>]) -> &'a mut [f32] {
    assert_eq!(input.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked above).
        unsafe { erf_scaled_avx512(input, out) };
    } else if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above).
        unsafe { erf_scaled_avx2(input, out) };
    } else {
        erf_scaled_portable(input, out);
    }
    #[cfg(not(target_arch = "x86_64"))]
    erf_scaled_portable(input, out);
    // SAFETY: each path writes every value of `out` (as long as `input`): every block of it
    // starts with `Block::without_tails`, which writes the whole block.
    unsafe { written(out) }
}

// AVX-512 gathers each block's tails a vector at a time (compress) and puts their results
// back the same way (expand), where the portable loop goes element by element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn erf_scaled_avx512(input: &[f32], out: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    let mut block = Block::new();
    let mut masks = [0u16; BLOCK / LANES];
    let (lower, upper) = (
        _mm512_set1_epi32(0x3fa0_0000),
        _mm512_set1_epi32(0x40c0_0000),
    );
    let magnitude = _mm512_set1_epi32(0x7fff_ffff);
    for (input, out) in input.chunks(BLOCK).zip(out.chunks_mut(BLOCK)) {
        let out = block.without_tails(input, out);
        let whole = input.len() / LANES * LANES;
        for (mask, at) in masks.iter_mut().zip((0..whole).step_by(LANES)) {
            // SAFETY: `at + LANES <= whole <= BLOCK`, inside `scaled`; `values` has LANES
            // slots past BLOCK, so a whole vector fits from any `count <= at`.
            unsafe {
                let y = _mm512_loadu_ps(block.scaled.as_ptr().add(at));
                let bits = _mm512_and_si512(_mm512_castps_si512(y), magnitude);
                *mask =
                    _mm512_mask_cmplt_epu32_mask(_mm512_cmpge_epu32_mask(bits, lower), bits, upper);
                let packed = _mm512_maskz_compress_ps(*mask, y);
                _mm512_storeu_ps(block.values.as_mut_ptr().add(block.count), packed);
            }
            block.count += mask.count_ones() as usize;
        }
        let vector_tails = block.count;
        block.gather_from(whole, input.len());
        block.tails();
        let mut taken = 0;
        for (&mask, at) in masks.iter().zip((0..whole).step_by(LANES)) {
            if mask == 0 {
                continue;
            }
            // SAFETY: as above, for `out` (at least `whole` long) and `values`.
            unsafe {
                let here = out.as_mut_ptr().add(at);
                let results = _mm512_loadu_ps(block.values.as_ptr().add(taken));
                let merged = _mm512_mask_expand_ps(_mm512_loadu_ps(here), mask, results);
                _mm512_storeu_ps(here, merged);
            }
            taken += mask.count_ones() as usize;
        }
        block.scatter_from(vector_tails, out);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn erf_scaled_avx2(input: &[f32], out: &mut [MaybeUninit<f32>]) {
    erf_scaled_portable(input, out);
}

/// Inputs per block: its scaled values and its tails fit in a few KB of stack.
const BLOCK: usize = 512;

/// The widest vector's lanes: the tail vectors are padded to a multiple of it.
const LANES: usize = 16;

#[inline(always)]
fn erf_scaled_portable(input: &[f32], out: &mut [MaybeUninit<f32>]) {
    let mut block = Block::new();
    for (input, out) in input.chunks(BLOCK).zip(out.chunks_mut(BLOCK)) {
        let out = block.without_tails(input, out);
        block.gather_from(0, input.len());
        block.tails();
        block.scatter_from(0, out);
    }
}

/// One block's inputs divided by √2, and its tails apart.
struct Block {
    scaled: [f32; BLOCK],
    /// The tails' inputs, then their results, in order; LANES slots more than a block needs,
    /// for padding and whole-vector stores.
    values: [f32; BLOCK + LANES],
    /// Where the tails gathered element by element came from.
    positions: [u16; BLOCK],
    count: usize,
}

impl Block {
    fn new() -> Self {
        Block {
            scaled: [0.0; BLOCK],
            values: [0.0; BLOCK + LANES],
            positions: [0; BLOCK],
            count: 0,
        }
    }

    /// Starts a block: `scaled = input / √2`, `out` (as long as `input`) from the pieces
    /// without tails, and no tails gathered yet. Returns `out` as written.
    #[inline(always)]
    fn without_tails<'a>(
        &mut self,
        input: &[f32],
        out: &'a mut [MaybeUninit<f32>],
    ) -> &'a mut [f32] {
        assert_eq!(input.len(), out.len());
        self.count = 0;
        let scaled = &mut self.scaled[..input.len()];
        for (y, &x) in scaled.iter_mut().zip(input) {
            *y = x / core::f32::consts::SQRT_2;
        }
        for (out, &y) in out.iter_mut().zip(scaled.iter()) {
            out.write(erff_without_tails(y));
        }
        // SAFETY: the loop wrote every value of `out` (as long as `input`, asserted above).
        unsafe { written(out) }
    }

    /// Appends the tails among `scaled[from..to]` to `values`, without a branch per element.
    #[inline(always)]
    fn gather_from(&mut self, from: usize, to: usize) {
        let first = self.count;
        let mut count = first;
        for (i, &y) in self.scaled[..to].iter().enumerate().skip(from) {
            self.positions[count - first] = i as u16;
            self.values[count] = y;
            count += usize::from(in_tails(y));
        }
        self.count = count;
    }

    /// Replaces the tails' inputs with their results, in whole vectors (the padding is a
    /// tail value whose result is dropped).
    #[inline(always)]
    fn tails(&mut self) {
        let padded = self.count.next_multiple_of(LANES);
        self.values[self.count..padded].fill(2.0);
        for value in &mut self.values[..padded] {
            *value = erff_tails(*value);
        }
    }

    /// Puts the results of the tails that [`Block::gather_from`] appended from `values[first]`
    /// on in their places.
    #[inline(always)]
    fn scatter_from(&self, first: usize, out: &mut [f32]) {
        let gathered = &self.positions[..self.count - first];
        for (&value, &i) in self.values[first..self.count].iter().zip(gathered) {
            out[i as usize] = value;
        }
    }
}

const ERX: f32 = 8.4506291151e-01;
const EFX8: f32 = 1.0270333290e+00;
const PP: [f32; 5] = [
    1.2837916613e-01,
    -3.2504209876e-01,
    -2.8481749818e-02,
    -5.7702702470e-03,
    -2.3763017452e-05,
];
const QQ: [f32; 5] = [
    3.9791721106e-01,
    6.5022252500e-02,
    5.0813062117e-03,
    1.3249473704e-04,
    -3.9602282413e-06,
];
const PA: [f32; 7] = [
    -2.3621185683e-03,
    4.1485610604e-01,
    -3.7220788002e-01,
    3.1834661961e-01,
    -1.1089469492e-01,
    3.5478305072e-02,
    -2.1663755178e-03,
];
const QA: [f32; 6] = [
    1.0642088205e-01,
    5.4039794207e-01,
    7.1828655899e-02,
    1.2617121637e-01,
    1.3637083583e-02,
    1.1984500103e-02,
];
const RA: [f32; 8] = [
    -9.8649440333e-03,
    -6.9385856390e-01,
    -1.0558626175e+01,
    -6.2375331879e+01,
    -1.6239666748e+02,
    -1.8460508728e+02,
    -8.1287437439e+01,
    -9.8143291473e+00,
];
const SA: [f32; 8] = [
    1.9651271820e+01,
    1.3765776062e+02,
    4.3456588745e+02,
    6.4538726807e+02,
    4.2900814819e+02,
    1.0863500214e+02,
    6.5702495575e+00,
    -6.0424413532e-02,
];
const RB: [f32; 7] = [
    -9.8649431020e-03,
    -7.9928326607e-01,
    -1.7757955551e+01,
    -1.6063638306e+02,
    -6.3756646729e+02,
    -1.0250950928e+03,
    -4.8351919556e+02,
];
const SB: [f32; 7] = [
    3.0338060379e+01,
    3.2579251099e+02,
    1.5367296143e+03,
    3.1998581543e+03,
    2.5530502930e+03,
    4.7452853394e+02,
    -2.2440952301e+01,
];

#[inline(always)]
fn select(condition: bool, a: f32, b: f32) -> f32 {
    if condition { a } else { b }
}

/// libm's `erff` (FreeBSD's `s_erff.c`): [`erff_tails`] where [`in_tails`], else
/// [`erff_without_tails`].
#[cfg(test)]
fn erff(x: f32) -> f32 {
    match in_tails(x) {
        true => erff_tails(x),
        false => erff_without_tails(x),
    }
}

/// Whether `x` is in the tails, `1.25 ≤ |x| < 6`.
#[inline(always)]
fn in_tails(x: f32) -> bool {
    let ix = x.to_bits() & 0x7fff_ffff;
    (0x3fa0_0000..0x40c0_0000).contains(&ix)
}

/// `x`'s sign bit, the bits of `|x|` (libm's `ix`), and `|x|`.
#[inline(always)]
fn sign_and_magnitude(x: f32) -> (bool, u32, f32) {
    let bits = x.to_bits();
    let ix = bits & 0x7fff_ffff;
    (bits >> 31 != 0, ix, f32::from_bits(ix))
}

/// `erff` outside the tails (|x| < 1.25, |x| ≥ 6 and not finite), every piece evaluated and
/// one selected.
#[inline(always)]
fn erff_without_tails(x: f32) -> f32 {
    let (negative, ix, ax) = sign_and_magnitude(x);

    // |x| < 0.84375
    let z = x * x;
    let r = PP[0] + z * (PP[1] + z * (PP[2] + z * (PP[3] + z * PP[4])));
    let s = 1.0 + z * (QQ[0] + z * (QQ[1] + z * (QQ[2] + z * (QQ[3] + z * QQ[4]))));
    let tiny = 0.125 * (8.0 * x + EFX8 * x);

    // 0.84375 <= |x| < 1.25: erfc1
    let s1 = ax - 1.0;
    let p = PA[0]
        + s1 * (PA[1] + s1 * (PA[2] + s1 * (PA[3] + s1 * (PA[4] + s1 * (PA[5] + s1 * PA[6])))));
    let q =
        1.0 + s1 * (QA[0] + s1 * (QA[1] + s1 * (QA[2] + s1 * (QA[3] + s1 * (QA[4] + s1 * QA[5])))));

    // The two pieces are disjoint ranges of |x|, each with one quotient of its own: dividing
    // the numerator and denominator of the piece selected gives each piece's quotient bit for
    // bit, with one division where there were two (divisions bound this loop: they are as
    // slow per element in 16 lanes as in 8).
    let near_zero_piece = ix < 0x3f58_0000;
    let numerator = select(near_zero_piece, r, p);
    let denominator = select(near_zero_piece, s, q);
    let quotient = numerator / denominator;
    let near_zero = x + x * quotient;
    let erfc_near = 1.0 - ERX - quotient;

    // |x| >= 6: 1 - tiny
    let one_side = select(
        ix < 0x40c0_0000,
        1.0 - erfc_near,
        1.0 - f32::from_bits(0x0380_0000),
    );
    let far = select(negative, -one_side, one_side);
    let sign = if negative { 1.0 } else { 0.0 };
    // libm's `1 - 2·sign + 1/x`: ±1 at ±∞, and x's NaN quietened (as `x + x` quietens it)
    // without a division.
    let non_finite = select(x.is_nan(), x + x, 1.0 - 2.0 * sign);

    let small = select(ix < 0x3180_0000, tiny, near_zero);
    let finite = select(near_zero_piece, small, far);
    select(ix >= 0x7f80_0000, non_finite, finite)
}

/// `erff` in the tails, `1.25 ≤ |x| < 6` (erfc2 there, and `1 - erfc`).
#[inline(always)]
fn erff_tails(x: f32) -> f32 {
    let (negative, ix, ax) = sign_and_magnitude(x);

    let s2 = 1.0 / (ax * ax);
    let r_a = RA[0]
        + s2 * (RA[1]
            + s2 * (RA[2]
                + s2 * (RA[3] + s2 * (RA[4] + s2 * (RA[5] + s2 * (RA[6] + s2 * RA[7]))))));
    let s_a = 1.0
        + s2 * (SA[0]
            + s2 * (SA[1]
                + s2 * (SA[2]
                    + s2 * (SA[3] + s2 * (SA[4] + s2 * (SA[5] + s2 * (SA[6] + s2 * SA[7])))))));
    let r_b = RB[0]
        + s2 * (RB[1] + s2 * (RB[2] + s2 * (RB[3] + s2 * (RB[4] + s2 * (RB[5] + s2 * RB[6])))));
    let s_b = 1.0
        + s2 * (SB[0]
            + s2 * (SB[1]
                + s2 * (SB[2] + s2 * (SB[3] + s2 * (SB[4] + s2 * (SB[5] + s2 * SB[6]))))));
    let first_tail = ix < 0x4036_db6d;
    let quotient = select(first_tail, r_a, r_b) / select(first_tail, s_a, s_b);
    let zt = f32::from_bits(ix & 0xffff_e000);
    let erfc = expf(-zt * zt - 0.5625) * expf((zt - ax) * (zt + ax) + quotient) / ax;
    let one_side = 1.0 - erfc;
    select(negative, -one_side, one_side)
}

const LN2_HI: f32 = 6.9314575195e-01;
const LN2_LO: f32 = 1.4286067653e-06;
const INV_LN2: f32 = 1.4426950216e+00;
const P1: f32 = 1.6666625440e-1;
const P2: f32 = -2.7667332906e-3;

/// libm's `expf` for the arguments erf's tails give it (between -37 and 1, where no overflow,
/// underflow or subnormal result can occur), every reduction evaluated and one selected.
#[inline(always)]
fn expf(x: f32) -> f32 {
    let bits = x.to_bits();
    let negative = (bits >> 31) as i32;
    let hx = bits & 0x7fff_ffff;
    let half = select(negative != 0, -0.5, 0.5);
    let k_far = truncate(INV_LN2 * x + half);
    let k_near = 1 - negative - negative;
    let reduced = hx > 0x3eb1_7218;
    let k = if reduced {
        if hx > 0x3f85_1592 { k_far } else { k_near }
    } else {
        0
    };
    let kf = k as f32;
    let hi = select(reduced, x - kf * LN2_HI, x);
    let lo = select(reduced, kf * LN2_LO, 0.0);
    let xr = select(reduced, hi - lo, x);
    let xx = xr * xr;
    let c = xr - xx * (P1 + xx * P2);
    let y = 1.0 + (xr * c / (2.0 - c) - lo + hi);
    // scalbnf(y, k) in the normal range is one exact multiplication by 2^k.
    let scaled = y * f32::from_bits((0x7f_i32.wrapping_add(k) as u32) << 23);
    select(hx > 0x3900_0000, scaled, 1.0 + x)
}

/// `v as i32` for the |v| < 2²² that `expf` meets, in vector instructions: Rust's saturating
/// cast has no AVX2 form and made the loop convert lane by lane (a third of erf's time). An
/// integer below 2²² plus 1.5 · 2²³ is exact, and its low mantissa bits are the integer.
#[inline(always)]
fn truncate(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    (v.trunc() + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_same(x: f32) {
        let (ours, theirs) = (erff(x), libm::erff(x));
        assert!(
            ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
            "erf({x:e}) [{:#010x}]: {ours:e} against libm's {theirs:e}",
            x.to_bits()
        );
    }

    #[test]
    fn erff_is_libms_bit_for_bit_across_the_f32_range() {
        // Every 61st bit pattern of both signs (about 140 million values), each piece's
        // boundaries and the special values.
        for bits in (0..=u32::MAX).step_by(61) {
            assert_same(f32::from_bits(bits));
        }
        for edge in [
            0x3158_0000u32,
            0x317f_ffff,
            0x3180_0000,
            0x3f57_ffff,
            0x3f58_0000,
            0x3f9f_ffff,
            0x3fa0_0000,
            0x4036_db6c,
            0x4036_db6d,
            0x40bf_ffff,
            0x40c0_0000,
            0x7f80_0000,
            0x7fc0_0000,
            0,
            1,
        ] {
            assert_same(f32::from_bits(edge));
            assert_same(-f32::from_bits(edge));
        }
    }

    #[test]
    fn truncate_is_the_cast_where_expf_uses_it() {
        for v in [
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.0,
            -1.0,
            1.99,
            -1.99,
            54.4,
            -54.4,
            4_194_303.0,
        ] {
            assert_eq!(truncate(v), v as i32, "{v}");
            assert_eq!(truncate(-v), -v as i32, "{v}");
        }
    }

    #[test]
    fn the_slice_form_matches_elementwise_libm() {
        let input: Vec<f32> = (0..10_000).map(|i| (i as f32 - 5000.0) * 0.0031).collect();
        let expected: Vec<u32> = input
            .iter()
            .map(|&x| libm::erff(x / core::f32::consts::SQRT_2).to_bits())
            .collect();
        let check = |path: &str, run: &dyn Fn(&mut [MaybeUninit<f32>])| {
            let mut out = vec![MaybeUninit::new(f32::NAN); input.len()];
            run(&mut out);
            // SAFETY: every slot started initialised (NaN), and `run` writes only values.
            let out = unsafe { written(&mut out) };
            for ((&x, &y), &expected) in input.iter().zip(&*out).zip(&expected) {
                assert_eq!(y.to_bits(), expected, "{path}: erf({x} / √2)");
            }
        };
        check("dispatched", &|out| {
            erf_scaled(&input, out);
        });
        check("portable", &|out| erf_scaled_portable(&input, out));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked above).
            check("avx2", &|out| unsafe { erf_scaled_avx2(&input, out) });
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked above).
            check("avx512", &|out| unsafe { erf_scaled_avx512(&input, out) });
        }
    }

    /// The slice form over the f32 range, tails gathered from blocks of every mix (a block of
    /// consecutive bit patterns is often all tails or none).
    #[test]
    fn the_slice_form_is_libms_across_the_f32_range() {
        let input: Vec<f32> = (0..=u32::MAX)
            .step_by(997)
            .map(f32::from_bits)
            .chain([1.25, -1.25, 6.0, -6.0, f32::INFINITY, f32::NEG_INFINITY])
            .collect();
        let mut out = vec![MaybeUninit::uninit(); input.len()];
        let out = erf_scaled(&input, &mut out);
        for (&x, &y) in input.iter().zip(&*out) {
            let expected = libm::erff(x / core::f32::consts::SQRT_2);
            assert!(
                y.to_bits() == expected.to_bits() || (y.is_nan() && expected.is_nan()),
                "erf({x:e} / √2) [{:#010x}]: {y:e} against libm's {expected:e}",
                x.to_bits()
            );
        }
    }
}
