//! Scalar reference (de)quantization for every supported ggml type.
//!
//! These are the definitions other code is checked against (the CPU fast paths and the CUDA
//! kernels). Block layouts (little endian):
//! - `Q4_0` (18 bytes / 32 elements): f16 `d`, 16 bytes of nibbles; byte `j` holds element `j`
//!   in its low nibble and element `j + 16` in its high nibble; `x = (q - 8) * d`.
//! - `Q4_1` (20 bytes / 32): f16 `d`, f16 `m`, 16 bytes as in Q4_0; `x = q * d + m`.
//! - `Q8_0` (34 bytes / 32): f16 `d`, 32 x i8; `x = q * d`.
//! - `F16`, `BF16`, `F32`: one element each.
//!
//! K-quants (super-blocks of 256 elements, [`QK_K`]):
//! - `Q4_K` (144 bytes): f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales and mins for the
//!   eight 32-element sub-blocks (see [`scale_min_k4`]), 128 bytes of nibbles. The values come in
//!   four 64-element chunks of 32 bytes: byte `l` of chunk `c` holds element `64c + l` in its low
//!   nibble (sub-block `2c`) and `64c + 32 + l` in its high nibble (sub-block `2c + 1`);
//!   `x = d * sc * q - dmin * m`.
//! - `Q5_K` (176 bytes): `d`, `dmin`, 12 scale bytes as Q4_K, 32 bytes `qh`, 128 bytes of low
//!   nibbles as Q4_K; bit `s` of `qh[l]` is the fifth bit of element `32s + l` (sub-block `s`);
//!   `x = d * sc * q - dmin * m` with `q` in 0..32.
//! - `Q6_K` (210 bytes): 128 bytes `ql` (low 4 bits), 64 bytes `qh` (high 2 bits), 16 i8
//!   scales (one per 16 elements), f16 `d` last. Two halves of 128 elements; in half `n`, for
//!   `l` in 0..32, element `128n + l + 32k` (k = 0..4) takes its low bits from `ql[64n + l]`
//!   (k = 0), `ql[64n + 32 + l]` (k = 1), their high nibbles (k = 2, 3), and its high bits from
//!   bits `2k..2k+2` of `qh[32n + l]`; `x = d * scale[e / 16] * (q - 32)`.
//! - `Q8_K` (292 bytes): f32 `d`, 256 x i8, 16 x i16 block sums (unused here); `x = q * d`.

use crate::gguf::GgmlType;

/// Errors from (de)quantization.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    /// The type has no implementation here.
    #[error(
        "tensor type {0} is not supported; use a model quantized as F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K or Q8_K"
    )]
    Unsupported(GgmlType),
    /// Byte/element count mismatch.
    #[error("{ty}: {bytes} bytes do not hold whole blocks for {elements} elements")]
    Size {
        /// Type.
        ty: GgmlType,
        /// Bytes given.
        bytes: usize,
        /// Elements requested.
        elements: usize,
    },
    /// A block whose scale is not a finite number (a damaged file).
    #[error(
        "{ty}: block {block} has a scale that is NaN or infinite; the file is damaged, download or re-quantize it"
    )]
    BadBlock {
        /// Type.
        ty: GgmlType,
        /// Block index within the checked bytes.
        block: usize,
    },
}

/// Elements of a K-quant super-block.
pub const QK_K: usize = 256;

/// Converts IEEE binary16 bits to f32.
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if mant == 0 {
            sign
        } else {
            // Subnormal: value = mant * 2^-24.
            let v = mant as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
    } else if exp == 0x1f {
        sign | 0x7f80_0000 | (mant << 13)
    } else {
        sign | ((exp + 112) << 23) | (mant << 13)
    };
    f32::from_bits(bits)
}

/// Converts f32 to IEEE binary16 bits (round to nearest even; overflow to infinity).
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = mant | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rem = m & ((1 << shift) - 1);
        let mut r = m >> shift;
        if rem > half || (rem == half && (r & 1) == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (mant >> 13);
    let rem = mant & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && (r & 1) == 1) {
        r += 1; // may carry into the exponent, which is the correct rounding
    }
    sign | r as u16
}

/// Converts bfloat16 bits to f32.
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Converts f32 to bfloat16 bits (round to nearest even).
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

#[inline]
fn rd16(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn check(ty: GgmlType, bytes: &[u8], n: usize) -> Result<(), QuantError> {
    if !ty.is_supported() {
        return Err(QuantError::Unsupported(ty));
    }
    match ty.bytes_for(n as u64) {
        Some(b) if b == bytes.len() as u64 => Ok(()),
        _ => Err(QuantError::Size {
            ty,
            bytes: bytes.len(),
            elements: n,
        }),
    }
}

/// Dequantizes `bytes` (whole blocks of `ty`) into `out` (`out.len()` elements).
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    check(ty, bytes, out.len())?;
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(18)) {
                let d = f16_to_f32(rd16(b, 0));
                for j in 0..16 {
                    let q = b[2 + j];
                    o[j] = ((q & 0xf) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
                let d = f16_to_f32(rd16(b, 0));
                let m = f16_to_f32(rd16(b, 2));
                for j in 0..16 {
                    let q = b[4 + j];
                    o[j] = (q & 0xf) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = f16_to_f32(rd16(b, 0));
                for j in 0..32 {
                    o[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(144)) {
                let d = f16_to_f32(rd16(b, 0));
                let dmin = f16_to_f32(rd16(b, 2));
                let sc = &b[4..16];
                let qs = &b[16..144];
                for c in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * c, sc);
                    let (s2, m2) = scale_min_k4(2 * c + 1, sc);
                    let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                    for l in 0..32 {
                        let q = qs[32 * c + l];
                        o[64 * c + l] = d1 * (q & 0xf) as f32 - m1;
                        o[64 * c + 32 + l] = d2 * (q >> 4) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q5_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(176)) {
                let d = f16_to_f32(rd16(b, 0));
                let dmin = f16_to_f32(rd16(b, 2));
                let sc = &b[4..16];
                let qh = &b[16..48];
                let qs = &b[48..176];
                for c in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * c, sc);
                    let (s2, m2) = scale_min_k4(2 * c + 1, sc);
                    let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                    for l in 0..32 {
                        let q = qs[32 * c + l];
                        let h1 = ((qh[l] >> (2 * c)) & 1) << 4;
                        let h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
                        o[64 * c + l] = d1 * ((q & 0xf) | h1) as f32 - m1;
                        o[64 * c + 32 + l] = d2 * ((q >> 4) | h2) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(210)) {
                let d = f16_to_f32(rd16(b, 208));
                for n in 0..2 {
                    let ql = &b[64 * n..64 * n + 64];
                    let qh = &b[128 + 32 * n..128 + 32 * n + 32];
                    let sc = &b[192 + 8 * n..192 + 8 * n + 8];
                    for l in 0..32 {
                        let is = l / 16;
                        let h = qh[l];
                        let q = [
                            (ql[l] & 0xf) | ((h & 3) << 4),
                            (ql[l + 32] & 0xf) | (((h >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((h >> 4) & 3) << 4),
                            (ql[l + 32] >> 4) | (((h >> 6) & 3) << 4),
                        ];
                        for (k, &qk) in q.iter().enumerate() {
                            let s = sc[is + 2 * k] as i8 as f32;
                            o[128 * n + 32 * k + l] = d * s * (qk as i32 - 32) as f32;
                        }
                    }
                }
            }
        }
        GgmlType::Q8_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(292)) {
                let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = (b[4 + j] as i8) as f32 * d;
                }
            }
        }
        other => return Err(QuantError::Unsupported(other)),
    }
    Ok(())
}

/// Scale and min (6 bits each) of sub-block `j` (0..8) from the 12 packed bytes of a Q4_K /
/// Q5_K super-block: sub-blocks 0..4 keep them in the low 6 bits of bytes `j` and `j + 4`;
/// sub-blocks 4..8 in the nibbles of byte `j + 4` with their top 2 bits in the high bits of
/// bytes `j - 4` (scale) and `j` (min).
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The inverse of [`scale_min_k4`]: packs eight 6-bit scales and mins into 12 bytes.
pub fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 0xf) | ((m[j + 4] & 0xf) << 4);
    }
    q
}

/// One 32-element sub-block of a K-quant super-block in a uniform form:
/// `x[k] = scale[k / 16] * q[k] + min` (Q4_K/Q5_K: `q` unsigned, both scales equal; Q6_K: `q`
/// signed, `min` 0, one scale per 16 elements).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KSub {
    /// Scale of elements 0..16 and 16..32.
    pub scale: [f32; 2],
    /// Offset added to every element.
    pub min: f32,
    /// Quantized values (Q4_K 0..16, Q5_K 0..32, Q6_K -32..32).
    pub q: [i8; 32],
}

/// Splits one super-block of `ty` (Q4_K, Q5_K or Q6_K; `b` = its bytes) into its eight
/// 32-element sub-blocks, in element order.
pub fn k_subblocks(ty: GgmlType, b: &[u8]) -> [KSub; 8] {
    let mut out = [KSub::default(); 8];
    match ty {
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let d = f16_to_f32(rd16(b, 0));
            let dmin = f16_to_f32(rd16(b, 2));
            let sc = &b[4..16];
            let (qh, qs) = if ty == GgmlType::Q5_K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for (s, o) in out.iter_mut().enumerate() {
                let (sv, mv) = scale_min_k4(s, sc);
                let ds = d * sv as f32;
                o.scale = [ds, ds];
                o.min = -(dmin * mv as f32);
                let (c, hi) = (s / 2, s % 2 == 1);
                for l in 0..32 {
                    let byte = qs[32 * c + l];
                    let mut q = if hi { byte >> 4 } else { byte & 0xf };
                    if let Some(qh) = qh {
                        q |= ((qh[l] >> s) & 1) << 4;
                    }
                    o.q[l] = q as i8;
                }
            }
        }
        GgmlType::Q6_K => {
            let d = f16_to_f32(rd16(b, 208));
            for (s, o) in out.iter_mut().enumerate() {
                let (n, k) = (s / 4, s % 4);
                let ql = &b[64 * n..64 * n + 64];
                let qh = &b[128 + 32 * n..128 + 32 * n + 32];
                let sc = &b[192 + 8 * n..192 + 8 * n + 8];
                o.scale = [
                    d * (sc[2 * k] as i8) as f32,
                    d * (sc[2 * k + 1] as i8) as f32,
                ];
                for l in 0..32 {
                    let lo = match k {
                        0 => ql[l] & 0xf,
                        1 => ql[l + 32] & 0xf,
                        2 => ql[l] >> 4,
                        _ => ql[l + 32] >> 4,
                    };
                    let q = lo | (((qh[l] >> (2 * k)) & 3) << 4);
                    o.q[l] = (q as i32 - 32) as i8;
                }
            }
        }
        _ => {}
    }
    out
}

/// Checks that every block scale of `bytes` (whole blocks of `ty`) is a finite number: a
/// damaged K-quant or legacy block would otherwise turn whole rows into NaN silently.
pub fn check_blocks(ty: GgmlType, bytes: &[u8]) -> Result<(), QuantError> {
    let bb = ty.block_bytes() as usize;
    if ty.block_size() == 1 || !bytes.len().is_multiple_of(bb) {
        return Ok(());
    }
    let scale_offsets: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        GgmlType::Q8_K => {
            for (i, b) in bytes.chunks_exact(bb).enumerate() {
                let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                if !d.is_finite() {
                    return Err(QuantError::BadBlock { ty, block: i });
                }
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    for (i, b) in bytes.chunks_exact(bb).enumerate() {
        for &o in scale_offsets {
            let v = f16_to_f32(rd16(b, o));
            if !v.is_finite() {
                return Err(QuantError::BadBlock { ty, block: i });
            }
        }
    }
    Ok(())
}

/// Dequantizes into a new vector.
pub fn dequantize_vec(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, QuantError> {
    let mut v = vec![0.0; n];
    dequantize(ty, bytes, &mut v)?;
    Ok(v)
}

/// Quantizes `x` (length a multiple of the block size) to `ty` (reference algorithms as in
/// ggml for the 32-element types; the K-quants use a plain min/max fit per sub-block, a valid
/// encoding though not ggml's error-minimising search).
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>, QuantError> {
    if !ty.is_supported() {
        return Err(QuantError::Unsupported(ty));
    }
    let bs = ty.block_size() as usize;
    if !x.len().is_multiple_of(bs) {
        return Err(QuantError::Size {
            ty,
            bytes: 0,
            elements: x.len(),
        });
    }
    let mut out = Vec::with_capacity(x.len() / bs * ty.block_bytes() as usize);
    match ty {
        GgmlType::F32 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&f32_to_f16(*v).to_le_bytes())),
        GgmlType::BF16 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&f32_to_bf16(*v).to_le_bytes())),
        GgmlType::Q4_0 => {
            for b in x.chunks_exact(32) {
                // Signed value of largest magnitude maps to -8.
                let mut max = 0.0f32;
                for &v in b {
                    if v.abs() > max.abs() {
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
                for j in 0..16 {
                    let q0 = ((b[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                    let q1 = ((b[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        GgmlType::Q4_1 => {
            for b in x.chunks_exact(32) {
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
                out.extend_from_slice(&f32_to_f16(min).to_le_bytes());
                for j in 0..16 {
                    let q0 = (((b[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    let q1 = (((b[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        GgmlType::Q8_0 => {
            for b in x.chunks_exact(32) {
                let amax = b.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
                for &v in b {
                    out.push(((v * id).round() as i32).clamp(-128, 127) as i8 as u8);
                }
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let nmax = if ty == GgmlType::Q4_K { 15.0f32 } else { 31.0 };
            for x in x.chunks_exact(QK_K) {
                let mut scales = [0.0f32; 8];
                let mut mins = [0.0f32; 8];
                for (s, sub) in x.chunks_exact(32).enumerate() {
                    let lo = sub.iter().copied().fold(0.0f32, f32::min);
                    let hi = sub.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    scales[s] = (hi - lo) / nmax;
                    mins[s] = -lo;
                }
                let d = f16_to_f32(f32_to_f16(
                    scales.iter().copied().fold(0.0, f32::max) / 63.0,
                ));
                let dmin = f16_to_f32(f32_to_f16(mins.iter().copied().fold(0.0, f32::max) / 63.0));
                let q6 = |v: f32, unit: f32| {
                    if unit > 0.0 {
                        ((v / unit).round() as i32).clamp(0, 63) as u8
                    } else {
                        0
                    }
                };
                let sc: [u8; 8] = std::array::from_fn(|s| q6(scales[s], d));
                let mn: [u8; 8] = std::array::from_fn(|s| q6(mins[s], dmin));
                let mut q = [0u8; QK_K];
                for (i, (qi, &v)) in q.iter_mut().zip(x).enumerate() {
                    let s = i / 32;
                    let unit = d * sc[s] as f32;
                    if unit > 0.0 {
                        let r = ((v + dmin * mn[s] as f32) / unit).round() as i32;
                        *qi = r.clamp(0, nmax as i32) as u8;
                    }
                }
                out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
                out.extend_from_slice(&f32_to_f16(dmin).to_le_bytes());
                out.extend_from_slice(&pack_scale_min_k4(&sc, &mn));
                if ty == GgmlType::Q5_K {
                    let mut qh = [0u8; 32];
                    for (i, &v) in q.iter().enumerate() {
                        qh[i % 32] |= ((v >> 4) & 1) << (i / 32);
                    }
                    out.extend_from_slice(&qh);
                }
                for c in 0..4 {
                    for l in 0..32 {
                        out.push((q[64 * c + l] & 0xf) | ((q[64 * c + 32 + l] & 0xf) << 4));
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for x in x.chunks_exact(QK_K) {
                // Per 16 values: the value of largest magnitude maps to -32.
                let mut scales = [0.0f32; 16];
                for (s, sub) in x.chunks_exact(16).enumerate() {
                    let mut max = 0.0f32;
                    for &v in sub {
                        if v.abs() > max.abs() {
                            max = v;
                        }
                    }
                    scales[s] = max / -32.0;
                }
                let amax = scales.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d = f16_to_f32(f32_to_f16(amax / 127.0));
                let sc: [i8; 16] = std::array::from_fn(|s| {
                    if d > 0.0 {
                        ((scales[s] / d).round() as i32).clamp(-128, 127) as i8
                    } else {
                        0
                    }
                });
                let mut ql = [0u8; 128];
                let mut qh = [0u8; 64];
                for (e, &v) in x.iter().enumerate() {
                    let unit = d * sc[e / 16] as f32;
                    let q = if unit != 0.0 {
                        ((v / unit).round() as i32).clamp(-32, 31)
                    } else {
                        0
                    } + 32;
                    let q = q as u8;
                    let (n, k, l) = (e / 128, (e % 128) / 32, e % 32);
                    let li = 64 * n + l + if k % 2 == 1 { 32 } else { 0 };
                    ql[li] |= if k >= 2 { (q & 0xf) << 4 } else { q & 0xf };
                    qh[32 * n + l] |= (q >> 4) << (2 * k);
                }
                out.extend_from_slice(&ql);
                out.extend_from_slice(&qh);
                out.extend(sc.iter().map(|&v| v as u8));
                out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
            }
        }
        GgmlType::Q8_K => {
            for x in x.chunks_exact(QK_K) {
                let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<i8> = x
                    .iter()
                    .map(|&v| ((v * id).round() as i32).clamp(-128, 127) as i8)
                    .collect();
                out.extend_from_slice(&d.to_le_bytes());
                out.extend(q.iter().map(|&v| v as u8));
                for c in q.chunks_exact(16) {
                    let s: i16 = c.iter().map(|&v| v as i16).sum();
                    out.extend_from_slice(&s.to_le_bytes());
                }
            }
        }
        other => return Err(QuantError::Unsupported(other)),
    }
    Ok(out)
}

/// Reference dot product of one weight row (`ty`, `row.len()` bytes) with f32 `x`.
pub fn dot_ref(ty: GgmlType, row: &[u8], x: &[f32]) -> Result<f32, QuantError> {
    let w = dequantize_vec(ty, row, x.len())?;
    Ok(w.iter().zip(x).map(|(a, b)| a * b).sum())
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn f16_conversions() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if !f.is_nan() {
                assert_eq!(f32_to_f16(f), h, "h={h:#x}");
            }
        }
        assert_eq!(f32_to_f16(1e6), 0x7c00);
        assert_eq!(f32_to_f16(1.0 + 1.0 / 4096.0), 0x3c00); // ties to even
    }

    #[test]
    fn bf16_conversions() {
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc040), -3.0);
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(f32_to_bf16(-3.0), 0xc040);
    }

    #[test]
    fn q4_0_hand_block() {
        // d = 0.5, byte j = (lo = j) | (hi = 15 - j) << 4
        let mut b = vec![0x00, 0x38];
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let x = dequantize_vec(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(x[0], -4.0); // (0-8)*0.5
        assert_eq!(x[8], 0.0);
        assert_eq!(x[15], 3.5);
        assert_eq!(x[16], 3.5); // (15-8)*0.5
        assert_eq!(x[31], -4.0);
    }

    #[test]
    fn q4_1_hand_block() {
        // d = 2.0 (0x4000), m = -1.0 (0xbc00)
        let mut b = vec![0x00, 0x40, 0x00, 0xbc];
        for j in 0..16u8 {
            b.push(j | (3 << 4));
        }
        let x = dequantize_vec(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(x[0], -1.0);
        assert_eq!(x[5], 9.0);
        assert_eq!(x[16], 5.0);
        assert_eq!(x[31], 5.0);
    }

    #[test]
    fn q8_0_hand_block() {
        // d = 0.25 (0x3400)
        let mut b = vec![0x00, 0x34];
        for j in 0..32i8 {
            b.push((j - 16) as u8);
        }
        let x = dequantize_vec(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(x[0], -4.0);
        assert_eq!(x[16], 0.0);
        assert_eq!(x[31], 3.75);
    }

    #[test]
    fn float_types_hand() {
        let x = dequantize_vec(GgmlType::F16, &[0x00, 0x3c, 0x00, 0xc0], 2).unwrap();
        assert_eq!(x, vec![1.0, -2.0]);
        let x = dequantize_vec(GgmlType::BF16, &[0x80, 0x3f, 0x40, 0xc0], 2).unwrap();
        assert_eq!(x, vec![1.0, -3.0]);
        let x = dequantize_vec(GgmlType::F32, &1.5f32.to_le_bytes(), 1).unwrap();
        assert_eq!(x, vec![1.5]);
    }

    #[test]
    fn quantize_round_trip_error_bounds() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        for (ty, tol) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 2e-3),
            (GgmlType::BF16, 2e-2),
            (GgmlType::Q8_0, 0.02),
            (GgmlType::Q4_1, 0.14),
            (GgmlType::Q4_0, 0.26),
        ] {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len() as u64, ty.bytes_for(256).unwrap());
            let y = dequantize_vec(ty, &q, 256).unwrap();
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= tol, "{ty}: {a} vs {b}");
            }
        }
    }

    /// Scales `[1..=7, 63]`, mins `[0..=6, 63]`, packed by hand.
    const K4_SCALES: [u8; 12] = [1, 2, 3, 196, 0, 1, 2, 195, 0x45, 0x56, 0x67, 0xff];
    const K4_SC: [f32; 8] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 63.0];
    const K4_M: [f32; 8] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 63.0];

    #[test]
    fn k4_scale_packing() {
        let sc = [1, 2, 3, 4, 5, 6, 7, 63];
        let m = [0, 1, 2, 3, 4, 5, 6, 63];
        assert_eq!(pack_scale_min_k4(&sc, &m), K4_SCALES);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &K4_SCALES), (sc[j], m[j]), "sub-block {j}");
        }
    }

    #[test]
    fn q4_k_hand_block() {
        // d = 1.0, dmin = 0.5; chunk byte l = (l % 16) | (15 - l % 16) << 4.
        let mut b = vec![0x00, 0x3c, 0x00, 0x38];
        b.extend_from_slice(&K4_SCALES);
        for _c in 0..4 {
            for l in 0..32u8 {
                b.push((l % 16) | ((15 - l % 16) << 4));
            }
        }
        assert_eq!(b.len(), 144);
        let x = dequantize_vec(GgmlType::Q4_K, &b, 256).unwrap();
        assert_eq!(x[0], 0.0);
        assert_eq!(x[5], 5.0);
        assert_eq!(x[35], 2.0 * 12.0 - 0.5); // sub-block 1, low nibble 3 -> high 12
        assert_eq!(x[193], 7.0 - 3.0);
        assert_eq!(x[224], 63.0 * 15.0 - 31.5);
        for (i, &v) in x.iter().enumerate() {
            let (c, l) = (i / 64, i % 32);
            let s = i / 32;
            let q = if (i % 64) < 32 { l % 16 } else { 15 - l % 16 };
            assert_eq!(
                v,
                K4_SC[s] * q as f32 - 0.5 * K4_M[s],
                "element {i} (chunk {c})"
            );
        }
    }

    #[test]
    fn q5_k_hand_block() {
        // As the Q4_K block, plus qh[l] = 0b1010_1010 for even l: odd sub-blocks get +16 there.
        let mut b = vec![0x00, 0x3c, 0x00, 0x38];
        b.extend_from_slice(&K4_SCALES);
        for l in 0..32 {
            b.push(if l % 2 == 0 { 0b1010_1010 } else { 0 });
        }
        for _c in 0..4 {
            for l in 0..32u8 {
                b.push((l % 16) | ((15 - l % 16) << 4));
            }
        }
        assert_eq!(b.len(), 176);
        let x = dequantize_vec(GgmlType::Q5_K, &b, 256).unwrap();
        assert_eq!(x[32], 2.0 * (15.0 + 16.0) - 0.5);
        assert_eq!(x[33], 2.0 * 14.0 - 0.5);
        for (i, &v) in x.iter().enumerate() {
            let (s, l) = (i / 32, i % 32);
            let mut q = if s % 2 == 0 { l % 16 } else { 15 - l % 16 };
            if s % 2 == 1 && l % 2 == 0 {
                q += 16;
            }
            assert_eq!(v, K4_SC[s] * q as f32 - 0.5 * K4_M[s], "element {i}");
        }
    }

    #[test]
    fn q6_k_hand_block() {
        // ql[i] = i, qh[i] = 7 i (mod 256), scales[i] = i - 8, d = 0.5 (last).
        let mut b: Vec<u8> = (0..128u8).collect();
        b.extend((0..64u32).map(|i| (i * 7) as u8));
        b.extend((0..16i8).map(|i| (i - 8) as u8));
        b.extend_from_slice(&[0x00, 0x38]);
        assert_eq!(b.len(), 210);
        let x = dequantize_vec(GgmlType::Q6_K, &b, 256).unwrap();
        // Worked by hand from the layout in the module docs.
        assert_eq!(x[0], 0.5 * -8.0 * -32.0); // q 0
        assert_eq!(x[33], 0.5 * -6.0 * -15.0); // ql[33] & 15 = 1, (qh[1] >> 2) & 3 = 1: q 17
        assert_eq!(x[130], 0.0); // scale 8 - 8 = 0
        assert_eq!(x[200], 0.5 * 4.0 * -12.0); // ql[72] >> 4 = 4, (qh[40] >> 4) & 3 = 1: q 20
        assert_eq!(x[255], 0.5 * 7.0 * 7.0); // ql[127] >> 4 = 7, (qh[63] >> 6) & 3 = 2: q 39
    }

    #[test]
    fn q8_k_hand_block() {
        let mut b = 0.5f32.to_le_bytes().to_vec();
        b.extend((0..256i32).map(|i| (i - 128) as i8 as u8));
        b.extend_from_slice(&[0; 32]);
        let x = dequantize_vec(GgmlType::Q8_K, &b, 256).unwrap();
        assert_eq!(x[0], -64.0);
        assert_eq!(x[128], 0.0);
        assert_eq!(x[255], 63.5);
    }

    /// Bytes of `blocks` random-looking K-quant blocks with sane (finite, small) scales.
    pub(crate) fn random_k_blocks(ty: GgmlType, blocks: usize, seed: u32) -> Vec<u8> {
        let bb = ty.block_bytes() as usize;
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let mut v: Vec<u8> = (0..blocks * bb)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 8) as u8
            })
            .collect();
        for b in v.chunks_exact_mut(bb) {
            let (d, dmin) = (
                f32_to_f16(0.01).to_le_bytes(),
                f32_to_f16(0.02).to_le_bytes(),
            );
            match ty {
                GgmlType::Q6_K => b[208..210].copy_from_slice(&d),
                GgmlType::Q8_K => b[..4].copy_from_slice(&0.01f32.to_le_bytes()),
                _ => {
                    b[..2].copy_from_slice(&d);
                    b[2..4].copy_from_slice(&dmin);
                }
            }
        }
        v
    }

    #[test]
    fn k_subblocks_match_dequantize() {
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            let bytes = random_k_blocks(ty, 3, 7);
            let want = dequantize_vec(ty, &bytes, 3 * QK_K).unwrap();
            for (bi, b) in bytes.chunks_exact(ty.block_bytes() as usize).enumerate() {
                for (s, sub) in k_subblocks(ty, b).iter().enumerate() {
                    for k in 0..32 {
                        let got = sub.scale[k / 16] * sub.q[k] as f32 + sub.min;
                        let w = want[bi * QK_K + 32 * s + k];
                        assert!(
                            (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{ty} {bi}/{s}/{k}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn k_quantize_round_trip() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0 + if i % 64 == 0 { 1.5 } else { 0.0 })
            .collect();
        // Worst-case error of a plain min/max fit: half a step of the sub-block, plus the
        // 6-bit (Q4_K/Q5_K) or 8-bit (Q6_K) rounding of the sub-block scale.
        for (ty, tol) in [
            (GgmlType::Q4_K, 0.3),
            (GgmlType::Q5_K, 0.15),
            (GgmlType::Q6_K, 0.1),
            (GgmlType::Q8_K, 0.02),
        ] {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len() as u64, ty.bytes_for(512).unwrap());
            let y = dequantize_vec(ty, &q, 512).unwrap();
            let mut worst = 0.0f32;
            for (a, b) in x.iter().zip(&y) {
                worst = worst.max((a - b).abs());
            }
            assert!(worst <= tol, "{ty}: worst error {worst}");
        }
    }

    #[test]
    fn damaged_blocks_are_named() {
        let mut bytes = random_k_blocks(GgmlType::Q4_K, 4, 3);
        assert_eq!(check_blocks(GgmlType::Q4_K, &bytes), Ok(()));
        bytes[2 * 144 + 2..2 * 144 + 4].copy_from_slice(&0x7e00u16.to_le_bytes()); // NaN dmin
        let err = check_blocks(GgmlType::Q4_K, &bytes).unwrap_err();
        assert!(
            matches!(err, QuantError::BadBlock { block: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("damaged"), "{err}");
        let mut q6 = random_k_blocks(GgmlType::Q6_K, 2, 3);
        q6[210 + 208..210 + 210].copy_from_slice(&0x7c00u16.to_le_bytes()); // +inf d
        assert!(matches!(
            check_blocks(GgmlType::Q6_K, &q6),
            Err(QuantError::BadBlock { block: 1, .. })
        ));
    }

    #[test]
    fn errors() {
        assert_eq!(
            dequantize_vec(GgmlType::Q3_K, &[0; 110], 256),
            Err(QuantError::Unsupported(GgmlType::Q3_K))
        );
        assert!(matches!(
            dequantize_vec(GgmlType::Q4_K, &[0; 143], 256),
            Err(QuantError::Size { .. })
        ));
        assert!(matches!(
            dequantize_vec(GgmlType::Q4_0, &[0; 17], 32),
            Err(QuantError::Size { .. })
        ));
    }
}
