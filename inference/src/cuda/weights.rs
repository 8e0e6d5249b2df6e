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

use super::device::{CudaError, DevBuf, Gpu, Staging};
use super::kernels::{BLOCK_ELEMS, WeightKind};
use crate::error::InferenceError;
use crate::gguf::GgmlType;
use crate::model::TensorRef;
use crate::quant::{bf16_to_f32, f16_to_f32};
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
            "tensor {} has type {ty}, which the CUDA backend cannot compute (K-quants run on the CPU backend only, for now); use F32, F16, BF16, Q8_0, Q4_0 or Q4_1",
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

/// Bytes of each of the two host buffers of a streamed upload (the raw read and the
/// page-locked staging copy): the host memory a streamed load uses for weights, whatever the
/// model size.
pub const STREAM_CHUNK_BYTES: usize = 32 << 20;

/// Bytes one 32-element block of `ty` takes in the GGUF file.
fn src_block_bytes(ty: GgmlType) -> usize {
    ty.bytes_for(BLOCK_ELEMS as u64).unwrap_or(0) as usize
}

/// Staging bytes one block takes in the device layout (quants, then scale, then min).
fn staged_block_bytes(kind: WeightKind) -> usize {
    kind.qs_bytes_per_block()
        + if kind.has_scale() { 2 } else { 0 }
        + if kind.has_min() { 2 } else { 0 }
}

/// Splits `n` GGUF blocks of `kind` (`raw`, `n` × the file's block size) into the device
/// layout inside `out`: the `n` quant (or raw float) runs first, then the `n` f16 scales, then
/// the `n` f16 mins (Q4_1). Returns the lengths of the three regions. The same bytes
/// [`repack`] produces for those blocks, laid out for three copies.
pub fn split_blocks(
    kind: WeightKind,
    ty: GgmlType,
    raw: &[u8],
    n: usize,
    out: &mut [u8],
) -> Result<(usize, usize, usize), CudaError> {
    let sb = src_block_bytes(ty);
    let qb = kind.qs_bytes_per_block();
    let dl = if kind.has_scale() { 2 * n } else { 0 };
    let ml = if kind.has_min() { 2 * n } else { 0 };
    if raw.len() != n * sb || out.len() < n * qb + dl + ml {
        return Err(CudaError::Invalid(format!(
            "split of {n} {ty} blocks: {} raw bytes (want {}), {} staging bytes (want {})",
            raw.len(),
            n * sb,
            out.len(),
            n * qb + dl + ml
        )));
    }
    let (qs, rest) = out.split_at_mut(n * qb);
    let (d, rest) = rest.split_at_mut(dl);
    let m = &mut rest[..ml];
    match kind {
        WeightKind::F32 | WeightKind::F16 | WeightKind::Bf16 => qs.copy_from_slice(raw),
        WeightKind::Q8_0 | WeightKind::Q4_0 | WeightKind::Q4_1 => {
            let head = if kind == WeightKind::Q4_1 { 4 } else { 2 };
            for (i, blk) in raw.chunks_exact(sb).enumerate() {
                d[2 * i..2 * i + 2].copy_from_slice(&blk[..2]);
                if kind == WeightKind::Q4_1 {
                    m[2 * i..2 * i + 2].copy_from_slice(&blk[2..4]);
                }
                qs[i * qb..(i + 1) * qb].copy_from_slice(&blk[head..]);
            }
        }
    }
    Ok((n * qb, dl, ml))
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
        let chunk_bytes = chunk_bytes.max(256);
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
        let (kind, ty, k, rows) = check_parts(parts)?;
        let nb_row = k / BLOCK_ELEMS;
        let total_blocks = rows * nb_row;
        let qb = kind.qs_bytes_per_block();
        let mut qs = gpu.alloc(total_blocks * qb)?;
        let mut d = if kind.has_scale() {
            Some(gpu.alloc(total_blocks * 2)?)
        } else {
            None
        };
        let mut m = if kind.has_min() {
            Some(gpu.alloc(total_blocks * 2)?)
        } else {
            None
        };
        let sb = src_block_bytes(ty);
        let max_blocks = (self.read.len() / sb).min(self.staging.len() / staged_block_bytes(kind));
        let mut dst = 0usize;
        for p in parts {
            let blocks = p.rows() * nb_row;
            for (first, n) in chunks(blocks, max_blocks) {
                // Read while the previous chunk's copy may still be running.
                let raw = &mut self.read[..n * sb];
                fetch_part(self.src, p, (first * sb) as u64, raw)?;
                let out = self.staging.writable()?;
                let (lq, ld, lm) = split_blocks(kind, ty, raw, n, out)?;
                gpu.copy_from_staging(&mut self.staging, 0..lq, &mut qs, (dst + first) * qb)?;
                if let Some(d) = d.as_mut() {
                    gpu.copy_from_staging(&mut self.staging, lq..lq + ld, d, (dst + first) * 2)?;
                }
                if let Some(m) = m.as_mut() {
                    let at = lq + ld;
                    gpu.copy_from_staging(&mut self.staging, at..at + lm, m, (dst + first) * 2)?;
                }
            }
            dst += blocks;
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

/// Checks that `parts` can be concatenated; returns (kind, type, input width, total rows).
fn check_parts(
    parts: &[&TensorRef<'_>],
) -> Result<(WeightKind, GgmlType, usize, usize), CudaError> {
    let first = parts
        .first()
        .ok_or_else(|| CudaError::Invalid("upload of no tensors".into()))?;
    let ty = first.ty;
    let kind = weight_kind(ty).ok_or_else(|| {
        CudaError::Invalid(format!(
            "tensor {} has type {ty}, which the CUDA backend cannot compute (K-quants run on the CPU backend only, for now); use F32, F16, BF16, Q8_0, Q4_0 or Q4_1",
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
        let want = (p.rows() * p.row_bytes()) as u64;
        if p.size != want {
            return Err(CudaError::Invalid(format!(
                "tensor {} holds {} bytes, expected {want}",
                p.name, p.size
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

    #[test]
    fn split_blocks_lays_out_what_repack_produces() {
        let (cols, rows) = (96usize, 7usize);
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
        ] {
            let bytes = quantize(ty, &values(cols * rows, ty.id() + 3)).expect("quantize");
            let r = repack(&[&tensor("w", ty, cols, rows, &bytes)]).expect("repack");
            let kind = weight_kind(ty).expect("kind");
            let sb = src_block_bytes(ty);
            let total = cols * rows / 32;
            // Any chunking gives the same three arrays as the in-memory repack.
            for max in [1usize, 2, 5, total, total + 3] {
                let (mut qs, mut d, mut m) = (Vec::new(), Vec::new(), Vec::new());
                let mut seen = 0;
                for (first, n) in chunks(total, max) {
                    assert_eq!(first, seen, "{ty}: chunks are contiguous");
                    assert!(n >= 1 && n <= max.max(1));
                    seen += n;
                    let mut out = vec![0u8; n * staged_block_bytes(kind)];
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
        let (cols, rows_a, rows_b) = (64usize, 9usize, 4usize);
        for ty in [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_1] {
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
            let chunk = 3 * src_block_bytes(ty) + 1;
            let mut st = Streamer::new(&gpu, &src, chunk.max(256)).expect("streamer");
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
            assert!(st.host_bytes() <= 2 * chunk.max(256) + 2);
            // A read error names the tensor and the offset.
            let short = Largest(&file[..ob as usize + 10], AtomicUsize::new(0));
            let mut st = Streamer::new(&gpu, &short, 256).expect("streamer");
            let e = st
                .matrix(&gpu, &[&ta, &tb])
                .expect_err("short source")
                .to_string();
            assert!(e.contains("tensor b"), "{e}");
        }
    }
}
