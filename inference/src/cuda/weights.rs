//! Host-side repacking of GGUF weight matrices into the device layout the kernels read, and the
//! uploaded form.
//!
//! Float types (F32, F16, BF16) keep the GGUF bytes (row-major, `k` elements per row). Block
//! types are split into three arrays so that every block's quants start on an aligned boundary:
//! `qs` (the quants, one record per 32-element block), `d` (scales) and `m` (a second scale
//! array where the type has one). Block `b` of row `r` is block `r * k/32 + b` of `qs`.
//!
//! - Q4_0/Q4_1/Q8_0 (one GGUF block = 32 elements): `qs` 16 bytes per block for Q4_0/Q4_1 —
//!   byte `j` = element `j` low nibble, element `j + 16` high nibble, exactly as in GGUF — and
//!   32 int8 per block for Q8_0; `d` the f16 scale per block, `m` the f16 min per block (Q4_1).
//! - K-quants (one GGUF block = a 256-element super-block of eight 32-element sub-blocks;
//!   super-block `s` of the matrix holds blocks `8s..8s+8`): `qs` one record per sub-block,
//!   always starting with 16 bytes of low nibbles in the Q4_1 order above (Q4_K: nothing more;
//!   Q5_K: then a u32 whose bit `e` is the fifth bit of element `e`; Q6_K: of `q + 32`, then
//!   two u32 with its bits 4..5 at bits `2e..2e+2`, elements 0..16 and 16..32), Q8_K 32 int8;
//!   `d` per super-block: Q4_K/Q5_K the GGUF header as it is (f16 `d`, f16 `dmin`, 12 bytes
//!   of packed 6-bit scales and mins), Q6_K its 16 int8 scales, Q8_K its f32 `d`; `m` per
//!   super-block: the f16 `d` of Q6_K. Only bits move: the kernels compute `d * sc` and
//!   `dmin * m` in f32 (exact), so they see the file's values; Q4_K, Q5_K and Q6_K take the
//!   file's bytes on the device (Q8_K drops the unused block sums).
//!
//! Blocks whose scales are not finite numbers (a damaged file) are refused at load, naming the
//! tensor and the block, as the CPU backend does ([`crate::quant::check_blocks`]).
//!
//! Several matrices with the same type and input width can be concatenated row-wise into one
//! (Q|K|V, gate|up) so one launch computes them all.

use super::device::{CudaError, DevBuf, Gpu, Staging};
use super::kernels::{BLOCK_ELEMS, WeightKind};
use crate::error::InferenceError;
use crate::gguf::GgmlType;
use crate::model::TensorRef;
use crate::quant::{QuantError, bf16_to_f32, check_blocks, f16_to_f32, k_subblocks};
use crate::stream::{ReadAt, fetch, fetch_part};

/// Maps a GGUF type to the kernel weight kind.
pub fn weight_kind(ty: GgmlType) -> Option<WeightKind> {
    Some(match ty {
        GgmlType::F32 => WeightKind::F32,
        GgmlType::F16 => WeightKind::F16,
        GgmlType::BF16 => WeightKind::Bf16,
        GgmlType::Q8_0 => WeightKind::Q8_0,
        GgmlType::Q4_0 => WeightKind::Q4_0,
        GgmlType::Q4_1 => WeightKind::Q4_1,
        GgmlType::Q4_K => WeightKind::Q4K,
        GgmlType::Q5_K => WeightKind::Q5K,
        GgmlType::Q6_K => WeightKind::Q6K,
        GgmlType::Q8_K => WeightKind::Q8K,
        _ => return None,
    })
}

/// The error for a tensor type the CUDA kernels do not compute.
fn unsupported(name: &str, ty: GgmlType) -> CudaError {
    CudaError::Invalid(format!(
        "tensor {name} has type {ty}, which the CUDA backend cannot compute; use F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K or Q8_K (or the CPU backend)"
    ))
}

/// The error for a damaged block (`block` counted from the tensor's first block).
fn damaged(name: &str, e: QuantError, first: usize) -> CudaError {
    let e = match e {
        QuantError::BadBlock { ty, block } => QuantError::BadBlock {
            ty,
            block: block + first,
        },
        other => other,
    };
    CudaError::Invalid(format!("tensor {name}: {e}"))
}

/// A repacked matrix on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Repacked {
    /// Weight kind.
    pub kind: WeightKind,
    /// Output rows.
    pub rows: usize,
    /// Input width (multiple of 32; of 256 for the K-quants).
    pub k: usize,
    /// Quant bytes (or raw row bytes for float kinds).
    pub qs: Vec<u8>,
    /// The scale array (block kinds) as little-endian u16 words: f16 scales per block, or the
    /// per-super-block bytes of the K-quants (see the module docs).
    pub d: Vec<u16>,
    /// The second scale array (Q4_1 mins, Q6_K super-block scales), as `d`.
    pub m: Vec<u16>,
}

/// Repacks `parts` (same type and input width) into one matrix whose rows are the parts' rows
/// in order.
pub fn repack(parts: &[&TensorRef<'_>]) -> Result<Repacked, CudaError> {
    let (kind, ty, k, rows) = check_parts(parts, |p| p.data.len() as u64)?;
    let units = rows * (k / kind.unit_elems());
    let mut qs = vec![0u8; units * kind.blocks_per_unit() * kind.qs_bytes_per_block()];
    let mut d = vec![0u8; units * kind.d_bytes_per_unit()];
    let mut m = vec![0u8; units * kind.m_bytes_per_unit()];
    let mut at = 0usize;
    for p in parts {
        check_blocks(ty, p.data).map_err(|e| damaged(&p.name, e, 0))?;
        let n = p.rows() * (k / kind.unit_elems());
        let (a, b) = (at, at + n);
        split_units(
            kind,
            ty,
            p.data,
            n,
            &mut qs[a * qs_unit(kind)..b * qs_unit(kind)],
            &mut d[a * kind.d_bytes_per_unit()..b * kind.d_bytes_per_unit()],
            &mut m[a * kind.m_bytes_per_unit()..b * kind.m_bytes_per_unit()],
        );
        at = b;
    }
    let words = |v: Vec<u8>| -> Vec<u16> {
        v.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    Ok(Repacked {
        kind,
        rows,
        k,
        qs,
        d: words(d),
        m: words(m),
    })
}

/// `qs` bytes of one unit (GGUF block) in the device layout.
fn qs_unit(kind: WeightKind) -> usize {
    kind.blocks_per_unit() * kind.qs_bytes_per_block()
}

/// Writes `n` GGUF blocks (`raw`) of `ty` in the device layout of `kind` into the three regions
/// (`qs`, `d`, `m`, each exactly `n` units long). `raw` must hold `n` whole blocks.
fn split_units(
    kind: WeightKind,
    ty: GgmlType,
    raw: &[u8],
    n: usize,
    qs: &mut [u8],
    d: &mut [u8],
    m: &mut [u8],
) {
    let sb = src_unit_bytes(ty);
    let qu = qs_unit(kind);
    let (du, mu) = (kind.d_bytes_per_unit(), kind.m_bytes_per_unit());
    for (i, blk) in raw.chunks_exact(sb).take(n).enumerate() {
        let q = &mut qs[i * qu..(i + 1) * qu];
        let dd = &mut d[i * du..(i + 1) * du];
        let mm = &mut m[i * mu..(i + 1) * mu];
        match kind {
            WeightKind::F32 | WeightKind::F16 | WeightKind::Bf16 => q.copy_from_slice(blk),
            WeightKind::Q8_0 | WeightKind::Q4_0 => {
                dd.copy_from_slice(&blk[..2]);
                q.copy_from_slice(&blk[2..]);
            }
            WeightKind::Q4_1 => {
                dd.copy_from_slice(&blk[..2]);
                mm.copy_from_slice(&blk[2..4]);
                q.copy_from_slice(&blk[4..]);
            }
            WeightKind::Q8K => {
                dd.copy_from_slice(&blk[..4]);
                q.copy_from_slice(&blk[4..4 + 256]);
            }
            WeightKind::Q4K | WeightKind::Q5K | WeightKind::Q6K => {
                let six = kind == WeightKind::Q6K;
                if six {
                    dd.copy_from_slice(&blk[192..208]);
                    mm.copy_from_slice(&blk[208..210]);
                } else {
                    dd.copy_from_slice(&blk[..16]);
                }
                let rb = kind.qs_bytes_per_block();
                for (s, sub) in k_subblocks(ty, blk).iter().enumerate() {
                    let rec = &mut q[s * rb..(s + 1) * rb];
                    // Unsigned values: Q4_K 0..16, Q5_K 0..32, Q6_K q + 32 in 0..64.
                    let u: [u32; 32] = std::array::from_fn(|e| {
                        (sub.q[e] as i32 + if six { 32 } else { 0 }) as u32
                    });
                    for j in 0..16 {
                        rec[j] = ((u[j] & 0xF) | ((u[j + 16] & 0xF) << 4)) as u8;
                    }
                    if kind == WeightKind::Q5K {
                        let h = (0..32).fold(0u32, |h, e| h | (((u[e] >> 4) & 1) << e));
                        rec[16..20].copy_from_slice(&h.to_le_bytes());
                    } else if six {
                        for half in 0..2 {
                            let h = (0..16)
                                .fold(0u32, |h, e| h | (((u[16 * half + e] >> 4) & 3) << (2 * e)));
                            rec[16 + 4 * half..20 + 4 * half].copy_from_slice(&h.to_le_bytes());
                        }
                    }
                }
            }
        }
    }
}

impl Repacked {
    /// Dequantizes row `r` from the repacked layout exactly as the kernels do (host model of
    /// `load_block` and `load_block_k`, used to test the repacking).
    pub fn dequant_row(&self, r: usize) -> Vec<f32> {
        let nb = self.k / BLOCK_ELEMS;
        let mut out = vec![0f32; self.k];
        let db: Vec<u8> = self.d.iter().flat_map(|x| x.to_le_bytes()).collect();
        for b in 0..nb {
            let blk = r * nb + b;
            let qb = self.kind.qs_bytes_per_block();
            let q = &self.qs[blk * qb..(blk + 1) * qb];
            let w = &mut out[b * 32..(b + 1) * 32];
            let (sb, s) = (blk / 8, blk % 8);
            let word = |o: usize| u32::from_le_bytes([q[o], q[o + 1], q[o + 2], q[o + 3]]);
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
                WeightKind::Q8K => {
                    let o = 4 * sb;
                    let d = f32::from_le_bytes([db[o], db[o + 1], db[o + 2], db[o + 3]]);
                    for j in 0..32 {
                        w[j] = (q[j] as i8) as f32 * d;
                    }
                }
                WeightKind::Q4K | WeightKind::Q5K => {
                    let h = &db[16 * sb..16 * sb + 16];
                    let (sc, mn) = crate::quant::scale_min_k4(s, &h[4..]);
                    let dsc = f16_to_f32(u16::from_le_bytes([h[0], h[1]])) * sc as f32;
                    let dm = f16_to_f32(u16::from_le_bytes([h[2], h[3]])) * mn as f32;
                    let hb = if self.kind == WeightKind::Q5K {
                        word(16)
                    } else {
                        0
                    };
                    for j in 0..16 {
                        let q0 = (q[j] & 0xF) as u32 | (((hb >> j) & 1) << 4);
                        let q1 = (q[j] >> 4) as u32 | (((hb >> (16 + j)) & 1) << 4);
                        w[j] = dsc * q0 as f32 + -dm;
                        w[j + 16] = dsc * q1 as f32 + -dm;
                    }
                }
                WeightKind::Q6K => {
                    let h = &db[16 * sb..16 * sb + 16];
                    let d = f16_to_f32(self.m[sb]);
                    let (dlo, dhi) = (d * (h[2 * s] as i8) as f32, d * (h[2 * s + 1] as i8) as f32);
                    let (h0, h1) = (word(16), word(20));
                    for j in 0..16 {
                        let q0 = (q[j] & 0xF) as i32 | (((h0 >> (2 * j)) & 3) << 4) as i32;
                        let q1 = (q[j] >> 4) as i32 | (((h1 >> (2 * j)) & 3) << 4) as i32;
                        w[j] = dlo * (q0 - 32) as f32;
                        w[j + 16] = dhi * (q1 - 32) as f32;
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
    /// Mins (Q4_1), super-block scales (Q6_K).
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

/// Bytes of each of the two host buffers of a streamed upload (the raw read and the
/// page-locked staging copy): the host memory a streamed load uses for weights, whatever the
/// model size.
pub const STREAM_CHUNK_BYTES: usize = 32 << 20;

/// Bytes one GGUF block (unit: 32 elements, 256 for the K-quants) of `ty` takes in the file.
fn src_unit_bytes(ty: GgmlType) -> usize {
    ty.block_bytes() as usize * if ty.block_size() == 1 { BLOCK_ELEMS } else { 1 }
}

/// Staging bytes one unit takes in the device layout (quants, then scales, then mins).
fn staged_unit_bytes(kind: WeightKind) -> usize {
    qs_unit(kind) + kind.d_bytes_per_unit() + kind.m_bytes_per_unit()
}

/// Splits `n` GGUF units of `kind` (`raw`, `n` × the file's bytes per 32 elements, or per
/// super-block for the K-quants) into the device layout inside `out`: the `n` units' quant (or
/// raw float) records first, then their scale bytes, then their `m` bytes (Q4_1, Q6_K).
/// Returns the lengths of the three regions. The same bytes [`repack`] produces for those
/// units, laid out for three copies.
pub fn split_blocks(
    kind: WeightKind,
    ty: GgmlType,
    raw: &[u8],
    n: usize,
    out: &mut [u8],
) -> Result<(usize, usize, usize), CudaError> {
    let sb = src_unit_bytes(ty);
    let ql = n * qs_unit(kind);
    let dl = n * kind.d_bytes_per_unit();
    let ml = n * kind.m_bytes_per_unit();
    if weight_kind(ty) != Some(kind) || raw.len() != n * sb || out.len() < ql + dl + ml {
        return Err(CudaError::Invalid(format!(
            "split of {n} {ty} blocks as {kind:?}: {} raw bytes (want {}), {} staging bytes (want {})",
            raw.len(),
            n * sb,
            out.len(),
            ql + dl + ml
        )));
    }
    let (qs, rest) = out.split_at_mut(ql);
    let (d, rest) = rest.split_at_mut(dl);
    split_units(kind, ty, raw, n, qs, d, &mut rest[..ml]);
    Ok((ql, dl, ml))
}

/// Chunks of at most `max` blocks covering `total` blocks: `(first, count)` pairs.
pub fn chunks(total: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let max = max.max(1);
    (0..total.div_ceil(max)).map(move |i| (i * max, max.min(total - i * max)))
}

/// Streams matrices from a reader into device memory through a bounded staging buffer: each
/// chunk of GGUF blocks is read into `read` (while the previous chunk's copy may still run),
/// split into the device layout in the page-locked `staging` buffer (after waiting for that
/// copy) and copied asynchronously to its place in the matrix's device buffers. Host memory:
/// the two buffers of [`STREAM_CHUNK_BYTES`], whatever the model size.
pub struct Streamer<'s> {
    src: &'s dyn ReadAt,
    read: Vec<u8>,
    staging: Staging,
}

impl std::fmt::Debug for Streamer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamer")
            .field("read", &self.read.len())
            .field("staging", &self.staging)
            .finish()
    }
}

impl<'s> Streamer<'s> {
    /// A streamer reading from `src` with chunks of `chunk_bytes` (≥ one block of any type).
    pub fn new(gpu: &Gpu, src: &'s dyn ReadAt, chunk_bytes: usize) -> Result<Self, CudaError> {
        let chunk_bytes = chunk_bytes.max(512);
        Ok(Streamer {
            src,
            read: vec![0u8; chunk_bytes],
            staging: gpu.alloc_staging(chunk_bytes)?,
        })
    }

    /// Host bytes this streamer holds (the read buffer and the staging buffer).
    pub fn host_bytes(&self) -> usize {
        self.read.len() + self.staging.len()
    }

    /// The bytes of a small tensor (norms, biases), read whole.
    pub fn floats(&self, t: &TensorRef<'_>) -> Result<Vec<f32>, InferenceError> {
        t.bytes_to_f32(&fetch(Some(self.src), t)?)
    }

    /// Uploads `parts` (same type and input width) as one matrix whose rows are the parts'
    /// rows in order, as [`GpuMatrix::upload`] of [`repack`] would, without holding it on the
    /// host.
    pub fn matrix(
        &mut self,
        gpu: &Gpu,
        parts: &[&TensorRef<'_>],
    ) -> Result<GpuMatrix, InferenceError> {
        let (kind, ty, k, rows) = check_parts(parts, |p| p.size)?;
        let units_row = k / kind.unit_elems();
        let total = rows * units_row;
        let (qu, du, mu) = (
            qs_unit(kind),
            kind.d_bytes_per_unit(),
            kind.m_bytes_per_unit(),
        );
        let mut qs = gpu.alloc(total * qu)?;
        let mut d = if du > 0 {
            Some(gpu.alloc(total * du)?)
        } else {
            None
        };
        let mut m = if mu > 0 {
            Some(gpu.alloc(total * mu)?)
        } else {
            None
        };
        let sb = src_unit_bytes(ty);
        let max_units = (self.read.len() / sb).min(self.staging.len() / staged_unit_bytes(kind));
        let mut dst = 0usize;
        for p in parts {
            let units = p.rows() * units_row;
            for (first, n) in chunks(units, max_units) {
                // Read while the previous chunk's copy may still be running.
                let raw = &mut self.read[..n * sb];
                fetch_part(self.src, p, (first * sb) as u64, raw)?;
                check_blocks(ty, raw).map_err(|e| damaged(&p.name, e, first))?;
                let out = self.staging.writable()?;
                let (lq, ld, lm) = split_blocks(kind, ty, raw, n, out)?;
                let at = dst + first;
                gpu.copy_from_staging(&mut self.staging, 0..lq, &mut qs, at * qu)?;
                if let Some(d) = d.as_mut() {
                    gpu.copy_from_staging(&mut self.staging, lq..lq + ld, d, at * du)?;
                }
                if let Some(m) = m.as_mut() {
                    let o = lq + ld;
                    gpu.copy_from_staging(&mut self.staging, o..o + lm, m, at * mu)?;
                }
            }
            dst += units;
        }
        gpu.sync()?;
        Ok(GpuMatrix {
            kind,
            rows,
            k,
            qs,
            d,
            m,
        })
    }
}

/// Checks that `parts` can be concatenated (`size`: the bytes a part holds); returns (kind,
/// type, input width, total rows).
fn check_parts(
    parts: &[&TensorRef<'_>],
    size: impl Fn(&TensorRef<'_>) -> u64,
) -> Result<(WeightKind, GgmlType, usize, usize), CudaError> {
    let first = parts
        .first()
        .ok_or_else(|| CudaError::Invalid("upload of no tensors".into()))?;
    let ty = first.ty;
    let kind = weight_kind(ty).ok_or_else(|| unsupported(&first.name, ty))?;
    let k = first.cols();
    let unit = kind.unit_elems();
    if k == 0 || k % unit != 0 {
        return Err(CudaError::Invalid(format!(
            "tensor {} ({ty}) has rows of {k} elements; the CUDA kernels need a multiple of {unit}",
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
        let want = (p.rows() * p.row_bytes()) as u64;
        if size(p) != want {
            return Err(CudaError::Invalid(format!(
                "tensor {} holds {} bytes, expected {want}",
                p.name,
                size(p)
            )));
        }
        rows += p.rows();
    }
    Ok((kind, ty, k, rows))
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

    /// Every type the CUDA backend computes, with a row width it accepts.
    const TYPES: [(GgmlType, usize); 10] = [
        (GgmlType::F32, 96),
        (GgmlType::F16, 96),
        (GgmlType::BF16, 96),
        (GgmlType::Q8_0, 96),
        (GgmlType::Q4_0, 96),
        (GgmlType::Q4_1, 96),
        (GgmlType::Q4_K, 512),
        (GgmlType::Q5_K, 512),
        (GgmlType::Q6_K, 512),
        (GgmlType::Q8_K, 512),
    ];

    /// Bytes of `n` values of `ty`: quantized random values, and for the K-quants random bytes
    /// with sane scales (every bit pattern of the quants, scales and mins), concatenated.
    fn bytes_of(ty: GgmlType, n: usize, seed: u32) -> Vec<u8> {
        let mut b = quantize(ty, &values(n, seed)).expect("quantize");
        if matches!(
            ty,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::Q8_K
        ) {
            // Replace the second half with random blocks (all bits of the quants and scales).
            let blocks = n / 256;
            let r = crate::quant::tests::random_k_blocks(ty, blocks - blocks / 2, seed);
            let bb = ty.block_bytes() as usize;
            b.truncate(blocks / 2 * bb);
            b.extend_from_slice(&r);
        }
        b
    }

    #[test]
    fn repack_matches_reference_dequantization_for_every_type() {
        let rows = 5usize;
        for (ty, cols) in TYPES {
            let bytes = bytes_of(ty, cols * rows, ty.id() + 7);
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
        // K-quant rows are whole 256-element super-blocks.
        let q = vec![0u8; 144];
        let t = tensor("w", GgmlType::Q4_K, 128, 2, &q);
        let e = repack(&[&t]).unwrap_err().to_string();
        assert!(e.contains("multiple of 256"), "{e}");
    }

    /// A block with a non-finite scale is refused at load, naming the tensor and the block
    /// (counted from the tensor's start), in the in-memory repack and in the streamed upload.
    #[test]
    fn damaged_blocks_are_refused() {
        for (ty, cols, at) in [
            (GgmlType::Q4_K, 512usize, 2usize), // dmin
            (GgmlType::Q5_K, 512, 0),           // d
            (GgmlType::Q6_K, 512, 208),         // d (last)
            (GgmlType::Q4_1, 64, 2),            // m
            (GgmlType::Q8_0, 64, 0),
        ] {
            let rows = 3usize;
            let mut bytes = bytes_of(ty, cols * rows, 9);
            let bb = ty.block_bytes() as usize;
            let bad_block = bytes.len() / bb - 2;
            let o = bad_block * bb + at;
            bytes[o..o + 2].copy_from_slice(&0x7e00u16.to_le_bytes()); // f16 NaN
            let e = repack(&[&tensor("blk.3.ffn_down.weight", ty, cols, rows, &bytes)])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("blk.3.ffn_down.weight")
                    && e.contains(&format!("block {bad_block}"))
                    && e.contains("damaged"),
                "{ty}: {e}"
            );
        }
        let mut q8k = bytes_of(GgmlType::Q8_K, 512, 4);
        q8k[292..296].copy_from_slice(&f32::INFINITY.to_le_bytes());
        let e = repack(&[&tensor("w", GgmlType::Q8_K, 512, 1, &q8k)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("block 1") && e.contains("damaged"), "{e}");
        let gpu = match Gpu::emulated() {
            Ok(g) => g,
            Err(e) => {
                eprintln!("SKIPPED: kernel emulator unavailable ({e}); streamed check not run");
                return;
            }
        };
        // Streamed in chunks of one super-block: the block index counts from the tensor's
        // first block, not the chunk's.
        let ty = GgmlType::Q4_K;
        let mut bytes = bytes_of(ty, 256 * 5, 2);
        bytes[3 * 144..3 * 144 + 2].copy_from_slice(&0x7c00u16.to_le_bytes()); // d = +inf
        let t = TensorRef {
            name: "blk.0.attn_q.weight".into(),
            ty,
            dims: vec![256, 5],
            data: &[],
            offset: 0,
            size: bytes.len() as u64,
        };
        let mut st = Streamer::new(&gpu, &bytes, 512).expect("streamer");
        let e = st.matrix(&gpu, &[&t]).unwrap_err().to_string();
        assert!(
            e.contains("blk.0.attn_q.weight") && e.contains("block 3") && e.contains("damaged"),
            "{e}"
        );
    }

    #[test]
    fn split_blocks_lays_out_what_repack_produces() {
        let rows = 7usize;
        for (ty, cols) in TYPES {
            let bytes = bytes_of(ty, cols * rows, ty.id() + 3);
            let r = repack(&[&tensor("w", ty, cols, rows, &bytes)]).expect("repack");
            let kind = weight_kind(ty).expect("kind");
            let sb = src_unit_bytes(ty);
            let total = cols * rows / kind.unit_elems();
            // Any chunking gives the same three arrays as the in-memory repack.
            for max in [1usize, 2, 5, total, total + 3] {
                let (mut qs, mut d, mut m) = (Vec::new(), Vec::new(), Vec::new());
                let mut seen = 0;
                for (first, n) in chunks(total, max) {
                    assert_eq!(first, seen, "{ty}: chunks are contiguous");
                    assert!(n >= 1 && n <= max.max(1));
                    seen += n;
                    let mut out = vec![0u8; n * staged_unit_bytes(kind)];
                    let raw = &bytes[first * sb..(first + n) * sb];
                    let (lq, ld, lm) = split_blocks(kind, ty, raw, n, &mut out).expect("split");
                    qs.extend_from_slice(&out[..lq]);
                    d.extend_from_slice(&out[lq..lq + ld]);
                    m.extend_from_slice(&out[lq + ld..lq + ld + lm]);
                }
                assert_eq!(seen, total);
                let u16b =
                    |v: &[u16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
                assert_eq!(qs, r.qs, "{ty} max {max}: quants");
                assert_eq!(d, u16b(&r.d), "{ty} max {max}: scales");
                assert_eq!(m, u16b(&r.m), "{ty} max {max}: mins");
            }
            let mut small = vec![0u8; 3];
            assert!(split_blocks(kind, ty, &bytes[..sb], 1, &mut small).is_err());
        }
        assert_eq!(chunks(0, 4).count(), 0);
        assert_eq!(
            chunks(5, 0).collect::<Vec<_>>().len(),
            5,
            "max 0 counts as 1"
        );
    }

    /// The streamed upload through a small staging buffer fills the device buffers exactly as
    /// the in-memory repack + upload, and never reads more than one chunk at a time. Runs on
    /// the kernel emulator (host memory standing in for the device; no GPU needed).
    #[test]
    fn streamed_upload_matches_the_in_memory_upload_on_the_emulator() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Largest<'a>(&'a [u8], AtomicUsize);
        impl ReadAt for Largest<'_> {
            fn len(&self) -> u64 {
                self.0.len() as u64
            }
            fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
                self.1.fetch_max(buf.len(), Ordering::Relaxed);
                ReadAt::read_exact_at(&self.0, buf, offset)
            }
        }
        let gpu = match Gpu::emulated() {
            Ok(g) => g,
            Err(e) => {
                eprintln!(
                    "SKIPPED: kernel emulator unavailable ({e}); streamed upload not checked"
                );
                return;
            }
        };
        let (rows_a, rows_b) = (9usize, 4usize);
        for (ty, cols) in [
            (GgmlType::F16, 64usize),
            (GgmlType::Q8_0, 64),
            (GgmlType::Q4_1, 64),
            (GgmlType::Q4_K, 256),
            (GgmlType::Q5_K, 256),
            (GgmlType::Q6_K, 512),
            (GgmlType::Q8_K, 256),
        ] {
            let a = quantize(ty, &values(cols * rows_a, 1)).expect("q");
            let b = quantize(ty, &values(cols * rows_b, 2)).expect("q");
            // One "file" holding both tensors at their offsets.
            let mut file = vec![0u8; 100];
            let (oa, ob) = (file.len() as u64, (file.len() + a.len() + 32) as u64);
            file.extend_from_slice(&a);
            file.resize(ob as usize, 0);
            file.extend_from_slice(&b);
            let header_only = |name: &str, rows: usize, offset: u64, size: usize| TensorRef {
                name: name.into(),
                ty,
                dims: vec![cols as u64, rows as u64],
                data: &[],
                offset,
                size: size as u64,
            };
            let (ta, tb) = (
                header_only("a", rows_a, oa, a.len()),
                header_only("b", rows_b, ob, b.len()),
            );
            let src = Largest(&file, AtomicUsize::new(0));
            let chunk = 3 * src_unit_bytes(ty) + 1;
            let mut st = Streamer::new(&gpu, &src, chunk.max(512)).expect("streamer");
            let streamed = st.matrix(&gpu, &[&ta, &tb]).expect("streamed upload");
            let want = GpuMatrix::upload(
                &gpu,
                &repack(&[
                    &tensor("a", ty, cols, rows_a, &a),
                    &tensor("b", ty, cols, rows_b, &b),
                ])
                .expect("repack"),
            )
            .expect("upload");
            assert_eq!(
                (streamed.kind, streamed.rows, streamed.k),
                (want.kind, want.rows, want.k)
            );
            let read = |buf: &DevBuf| gpu.read(buf, 0, buf.len).expect("read");
            assert_eq!(read(&streamed.qs), read(&want.qs), "{ty}: quants");
            assert_eq!(
                streamed.d.as_ref().map(read),
                want.d.as_ref().map(read),
                "{ty}: scales"
            );
            assert_eq!(
                streamed.m.as_ref().map(read),
                want.m.as_ref().map(read),
                "{ty}: mins"
            );
            assert!(
                src.1.load(Ordering::Relaxed) <= st.read.len(),
                "{ty}: bounded reads"
            );
            assert!(st.host_bytes() <= 2 * chunk.max(512) + 2);
            // A read error names the tensor and the offset.
            let short = Largest(&file[..ob as usize + 10], AtomicUsize::new(0));
            let mut st = Streamer::new(&gpu, &short, 512).expect("streamer");
            let e = st
                .matrix(&gpu, &[&ta, &tb])
                .expect_err("short source")
                .to_string();
            assert!(e.contains("tensor b"), "{e}");
        }
    }
}
