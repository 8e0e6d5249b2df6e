//! Scalar reference (de)quantization for every supported ggml type.
//!
//! These are the definitions other code is checked against (the CPU fast paths and the CUDA
//! kernels). Block layouts (little endian):
//! - `Q4_0` (18 bytes / 32 elements): f16 `d`, 16 bytes of nibbles; byte `j` holds element `j`
//!   in its low nibble and element `j + 16` in its high nibble; `x = (q - 8) * d`.
//! - `Q4_1` (20 bytes / 32): f16 `d`, f16 `m`, 16 bytes as in Q4_0; `x = q * d + m`.
//! - `Q8_0` (34 bytes / 32): f16 `d`, 32 x i8; `x = q * d`.
//! - `F16`, `BF16`, `F32`: one element each.

use crate::gguf::GgmlType;

/// Errors from (de)quantization.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    /// The type has no implementation here.
    #[error(
        "tensor type {0} is not supported; use a model quantized as F32, F16, BF16, Q8_0, Q4_0 or Q4_1"
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
}

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
        other => return Err(QuantError::Unsupported(other)),
    }
    Ok(())
}

/// Dequantizes into a new vector.
pub fn dequantize_vec(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, QuantError> {
    let mut v = vec![0.0; n];
    dequantize(ty, bytes, &mut v)?;
    Ok(v)
}

/// Quantizes `x` (length a multiple of the block size) to `ty` (reference algorithms as in ggml).
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
mod tests {
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

    #[test]
    fn errors() {
        assert_eq!(
            dequantize_vec(GgmlType::Q4_K, &[0; 144], 256),
            Err(QuantError::Unsupported(GgmlType::Q4_K))
        );
        assert!(matches!(
            dequantize_vec(GgmlType::Q4_0, &[0; 17], 32),
            Err(QuantError::Size { .. })
        ));
    }
}
