//! The CUDA C source of every kernel of the CUDA backend, and the launch-shape arithmetic.
//!
//! Decision: the kernels are our own CUDA C, kept here as one source string and compiled by
//! NVRTC once at start-up ([`super::nvrtc`]) for the architecture of the device found
//! (`sm_XY` from its compute capability; sm_80 and newer, Hopper sm_90 included). There is no
//! build-time CUDA toolkit dependency, so the crate builds on machines without CUDA.
//!
//! The source is deliberately self-contained: no `#include` (NVRTC ships few headers), half
//! to float conversion by one PTX instruction, bfloat16 by a shift. With `HOST_EMULATION`
//! defined the same source also compiles as C++ for the host emulator ([`super::emu`]).
//!
//! Weight layout on the device (see [`super::weights`]): float types (F32, F16, BF16) stay
//! row-major as in GGUF (row `r` holds input features `0..K` contiguous). Block types are
//! *repacked* at load: the quant bytes of all blocks go into one array (`qs`, 16 bytes per
//! block for Q4_0/Q4_1, 32 for Q8_0) and the f16 scales (`d`) and mins (`m`) into their own
//! arrays, so one lane reads one block's quants with aligned 16-byte loads and a warp reads 512
//! contiguous bytes at a time. The K-quants (Q4_K, Q5_K, Q6_K, Q8_K) keep one record per
//! 32-element sub-block in `qs` and their super-block headers in `d` (and Q6_K's f16 `d` in
//! `m`); their kernels live in their own section at the end of [`KERNEL_SOURCE`], plugged into
//! the generic mat-vec / mat-mul / embedding templates through `load_block_k`, `load_wblk_k`
//! and `dot_wblk_k` (template parameters 6..9). That section also holds `qk_norm` (Qwen3's
//! per-head q/k RMSNorm).
//!
//! Every kernel that depends on the position reads it from device memory (`pos[0]`), so the
//! decode sequence can be captured once into a CUDA graph and replayed.

/// Threads per block of the mat-vec and mat-mat kernels (8 warps, one output row per warp).
pub const MATVEC_THREADS: u32 = 256;
/// Output rows per mat-vec block.
pub const MATVEC_ROWS_PER_BLOCK: u32 = MATVEC_THREADS / 32;
/// Tokens per mat-mat (prefill) tile.
pub const MATMUL_TOKENS_PER_TILE: u32 = 8;
/// Threads per attention block.
pub const ATTENTION_THREADS: u32 = 256;
/// Threads of the single-block reductions (argmax, sampling, rmsnorm).
pub const REDUCE_THREADS: u32 = 1024;
/// Threads per block of `rmsnorm` and `rmsnorm_quantize_rows` (the same, so both reduce the
/// sum of squares in the same order).
pub const RMSNORM_THREADS: u32 = 256;
/// Threads per block of the element-wise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Elements per quant block (all supported block types).
pub const BLOCK_ELEMS: usize = 32;
/// Largest dynamic shared memory we ask for without opting in (48 KiB).
pub const MAX_DEFAULT_SMEM: usize = 48 * 1024;

/// Per-type suffix of the templated kernels, in the order of [`WEIGHT_KINDS`].
pub const TYPE_SUFFIXES: [&str; 10] = [
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k", "q8_k",
];

/// Names of the kernels that exist once per weight type (suffixed `_<type>`).
pub const TYPED_KERNELS: [&str; 3] = ["matvec", "matmul", "embed"];

/// Names of the kernels that exist once per *quantized* weight type (suffixed `_<type>`).
pub const QUANT_KERNELS: [&str; 1] = ["matvecq"];

/// Suffixes of the quantized weight types (the kinds [`WeightKind::is_quantized`] accepts).
pub const QUANT_SUFFIXES: [&str; 7] = ["q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k", "q8_k"];

/// Kernels of the K-quant / Qwen3 section of [`KERNEL_SOURCE`] that exist once.
pub const HEAD_NORM_KERNELS: [&str; 1] = ["qk_norm"];

/// Names of the kernels that exist once.
pub const PLAIN_KERNELS: [&str; 14] = [
    "rmsnorm",
    "rope_kv",
    "bias_add",
    "rope",
    "kv_store",
    "attention",
    "silu_mul",
    "add_inplace",
    "argmax_step",
    "sample_step",
    "read_bandwidth",
    "set_i32",
    "quantize_act",
    "argmax_finish",
];

/// Names of the continuous-batching kernels ([`super::batch`]; the paged-KV-cache section at
/// the end of [`KERNEL_SOURCE`]).
pub const BATCH_KERNELS: [&str; 10] = [
    "rope_kv_paged",
    "attention_paged",
    "rmsnorm_rows",
    "sample_rows",
    "quantize_rows",
    "rmsnorm_quantize_rows",
    "silu_mul_quantize_rows",
    "matmulq_q8_0",
    "matmulq_q4_0",
    "matmulq_q4_1",
];

/// All kernel entry points that [`KERNEL_SOURCE`] defines.
pub fn all_kernel_names() -> Vec<String> {
    let mut v: Vec<String> = PLAIN_KERNELS
        .iter()
        .chain(HEAD_NORM_KERNELS.iter())
        .chain(BATCH_KERNELS.iter())
        .map(|s| (*s).to_string())
        .collect();
    for k in TYPED_KERNELS {
        for t in TYPE_SUFFIXES {
            v.push(format!("{k}_{t}"));
        }
    }
    for k in QUANT_KERNELS {
        for t in QUANT_SUFFIXES {
            v.push(format!("{k}_{t}"));
        }
    }
    v
}

/// Weight kinds the kernels handle; the discriminant is the template parameter in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightKind {
    /// Row-major f32.
    F32 = 0,
    /// Row-major IEEE half.
    F16 = 1,
    /// Row-major bfloat16.
    Bf16 = 2,
    /// Repacked Q8_0: 32 int8 per block + f16 scale.
    Q8_0 = 3,
    /// Repacked Q4_0: 16 bytes per block + f16 scale.
    Q4_0 = 4,
    /// Repacked Q4_1: 16 bytes per block + f16 scale + f16 min.
    Q4_1 = 5,
    /// Repacked Q4_K: 16 nibble bytes per 32-element sub-block + the super-block's 16-byte
    /// header (f16 d, f16 dmin, 12 bytes of packed 6-bit scales and mins), see [`super::weights`].
    Q4K = 6,
    /// Repacked Q5_K: 20 bytes per sub-block (nibbles + 32 fifth bits) + the 16-byte header.
    Q5K = 7,
    /// Repacked Q6_K: 24 bytes per sub-block (nibbles + 2-bit high parts) + 16 int8 scales and
    /// an f16 d per super-block.
    Q6K = 8,
    /// Repacked Q8_K: 32 int8 per sub-block + an f32 d per super-block.
    Q8K = 9,
}

/// All weight kinds, index = discriminant.
pub const WEIGHT_KINDS: [WeightKind; 10] = [
    WeightKind::F32,
    WeightKind::F16,
    WeightKind::Bf16,
    WeightKind::Q8_0,
    WeightKind::Q4_0,
    WeightKind::Q4_1,
    WeightKind::Q4K,
    WeightKind::Q5K,
    WeightKind::Q6K,
    WeightKind::Q8K,
];

impl WeightKind {
    /// Kernel-name suffix.
    pub fn suffix(self) -> &'static str {
        TYPE_SUFFIXES[self as usize]
    }

    /// Whether the kind is a K-quant (256-element super-blocks of eight 32-element sub-blocks).
    pub fn is_k(self) -> bool {
        matches!(
            self,
            WeightKind::Q4K | WeightKind::Q5K | WeightKind::Q6K | WeightKind::Q8K
        )
    }

    /// Elements of one block of the GGUF type (the unit the repacking works in): 256 for the
    /// K-quants, 32 otherwise.
    pub fn unit_elems(self) -> usize {
        if self.is_k() { 256 } else { BLOCK_ELEMS }
    }

    /// 32-element blocks per unit.
    pub fn blocks_per_unit(self) -> usize {
        self.unit_elems() / BLOCK_ELEMS
    }

    /// Bytes of the `qs` array per 32-element block (for float kinds: the raw row bytes).
    pub fn qs_bytes_per_block(self) -> usize {
        match self {
            WeightKind::F32 => 128,
            WeightKind::F16 | WeightKind::Bf16 => 64,
            WeightKind::Q8_0 | WeightKind::Q8K => 32,
            WeightKind::Q4_0 | WeightKind::Q4_1 | WeightKind::Q4K => 16,
            WeightKind::Q5K => 20,
            WeightKind::Q6K => 24,
        }
    }

    /// Bytes of the scale (`d`) array per unit: an f16 per block (Q8_0, Q4_0, Q4_1), the
    /// 16-byte header per super-block (Q4_K, Q5_K: d, dmin, packed scales; Q6_K: the 16 int8
    /// scales), the f32 d (Q8_K).
    pub fn d_bytes_per_unit(self) -> usize {
        match self {
            WeightKind::F32 | WeightKind::F16 | WeightKind::Bf16 => 0,
            WeightKind::Q8_0 | WeightKind::Q4_0 | WeightKind::Q4_1 => 2,
            WeightKind::Q4K | WeightKind::Q5K | WeightKind::Q6K => 16,
            WeightKind::Q8K => 4,
        }
    }

    /// Bytes of the `m` array per unit: the f16 min (Q4_1), the f16 super-block d (Q6_K).
    pub fn m_bytes_per_unit(self) -> usize {
        match self {
            WeightKind::Q4_1 | WeightKind::Q6K => 2,
            _ => 0,
        }
    }

    /// Whether the kind is a block-quantized type (has an int8-activation `matvecq` kernel).
    pub fn is_quantized(self) -> bool {
        !matches!(self, WeightKind::F32 | WeightKind::F16 | WeightKind::Bf16)
    }

    /// Whether the kind has a scale (`d`) array.
    pub fn has_scale(self) -> bool {
        self.d_bytes_per_unit() > 0
    }

    /// Whether the kind has an `m` array.
    pub fn has_min(self) -> bool {
        self.m_bytes_per_unit() > 0
    }

    /// Device bytes of a `rows x k` matrix in this kind (what one mat-vec reads).
    pub fn matrix_bytes(self, rows: usize, k: usize) -> usize {
        let blocks = rows * (k / BLOCK_ELEMS);
        let units = rows * (k / self.unit_elems());
        blocks * self.qs_bytes_per_block()
            + units * (self.d_bytes_per_unit() + self.m_bytes_per_unit())
    }
}

/// Grid/block/shared-memory shape of one launch (mirrors `cudarc::driver::LaunchConfig`, kept
/// separate so the arithmetic is testable without CUDA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Grid size in blocks.
    pub grid: (u32, u32, u32),
    /// Block size in threads.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes.
    pub smem: u32,
}

/// Shared-memory floats for a mat-vec activation of length `k`: one pad float per 32 so that
/// lane `l` reading element `32*l + j` hits bank `(l + j) % 32` (no bank conflicts).
pub fn padded_len(k: usize) -> usize {
    k + k / 32
}

/// Most blocks a mat-vec launches; larger matrices give each block several rows per warp, so
/// the activation staged in shared memory is reused across rows.
pub const MATVEC_MAX_BLOCKS: u32 = 1024;

/// Launch shape of `matvec_<type>` for `rows x k`.
pub fn matvec_shape(rows: usize, k: usize) -> Shape {
    Shape {
        grid: (
            (rows as u32)
                .div_ceil(MATVEC_ROWS_PER_BLOCK)
                .clamp(1, MATVEC_MAX_BLOCKS),
            1,
            1,
        ),
        block: (MATVEC_THREADS, 1, 1),
        smem: (padded_len(k) * 4) as u32,
    }
}

/// Bytes of a decode activation of length `k` quantized by `quantize_act` (two 16-byte
/// halves, a scale and a scaled sum per 32-element block).
pub fn act_q8_bytes(k: usize) -> usize {
    (k / BLOCK_ELEMS) * 40
}

/// Largest input length of the int8 mat-vec (keeps every index in range).
pub const MAX_K: usize = 1 << 16;

/// Default blocks per multiprocessor of `matvecq` launches (the blocks stride over all rows,
/// so this trades scheduling slack against per-block overhead).
pub const MATVECQ_BLOCKS_PER_SM: u32 = 8;

/// Warps that split one row pair's input range in `matvecq` for an input of length `k`: the
/// largest power of two <= min(8, blocks / 64), at least 1 (each lane keeps >= 2 blocks per row).
pub fn matvecq_split(k: usize) -> u32 {
    let per = (k / BLOCK_ELEMS / 64).clamp(1, 8) as u32;
    1 << (31 - per.leading_zeros())
}

/// Launch shape of `matvecq_<type>` for `rows x k` (rows taken in pairs; `silu_pair` = the
/// gate|up form, `rows / 2` pairs) on a GPU with `sm_count` multiprocessors, at most
/// `blocks_per_sm` blocks each. Returns the shape and the K-split (`ks` argument).
pub fn matvecq_shape(
    rows: usize,
    k: usize,
    silu_pair: bool,
    sm_count: u32,
    blocks_per_sm: u32,
) -> (Shape, u32) {
    let pairs = if silu_pair {
        rows / 2
    } else {
        rows.div_ceil(2)
    } as u32;
    let ks = matvecq_split(k);
    let per = (MATVEC_THREADS / 32) / ks;
    let cap = (sm_count.max(1) * blocks_per_sm.max(1)).max(1);
    (
        Shape {
            grid: (pairs.div_ceil(per).clamp(1, cap), 1, 1),
            block: (MATVEC_THREADS, 1, 1),
            smem: 0,
        },
        ks,
    )
}

/// Launch shape of `quantize_act` for an input of length `k` (one warp per 32-element block).
pub fn quantize_act_shape(k: usize) -> Shape {
    Shape {
        grid: (
            ((k / BLOCK_ELEMS) as u32)
                .div_ceil(MATVEC_THREADS / 32)
                .max(1),
            1,
            1,
        ),
        block: (MATVEC_THREADS, 1, 1),
        smem: 0,
    }
}

/// Launch shape of `matmul_<type>` for `rows x k` times `t` tokens.
pub fn matmul_shape(rows: usize, t: usize) -> Shape {
    Shape {
        grid: (
            (rows as u32).div_ceil(MATVEC_ROWS_PER_BLOCK),
            (t as u32).div_ceil(MATMUL_TOKENS_PER_TILE),
            1,
        ),
        block: (MATVEC_THREADS, 1, 1),
        smem: 0,
    }
}

/// Launch shape of `attention` for `n_heads` query heads, `t` tokens, `head_dim`, a cache of
/// `max_ctx` positions.
pub fn attention_shape(n_heads: usize, t: usize, head_dim: usize, max_ctx: usize) -> Shape {
    Shape {
        grid: (n_heads as u32, t as u32, 1),
        block: (ATTENTION_THREADS, 1, 1),
        smem: ((4 * ATTENTION_THREADS as usize + head_dim + max_ctx + 32) * 4) as u32,
    }
}

/// Launch shape of `rope_kv` for `t` tokens of `n_heads + n_kv` rotated heads of `head_dim`
/// (one thread per rotated pair, 128 per block; grid.y = token).
pub fn rope_kv_shape(n_heads: usize, n_kv: usize, head_dim: usize, t: usize) -> Shape {
    let pairs = ((n_heads + n_kv) * head_dim / 2) as u32;
    Shape {
        grid: (pairs.div_ceil(128).max(1), t.max(1) as u32, 1),
        block: (128, 1, 1),
        smem: 0,
    }
}

/// Launch shape of an element-wise kernel over `n` elements.
pub fn elementwise_shape(n: usize) -> Shape {
    Shape {
        grid: ((n as u32).div_ceil(ELEMENTWISE_THREADS).max(1), 1, 1),
        block: (ELEMENTWISE_THREADS, 1, 1),
        smem: 0,
    }
}

/// Checks the limits the kernels rely on; the message says what is out of range.
pub fn check_model_limits(
    dims: &[(&str, usize)],
    head_dim: usize,
    max_ctx: usize,
) -> Result<(), String> {
    for (name, k) in dims {
        if *k == 0 || k % BLOCK_ELEMS != 0 {
            return Err(format!(
                "{name} = {k} is not a positive multiple of 32; the CUDA kernels need whole 32-element blocks"
            ));
        }
        if *k > MAX_K {
            return Err(format!(
                "{name} = {k} is too large for the CUDA mat-vec kernels (max {MAX_K})"
            ));
        }
    }
    if !matches!(head_dim, 16 | 32 | 64 | 128 | 256) {
        return Err(format!(
            "head_dim {head_dim} is not supported by the CUDA attention kernel (16, 32, 64, 128 or 256)"
        ));
    }
    let smem = attention_shape(1, 1, head_dim, max_ctx).smem as usize;
    if smem > MAX_DEFAULT_SMEM {
        return Err(format!(
            "context length {max_ctx} needs {smem} bytes of shared memory in the attention kernel; use a context of at most {}",
            MAX_DEFAULT_SMEM / 4 - head_dim - 4 * ATTENTION_THREADS as usize - 32
        ));
    }
    Ok(())
}

/// Checks that the float mat-vec (`matvec_<type>`, activation staged as f32 in shared memory)
/// can take an input of length `k`; quantized matrices use `matvecq` with a looser limit.
pub fn check_float_matvec_limit(name: &str, k: usize) -> Result<(), String> {
    if padded_len(k) * 4 > MAX_DEFAULT_SMEM {
        return Err(format!(
            "{name}: input length {k} is too large for the float mat-vec (max {}); quantize the model (Q8_0, Q4_0, Q4_1 or a K-quant) to run it on the GPU",
            MAX_DEFAULT_SMEM / 4 * 32 / 33
        ));
    }
    Ok(())
}

/// The CUDA C source compiled by NVRTC.
pub const KERNEL_SOURCE: &str = r#"
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
#define NEG_INF (__uint_as_float(0xff800000u))

#ifdef HOST_EMULATION
__device__ __forceinline__ float h2f(u16 h) { return host_h2f(h); }
#else
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#endif
__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u32 byte_of(const uint4 &v, int j) {
    u32 w = (j < 4) ? v.x : (j < 8) ? v.y : (j < 12) ? v.z : v.w;
    return (w >> (8 * (j & 3))) & 0xFFu;
}

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block; `red` holds at least 32 floats. All threads get the result.
__device__ float block_sum(float v, float *red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = (threadIdx.x < nw) ? red[threadIdx.x] : 0.0f;
    if (warp == 0) r = warp_sum(r);
    if (threadIdx.x == 0) red[0] = r;
    __syncthreads();
    float out = red[0];
    __syncthreads();
    return out;
}
__device__ float block_max(float v, float *red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = (threadIdx.x < nw) ? red[threadIdx.x] : NEG_INF;
    if (warp == 0) r = warp_max(r);
    if (threadIdx.x == 0) red[0] = r;
    __syncthreads();
    float out = red[0];
    __syncthreads();
    return out;
}

// The K-quant kinds (TY 6..9) are defined in their own section at the end of the source.
template <int TY>
__device__ __forceinline__ void load_block_k(const u8 *__restrict__ qs, const u16 *__restrict__ sd,
                                             const u16 *__restrict__ sm, long long blk,
                                             float w[32]);

// Dequantize block `b` (32 elements) of row `row`; nb = blocks per row.
// TY: 0 f32, 1 f16, 2 bf16, 3 q8_0, 4 q4_0, 5 q4_1, 6 q4_k, 7 q5_k, 8 q6_k, 9 q8_k
// (WeightKind in Rust).
template <int TY>
__device__ __forceinline__ void load_block(const u8 *__restrict__ qs, const u16 *__restrict__ sd,
                                           const u16 *__restrict__ sm, long long row, int nb,
                                           int b, float w[32]) {
    long long blk = row * (long long)nb + b;
    if (TY >= 6) {
        load_block_k<TY>(qs, sd, sm, blk, w);
        return;
    }
    if (TY == 0) {
        const float4 *p = reinterpret_cast<const float4 *>(qs) + blk * 8;
        #pragma unroll
        for (int i = 0; i < 8; i++) {
            float4 v = __ldg(p + i);
            w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
        }
    } else if (TY == 1 || TY == 2) {
        const uint4 *p = reinterpret_cast<const uint4 *>(qs) + blk * 4;
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            uint4 v = __ldg(p + i);
            u32 ws[4] = {v.x, v.y, v.z, v.w};
            #pragma unroll
            for (int k = 0; k < 4; k++) {
                u16 lo = (u16)(ws[k] & 0xFFFFu), hi = (u16)(ws[k] >> 16);
                w[8 * i + 2 * k] = (TY == 1) ? h2f(lo) : bf2f(lo);
                w[8 * i + 2 * k + 1] = (TY == 1) ? h2f(hi) : bf2f(hi);
            }
        }
    } else if (TY == 3) {
        const uint4 *p = reinterpret_cast<const uint4 *>(qs) + blk * 2;
        float d = h2f(__ldg(sd + blk));
        #pragma unroll
        for (int i = 0; i < 2; i++) {
            uint4 v = __ldg(p + i);
            #pragma unroll
            for (int j = 0; j < 16; j++) {
                w[16 * i + j] = (float)(signed char)(byte_of(v, j)) * d;
            }
        }
    } else {
        const uint4 *p = reinterpret_cast<const uint4 *>(qs) + blk;
        float d = h2f(__ldg(sd + blk));
        uint4 v = __ldg(p);
        if (TY == 4) {
            #pragma unroll
            for (int j = 0; j < 16; j++) {
                u32 q = byte_of(v, j);
                w[j] = ((float)(int)(q & 0xFu) - 8.0f) * d;
                w[j + 16] = ((float)(int)(q >> 4) - 8.0f) * d;
            }
        } else {
            float m = h2f(__ldg(sm + blk));
            #pragma unroll
            for (int j = 0; j < 16; j++) {
                u32 q = byte_of(v, j);
                w[j] = (float)(q & 0xFu) * d + m;
                w[j + 16] = (float)(q >> 4) * d + m;
            }
        }
    }
}

// y[row] (= or +=) sum_k W[row][k] * v[k] (+ bias[row]); one warp per row, v staged in shared
// memory with one pad float per 32 (conflict-free: lane l reads element 32*l + j).
// The staged vector v is, by `pre`: 0: x; 1: rmsnorm(x) * pw (eps), the norm computed by every
// block (fuses the RMSNorm before a projection); 2: silu(x[k]) * x[K + k] with x a gate|up row
// of 2K floats (fuses the SiLU gating before the down projection). bias may be null.
template <int TY>
__device__ __forceinline__ void matvec_impl(const u8 *__restrict__ qs, const u16 *__restrict__ sd,
                                            const u16 *__restrict__ sm, const float *__restrict__ x,
                                            float *__restrict__ y, int rows, int K, int accumulate,
                                            int pre, const float *__restrict__ pw, float eps,
                                            const float *__restrict__ bias) {
    extern __shared__ float xs[];
    __shared__ float red[32];
    float scale = 1.0f;
    if (pre == 1) {
        float ss = 0.0f;
        for (int i = threadIdx.x; i < K; i += blockDim.x) ss = fmaf(x[i], x[i], ss);
        ss = block_sum(ss, red);
        scale = 1.0f / sqrtf(ss / (float)K + eps);
    }
    for (int i = threadIdx.x; i < K; i += blockDim.x) {
        float v;
        if (pre == 1) {
            v = x[i] * scale * pw[i];
        } else if (pre == 2) {
            float g = x[i];
            v = g / (1.0f + expf(-g)) * x[K + i];
        } else {
            v = x[i];
        }
        xs[i + (i >> 5)] = v;
    }
    __syncthreads();
    // Block b owns rows [b*rpb, (b+1)*rpb); its warps take them in turn (warp-uniform loop), so
    // the host may cap the grid and amortise the staging of v over many rows.
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    int rpb = (rows + gridDim.x - 1) / gridDim.x;
    int r0 = blockIdx.x * rpb;
    int r1 = r0 + rpb < rows ? r0 + rpb : rows;
    int nb = K >> 5;
    for (int row = r0 + warp; row < r1; row += nwarps) {
        float acc = 0.0f;
        for (int b = lane; b < nb; b += 32) {
            float w[32];
            load_block<TY>(qs, sd, sm, row, nb, b, w);
            const float *xb = xs + b * 33;
            #pragma unroll
            for (int j = 0; j < 32; j++) acc = fmaf(w[j], xb[j], acc);
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            if (bias != 0) acc += bias[row];
            if (accumulate) y[row] += acc; else y[row] = acc;
        }
    }
}

// Y[t][row] (row stride ldy) (= or +=) sum_k W[row][k] * X[t][k] for T tokens (X row stride K).
// grid.x: row groups of 8 (one warp per row); grid.y: tiles of 8 tokens. Weights are read once
// per tile of 8 tokens.
template <int TY>
__device__ __forceinline__ void matmul_impl(const u8 *__restrict__ qs, const u16 *__restrict__ sd,
                                            const u16 *__restrict__ sm, const float *__restrict__ x,
                                            float *__restrict__ y, int rows, int K, int T, int ldy,
                                            int accumulate) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + warp;
    if (row >= rows) return;
    int t0 = blockIdx.y * 8;
    int nt = T - t0;
    if (nt > 8) nt = 8;
    int nb = K >> 5;
    float acc[8];
    #pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0.0f;
    for (int b = lane; b < nb; b += 32) {
        float w[32];
        load_block<TY>(qs, sd, sm, row, nb, b, w);
        #pragma unroll
        for (int tt = 0; tt < 8; tt++) {
            if (tt < nt) {
                const float4 *xb = reinterpret_cast<const float4 *>(x + (long long)(t0 + tt) * K + b * 32);
                float s = 0.0f;
                #pragma unroll
                for (int i = 0; i < 8; i++) {
                    float4 v = xb[i];
                    s = fmaf(w[4 * i], v.x, s);
                    s = fmaf(w[4 * i + 1], v.y, s);
                    s = fmaf(w[4 * i + 2], v.z, s);
                    s = fmaf(w[4 * i + 3], v.w, s);
                }
                acc[tt] += s;
            }
        }
    }
    #pragma unroll
    for (int tt = 0; tt < 8; tt++) {
        float s = warp_sum(acc[tt]);
        if (lane == 0 && tt < nt) {
            float *dst = y + (long long)(t0 + tt) * ldy + row;
            if (accumulate) *dst += s; else *dst = s;
        }
    }
}

// out[t][0..K] = dequantized row tokens[t] of the embedding matrix (vocab rows of K).
template <int TY>
__device__ __forceinline__ void embed_impl(const u8 *__restrict__ qs, const u16 *__restrict__ sd,
                                           const u16 *__restrict__ sm, const u32 *__restrict__ tokens,
                                           float *__restrict__ out, int K, int vocab) {
    int t = blockIdx.x;
    u32 tok = tokens[t];
    if (tok >= (u32)vocab) tok = (u32)(vocab - 1);
    int nb = K >> 5;
    for (int b = threadIdx.x; b < nb; b += blockDim.x) {
        float w[32];
        load_block<TY>(qs, sd, sm, (long long)tok, nb, b, w);
        float *o = out + (long long)t * K + b * 32;
        #pragma unroll
        for (int j = 0; j < 32; j++) o[j] = w[j];
    }
}

#define TYPED(NAME, TY)                                                                          \
extern "C" __global__ void matvec_##NAME(const u8 *qs, const u16 *sd, const u16 *sm,            \
                                         const float *x, float *y, int rows, int K, int acc,    \
                                         int pre, const float *pw, float eps,                   \
                                         const float *bias) {                                   \
    matvec_impl<TY>(qs, sd, sm, x, y, rows, K, acc, pre, pw, eps, bias);                         \
}                                                                                                \
extern "C" __global__ void matmul_##NAME(const u8 *qs, const u16 *sd, const u16 *sm,            \
                                         const float *x, float *y, int rows, int K, int T,      \
                                         int ldy, int acc) {                                    \
    matmul_impl<TY>(qs, sd, sm, x, y, rows, K, T, ldy, acc);                                     \
}                                                                                                \
extern "C" __global__ void embed_##NAME(const u8 *qs, const u16 *sd, const u16 *sm,             \
                                        const u32 *tokens, float *out, int K, int vocab) {      \
    embed_impl<TY>(qs, sd, sm, tokens, out, K, vocab);                                           \
}

TYPED(f32, 0)
TYPED(f16, 1)
TYPED(bf16, 2)
TYPED(q8_0, 3)
TYPED(q4_0, 4)
TYPED(q4_1, 5)

#ifdef HOST_EMULATION
__device__ __forceinline__ int dp4a_s8(int a, int b, int c) {
    for (int i = 0; i < 4; i++) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return c;
}
#else
__device__ __forceinline__ int dp4a_s8(int a, int b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
#endif

// One weight block of a quantized row as loaded from memory: Q4_0/Q4_1 use q0 (32 nibbles:
// byte j = element j | element j+16 << 4), Q8_0 q0 (elements 0..15) and q1 (16..31). The
// K-quants' use is described with load_wblk_k.
struct WBlk { uint4 q0; uint4 q1; float d; float m; };

template <int TY>
__device__ __forceinline__ WBlk load_wblk_k(const u8 *__restrict__ qs, const u16 *__restrict__ sd,
                                            const u16 *__restrict__ sm, long long blk);
template <int TY>
__device__ __forceinline__ float dot_wblk_k(const WBlk &w, const uint4 &lo, const uint4 &hi,
                                            float xd, float xsum);

template <int TY>
__device__ __forceinline__ WBlk load_wblk(const u8 *__restrict__ qs, const u16 *__restrict__ sd,
                                          const u16 *__restrict__ sm, long long blk) {
    if (TY >= 6) return load_wblk_k<TY>(qs, sd, sm, blk);
    WBlk w;
    if (TY == 3) {
        const uint4 *p = reinterpret_cast<const uint4 *>(qs) + blk * 2;
        w.q0 = __ldg(p);
        w.q1 = __ldg(p + 1);
    } else {
        w.q0 = __ldg(reinterpret_cast<const uint4 *>(qs) + blk);
        w.q1 = w.q0;
    }
    w.d = h2f(__ldg(sd + blk));
    w.m = (TY == 5) ? h2f(__ldg(sm + blk)) : 0.0f;
    return w;
}

// Dot product of one weight block with activation block b (int8 halves lo/hi, scale xd, and
// xsum = xd * sum of the int8 values).
template <int TY>
__device__ __forceinline__ float dot_wblk(const WBlk &w, const uint4 &lo, const uint4 &hi,
                                          float xd, float xsum) {
    if (TY >= 6) return dot_wblk_k<TY>(w, lo, hi, xd, xsum);
    u32 a[4] = {w.q0.x, w.q0.y, w.q0.z, w.q0.w};
    u32 l[4] = {lo.x, lo.y, lo.z, lo.w};
    u32 h[4] = {hi.x, hi.y, hi.z, hi.w};
    int s = 0;
    if (TY == 3) {
        u32 b[4] = {w.q1.x, w.q1.y, w.q1.z, w.q1.w};
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            s = dp4a_s8((int)a[j], (int)l[j], s);
            s = dp4a_s8((int)b[j], (int)h[j], s);
        }
        return w.d * xd * (float)s;
    }
    #pragma unroll
    for (int j = 0; j < 4; j++) {
        s = dp4a_s8((int)(a[j] & 0x0F0F0F0Fu), (int)l[j], s);
        s = dp4a_s8((int)((a[j] >> 4) & 0x0F0F0F0Fu), (int)h[j], s);
    }
    // Q4_0: w = (q - 8) d; Q4_1: w = q d + m.
    if (TY == 4) return w.d * (xd * (float)s - 8.0f * xsum);
    return w.d * xd * (float)s + w.m * xsum;
}

// One warp quantizes 32 values (lane l holds element l of block b of nb) into the int8
// activation layout of quantize_act, as the CPU kernels do (kernels::quantize_q8): d = max|v| /
// 127, q = round half to even (v * (1 / d)), s = d * sum(q).
__device__ __forceinline__ void quant_block32(float v, int b, int nb, u8 *__restrict__ xq) {
    int lane = threadIdx.x & 31;
    uint4 *xlo = reinterpret_cast<uint4 *>(xq);
    uint4 *xhi = xlo + nb;
    float *xd = reinterpret_cast<float *>(xhi + nb);
    float *xsm = xd + nb;
    float amax = warp_max(fabsf(v));
    float d = amax / 127.0f;
    int q = 0;
    if (d > 0.0f) {
        float id = 1.0f / d;
        q = (int)rintf(v * id);
        q = q > 127 ? 127 : (q < -127 ? -127 : q);
    }
    int qsum = q;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) qsum += __shfl_xor_sync(0xffffffffu, qsum, o);
    // Pack 4 lanes' bytes into one word (disjoint bits, so adding is OR-ing).
    int word = (int)(((u32)q & 0xFFu) << (8 * (lane & 3)));
    word += __shfl_xor_sync(0xffffffffu, word, 1);
    word += __shfl_xor_sync(0xffffffffu, word, 2);
    if ((lane & 3) == 0) {
        u32 *dst = reinterpret_cast<u32 *>(lane < 16 ? xlo + b : xhi + b);
        dst[(lane & 15) >> 2] = (u32)word;
    }
    if (lane == 0) {
        xd[b] = d;
        xsm[b] = d * (float)qsum;
    }
}

// Quantizes the decode activation once for the int8 mat-vecs: v = pre(x) (0: x; 1: rmsnorm(x)
// * pw (eps); 2: silu(x[k]) * x[K + k] for a gate|up row of 2K floats), per 32 elements as the
// CPU kernels do (d = max|v| / 127, q = round(v / d), s = d * sum(q)). Output layout (nb = K/32
// blocks): int8 elements 0..15 of each block [nb x 16 B] | elements 16..31 [nb x 16 B] |
// d [nb f32] | s [nb f32]. One warp per block; grid = ceil(nb / warps per block).
extern "C" __global__ void quantize_act(const float *__restrict__ x, u8 *__restrict__ xq, int K,
                                        int pre, const float *__restrict__ pw, float eps) {
    __shared__ float red[32];
    int nb = K >> 5;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    float scale = 1.0f;
    if (pre == 1) {
        // Every block computes the norm itself (K floats from L2; independent loads).
        const float4 *x4 = reinterpret_cast<const float4 *>(x);
        float ss = 0.0f;
        for (int i = threadIdx.x; i < (K >> 2); i += blockDim.x) {
            float4 v = x4[i];
            ss = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, ss))));
        }
        ss = block_sum(ss, red);
        scale = 1.0f / sqrtf(ss / (float)K + eps);
    }
    int b = blockIdx.x * nwarps + warp;
    if (b >= nb) return;
    int i = b * 32 + lane;
    float v;
    if (pre == 1) {
        v = x[i] * scale * pw[i];
    } else if (pre == 2) {
        float g = x[i];
        v = g / (1.0f + expf(-g)) * x[K + i];
    } else {
        v = x[i];
    }
    quant_block32(v, b, nb, xq);
}

// Orders floats as unsigned integers (for a packed atomicMax over (logit, index)).
__device__ __forceinline__ u32 float_order(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Decode mat-vec with int8 activations for quantized weights (Q8_0, Q4_0, Q4_1): y = W v with
// v the output of quantize_act (xq), dp4a integer dot products. Rows are taken in pairs; `ks`
// warps of a block (1, 2, 4 or 8) split one pair's K range and their partial sums are added
// in a fixed order (deterministic). A block handles (warps / ks) pairs at a time and strides
// over the pair groups. epi: 0 y[row] = . (+ bias[row]); 1 y[row] += .; 2 gate|up form (rows =
// 2n: y[i] = silu(gate_i . v) * (up_i . v), i < n); 3 as 0, and the largest (value, lowest
// index) is folded into *best by a packed 64-bit atomicMax (greedy argmax fused in).
template <int TY>
__device__ __forceinline__ void matvecq_impl(const u8 *__restrict__ qs, const u16 *__restrict__ sd,
                                             const u16 *__restrict__ sm, const u8 *__restrict__ xq,
                                             float *__restrict__ y, int rows, int K, int epi,
                                             int ks, const float *__restrict__ bias,
                                             u64 *best) {
    __shared__ float part[2][32];
    int nb = K >> 5;
    const uint4 *xlo = reinterpret_cast<const uint4 *>(xq);
    const uint4 *xhi = xlo + nb;
    const float *xd = reinterpret_cast<const float *>(xhi + nb);
    const float *xsm = xd + nb;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    int per = nwarps / ks;               // pairs per block at a time
    int slot = warp / ks, slice = warp % ks;
    int pairs = (epi == 2) ? (rows >> 1) : ((rows + 1) >> 1);
    int groups = (pairs + per - 1) / per;
    int step = 32 * ks;
    float bestv = NEG_INF;
    int besti = 0x7fffffff;
    for (int g = blockIdx.x; g < groups; g += gridDim.x) {
        int p = g * per + slot;
        bool live = p < pairs;
        int pp = live ? p : pairs - 1;
        int ra, rb;
        if (epi == 2) { ra = pp; rb = pp + (rows >> 1); }
        else { ra = 2 * pp; rb = ra + 1 < rows ? ra + 1 : ra; }
        long long ba = (long long)ra * nb, bb = (long long)rb * nb;
        float acc0 = 0.0f, acc1 = 0.0f;
        int b = slice * 32 + lane;
        // Two blocks of each row per lane per iteration: four weight loads in flight.
        for (; b + step < nb; b += 2 * step) {
            WBlk a0 = load_wblk<TY>(qs, sd, sm, ba + b);
            WBlk a1 = load_wblk<TY>(qs, sd, sm, ba + b + step);
            WBlk c0 = load_wblk<TY>(qs, sd, sm, bb + b);
            WBlk c1 = load_wblk<TY>(qs, sd, sm, bb + b + step);
            uint4 l0 = __ldg(xlo + b), h0 = __ldg(xhi + b);
            uint4 l1 = __ldg(xlo + b + step), h1 = __ldg(xhi + b + step);
            float d0 = __ldg(xd + b), s0 = __ldg(xsm + b);
            float d1 = __ldg(xd + b + step), s1 = __ldg(xsm + b + step);
            acc0 += dot_wblk<TY>(a0, l0, h0, d0, s0) + dot_wblk<TY>(a1, l1, h1, d1, s1);
            acc1 += dot_wblk<TY>(c0, l0, h0, d0, s0) + dot_wblk<TY>(c1, l1, h1, d1, s1);
        }
        if (b < nb) {
            WBlk a0 = load_wblk<TY>(qs, sd, sm, ba + b);
            WBlk c0 = load_wblk<TY>(qs, sd, sm, bb + b);
            uint4 l0 = __ldg(xlo + b), h0 = __ldg(xhi + b);
            float d0 = __ldg(xd + b), s0 = __ldg(xsm + b);
            acc0 += dot_wblk<TY>(a0, l0, h0, d0, s0);
            acc1 += dot_wblk<TY>(c0, l0, h0, d0, s0);
        }
        acc0 = warp_sum(acc0);
        acc1 = warp_sum(acc1);
        if (ks > 1) {
            if (lane == 0) { part[0][warp] = acc0; part[1][warp] = acc1; }
            __syncthreads();
            if (slice == 0 && lane == 0) {
                acc0 = 0.0f; acc1 = 0.0f;
                for (int k = 0; k < ks; k++) { acc0 += part[0][warp + k]; acc1 += part[1][warp + k]; }
            }
            __syncthreads();
        }
        if (live && slice == 0 && lane == 0) {
            if (epi == 2) {
                y[ra] = acc0 / (1.0f + expf(-acc0)) * acc1;
            } else {
                if (bias != 0) { acc0 += bias[ra]; acc1 += bias[rb]; }
                if (epi == 1) {
                    y[ra] += acc0;
                    if (rb != ra) y[rb] += acc1;
                } else {
                    y[ra] = acc0;
                    if (rb != ra) y[rb] = acc1;
                    if (epi == 3) {
                        // NaN never wins (as in argmax_step); ties keep the lower index.
                        if (acc0 == acc0 && (acc0 > bestv || (acc0 == bestv && ra < besti))) { bestv = acc0; besti = ra; }
                        if (rb != ra && acc1 == acc1 && (acc1 > bestv || (acc1 == bestv && rb < besti))) { bestv = acc1; besti = rb; }
                    }
                }
            }
        }
    }
    if (epi == 3 && slice == 0 && lane == 0 && besti != 0x7fffffff) {
        u64 key = ((u64)float_order(bestv) << 32) | (u64)(0xFFFFFFFFu - (u32)besti);
        atomicMax(best, key);
    }
}

#define QTYPED(NAME, TY)                                                                         \
extern "C" __global__ void matvecq_##NAME(const u8 *qs, const u16 *sd, const u16 *sm,           \
                                          const u8 *xq, float *y, int rows, int K, int epi,     \
                                          int ks, const float *bias, u64 *best) {               \
    matvecq_impl<TY>(qs, sd, sm, xq, y, rows, K, epi, ks, bias, best);                           \
}

QTYPED(q8_0, 3)
QTYPED(q4_0, 4)
QTYPED(q4_1, 5)


// out[t][i] = x[t][i] * w[i] / sqrt(mean(x[t]^2) + eps); one block per token row.
extern "C" __global__ void rmsnorm(const float *__restrict__ x, const float *__restrict__ w,
                                   float *__restrict__ out, int n, float eps) {
    __shared__ float red[32];
    const float *xr = x + (long long)blockIdx.x * n;
    float *orow = out + (long long)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss, red);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) orow[i] = xr[i] * inv * w[i];
}

// Rotary embedding, in place, on the first n_rot_heads heads (q heads then k heads) of each
// token row of `qkv` (row stride `stride` floats). Token t has position pos[0] + t.
// neox == 0: pairs (2i, 2i+1) (llama.cpp's NORM rope, used by the `llama` architecture whose
// GGUF Q/K weights are pre-permuted); neox != 0: pairs (i, i + hd/2).
// theta = pos * base^(-2i/hd).
// ff (may be null): per-pair frequency divisors (GGUF `rope_freqs.weight`).
extern "C" __global__ void rope(float *qkv, const int *pos, int n_rot_heads, int hd, int stride,
                                float base, int neox, const float *ff) {
    int t = blockIdx.x;
    int p = pos[0] + t;
    float *row = qkv + (long long)t * stride;
    int half = hd >> 1;
    int npairs = n_rot_heads * half;
    for (int idx = threadIdx.x; idx < npairs; idx += blockDim.x) {
        int h = idx / half, i = idx - h * half;
        float freq = powf(base, -2.0f * (float)i / (float)hd);
        if (ff != 0) freq = freq / ff[i];
        float ang = (float)p * freq;
        float s, c;
        sincosf(ang, &s, &c);
        float *hp = row + h * hd;
        int a = neox ? i : 2 * i;
        int b = neox ? i + half : 2 * i + 1;
        float x0 = hp[a], x1 = hp[b];
        hp[a] = x0 * c - x1 * s;
        hp[b] = x0 * s + x1 * c;
    }
}

// Copies the k and v parts of each token row of qkv into the caches at position pos[0] + t.
// Cache layout: [max_ctx][kvdim] floats per layer.
extern "C" __global__ void kv_store(const float *__restrict__ qkv, float *__restrict__ kc,
                                    float *__restrict__ vc, const int *pos, int qdim, int kvdim,
                                    int max_ctx) {
    int t = blockIdx.x;
    int p = pos[0] + t;
    if (p < 0 || p >= max_ctx) return;
    const float *row = qkv + (long long)t * (qdim + 2 * kvdim);
    for (int i = threadIdx.x; i < kvdim; i += blockDim.x) {
        kc[(long long)p * kvdim + i] = row[qdim + i];
        vc[(long long)p * kvdim + i] = row[qdim + kvdim + i];
    }
}

// rope + kv_store in one launch (the decode path): rotates the q and k heads of each token row
// in place and writes the rotated k and the v of token t into the caches at pos[0] + t.
extern "C" __global__ void rope_kv(float *qkv, float *__restrict__ kc, float *__restrict__ vc,
                                   const int *pos, int n_heads, int n_kv, int hd, float base,
                                   int neox, const float *ff, int max_ctx) {
    // grid = (chunks of the pairs, T): many blocks per token, so one decode step is not a
    // single block walking all heads.
    int t = blockIdx.y;
    int p = pos[0] + t;
    int gtid = blockIdx.x * blockDim.x + threadIdx.x, gstride = gridDim.x * blockDim.x;
    int kvdim = n_kv * hd, qdim = n_heads * hd;
    float *row = qkv + (long long)t * (qdim + 2 * kvdim);
    int half = hd >> 1;
    int npairs = (n_heads + n_kv) * half;
    bool store = p >= 0 && p < max_ctx;
    for (int idx = gtid; idx < npairs; idx += gstride) {
        int h = idx / half, i = idx - h * half;
        float freq = powf(base, -2.0f * (float)i / (float)hd);
        if (ff != 0) freq = freq / ff[i];
        float ang = (float)p * freq;
        float s, c;
        sincosf(ang, &s, &c);
        float *hp = row + h * hd;
        int a = neox ? i : 2 * i;
        int b = neox ? i + half : 2 * i + 1;
        float x0 = hp[a], x1 = hp[b];
        float r0 = x0 * c - x1 * s, r1 = x0 * s + x1 * c;
        hp[a] = r0;
        hp[b] = r1;
        if (h >= n_heads && store) {
            float *kr = kc + (long long)p * kvdim + (h - n_heads) * hd;
            kr[a] = r0;
            kr[b] = r1;
        }
    }
    if (store) {
        for (int i = gtid; i < kvdim; i += gstride)
            vc[(long long)p * kvdim + i] = row[qdim + kvdim + i];
    }
}

// Causal grouped-query attention. grid = (n_heads, T); token t (position pos[0] + t) attends
// to cache positions 0..=pos[0] + t. Query head h uses kv head h / (n_heads / n_kv).
// out[t][h*hd + d]; with xq != 0 (one token, hd a multiple of 32) the head's output is also
// quantized into the int8 activation layout of quantize_act (nb = n_heads * hd / 32 blocks)
// for the next mat-vec.
// Shared memory: partial sums (4 * blockDim, first for 16-byte alignment) | q (hd) |
// scores (max_ctx) | red (32).
extern "C" __global__ void attention(const float *__restrict__ qkv, const float *__restrict__ kc,
                                     const float *__restrict__ vc, float *__restrict__ out,
                                     const int *pos, int n_heads, int n_kv, int hd, int max_ctx,
                                     float scale, u8 *__restrict__ xq) {
    extern __shared__ float sm[];
    float *part = sm;
    float *qv = part + 4 * blockDim.x;
    float *sc = qv + hd;
    float *red = sc + max_ctx;
    int h = blockIdx.x, t = blockIdx.y;
    int p = pos[0] + t;
    int n = p + 1;
    if (n > max_ctx) n = max_ctx;
    if (n < 1) n = 1;
    int group = n_heads / n_kv;
    int kvh = h / group;
    int kvdim = n_kv * hd;
    const float *q = qkv + (long long)t * (n_heads * hd + 2 * kvdim) + h * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) qv[i] = q[i];
    __syncthreads();
    float lmax = NEG_INF;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float4 *kr = reinterpret_cast<const float4 *>(kc + (long long)j * kvdim + kvh * hd);
        // Four independent 16-byte loads and accumulators per step (hd / 4 is a multiple of 4),
        // unrolled further, so the row's loads are in flight together instead of one by one.
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        #pragma unroll 4
        for (int i = 0; i < (hd >> 2); i += 4) {
            float4 k0 = __ldg(kr + i), k1 = __ldg(kr + i + 1), k2 = __ldg(kr + i + 2), k3 = __ldg(kr + i + 3);
            const float *qq = qv + 4 * i;
            s0 = fmaf(qq[0], k0.x, fmaf(qq[1], k0.y, fmaf(qq[2], k0.z, fmaf(qq[3], k0.w, s0))));
            s1 = fmaf(qq[4], k1.x, fmaf(qq[5], k1.y, fmaf(qq[6], k1.z, fmaf(qq[7], k1.w, s1))));
            s2 = fmaf(qq[8], k2.x, fmaf(qq[9], k2.y, fmaf(qq[10], k2.z, fmaf(qq[11], k2.w, s2))));
            s3 = fmaf(qq[12], k3.x, fmaf(qq[13], k3.y, fmaf(qq[14], k3.z, fmaf(qq[15], k3.w, s3))));
        }
        float s = ((s0 + s1) + (s2 + s3)) * scale;
        sc[j] = s;
        lmax = fmaxf(lmax, s);
    }
    float m = block_max(lmax, red);
    float lsum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float e = expf(sc[j] - m);
        sc[j] = e;
        lsum += e;
    }
    float sum = block_sum(lsum, red);  // ends with __syncthreads: all sc[] visible
    // V: thread (column of 4 floats d4, part pi) sums positions pi, pi + parts, ...; two
    // independent 16-byte loads in flight per iteration.
    int cols = hd >> 2;
    int parts = blockDim.x / cols;
    int d4 = threadIdx.x % cols, pi = threadIdx.x / cols;
    float4 acc;
    acc.x = 0.0f; acc.y = 0.0f; acc.z = 0.0f; acc.w = 0.0f;
    if (pi < parts) {
        const float4 *vcol = reinterpret_cast<const float4 *>(vc + kvh * hd) + d4;
        long long rs = kvdim >> 2;
        float4 a1;
        a1.x = 0.0f; a1.y = 0.0f; a1.z = 0.0f; a1.w = 0.0f;
        int j = pi;
        #pragma unroll 2
        for (; j + parts < n; j += 2 * parts) {
            float4 v0 = __ldg(vcol + (long long)j * rs);
            float4 v1 = __ldg(vcol + (long long)(j + parts) * rs);
            float s0 = sc[j], s1 = sc[j + parts];
            acc.x = fmaf(s0, v0.x, acc.x); acc.y = fmaf(s0, v0.y, acc.y);
            acc.z = fmaf(s0, v0.z, acc.z); acc.w = fmaf(s0, v0.w, acc.w);
            a1.x = fmaf(s1, v1.x, a1.x); a1.y = fmaf(s1, v1.y, a1.y);
            a1.z = fmaf(s1, v1.z, a1.z); a1.w = fmaf(s1, v1.w, a1.w);
        }
        if (j < n) {
            float4 v0 = vcol[(long long)j * rs];
            float s0 = sc[j];
            acc.x = fmaf(s0, v0.x, acc.x); acc.y = fmaf(s0, v0.y, acc.y);
            acc.z = fmaf(s0, v0.z, acc.z); acc.w = fmaf(s0, v0.w, acc.w);
        }
        acc.x += a1.x; acc.y += a1.y; acc.z += a1.z; acc.w += a1.w;
    }
    reinterpret_cast<float4 *>(part)[threadIdx.x] = acc;
    __syncthreads();
    // The first hd threads each finish one output element (q no longer needed: qv reused).
    if (threadIdx.x < hd) {
        int c = threadIdx.x >> 2, e = threadIdx.x & 3;
        float s = 0.0f;
        for (int k = 0; k < parts; k++) s += part[4 * (k * cols + c) + e];
        float o = s / sum;
        out[(long long)t * n_heads * hd + h * hd + threadIdx.x] = o;
        qv[threadIdx.x] = o;
    }
    if (xq != 0) {
        __syncthreads();
        int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        if (warp < (hd >> 5)) {
            quant_block32(qv[warp * 32 + lane], h * (hd >> 5) + warp, (n_heads * hd) >> 5, xq);
        }
    }
}

// out[t][i] = silu(gu[t][i]) * gu[t][ffn + i], gu rows of 2*ffn (gate then up).
extern "C" __global__ void silu_mul(const float *__restrict__ gu, float *__restrict__ out, int ffn,
                                    int T) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)ffn * T) return;
    long long t = idx / ffn, i = idx - t * ffn;
    float g = gu[t * 2 * ffn + i];
    float u = gu[t * 2 * ffn + ffn + i];
    out[idx] = g / (1.0f + expf(-g)) * u;
}

// y[t][i] += b[i] for rows of n floats (bias of a projection, broadcast over T tokens).
extern "C" __global__ void bias_add(float *__restrict__ y, const float *__restrict__ b, int n,
                                    int T) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * T) return;
    y[idx] += b[idx % n];
}

// y[i] += x[i].
extern "C" __global__ void add_inplace(float *__restrict__ y, const float *__restrict__ x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

// v[0] = value (used to reset device counters inside a stream).
extern "C" __global__ void set_i32(int *v, int value) {
    if (threadIdx.x == 0 && blockIdx.x == 0) v[0] = value;
}

// Writes the chosen token: next input, output list, advances counter and position.
__device__ void emit_token(u32 tok, u32 *token_in, u32 *out_tokens, int *counter, int cap,
                           int *pos) {
    token_in[0] = tok;
    int c = counter[0];
    if (c >= 0 && c < cap) out_tokens[c] = tok;
    counter[0] = c + 1;
    pos[0] = pos[0] + 1;
}

// Greedy: index of the largest logit (first one on ties; NaN counts as -inf). One block.
extern "C" __global__ void argmax_step(const float *__restrict__ logits, int n, u32 *token_in,
                                       u32 *out_tokens, int *counter, int cap, int *pos) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    float best = NEG_INF;
    int besti = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = logits[i];
        if (v == v && (v > best || (v == best && i < besti))) { best = v; besti = i; }
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, besti, o);
        if (ov > best || (ov == best && oi < besti)) { best = ov; besti = oi; }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    if (lane == 0) { bv[warp] = best; bi[warp] = besti; }
    __syncthreads();
    if (warp == 0) {
        best = (lane < nw) ? bv[lane] : NEG_INF;
        besti = (lane < nw) ? bi[lane] : 0x7fffffff;
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, besti, o);
            if (ov > best || (ov == best && oi < besti)) { best = ov; besti = oi; }
        }
        if (lane == 0) {
            u32 tok = (besti == 0x7fffffff || besti >= n) ? 0u : (u32)besti;
            emit_token(tok, token_in, out_tokens, counter, cap, pos);
        }
    }
}

__device__ __forceinline__ u32 mix32(u32 x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

// Temperature + top-p (nucleus) sampling, one block, no sort:
//  e_i = exp((l_i - max) / temperature), between 0 and 1; the nucleus is {i : e_i >= thr} with thr the
//  largest threshold (found by 32 bisection steps on [0, 1]) whose kept mass is >= top_p * Z;
//  then u = uniform(seed, counter) * kept mass and the token is the first index (in vocabulary
//  order) where the running kept mass exceeds u. `probs` is scratch of n floats.
extern "C" __global__ void sample_step(const float *__restrict__ logits, float *__restrict__ probs,
                                       int n, float temperature, float top_p, u32 seed,
                                       u32 *token_in, u32 *out_tokens, int *counter, int cap,
                                       int *pos) {
    __shared__ float red[32];
    __shared__ float pre[1024];
    __shared__ int found;
    float lmax = NEG_INF;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = logits[i];
        if (v == v) lmax = fmaxf(lmax, v);
    }
    float m = block_max(lmax, red);
    float inv_t = 1.0f / fmaxf(temperature, 1e-6f);
    float ls = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = logits[i];
        float e = (v == v) ? expf((v - m) * inv_t) : 0.0f;
        probs[i] = e;
        ls += e;
    }
    float z = block_sum(ls, red);
    float target = fminf(fmaxf(top_p, 0.0f), 1.0f) * z;
    float lo = 0.0f, hi = 1.0f;  // mass(lo) >= target always (lo = 0 keeps everything)
    for (int it = 0; it < 32; it++) {
        float mid = 0.5f * (lo + hi);
        float lm = 0.0f;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            float e = probs[i];
            if (e >= mid) lm += e;
        }
        float mass = block_sum(lm, red);
        if (mass >= target) lo = mid; else hi = mid;
    }
    float thr = lo;
    // Contiguous chunks per thread, exclusive prefix over threads.
    int chunk = (n + blockDim.x - 1) / blockDim.x;
    int beg = threadIdx.x * chunk;
    int end = beg + chunk; if (end > n) end = n;
    float mine = 0.0f;
    for (int i = beg; i < end; i++) { float e = probs[i]; if (e >= thr) mine += e; }
    pre[threadIdx.x] = mine;
    if (threadIdx.x == 0) found = -1;
    __syncthreads();
    if (threadIdx.x == 0) {
        float run = 0.0f;
        for (int k = 0; k < (int)blockDim.x; k++) { float v = pre[k]; pre[k] = run; run += v; }
        red[0] = run;
    }
    __syncthreads();
    float kept = red[0];
    u32 r = mix32(seed ^ mix32((u32)counter[0] * 0x9E3779B9u + 0x85ebca6bu));
    float u = (float)(r >> 8) * (1.0f / 16777216.0f) * kept;
    float run = pre[threadIdx.x];
    if (beg < end && u >= run && u < run + mine) {
        int sel = -1;
        for (int i = beg; i < end; i++) {
            float e = probs[i];
            if (e >= thr) { run += e; sel = i; if (u < run) break; }
        }
        if (sel >= 0) atomicMax(&found, sel);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int sel = found;
        if (sel < 0) {  // rounding pushed u past the end: take the last kept token
            for (int i = n - 1; i >= 0; i--) { if (probs[i] >= thr) { sel = i; break; } }
            if (sel < 0) sel = 0;
        }
        emit_token((u32)sel, token_in, out_tokens, counter, cap, pos);
    }
}

// Emits the token that matvecq (epi 3) folded into *best, then clears *best for the next step.
extern "C" __global__ void argmax_finish(u64 *best, u32 *token_in, u32 *out_tokens, int *counter,
                                         int cap, int *pos) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    u64 key = best[0];
    u32 tok = key == 0ull ? 0u : 0xFFFFFFFFu - (u32)(key & 0xFFFFFFFFull);
    emit_token(tok, token_in, out_tokens, counter, cap, pos);
    best[0] = 0ull;
}

// Reads n16 16-byte words and writes one value per block (so the reads cannot be elided).
extern "C" __global__ void read_bandwidth(const uint4 *__restrict__ src, long long n16,
                                          u32 *__restrict__ sink) {
    u32 acc = 0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n16;
         i += (long long)gridDim.x * blockDim.x) {
        uint4 v = __ldg(src + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) sink[blockIdx.x] = acc;
}

// ==== Continuous batching (cuda::batch): the paged KV cache ===========================// One step runs T tokens of several sequences as one batch; only these kernels depend on which
// sequence a token belongs to. Per token t: its own position pos[t] and the offset bt[t] of its
// sequence's block table in `blocks` (block ids into the per-layer pools). Position p of a
// sequence lives in pool row blocks[bt + p / bs] * bs + p % bs; a row holds kvdim floats
// (pool layout [kv_blocks][bs][kvdim] per layer). The host checks every table covers the
// positions it is asked for and every block id is inside the pool.
__device__ __forceinline__ long long paged_row(const int *__restrict__ blocks, int bt, int p,
                                               int bs) {
    return (long long)blocks[bt + p / bs] * bs + (p % bs);
}

// rope_kv for a batch: rotates the q and k heads of token row t in place (position pos[t]) and
// writes the rotated k and the v into the pools at the token's own paged position.
// grid = (chunks of the rotated pairs, T), as rope_kv.
extern "C" __global__ void rope_kv_paged(float *qkv, float *__restrict__ kc,
                                         float *__restrict__ vc, const int *__restrict__ pos,
                                         const int *__restrict__ bt, const int *__restrict__ blocks,
                                         int n_heads, int n_kv, int hd, float base, int neox,
                                         const float *ff, int bs) {
    int t = blockIdx.y;
    int p = pos[t];
    long long prow = paged_row(blocks, bt[t], p, bs);
    int gtid = blockIdx.x * blockDim.x + threadIdx.x, gstride = gridDim.x * blockDim.x;
    int kvdim = n_kv * hd, qdim = n_heads * hd;
    float *row = qkv + (long long)t * (qdim + 2 * kvdim);
    int half = hd >> 1;
    int npairs = (n_heads + n_kv) * half;
    for (int idx = gtid; idx < npairs; idx += gstride) {
        int h = idx / half, i = idx - h * half;
        float freq = powf(base, -2.0f * (float)i / (float)hd);
        if (ff != 0) freq = freq / ff[i];
        float ang = (float)p * freq;
        float s, c;
        sincosf(ang, &s, &c);
        float *hp = row + h * hd;
        int a = neox ? i : 2 * i;
        int b = neox ? i + half : 2 * i + 1;
        float x0 = hp[a], x1 = hp[b];
        float r0 = x0 * c - x1 * s, r1 = x0 * s + x1 * c;
        hp[a] = r0;
        hp[b] = r1;
        if (h >= n_heads) {
            float *kr = kc + prow * kvdim + (h - n_heads) * hd;
            kr[a] = r0;
            kr[b] = r1;
        }
    }
    for (int i = gtid; i < kvdim; i += gstride) vc[prow * kvdim + i] = row[qdim + kvdim + i];
}

// Causal grouped-query attention over the paged cache. grid = (n_heads, T); token t attends to
// positions 0..=pos[t] of its own sequence (all written by that sequence: earlier steps, or
// rope_kv_paged of this step). Same arithmetic, in the same order, as `attention`, so a token's
// output does not depend on the rest of the batch. Shared memory as `attention` with room for
// max_ctx scores (the host keeps every position below max_ctx).
extern "C" __global__ void attention_paged(const float *__restrict__ qkv,
                                           const float *__restrict__ kc,
                                           const float *__restrict__ vc, float *__restrict__ out,
                                           const int *__restrict__ pos,
                                           const int *__restrict__ bt,
                                           const int *__restrict__ blocks, int n_heads, int n_kv,
                                           int hd, int bs, int max_ctx, float scale) {
    extern __shared__ float sm[];
    float *part = sm;
    float *qv = part + 4 * blockDim.x;
    float *sc = qv + hd;
    float *red = sc + max_ctx;
    int h = blockIdx.x, t = blockIdx.y;
    int p = pos[t];
    int tb = bt[t];
    int n = p + 1;
    if (n > max_ctx) n = max_ctx;
    if (n < 1) n = 1;
    int group = n_heads / n_kv;
    int kvh = h / group;
    int kvdim = n_kv * hd;
    const float *q = qkv + (long long)t * (n_heads * hd + 2 * kvdim) + h * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) qv[i] = q[i];
    __syncthreads();
    float lmax = NEG_INF;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float4 *kr = reinterpret_cast<const float4 *>(
            kc + paged_row(blocks, tb, j, bs) * kvdim + kvh * hd);
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        #pragma unroll 4
        for (int i = 0; i < (hd >> 2); i += 4) {
            float4 k0 = __ldg(kr + i), k1 = __ldg(kr + i + 1), k2 = __ldg(kr + i + 2), k3 = __ldg(kr + i + 3);
            const float *qq = qv + 4 * i;
            s0 = fmaf(qq[0], k0.x, fmaf(qq[1], k0.y, fmaf(qq[2], k0.z, fmaf(qq[3], k0.w, s0))));
            s1 = fmaf(qq[4], k1.x, fmaf(qq[5], k1.y, fmaf(qq[6], k1.z, fmaf(qq[7], k1.w, s1))));
            s2 = fmaf(qq[8], k2.x, fmaf(qq[9], k2.y, fmaf(qq[10], k2.z, fmaf(qq[11], k2.w, s2))));
            s3 = fmaf(qq[12], k3.x, fmaf(qq[13], k3.y, fmaf(qq[14], k3.z, fmaf(qq[15], k3.w, s3))));
        }
        float s = ((s0 + s1) + (s2 + s3)) * scale;
        sc[j] = s;
        lmax = fmaxf(lmax, s);
    }
    float m = block_max(lmax, red);
    float lsum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float e = expf(sc[j] - m);
        sc[j] = e;
        lsum += e;
    }
    float sum = block_sum(lsum, red);
    int cols = hd >> 2;
    int parts = blockDim.x / cols;
    int d4 = threadIdx.x % cols, pi = threadIdx.x / cols;
    float4 acc;
    acc.x = 0.0f; acc.y = 0.0f; acc.z = 0.0f; acc.w = 0.0f;
    if (pi < parts) {
        const float *vh = vc + kvh * hd;
        float4 a1;
        a1.x = 0.0f; a1.y = 0.0f; a1.z = 0.0f; a1.w = 0.0f;
        int j = pi;
        #pragma unroll 2
        for (; j + parts < n; j += 2 * parts) {
            float4 v0 = __ldg(reinterpret_cast<const float4 *>(vh + paged_row(blocks, tb, j, bs) * kvdim) + d4);
            float4 v1 = __ldg(reinterpret_cast<const float4 *>(vh + paged_row(blocks, tb, j + parts, bs) * kvdim) + d4);
            float s0 = sc[j], s1 = sc[j + parts];
            acc.x = fmaf(s0, v0.x, acc.x); acc.y = fmaf(s0, v0.y, acc.y);
            acc.z = fmaf(s0, v0.z, acc.z); acc.w = fmaf(s0, v0.w, acc.w);
            a1.x = fmaf(s1, v1.x, a1.x); a1.y = fmaf(s1, v1.y, a1.y);
            a1.z = fmaf(s1, v1.z, a1.z); a1.w = fmaf(s1, v1.w, a1.w);
        }
        if (j < n) {
            float4 v0 = reinterpret_cast<const float4 *>(vh + paged_row(blocks, tb, j, bs) * kvdim)[d4];
            float s0 = sc[j];
            acc.x = fmaf(s0, v0.x, acc.x); acc.y = fmaf(s0, v0.y, acc.y);
            acc.z = fmaf(s0, v0.z, acc.z); acc.w = fmaf(s0, v0.w, acc.w);
        }
        acc.x += a1.x; acc.y += a1.y; acc.z += a1.z; acc.w += a1.w;
    }
    reinterpret_cast<float4 *>(part)[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < hd) {
        int c = threadIdx.x >> 2, e = threadIdx.x & 3;
        float s = 0.0f;
        for (int k = 0; k < parts; k++) s += part[4 * (k * cols + c) + e];
        out[(long long)t * n_heads * hd + h * hd + threadIdx.x] = s / sum;
    }
}

// out[r][i] = rmsnorm(x[rows[r]]) * w[i] (rows of n floats): the final norm of only the token
// rows whose logits are wanted, gathered into consecutive rows for the output projection.
// One block per gathered row.
extern "C" __global__ void rmsnorm_rows(const float *__restrict__ x, const int *__restrict__ rows,
                                        const float *__restrict__ w, float *__restrict__ out, int n,
                                        float eps) {
    __shared__ float red[32];
    const float *xr = x + (long long)rows[blockIdx.x] * n;
    float *orow = out + (long long)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss, red);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) orow[i] = xr[i] * inv * w[i];
}

// ---- Batched sampling (CudaBatchModel::step_sampled): the host Sampler's steps for requests
// that set only temperature and top_p (sampling.rs, SimpleSample), the uniform draw made on the
// host from the request's own RNG. spec[r] = {mode, temperature, top_p, u}: mode 0 leaves row r
// alone (the host needs its logits), 1 = argmax (lowest index on ties, NaN never wins), 2 =
// softmax(logits / temperature); keep the smallest most-likely prefix whose mass >= top_p x the
// total (ties in id order; top_p >= 1 keeps every candidate, walked in id order); the token
// where the running kept mass first exceeds u x the kept mass, walking most likely first (id
// order among ties). Rows of mode 2 are overwritten with their probabilities (-1 for the
// excluded: -inf or NaN logits). No sort: probabilities are >= 0, so their bit patterns order
// like their values and the two cuts (nucleus, draw) are found by bisection over the bits,
// each step one deterministic block reduction. One block per row; out[r] = the token.
__device__ float sr_mass(const float *row, int n, u32 lo_key, u32 kstar, int tie_cut,
                         float *red) {
    // Mass of the nucleus members (key > kstar, or key == kstar and id <= tie_cut) whose key
    // is >= lo_key.
    float m = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float p = row[i];
        if (p < 0.0f) continue;
        u32 k = __float_as_uint(p);
        if (k >= lo_key && (k > kstar || (k == kstar && i <= tie_cut))) m += p;
    }
    return block_sum(m, red);
}
// Block-wide integer reduction of every thread's v: op 0 = sum, 1 = min, 2 = max. Every
// thread gets the result; `ired` holds one int per warp. Integer results do not depend on the
// order, so the shape of the tree does not matter.
__device__ int block_reduce_int(int v, int op, int *ired) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        int ov = __shfl_xor_sync(0xffffffffu, v, o);
        v = op == 0 ? v + ov : op == 1 ? (ov < v ? ov : v) : (ov > v ? ov : v);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) ired[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        int r = ired[0];
        for (int w = 1; w < nw; w++) {
            int x = ired[w];
            r = op == 0 ? r + x : op == 1 ? (x < r ? x : r) : (x > r ? x : r);
        }
        ired[0] = r;
    }
    __syncthreads();
    int r = ired[0];
    __syncthreads();
    return r;
}
__device__ int sr_count(const float *row, int n, u32 key, int tie_cut, int *ired) {
    int c = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float p = row[i];
        if (p >= 0.0f && __float_as_uint(p) == key && i <= tie_cut) c++;
    }
    return block_reduce_int(c, 0, ired);
}
// Id of the first (last when `last`) member with this key and id <= tie_cut; -1 if none.
__device__ int sr_find(const float *row, int n, u32 key, int tie_cut, bool last, int *ired) {
    int best = last ? -1 : 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float p = row[i];
        if (p >= 0.0f && __float_as_uint(p) == key && i <= tie_cut)
            best = last ? (i > best ? i : best) : (i < best ? i : best);
    }
    int r = block_reduce_int(best, last ? 2 : 1, ired);
    return (r == 0x7fffffff) ? -1 : r;
}

extern "C" __global__ void sample_rows(float *__restrict__ logits, int n,
                                       const float *__restrict__ spec, u32 *__restrict__ out) {
    __shared__ float red[32];
    __shared__ int ired[32];
    __shared__ float pre[1024];
    __shared__ int found;
    float *row = logits + (long long)blockIdx.x * n;
    const float *sp = spec + 4 * (long long)blockIdx.x;
    float mode = sp[0];
    if (mode != 1.0f && mode != 2.0f) return;
    if (mode == 1.0f) {
        float best = NEG_INF;
        int besti = 0x7fffffff;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            float v = row[i];
            if (v == v && (v > best || (v == best && i < besti))) { best = v; besti = i; }
        }
        float bm = block_max(best, red);
        // Lowest index holding the maximum (an all-NaN / -inf row gives 0).
        int r = block_reduce_int((best == bm) ? besti : 0x7fffffff, 1, ired);
        if (threadIdx.x == 0) out[blockIdx.x] = (r == 0x7fffffff || r >= n) ? 0u : (u32)r;
        return;
    }
    float inv = 1.0f / sp[1];
    float top_p = sp[2], u = sp[3];
    // Softmax over the candidates (the host: logit * (1 / t), then exp(l - max) / sum).
    float lmax = NEG_INF;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = row[i] * inv;
        if (v == v && v != NEG_INF) lmax = fmaxf(lmax, v);
    }
    float m = block_max(lmax, red);
    float ls = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = row[i] * inv;
        float e = (v == v && v != NEG_INF) ? expf(v - m) : -1.0f;
        row[i] = e;
        if (e > 0.0f) ls += e;
    }
    float c = 1.0f / block_sum(ls, red);
    float pmax = 0.0f, ltot = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float e = row[i];
        if (e >= 0.0f) { e *= c; row[i] = e; pmax = fmaxf(pmax, e); ltot += e; }
    }
    pmax = block_max(pmax, red);
    float total = block_sum(ltot, red);
    u32 kmax = __float_as_uint(pmax);
    int sel = -1;
    if (top_p >= 1.0f) {
        // Every candidate, in id order: contiguous chunks per thread, prefix over threads.
        float r = u * total;
        int chunk = (n + blockDim.x - 1) / blockDim.x;
        int beg = threadIdx.x * chunk;
        int end = beg + chunk; if (end > n) end = n;
        float mine = 0.0f;
        int lastc = -1;
        for (int i = beg; i < end; i++) { float p = row[i]; if (p >= 0.0f) { mine += p; lastc = i; } }
        pre[threadIdx.x] = mine;
        if (threadIdx.x == 0) found = -1;
        __syncthreads();
        if (threadIdx.x == 0) {
            float run = 0.0f;
            for (int k = 0; k < (int)blockDim.x; k++) { float v = pre[k]; pre[k] = run; run += v; }
        }
        __syncthreads();
        float run = pre[threadIdx.x];
        if (beg < end && r >= run && r < run + mine) {
            // This chunk holds the draw (the walk may round short of it: then its last one).
            int pick = lastc;
            for (int i = beg; i < end; i++) {
                float p = row[i];
                if (p >= 0.0f) { run += p; if (r < run) { pick = i; break; } }
            }
            atomicMax(&found, pick);
        }
        __syncthreads();
        sel = found;
        if (sel < 0) {
            // Rounding put the draw past the end: the host takes the last candidate.
            sel = block_reduce_int(lastc, 2, ired);
        }
    } else {
        // The nucleus cut kstar: the largest key whose mass (keys >= it) reaches the target.
        float target = top_p * total;
        u32 lo = 0, hi = kmax + 1;
        float mass_hi = 0.0f;  // mass of the keys >= hi
        while (hi - lo > 1) {
            u32 mid = lo + (hi - lo) / 2;
            float ms = sr_mass(row, n, mid, 0u, n, red);
            if (ms >= target) lo = mid; else { hi = mid; mass_hi = ms; }
        }
        u32 kstar = lo;
        float vstar = __uint_as_float(kstar);
        // Ties at the cut join in id order until the running mass reaches the target.
        int ties = sr_count(row, n, kstar, n, ired);
        int tie_cut = n;
        if (ties > 1) {
            int j = 1;
            float acc = mass_hi + vstar;
            while (acc < target && j < ties) { acc += vstar; j++; }
            if (j < ties) {
                if (threadIdx.x == 0) {
                    int seen = 0, cut = n;
                    for (int i = 0; i < n; i++) {
                        float p = row[i];
                        if (p >= 0.0f && __float_as_uint(p) == kstar && ++seen == j) { cut = i; break; }
                    }
                    found = cut;
                }
                __syncthreads();
                tie_cut = found;
                __syncthreads();
            }
        }
        float kept = sr_mass(row, n, kstar, kstar, tie_cut, red);
        float r = u * kept;
        if (!(r < kept)) {
            sel = sr_find(row, n, kstar, tie_cut, true, ired);
        } else {
            // The draw's key w: the largest whose kept mass (keys >= w) exceeds r.
            u32 lo2 = kstar, hi2 = kmax + 1;
            float above = 0.0f;  // kept mass of the keys >= hi2
            while (hi2 - lo2 > 1) {
                u32 mid = lo2 + (hi2 - lo2) / 2;
                float ms = sr_mass(row, n, mid, kstar, tie_cut, red);
                if (ms > r) lo2 = mid; else { hi2 = mid; above = ms; }
            }
            // The tie cut concerns only the nucleus cut's own key.
            int cut2 = (lo2 == kstar) ? tie_cut : n;
            int tw = sr_count(row, n, lo2, cut2, ired);
            if (tw <= 1) {
                sel = sr_find(row, n, lo2, cut2, false, ired);
            } else {
                // Several tokens share the draw's probability: walk them in id order.
                if (threadIdx.x == 0) {
                    float w = __uint_as_float(lo2), acc = above;
                    int pick = -1, last = -1;
                    for (int i = 0; i < n && i <= cut2; i++) {
                        float p = row[i];
                        if (p >= 0.0f && __float_as_uint(p) == lo2) {
                            acc += w; last = i;
                            if (r < acc) { pick = i; break; }
                        }
                    }
                    found = pick >= 0 ? pick : last;
                }
                __syncthreads();
                sel = found;
            }
            if (sel < 0) sel = sr_find(row, n, kstar, tie_cut, true, ired);
        }
    }
    if (threadIdx.x == 0) out[blockIdx.x] = sel < 0 ? 0u : (u32)sel;
}

// ---- Batched int8 products (CudaBatchModel): small-batch matrix product over quantized weights.
// Activation rows are quantized as quantize_act does (per 32 elements, d = max|v| / 127), each
// token row in its own quantize_act layout, rows `act_row` bytes apart (nb * 40 rounded up to
// 16 so every row's int8 halves stay 16-byte aligned).
__device__ __forceinline__ long long act_row_bytes(int nb) { return ((long long)nb * 40 + 15) & ~15LL; }

// xq row t = quantize_act(x row t) for T rows of K floats (row t at x + t * ldx).
// grid = (ceil(nb / warps per block), T); one warp per 32-element block.
extern "C" __global__ void quantize_rows(const float *__restrict__ x, u8 *__restrict__ xq, int K,
                                         int ldx) {
    int nb = K >> 5;
    int b = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (b >= nb) return;
    long long t = blockIdx.y;
    float v = x[t * ldx + b * 32 + (threadIdx.x & 31)];
    quant_block32(v, b, nb, xq + t * act_row_bytes(nb));
}

// rmsnorm then quantize_rows in one launch (CudaBatchModel's int8 path): row t of x is
// normalized exactly as `rmsnorm` does (it must run with the same 256 threads, so the sum of
// squares is reduced in the same order) and quantized per 32 elements exactly as
// `quantize_rows` does, so the int8 rows are bit for bit those of the two launches. The f32
// normalized row is never written. One block per row.
extern "C" __global__ void rmsnorm_quantize_rows(const float *__restrict__ x,
                                                 const float *__restrict__ w,
                                                 u8 *__restrict__ xq, int n, float eps) {
    __shared__ float red[32];
    const float *xr = x + (long long)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss, red);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    int nb = n >> 5;
    u8 *row = xq + (long long)blockIdx.x * act_row_bytes(nb);
    int nw = blockDim.x >> 5, lane = threadIdx.x & 31;
    for (int b = threadIdx.x >> 5; b < nb; b += nw) {
        int i = b * 32 + lane;
        quant_block32(xr[i] * inv * w[i], b, nb, row);
    }
}

// silu_mul then quantize_rows in one launch: the gated activation of row t (gu row t = gate |
// up, ffn each) is computed as `silu_mul` does and quantized per 32 elements as `quantize_rows`
// does (bit for bit the two launches); the f32 activation is never written.
// grid = (ceil(nb / warps per block), T); one warp per 32-element block.
extern "C" __global__ void silu_mul_quantize_rows(const float *__restrict__ gu,
                                                  u8 *__restrict__ xq, int ffn) {
    int nb = ffn >> 5;
    int b = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (b >= nb) return;
    long long t = blockIdx.y;
    int i = b * 32 + (threadIdx.x & 31);
    float g = gu[t * 2 * ffn + i];
    float u = gu[t * 2 * ffn + ffn + i];
    quant_block32(g / (1.0f + expf(-g)) * u, b, nb, xq + t * act_row_bytes(nb));
}

#define MQ_ROWS 32    // weight rows per block (4 per warp)
#define MQ_TOKENS 64  // token rows per tile (2 per lane)
#define MQ_CHUNK 8    // 32-element blocks of K staged per step

// Y[t][row] (row stride ldy) (= or +=) sum_b W[row] block b . Xq[t] block b for T token rows
// (Xq from quantize_rows), dp4a as in matvecq. grid = (ceil(rows / 32), ceil(T / 64)), 256
// threads. Per step the block stages MQ_CHUNK weight blocks of its 32 rows and the same K range
// of its (up to) 64 token rows in shared memory (the next step's loads are issued into
// registers before this step's products), so every weight block is read from memory once per
// 64 tokens. Warp w owns rows 4w..4w+3 of the group, lane l tokens l and l + 32. Each (row,
// token) sum is one thread's, over b = 0, 1, ... in order: a row's result does not depend on
// T or on the other tokens of the pass.
template <int TY>
__device__ __forceinline__ void matmulq_impl(const u8 *__restrict__ qs, const u16 *__restrict__ sd,
                                             const u16 *__restrict__ sm, const u8 *__restrict__ xq,
                                             float *__restrict__ y, int rows, int K, int T,
                                             int ldy, int accumulate) {
    __shared__ uint4 wq0[MQ_ROWS][MQ_CHUNK];
    __shared__ uint4 wq1[MQ_ROWS][MQ_CHUNK];
    __shared__ float wd[MQ_ROWS][MQ_CHUNK];
    __shared__ float wm[MQ_ROWS][MQ_CHUNK];
    __shared__ uint4 alo[MQ_CHUNK][MQ_TOKENS];
    __shared__ uint4 ahi[MQ_CHUNK][MQ_TOKENS];
    __shared__ float ad[MQ_CHUNK][MQ_TOKENS];
    __shared__ float asum[MQ_CHUNK][MQ_TOKENS];
    int nb = K >> 5;
    long long arow = act_row_bytes(nb);
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int r0 = blockIdx.x * MQ_ROWS, t0 = blockIdx.y * MQ_TOKENS;
    // This thread's staging jobs: weight (row wr, block wj); activations (token ak[i], block aj[i]).
    int wr = tid / MQ_CHUNK, wj = tid % MQ_CHUNK;
    int ak[2], aj[2];
    #pragma unroll
    for (int i = 0; i < 2; i++) {
        int p = tid + i * 256;
        ak[i] = p / MQ_CHUNK;
        aj[i] = p % MQ_CHUNK;
    }
    WBlk wn;
    uint4 ln[2], hn[2];
    float dn[2], sn[2];
    wn.q0.x = 0u; wn.q0.y = 0u; wn.q0.z = 0u; wn.q0.w = 0u;
    wn.q1 = wn.q0; wn.d = 0.0f; wn.m = 0.0f;
    #pragma unroll
    for (int i = 0; i < 2; i++) { ln[i] = wn.q0; hn[i] = wn.q0; dn[i] = 0.0f; sn[i] = 0.0f; }
    float acc[4][2];
    #pragma unroll
    for (int r = 0; r < 4; r++) { acc[r][0] = 0.0f; acc[r][1] = 0.0f; }
    for (int c = 0; c < nb; c += MQ_CHUNK) {
        if (c == 0) {
            // First chunk: nothing was prefetched yet.
            int b = wj;
            if (tid < MQ_ROWS * MQ_CHUNK && r0 + wr < rows && b < nb)
                wn = load_wblk<TY>(qs, sd, sm, (long long)(r0 + wr) * nb + b);
            #pragma unroll
            for (int i = 0; i < 2; i++) {
                int tt = t0 + ak[i], bb = aj[i];
                if (ak[i] < MQ_TOKENS && tt < T && bb < nb) {
                    const u8 *row = xq + tt * arow;
                    ln[i] = __ldg(reinterpret_cast<const uint4 *>(row) + bb);
                    hn[i] = __ldg(reinterpret_cast<const uint4 *>(row) + nb + bb);
                    dn[i] = __ldg(reinterpret_cast<const float *>(row + (long long)nb * 32) + bb);
                    sn[i] = __ldg(reinterpret_cast<const float *>(row + (long long)nb * 36) + bb);
                }
            }
        }
        if (tid < MQ_ROWS * MQ_CHUNK) {
            wq0[wr][wj] = wn.q0; wq1[wr][wj] = wn.q1; wd[wr][wj] = wn.d; wm[wr][wj] = wn.m;
        }
        #pragma unroll
        for (int i = 0; i < 2; i++) {
            if (ak[i] < MQ_TOKENS) {
                alo[aj[i]][ak[i]] = ln[i]; ahi[aj[i]][ak[i]] = hn[i];
                ad[aj[i]][ak[i]] = dn[i]; asum[aj[i]][ak[i]] = sn[i];
            }
        }
        __syncthreads();
        // Prefetch the next chunk into registers while this one is multiplied.
        int cn = c + MQ_CHUNK;
        if (cn < nb) {
            int b = cn + wj;
            if (tid < MQ_ROWS * MQ_CHUNK && r0 + wr < rows && b < nb)
                wn = load_wblk<TY>(qs, sd, sm, (long long)(r0 + wr) * nb + b);
            #pragma unroll
            for (int i = 0; i < 2; i++) {
                int tt = t0 + ak[i], bb = cn + aj[i];
                if (ak[i] < MQ_TOKENS && tt < T && bb < nb) {
                    const u8 *row = xq + tt * arow;
                    ln[i] = __ldg(reinterpret_cast<const uint4 *>(row) + bb);
                    hn[i] = __ldg(reinterpret_cast<const uint4 *>(row) + nb + bb);
                    dn[i] = __ldg(reinterpret_cast<const float *>(row + (long long)nb * 32) + bb);
                    sn[i] = __ldg(reinterpret_cast<const float *>(row + (long long)nb * 36) + bb);
                }
            }
        }
        int jn = nb - c < MQ_CHUNK ? nb - c : MQ_CHUNK;
        for (int j = 0; j < jn; j++) {
            uint4 l0 = alo[j][lane], h0 = ahi[j][lane];
            uint4 l1 = alo[j][lane + 32], h1 = ahi[j][lane + 32];
            float d0 = ad[j][lane], s0 = asum[j][lane];
            float d1 = ad[j][lane + 32], s1 = asum[j][lane + 32];
            #pragma unroll
            for (int r = 0; r < 4; r++) {
                int rr = warp * 4 + r;
                WBlk w;
                w.q0 = wq0[rr][j];
                w.q1 = (TY == 3) ? wq1[rr][j] : w.q0;
                w.d = wd[rr][j];
                w.m = wm[rr][j];
                acc[r][0] += dot_wblk<TY>(w, l0, h0, d0, s0);
                acc[r][1] += dot_wblk<TY>(w, l1, h1, d1, s1);
            }
        }
        __syncthreads();
    }
    #pragma unroll
    for (int r = 0; r < 4; r++) {
        int row = r0 + warp * 4 + r;
        if (row >= rows) continue;
        #pragma unroll
        for (int u = 0; u < 2; u++) {
            int tt = t0 + lane + 32 * u;
            if (tt < T) {
                float *dst = y + (long long)tt * ldy + row;
                if (accumulate) *dst += acc[r][u]; else *dst = acc[r][u];
            }
        }
    }
}

extern "C" __global__ void matmulq_q8_0(const u8 *qs, const u16 *sd, const u16 *sm, const u8 *xq,
                                        float *y, int rows, int K, int T, int ldy, int acc) {
    matmulq_impl<3>(qs, sd, sm, xq, y, rows, K, T, ldy, acc);
}
extern "C" __global__ void matmulq_q4_0(const u8 *qs, const u16 *sd, const u16 *sm, const u8 *xq,
                                        float *y, int rows, int K, int T, int ldy, int acc) {
    matmulq_impl<4>(qs, sd, sm, xq, y, rows, K, T, ldy, acc);
}
extern "C" __global__ void matmulq_q4_1(const u8 *qs, const u16 *sd, const u16 *sm, const u8 *xq,
                                        float *y, int rows, int K, int T, int ldy, int acc) {
    matmulq_impl<5>(qs, sd, sm, xq, y, rows, K, T, ldy, acc);
}
// ==== end of continuous batching ==============================================================
// ===========================================================================================
// Section: K-quants (Q4_K, Q5_K, Q6_K, Q8_K) and Qwen3's per-head q/k RMSNorm.
//
// Device layout (built by weights.rs). `qs` holds one record per 32-element sub-block: block
// blk = row * nb + b (nb = K / 32) of super-block blk >> 3, sub-block blk & 7:
//   Q4_K: 16 bytes, byte j = q[j] | q[j + 16] << 4 (the Q4_1 nibble order);
//   Q5_K: 20 bytes, the low nibbles as Q4_K, then a u32 whose bit e is bit 4 of q[e];
//   Q6_K: 24 bytes, the low nibbles of u = q + 32 as Q4_K, then two u32 holding bits 4..5 of
//         u[e] at bits 2e..2e+1 (e < 16) and u[16 + e] likewise;
//   Q8_K: 32 int8.
// `sd` per super-block: Q4_K/Q5_K the 16 header bytes of the GGUF block (f16 d, f16 dmin, 12
// bytes of packed 6-bit scales and mins, quant::scale_min_k4); Q6_K its 16 int8 scales; Q8_K
// its f32 d. `sm` per super-block: Q6_K its f16 d.
// Values: Q4_K/Q5_K x = (d sc) q - (dmin m); Q6_K x = (d sc[e / 16]) q, q in -32..31; Q8_K
// x = d q. The products d sc and dmin m are exact in f32: the kernels compute with the file's
// values, as the CPU backend does.
// ===========================================================================================

// Scale d * sc and offset dmin * m of sub-block s (0..8) from a Q4_K/Q5_K header.
__device__ __forceinline__ void kq_scale_min(const uint4 &h, int s, float &dsc, float &dm) {
    float d = h2f((u16)(h.x & 0xFFFFu)), dmin = h2f((u16)(h.x >> 16));
    u32 sc, m;
    if (s < 4) {
        sc = byte_of(h, 4 + s) & 63u;                       // packed[s]
        m = byte_of(h, 8 + s) & 63u;                        // packed[s + 4]
    } else {
        u32 b = byte_of(h, 8 + s);                          // packed[s + 4]
        sc = (b & 0xFu) | ((byte_of(h, s) >> 6) << 4);      // top bits in packed[s - 4]
        m = (b >> 4) | ((byte_of(h, 4 + s) >> 6) << 4);     // top bits in packed[s]
    }
    dsc = d * (float)sc;
    dm = dmin * (float)m;
}

// Bits 0..3 of v to bit 4 of bytes 0..3.
__device__ __forceinline__ u32 kq_spread1(u32 v) {
    return ((v & 1u) << 4) | ((v & 2u) << 11) | ((v & 4u) << 18) | ((v & 8u) << 25);
}
// Bit pairs 0..3 of v to bits 4..5 of bytes 0..3.
__device__ __forceinline__ u32 kq_spread2(u32 v) {
    return ((v & 3u) << 4) | ((v & 0xCu) << 10) | ((v & 0x30u) << 16) | ((v & 0xC0u) << 22);
}
// Four bytes in 0..63 minus 32, as signed bytes (no borrow crosses a byte).
__device__ __forceinline__ u32 kq_sub32(u32 q) {
    u32 t = q ^ 0x20202020u, s = t & 0x20202020u;
    return t | (s << 1) | (s << 2);
}
__device__ __forceinline__ uint4 kq_ld16(const u32 *__restrict__ p) {
    uint4 v;
    v.x = __ldg(p); v.y = __ldg(p + 1); v.z = __ldg(p + 2); v.w = __ldg(p + 3);
    return v;
}

// A K-quant sub-block as a WBlk: q0 = the 16 nibble bytes (Q4_K, Q5_K, Q6_K) or elements
// 0..15 (Q8_K); q1 = the high bits (Q5_K q1.x; Q6_K q1.x, q1.y) or elements 16..31 (Q8_K);
// d, m = Q4_K/Q5_K d sc and -(dmin m); Q6_K the scales of elements 0..15 and 16..31; Q8_K d, 0.
template <int TY>
__device__ __forceinline__ WBlk load_wblk_k(const u8 *__restrict__ qs, const u16 *__restrict__ sd,
                                            const u16 *__restrict__ sm, long long blk) {
    WBlk w;
    long long sb = blk >> 3;
    int s = (int)(blk & 7);
    w.q1.x = 0u; w.q1.y = 0u; w.q1.z = 0u; w.q1.w = 0u;
    if (TY == 6 || TY == 7) {
        if (TY == 6) {
            w.q0 = __ldg(reinterpret_cast<const uint4 *>(qs) + blk);
        } else {
            const u32 *p = reinterpret_cast<const u32 *>(qs) + blk * 5;
            w.q0 = kq_ld16(p);
            w.q1.x = __ldg(p + 4);
        }
        uint4 h = __ldg(reinterpret_cast<const uint4 *>(sd) + sb);
        float dsc, dm;
        kq_scale_min(h, s, dsc, dm);
        w.d = dsc;
        w.m = -dm;
    } else if (TY == 8) {
        const u32 *p = reinterpret_cast<const u32 *>(qs) + blk * 6;
        w.q0 = kq_ld16(p);
        w.q1.x = __ldg(p + 4);
        w.q1.y = __ldg(p + 5);
        uint4 h = __ldg(reinterpret_cast<const uint4 *>(sd) + sb);
        float d = h2f(__ldg(sm + sb));
        w.d = d * (float)(signed char)byte_of(h, 2 * s);
        w.m = d * (float)(signed char)byte_of(h, 2 * s + 1);
    } else {
        const uint4 *p = reinterpret_cast<const uint4 *>(qs) + blk * 2;
        w.q0 = __ldg(p);
        w.q1 = __ldg(p + 1);
        w.d = __ldg(reinterpret_cast<const float *>(sd) + sb);
        w.m = 0.0f;
    }
    return w;
}

// Dot product of a K-quant sub-block with activation block (lo, hi, xd, xsum) as dot_wblk:
// integer sums by dp4a, then the sub-block's scales.
template <int TY>
__device__ __forceinline__ float dot_wblk_k(const WBlk &w, const uint4 &lo, const uint4 &hi,
                                            float xd, float xsum) {
    u32 a[4] = {w.q0.x, w.q0.y, w.q0.z, w.q0.w};
    u32 l[4] = {lo.x, lo.y, lo.z, lo.w};
    u32 h[4] = {hi.x, hi.y, hi.z, hi.w};
    if (TY == 9) {
        u32 b[4] = {w.q1.x, w.q1.y, w.q1.z, w.q1.w};
        int s = 0;
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            s = dp4a_s8((int)a[j], (int)l[j], s);
            s = dp4a_s8((int)b[j], (int)h[j], s);
        }
        return w.d * xd * (float)s;
    }
    int s0 = 0, s1 = 0;  // elements 0..15, 16..31
    #pragma unroll
    for (int j = 0; j < 4; j++) {
        u32 q0 = a[j] & 0x0F0F0F0Fu, q1 = (a[j] >> 4) & 0x0F0F0F0Fu;
        if (TY == 7) {
            q0 |= kq_spread1((w.q1.x >> (4 * j)) & 0xFu);
            q1 |= kq_spread1((w.q1.x >> (16 + 4 * j)) & 0xFu);
        } else if (TY == 8) {
            q0 = kq_sub32(q0 | kq_spread2((w.q1.x >> (8 * j)) & 0xFFu));
            q1 = kq_sub32(q1 | kq_spread2((w.q1.y >> (8 * j)) & 0xFFu));
        }
        s0 = dp4a_s8((int)q0, (int)l[j], s0);
        s1 = dp4a_s8((int)q1, (int)h[j], s1);
    }
    if (TY == 8) return xd * (w.d * (float)s0 + w.m * (float)s1);
    // Q4_K/Q5_K: w = (d sc) q - dmin m, as Q4_1.
    return w.d * xd * (float)(s0 + s1) + w.m * xsum;
}

// Dequantizes K-quant block blk (32 elements) exactly as quant::dequantize does.
template <int TY>
__device__ __forceinline__ void load_block_k(const u8 *__restrict__ qs, const u16 *__restrict__ sd,
                                             const u16 *__restrict__ sm, long long blk,
                                             float w[32]) {
    WBlk k = load_wblk_k<TY>(qs, sd, sm, blk);
    #pragma unroll
    for (int j = 0; j < 16; j++) {
        if (TY == 9) {
            w[j] = (float)(signed char)byte_of(k.q0, j) * k.d;
            w[j + 16] = (float)(signed char)byte_of(k.q1, j) * k.d;
        } else {
            u32 b = byte_of(k.q0, j);
            int q0 = (int)(b & 0xFu), q1 = (int)(b >> 4);
            if (TY == 7) {
                q0 |= (int)(((k.q1.x >> j) & 1u) << 4);
                q1 |= (int)(((k.q1.x >> (16 + j)) & 1u) << 4);
            }
            if (TY == 8) {
                q0 |= (int)(((k.q1.x >> (2 * j)) & 3u) << 4);
                q1 |= (int)(((k.q1.y >> (2 * j)) & 3u) << 4);
                w[j] = k.d * (float)(q0 - 32);
                w[j + 16] = k.m * (float)(q1 - 32);
            } else {
                w[j] = k.d * (float)q0 + k.m;
                w[j + 16] = k.d * (float)q1 + k.m;
            }
        }
    }
}

TYPED(q4_k, 6)
TYPED(q5_k, 7)
TYPED(q6_k, 8)
TYPED(q8_k, 9)
QTYPED(q4_k, 6)
QTYPED(q5_k, 7)
QTYPED(q6_k, 8)
QTYPED(q8_k, 9)

// Qwen3: RMSNorm of every q and k head, in place, after the projections and biases and before
// RoPE, as the CPU backend does (x * (w / sqrt(mean(x^2) + eps)) per head of hd). grid =
// (n_heads + n_kv, T), one warp per head: block x < n_heads is q head x (weights qw), the
// others k heads (weights kw, at q_dim = n_heads * hd in the row); a null weight pointer leaves
// those heads alone. Rows of `stride` floats, one per token.
extern "C" __global__ void qk_norm(float *qkv, const float *__restrict__ qw,
                                   const float *__restrict__ kw, int n_heads, int hd, int stride,
                                   float eps) {
    int h = blockIdx.x, t = blockIdx.y;
    const float *wt = h < n_heads ? qw : kw;
    if (wt == 0) return;
    float *x = qkv + (long long)t * stride + (long long)h * hd;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hd; i += 32) ss = fmaf(x[i], x[i], ss);
    ss = warp_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)hd + eps);
    for (int i = threadIdx.x; i < hd; i += 32) x[i] = x[i] * (inv * wt[i]);
}
// ===========================================================================================
// End of section: K-quants and Qwen3.
// ===========================================================================================
"#;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn source_defines_every_kernel() {
        assert!(!KERNEL_SOURCE.is_empty());
        for k in PLAIN_KERNELS.iter().chain(&BATCH_KERNELS) {
            assert!(
                KERNEL_SOURCE.contains(&format!("__global__ void {k}(")),
                "kernel {k} missing"
            );
        }
        for k in TYPED_KERNELS {
            assert!(
                KERNEL_SOURCE.contains(&format!("__global__ void {k}_##NAME(")),
                "typed kernel {k} missing"
            );
        }
        for (i, t) in TYPE_SUFFIXES.iter().enumerate() {
            assert!(KERNEL_SOURCE.contains(&format!("TYPED({t}, {i})")));
            assert_eq!(WEIGHT_KINDS[i] as usize, i);
            assert_eq!(WEIGHT_KINDS[i].suffix(), *t);
        }
        for k in QUANT_KERNELS {
            assert!(
                KERNEL_SOURCE.contains(&format!("__global__ void {k}_##NAME(")),
                "quantized kernel {k} missing"
            );
        }
        for t in QUANT_SUFFIXES {
            let i = TYPE_SUFFIXES.iter().position(|s| s == &t).unwrap();
            assert!(KERNEL_SOURCE.contains(&format!("QTYPED({t}, {i})")));
            assert!(WEIGHT_KINDS[i].is_quantized());
        }
        for k in HEAD_NORM_KERNELS {
            assert!(
                KERNEL_SOURCE.contains(&format!("__global__ void {k}(")),
                "kernel {k} missing"
            );
        }
        assert_eq!(
            all_kernel_names().len(),
            PLAIN_KERNELS.len() + HEAD_NORM_KERNELS.len() + BATCH_KERNELS.len() + 3 * 10 + 7
        );
        // The K-quant kinds are template parameters 6..9 and have int8 mat-vecs.
        for (i, k) in WEIGHT_KINDS.iter().enumerate() {
            assert_eq!(k.is_k(), i >= 6, "{k:?}");
            assert_eq!(k.unit_elems() % BLOCK_ELEMS, 0);
        }
        assert!(!KERNEL_SOURCE.contains("#include"));
    }

    /// Host stubs that let a C++ compiler syntax- and type-check the CUDA C source.
    const HOST_STUBS: &str = r##"// Host stubs so g++ can syntax- and type-check the CUDA C source.
#include <math.h>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
#define __restrict__ __restrict
#define asm(...) ((void)0)
struct dim3s { unsigned x, y, z; };
extern dim3s threadIdx, blockIdx, blockDim, gridDim;
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
template <class T> T __ldg(const T *p) { return *p; }
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
inline int __shfl_xor_sync(unsigned, int v, int) { return v; }
inline void __syncthreads() {}
inline float __uint_as_float(unsigned u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
inline int atomicMax(int *a, int v) { int o = *a; if (v > o) *a = v; return o; }
inline unsigned long long atomicMax(unsigned long long *a, unsigned long long v) { unsigned long long o = *a; if (v > o) *a = v; return o; }
inline unsigned __float_as_uint(float f) { unsigned u; __builtin_memcpy(&u, &f, 4); return u; }
"##;

    #[test]
    fn source_type_checks_with_host_compiler() {
        let Some(cxx) = ["g++", "clang++"].into_iter().find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        }) else {
            eprintln!("SKIPPED: no g++/clang++ to syntax-check the CUDA source on the host");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kernels.cpp");
        std::fs::write(&f, format!("{HOST_STUBS}\n{KERNEL_SOURCE}")).unwrap();
        let out = std::process::Command::new(cxx)
            .args([
                "-std=c++17",
                "-fsyntax-only",
                "-Wall",
                "-Wno-unknown-pragmas",
            ])
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cxx} rejected the kernel source:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn source_braces_balance() {
        // Count outside `//` comments (they may hold interval notation like [a, b)).
        let code: String = KERNEL_SOURCE
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(code.matches('{').count(), code.matches('}').count());
        assert_eq!(code.matches('(').count(), code.matches(')').count());
        assert_eq!(code.matches('[').count(), code.matches(']').count());
    }

    #[test]
    fn launch_shapes() {
        let s = matvec_shape(576, 576);
        assert_eq!(s.grid, (72, 1, 1));
        assert_eq!(s.block, (256, 1, 1));
        assert_eq!(s.smem, ((576 + 18) * 4) as u32);
        let s = matvec_shape(49_153, 576);
        assert_eq!(s.grid.0, MATVEC_MAX_BLOCKS);
        // Every row is owned by some block: ceil(rows / grid) * grid >= rows.
        for rows in [1usize, 7, 8, 9, 576, 4864, 49_153, 151_936] {
            let g = matvec_shape(rows, 64).grid.0 as usize;
            assert!(rows.div_ceil(g) * g >= rows);
            assert!(g <= rows.div_ceil(8));
        }
        // matvecq: pairs of rows; ks warps per pair; grid capped at sm_count * blocks_per_sm.
        assert_eq!(matvecq_split(896), 1);
        assert_eq!(matvecq_split(4096), 2);
        assert_eq!(matvecq_split(8192), 4);
        assert_eq!(matvecq_split(14_336), 4);
        assert_eq!(matvecq_split(65_536), 8);
        let (s, ks) = matvecq_shape(1152, 896, false, 132, 8);
        assert_eq!((s.grid, ks, s.smem), ((72, 1, 1), 1, 0));
        let (s, ks) = matvecq_shape(2 * 14_336, 4096, true, 132, 8);
        assert_eq!((s.grid.0, ks), (132 * 8, 2));
        let (s, ks) = matvecq_shape(4096, 14_336, false, 132, 4);
        assert_eq!((s.grid.0, ks), (132 * 4, 4));
        let (s, _) = matvecq_shape(9, 64, false, 132, 8);
        assert_eq!(s.grid.0, 1);
        assert_eq!(matvecq_shape(2, 64, true, 0, 0).0.grid.0, 1);
        assert_eq!(quantize_act_shape(14_336).grid, (56, 1, 1));
        assert_eq!(quantize_act_shape(32).grid, (1, 1, 1));
        assert_eq!(act_q8_bytes(4096), 128 * 40);
        let s = matmul_shape(100, 17);
        assert_eq!(s.grid, (13, 3, 1));
        let s = attention_shape(9, 5, 64, 2048);
        assert_eq!(s.grid, (9, 5, 1));
        assert_eq!(s.smem, ((4 * 256 + 64 + 2048 + 32) * 4) as u32);
        assert_eq!(elementwise_shape(0).grid.0, 1);
        assert_eq!(elementwise_shape(257).grid.0, 2);
    }

    #[test]
    fn padding_is_bank_conflict_free() {
        // Lane l reads element 32*l + j at padded index (32*l + j) + l: banks must all differ.
        for j in 0..32usize {
            let mut banks: Vec<usize> = (0..32usize)
                .map(|l| {
                    let i = 32 * l + j;
                    (i + i / 32) % 32
                })
                .collect();
            banks.sort_unstable();
            banks.dedup();
            assert_eq!(banks.len(), 32);
        }
    }

    #[test]
    fn limits() {
        assert!(check_model_limits(&[("dim", 576), ("ffn", 1536)], 64, 2048).is_ok());
        assert!(check_model_limits(&[("ffn", 4864)], 64, 4096).is_ok());
        let e = check_model_limits(&[("dim", 100)], 64, 128).unwrap_err();
        assert!(e.contains("multiple of 32"), "{e}");
        let e = check_model_limits(&[("dim", 64)], 80, 128).unwrap_err();
        assert!(e.contains("head_dim"), "{e}");
        let e = check_model_limits(&[("dim", 64)], 64, 100_000).unwrap_err();
        assert!(e.contains("context length"), "{e}");
        // Llama-3-8B's ffn (14336) fits the int8 mat-vec but not the float one.
        assert!(check_model_limits(&[("ffn", 14_336)], 128, 4096).is_ok());
        assert!(check_float_matvec_limit("ffn_down", 14_336).is_err());
        assert!(check_float_matvec_limit("ffn_down", 4864).is_ok());
        let e = check_model_limits(&[("ffn", MAX_K + 32)], 64, 128).unwrap_err();
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn matrix_bytes() {
        assert_eq!(WeightKind::Q4_0.matrix_bytes(2, 64), 2 * 2 * 18);
        assert_eq!(WeightKind::Q4_1.matrix_bytes(1, 32), 20);
        assert_eq!(WeightKind::Q8_0.matrix_bytes(1, 32), 34);
        assert_eq!(WeightKind::F16.matrix_bytes(3, 32), 3 * 64);
        assert_eq!(WeightKind::F32.matrix_bytes(1, 64), 256);
        // K-quants: Q4_K, Q5_K and Q6_K keep the file's size (144, 176, 210 bytes per 256);
        // Q8_K drops the block sums (256 + 4 instead of 292).
        assert_eq!(WeightKind::Q4K.matrix_bytes(3, 512), 3 * 2 * 144);
        assert_eq!(WeightKind::Q5K.matrix_bytes(1, 256), 176);
        assert_eq!(WeightKind::Q6K.matrix_bytes(2, 256), 2 * 210);
        assert_eq!(WeightKind::Q8K.matrix_bytes(1, 256), 260);
    }
}
