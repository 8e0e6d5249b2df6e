//! Quantized weight matrices repacked at load time for the CPU kernels: rows in groups of 16.
//!
//! GGUF stores a Q4_0/Q4_1/Q8_0 matrix row by row, each row a sequence of 32-value blocks with
//! their own f16 scale(s). [`PackedMatrix`] interleaves 16 consecutive rows block by block, 4
//! bytes at a time: a 64-byte vector holds 4 quantized bytes of each of the 16 rows, so an
//! integer dot product (`vpdpbusd`, or `maddubs` + `madd`) against the matching 4 activation
//! bytes broadcast to all lanes leaves each row's partial sum in its own 32-bit lane: no
//! horizontal reduction, one activation load serves all rows, and the scales of a block are one
//! load converted by a single F16C instruction. AVX-512 takes the 16 rows in one 512-bit
//! vector; AVX2 takes the two 32-byte halves (rows 0..8, 8..16) one after the other. The group
//! layout of block `b` (f16 values little-endian; rows past the matrix end are zero padding):
//!
//! * `d[16]` (32 bytes): the rows' scales, row order;
//! * Q4_1 only: `m[16]` (32 bytes): the rows' minimums;
//! * Q4_0/Q4_1: 4 vectors of 64 bytes, vector `c` = bytes `4c..4c+4` of the 16 nibble bytes of
//!   rows 0..16 (GGUF nibble order: byte `j` holds values `j` (low) and `j + 16` (high), so the
//!   low nibbles pair with activations `4c..4c+4` and the high ones with `16+4c..16+4c+4`);
//! * Q8_0: 8 vectors of 64 bytes, vector `i` = values `4i..4i+4` of rows 0..16.
//!
//! K-quant matrices (Q4_K, Q5_K, Q6_K) are unpacked into the same 32-value group blocks, one per
//! sub-block of a super-block ([`crate::quant::k_subblocks`]), with the sub-block scales
//! multiplied out into f32 so no precision is lost (the products `d * sc` are exact in f32):
//!
//! * Q4_K: `d[16]` f32, `m[16]` f32 (`x = d * q + m`), then the nibbles as for Q4_1
//!   (`q` re-paired into the Q4_1 nibble order); 384 bytes per group block;
//! * Q5_K: `d[16]`, `m[16]` f32, then 8 vectors of unsigned 5-bit values laid out as Q8_0;
//! * Q6_K: `d_lo[16]`, `d_hi[16]` f32 (scales of values 0..16 and 16..32), then 8 vectors of
//!   signed 6-bit values (`q - 32`) laid out as Q8_0.
//!
//! This trades memory for kernel simplicity: 6 (Q4_K) and 10 (Q5_K, Q6_K) bits per weight
//! against the files' 4.5, 5.5 and 6.6.
//!
//! [`dot_group`] has a scalar definition and AVX2 / AVX-VNNI / AVX-512 VNNI versions; tests
//! check each level the CPU runs against the per-row kernels of [`crate::kernels`].
//!
//! Batch independence: at a given level, each activation vector of a tile has its own
//! accumulators and the same operations in the same order as when it runs alone (the one-token
//! decode kernel), so a row's results are bit-identical whatever the tile size `T` and its place
//! in the tile. The batched CPU model relies on this ([`crate::cpu_batched`]: a sequence's logits
//! do not depend on which other sequences share its pass).

use crate::gguf::GgmlType;
use crate::kernels::BlockQ8;

/// Rows per group.
pub const GROUP: usize = 16;

/// A Q4_0, Q4_1, Q8_0 or K-quant matrix in the 16-row group layout (see the module docs).
/// (Not `Clone`: the group data starts at a 64-byte aligned offset of its own allocation.)
#[derive(Debug)]
pub struct PackedMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// The allocation; the groups are `data[off..]`, `off` making them 64-byte aligned so the
    /// 512-bit loads of the kernels do not straddle cache lines (group blocks are multiples of
    /// 32 bytes, of 64 for Q4_1).
    data: Vec<u8>,
    off: usize,
}

/// Bytes of one GGUF block of `ty` (Q4_0, Q4_1, Q8_0).
fn src_block_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_0 => 18,
        GgmlType::Q4_1 => 20,
        _ => 34,
    }
}

/// Bytes of one packed group block of `ty`.
fn group_block_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_0 => 32 + 256,
        GgmlType::Q4_1 => 64 + 256,
        GgmlType::Q4_K => 128 + 256,
        GgmlType::Q5_K | GgmlType::Q6_K => 128 + 512,
        _ => 32 + 512,
    }
}

/// Header bytes (scales) before the quantized values of a group block.
fn header_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_1 => 64,
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => 128,
        _ => 32,
    }
}

/// Whether `ty` is a K-quant (256-value super-blocks unpacked into f32-scaled sub-blocks).
fn is_k(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K)
}

/// Reads f32 `i` of a header.
#[inline]
fn rf32(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

impl PackedMatrix {
    /// Whether `ty` can be packed.
    pub fn supports(ty: GgmlType) -> bool {
        matches!(
            ty,
            GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q8_0
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::Q6_K
        )
    }

    /// Repacks `rows` GGUF rows of `cols` values (`data` = the tensor bytes). Returns `None` when
    /// `ty` is not supported, `cols` is not a multiple of 32 or `data` is too short.
    pub fn pack(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !Self::supports(ty) || !cols.is_multiple_of(32) {
            return None;
        }
        if is_k(ty) {
            return Self::pack_k(ty, data, rows, cols);
        }
        let nb = cols / 32;
        let sb = src_block_bytes(ty);
        let row_bytes = nb * sb;
        if data.len() < rows.checked_mul(row_bytes)? {
            return None;
        }
        let gb = group_block_bytes(ty);
        let hdr = header_bytes(ty);
        let groups = rows.div_ceil(GROUP);
        let len = groups * nb * gb;
        let mut alloc = vec![0u8; len + 63];
        let off = alloc.as_ptr().align_offset(64).min(63);
        let out = &mut alloc[off..off + len];
        for r in 0..rows {
            let (g, j) = (r / GROUP, r % GROUP);
            for b in 0..nb {
                let src = &data[r * row_bytes + b * sb..r * row_bytes + (b + 1) * sb];
                let dst = &mut out[(g * nb + b) * gb..(g * nb + b + 1) * gb];
                dst[2 * j..2 * j + 2].copy_from_slice(&src[..2]);
                let qs = match ty {
                    GgmlType::Q4_1 => {
                        dst[32 + 2 * j..32 + 2 * j + 2].copy_from_slice(&src[2..4]);
                        &src[4..20]
                    }
                    _ => &src[2..],
                };
                for (c, four) in qs.chunks_exact(4).enumerate() {
                    let o = hdr + 64 * c + 4 * j;
                    dst[o..o + 4].copy_from_slice(four);
                }
            }
        }
        Some(PackedMatrix {
            ty,
            rows,
            cols,
            data: alloc,
            off,
        })
    }

    /// [`Self::pack`] for the K-quants (`cols` a multiple of 256).
    fn pack_k(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Option<Self> {
        use crate::quant::{QK_K, k_subblocks};
        if !cols.is_multiple_of(QK_K) {
            return None;
        }
        let nsb = cols / QK_K;
        let sbb = ty.block_bytes() as usize;
        let row_bytes = nsb * sbb;
        if data.len() < rows.checked_mul(row_bytes)? {
            return None;
        }
        let nb = cols / 32;
        let gb = group_block_bytes(ty);
        let groups = rows.div_ceil(GROUP);
        let len = groups * nb * gb;
        let mut alloc = vec![0u8; len + 63];
        let off = alloc.as_ptr().align_offset(64).min(63);
        let out = &mut alloc[off..off + len];
        for r in 0..rows {
            let (g, j) = (r / GROUP, r % GROUP);
            for sb in 0..nsb {
                let src = &data[r * row_bytes + sb * sbb..r * row_bytes + (sb + 1) * sbb];
                for (s, sub) in k_subblocks(ty, src).iter().enumerate() {
                    let b = sb * 8 + s;
                    let dst = &mut out[(g * nb + b) * gb..(g * nb + b + 1) * gb];
                    let second = if ty == GgmlType::Q6_K {
                        sub.scale[1]
                    } else {
                        sub.min
                    };
                    dst[4 * j..4 * j + 4].copy_from_slice(&sub.scale[0].to_le_bytes());
                    dst[64 + 4 * j..64 + 4 * j + 4].copy_from_slice(&second.to_le_bytes());
                    if ty == GgmlType::Q4_K {
                        for c in 0..4 {
                            for k in 0..4 {
                                let (lo, hi) =
                                    (sub.q[4 * c + k] as u8, sub.q[16 + 4 * c + k] as u8);
                                dst[128 + 64 * c + 4 * j + k] = (lo & 0xf) | (hi << 4);
                            }
                        }
                    } else {
                        for i in 0..8 {
                            for k in 0..4 {
                                dst[128 + 64 * i + 4 * j + k] = sub.q[4 * i + k] as u8;
                            }
                        }
                    }
                }
            }
        }
        Some(PackedMatrix {
            ty,
            rows,
            cols,
            data: alloc,
            off,
        })
    }

    /// Row `r`, 32-value block `b` of a K-quant matrix in the uniform form of
    /// [`crate::quant::KSub`].
    fn k_sub(&self, r: usize, b: usize) -> crate::quant::KSub {
        let (g, j) = (r / GROUP, r % GROUP);
        let gb = group_block_bytes(self.ty);
        let src = &self.group(g)[b * gb..(b + 1) * gb];
        let d = rf32(src, j);
        let second = rf32(&src[64..], j);
        let mut sub = crate::quant::KSub {
            scale: [d, d],
            min: second,
            q: [0; 32],
        };
        if self.ty == GgmlType::Q6_K {
            sub.scale[1] = second;
            sub.min = 0.0;
        }
        if self.ty == GgmlType::Q4_K {
            for c in 0..4 {
                for k in 0..4 {
                    let v = src[128 + 64 * c + 4 * j + k];
                    sub.q[4 * c + k] = (v & 0xf) as i8;
                    sub.q[16 + 4 * c + k] = (v >> 4) as i8;
                }
            }
        } else {
            for i in 0..8 {
                for k in 0..4 {
                    sub.q[4 * i + k] = src[128 + 64 * i + 4 * j + k] as i8;
                }
            }
        }
        sub
    }

    /// Weight type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Row groups (`rows / 8` rounded up).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }
    fn nb(&self) -> usize {
        self.cols / 32
    }
    /// The bytes of group `g` (all its blocks).
    fn group(&self, g: usize) -> &[u8] {
        let len = self.nb() * group_block_bytes(self.ty);
        &self.data[self.off + g * len..self.off + (g + 1) * len]
    }

    /// Row `r`, block `b` as the original GGUF block bytes (written into `out`, returns its
    /// length).
    fn src_block(&self, r: usize, b: usize, out: &mut [u8; 34]) -> usize {
        let (g, j) = (r / GROUP, r % GROUP);
        let gb = group_block_bytes(self.ty);
        let hdr = header_bytes(self.ty);
        let src = &self.group(g)[b * gb..(b + 1) * gb];
        out[..2].copy_from_slice(&src[2 * j..2 * j + 2]);
        let (start, len) = match self.ty {
            GgmlType::Q4_0 => (2, 18),
            GgmlType::Q4_1 => {
                out[2..4].copy_from_slice(&src[32 + 2 * j..32 + 2 * j + 2]);
                (4, 20)
            }
            _ => (2, 34),
        };
        for (c, four) in out[start..len].chunks_exact_mut(4).enumerate() {
            let o = hdr + 64 * c + 4 * j;
            four.copy_from_slice(&src[o..o + 4]);
        }
        len
    }

    /// Dequantizes row `r` (< rows) into `out` (`cols` values).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        if is_k(self.ty) {
            for (b, o) in out.chunks_exact_mut(32).take(self.nb()).enumerate() {
                let sub = self.k_sub(r, b);
                for (k, v) in o.iter_mut().enumerate() {
                    *v = sub.scale[k / 16] * sub.q[k] as f32 + sub.min;
                }
            }
            return;
        }
        let mut blk = [0u8; 34];
        for (b, o) in out.chunks_exact_mut(32).take(self.nb()).enumerate() {
            let n = self.src_block(r, b, &mut blk);
            // The block is complete by construction; an error would be a bug, leave zeros.
            let _ = crate::quant::dequantize(self.ty, &blk[..n], o);
        }
    }
}

/// Dot products of the 16 rows of group `g` with `T` activation vectors (each `cols / 32`
/// blocks): `out[t][j] = row(16g + j) . x[t]` (padding rows give 0).
#[inline]
pub fn dot_group<const T: usize>(
    m: &PackedMatrix,
    g: usize,
    x: [&[BlockQ8]; T],
) -> [[f32; GROUP]; T] {
    #[cfg(target_arch = "x86_64")]
    match simd::level() {
        // SAFETY: the CPU features of each level were detected at run time.
        simd::Level::Avx512 => return unsafe { simd::dot_group_avx512::<T>(m, g, x) },
        // SAFETY: as above.
        simd::Level::Vnni => return unsafe { simd::dot_group_vnni::<T>(m, g, x) },
        // SAFETY: as above.
        simd::Level::Avx2 => return unsafe { simd::dot_group_avx2::<T>(m, g, x) },
        simd::Level::None => {}
    }
    x.map(|xs| dot_group_scalar(m, g, xs))
}

/// Whether [`dot_group`] with 8 activation vectors beats two calls with 4 on this CPU (it
/// does when 32 vector registers hold the 8 accumulators: AVX-512; measured with the 256-bit
/// kernel on SmolLM2 Q4_1 prefill, 1 thread, medians of 9: 444 vs 390 tok/s with AVX-512VL's
/// registers, 377 vs 390 without).
pub fn wide_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd::level() == simd::Level::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Portable definition of [`dot_group`] for one activation vector.
pub fn dot_group_scalar(m: &PackedMatrix, g: usize, x: &[BlockQ8]) -> [f32; GROUP] {
    let mut out = [0.0f32; GROUP];
    let nb = m.nb().min(x.len());
    if is_k(m.ty) {
        for (j, o) in out.iter_mut().enumerate() {
            let r = g * GROUP + j;
            if r >= m.rows {
                break;
            }
            let mut acc = 0.0f32;
            for (b, y) in x.iter().enumerate().take(nb) {
                let sub = m.k_sub(r, b);
                let mut s = [0i32; 2];
                for k in 0..32 {
                    s[k / 16] += sub.q[k] as i32 * y.qs[k] as i32;
                }
                acc +=
                    (sub.scale[0] * s[0] as f32 + sub.scale[1] * s[1] as f32) * y.d + sub.min * y.s;
            }
            *o = acc;
        }
        return out;
    }
    let mut blk = [0u8; 34];
    for (j, o) in out.iter_mut().enumerate() {
        let r = g * GROUP + j;
        if r >= m.rows {
            break;
        }
        let mut acc = 0.0f32;
        for (b, y) in x.iter().enumerate().take(nb) {
            let n = m.src_block(r, b, &mut blk);
            acc += crate::kernels::dot_q_scalar(m.ty, &blk[..n], std::slice::from_ref(y));
        }
        *o = acc;
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! AVX2 (+ optional AVX-VNNI) kernels, which take a 16-row group as two 8-row halves
    //! (256-bit vectors), and the AVX-512 VNNI kernel (one row per 32-bit lane of a 512-bit
    //! vector).
    use super::{GROUP, PackedMatrix, group_block_bytes, header_bytes};
    use crate::gguf::GgmlType;
    use crate::kernels::BlockQ8;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Level {
        None,
        Avx2,
        Vnni,
        Avx512,
    }

    /// The best kernel level this CPU runs (`INFERENCE_NO_SIMD` forces scalar,
    /// `INFERENCE_NO_AVX512` at most AVX-VNNI, `INFERENCE_NO_VNNI` plain AVX2).
    pub fn level() -> Level {
        static L: OnceLock<Level> = OnceLock::new();
        *L.get_or_init(|| {
            if !crate::kernels::simd_available() || !is_x86_feature_detected!("f16c") {
                Level::None
            } else if avx512_detected() && std::env::var_os("INFERENCE_NO_AVX512").is_none() {
                Level::Avx512
            } else if is_x86_feature_detected!("avxvnni")
                && std::env::var_os("INFERENCE_NO_VNNI").is_none()
            {
                Level::Vnni
            } else {
                Level::Avx2
            }
        })
    }

    /// Software prefetch distance in bytes (measured on SmolLM2 Q4_1 decode, 1 thread: no
    /// prefetch 50.8 tok/s, 1 KiB 61.5 / 53.9, 4 KiB 60.2, 8 KiB 60.8; medians of 5).
    const PREFETCH: usize = 4096;

    /// The features of [`dot_group_avx512`].
    pub fn avx512_detected() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;
    const Q4K: u8 = 3;
    const Q5K: u8 = 4;
    const Q6K: u8 = 5;

    /// `acc + sum over each 4-byte lane of a * b` (u8 x i8 -> i32 lanes).
    #[inline(always)]
    unsafe fn dp<const VNNI: bool>(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: only inlined into functions with avx2 (+ avxvnni when VNNI) enabled.
        unsafe {
            if VNNI {
                _mm256_dpbusd_avx_epi32(acc, a, b)
            } else {
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
                _mm256_add_epi32(acc, p)
            }
        }
    }

    /// Two u4 x i8 lane dot products added to `acc` (without VNNI the i16 pair sums are added
    /// before widening: at most 2 * 2 * 15 * 127, no overflow).
    #[inline(always)]
    unsafe fn dp2_u4<const VNNI: bool>(
        acc: __m256i,
        a: __m256i,
        ya: __m256i,
        b: __m256i,
        yb: __m256i,
    ) -> __m256i {
        // SAFETY: only inlined into functions with avx2 (+ avxvnni when VNNI) enabled.
        unsafe {
            if VNNI {
                _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, a, ya), b, yb)
            } else {
                let p = _mm256_add_epi16(_mm256_maddubs_epi16(a, ya), _mm256_maddubs_epi16(b, yb));
                _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
            }
        }
    }

    /// i8 x i8 lane dot product added to `acc`. With VNNI `a` arrives biased to u8 (`+128`, the
    /// bias is removed through the block sums, see `kernel`); without, the abs/sign idiom.
    #[inline(always)]
    unsafe fn dp_i8<const VNNI: bool>(acc: __m256i, a: __m256i, y: __m256i) -> __m256i {
        // SAFETY: only inlined into functions with avx2 (+ avxvnni when VNNI) enabled.
        unsafe {
            if VNNI {
                _mm256_dpbusd_avx_epi32(acc, a, y)
            } else {
                dp::<false>(acc, _mm256_sign_epi8(a, a), _mm256_sign_epi8(y, a))
            }
        }
    }

    /// Group-block bytes, header bytes and the number of blocks both the group data and every
    /// activation vector hold, for kernel type `K`.
    #[inline(always)]
    fn block_layout<const K: u8, const T: usize>(
        gdata: &[u8],
        x: &[&[BlockQ8]; T],
    ) -> (usize, usize, usize) {
        let ty = match K {
            Q4_0 => GgmlType::Q4_0,
            Q4_1 => GgmlType::Q4_1,
            Q4K => GgmlType::Q4_K,
            Q5K => GgmlType::Q5_K,
            Q6K => GgmlType::Q6_K,
            _ => GgmlType::Q8_0,
        };
        let gb = group_block_bytes(ty);
        let nb = x.iter().fold(gdata.len() / gb, |nb, xs| nb.min(xs.len()));
        (gb, header_bytes(ty), nb)
    }

    /// The 256-bit kernel for rows `8H..8H+8` of a group; `K` the weight type, `T` the
    /// activation vectors.
    #[inline(always)]
    unsafe fn kernel<const K: u8, const T: usize, const VNNI: bool, const H: usize>(
        gdata: &[u8],
        x: [&[BlockQ8]; T],
    ) -> [[f32; 8]; T] {
        let (gb, hdr, nb) = block_layout::<K, T>(gdata, &x);
        // SAFETY: every load below reads inside block `b < nb` of `gdata` (gb bytes: header +
        // values, offsets from the layout) or inside one `BlockQ8`; loadu has no alignment
        // requirement; the features are enabled by the callers.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); T];
            let mut accm = [_mm256_setzero_ps(); T];
            let mask = _mm256_set1_epi8(0x0f);
            let bias = _mm256_set1_epi8(-128);
            let base = gdata.as_ptr();
            for b in 0..nb {
                let p = base.add(b * gb);
                // The weights are one sequential stream (groups are contiguous): prefetch a
                // few KiB ahead, a block's worth of cache lines per block (prefetches of
                // addresses past the end are harmless hints).
                if H == 0 {
                    for line in 0..gb.div_ceil(64) {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64 * line).cast());
                    }
                }
                // K-quants: f32 scales; the second header array is the offset (Q4_K, Q5_K)
                // or the scale of values 16..32 (Q6_K).
                let (d, d2) = if K >= Q4K {
                    (
                        _mm256_loadu_ps(p.add(32 * H).cast()),
                        _mm256_loadu_ps(p.add(64 + 32 * H).cast()),
                    )
                } else {
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * H).cast())),
                        _mm256_setzero_ps(),
                    )
                };
                // Per-block offset term: sum over values of (offset) * y, as `m * y.s`.
                let m = match K {
                    Q4_1 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(32 + 16 * H).cast())),
                    Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
                    Q4K | Q5K => d2,
                    Q6K => _mm256_setzero_ps(),
                    _ => _mm256_mul_ps(d, _mm256_set1_ps(if VNNI { -128.0 } else { 0.0 })),
                };
                let q = p.add(hdr + 32 * H);
                // w[i] pairs with activation bytes 4i..4i+4.
                let mut w = [_mm256_setzero_si256(); 8];
                // Q6_K: |w| (the signs go onto the activations).
                let mut wa = [_mm256_setzero_si256(); 8];
                if K == Q8_0 || K == Q5K || K == Q6K {
                    for (i, wi) in w.iter_mut().enumerate() {
                        let v = _mm256_loadu_si256(q.add(64 * i).cast());
                        *wi = if VNNI && K == Q8_0 {
                            _mm256_xor_si256(v, bias)
                        } else {
                            v
                        };
                        if K == Q6K {
                            wa[i] = _mm256_sign_epi8(v, v);
                        }
                    }
                } else {
                    for c in 0..4 {
                        let v = _mm256_loadu_si256(q.add(64 * c).cast());
                        w[c] = _mm256_and_si256(v, mask);
                        w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    }
                }
                for t in 0..T {
                    let y = x[t].get_unchecked(b);
                    let yp = y.qs.as_ptr();
                    let yv = |i: usize| {
                        _mm256_set1_epi32(std::ptr::read_unaligned(yp.add(4 * i).cast::<i32>()))
                    };
                    // Two independent chains.
                    let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    if K == Q6K {
                        // Values 0..16 and 16..32 have their own scales: one sum each.
                        for i in 0..4 {
                            s0 = dp::<VNNI>(s0, wa[i], _mm256_sign_epi8(yv(i), w[i]));
                            s1 = dp::<VNNI>(s1, wa[i + 4], _mm256_sign_epi8(yv(i + 4), w[i + 4]));
                        }
                        let yd = _mm256_set1_ps(y.d);
                        acc[t] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(d, yd), acc[t]);
                        accm[t] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(d2, yd), accm[t]);
                        continue;
                    }
                    if K == Q5K {
                        for i in (0..8).step_by(2) {
                            s0 = dp::<VNNI>(s0, w[i], yv(i));
                            s1 = dp::<VNNI>(s1, w[i + 1], yv(i + 1));
                        }
                    } else if K == Q8_0 {
                        for i in (0..8).step_by(2) {
                            s0 = dp_i8::<VNNI>(s0, w[i], yv(i));
                            s1 = dp_i8::<VNNI>(s1, w[i + 1], yv(i + 1));
                        }
                    } else {
                        s0 = dp2_u4::<VNNI>(s0, w[0], yv(0), w[1], yv(1));
                        s1 = dp2_u4::<VNNI>(s1, w[2], yv(2), w[3], yv(3));
                        s0 = dp2_u4::<VNNI>(s0, w[4], yv(4), w[5], yv(5));
                        s1 = dp2_u4::<VNNI>(s1, w[6], yv(6), w[7], yv(7));
                    }
                    let h = _mm256_add_epi32(s0, s1);
                    let dy = _mm256_mul_ps(d, _mm256_set1_ps(y.d));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), dy, acc[t]);
                    if K != Q8_0 || VNNI {
                        // A second accumulator (shorter dependency chain). Every activation
                        // vector gets its own pair, whatever `T` is, so a row's sum is
                        // bit-identical in a tile and alone (batch independence).
                        accm[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(y.s), accm[t]);
                    }
                }
            }
            let mut out = [[0.0f32; 8]; T];
            for t in 0..T {
                _mm256_storeu_ps(out[t].as_mut_ptr(), _mm256_add_ps(acc[t], accm[t]));
            }
            out
        }
    }

    /// Both halves of the group through [`kernel`].
    #[inline(always)]
    unsafe fn dispatch<const T: usize, const VNNI: bool>(
        m: &PackedMatrix,
        g: usize,
        x: [&[BlockQ8]; T],
    ) -> [[f32; GROUP]; T] {
        let gd = m.group(g);
        // SAFETY: the callers enable the features `kernel` needs.
        let (lo, hi) = unsafe {
            match m.ty {
                GgmlType::Q4_0 => (
                    kernel::<Q4_0, T, VNNI, 0>(gd, x),
                    kernel::<Q4_0, T, VNNI, 1>(gd, x),
                ),
                GgmlType::Q4_1 => (
                    kernel::<Q4_1, T, VNNI, 0>(gd, x),
                    kernel::<Q4_1, T, VNNI, 1>(gd, x),
                ),
                GgmlType::Q4_K => (
                    kernel::<Q4K, T, VNNI, 0>(gd, x),
                    kernel::<Q4K, T, VNNI, 1>(gd, x),
                ),
                GgmlType::Q5_K => (
                    kernel::<Q5K, T, VNNI, 0>(gd, x),
                    kernel::<Q5K, T, VNNI, 1>(gd, x),
                ),
                GgmlType::Q6_K => (
                    kernel::<Q6K, T, VNNI, 0>(gd, x),
                    kernel::<Q6K, T, VNNI, 1>(gd, x),
                ),
                _ => (
                    kernel::<Q8_0, T, VNNI, 0>(gd, x),
                    kernel::<Q8_0, T, VNNI, 1>(gd, x),
                ),
            }
        };
        let mut out = [[0.0f32; GROUP]; T];
        for t in 0..T {
            out[t][..8].copy_from_slice(&lo[t]);
            out[t][8..].copy_from_slice(&hi[t]);
        }
        out
    }

    /// AVX2 + AVX-VNNI version of [`super::dot_group`].
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub fn dot_group_vnni<const T: usize>(
        m: &PackedMatrix,
        g: usize,
        x: [&[BlockQ8]; T],
    ) -> [[f32; GROUP]; T] {
        // SAFETY: this function's features are what `dispatch::<_, true>` needs.
        unsafe { dispatch::<T, true>(m, g, x) }
    }

    /// AVX2 version of [`super::dot_group`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_group_avx2<const T: usize>(
        m: &PackedMatrix,
        g: usize,
        x: [&[BlockQ8]; T],
    ) -> [[f32; GROUP]; T] {
        // SAFETY: this function's features are what `dispatch::<_, false>` needs.
        unsafe { dispatch::<T, false>(m, g, x) }
    }

    /// The 512-bit kernel: lane `j` of every vector is row `j` of the group.
    #[inline(always)]
    unsafe fn kernel512<const K: u8, const T: usize>(
        gdata: &[u8],
        x: [&[BlockQ8]; T],
    ) -> [[f32; GROUP]; T] {
        let (gb, hdr, nb) = block_layout::<K, T>(gdata, &x);
        // SAFETY: as in `kernel`: every load reads inside block `b < nb` of `gdata` or inside
        // one `BlockQ8`; the caller enables AVX-512F/BW/VNNI.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); T];
            let mut accm = [_mm512_setzero_ps(); T];
            let mask = _mm512_set1_epi8(0x0f);
            let bias = _mm512_set1_epi8(-128);
            let base = gdata.as_ptr();
            for b in 0..nb {
                let p = base.add(b * gb);
                for line in 0..gb.div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64 * line).cast());
                }
                let (d, d2) = if K >= Q4K {
                    (_mm512_loadu_ps(p.cast()), _mm512_loadu_ps(p.add(64).cast()))
                } else {
                    (
                        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
                        _mm512_setzero_ps(),
                    )
                };
                let m = match K {
                    Q4_1 => _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32).cast())),
                    Q4_0 => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
                    Q4K | Q5K => d2,
                    Q6K => _mm512_setzero_ps(),
                    _ => _mm512_mul_ps(d, _mm512_set1_ps(-128.0)),
                };
                let q = p.add(hdr);
                let mut w = [_mm512_setzero_si512(); 8];
                // Q6_K: `w` holds |w|, `neg` the lanes whose weight is negative.
                let mut neg: [__mmask64; 8] = [0; 8];
                if K == Q8_0 || K == Q5K || K == Q6K {
                    for (i, wi) in w.iter_mut().enumerate() {
                        let v = _mm512_loadu_si512(q.add(64 * i).cast());
                        *wi = match K {
                            Q8_0 => _mm512_xor_si512(v, bias),
                            Q6K => {
                                neg[i] = _mm512_movepi8_mask(v);
                                _mm512_abs_epi8(v)
                            }
                            _ => v,
                        };
                    }
                } else {
                    for c in 0..4 {
                        let v = _mm512_loadu_si512(q.add(64 * c).cast());
                        w[c] = _mm512_and_si512(v, mask);
                        w[c + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
                    }
                }
                for t in 0..T {
                    let y = x[t].get_unchecked(b);
                    let yp = y.qs.as_ptr();
                    let yv = |i: usize| {
                        _mm512_set1_epi32(std::ptr::read_unaligned(yp.add(4 * i).cast::<i32>()))
                    };
                    let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                    if K == Q6K {
                        let zero = _mm512_setzero_si512();
                        let ys = |i: usize| {
                            let v = yv(i);
                            _mm512_mask_sub_epi8(v, neg[i], zero, v)
                        };
                        for i in 0..4 {
                            s0 = _mm512_dpbusd_epi32(s0, w[i], ys(i));
                            s1 = _mm512_dpbusd_epi32(s1, w[i + 4], ys(i + 4));
                        }
                        let yd = _mm512_set1_ps(y.d);
                        acc[t] =
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(d, yd), acc[t]);
                        accm[t] =
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(d2, yd), accm[t]);
                        continue;
                    }
                    for i in (0..8).step_by(2) {
                        s0 = _mm512_dpbusd_epi32(s0, w[i], yv(i));
                        s1 = _mm512_dpbusd_epi32(s1, w[i + 1], yv(i + 1));
                    }
                    let h = _mm512_add_epi32(s0, s1);
                    let dy = _mm512_mul_ps(d, _mm512_set1_ps(y.d));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), dy, acc[t]);
                    accm[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(y.s), accm[t]);
                }
            }
            let mut out = [[0.0f32; GROUP]; T];
            for t in 0..T {
                _mm512_storeu_ps(out[t].as_mut_ptr(), _mm512_add_ps(acc[t], accm[t]));
            }
            out
        }
    }

    /// AVX-512 VNNI version of [`super::dot_group`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub fn dot_group_avx512<const T: usize>(
        m: &PackedMatrix,
        g: usize,
        x: [&[BlockQ8]; T],
    ) -> [[f32; GROUP]; T] {
        let gd = m.group(g);
        // SAFETY: this function's features are what `kernel512` needs.
        unsafe {
            match m.ty {
                GgmlType::Q4_0 => kernel512::<Q4_0, T>(gd, x),
                GgmlType::Q4_1 => kernel512::<Q4_1, T>(gd, x),
                GgmlType::Q4_K => kernel512::<Q4K, T>(gd, x),
                GgmlType::Q5_K => kernel512::<Q5K, T>(gd, x),
                GgmlType::Q6_K => kernel512::<Q6K, T>(gd, x),
                _ => kernel512::<Q8_0, T>(gd, x),
            }
        }
    }

    const _: () = assert!(GROUP == 16);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::kernels::tests::data;
    use crate::kernels::{dot_q_scalar, quantize_q8};
    use crate::quant::quantize;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-3 * (1.0 + b.abs())
    }

    /// Kernel levels this CPU runs (each is tested, not only the best one).
    fn levels() -> Vec<&'static str> {
        let mut v = vec!["scalar"];
        #[cfg(target_arch = "x86_64")]
        {
            if simd::level() != simd::Level::None {
                v.push("avx2");
            }
            if is_x86_feature_detected!("avxvnni") && simd::level() != simd::Level::None {
                v.push("vnni");
            }
            if simd::avx512_detected() && simd::level() != simd::Level::None {
                v.push("avx512");
            }
        }
        v
    }

    type Dots = ([[f32; GROUP]; 1], [[f32; GROUP]; 4]);

    fn dots(level: &str, p: &PackedMatrix, g: usize, xs: &[Vec<BlockQ8>]) -> Dots {
        let four = [&xs[1][..], &xs[2], &xs[3], &xs[4]];
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: listed by `levels` only when the CPU has the features.
            "avx2" => unsafe {
                (
                    simd::dot_group_avx2::<1>(p, g, [&xs[0]]),
                    simd::dot_group_avx2::<4>(p, g, four),
                )
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            "vnni" => unsafe {
                (
                    simd::dot_group_vnni::<1>(p, g, [&xs[0]]),
                    simd::dot_group_vnni::<4>(p, g, four),
                )
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            "avx512" => unsafe {
                (
                    simd::dot_group_avx512::<1>(p, g, [&xs[0]]),
                    simd::dot_group_avx512::<4>(p, g, four),
                )
            },
            _ => (
                [dot_group_scalar(p, g, &xs[0])],
                four.map(|x| dot_group_scalar(p, g, x)),
            ),
        }
    }

    #[test]
    fn pack_roundtrip_and_dots_match_row_kernels() {
        let legacy: &[(usize, usize)] = &[
            (1, 32),
            (8, 64),
            (13, 96),
            (17, 32),
            (24, 256),
            (48, 64),
            (35, 576),
        ];
        let kq: &[(usize, usize)] = &[(1, 256), (13, 512), (17, 256), (35, 768)];
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            let shapes = if is_k(ty) { kq } else { legacy };
            for &(rows, cols) in shapes {
                let w = data(rows * cols, rows as u32);
                let bytes = quantize(ty, &w).unwrap();
                let row_bytes = bytes.len() / rows;
                let p = PackedMatrix::pack(ty, &bytes, rows, cols).unwrap();
                assert_eq!(p.groups(), rows.div_ceil(GROUP));
                // Dequantized rows equal the original layout's.
                let mut a = vec![0.0; cols];
                let mut b = vec![0.0; cols];
                for r in 0..rows {
                    p.row_f32(r, &mut a);
                    crate::quant::dequantize(
                        ty,
                        &bytes[r * row_bytes..(r + 1) * row_bytes],
                        &mut b,
                    )
                    .unwrap();
                    assert_eq!(a, b, "{ty} {rows}x{cols} row {r}");
                }
                let xs: Vec<Vec<BlockQ8>> = (0..5)
                    .map(|s| {
                        let mut q = vec![BlockQ8::default(); cols / 32];
                        quantize_q8(&data(cols, 100 + s), &mut q);
                        q
                    })
                    .collect();
                for g in 0..p.groups() {
                    let idx = [0, 1, 2, 3, 4, 0, 2, 4];
                    let eight = dot_group::<8>(&p, g, idx.map(|i| &xs[i][..]));
                    for (k, &i) in idx.iter().enumerate() {
                        let want = dot_group_scalar(&p, g, &xs[i]);
                        for j in 0..GROUP {
                            assert!(close(eight[k][j], want[j]), "{ty} 8x g{g} t{k} r{j}");
                        }
                    }
                }
                for (level, g) in levels()
                    .into_iter()
                    .flat_map(|l| (0..p.groups()).map(move |g| (l, g)))
                {
                    let (one, four) = dots(level, &p, g, &xs);
                    for j in 0..GROUP {
                        let r = g * GROUP + j;
                        for (t, got) in [
                            (0, one[0][j]),
                            (1, four[0][j]),
                            (2, four[1][j]),
                            (3, four[2][j]),
                            (4, four[3][j]),
                        ] {
                            let want = if r < rows {
                                dot_q_scalar(ty, &bytes[r * row_bytes..(r + 1) * row_bytes], &xs[t])
                            } else {
                                0.0
                            };
                            let scalar = dot_group_scalar(&p, g, &xs[t])[j];
                            assert!(
                                close(scalar, want),
                                "{ty} {rows}x{cols} r{r} t{t}: {scalar} vs {want}"
                            );
                            assert!(
                                close(got, want),
                                "{level} {ty} {rows}x{cols} r{r} t{t}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// [`dot_group`] at one kernel level with `T` activation vectors.
    fn tile<const T: usize>(
        level: &str,
        p: &PackedMatrix,
        g: usize,
        x: [&[BlockQ8]; T],
    ) -> [[f32; GROUP]; T] {
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: listed by `levels` only when the CPU has the features.
            "avx2" => unsafe { simd::dot_group_avx2::<T>(p, g, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            "vnni" => unsafe { simd::dot_group_vnni::<T>(p, g, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            "avx512" => unsafe { simd::dot_group_avx512::<T>(p, g, x) },
            _ => x.map(|x| dot_group_scalar(p, g, x)),
        }
    }

    /// Batch independence: at every kernel level, a row's dot products are bit-identical
    /// whether its activation vector runs alone (the decode kernel), in a tile of 2, 3, 4 or 8,
    /// and wherever it sits in the tile.
    #[test]
    fn tiles_are_bit_identical_to_one_row() {
        for (ty, cols) in [
            (GgmlType::Q4_0, 576),
            (GgmlType::Q4_1, 576),
            (GgmlType::Q8_0, 576),
            (GgmlType::Q4_K, 768),
            (GgmlType::Q5_K, 768),
            (GgmlType::Q6_K, 768),
        ] {
            let rows = 35;
            let bytes = quantize(ty, &data(rows * cols, 3)).unwrap();
            let p = PackedMatrix::pack(ty, &bytes, rows, cols).unwrap();
            let xs: Vec<Vec<BlockQ8>> = (0..8)
                .map(|s| {
                    // Activations of different magnitudes, as rows of different sequences.
                    let x: Vec<f32> = data(cols, 200 + s)
                        .iter()
                        .map(|v| v * (1 + s) as f32)
                        .collect();
                    let mut q = vec![BlockQ8::default(); cols / 32];
                    quantize_q8(&x, &mut q);
                    q
                })
                .collect();
            let x = |i: usize| &xs[i % 8][..];
            for level in levels() {
                for g in 0..p.groups() {
                    let alone: Vec<[f32; GROUP]> =
                        (0..8).map(|i| tile::<1>(level, &p, g, [x(i)])[0]).collect();
                    let bits = |v: &[f32; GROUP]| v.map(f32::to_bits);
                    let what = |t: usize, k: usize, i: usize| {
                        format!("{level} {ty} g{g}: tile of {t}, position {k}, vector {i}")
                    };
                    for shift in 0..8 {
                        let two = tile::<2>(level, &p, g, std::array::from_fn(|k| x(shift + k)));
                        let three = tile::<3>(level, &p, g, std::array::from_fn(|k| x(shift + k)));
                        let four = tile::<4>(level, &p, g, std::array::from_fn(|k| x(shift + k)));
                        let eight = tile::<8>(level, &p, g, std::array::from_fn(|k| x(shift + k)));
                        for (t, out) in [
                            (2, &two[..]),
                            (3, &three[..]),
                            (4, &four[..]),
                            (8, &eight[..]),
                        ] {
                            for (k, v) in out.iter().enumerate() {
                                let i = (shift + k) % 8;
                                assert_eq!(bits(v), bits(&alone[i]), "{}", what(t, k, i));
                            }
                        }
                    }
                    assert!(alone.iter().any(|v| v.iter().any(|&d| d != 0.0)));
                }
            }
        }
    }

    #[test]
    fn k_pack_keeps_the_file_values() {
        // Arbitrary file bytes (not from our quantizer): the packed rows equal the reference
        // dequantization exactly.
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            let (rows, cols) = (19, 512);
            let bytes = crate::quant::tests::random_k_blocks(ty, rows * cols / 256, 11);
            let p = PackedMatrix::pack(ty, &bytes, rows, cols).unwrap();
            let row_bytes = bytes.len() / rows;
            let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
            for r in 0..rows {
                p.row_f32(r, &mut a);
                crate::quant::dequantize(ty, &bytes[r * row_bytes..(r + 1) * row_bytes], &mut b)
                    .unwrap();
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                        "{ty} row {r}: {x} vs {y}"
                    );
                }
            }
        }
        // K-quant rows must be whole super-blocks.
        let bytes = quantize(GgmlType::Q4_K, &data(512, 1)).unwrap();
        assert!(PackedMatrix::pack(GgmlType::Q4_K, &bytes, 2, 256).is_some());
        assert!(PackedMatrix::pack(GgmlType::Q4_K, &bytes, 4, 128).is_none());
        assert!(PackedMatrix::pack(GgmlType::Q4_K, &bytes, 3, 256).is_none());
    }

    #[test]
    fn pack_rejects_bad_shapes() {
        let bytes = quantize(GgmlType::Q4_1, &data(64, 1)).unwrap();
        assert!(PackedMatrix::pack(GgmlType::Q4_1, &bytes, 2, 48).is_none());
        assert!(PackedMatrix::pack(GgmlType::Q4_1, &bytes, 3, 32).is_none());
        assert!(PackedMatrix::pack(GgmlType::F32, &bytes, 1, 32).is_none());
    }
}
