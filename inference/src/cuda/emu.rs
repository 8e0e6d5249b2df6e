//! A host emulator for the CUDA kernels, so their indexing and synchronisation can be tested
//! on machines without a GPU.
//!
//! The exact [`KERNEL_SOURCE`] is compiled as C++ (with `HOST_EMULATION` defined) into a shared
//! library together with a small runtime: every CUDA thread of a block is an OS thread,
//! `__syncthreads` is a block-wide barrier, warp shuffles exchange values through a per-warp
//! array between two warp barriers, `__shared__` arrays are statics (blocks run one after
//! another, so one copy suffices), and device pointers are host addresses. Threads that return
//! early drop out of the barriers, as exited CUDA threads do. Launches are serialised (one
//! process-wide mutex), like a single stream.
//!
//! This is a test tool, not a backend: it is slow (one OS thread per CUDA thread) and needs a
//! C++20 compiler (`g++` or `clang++`, or `$CXX`) at run time. [`super::device::Gpu::emulated`]
//! wraps it so the same checks and the same [`super::CudaBackend`] run against it (without CUDA
//! graphs).

use std::ffi::{CString, c_char, c_void};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use super::kernels::{KERNEL_SOURCE, all_kernel_names};

/// The C++ runtime placed before the kernel source.
const PRELUDE: &str = r#"
#include <math.h>
#include <string.h>
#include <stdint.h>
#include <barrier>
#include <thread>
#include <vector>
#include <memory>
#include <array>
#include <string>
#include <unordered_map>
#include <functional>
#include <utility>
#include <mutex>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
struct dim3s { unsigned x, y, z; };
thread_local dim3s threadIdx, blockIdx, blockDim, gridDim;
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
template <class T> inline T __ldg(const T *p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float host_h2f(unsigned short h) {
    unsigned sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0) {
        float v = (float)mant * (1.0f / 16777216.0f);
        return sign ? -v : v;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    return __uint_as_float(bits);
}
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline unsigned long long atomicMax(unsigned long long *a, unsigned long long v) {
    unsigned long long old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}
inline int atomicMax(int *a, int v) {
    int old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}

struct EmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<std::array<uint32_t, 32>> exch;
};
thread_local EmuBlock *emu_cur = nullptr;
thread_local unsigned emu_lane = 0, emu_warp = 0;

inline void __syncthreads() { emu_cur->block->arrive_and_wait(); }
inline uint32_t emu_shfl(uint32_t v, int o) {
    auto &e = emu_cur->exch[emu_warp];
    auto &b = *emu_cur->warps[emu_warp];
    e[emu_lane] = v;
    b.arrive_and_wait();
    uint32_t r = e[(emu_lane ^ (unsigned)o) & 31u];
    b.arrive_and_wait();
    return r;
}
inline float __shfl_xor_sync(unsigned, float v, int o) {
    uint32_t u; memcpy(&u, &v, 4); u = emu_shfl(u, o); float r; memcpy(&r, &u, 4); return r;
}
inline int __shfl_xor_sync(unsigned, int v, int o) { return (int)emu_shfl((uint32_t)v, o); }

// Dynamic shared memory (the kernels name it xs or sm); blocks run one at a time.
alignas(16) float xs[1 << 16];
alignas(16) float sm[1 << 16];
"#;

const RUNTIME: &str = r#"
template <class... A, size_t... I>
void emu_call_impl(void (*f)(A...), void **args, std::index_sequence<I...>) {
    f(*reinterpret_cast<A *>(args[I])...);
}
template <class... A> void emu_call(void (*f)(A...), void **args) {
    emu_call_impl(f, args, std::index_sequence_for<A...>{});
}

static std::unordered_map<std::string, std::function<void(void **)>> &emu_registry();

extern "C" int emu_launch(const char *name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          unsigned by, unsigned bz, unsigned smem, void **args) {
    // One launch at a time: shared memory and the shared statics are process-wide.
    static std::mutex emu_mutex;
    std::lock_guard<std::mutex> guard(emu_mutex);
    auto &reg = emu_registry();
    auto it = reg.find(name);
    if (it == reg.end()) return 1;
    if (smem > sizeof(xs)) return 2;
    unsigned n = bx * by * bz;
    if (n == 0 || n > 1024) return 3;
    for (unsigned z = 0; z < gz; z++)
        for (unsigned y = 0; y < gy; y++)
            for (unsigned x = 0; x < gx; x++) {
                EmuBlock blk;
                blk.block.reset(new std::barrier<>((std::ptrdiff_t)n));
                unsigned nw = (n + 31) / 32;
                for (unsigned w = 0; w < nw; w++) {
                    unsigned cnt = (w + 1) * 32 <= n ? 32 : n - w * 32;
                    blk.warps.emplace_back(new std::barrier<>((std::ptrdiff_t)cnt));
                }
                blk.exch.resize(nw);
                memset(xs, 0xff, smem > 0 ? smem : 4);  // garbage, as on a GPU
                std::vector<std::thread> ts;
                ts.reserve(n);
                for (unsigned t = 0; t < n; t++) {
                    ts.emplace_back([&, t] {
                        emu_cur = &blk;
                        emu_lane = t % 32;
                        emu_warp = t / 32;
                        threadIdx = dim3s{t % bx, (t / bx) % by, t / (bx * by)};
                        blockIdx = dim3s{x, y, z};
                        blockDim = dim3s{bx, by, bz};
                        gridDim = dim3s{gx, gy, gz};
                        it->second(args);
                        blk.warps[emu_warp]->arrive_and_drop();
                        blk.block->arrive_and_drop();
                    });
                }
                for (auto &t : ts) t.join();
            }
    return 0;
}
"#;

/// The complete C++ translation unit for the emulator.
pub fn emulator_source() -> String {
    let kernels = KERNEL_SOURCE
        .replace("extern __shared__", "extern")
        .replace("__shared__", "static");
    let mut reg = String::from(
        "static std::unordered_map<std::string, std::function<void(void **)>> &emu_registry() {\n    static std::unordered_map<std::string, std::function<void(void **)>> r = {\n",
    );
    for name in all_kernel_names() {
        reg.push_str(&format!(
            "        {{\"{name}\", [](void **a) {{ emu_call({name}, a); }}}},\n"
        ));
    }
    reg.push_str("    };\n    return r;\n}\n");
    format!("#define HOST_EMULATION 1\n{PRELUDE}\n{kernels}\n{RUNTIME}\n{reg}")
}

type LaunchFn =
    unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, u32, u32, u32, *mut *mut c_void) -> i32;

/// The compiled emulator library.
pub struct EmuLib {
    _lib: libloading::Library,
    launch: LaunchFn,
    /// Where the library was built.
    pub path: PathBuf,
}

impl std::fmt::Debug for EmuLib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmuLib").field("path", &self.path).finish()
    }
}

impl EmuLib {
    /// Runs kernel `name` to completion. `args[i]` points to the i-th argument value.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), String> {
        let c = CString::new(name).map_err(|_| "kernel name with NUL".to_string())?;
        // SAFETY: `launch` is the emulator's entry point with this exact signature; `args`
        // points to values whose types the caller matched to the kernel's parameters (the same
        // contract as cuLaunchKernel), and it stays alive for the synchronous call.
        let r = unsafe {
            (self.launch)(
                c.as_ptr(),
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                smem,
                args.as_mut_ptr(),
            )
        };
        match r {
            0 => Ok(()),
            1 => Err(format!("emulator: unknown kernel {name}")),
            2 => Err(format!(
                "emulator: {smem} bytes of dynamic shared memory is too much"
            )),
            _ => Err(format!("emulator: bad block size {block:?}")),
        }
    }
}

fn compiler() -> Option<String> {
    let mut cands: Vec<String> = Vec::new();
    if let Ok(c) = std::env::var("CXX") {
        cands.push(c);
    }
    cands.push("g++".into());
    cands.push("clang++".into());
    cands.into_iter().find(|c| {
        std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn build() -> Result<EmuLib, String> {
    let cxx = compiler().ok_or("no C++ compiler (g++/clang++/$CXX) for the kernel emulator")?;
    let src = emulator_source();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in src.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let dir = std::env::temp_dir().join(format!("inference-cuda-emu-{h:016x}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let lib = dir.join("libkernels_emu.so");
    if !lib.exists() {
        let cpp = dir.join("kernels_emu.cpp");
        std::fs::write(&cpp, &src).map_err(|e| format!("writing {}: {e}", cpp.display()))?;
        let tmp = dir.join(format!("libkernels_emu.{}.so", std::process::id()));
        let out = std::process::Command::new(&cxx)
            .args([
                "-std=c++20",
                "-O1",
                "-shared",
                "-fPIC",
                "-pthread",
                "-w",
                "-o",
            ])
            .arg(&tmp)
            .arg(&cpp)
            .output()
            .map_err(|e| format!("running {cxx}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{cxx} failed to build the kernel emulator:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::fs::rename(&tmp, &lib).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    }
    // SAFETY: loading a library we just compiled from our own source; its initialisers only
    // set up statics.
    let l = unsafe { libloading::Library::new(&lib) }
        .map_err(|e| format!("loading {}: {e}", lib.display()))?;
    // SAFETY: `emu_launch` is defined in RUNTIME with the signature of `LaunchFn`.
    let launch: LaunchFn = unsafe { l.get::<LaunchFn>(b"emu_launch\0") }
        .map(|s| *s)
        .map_err(|e| format!("emu_launch missing: {e}"))?;
    Ok(EmuLib {
        _lib: l,
        launch,
        path: lib,
    })
}

/// The process-wide emulator (built on first use, cached by source hash in the temp dir).
pub fn emulator() -> Result<Arc<EmuLib>, String> {
    static LIB: OnceLock<Result<Arc<EmuLib>, String>> = OnceLock::new();
    LIB.get_or_init(|| build().map(Arc::new)).clone()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn source_registers_every_kernel() {
        let s = emulator_source();
        for k in all_kernel_names() {
            assert!(
                s.contains(&format!(
                    "{{\"{k}\", [](void **a) {{ emu_call({k}, a); }}}}"
                )),
                "{k}"
            );
        }
        assert!(!s.contains("__shared__"));
        assert!(s.starts_with("#define HOST_EMULATION"));
    }
}
