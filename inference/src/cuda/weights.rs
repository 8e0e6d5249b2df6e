//! Host-side repacking of GGUF weight matrices into the device layout the kernels read, and the
//! uploaded form.
//!
//! Float types (F32, F16, BF16) keep the GGUF bytes (row-major, `k` elements per row). Block
//! types are split into three arrays so that every block's quants start on a 16-byte boundary:
//! `qs` (16 bytes per block for Q4_0/Q4_1 — byte `j` = element `j` low nibble, element `j + 16`
//! high nibble, exactly as in GGUF — and 32 int8 per block for Q8_0), `d` (f16 scale per block)
//! and `m` (f16 min per block, Q4_1 only). Block `b` of row `r` is at index `r * k/32 + b`.
//!
//! Several matrices with the same type and input width can be concatenated row-wise into one
//! (Q|K|V, gate|up) so one launch computes them all.

use super::device::{CudaError, DevBuf, Gpu};
use super::kernels::{BLOCK_ELEMS, WeightKind};
use crate::gguf::GgmlType;
use crate::model::TensorRef;
use crate::quant::{bf16_to_f32, f16_to_f32};

/// Maps a GGUF type to the kernel weight kind.
pub fn weight_kind(ty: GgmlType) -> Option<WeightKind> {
    Some(match ty {
        GgmlType::F32 => WeightKind::F32,
        GgmlType::F16 => WeightKind::F16,
        GgmlType::BF16 => WeightKind::Bf16,
        GgmlType::Q8_0 => WeightKind::Q8_0,
        GgmlType::Q4_0 => WeightKind::Q4_0,
        GgmlType::Q4_1 => WeightKind::Q4_1,
        _ => return None,
    })
}

/// A repacked matrix on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Repacked {
    /// Weight kind.
    pub kind: WeightKind,
    /// Output rows.
    pub rows: usize,
    /// Input width (multiple of 32).
    pub k: usize,
    /// Quant bytes (or raw row bytes for float kinds).
    pub qs: Vec<u8>,
    /// Per-block f16 scales (block kinds).
    pub d: Vec<u16>,
    /// Per-block f16 mins (Q4_1).
    pub m: Vec<u16>,
}

/// Repacks `parts` (same type and input width) into one matrix whose rows are the parts' rows
/// in order.
pub fn repack(parts: &[&TensorRef<'_>]) -> Result<Repacked, CudaError> {
    let first = parts
        .first()
        .ok_or_else(|| CudaError::Invalid("repack of no tensors".into()))?;
    let ty = first.ty;
    let kind = weight_kind(ty).ok_or_else(|| {
        CudaError::Invalid(format!(
            "tensor {} has type {ty}, which the CUDA backend cannot compute; use F32, F16, BF16, Q8_0, Q4_0 or Q4_1",
            first.name
        ))
    })?;
    let k = first.cols();
    if k == 0 || k % BLOCK_ELEMS != 0 {
        return Err(CudaError::Invalid(format!(
            "tensor {} has rows of {k} elements; the CUDA kernels need a multiple of 32",
            first.name
        )));
    }
    let mut rows = 0usize;
    for p in parts {
        if p.ty != ty || p.cols() != k {
            return Err(CudaError::Invalid(format!(
                "cannot concatenate {} ({}, {} cols) with {} ({ty}, {k} cols)",
                p.name,
                p.ty,
                p.cols(),
                first.name
            )));
        }
        let want = p.rows() * p.row_bytes();
        if p.data.len() != want {
            return Err(CudaError::Invalid(format!(
                "tensor {} holds {} bytes, expected {want}",
                p.name,
                p.data.len()
            )));
        }
        rows += p.rows();
    }
    let nblocks = rows * (k / BLOCK_ELEMS);
    let mut out = Repacked {
        kind,
        rows,
        k,
        qs: Vec::with_capacity(nblocks * kind.qs_bytes_per_block()),
        d: Vec::new(),
        m: Vec::new(),
    };
    match kind {
        WeightKind::F32 | WeightKind::F16 | WeightKind::Bf16 => {
            for p in parts {
                out.qs.extend_from_slice(p.data);
            }
        }
        WeightKind::Q8_0 | WeightKind::Q4_0 | WeightKind::Q4_1 => {
            let bb = ty.block_bytes() as usize;
            out.d.reserve(nblocks);
            if kind == WeightKind::Q4_1 {
                out.m.reserve(nblocks);
            }
            for p in parts {
                for blk in p.data.chunks_exact(bb) {
                    out.d.push(u16::from_le_bytes([blk[0], blk[1]]));
                    let q = if kind == WeightKind::Q4_1 {
                        out.m.push(u16::from_le_bytes([blk[2], blk[3]]));
                        &blk[4..]
                    } else {
                        &blk[2..]
                    };
                    out.qs.extend_from_slice(q);
                }
            }
        }
    }
    Ok(out)
}

impl Repacked {
    /// Dequantizes row `r` from the repacked layout exactly as the kernels do (host model of
    /// `load_block`, used to test the repacking).
    pub fn dequant_row(&self, r: usize) -> Vec<f32> {
        let nb = self.k / BLOCK_ELEMS;
        let mut out = vec![0f32; self.k];
        for b in 0..nb {
            let blk = r * nb + b;
            let qb = self.kind.qs_bytes_per_block();
            let q = &self.qs[blk * qb..(blk + 1) * qb];
            let w = &mut out[b * 32..(b + 1) * 32];
            match self.kind {
                WeightKind::F32 => {
                    for (j, c) in q.chunks_exact(4).enumerate() {
                        w[j] = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
                WeightKind::F16 => {
                    for (j, c) in q.chunks_exact(2).enumerate() {
                        w[j] = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                    }
                }
                WeightKind::Bf16 => {
                    for (j, c) in q.chunks_exact(2).enumerate() {
                        w[j] = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                    }
                }
                WeightKind::Q8_0 => {
                    let d = f16_to_f32(self.d[blk]);
                    for j in 0..32 {
                        w[j] = (q[j] as i8) as f32 * d;
                    }
                }
                WeightKind::Q4_0 => {
                    let d = f16_to_f32(self.d[blk]);
                    for j in 0..16 {
                        w[j] = ((q[j] & 0xF) as f32 - 8.0) * d;
                        w[j + 16] = ((q[j] >> 4) as f32 - 8.0) * d;
                    }
                }
                WeightKind::Q4_1 => {
                    let d = f16_to_f32(self.d[blk]);
                    let m = f16_to_f32(self.m[blk]);
                    for j in 0..16 {
                        w[j] = (q[j] & 0xF) as f32 * d + m;
                        w[j + 16] = (q[j] >> 4) as f32 * d + m;
                    }
                }
            }
        }
        out
    }

    /// Bytes a mat-vec over this matrix reads.
    pub fn device_bytes(&self) -> usize {
        self.qs.len() + 2 * self.d.len() + 2 * self.m.len()
    }
}

/// A matrix resident on the GPU.
#[derive(Debug)]
pub struct GpuMatrix {
    /// Weight kind.
    pub kind: WeightKind,
    /// Output rows.
    pub rows: usize,
    /// Input width.
    pub k: usize,
    /// Quant bytes.
    pub qs: DevBuf,
    /// Scales (block kinds).
    pub d: Option<DevBuf>,
    /// Mins (Q4_1).
    pub m: Option<DevBuf>,
}

impl GpuMatrix {
    /// Uploads a repacked matrix.
    pub fn upload(gpu: &Gpu, r: &Repacked) -> Result<Self, CudaError> {
        let u16b = |v: &[u16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        Ok(GpuMatrix {
            kind: r.kind,
            rows: r.rows,
            k: r.k,
            qs: gpu.upload(&r.qs)?,
            d: if r.d.is_empty() {
                None
            } else {
                Some(gpu.upload(&u16b(&r.d))?)
            },
            m: if r.m.is_empty() {
                None
            } else {
                Some(gpu.upload(&u16b(&r.m))?)
            },
        })
    }

    /// Raw pointers (qs, d, m); null for absent arrays.
    pub fn ptrs(&self) -> (u64, u64, u64) {
        (
            self.qs.ptr,
            self.d.as_ref().map_or(0, |b| b.ptr),
            self.m.as_ref().map_or(0, |b| b.ptr),
        )
    }

    /// Device bytes read by one mat-vec.
    pub fn bytes(&self) -> usize {
        self.kind.matrix_bytes(self.rows, self.k)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::quant::{dequantize_vec, quantize};

    fn tensor<'a>(
        name: &str,
        ty: GgmlType,
        cols: usize,
        rows: usize,
        data: &'a [u8],
    ) -> TensorRef<'a> {
        TensorRef {
            name: name.into(),
            ty,
            dims: vec![cols as u64, rows as u64],
            data,
            offset: 0,
            size: data.len() as u64,
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn repack_matches_reference_dequantization_for_every_type() {
        let (cols, rows) = (96usize, 5usize);
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
        ] {
            let x = values(cols * rows, ty.id() + 7);
            let bytes = quantize(ty, &x).expect("quantize");
            let t = tensor("w", ty, cols, rows, &bytes);
            let r = repack(&[&t]).expect("repack");
            assert_eq!(r.rows, rows);
            let reference = dequantize_vec(ty, &bytes, cols * rows).expect("dequant");
            for row in 0..rows {
                assert_eq!(
                    r.dequant_row(row),
                    reference[row * cols..(row + 1) * cols].to_vec(),
                    "{ty} row {row}"
                );
            }
            assert_eq!(
                r.device_bytes(),
                weight_kind(ty).expect("kind").matrix_bytes(rows, cols)
            );
        }
    }

    #[test]
    fn concatenation_stacks_rows() {
        let ty = GgmlType::Q4_1;
        let a = quantize(ty, &values(64 * 3, 1)).expect("q");
        let b = quantize(ty, &values(64 * 2, 2)).expect("q");
        let ta = tensor("a", ty, 64, 3, &a);
        let tb = tensor("b", ty, 64, 2, &b);
        let r = repack(&[&ta, &tb]).expect("repack");
        assert_eq!(r.rows, 5);
        let rb = dequantize_vec(ty, &b, 128).expect("dq");
        assert_eq!(r.dequant_row(4), rb[64..].to_vec());
    }

    #[test]
    fn repack_rejects_bad_input() {
        let data = vec![0u8; 18];
        let t = tensor("w", GgmlType::Q5_0, 32, 1, &data);
        assert!(
            repack(&[&t])
                .unwrap_err()
                .to_string()
                .contains("cannot compute")
        );
        let f = vec![0u8; 4 * 40];
        let t = tensor("w", GgmlType::F32, 40, 1, &f);
        assert!(
            repack(&[&t])
                .unwrap_err()
                .to_string()
                .contains("multiple of 32")
        );
        let f = vec![0u8; 4 * 32];
        let t1 = tensor("a", GgmlType::F32, 32, 1, &f);
        let h = vec![0u8; 2 * 32];
        let t2 = tensor("b", GgmlType::F16, 32, 1, &h);
        assert!(
            repack(&[&t1, &t2])
                .unwrap_err()
                .to_string()
                .contains("concatenate")
        );
        let short = vec![0u8; 10];
        let t = tensor("w", GgmlType::F32, 32, 1, &short);
        assert!(repack(&[&t]).unwrap_err().to_string().contains("bytes"));
        assert!(repack(&[]).is_err());
    }
}
