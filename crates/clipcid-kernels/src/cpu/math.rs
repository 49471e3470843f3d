//! Element-wise maths that the compiler can vectorise: `exp` and `erf` as polynomials, and the
//! dispatch that compiles a loop for the CPU's widest instruction set.
//!
//! The workspace is built for generic x86-64 (SSE2), and libm's `expf` is a scalar call the
//! compiler cannot vectorise; softmax and GELU spent most of their time there (`__expf_fma`
//! was 4% of a student forward). Here `exp` and `erf` are branch-free polynomials in plain
//! Rust, and [`simd`] runs a closure through `pulp` (already in the tree through candle's
//! `gemm`), which detects AVX2+FMA once and calls the closure from a function compiled with
//! those features, so its loops become 8-wide. Every function a closure calls must be
//! `#[inline(always)]` to be compiled inside it.

use std::sync::OnceLock;

/// Runs `f` compiled for the widest instruction set this CPU has (AVX2 and FMA on x86-64
/// where present, plain code otherwise); the result does not depend on which.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    static ARCH: OnceLock<pulp::Arch> = OnceLock::new();
    ARCH.get_or_init(pulp::Arch::new).dispatch(f)
}

/// Below this `exp` underflows to 0 (the smallest normal f32 is `exp(-87.34)`).
const EXP_LO: f32 = -87.336_55;
/// Above this `exp` overflows to infinity.
const EXP_HI: f32 = 88.376_26;

/// `e^x` to within 2 ulp for normal results (Cephes' `expf`: `x = n ln2 + r`, a degree-6
/// polynomial for `e^r` on `|r| <= ln2 / 2`, `2^n` built in the exponent bits); 0 below
/// [`EXP_LO`], infinity above [`EXP_HI`], NaN for NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in float arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(EXP_LO, EXP_HI);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    // n is in [-126, 127]: 2^n is a normal number.
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    let y = p * scale;
    if x < EXP_LO {
        0.0
    } else if x > EXP_HI {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// `erf(x)` to within about 1 ulp, NaN for NaN: the faithfully rounded `erff` of N. Juffa's
/// answer on Stack Overflow (question 35148198), which ONNX Runtime's MLAS also uses. Below
/// |x| = 0.921875 an odd polynomial, `x + x P(x^2)`; above, `1 - exp(-(x + x Q(x)))`; erf is
/// 1 in f32 beyond |x| = 3.725.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs().min(3.725);
    let s = a * a;
    let p = -5.991_049_7e-4;
    let p = p * s + 4.993_396e-3;
    let p = p * s - 2.676_673_4e-2;
    let p = p * s + 1.128_180_3e-1;
    let p = p * s - 3.761_248_6e-1;
    let p = p * s + 1.283_791_5e-1;
    let small = p * a + a;
    let q = 1.729_489_3e-5;
    let q = q * a - 3.832_086_8e-4;
    let q = q * a + 3.883_934_4e-3;
    let q = q * a - 2.425_456e-2;
    let q = q * a + 1.067_778_5e-1;
    let q = q * a + 6.348_467e-1;
    let q = q * a + 1.287_175_1e-1;
    let big = 1.0 - exp(-(q * a + a));
    let y = if a > 0.921_875 { big } else { small };
    if x.is_nan() {
        x
    } else {
        y.copysign(x)
    }
}

/// `1 / sqrt(2)`.
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// GELU with the exact normal CDF, `x Φ(x) = x (1 + erf(x / sqrt 2)) / 2` (PyTorch's
/// `nn.GELU()`, open_clip's default activation).
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// The derivative of [`gelu`]: `Φ(x) + x φ(x)`.
#[inline(always)]
pub(crate) fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * exp(-0.5 * x * x)
}

/// `sigmoid(1.702 x)` scale of QuickGELU.
pub(crate) const QUICK_GELU_ALPHA: f32 = 1.702;

/// `1 / (1 + e^-v)`.
#[inline(always)]
pub(crate) fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + exp(-v))
}

/// Lanes of the partial sums in [`sum_by`] and [`max`]: a single running sum cannot be
/// vectorised (float addition is not associative, so the compiler keeps its order), eight
/// independent ones can. The order is fixed, so results do not depend on the machine.
const LANES: usize = 8;

/// `sum(f(x))` over `xs`, in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn sum_by(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| f(v)).sum::<f32>()
}

/// `sum(a * b)`, in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest value of `xs` (NaN values are skipped, as `f32::max` does; minus infinity for
/// an empty slice).
#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Softmax of `row[..valid]` in place, with `row[valid..]` set to 0 (the keys a causal mask
/// hides); `valid` must be at least 1.
#[inline(always)]
pub(crate) fn softmax_in_place(row: &mut [f32], valid: usize) {
    let (live, hidden) = row.split_at_mut(valid);
    let m = max(live);
    live.iter_mut().for_each(|v| *v = exp(*v - m));
    let inv = 1.0 / sum_by(live, |v| v);
    live.iter_mut().for_each(|v| *v *= inv);
    hidden.iter_mut().for_each(|v| *v = 0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error against f64's `exp` over the whole range, ends and specials.
    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.3 {
            let want = (x as f64).exp();
            let got = simd(|| exp(x)) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_and_gelu_match_f64_references() {
        // erf from its Taylor series in f64 (converges fast for |x| <= 4; beyond, erf is 1
        // to f32 precision).
        fn erf64(x: f64) -> f64 {
            if x.abs() > 4.0 {
                return x.signum();
            }
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        }
        let mut worst = (0f64, 0f64);
        let mut x = -6.0f32;
        while x < 6.0 {
            let e = erf64(x as f64);
            worst.0 = worst.0.max((erf(x) as f64 - e).abs());
            // GELU's derivative by central differences of the f64 GELU.
            let g = |v: f64| 0.5 * v * (1.0 + erf64(v / std::f64::consts::SQRT_2));
            let h = 1e-4;
            let fd = (g(x as f64 + h) - g(x as f64 - h)) / (2.0 * h);
            // (Away from the reference's switch to +-1 at |x| / sqrt 2 = 4.)
            if x.abs() < 5.5 {
                worst.1 = worst.1.max((gelu_grad(x) as f64 - fd).abs());
            }
            assert!((gelu(x) as f64 - g(x as f64)).abs() < 1e-6 * (1.0 + x.abs() as f64));
            x += 0.001_3;
        }
        assert!(worst.0 < 2e-7, "erf differs by {}", worst.0);
        assert!(worst.1 < 1e-6, "GELU's derivative differs by {}", worst.1);
        assert!(erf(f32::NAN).is_nan() && gelu(f32::NAN).is_nan());
        assert!(
            (erf(f32::INFINITY) - 1.0).abs() < 2e-7
                && erf(f32::NEG_INFINITY) == -erf(f32::INFINITY)
        );
    }

    #[test]
    fn lane_reductions_equal_plain_ones() {
        // Lengths below, at and past a multiple of the lane count.
        for n in [0usize, 3, 8, 19, 64] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let s: f32 = a.iter().sum();
            let d: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((simd(|| sum_by(&a, |v| v)) - s).abs() < 1e-5, "sum of {n}");
            assert!((simd(|| dot(&a, &b)) - d).abs() < 1e-5, "dot of {n}");
            let m = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(simd(|| max(&a)), m, "max of {n}");
        }
        assert_eq!(max(&[f32::NAN, 1.0]), 1.0);
    }

    #[test]
    fn softmax_in_place_hides_masked_keys() {
        let mut row = [1f32, 2.0, 3.0, 100.0];
        simd(|| softmax_in_place(&mut row, 3));
        let e: Vec<f64> = [1f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
        let s: f64 = e.iter().sum();
        for i in 0..3 {
            assert!((row[i] as f64 - e[i] / s).abs() < 1e-7);
        }
        assert_eq!(row[3], 0.0);
    }
}
