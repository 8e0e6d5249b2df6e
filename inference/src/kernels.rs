//! CPU compute kernels: activation quantization to Q8 blocks, the scalar row dot product
//! against the GGUF weight layouts (Q4_0, Q4_1, Q8_0 via integer dot products: the definition
//! the SIMD group kernels in [`crate::packed`] are tested against), float dots, softmax `exp`,
//! SiLU and attention.
//!
//! Each kernel has a portable scalar version (the definition) and, on x86-64 with AVX2+FMA
//! detected at run time, a SIMD version. Tests check SIMD == scalar and scalar == the
//! dequantize-then-dot reference in [`crate::quant`].

use std::sync::OnceLock;

use crate::gguf::GgmlType;
use crate::quant::f16_to_f32;

/// An activation block: 32 values as `i8 * d`, with `s = d * sum(qs)` precomputed.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct BlockQ8 {
    /// Scale.
    pub d: f32,
    /// `d * sum(qs)`.
    pub s: f32,
    /// Quantized values.
    pub qs: [i8; 32],
}

fn f16_table() -> &'static [f32] {
    static T: OnceLock<Vec<f32>> = OnceLock::new();
    T.get_or_init(|| (0..=u16::MAX).map(f16_to_f32).collect())
}

#[inline(always)]
fn f16_at(table: &[f32], b: &[u8], i: usize) -> f32 {
    table[u16::from_le_bytes([b[i], b[i + 1]]) as usize]
}

/// Quantizes `x` (length multiple of 32) into `out` (`x.len() / 32` blocks).
#[inline]
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2 and FMA were detected at run time just above.
        return unsafe { avx2::quantize_q8(x, out) };
    }
    quantize_q8_scalar(x, out)
}

/// Portable definition of [`quantize_q8`] (rounding half to even, like the SIMD conversion).
pub fn quantize_q8_scalar(x: &[f32], out: &mut [BlockQ8]) {
    for (blk, o) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in o.qs.iter_mut().zip(blk) {
            let r = (v * id).round_ties_even() as i32;
            *q = r.clamp(-127, 127) as i8;
            sum += *q as i32;
        }
        o.d = d;
        o.s = d * sum as f32;
    }
}

/// Whether the AVX2+FMA kernels can run on this CPU.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("INFERENCE_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Portable definition of `dot_q`.
pub fn dot_q_scalar(ty: GgmlType, row: &[u8], x: &[BlockQ8]) -> f32 {
    let t = f16_table();
    let mut acc = 0.0f32;
    match ty {
        GgmlType::Q4_0 => {
            for (b, y) in row.chunks_exact(18).zip(x) {
                let d = f16_at(t, b, 0);
                let mut sum = 0i32;
                for j in 0..16 {
                    let q = b[2 + j];
                    sum +=
                        (q & 0xf) as i32 * y.qs[j] as i32 + (q >> 4) as i32 * y.qs[j + 16] as i32;
                }
                // (q - 8) * y summed = sum(q*y) - 8 * sum(y); y.s = y.d * sum(y).
                acc += d * (y.d * sum as f32 - 8.0 * y.s);
            }
        }
        GgmlType::Q4_1 => {
            for (b, y) in row.chunks_exact(20).zip(x) {
                let d = f16_at(t, b, 0);
                let m = f16_at(t, b, 2);
                let mut sum = 0i32;
                for j in 0..16 {
                    let q = b[4 + j];
                    sum +=
                        (q & 0xf) as i32 * y.qs[j] as i32 + (q >> 4) as i32 * y.qs[j + 16] as i32;
                }
                acc += d * y.d * sum as f32 + m * y.s;
            }
        }
        GgmlType::Q8_0 => {
            for (b, y) in row.chunks_exact(34).zip(x) {
                let d = f16_at(t, b, 0);
                let mut sum = 0i32;
                for j in 0..32 {
                    sum += (b[2 + j] as i8) as i32 * y.qs[j] as i32;
                }
                acc += d * y.d * sum as f32;
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            let sbb = ty.block_bytes() as usize;
            for (sb, ys) in row.chunks_exact(sbb).zip(x.chunks(8)) {
                for (sub, y) in crate::quant::k_subblocks(ty, sb).iter().zip(ys) {
                    let mut s = [0i32; 2];
                    for k in 0..32 {
                        s[k / 16] += sub.q[k] as i32 * y.qs[k] as i32;
                    }
                    acc += (sub.scale[0] * s[0] as f32 + sub.scale[1] * s[1] as f32) * y.d
                        + sub.min * y.s;
                }
            }
        }
        _ => {}
    }
    acc
}

/// `x[i] = exp(x[i] - max)`, returns the sum (the softmax numerator and denominator).
#[inline]
pub fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2 and FMA were detected at run time just above.
        return unsafe { avx2::exp_sub_sum(x, max) };
    }
    exp_sub_sum_scalar(x, max)
}

/// Portable definition of [`exp_sub_sum`].
pub fn exp_sub_sum_scalar(x: &mut [f32], max: f32) -> f32 {
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

/// One attention head for one query: `scores[p] = softmax_p(q . k_p * scale)` and
/// `out = sum_p scores[p] * v_p`, for `p < scores.len()`, where `k_p = k[p * stride..][..hd]`,
/// `v_p` likewise and `hd = q.len() = out.len()`.
#[inline]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let n = scores.len();
    attention_segments(q, k, v, std::iter::once((0, n)), stride, scale, scores, out)
}

/// [`attention`] over positions stored in segments (a paged KV cache): `segments` yields
/// `(offset, count)` pairs in position order, segment `s` holding its next `count` positions at
/// `k[offset + i * stride..][..hd]` (and `v` likewise); the counts add up to `scores.len()`.
/// Each position's arithmetic, and the order of the sums, is the same as [`attention`]'s over
/// the same positions stored contiguously, so the results are bit-identical.
///
/// # Panics
/// If a segment reaches past `k` or `v`, or the counts do not add up to `scores.len()`.
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn attention_segments<I>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segments: I,
    stride: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) where
    I: Iterator<Item = (usize, usize)> + Clone,
{
    #[cfg(target_arch = "x86_64")]
    if simd_available() && q.len().is_multiple_of(8) {
        // SAFETY: AVX2 and FMA were detected at run time just above.
        return unsafe { avx2::attention(q, k, v, segments, stride, scale, scores, out) };
    }
    attention_scalar_segments(q, k, v, segments, stride, scale, scores, out)
}

/// Portable definition of [`attention`].
pub fn attention_scalar(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let n = scores.len();
    attention_scalar_segments(q, k, v, std::iter::once((0, n)), stride, scale, scores, out)
}

/// Portable definition of [`attention_segments`].
#[allow(clippy::too_many_arguments)]
pub fn attention_scalar_segments<I>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segments: I,
    stride: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) where
    I: Iterator<Item = (usize, usize)> + Clone,
{
    let hd = q.len();
    let total: usize = segments.clone().map(|(_, n)| n).sum();
    assert!(
        total == scores.len() && out.len() == hd,
        "attention: inconsistent lengths"
    );
    let rows = || {
        segments
            .clone()
            .flat_map(move |(off, n)| (0..n).map(move |i| off + i * stride))
    };
    let mut max = f32::NEG_INFINITY;
    for (sc, r) in scores.iter_mut().zip(rows()) {
        *sc = dot_f32(q, &k[r..r + hd]) * scale;
        max = max.max(*sc);
    }
    let inv = 1.0 / exp_sub_sum_scalar(scores, max);
    out.fill(0.0);
    for (&w, r) in scores.iter().zip(rows()) {
        let w = w * inv;
        for (o, &vv) in out.iter_mut().zip(&v[r..r + hd]) {
            *o += w * vv;
        }
    }
}

/// SwiGLU: `g[i] = silu(g[i]) * u[i]` with `silu(a) = a / (1 + exp(-a))`.
#[inline]
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2 and FMA were detected at run time just above.
        return unsafe { avx2::silu_mul(g, u) };
    }
    silu_mul_scalar(g, u)
}

/// Portable definition of [`silu_mul`].
pub fn silu_mul_scalar(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        *a = *a / (1.0 + (-*a).exp()) * b;
    }
}

/// f32 dot product written for autovectorisation (8 independent accumulators).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n = a.len().min(b.len());
    let (a8, ar) = a[..n].split_at(n - n % 8);
    let (b8, br) = b[..n].split_at(n - n % 8);
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA versions of the activation quantization, softmax `exp`, SiLU and attention
    //! (the quantized weight products run in [`crate::packed`]).
    use super::BlockQ8;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `exp` of 8 lanes (Cephes-style: 2^n * polynomial, relative error ~1e-7; inputs clamped
    /// to about [-87.3, 88.7]).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.7),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }

    /// See [`super::exp_sub_sum`].
    #[target_feature(enable = "avx2,fma")]
    pub fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` is exactly 8 f32; loadu/storeu have no alignment requirement.
            unsafe {
                let v = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
                _mm256_storeu_ps(c.as_mut_ptr(), v);
                acc = _mm256_add_ps(acc, v);
            }
        }
        let mut sum = hsum(acc);
        for v in chunks.into_remainder() {
            *v = (*v - max).exp();
            sum += *v;
        }
        sum
    }

    /// See [`super::attention_segments`]; `q.len()` must be a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub fn attention<I>(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        segments: I,
        stride: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) where
        I: Iterator<Item = (usize, usize)> + Clone,
    {
        let hd = q.len();
        let mut total = 0;
        for (off, n) in segments.clone() {
            assert!(
                n == 0 || off + (n - 1) * stride + hd <= k.len().min(v.len()),
                "attention: a segment reaches past the cache"
            );
            total += n;
        }
        assert!(
            hd.is_multiple_of(8) && out.len() == hd && total == scores.len(),
            "attention: inconsistent lengths"
        );
        let mut max = f32::NEG_INFINITY;
        // SAFETY: every access is inside `q`, `out` (hd values), `scores` (one per position,
        // `total` of them) or row i < n of a segment of `k`/`v` (offset off + i * stride, hd
        // values), all checked by the asserts above.
        unsafe {
            let (qp, kp, vp) = (q.as_ptr(), k.as_ptr(), v.as_ptr());
            let sp = scores.as_mut_ptr();
            let mut p = 0;
            for (off, n) in segments.clone() {
                for j in 0..n {
                    let kr = kp.add(off + j * stride);
                    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    let mut i = 0;
                    while i + 16 <= hd {
                        a0 = _mm256_fmadd_ps(
                            _mm256_loadu_ps(qp.add(i)),
                            _mm256_loadu_ps(kr.add(i)),
                            a0,
                        );
                        a1 = _mm256_fmadd_ps(
                            _mm256_loadu_ps(qp.add(i + 8)),
                            _mm256_loadu_ps(kr.add(i + 8)),
                            a1,
                        );
                        i += 16;
                    }
                    if i < hd {
                        a0 = _mm256_fmadd_ps(
                            _mm256_loadu_ps(qp.add(i)),
                            _mm256_loadu_ps(kr.add(i)),
                            a0,
                        );
                    }
                    let sc = hsum(_mm256_add_ps(a0, a1)) * scale;
                    *sp.add(p) = sc;
                    max = max.max(sc);
                    p += 1;
                }
            }
            let inv = 1.0 / exp_sub_sum(scores, max);
            let sp = scores.as_ptr();
            let op = out.as_mut_ptr();
            let mut i = 0;
            // 32 output values per pass over the positions stay in registers.
            while i < hd {
                let w = (hd - i).min(32) / 8;
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut p = 0;
                for (off, n) in segments.clone() {
                    for j in 0..n {
                        let sv = _mm256_set1_ps(*sp.add(p) * inv);
                        let vr = vp.add(off + j * stride + i);
                        for (jj, a) in acc.iter_mut().enumerate().take(w) {
                            *a = _mm256_fmadd_ps(sv, _mm256_loadu_ps(vr.add(8 * jj)), *a);
                        }
                        p += 1;
                    }
                }
                for (j, a) in acc.iter().enumerate().take(w) {
                    _mm256_storeu_ps(op.add(i + 8 * j), *a);
                }
                i += 8 * w;
            }
        }
    }

    /// See [`super::silu_mul`].
    #[target_feature(enable = "avx2,fma")]
    pub fn silu_mul(g: &mut [f32], u: &[f32]) {
        let n = g.len().min(u.len());
        let (g8, gr) = g[..n].split_at_mut(n - n % 8);
        let (u8, ur) = u[..n].split_at(n - n % 8);
        let one = _mm256_set1_ps(1.0);
        for (a, b) in g8.chunks_exact_mut(8).zip(u8.chunks_exact(8)) {
            // SAFETY: both chunks are exactly 8 f32; loadu/storeu need no alignment.
            unsafe {
                let x = _mm256_loadu_ps(a.as_ptr());
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
                let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
                _mm256_storeu_ps(
                    a.as_mut_ptr(),
                    _mm256_mul_ps(s, _mm256_loadu_ps(b.as_ptr())),
                );
            }
        }
        super::silu_mul_scalar(gr, ur);
    }

    /// See [`super::quantize_q8`] (same results as the scalar version: the conversion rounds
    /// half to even).
    #[target_feature(enable = "avx2,fma")]
    pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
        let sign = _mm256_set1_ps(-0.0);
        for (blk, o) in x.chunks_exact(32).zip(out.iter_mut()) {
            // SAFETY: `blk` is exactly 32 f32 and `o.qs` 32 bytes; loadu/storeu need no
            // alignment.
            unsafe {
                let p = blk.as_ptr();
                let v = [
                    _mm256_loadu_ps(p),
                    _mm256_loadu_ps(p.add(8)),
                    _mm256_loadu_ps(p.add(16)),
                    _mm256_loadu_ps(p.add(24)),
                ];
                let a = v.map(|v| _mm256_andnot_ps(sign, v));
                let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
                let amax = _mm_cvtss_f32(m);
                let d = amax / 127.0;
                let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
                let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
                let s =
                    _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
                let sum = _mm_cvtsi128_si32(s);
                let w = _mm256_packs_epi16(
                    _mm256_packs_epi32(q[0], q[1]),
                    _mm256_packs_epi32(q[2], q[3]),
                );
                let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(o.qs.as_mut_ptr().cast(), w);
                o.d = d;
                o.s = d * sum as f32;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::quant::{dot_ref, quantize};

    /// Deterministic test values in [-1, 1] (also used by the packed-kernel tests).
    pub(crate) fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 2001) as f32
                    / 1000.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn simd_quantize_exp_silu_match_scalar() {
        for n in [32, 64, 576, 1536] {
            let mut x = data(n, n as u32);
            // Ties and extremes: exact multiples of the scale, a zero block.
            x[3] = 0.5;
            x[5] = -1.0;
            if n >= 64 {
                x[32..64].fill(0.0);
            }
            let mut a = vec![BlockQ8::default(); n / 32];
            let mut b = vec![BlockQ8::default(); n / 32];
            quantize_q8(&x, &mut a);
            quantize_q8_scalar(&x, &mut b);
            for (p, q) in a.iter().zip(&b) {
                assert_eq!(p.qs, q.qs);
                assert_eq!(p.d.to_bits(), q.d.to_bits());
                assert_eq!(p.s.to_bits(), q.s.to_bits());
            }
            for len in [n, n - 1, 7] {
                let scaled: Vec<f32> = x[..len].iter().map(|v| v * 30.0).collect();
                let (mut e1, mut e2) = (scaled.clone(), scaled.clone());
                let (s1, s2) = (
                    exp_sub_sum(&mut e1, 25.0),
                    exp_sub_sum_scalar(&mut e2, 25.0),
                );
                assert!((s1 - s2).abs() <= 1e-5 * s2, "{s1} vs {s2}");
                for (p, q) in e1.iter().zip(&e2) {
                    assert!((p - q).abs() <= 1e-6 * q.abs().max(1e-30), "exp {p} vs {q}");
                }
                let u = data(len, 5);
                let (mut g1, mut g2) = (scaled.clone(), scaled);
                silu_mul(&mut g1, &u);
                silu_mul_scalar(&mut g2, &u);
                for (p, q) in g1.iter().zip(&g2) {
                    assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "silu {p} vs {q}");
                }
            }
        }
    }

    #[test]
    fn simd_attention_matches_scalar() {
        for (hd, stride, n) in [
            (64, 192, 1),
            (64, 192, 37),
            (8, 8, 5),
            (40, 100, 9),
            (16, 48, 300),
        ] {
            let q = data(hd, 3);
            let k = data((n - 1) * stride + hd, 4);
            let v = data((n - 1) * stride + hd, 6);
            let (mut s1, mut s2) = (vec![0.0; n], vec![0.0; n]);
            let (mut o1, mut o2) = (vec![0.0; hd], vec![0.0; hd]);
            attention(&q, &k, &v, stride, 0.7, &mut s1, &mut o1);
            attention_scalar(&q, &k, &v, stride, 0.7, &mut s2, &mut o2);
            for (a, b) in o1.iter().zip(&o2) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "hd {hd} n {n}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn paged_attention_is_bit_identical_to_contiguous() {
        // 37 positions of stride 192 (kv_dim), head offset 64, laid out contiguously and in
        // blocks of 5 positions scattered in reverse order over a pool.
        let (hd, stride, n, bs, head) = (64, 192, 37, 5, 64);
        let q = data(hd, 3);
        let k = data(n * stride, 4);
        let v = data(n * stride, 6);
        let blocks = n.div_ceil(bs);
        let (mut kp, mut vp) = (
            vec![0.0; blocks * bs * stride],
            vec![0.0; blocks * bs * stride],
        );
        let block_of = |b: usize| blocks - 1 - b;
        for p in 0..n {
            let dst = (block_of(p / bs) * bs + p % bs) * stride;
            kp[dst..dst + stride].copy_from_slice(&k[p * stride..(p + 1) * stride]);
            vp[dst..dst + stride].copy_from_slice(&v[p * stride..(p + 1) * stride]);
        }
        let segs = (0..blocks).map(|b| (block_of(b) * bs * stride + head, bs.min(n - b * bs)));
        let (mut s1, mut s2) = (vec![0.0; n], vec![0.0; n]);
        let (mut o1, mut o2) = (vec![0.0; hd], vec![0.0; hd]);
        attention(&q, &k[head..], &v[head..], stride, 0.7, &mut s1, &mut o1);
        attention_segments(&q, &kp, &vp, segs.clone(), stride, 0.7, &mut s2, &mut o2);
        assert_eq!(o1, o2, "simd (where available)");
        attention_scalar(&q, &k[head..], &v[head..], stride, 0.7, &mut s1, &mut o1);
        attention_scalar_segments(&q, &kp, &vp, segs, stride, 0.7, &mut s2, &mut o2);
        assert_eq!(o1, o2, "scalar");
        assert!(o1.iter().any(|&x| x != 0.0));
    }

    #[test]
    #[should_panic(expected = "attention")]
    fn a_segment_past_the_cache_panics() {
        let q = data(8, 1);
        let k = data(16, 2);
        let (mut s, mut o) = (vec![0.0; 2], vec![0.0; 8]);
        attention_segments(
            &q,
            &k,
            &k,
            [(0, 1), (12, 1)].into_iter(),
            8,
            1.0,
            &mut s,
            &mut o,
        );
    }

    #[test]
    fn quantized_dots_match_reference() {
        for n in [32, 96, 256] {
            check_dots(n);
        }
    }

    fn check_dots(n: usize) {
        let w = data(n, 1);
        let x = data(n, 7);
        let mut xq = vec![BlockQ8::default(); n / 32];
        quantize_q8(&x, &mut xq);
        // The activation quantization error bounds the difference.
        let xd: Vec<f32> = xq
            .iter()
            .flat_map(|b| b.qs.map(|q| q as f32 * b.d))
            .collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let row = quantize(ty, &w).unwrap();
            let reference = dot_ref(ty, &row, &xd).unwrap();
            let scalar = dot_q_scalar(ty, &row, &xq);
            assert!(
                (reference - scalar).abs() < 1e-3 * (1.0 + reference.abs()),
                "{ty}: {reference} vs {scalar}"
            );
            let exact = dot_ref(ty, &row, &x).unwrap();
            assert!(
                (exact - scalar).abs() < 0.05 * (1.0 + exact.abs()),
                "{ty}: {exact} vs {scalar}"
            );
        }
        assert!((dot_f32(&w, &x) - w.iter().zip(&x).map(|(a, b)| a * b).sum::<f32>()).abs() < 1e-3);
    }
}
