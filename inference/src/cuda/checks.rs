//! GPU-versus-CPU checks of every kernel, and the scalar references they are checked against.
//!
//! [`run_kernel_checks`] launches each kernel on small random inputs and compares with the
//! references below (which are plain, obviously-correct Rust, unit-tested on the CPU).
//! [`compare_backends`] compares a whole model on the GPU with the CPU reference backend.
//! Both return [`CheckResult`]s instead of stopping at the first problem, so one run on a GPU
//! machine reports everything. Used by `tests/cuda.rs` and the `gpu-check` binary.
//!
//! Tolerances (stated per check): mat-vec/mat-mat compare `|gpu - cpu| / sum_j |w_j x_j|`
//! (accumulation order differs) against 1e-5; element-wise kernels use a relative error
//! against 1e-5 (precise `expf`, `sqrtf`); RoPE/attention an absolute 1e-4 on O(1) values;
//! dequantization (embedding) must be exact; argmax must be the exact index.

use super::device::{Arg, CudaError, DevBuf, Gpu};
use super::kernels::{
    REDUCE_THREADS, Shape, WeightKind, attention_shape, elementwise_shape, matmul_shape,
    matvec_shape, matvecq_shape,
};
use super::weights::{GpuMatrix, repack};
use crate::backend::Backend;
use crate::gguf::GgmlType;
use crate::model::TensorRef;
use crate::quant::{dequantize_vec, quantize};

use super::backend::CudaBackend;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckResult {
    /// What was checked.
    pub name: String,
    /// Whether it is within tolerance.
    pub passed: bool,
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Largest relative difference (as defined by the check).
    pub max_rel: f64,
    /// The tolerance applied (to `max_rel` unless the detail says otherwise).
    pub tolerance: f64,
    /// Free text (shapes, the failure).
    pub detail: String,
}

impl CheckResult {
    fn error(name: &str, e: impl std::fmt::Display) -> Self {
        CheckResult {
            name: name.to_string(),
            passed: false,
            max_abs: f64::NAN,
            max_rel: f64::NAN,
            tolerance: 0.0,
            detail: format!("error: {e}"),
        }
    }

    /// One line: `PASS name  max_abs=.. max_rel=.. tol=..  detail`.
    pub fn line(&self) -> String {
        format!(
            "{} {:<34} max_abs={:<10.3e} max_rel={:<10.3e} tol={:<8.1e} {}",
            if self.passed { "PASS" } else { "FAIL" },
            self.name,
            self.max_abs,
            self.max_rel,
            self.tolerance,
            self.detail
        )
    }
}

/// Deterministic xorshift generator for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next raw value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [-1, 1).
    pub fn sym(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.sym() * scale).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar references.

/// `x * w / sqrt(mean(x^2) + eps)`.
pub fn rmsnorm_ref(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ss: f64 = x.iter().map(|v| (*v as f64) * (*v as f64)).sum();
    let inv = 1.0 / ((ss / x.len() as f64) + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(a, b)| ((*a as f64) * inv * (*b as f64)) as f32)
        .collect()
}

/// Rotates `n_heads` heads of `hd` in `v` for position `pos` (NORM or NEOX pairing; optional
/// per-pair frequency divisors).
pub fn rope_ref(
    v: &mut [f32],
    n_heads: usize,
    hd: usize,
    pos: usize,
    base: f32,
    neox: bool,
    ff: Option<&[f32]>,
) {
    let half = hd / 2;
    for h in 0..n_heads {
        for i in 0..half {
            let mut freq = (base as f64).powf(-2.0 * i as f64 / hd as f64);
            if let Some(f) = ff {
                freq /= f[i] as f64;
            }
            let ang = pos as f64 * freq;
            let (s, c) = ang.sin_cos();
            let (a, b) = if neox {
                (i, i + half)
            } else {
                (2 * i, 2 * i + 1)
            };
            let x0 = v[h * hd + a] as f64;
            let x1 = v[h * hd + b] as f64;
            v[h * hd + a] = (x0 * c - x1 * s) as f32;
            v[h * hd + b] = (x0 * s + x1 * c) as f32;
        }
    }
}

/// Causal GQA attention of one query row `q` (`nh*hd`) over cache rows `0..n` (`kvdim` each).
pub fn attention_ref(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    n: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
) -> Vec<f32> {
    let kvdim = nkv * hd;
    let group = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0f32; nh * hd];
    for h in 0..nh {
        let kvh = h / group;
        let s: Vec<f64> = (0..n)
            .map(|j| {
                (0..hd)
                    .map(|d| q[h * hd + d] as f64 * kc[j * kvdim + kvh * hd + d] as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for d in 0..hd {
            let acc: f64 = (0..n)
                .map(|j| e[j] * vc[j * kvdim + kvh * hd + d] as f64)
                .sum();
            out[h * hd + d] = (acc / z) as f32;
        }
    }
    out
}

/// `silu(g) * u`.
pub fn silu_mul_ref(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter()
        .zip(u)
        .map(|(a, b)| {
            let a = *a as f64;
            (a / (1.0 + (-a).exp()) * *b as f64) as f32
        })
        .collect()
}

/// Index of the largest value (first on ties; NaN ignored).
pub fn argmax_ref(v: &[f32]) -> usize {
    let mut best = f32::NEG_INFINITY;
    let mut bi = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > best {
            best = x;
            bi = i;
        }
    }
    bi
}

/// The nucleus (top-p set) of `logits` at `temperature`: the most probable tokens whose mass
/// first reaches `top_p`, as a sorted index list.
pub fn nucleus_ref(logits: &[f32], temperature: f32, top_p: f32) -> Vec<usize> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - m) / temperature.max(1e-6) as f64).exp())
        .collect();
    let z: f64 = e.iter().sum();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|a, b| e[*b].total_cmp(&e[*a]));
    let mut acc = 0.0;
    let mut out = Vec::new();
    for i in idx {
        out.push(i);
        acc += e[i] / z;
        if acc >= top_p as f64 {
            break;
        }
    }
    out.sort_unstable();
    out
}

/// Max absolute and max relative (|d| / max(|ref|, floor)) differences.
pub fn diff(gpu: &[f32], cpu: &[f32], floor: f64) -> (f64, f64) {
    let mut ma = 0f64;
    let mut mr = 0f64;
    if gpu.len() != cpu.len() {
        return (f64::INFINITY, f64::INFINITY);
    }
    for (a, b) in gpu.iter().zip(cpu) {
        let d = (*a as f64 - *b as f64).abs();
        let d = if d.is_nan() { f64::INFINITY } else { d };
        ma = ma.max(d);
        mr = mr.max(d / (*b as f64).abs().max(floor));
    }
    (ma, mr)
}

// ---------------------------------------------------------------------------------------------
// GPU checks.

fn result(name: &str, max_abs: f64, max_rel: f64, tol: f64, detail: String) -> CheckResult {
    CheckResult {
        name: name.to_string(),
        passed: max_rel <= tol,
        max_abs,
        max_rel,
        tolerance: tol,
        detail,
    }
}

fn upload_u32(gpu: &Gpu, v: &[u32]) -> Result<DevBuf, CudaError> {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    gpu.upload(&b)
}

fn upload_i32(gpu: &Gpu, v: i32) -> Result<DevBuf, CudaError> {
    gpu.upload(&v.to_le_bytes())
}

const ALL_TYPES: [GgmlType; 6] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
];

/// The K-quant types (rows of whole 256-element super-blocks).
const K_TYPES: [GgmlType; 4] = [
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
];

struct TestMatrix {
    bytes: Vec<u8>,
    dense: Vec<f32>,
}

fn test_matrix(ty: GgmlType, rows: usize, k: usize, rng: &mut Rng) -> Result<TestMatrix, String> {
    let vals = rng.vec(rows * k, 1.0);
    let bytes = quantize(ty, &vals).map_err(|e| e.to_string())?;
    let dense = dequantize_vec(ty, &bytes, rows * k).map_err(|e| e.to_string())?;
    Ok(TestMatrix { bytes, dense })
}

fn gpu_matrix(
    gpu: &Gpu,
    ty: GgmlType,
    rows: usize,
    k: usize,
    bytes: &[u8],
) -> Result<GpuMatrix, String> {
    let t = TensorRef {
        name: "check".into(),
        ty,
        dims: vec![k as u64, rows as u64],
        data: bytes,
        offset: 0,
        size: bytes.len() as u64,
    };
    let r = repack(&[&t]).map_err(|e| e.to_string())?;
    GpuMatrix::upload(gpu, &r).map_err(|e| e.to_string())
}

/// Reference `W x` for dense row-major `w` (`rows x k`), with the sum of |w_j x_j| per row.
fn matvec_dense(w: &[f32], x: &[f32], rows: usize, k: usize) -> (Vec<f32>, Vec<f64>) {
    let mut y = Vec::with_capacity(rows);
    let mut mag = Vec::with_capacity(rows);
    for r in 0..rows {
        let row = &w[r * k..(r + 1) * k];
        y.push(
            row.iter()
                .zip(x)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>() as f32,
        );
        mag.push(
            row.iter()
                .zip(x)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum::<f64>(),
        );
    }
    (y, mag)
}

fn scaled_err(gpu: &[f32], cpu: &[f32], mag: &[f64]) -> (f64, f64) {
    let mut ma = 0f64;
    let mut mr = 0f64;
    for ((a, b), m) in gpu.iter().zip(cpu).zip(mag) {
        let d = (*a as f64 - *b as f64).abs();
        let d = if d.is_nan() { f64::INFINITY } else { d };
        ma = ma.max(d);
        mr = mr.max(d / m.max(1e-12));
    }
    (ma, mr)
}

/// Random inputs of a single-token mat-vec check (drawn in this order: matrix, x, norm weights,
/// bias, initial y of `y_len` values) and the vector `v` the kernel multiplies: x, rmsnorm(x) *
/// pw (`pre` 1) or silu(x[..k]) * x[k..] (`pre` 2, x of 2k values).
struct MatvecCase {
    tm: TestMatrix,
    m: GpuMatrix,
    eps: f32,
    x: Vec<f32>,
    pw: Vec<f32>,
    bias: Vec<f32>,
    y0: Vec<f32>,
    v: Vec<f32>,
}

impl MatvecCase {
    #[allow(clippy::too_many_arguments)]
    fn new(
        gpu: &Gpu,
        ty: GgmlType,
        rows: usize,
        k: usize,
        seed: u64,
        pre: i32,
        y_len: usize,
    ) -> Result<Self, String> {
        let mut rng = Rng::new(seed);
        let tm = test_matrix(ty, rows, k, &mut rng)?;
        let m = gpu_matrix(gpu, ty, rows, k, &tm.bytes)?;
        let eps = 1e-5f32;
        let x = rng.vec(if pre == 2 { 2 * k } else { k }, 2.0);
        let pw = rng.vec(k, 1.0);
        let bias = rng.vec(rows, 1.0);
        let y0 = rng.vec(y_len, 1.0);
        let v: Vec<f32> = match pre {
            1 => rmsnorm_ref(&x, &pw, eps),
            2 => silu_mul_ref(&x[..k], &x[k..]),
            _ => x.clone(),
        };
        Ok(MatvecCase {
            tm,
            m,
            eps,
            x,
            pw,
            bias,
            y0,
            v,
        })
    }

    /// Reference `W v` (f64 sums) with `v` replaced by `v`, plus the bias when `with_bias`,
    /// and the per-row sums of |terms| the errors are scaled by.
    fn reference(&self, v: &[f32], rows: usize, k: usize, with_bias: bool) -> (Vec<f32>, Vec<f64>) {
        let (mut y, mut mag) = matvec_dense(&self.tm.dense, v, rows, k);
        if with_bias {
            for r in 0..rows {
                y[r] += self.bias[r];
                mag[r] += self.bias[r].abs() as f64;
            }
        }
        (y, mag)
    }
}

/// `pre`: 0 plain x; 1 fused RMSNorm (with a bias); 2 fused SiLU gating (with a bias).
fn check_matvec(
    gpu: &Gpu,
    ty: GgmlType,
    rows: usize,
    k: usize,
    seed: u64,
    pre: i32,
) -> Result<CheckResult, String> {
    let c = MatvecCase::new(gpu, ty, rows, k, seed, pre, rows)?;
    let (yref, mag) = c.reference(&c.v, rows, k, pre != 0);
    let MatvecCase {
        m,
        eps,
        x,
        pw,
        bias,
        y0,
        ..
    } = c;
    let e = |e: CudaError| e.to_string();
    let dx = gpu.upload_f32(&x).map_err(e)?;
    let dpw = gpu.upload_f32(&pw).map_err(e)?;
    let dbias = gpu.upload_f32(&bias).map_err(e)?;
    let (qs, d, mm) = m.ptrs();
    let mut worst = (0f64, 0f64);
    for acc in [0, 1] {
        let dyb = gpu.upload_f32(&y0).map_err(e)?;
        gpu.launch(
            &format!("matvec_{}", m.kind.suffix()),
            matvec_shape(rows, k),
            &[
                Arg::Ptr(qs),
                Arg::Ptr(d),
                Arg::Ptr(mm),
                Arg::Ptr(dx.ptr),
                Arg::Ptr(dyb.ptr),
                Arg::I32(rows as i32),
                Arg::I32(k as i32),
                Arg::I32(acc),
                Arg::I32(pre),
                Arg::Ptr(if pre == 1 { dpw.ptr } else { 0 }),
                Arg::F32(eps),
                Arg::Ptr(if pre != 0 { dbias.ptr } else { 0 }),
            ],
        )
        .map_err(e)?;
        gpu.sync().map_err(e)?;
        let got = gpu.read_f32(&dyb, 0, rows).map_err(e)?;
        let want: Vec<f32> = if acc == 1 {
            yref.iter().zip(&y0).map(|(a, b)| a + b).collect()
        } else {
            yref.clone()
        };
        let mag2: Vec<f64> = if acc == 1 {
            mag.iter()
                .zip(&y0)
                .map(|(m, b)| m + (*b as f64).abs())
                .collect()
        } else {
            mag.clone()
        };
        let (a, r) = scaled_err(&got, &want, &mag2);
        worst = (worst.0.max(a), worst.1.max(r));
    }
    let what = match pre {
        1 => " +rmsnorm+bias",
        2 => " +silu-gate+bias",
        _ => "",
    };
    Ok(result(
        &format!("matvec_{} {rows}x{k}{what}", m.kind.suffix()),
        worst.0,
        worst.1,
        1e-5,
        "y=Wv and y+=Wv; rel = |d| / sum|w v|".into(),
    ))
}

/// Reads `k` values' worth of the device int8 activation layout (`quantize_act`: elements 0..15
/// of every block, then 16..31, then the scales, then the scaled sums) back into blocks in the
/// CPU kernels' form, for comparison with [`crate::kernels::quantize_q8`].
fn read_act_q8(
    gpu: &Gpu,
    buf: &DevBuf,
    k: usize,
) -> Result<Vec<crate::kernels::BlockQ8>, CudaError> {
    let raw = gpu.read(buf, 0, super::kernels::act_q8_bytes(k))?;
    let nb = k / 32;
    let f32_at = |o: usize| f32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
    Ok((0..nb)
        .map(|b| crate::kernels::BlockQ8 {
            d: f32_at(nb * 32 + 4 * b),
            s: f32_at(nb * 36 + 4 * b),
            qs: std::array::from_fn(|j| {
                let off = if j < 16 {
                    b * 16 + j
                } else {
                    nb * 16 + b * 16 + j - 16
                };
                raw[off] as i8
            }),
        })
        .collect())
}

/// The activation as `matvecq` sees it: quantized per 32 elements like the CPU kernels
/// ([`crate::kernels::quantize_q8`]) and dequantized again.
fn q8_roundtrip(v: &[f32]) -> Vec<f32> {
    let mut blocks = vec![crate::kernels::BlockQ8::default(); v.len() / 32];
    crate::kernels::quantize_q8(v, &mut blocks);
    blocks
        .iter()
        .flat_map(|b| b.qs.iter().map(move |q| *q as f32 * b.d))
        .collect()
}

/// `matvecq_<type>` (int8 activations, dp4a) against dequantized weights times the
/// Q8-rounded activation. `pre` as in [`check_matvec`] (bias with 1 and 2); `pair`: the
/// gate|up form (epi 2: `rows` = 2n rows in, y[i] = silu(gate_i.v) * up_i.v out, no bias).
fn check_matvecq(
    gpu: &Gpu,
    ty: GgmlType,
    rows: usize,
    k: usize,
    seed: u64,
    pre: i32,
    pair: bool,
) -> Result<CheckResult, String> {
    let out_rows = if pair { rows / 2 } else { rows };
    let c = MatvecCase::new(gpu, ty, rows, k, seed, pre, out_rows)?;
    let use_bias = pre != 0 && !pair;
    let (mut yref, mut mag) = c.reference(&q8_roundtrip(&c.v), rows, k, use_bias);
    let MatvecCase {
        m,
        eps,
        x,
        pw,
        bias,
        y0,
        v,
        ..
    } = c;
    if pair {
        let n = rows / 2;
        let g: Vec<f32> = yref[..n].to_vec();
        let u: Vec<f32> = yref[n..].to_vec();
        let m2: Vec<f64> = (0..n)
            .map(|i| mag[i] * (u[i].abs() as f64) + mag[n + i] + 1e-3)
            .collect();
        yref = silu_mul_ref(&g, &u);
        mag = m2;
    }
    let e = |e: CudaError| e.to_string();
    let dx = gpu.upload_f32(&x).map_err(e)?;
    let dpw = gpu.upload_f32(&pw).map_err(e)?;
    let dbias = gpu.upload_f32(&bias).map_err(e)?;
    let (qs, d, mm) = m.ptrs();
    let mut worst = (0f64, 0f64);
    let epis: &[i32] = if pair { &[2] } else { &[0, 1, 3] };
    let dxq = gpu.alloc(super::kernels::act_q8_bytes(k)).map_err(e)?;
    gpu.launch(
        "quantize_act",
        super::kernels::quantize_act_shape(k),
        &[
            Arg::Ptr(dx.ptr),
            Arg::Ptr(dxq.ptr),
            Arg::I32(k as i32),
            Arg::I32(pre),
            Arg::Ptr(if pre == 1 { dpw.ptr } else { 0 }),
            Arg::F32(eps),
        ],
    )
    .map_err(e)?;
    // The quantized activation must equal the CPU kernels' quantization of v (bit for bit
    // for the plain input; the norm/SiLU inputs may differ by one rounding step).
    let mut want_q = vec![crate::kernels::BlockQ8::default(); k / 32];
    crate::kernels::quantize_q8(&v, &mut want_q);
    let got_q = read_act_q8(gpu, &dxq, k).map_err(e)?;
    let mut q_mismatch = 0usize;
    for (g, w) in got_q.iter().zip(&want_q) {
        for (gq, wq) in g.qs.iter().zip(&w.qs) {
            if (*gq as i32 - *wq as i32).abs() > 1 || (pre == 0 && gq != wq) {
                q_mismatch += 1;
            }
        }
        if ((g.d - w.d).abs() as f64) > 1e-6 * (w.d.abs() as f64).max(1e-30) {
            q_mismatch += 1;
        }
    }
    if q_mismatch > 0 {
        return Err(format!(
            "quantize_act: {q_mismatch} values differ from the CPU quantization"
        ));
    }
    let dbest = gpu.alloc(16).map_err(e)?;
    let mut argmax_ok = true;
    for &epi in epis {
        let dyb = gpu.upload_f32(&y0).map_err(e)?;
        let (shape, ks) = matvecq_shape(rows, k, pair, gpu.info.sm_count.max(1) as u32, 2);
        gpu.launch(
            &format!("matvecq_{}", m.kind.suffix()),
            shape,
            &[
                Arg::Ptr(qs),
                Arg::Ptr(d),
                Arg::Ptr(mm),
                Arg::Ptr(dxq.ptr),
                Arg::Ptr(dyb.ptr),
                Arg::I32(rows as i32),
                Arg::I32(k as i32),
                Arg::I32(epi),
                Arg::I32(ks as i32),
                Arg::Ptr(if use_bias { dbias.ptr } else { 0 }),
                Arg::Ptr(dbest.ptr),
            ],
        )
        .map_err(e)?;
        gpu.sync().map_err(e)?;
        let got = gpu.read_f32(&dyb, 0, out_rows).map_err(e)?;
        let (want, mag2): (Vec<f32>, Vec<f64>) = if epi == 1 {
            (
                yref.iter().zip(&y0).map(|(a, b)| a + b).collect(),
                mag.iter()
                    .zip(&y0)
                    .map(|(m, b)| m + (*b as f64).abs())
                    .collect(),
            )
        } else {
            (yref.clone(), mag.clone())
        };
        let (a, r) = scaled_err(&got, &want, &mag2);
        worst = (worst.0.max(a), worst.1.max(r));
        if epi == 3 {
            // The fused argmax must name the first index of the largest value the kernel wrote.
            let key = u64::from_le_bytes(
                gpu.read(&dbest, 0, 8).map_err(e)?[..8]
                    .try_into()
                    .map_err(|_| "short read".to_string())?,
            );
            let idx = (u32::MAX - (key & 0xFFFF_FFFF) as u32) as usize;
            argmax_ok = key != 0 && idx == argmax_ref(&got);
        }
    }
    if !argmax_ok {
        return Err(
            "matvecq epi 3: fused argmax differs from the argmax of the written logits".into(),
        );
    }
    let what = match (pre, pair) {
        (_, true) => " +rmsnorm, silu pair",
        (1, _) => " +rmsnorm+bias",
        (2, _) => " +silu-gate+bias",
        _ => "",
    };
    Ok(result(
        &format!("matvecq_{} {rows}x{k}{what}", m.kind.suffix()),
        worst.0,
        worst.1,
        // The activation's int8 rounding can differ from the reference's by one step where
        // the f32 pre-processing differs in the last bit; indexing errors are O(1).
        1e-3,
        "int8 activation; y=Wv, y+=Wv; rel = |d| / sum|w v|".into(),
    ))
}

fn check_rope_kv(gpu: &Gpu, neox: bool, t: usize) -> Result<CheckResult, String> {
    let (nh, nkv, hd, max_ctx) = (6usize, 2usize, 64usize, 32usize);
    let (qdim, kvdim) = (nh * hd, nkv * hd);
    let w = qdim + 2 * kvdim;
    let pos0 = 9usize;
    let base = 10_000.0f32;
    let mut rng = Rng::new(31 + t as u64);
    let qkv = rng.vec(t * w, 1.0);
    let kc0 = rng.vec(max_ctx * kvdim, 1.0);
    let vc0 = rng.vec(max_ctx * kvdim, 1.0);
    let e = |e: CudaError| e.to_string();
    let dq = gpu.upload_f32(&qkv).map_err(e)?;
    let dkc = gpu.upload_f32(&kc0).map_err(e)?;
    let dvc = gpu.upload_f32(&vc0).map_err(e)?;
    let dpos = upload_i32(gpu, pos0 as i32).map_err(e)?;
    gpu.launch(
        "rope_kv",
        super::kernels::rope_kv_shape(nh, nkv, hd, t),
        &[
            Arg::Ptr(dq.ptr),
            Arg::Ptr(dkc.ptr),
            Arg::Ptr(dvc.ptr),
            Arg::Ptr(dpos.ptr),
            Arg::I32(nh as i32),
            Arg::I32(nkv as i32),
            Arg::I32(hd as i32),
            Arg::F32(base),
            Arg::I32(neox as i32),
            Arg::Ptr(0),
            Arg::I32(max_ctx as i32),
        ],
    )
    .map_err(e)?;
    gpu.sync().map_err(e)?;
    let got_q = gpu.read_f32(&dq, 0, t * w).map_err(e)?;
    let got_k = gpu.read_f32(&dkc, 0, max_ctx * kvdim).map_err(e)?;
    let got_v = gpu.read_f32(&dvc, 0, max_ctx * kvdim).map_err(e)?;
    let mut want_q = qkv.clone();
    let mut want_k = kc0.clone();
    let mut want_v = vc0.clone();
    for tt in 0..t {
        let p = pos0 + tt;
        rope_ref(
            &mut want_q[tt * w..tt * w + qdim + kvdim],
            nh + nkv,
            hd,
            p,
            base,
            neox,
            None,
        );
        want_k[p * kvdim..(p + 1) * kvdim]
            .copy_from_slice(&want_q[tt * w + qdim..tt * w + qdim + kvdim]);
        want_v[p * kvdim..(p + 1) * kvdim]
            .copy_from_slice(&qkv[tt * w + qdim + kvdim..(tt + 1) * w]);
    }
    let a = diff(&got_q, &want_q, 1.0)
        .0
        .max(diff(&got_k, &want_k, 1.0).0)
        .max(diff(&got_v, &want_v, 1.0).0);
    Ok(result(
        &format!(
            "rope_kv {} T={t} pos=9..",
            if neox { "neox" } else { "norm" }
        ),
        a,
        a,
        1e-4,
        "fused rope + cache store; absolute; other cache rows untouched".into(),
    ))
}

fn check_matmul(
    gpu: &Gpu,
    ty: GgmlType,
    rows: usize,
    k: usize,
    t: usize,
    seed: u64,
) -> Result<CheckResult, String> {
    let mut rng = Rng::new(seed);
    let tm = test_matrix(ty, rows, k, &mut rng)?;
    let m = gpu_matrix(gpu, ty, rows, k, &tm.bytes)?;
    let x = rng.vec(t * k, 1.0);
    let ldy = rows + 5;
    let off = 3usize;
    let y0 = rng.vec(t * ldy + off, 1.0);
    let e = |e: CudaError| e.to_string();
    let dx = gpu.upload_f32(&x).map_err(e)?;
    let (qs, d, mm) = m.ptrs();
    let mut worst = (0f64, 0f64);
    for acc in [0, 1] {
        let dy = gpu.upload_f32(&y0).map_err(e)?;
        gpu.launch(
            &format!("matmul_{}", m.kind.suffix()),
            matmul_shape(rows, t),
            &[
                Arg::Ptr(qs),
                Arg::Ptr(d),
                Arg::Ptr(mm),
                Arg::Ptr(dx.ptr),
                Arg::Ptr(dy.f32_at(off)),
                Arg::I32(rows as i32),
                Arg::I32(k as i32),
                Arg::I32(t as i32),
                Arg::I32(ldy as i32),
                Arg::I32(acc),
            ],
        )
        .map_err(e)?;
        gpu.sync().map_err(e)?;
        let got = gpu.read_f32(&dy, 0, t * ldy + off).map_err(e)?;
        let mut want = y0.clone();
        let mut mag = vec![1e-12f64; want.len()];
        for tt in 0..t {
            let (yr, mg) = matvec_dense(&tm.dense, &x[tt * k..(tt + 1) * k], rows, k);
            for r in 0..rows {
                let i = off + tt * ldy + r;
                want[i] = if acc == 1 { yr[r] + y0[i] } else { yr[r] };
                mag[i] = mg[r] + if acc == 1 { y0[i].abs() as f64 } else { 0.0 };
            }
        }
        // Elements outside the written rows must be untouched (mag 1e-12 makes any change fail).
        let (a, r) = scaled_err(&got, &want, &mag);
        worst = (worst.0.max(a), worst.1.max(r));
    }
    Ok(result(
        &format!("matmul_{} {rows}x{k} T={t}", m.kind.suffix()),
        worst.0,
        worst.1,
        1e-5,
        format!("ldy={ldy}, y offset {off}, = and +=; untouched gaps checked"),
    ))
}

fn check_embed(gpu: &Gpu, ty: GgmlType, seed: u64) -> Result<CheckResult, String> {
    let rows = 50usize;
    let k = if K_TYPES.contains(&ty) { 512 } else { 96 };
    let mut rng = Rng::new(seed);
    let tm = test_matrix(ty, rows, k, &mut rng)?;
    let m = gpu_matrix(gpu, ty, rows, k, &tm.bytes)?;
    let toks = [0u32, 7, 49, 13];
    let e = |e: CudaError| e.to_string();
    let dt = upload_u32(gpu, &toks).map_err(e)?;
    let out = gpu.alloc(toks.len() * k * 4).map_err(e)?;
    let (qs, d, mm) = m.ptrs();
    gpu.launch(
        &format!("embed_{}", m.kind.suffix()),
        Shape {
            grid: (toks.len() as u32, 1, 1),
            block: (128, 1, 1),
            smem: 0,
        },
        &[
            Arg::Ptr(qs),
            Arg::Ptr(d),
            Arg::Ptr(mm),
            Arg::Ptr(dt.ptr),
            Arg::Ptr(out.ptr),
            Arg::I32(k as i32),
            Arg::I32(rows as i32),
        ],
    )
    .map_err(e)?;
    gpu.sync().map_err(e)?;
    let got = gpu.read_f32(&out, 0, toks.len() * k).map_err(e)?;
    let want: Vec<f32> = toks
        .iter()
        .flat_map(|&t| tm.dense[t as usize * k..(t as usize + 1) * k].to_vec())
        .collect();
    let (a, r) = diff(&got, &want, 1e-30);
    Ok(result(
        &format!("embed_{} (dequant rows)", m.kind.suffix()),
        a,
        r,
        0.0,
        "must equal the reference dequantization exactly".into(),
    ))
}

fn check_rmsnorm(gpu: &Gpu) -> Result<CheckResult, String> {
    let (t, n) = (3usize, 576usize);
    let mut rng = Rng::new(11);
    let x = rng.vec(t * n, 2.0);
    let w = rng.vec(n, 1.0);
    let eps = 1e-5f32;
    let e = |e: CudaError| e.to_string();
    let dx = gpu.upload_f32(&x).map_err(e)?;
    let dw = gpu.upload_f32(&w).map_err(e)?;
    let out = gpu.alloc(t * n * 4).map_err(e)?;
    gpu.launch(
        "rmsnorm",
        Shape {
            grid: (t as u32, 1, 1),
            block: (256, 1, 1),
            smem: 0,
        },
        &[
            Arg::Ptr(dx.ptr),
            Arg::Ptr(dw.ptr),
            Arg::Ptr(out.ptr),
            Arg::I32(n as i32),
            Arg::F32(eps),
        ],
    )
    .map_err(e)?;
    gpu.sync().map_err(e)?;
    let got = gpu.read_f32(&out, 0, t * n).map_err(e)?;
    let want: Vec<f32> = (0..t)
        .flat_map(|i| rmsnorm_ref(&x[i * n..(i + 1) * n], &w, eps))
        .collect();
    let (a, r) = diff(&got, &want, 1e-3);
    Ok(result("rmsnorm 3x576", a, r, 1e-5, "rel floor 1e-3".into()))
}

/// `qk_norm` (qwen3): every q and k head of T rows normalised in place with its weights, v
/// untouched; with a null k weight pointer the k heads stay as they are.
fn check_qk_norm(gpu: &Gpu, with_k: bool) -> Result<CheckResult, String> {
    let (t, nh, nkv, hd) = (3usize, 4usize, 2usize, 64usize);
    let (qdim, kvdim) = (nh * hd, nkv * hd);
    let stride = qdim + 2 * kvdim;
    let mut rng = Rng::new(17 + with_k as u64);
    let qkv = rng.vec(t * stride, 3.0);
    let qw = rng.vec(hd, 1.0);
    let kw = rng.vec(hd, 1.0);
    let eps = 1e-6f32;
    let e = |e: CudaError| e.to_string();
    let dq = gpu.upload_f32(&qkv).map_err(e)?;
    let dqw = gpu.upload_f32(&qw).map_err(e)?;
    let dkw = gpu.upload_f32(&kw).map_err(e)?;
    gpu.launch(
        "qk_norm",
        Shape {
            grid: ((nh + nkv) as u32, t as u32, 1),
            block: (32, 1, 1),
            smem: 0,
        },
        &[
            Arg::Ptr(dq.ptr),
            Arg::Ptr(dqw.ptr),
            Arg::Ptr(if with_k { dkw.ptr } else { 0 }),
            Arg::I32(nh as i32),
            Arg::I32(hd as i32),
            Arg::I32(stride as i32),
            Arg::F32(eps),
        ],
    )
    .map_err(e)?;
    gpu.sync().map_err(e)?;
    let got = gpu.read_f32(&dq, 0, t * stride).map_err(e)?;
    let mut want = qkv.clone();
    for tt in 0..t {
        for h in 0..nh + if with_k { nkv } else { 0 } {
            let at = tt * stride + h * hd;
            let w = if h < nh { &qw } else { &kw };
            let y = rmsnorm_ref(&qkv[at..at + hd], w, eps);
            want[at..at + hd].copy_from_slice(&y);
        }
    }
    let (a, r) = diff(&got, &want, 1e-3);
    Ok(result(
        &format!(
            "qk_norm T={t} {nh}+{nkv} heads of {hd}{}",
            if with_k { "" } else { " (no k norm)" }
        ),
        a,
        r,
        1e-5,
        "per-head RMSNorm in place; v (and k without weights) untouched; rel floor 1e-3".into(),
    ))
}

fn check_rope(gpu: &Gpu, neox: bool, with_ff: bool) -> Result<CheckResult, String> {
    let (t, heads, hd) = (4usize, 5usize, 64usize);
    let stride = heads * hd + 64; // trailing 64 floats must stay untouched
    let pos0 = 7usize;
    let base = 10_000.0f32;
    let mut rng = Rng::new(13);
    let x = rng.vec(t * stride, 1.0);
    let ffv: Vec<f32> = (0..hd / 2).map(|i| 1.0 + i as f32 * 0.25).collect();
    let e = |e: CudaError| e.to_string();
    let dx = gpu.upload_f32(&x).map_err(e)?;
    let dpos = upload_i32(gpu, pos0 as i32).map_err(e)?;
    let dff = gpu.upload_f32(&ffv).map_err(e)?;
    gpu.launch(
        "rope",
        Shape {
            grid: (t as u32, 1, 1),
            block: (256, 1, 1),
            smem: 0,
        },
        &[
            Arg::Ptr(dx.ptr),
            Arg::Ptr(dpos.ptr),
            Arg::I32(heads as i32),
            Arg::I32(hd as i32),
            Arg::I32(stride as i32),
            Arg::F32(base),
            Arg::I32(neox as i32),
            Arg::Ptr(if with_ff { dff.ptr } else { 0 }),
        ],
    )
    .map_err(e)?;
    gpu.sync().map_err(e)?;
    let got = gpu.read_f32(&dx, 0, t * stride).map_err(e)?;
    let mut want = x.clone();
    for tt in 0..t {
        rope_ref(
            &mut want[tt * stride..tt * stride + heads * hd],
            heads,
            hd,
            pos0 + tt,
            base,
            neox,
            if with_ff { Some(&ffv) } else { None },
        );
    }
    let (a, _) = diff(&got, &want, 1.0);
    Ok(result(
        &format!(
            "rope {}{} T=4 pos=7..10",
            if neox { "neox" } else { "norm" },
            if with_ff { "+freqs" } else { "" }
        ),
        a,
        a,
        1e-4,
        "absolute; tail of each row untouched".into(),
    ))
}

fn check_attention(gpu: &Gpu, hd: usize, t: usize, pos0: usize) -> Result<CheckResult, String> {
    let (nh, nkv) = (8usize, 2usize);
    let max_ctx = pos0 + t + 11;
    let kvdim = nkv * hd;
    let qdim = nh * hd;
    let w = qdim + 2 * kvdim;
    let mut rng = Rng::new(17 + hd as u64 + t as u64);
    let mut kc = rng.vec(max_ctx * kvdim, 1.0);
    let mut vc = rng.vec(max_ctx * kvdim, 1.0);
    let qkv = rng.vec(t * w, 1.0);
    let e = |e: CudaError| e.to_string();
    let dkc = gpu.upload_f32(&kc).map_err(e)?;
    let dvc = gpu.upload_f32(&vc).map_err(e)?;
    let dq = gpu.upload_f32(&qkv).map_err(e)?;
    let dpos = upload_i32(gpu, pos0 as i32).map_err(e)?;
    let out = gpu.alloc(t * qdim * 4).map_err(e)?;
    // One token: the kernel also quantizes its output for the next int8 mat-vec.
    let dxq = gpu.alloc(super::kernels::act_q8_bytes(qdim)).map_err(e)?;
    gpu.launch(
        "kv_store",
        Shape {
            grid: (t as u32, 1, 1),
            block: (256, 1, 1),
            smem: 0,
        },
        &[
            Arg::Ptr(dq.ptr),
            Arg::Ptr(dkc.ptr),
            Arg::Ptr(dvc.ptr),
            Arg::Ptr(dpos.ptr),
            Arg::I32(qdim as i32),
            Arg::I32(kvdim as i32),
            Arg::I32(max_ctx as i32),
        ],
    )
    .map_err(e)?;
    gpu.launch(
        "attention",
        attention_shape(nh, t, hd, max_ctx),
        &[
            Arg::Ptr(dq.ptr),
            Arg::Ptr(dkc.ptr),
            Arg::Ptr(dvc.ptr),
            Arg::Ptr(out.ptr),
            Arg::Ptr(dpos.ptr),
            Arg::I32(nh as i32),
            Arg::I32(nkv as i32),
            Arg::I32(hd as i32),
            Arg::I32(max_ctx as i32),
            Arg::F32(1.0 / (hd as f32).sqrt()),
            Arg::Ptr(if t == 1 && hd.is_multiple_of(32) {
                dxq.ptr
            } else {
                0
            }),
        ],
    )
    .map_err(e)?;
    gpu.sync().map_err(e)?;
    let got = gpu.read_f32(&out, 0, t * qdim).map_err(e)?;
    if t == 1 && hd.is_multiple_of(32) {
        // Bit-exact: the quantization of the written output, as the CPU kernels do it.
        let mut want_q = vec![crate::kernels::BlockQ8::default(); qdim / 32];
        crate::kernels::quantize_q8(&got, &mut want_q);
        let got_q = read_act_q8(gpu, &dxq, qdim).map_err(e)?;
        for (b, (g, wq)) in got_q.iter().zip(&want_q).enumerate() {
            if let Some(j) = (0..32).find(|&j| g.qs[j] != wq.qs[j]) {
                return Err(format!(
                    "attention's quantized output differs at block {b} element {j}"
                ));
            }
            if g.d != wq.d {
                return Err(format!(
                    "attention's quantized output: scale of block {b} differs"
                ));
            }
        }
    }
    let got_kc = gpu.read_f32(&dkc, 0, max_ctx * kvdim).map_err(e)?;
    for tt in 0..t {
        let p = pos0 + tt;
        kc[p * kvdim..(p + 1) * kvdim].copy_from_slice(&qkv[tt * w + qdim..tt * w + qdim + kvdim]);
        vc[p * kvdim..(p + 1) * kvdim].copy_from_slice(&qkv[tt * w + qdim + kvdim..(tt + 1) * w]);
    }
    let mut want = Vec::with_capacity(t * qdim);
    for tt in 0..t {
        want.extend(attention_ref(
            &qkv[tt * w..tt * w + qdim],
            &kc,
            &vc,
            pos0 + tt + 1,
            nh,
            nkv,
            hd,
        ));
    }
    let (a, _) = diff(&got, &want, 1.0);
    let (ka, _) = diff(&got_kc, &kc, 1.0);
    let worst = a.max(ka);
    Ok(result(
        &format!("kv_store+attention hd={hd} T={t} pos={pos0}"),
        worst,
        worst,
        1e-4,
        format!("GQA {nh}q/{nkv}kv, causal from pos {pos0}; absolute"),
    ))
}

fn check_silu_and_bias(gpu: &Gpu) -> Result<Vec<CheckResult>, String> {
    let (t, ffn) = (2usize, 1000usize);
    let mut rng = Rng::new(19);
    let gu = rng.vec(t * 2 * ffn, 6.0);
    let e = |e: CudaError| e.to_string();
    let dgu = gpu.upload_f32(&gu).map_err(e)?;
    let out = gpu.alloc(t * ffn * 4).map_err(e)?;
    gpu.launch(
        "silu_mul",
        elementwise_shape(t * ffn),
        &[
            Arg::Ptr(dgu.ptr),
            Arg::Ptr(out.ptr),
            Arg::I32(ffn as i32),
            Arg::I32(t as i32),
        ],
    )
    .map_err(e)?;
    let b = rng.vec(2 * ffn, 1.0);
    let db = gpu.upload_f32(&b).map_err(e)?;
    // bias_add on the same gu buffer, rows of 2*ffn (after silu_mul has read it).
    gpu.launch(
        "bias_add",
        elementwise_shape(t * 2 * ffn),
        &[
            Arg::Ptr(dgu.ptr),
            Arg::Ptr(db.ptr),
            Arg::I32((2 * ffn) as i32),
            Arg::I32(t as i32),
        ],
    )
    .map_err(e)?;
    let add_x = rng.vec(t * ffn, 1.0);
    let dadd = gpu.upload_f32(&add_x).map_err(e)?;
    let y2 = gpu.alloc(t * ffn * 4).map_err(e)?; // zero-filled: 0 + x
    gpu.launch(
        "add_inplace",
        elementwise_shape(t * ffn),
        &[
            Arg::Ptr(y2.ptr),
            Arg::Ptr(dadd.ptr),
            Arg::I32((t * ffn) as i32),
        ],
    )
    .map_err(e)?;
    gpu.sync().map_err(e)?;
    let got = gpu.read_f32(&out, 0, t * ffn).map_err(e)?;
    let mut want = Vec::new();
    for tt in 0..t {
        want.extend(silu_mul_ref(
            &gu[tt * 2 * ffn..tt * 2 * ffn + ffn],
            &gu[tt * 2 * ffn + ffn..(tt + 1) * 2 * ffn],
        ));
    }
    let (a, r) = diff(&got, &want, 1e-3);
    let got_b = gpu.read_f32(&dgu, 0, t * 2 * ffn).map_err(e)?;
    let want_b: Vec<f32> = gu
        .iter()
        .enumerate()
        .map(|(i, v)| v + b[i % (2 * ffn)])
        .collect();
    let (ba, br) = diff(&got_b, &want_b, 1e-3);
    let got_add = gpu.read_f32(&y2, 0, t * ffn).map_err(e)?;
    let (aa, ar) = diff(&got_add, &add_x, 1e-3);
    Ok(vec![
        result("silu_mul 2x1000", a, r, 1e-5, "rel floor 1e-3".into()),
        result("bias_add 2x2000", ba, br, 1e-6, "rel floor 1e-3".into()),
        result(
            "add_inplace 2000",
            aa,
            ar,
            0.0,
            "0 + x must be exact".into(),
        ),
    ])
}

/// Control words for the token-picking kernels: token_in, out_tokens, counter, pos.
struct Ctl {
    token_in: DevBuf,
    out: DevBuf,
    counter: DevBuf,
    pos: DevBuf,
}

fn ctl(gpu: &Gpu, counter: i32, pos: i32) -> Result<Ctl, CudaError> {
    Ok(Ctl {
        token_in: gpu.alloc(4)?,
        out: gpu.alloc(64)?,
        counter: upload_i32(gpu, counter)?,
        pos: upload_i32(gpu, pos)?,
    })
}

fn read_ctl(gpu: &Gpu, c: &Ctl, slot: usize) -> Result<(u32, u32, i32, i32), CudaError> {
    let tin = gpu.read_u32(&c.token_in, 0, 1)?[0];
    let out = gpu.read_u32(&c.out, slot, 1)?[0];
    let cnt = gpu.read_u32(&c.counter, 0, 1)?[0] as i32;
    let pos = gpu.read_u32(&c.pos, 0, 1)?[0] as i32;
    Ok((tin, out, cnt, pos))
}

fn check_argmax(gpu: &Gpu) -> Result<CheckResult, String> {
    let n = 151_936usize;
    let mut rng = Rng::new(23);
    let e = |e: CudaError| e.to_string();
    let mut problems = Vec::new();
    for case in 0..3 {
        let mut v = rng.vec(n, 10.0);
        let planted = (rng.next_u64() % n as u64) as usize;
        match case {
            0 => v[planted] = 50.0,
            1 => {
                // Tie: two equal maxima, the first index wins.
                let other = (planted + 1 + n / 2) % n;
                v[planted] = 60.0;
                v[other] = 60.0;
            }
            _ => {
                v[planted] = 70.0;
                v[(planted + 3) % n] = f32::NAN;
            }
        }
        let want = argmax_ref(&v) as u32;
        let dl = gpu.upload_f32(&v).map_err(e)?;
        let c = ctl(gpu, 2, 40).map_err(e)?;
        gpu.launch(
            "argmax_step",
            Shape {
                grid: (1, 1, 1),
                block: (REDUCE_THREADS, 1, 1),
                smem: 0,
            },
            &[
                Arg::Ptr(dl.ptr),
                Arg::I32(n as i32),
                Arg::Ptr(c.token_in.ptr),
                Arg::Ptr(c.out.ptr),
                Arg::Ptr(c.counter.ptr),
                Arg::I32(16),
                Arg::Ptr(c.pos.ptr),
            ],
        )
        .map_err(e)?;
        gpu.sync().map_err(e)?;
        let (tin, out, cnt, pos) = read_ctl(gpu, &c, 2).map_err(e)?;
        if (tin, out, cnt, pos) != (want, want, 3, 41) {
            problems.push(format!(
                "case {case}: got token_in={tin} out[2]={out} counter={cnt} pos={pos}, want {want},{want},3,41"
            ));
        }
    }
    Ok(CheckResult {
        name: "argmax_step n=151936".into(),
        passed: problems.is_empty(),
        max_abs: problems.len() as f64,
        max_rel: 0.0,
        tolerance: 0.0,
        detail: if problems.is_empty() {
            "exact index (planted max, tie -> first, NaN ignored); counter/pos advanced".into()
        } else {
            problems.join("; ")
        },
    })
}

fn check_sampling(gpu: &Gpu) -> Result<CheckResult, String> {
    let n = 49_152usize;
    let mut rng = Rng::new(29);
    let v = rng.vec(n, 8.0);
    let e = |e: CudaError| e.to_string();
    let dl = gpu.upload_f32(&v).map_err(e)?;
    let probs = gpu.alloc(n * 4).map_err(e)?;
    let mut problems = Vec::new();
    let run = |temp: f32, top_p: f32, seed: u32, counter: i32| -> Result<u32, String> {
        let c = ctl(gpu, counter, 0).map_err(e)?;
        gpu.launch(
            "sample_step",
            Shape {
                grid: (1, 1, 1),
                block: (REDUCE_THREADS, 1, 1),
                smem: 0,
            },
            &[
                Arg::Ptr(dl.ptr),
                Arg::Ptr(probs.ptr),
                Arg::I32(n as i32),
                Arg::F32(temp),
                Arg::F32(top_p),
                Arg::U32(seed),
                Arg::Ptr(c.token_in.ptr),
                Arg::Ptr(c.out.ptr),
                Arg::Ptr(c.counter.ptr),
                Arg::I32(16),
                Arg::Ptr(c.pos.ptr),
            ],
        )
        .map_err(e)?;
        gpu.sync().map_err(e)?;
        let (tin, out, cnt, _) = read_ctl(gpu, &c, counter as usize).map_err(e)?;
        if tin != out || cnt != counter + 1 {
            return Err(format!(
                "control words wrong: token_in {tin} out {out} counter {cnt}"
            ));
        }
        Ok(tin)
    };
    let am = argmax_ref(&v) as u32;
    let tiny = run(1.0, 1e-6, 5, 0)?;
    if tiny != am {
        problems.push(format!("top_p=1e-6 gave {tiny}, argmax is {am}"));
    }
    let nucleus = nucleus_ref(&v, 0.8, 0.9);
    let wide = nucleus_ref(&v, 0.8, 0.9 + 1e-3);
    let mut distinct = std::collections::BTreeSet::new();
    for s in 0..24u32 {
        let tok = run(0.8, 0.9, 1000 + s, (s % 8) as i32)?;
        if !wide.contains(&(tok as usize)) {
            problems.push(format!("seed {s}: token {tok} outside the top-p set"));
        }
        distinct.insert(tok);
    }
    let a = run(0.8, 0.9, 77, 3)?;
    let b = run(0.8, 0.9, 77, 3)?;
    if a != b {
        problems.push(format!("not deterministic: {a} vs {b}"));
    }
    if nucleus.len() > 4 && distinct.len() < 2 {
        problems.push(format!(
            "24 seeds gave only {distinct:?} from a nucleus of {}",
            nucleus.len()
        ));
    }
    Ok(CheckResult {
        name: "sample_step temp=0.8 top_p=0.9".into(),
        passed: problems.is_empty(),
        max_abs: problems.len() as f64,
        max_rel: 0.0,
        tolerance: 0.0,
        detail: if problems.is_empty() {
            format!(
                "top_p->0 equals argmax; 24 seeds all in the nucleus ({} tokens, {} distinct drawn); deterministic",
                nucleus.len(),
                distinct.len()
            )
        } else {
            problems.join("; ")
        },
    })
}

/// Runs every kernel check on `gpu`. Never stops early: errors become FAIL results.
pub fn run_kernel_checks(gpu: &Gpu) -> Vec<CheckResult> {
    run_kernel_checks_matching(gpu, |_| true)
}

/// Runs the kernel checks whose label satisfies `want` (labels: `matvec <TYPE> RxK`,
/// `matvecq <TYPE> RxK`, `matmul <TYPE>`, `embed <TYPE>` for every type (the K-quants
/// included), `rmsnorm`, `qk_norm`, `rope <style>`, `attention hd=H T=N`,
/// `silu_mul/bias_add/add_inplace`, `argmax_step`, `sample_step`).
pub fn run_kernel_checks_matching(gpu: &Gpu, want: impl Fn(&str) -> bool) -> Vec<CheckResult> {
    type Check<'a> = Box<dyn Fn() -> Result<Vec<CheckResult>, String> + 'a>;
    let one = |r: Result<CheckResult, String>| r.map(|c| vec![c]);
    let mut list: Vec<(String, Check<'_>)> = Vec::new();
    for (i, ty) in ALL_TYPES.iter().enumerate() {
        let (ty, s) = (*ty, 100 + i as u64);
        list.push((
            format!("matvec {ty} 67x320"),
            Box::new(move || one(check_matvec(gpu, ty, 67, 320, s, 0))),
        ));
        list.push((
            format!("matvec {ty} 203x2048"),
            Box::new(move || one(check_matvec(gpu, ty, 203, 2048, s + 50, 0))),
        ));
        if matches!(ty, GgmlType::Q4_0 | GgmlType::F16) {
            list.push((
                format!("matvec {ty} 9001x64 (many rows per block)"),
                Box::new(move || one(check_matvec(gpu, ty, 9001, 64, s + 40, 1))),
            ));
        }
        list.push((
            format!("matvec {ty} 70x576 +rmsnorm"),
            Box::new(move || one(check_matvec(gpu, ty, 70, 576, s + 20, 1))),
        ));
        list.push((
            format!("matvec {ty} 33x1536 +silu"),
            Box::new(move || one(check_matvec(gpu, ty, 33, 1536, s + 30, 2))),
        ));
        if matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) {
            for (label, rows, k, pre, pair, ds) in [
                ("67x320", 67, 320, 0, false, 200),
                ("203x2048", 203, 2048, 0, false, 210),
                ("1x96", 1, 96, 0, false, 215),
                ("9001x64 +rmsnorm (grid-stride)", 9001, 64, 1, false, 220),
                ("70x576 +rmsnorm", 70, 576, 1, false, 230),
                ("33x1536 +silu", 33, 1536, 2, false, 240),
                ("2x77x576 silu pair", 154, 576, 1, true, 250),
                ("64x14336 (8B down width)", 64, 14_336, 0, false, 260),
            ] {
                list.push((
                    format!("matvecq {ty} {label}"),
                    Box::new(move || one(check_matvecq(gpu, ty, rows, k, s + ds, pre, pair))),
                ));
            }
        }
        list.push((
            format!("matmul {ty}"),
            Box::new(move || one(check_matmul(gpu, ty, 45, 320, 11, s + 70))),
        ));
        list.push((
            format!("embed {ty}"),
            Box::new(move || one(check_embed(gpu, ty, s + 90))),
        ));
    }
    for (i, ty) in K_TYPES.iter().enumerate() {
        let (ty, s) = (*ty, 400 + 10 * i as u64);
        for (label, rows, k, pre, ds) in [
            ("67x512", 67, 512, 0, 0),
            ("70x512 +rmsnorm", 70, 512, 1, 1),
            ("33x1536 +silu", 33, 1536, 2, 2),
        ] {
            list.push((
                format!("matvec {ty} {label}"),
                Box::new(move || one(check_matvec(gpu, ty, rows, k, s + ds, pre))),
            ));
        }
        for (label, rows, k, pre, pair, ds) in [
            ("67x512", 67, 512, 0, false, 3),
            ("203x2048", 203, 2048, 0, false, 4),
            ("1x256", 1, 256, 0, false, 5),
            ("70x512 +rmsnorm", 70, 512, 1, false, 6),
            ("33x1536 +silu", 33, 1536, 2, false, 7),
            ("2x77x512 silu pair", 154, 512, 1, true, 8),
            ("64x14336 (8B down width)", 64, 14_336, 0, false, 9),
        ] {
            list.push((
                format!("matvecq {ty} {label}"),
                Box::new(move || one(check_matvecq(gpu, ty, rows, k, s + ds, pre, pair))),
            ));
        }
        list.push((
            format!("matmul {ty}"),
            Box::new(move || one(check_matmul(gpu, ty, 45, 512, 11, s + 70))),
        ));
        list.push((
            format!("embed {ty}"),
            Box::new(move || one(check_embed(gpu, ty, s + 90))),
        ));
    }
    list.push(("rmsnorm".into(), Box::new(move || one(check_rmsnorm(gpu)))));
    for with_k in [true, false] {
        list.push((
            format!("qk_norm{}", if with_k { "" } else { " (no k norm)" }),
            Box::new(move || one(check_qk_norm(gpu, with_k))),
        ));
    }
    for (neox, ff) in [(false, false), (true, false), (false, true)] {
        list.push((
            format!(
                "rope {}{}",
                if neox { "neox" } else { "norm" },
                if ff { "+freqs" } else { "" }
            ),
            Box::new(move || one(check_rope(gpu, neox, ff))),
        ));
    }
    for (hd, t, pos0) in [
        (64, 1, 20),
        (64, 3, 20),
        (128, 2, 20),
        (32, 1, 20),
        (64, 2, 150),
        (16, 1, 70),
    ] {
        list.push((
            format!("attention hd={hd} T={t} pos={pos0}"),
            Box::new(move || one(check_attention(gpu, hd, t, pos0))),
        ));
    }
    for (neox, t) in [(false, 1), (true, 3)] {
        list.push((
            format!("rope_kv {} T={t}", if neox { "neox" } else { "norm" }),
            Box::new(move || one(check_rope_kv(gpu, neox, t))),
        ));
    }
    list.push((
        "silu_mul/bias_add/add_inplace".into(),
        Box::new(move || check_silu_and_bias(gpu)),
    ));
    list.push((
        "argmax_step".into(),
        Box::new(move || one(check_argmax(gpu))),
    ));
    list.push((
        "sample_step".into(),
        Box::new(move || one(check_sampling(gpu))),
    ));
    let mut out = Vec::new();
    for (label, f) in list {
        if want(&label) {
            match f() {
                Ok(v) => out.extend(v),
                Err(e) => out.push(CheckResult::error(&label, e)),
            }
        }
    }
    out
}

/// Device read bandwidth in bytes/s (a streaming read kernel over `bytes`), and device-to-device
/// copy bandwidth (bytes read + written per second).
pub fn measure_bandwidth(gpu: &Gpu, bytes: usize) -> Result<(f64, f64), CudaError> {
    let bytes = bytes / 16 * 16;
    let src = gpu.alloc(bytes)?;
    let mut dst = gpu.alloc(bytes)?;
    let sink = gpu.alloc(4 * 65536)?;
    let blocks = (gpu.info.sm_count.max(1) as u32) * 8;
    let launch = || {
        gpu.launch(
            "read_bandwidth",
            Shape {
                grid: (blocks, 1, 1),
                block: (512, 1, 1),
                smem: 0,
            },
            &[
                Arg::Ptr(src.ptr),
                Arg::I64((bytes / 16) as i64),
                Arg::Ptr(sink.ptr),
            ],
        )
    };
    launch()?;
    gpu.copy(&src, &mut dst, bytes)?;
    gpu.sync()?;
    let reps = 10;
    let t0 = std::time::Instant::now();
    for _ in 0..reps {
        launch()?;
    }
    gpu.sync()?;
    let read_bw = (bytes * reps) as f64 / t0.elapsed().as_secs_f64();
    let t0 = std::time::Instant::now();
    for _ in 0..reps {
        gpu.copy(&src, &mut dst, bytes)?;
    }
    gpu.sync()?;
    let copy_bw = (2 * bytes * reps) as f64 / t0.elapsed().as_secs_f64();
    Ok((read_bw, copy_bw))
}

/// Compares a model on the GPU with the CPU reference backend: prompt logits, a few decode
/// steps' logits (relative to the largest |logit|, tolerance `logit_tol`), greedy generation
/// with and without CUDA graphs on the device versus the CPU's greedy loop.
pub fn compare_backends(
    cpu: &mut dyn Backend,
    gpu: &mut CudaBackend,
    prompt: &[u32],
    n: usize,
    logit_tol: f64,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    // 1. Logits of the prompt (prefill) and of single-token decode steps.
    let mut worst = (0f64, 0f64);
    let mut detail = String::new();
    let mut cpu_tokens = Vec::new();
    let mut cpu_gaps = Vec::new();
    let step = (|| -> Result<(), String> {
        cpu.reset();
        Backend::reset(gpu);
        let lc = cpu.forward(prompt, 0).map_err(|e| format!("cpu: {e}"))?;
        let lg = gpu
            .forward_logits(prompt, 0)
            .map_err(|e| format!("gpu: {e}"))?;
        let mut cmp = |lg: &[f32], lc: &[f32]| {
            let scale = lc.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-6);
            let (a, _) = diff(lg, lc, 1.0);
            worst = (worst.0.max(a), worst.1.max(a / scale));
        };
        cmp(&lg, &lc);
        let mut next = argmax_ref(&lc) as u32;
        cpu_tokens.push(next);
        cpu_gaps.push(top2_gap(&lc));
        for pos in prompt.len()..prompt.len() + n.saturating_sub(1) {
            let lc = cpu.forward(&[next], pos).map_err(|e| format!("cpu: {e}"))?;
            if cpu_tokens.len() <= 4 {
                let lg = gpu
                    .forward_logits(&[next], pos)
                    .map_err(|e| format!("gpu: {e}"))?;
                cmp(&lg, &lc);
            }
            next = argmax_ref(&lc) as u32;
            cpu_tokens.push(next);
            cpu_gaps.push(top2_gap(&lc));
        }
        Ok(())
    })();
    match step {
        Ok(()) => {
            detail.push_str("prompt prefill + 4 decode steps; rel = |d| / max|logit|");
            out.push(result(
                "model logits vs CPU",
                worst.0,
                worst.1,
                logit_tol,
                detail,
            ));
        }
        Err(e) => {
            out.push(CheckResult::error("model logits vs CPU", e));
            return out;
        }
    }
    // 2. Greedy on the device, with and without graphs.
    for graphs in [true, false] {
        gpu.set_use_graphs(graphs);
        let name = format!(
            "greedy {n} tokens on device ({})",
            if graphs {
                "CUDA graph"
            } else {
                "plain launches"
            }
        );
        match gpu.generate_greedy_on_device(prompt, n) {
            Ok(toks) => {
                let first_diff = toks.iter().zip(&cpu_tokens).position(|(a, b)| a != b);
                let (passed, d) = match first_diff {
                    None if toks.len() == cpu_tokens.len() => {
                        (true, "identical token ids".to_string())
                    }
                    None => (
                        false,
                        format!("length {} vs {}", toks.len(), cpu_tokens.len()),
                    ),
                    Some(i) => {
                        // A divergence is acceptable only at a near-tie of the CPU's top two logits.
                        // The CPU backend quantizes activations, so "near" is measured
                        // against the logit differences actually observed.
                        let gap = cpu_gaps.get(i).copied().unwrap_or(f64::INFINITY);
                        (
                            gap < (2.0 * worst.0).max(1e-3),
                            format!(
                                "first difference at step {i} (gpu {} vs cpu {}), cpu top-2 gap {gap:.2e}",
                                toks[i], cpu_tokens[i]
                            ),
                        )
                    }
                };
                // A graph run must really have used a graph (capture falls back silently).
                let graph_problem = match gpu.graph_error() {
                    Some(e) if graphs && gpu.gpu().supports_graphs() => {
                        format!("; CUDA graph capture FAILED, ran plain launches: {e}")
                    }
                    _ => String::new(),
                };
                out.push(CheckResult {
                    name,
                    passed: passed && graph_problem.is_empty(),
                    max_abs: first_diff.map_or(0.0, |i| (n - i) as f64),
                    max_rel: 0.0,
                    tolerance: 0.0,
                    detail: format!("{d}; gpu {:?}{graph_problem}", &toks[..toks.len().min(12)]),
                });
            }
            Err(e) => out.push(CheckResult::error(&name, e)),
        }
    }
    gpu.set_use_graphs(true);
    out
}

fn top2_gap(v: &[f32]) -> f64 {
    let mut a = f32::NEG_INFINITY;
    let mut b = f32::NEG_INFINITY;
    for &x in v {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    (a - b) as f64
}

/// Weight kinds in the order the checks use.
pub fn checked_kinds() -> Vec<WeightKind> {
    ALL_TYPES
        .iter()
        .chain(K_TYPES.iter())
        .filter_map(|t| super::weights::weight_kind(*t))
        .collect()
}

/// One synthetic model used by [`run_model_checks`].
#[derive(Debug, Clone)]
pub struct ModelCase {
    /// Label.
    pub name: String,
    /// Configuration.
    pub cfg: crate::model::LlamaConfig,
    /// Weight type.
    pub ty: GgmlType,
    /// Prompt length.
    pub prompt_len: usize,
    /// Tokens to generate.
    pub n: usize,
    /// Prefill chunk of the CUDA backend (small values exercise chunking).
    pub max_batch: usize,
    /// Re-quantize the synthetic file into this K-quant mix ([`crate::requant`]): matrices of
    /// several types in one model, Q|K|V and gate|up then loaded as separate parts.
    pub mix: Option<crate::requant::KMix>,
    /// Add a `rope_freqs.weight` tensor (Llama 3 style per-pair frequency divisors).
    pub rope_freqs: bool,
}

impl ModelCase {
    fn new(name: &str, cfg: crate::model::LlamaConfig, ty: GgmlType) -> Self {
        ModelCase {
            name: name.into(),
            cfg,
            ty,
            prompt_len: 5,
            n: 16,
            max_batch: 256,
            mix: None,
            rope_freqs: false,
        }
    }
}

/// A shape whose every matrix width is a multiple of the 256-value K-quant super-block.
pub fn k_shape() -> crate::model::LlamaConfig {
    crate::model::LlamaConfig {
        dim: 256,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        ffn_dim: 512,
        ..crate::model::LlamaConfig::tiny()
    }
}

/// The GGUF file of `case` (a pure function of the case and `seed`).
pub fn case_gguf(case: &ModelCase, seed: u64) -> Result<Vec<u8>, String> {
    let mut bytes =
        crate::synthetic::synthetic_gguf(&case.cfg, case.ty, seed).map_err(|e| e.to_string())?;
    if let Some(mix) = case.mix {
        let g = crate::gguf::Gguf::parse(&bytes).map_err(|e| e.to_string())?;
        bytes = crate::requant::requantize(&g, mix)
            .map_err(|e| e.to_string())?
            .0;
    }
    if case.rope_freqs {
        // Llama 3.1's divisors for this head size (as its files carry them), as a tensor.
        let mut l3 = case.cfg.clone();
        l3.rope_scaling = crate::model::RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 64.0,
        };
        let ff = l3
            .rope_freq_factors(None)
            .ok_or("no rope frequency factors")?;
        let g = crate::gguf::Gguf::parse(&bytes).map_err(|e| e.to_string())?;
        let mut w = crate::gguf::GgufWriter::new();
        for (k, v) in &g.metadata {
            if k != "general.alignment" {
                w.kv(k, v.clone());
            }
        }
        for t in &g.tensors {
            w.tensor(&t.name, &t.dims, t.ty, g.tensor_data(t).to_vec());
        }
        w.tensor(
            "rope_freqs.weight",
            &[ff.len() as u64],
            GgmlType::F32,
            ff.iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        bytes = w.to_bytes();
    }
    Ok(bytes)
}

/// The synthetic models the whole-model checks use: the tiny llama config in every weight
/// type, a qwen2-style one (NEOX RoPE, q/k/v biases), a 2-layer SmolLM2-shaped one with a
/// prompt longer than the prefill chunk, a Qwen3-shaped one (per-head q/k norms, q_dim !=
/// dim), RoPE scaling from the metadata and from a `rope_freqs.weight` tensor, and K-quant
/// models (Q4_K_M and Q5_K_M mixes, Q8_K, a Qwen3-shaped Q4_K one).
pub fn model_cases() -> Vec<ModelCase> {
    let tiny = crate::model::LlamaConfig::tiny();
    let mut v: Vec<ModelCase> = ALL_TYPES
        .iter()
        .map(|ty| ModelCase {
            n: 24,
            ..ModelCase::new(&format!("tiny-llama {ty}"), tiny.clone(), *ty)
        })
        .collect();
    let mut qwen = tiny.clone();
    qwen.arch = "qwen2".into();
    qwen.rope_style = crate::model::RopeStyle::Neox;
    v.push(ModelCase {
        prompt_len: 6,
        n: 20,
        ..ModelCase::new("tiny-qwen2 Q8_0 (neox, biases)", qwen, GgmlType::Q8_0)
    });
    let mut mid = crate::model::LlamaConfig::smollm2_135m();
    mid.n_layers = 2;
    mid.context_len = 512;
    v.push(ModelCase {
        prompt_len: 40,
        max_batch: 16,
        ..ModelCase::new("smollm2-shape 2 layers Q4_1", mid, GgmlType::Q4_1)
    });
    // Qwen3: per-head q/k RMSNorm, q_dim != dim (as in the real models), tied embeddings.
    let mut qwen3 = tiny.clone();
    qwen3.arch = "qwen3".into();
    qwen3.rope_style = crate::model::RopeStyle::Neox;
    qwen3.head_dim = 32;
    qwen3.tied_embeddings = true;
    v.push(ModelCase::new(
        "tiny-qwen3 Q8_0 (q/k norms, q_dim 128 != dim 64, tied)",
        qwen3,
        GgmlType::Q8_0,
    ));
    // RoPE scaling: Llama 3 from the metadata, and a `rope_freqs.weight` tensor.
    let llama3 = crate::model::LlamaConfig {
        rope_scaling: crate::model::RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 16.0,
        },
        ..tiny.clone()
    };
    v.push(ModelCase::new(
        "tiny-llama Q8_0 llama3 rope scaling (metadata)",
        llama3,
        GgmlType::Q8_0,
    ));
    v.push(ModelCase {
        rope_freqs: true,
        ..ModelCase::new(
            "tiny-llama Q4_0 rope_freqs.weight tensor",
            tiny.clone(),
            GgmlType::Q4_0,
        )
    });
    // K-quants: llama.cpp-style mixes (Q4_K or Q5_K with Q6_K for attn_v / ffn_down of some
    // layers and the output; the token embeddings K-quantized too), and Q8_K throughout.
    v.push(ModelCase {
        mix: Some(crate::requant::KMix::Q4KM),
        ..ModelCase::new(
            "k-shape Q4_K_M mix (Q4_K + Q6_K)",
            k_shape(),
            GgmlType::Q8_0,
        )
    });
    v.push(ModelCase {
        mix: Some(crate::requant::KMix::Q5KM),
        ..ModelCase::new(
            "k-shape Q5_K_M mix (Q5_K + Q6_K)",
            k_shape(),
            GgmlType::Q8_0,
        )
    });
    v.push(ModelCase::new("k-shape Q8_K", k_shape(), GgmlType::Q8_K));
    let mut qwen3k = k_shape();
    qwen3k.arch = "qwen3".into();
    qwen3k.rope_style = crate::model::RopeStyle::Neox;
    qwen3k.head_dim = 128;
    qwen3k.tied_embeddings = true;
    v.push(ModelCase::new(
        "qwen3 k-shape Q4_K (q/k norms, q_dim 512 != dim 256, tied)",
        qwen3k,
        GgmlType::Q4_K,
    ));
    v
}

/// Loads each of [`model_cases`] on the CPU reference backend and on `gpu`, and compares them
/// (prompt logits against the straightforward f32 implementation with tolerance 1e-3, the CPU
/// backend's logits with 5e-2, greedy generation with and without CUDA graphs).
pub fn run_model_checks(gpu: &Gpu, cases: &[ModelCase]) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for case in cases {
        match model_check(gpu, case) {
            Ok(v) => out.extend(v.into_iter().map(|mut r| {
                r.name = format!("{}: {}", case.name, r.name);
                r
            })),
            Err(e) => out.push(CheckResult::error(&case.name, e)),
        }
    }
    out
}

fn model_check(gpu: &Gpu, case: &ModelCase) -> Result<Vec<CheckResult>, String> {
    let bytes = case_gguf(case, 42)?;
    let g = crate::gguf::Gguf::parse(&bytes).map_err(|e| e.to_string())?;
    let w = crate::model::LlamaWeights::from_gguf(&g).map_err(|e| e.to_string())?;
    let vocab = w.config.vocab as u64;
    let mut rng = Rng::new(case.prompt_len as u64 * 31 + 7);
    let prompt: Vec<u32> = (0..case.prompt_len)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let ctx = (case.prompt_len + case.n + 8).max(64);
    let mut cpu = crate::cpu::CpuBackend::new(
        &w,
        &crate::cpu::CpuOptions {
            max_context: ctx,
            ..Default::default()
        },
    )
    .map_err(|e| format!("cpu backend: {e}"))?;
    let mut cuda = CudaBackend::load_on(
        gpu.clone(),
        &w,
        &super::backend::CudaOptions {
            ordinal: gpu.info.ordinal,
            max_context: Some(ctx),
            max_batch: case.max_batch,
            use_graphs: true,
            ..Default::default()
        },
    )
    .map_err(|e| format!("cuda backend: {e}"))?;
    let mut out = Vec::new();
    // Tight check against the straightforward f32 implementation (no activation quantization):
    // with the float mat-vec for the last token's output projection (the int8 one rounds the
    // activation like the CPU backend; it is checked against exact Q8 references per kernel and
    // against the CPU backend below).
    let (kind, bps) = cuda.decode_matvec();
    cuda.set_decode_matvec(super::backend::DecodeMatvec::Float, bps);
    let float_logits = cuda.forward_logits(&prompt, 0);
    cuda.set_decode_matvec(kind, bps);
    match crate::cpu::naive_forward(&w, &prompt) {
        Ok(reference) => match float_logits {
            Ok(got) => {
                let scale = reference
                    .iter()
                    .fold(0f64, |m, v| m.max(v.abs() as f64))
                    .max(1e-6);
                let (a, _) = diff(&got, &reference, 1.0);
                out.push(result(
                    "prompt logits vs f32 reference",
                    a,
                    a / scale,
                    1e-3,
                    "rel = |d| / max|logit|".into(),
                ));
            }
            Err(e) => out.push(CheckResult::error("prompt logits vs f32 reference", e)),
        },
        Err(e) => out.push(CheckResult::error("f32 reference", e)),
    }
    // The CPU backend quantizes activations to Q8 blocks for quantized weights (as llama.cpp
    // does); on tiny random models that moves logits by up to about 2% of max|logit| while the
    // GPU (f32 activations) matches the f32 reference above to ~1e-6. Hence 5e-2 here.
    out.extend(compare_backends(&mut cpu, &mut cuda, &prompt, case.n, 5e-2));
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rmsnorm_reference() {
        let y = rmsnorm_ref(&[3.0, 4.0], &[1.0, 2.0], 0.0);
        let inv = 1.0 / (12.5f64).sqrt();
        assert!((y[0] as f64 - 3.0 * inv).abs() < 1e-6);
        assert!((y[1] as f64 - 8.0 * inv).abs() < 1e-6);
    }

    #[test]
    fn rope_reference() {
        let mut v: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let orig = v.clone();
        rope_ref(&mut v, 2, 4, 0, 10_000.0, false, None);
        assert_eq!(v, orig, "position 0 is the identity");
        // Pair 0 of a head rotates by pos radians (freq 1): (1, 0) at pos 1 -> (cos 1, sin 1).
        let mut w = vec![1.0, 0.0, 0.0, 0.0];
        rope_ref(&mut w, 1, 4, 1, 10_000.0, false, None);
        assert!((w[0] - 1f32.cos()).abs() < 1e-6 && (w[1] - 1f32.sin()).abs() < 1e-6);
        // NEOX pairs element 0 with element hd/2.
        let mut w = vec![1.0, 0.0, 0.0, 0.0];
        rope_ref(&mut w, 1, 4, 1, 10_000.0, true, None);
        assert!((w[0] - 1f32.cos()).abs() < 1e-6 && (w[2] - 1f32.sin()).abs() < 1e-6);
        // Norm is preserved.
        let mut r = Rng::new(3);
        let mut x = r.vec(64, 1.0);
        let n0: f32 = x.iter().map(|a| a * a).sum();
        rope_ref(&mut x, 1, 64, 123, 10_000.0, false, Some(&[2.0; 32]));
        let n1: f32 = x.iter().map(|a| a * a).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }

    #[test]
    fn attention_reference() {
        // One key: output is that key's value, for every head (GQA mapping).
        let (nh, nkv, hd) = (4, 2, 2);
        let q = vec![0.3; nh * hd];
        let kc = vec![1.0, 2.0, 3.0, 4.0];
        let vc = vec![5.0, 6.0, 7.0, 8.0];
        let o = attention_ref(&q, &kc, &vc, 1, nh, nkv, hd);
        assert_eq!(o, vec![5.0, 6.0, 5.0, 6.0, 7.0, 8.0, 7.0, 8.0]);
        // Two identical keys with different values: the average.
        let kc = vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let vc = vec![0.0, 0.0, 0.0, 0.0, 2.0, 4.0, 2.0, 4.0];
        let o = attention_ref(&q, &kc, &vc, 2, nh, nkv, hd);
        assert!((o[0] - 1.0).abs() < 1e-6 && (o[1] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn small_references() {
        let s = silu_mul_ref(&[0.0, 1.0], &[5.0, 2.0]);
        assert_eq!(s[0], 0.0);
        assert!((s[1] as f64 - 2.0 / (1.0 + (-1f64).exp())).abs() < 1e-6);
        assert_eq!(argmax_ref(&[1.0, 3.0, 3.0, f32::NAN]), 1);
        assert_eq!(nucleus_ref(&[0.0, 10.0, 0.0], 1.0, 0.5), vec![1]);
        assert_eq!(nucleus_ref(&[1.0, 1.0, 1.0], 1.0, 1.0), vec![0, 1, 2]);
        let (a, r) = diff(&[1.0, 2.0], &[1.0, 2.5], 1.0);
        assert!((a - 0.5).abs() < 1e-9 && (r - 0.2).abs() < 1e-9);
        assert_eq!(diff(&[1.0], &[1.0, 2.0], 1.0).0, f64::INFINITY);
        assert!((top2_gap(&[1.0, 5.0, 4.5]) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn model_cases_are_valid() {
        let cases = model_cases();
        assert_eq!(cases.len(), 15);
        for c in &cases {
            let dims = [("dim", c.cfg.dim), ("ffn", c.cfg.ffn_dim)];
            super::super::kernels::check_model_limits(&dims, c.cfg.head_dim, 256).unwrap();
            assert!(c.prompt_len + c.n < 256);
            // Every case builds, and the variants really are what their names say.
            let bytes = case_gguf(c, 1).unwrap();
            let g = crate::gguf::Gguf::parse(&bytes).unwrap();
            let w = crate::model::LlamaWeights::from_gguf(&g).unwrap();
            assert_eq!(w.rope_freqs.is_some(), c.rope_freqs, "{}", c.name);
            assert_eq!(
                w.layers[0].attn_q_norm.is_some(),
                c.cfg.arch == "qwen3",
                "{}",
                c.name
            );
            if c.mix.is_some() {
                let types: std::collections::BTreeSet<&str> =
                    g.tensors.iter().map(|t| t.ty.name()).collect();
                assert!(
                    types.contains("Q6_K") && types.len() >= 3,
                    "{}: {types:?}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn result_lines() {
        let r = result("x", 1e-7, 2e-6, 1e-5, "d".into());
        assert!(r.passed && r.line().starts_with("PASS x"));
        let r = CheckResult::error("y", "boom");
        assert!(!r.passed && r.line().contains("error: boom"));
        assert_eq!(checked_kinds().len(), 10);
    }
}

#[cfg(test)]
mod emulated {
    //! The kernel checks run against the host emulator (same kernel source, no GPU needed).
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn emu() -> Option<Gpu> {
        match Gpu::emulated() {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("SKIPPED: kernel emulator unavailable: {e}");
                None
            }
        }
    }

    fn full() -> bool {
        std::env::var_os("INFERENCE_TEST_EMULATOR").is_some()
    }

    fn assert_all_pass(results: &[CheckResult]) {
        for r in results {
            eprintln!("{}", r.line());
        }
        let failed: Vec<_> = results
            .iter()
            .filter(|r| !r.passed)
            .map(|r| r.name.clone())
            .collect();
        assert!(failed.is_empty(), "failed: {failed:?}");
        assert!(!results.is_empty());
    }

    /// A quick subset always runs; `INFERENCE_TEST_EMULATOR=1` runs every kernel check (minutes).
    #[test]
    fn kernel_checks_pass_on_the_emulator() {
        let Some(gpu) = emu() else { return };
        let results = if full() {
            run_kernel_checks(&gpu)
        } else {
            eprintln!("(quick subset; set INFERENCE_TEST_EMULATOR=1 for all kernel checks)");
            run_kernel_checks_matching(&gpu, |l| {
                matches!(
                    l,
                    "matvec Q4_1 67x320"
                        | "matvec Q8_0 70x576 +rmsnorm"
                        | "matvec Q4_0 33x1536 +silu"
                        | "matmul Q4_0"
                        | "embed Q8_0"
                        | "rope norm"
                        | "rope_kv neox T=3"
                        | "attention hd=64 T=3 pos=20"
                        | "matvecq Q4_0 67x320"
                        | "matvecq Q4_1 70x576 +rmsnorm"
                        | "matvecq Q8_0 33x1536 +silu"
                        | "matvecq Q4_1 2x77x576 silu pair"
                        | "matvecq Q4_0 1x96"
                        | "matvecq Q8_0 64x14336 (8B down width)"
                        | "matvecq Q4_K 67x512"
                        | "matvecq Q5_K 70x512 +rmsnorm"
                        | "matvecq Q6_K 33x1536 +silu"
                        | "matvecq Q8_K 67x512"
                        | "matvecq Q4_K 2x77x512 silu pair"
                        | "matvecq Q6_K 1x256"
                        | "matvec Q4_K 67x512"
                        | "matvec Q5_K 70x512 +rmsnorm"
                        | "matvec Q6_K 33x1536 +silu"
                        | "matmul Q5_K"
                        | "matmul Q6_K"
                        | "embed Q4_K"
                        | "embed Q5_K"
                        | "embed Q6_K"
                        | "embed Q8_K"
                        | "qk_norm"
                        | "qk_norm (no k norm)"
                )
            })
        };
        assert_all_pass(&results);
    }

    /// The K-quant kernels on every check, `INFERENCE_TEST_EMULATOR=1` only (the quick subset
    /// above takes a sample of them).
    #[test]
    fn every_k_quant_kernel_check_passes_on_the_emulator() {
        if !full() {
            eprintln!("SKIPPED: set INFERENCE_TEST_EMULATOR=1 for every K-quant kernel check");
            return;
        }
        let Some(gpu) = emu() else { return };
        let results = run_kernel_checks_matching(&gpu, |l| l.contains("_K"));
        assert_eq!(results.len(), 4 * 12);
        assert_all_pass(&results);
    }

    /// A Qwen3-shaped model (per-head q/k norms, q_dim != dim) and a K-quant mix (Q4_K_M: Q4_K
    /// and Q6_K matrices, separate Q|K|V parts where the types differ) on the emulator against
    /// the f32 reference and the CPU backend: prompt logits, one decode step, greedy tokens on
    /// the device. Kept small (one layer, two short steps) so it runs by default; the full
    /// cases run with
    /// `INFERENCE_TEST_EMULATOR=1` in `new_model_cases_pass_on_the_emulator`.
    #[test]
    fn qwen3_and_k_quant_models_match_the_cpu_backend_on_the_emulator() {
        let Some(gpu) = emu() else { return };
        for name in ["tiny-qwen3", "k-shape Q4_K_M"] {
            let mut case = model_cases()
                .into_iter()
                .find(|c| c.name.starts_with(name))
                .unwrap();
            // One layer: still a mix for Q4_K_M (that layer's attn_v and ffn_down are Q6_K).
            case.cfg.n_layers = 1;
            case.prompt_len = 3;
            case.n = 2;
            // Prompt logits against the f32 reference (1e-3: would catch a missing norm or a
            // wrong dequantization), then against the CPU backend, then greedy tokens.
            let results = run_model_checks(&gpu, std::slice::from_ref(&case));
            assert_eq!(results.len(), 4, "{results:?}");
            assert_all_pass(&results);
        }
    }

    /// Every Qwen3, RoPE-scaling and K-quant model case, whole (prefill chunks, decode, greedy
    /// on the device). Slow: only with `INFERENCE_TEST_EMULATOR=1`.
    #[test]
    fn new_model_cases_pass_on_the_emulator() {
        if !full() {
            eprintln!(
                "SKIPPED: set INFERENCE_TEST_EMULATOR=1 to run the qwen3 / rope-scaling / K-quant models on the kernel emulator"
            );
            return;
        }
        let Some(gpu) = emu() else { return };
        let mut cases: Vec<ModelCase> = model_cases()
            .into_iter()
            .filter(|c| {
                c.cfg.arch == "qwen3"
                    || c.rope_freqs
                    || c.cfg.rope_scaling != crate::model::RopeScaling::None
                    || c.mix.is_some()
                    || K_TYPES.contains(&c.ty)
            })
            .collect();
        assert_eq!(cases.len(), 7);
        for c in &mut cases {
            c.n = 4;
            c.prompt_len = 7;
            c.max_batch = 3; // prefill in chunks of 3, the last one a single token
        }
        assert_all_pass(&run_model_checks(&gpu, &cases));
    }

    /// Every model case uploads (repack, fusion of Q|K|V and gate|up, limits) without running
    /// kernels; the forward pass itself is covered by the slow test below.
    #[test]
    fn every_model_case_loads_on_the_emulator() {
        let Some(gpu) = emu() else { return };
        for case in model_cases() {
            let bytes = case_gguf(&case, 1).unwrap();
            let g = crate::gguf::Gguf::parse(&bytes).unwrap();
            let w = crate::model::LlamaWeights::from_gguf(&g).unwrap();
            let be = CudaBackend::load_on(
                gpu.clone(),
                &w,
                &super::super::backend::CudaOptions {
                    max_context: Some(64),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(be.weight_bytes_per_token() > 0, "{}", case.name);
            assert_eq!(be.max_context(), 64);
            assert!(be.graph_error().is_none());
        }
    }

    /// The whole backend (prefill chunks, decode, greedy on the device) on the emulator
    /// against the CPU backend. Slow: only with `INFERENCE_TEST_EMULATOR=1`.
    #[test]
    fn model_checks_pass_on_the_emulator() {
        if !full() {
            eprintln!(
                "SKIPPED: set INFERENCE_TEST_EMULATOR=1 to run the whole model on the kernel emulator"
            );
            return;
        }
        let Some(gpu) = emu() else { return };
        let mut cases: Vec<ModelCase> = model_cases()
            .into_iter()
            .filter(|c| c.cfg.dim <= 64 && matches!(c.ty, GgmlType::Q4_0 | GgmlType::Q8_0))
            .collect();
        for c in &mut cases {
            c.n = 4;
        }
        let mut chunked = cases[0].clone();
        chunked.name = "tiny-llama Q4_0 chunked prefill".into();
        chunked.prompt_len = 21;
        chunked.max_batch = 8;
        chunked.n = 3;
        cases.push(chunked);
        assert_all_pass(&run_model_checks(&gpu, &cases));
    }
}
