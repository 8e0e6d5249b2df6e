//! The GPU handle: driver presence check, context and stream, the NVRTC-compiled module, device
//! buffers addressed by raw device pointers, and kernel launches.
//!
//! Design notes:
//! - `cudarc`'s `CudaContext::new` panics when `libcuda` is missing, so [`cuda_available`]
//!   checks `is_culib_present()` first and returns a readable reason instead.
//! - cudarc's per-buffer event tracking is switched off right after the context is created
//!   (before any allocation): the backend uses a single stream, and event records inside a
//!   stream capture would break CUDA-graph capture.
//! - Kernels receive raw device pointers (`u64`), so a captured graph's arguments stay valid as
//!   long as the buffers live (they are allocated once at load).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg, sys,
};

use super::kernels::{KERNEL_SOURCE, Shape, all_kernel_names};
use super::nvrtc::{self, Image, Target};
use crate::error::InferenceError;

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable GPU / driver / NVRTC.
    #[error("no usable CUDA GPU: {0}")]
    Unavailable(String),
    /// A driver call failed.
    #[error("CUDA driver call {what} failed: {err}")]
    Driver {
        /// Which call.
        what: String,
        /// Driver error.
        err: String,
    },
    /// NVRTC compilation failed (message includes the compiler log).
    #[error("compiling the CUDA kernels failed: {0}")]
    Compile(String),
    /// The model or request does not fit the kernels' limits.
    #[error("{0}")]
    Invalid(String),
}

impl From<CudaError> for InferenceError {
    fn from(e: CudaError) -> Self {
        InferenceError::Backend {
            backend: "cuda".into(),
            message: e.to_string(),
        }
    }
}

/// Wraps a driver error with the call that produced it.
pub fn drv(what: &str) -> impl FnOnce(DriverError) -> CudaError + '_ {
    move |e| CudaError::Driver {
        what: what.to_string(),
        err: format!("{e:?}"),
    }
}

/// What the GPU is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Total device memory in bytes.
    pub total_mem: usize,
    /// Streaming multiprocessors.
    pub sm_count: i32,
    /// Driver's CUDA version, e.g. 13000 for 13.0.
    pub driver_version: i32,
    /// NVRTC version if NVRTC loads.
    pub nvrtc_version: Option<(i32, i32)>,
    /// Number of CUDA devices.
    pub device_count: usize,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GPU {} of {}: {} (sm_{}{}), {:.1} GiB, {} SMs, driver CUDA {}.{}, NVRTC {}",
            self.ordinal,
            self.device_count,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_mem as f64 / (1u64 << 30) as f64,
            self.sm_count,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10,
            match self.nvrtc_version {
                Some((a, b)) => format!("{a}.{b}"),
                None => "not found".into(),
            }
        )
    }
}

/// Reason shown when no CUDA driver library is present.
pub const NO_DRIVER_MESSAGE: &str = "the CUDA driver library (libcuda.so.1) is not installed on this machine, so there is no NVIDIA GPU to use; run on a machine with an NVIDIA GPU and driver (>= 525), or use the CPU backend";

/// Whether `libcuda` can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only attempts to dlopen the candidate library names; no symbol is called.
    unsafe { sys::is_culib_present() }
}

/// Describes GPU 0, or says why there is none. Never panics.
pub fn cuda_available() -> Result<DeviceInfo, String> {
    device_info(0)
}

/// Describes GPU `ordinal`, or says why it is not usable.
pub fn device_info(ordinal: usize) -> Result<DeviceInfo, String> {
    if !driver_present() {
        return Err(NO_DRIVER_MESSAGE.to_string());
    }
    let count = CudaContext::device_count().map_err(|e| {
        format!("the CUDA driver is installed but cuInit/cuDeviceGetCount failed ({e:?}); check that the NVIDIA kernel module is loaded (nvidia-smi)")
    })?;
    if count <= 0 {
        return Err("the CUDA driver reports no GPU (device count 0)".into());
    }
    if ordinal >= count as usize {
        return Err(format!("GPU {ordinal} requested but only {count} present"));
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| format!("creating a CUDA context on GPU {ordinal} failed: {e:?}"))?;
    info_from_ctx(&ctx, count as usize)
}

fn info_from_ctx(ctx: &Arc<CudaContext>, count: usize) -> Result<DeviceInfo, String> {
    let name = ctx.name().map_err(|e| format!("cuDeviceGetName: {e:?}"))?;
    let cc = ctx
        .compute_capability()
        .map_err(|e| format!("compute capability: {e:?}"))?;
    let total_mem = ctx.total_mem().map_err(|e| format!("total mem: {e:?}"))?;
    let sm_count = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| format!("SM count: {e:?}"))?;
    let mut dv: std::ffi::c_int = 0;
    // SAFETY: the driver library is loaded (a context exists); `dv` is valid for writes.
    let r = unsafe { sys::cuDriverGetVersion(&mut dv) };
    if r != sys::CUresult::CUDA_SUCCESS {
        dv = 0;
    }
    Ok(DeviceInfo {
        ordinal: ctx.ordinal(),
        name,
        compute_capability: cc,
        total_mem,
        sm_count,
        driver_version: dv,
        nvrtc_version: nvrtc::nvrtc_version().ok(),
        device_count: count,
    })
}

/// Storage behind a [`DevBuf`].
#[derive(Debug)]
enum Storage {
    /// Device memory.
    Cuda(CudaSlice<u8>),
    /// Host memory standing in for device memory in the emulator (16-byte aligned).
    Host(Box<[u128]>),
}

/// A device buffer with its raw address.
#[derive(Debug)]
pub struct DevBuf {
    storage: Storage,
    /// Raw device address (a host address under the emulator).
    pub ptr: u64,
    /// Length in bytes.
    pub len: usize,
}

impl DevBuf {
    /// Address of byte `offset` (no bounds check: callers compute offsets from sizes they own).
    pub fn at(&self, offset: usize) -> u64 {
        self.ptr + offset as u64
    }
    /// Address of f32 element `i`.
    pub fn f32_at(&self, i: usize) -> u64 {
        self.ptr + 4 * i as u64
    }
}

/// A kernel argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// Device pointer (0 = null).
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `unsigned int`.
    U32(u32),
    /// `long long`.
    I64(i64),
    /// `float`.
    F32(f32),
}

#[derive(Clone)]
enum Engine {
    Cuda {
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        _module: Arc<CudaModule>,
        funcs: HashMap<String, CudaFunction>,
    },
    Emu(Arc<super::emu::EmuLib>),
}

/// One launch as the profiler saw it: kernel, the label the caller noted (e.g. which matrix),
/// weight bytes the launch reads, and its time on the device.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfiledLaunch {
    /// Kernel name.
    pub kernel: String,
    /// Caller's label (empty if none).
    pub label: String,
    /// Weight bytes read (0 if not a weight product).
    pub bytes: usize,
    /// Milliseconds from the end of the previous launch to the end of this one.
    pub ms: f64,
}

/// Per-launch event timing (see [`Gpu::profile_start`]).
#[derive(Default)]
struct Profiler {
    on: AtomicBool,
    state: Mutex<ProfState>,
}

#[derive(Default)]
struct ProfState {
    start: Option<CudaEvent>,
    note: Option<(String, usize)>,
    launches: Vec<(String, String, usize, CudaEvent)>,
}

/// An initialised GPU with the compiled kernel module (or the host emulator, see
/// [`Gpu::emulated`]). Cloning shares the context, stream and module (several backends on one
/// GPU then run in order on the same stream).
#[derive(Clone)]
pub struct Gpu {
    engine: Engine,
    /// Device description.
    pub info: DeviceInfo,
    /// What NVRTC compiled for.
    pub target: Target,
    /// NVRTC's log (warnings), possibly empty.
    pub compile_log: String,
    /// Milliseconds spent compiling + loading the module.
    pub compile_ms: f64,
    /// Where the kernels came from: a prebuilt CUBIN of the image, or NVRTC at start-up (and
    /// why no prebuilt one was used).
    pub kernels_from: String,
    profiler: Arc<Profiler>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("info", &self.info)
            .field("target", &self.target)
            .field("emulated", &self.is_emulated())
            .finish()
    }
}

fn emu_err(e: String) -> CudaError {
    CudaError::Invalid(e)
}

impl Gpu {
    /// Opens GPU `ordinal`, compiles and loads all kernels.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        let info = device_info(ordinal).map_err(CudaError::Unavailable)?;
        // Kernels compiled ahead of time by the image pipeline come first: no NVRTC needed.
        let dir = super::prebuilt::kernels_dir();
        let prebuilt = super::prebuilt::find(&dir, info.compute_capability)
            .map_err(|e| CudaError::Unavailable(format!("prebuilt CUDA kernels: {e}")))?;
        if let Err(why) = &prebuilt
            && !nvrtc::nvrtc_present()
        {
            return Err(CudaError::Unavailable(format!(
                "{why}; and {}",
                nvrtc::no_nvrtc_message()
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("cuCtx (primary context)"))?;
        // SAFETY: called before any buffer exists; we use one stream and order all work on it,
        // and buffers are freed only when the owning backend (and its stream) is dropped.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        let t0 = Instant::now();
        let (target, ptx, log, kernels_from) = match prebuilt {
            Ok(p) => (
                Target::Cubin(p.arch),
                cudarc::nvrtc::Ptx::from_binary(p.bytes),
                String::new(),
                format!(
                    "prebuilt {} (NVRTC {} in the image pipeline)",
                    p.path.display(),
                    p.nvrtc
                ),
            ),
            Err(why) => {
                let target =
                    nvrtc::choose_target(info.compute_capability, &nvrtc::supported_archs())
                        .map_err(CudaError::Unavailable)?;
                let (image, log) = nvrtc::compile(KERNEL_SOURCE, target)
                    .map_err(|e| CudaError::Compile(e.to_string()))?;
                let ptx = match image {
                    Image::Cubin(b) => cudarc::nvrtc::Ptx::from_binary(b),
                    Image::Ptx(s) => cudarc::nvrtc::Ptx::from_src(s),
                };
                (
                    target,
                    ptx,
                    log,
                    format!("compiled by NVRTC at start-up ({why})"),
                )
            }
        };
        let module = ctx.load_module(ptx).map_err(|e| CudaError::Driver {
            what: format!("cuModuleLoadData ({target})"),
            err: format!(
                "{e:?}; if this says UNSUPPORTED_PTX_VERSION the NVRTC library is newer than the driver: use an NVRTC of the driver's CUDA version"
            ),
        })?;
        let mut funcs = HashMap::new();
        for name in all_kernel_names() {
            let f = module
                .load_function(&name)
                .map_err(drv(&format!("cuModuleGetFunction({name})")))?;
            funcs.insert(name, f);
        }
        let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(Gpu {
            engine: Engine::Cuda {
                ctx,
                stream,
                _module: module,
                funcs,
            },
            info,
            target,
            compile_log: log,
            compile_ms,
            kernels_from,
            profiler: Arc::default(),
        })
    }

    /// The host emulator of the kernels (see [`super::emu`]): same source, same launches,
    /// host memory, no CUDA graphs. For tests on machines without a GPU.
    pub fn emulated() -> Result<Self, CudaError> {
        let t0 = Instant::now();
        let lib = super::emu::emulator().map_err(CudaError::Unavailable)?;
        Ok(Gpu {
            engine: Engine::Emu(lib),
            info: DeviceInfo {
                ordinal: 0,
                name: "host emulator".into(),
                compute_capability: (9, 0),
                total_mem: 0,
                sm_count: 4,
                driver_version: 0,
                nvrtc_version: None,
                device_count: 0,
            },
            target: Target::Cubin(0),
            compile_log: String::new(),
            compile_ms: t0.elapsed().as_secs_f64() * 1e3,
            kernels_from: "host emulator".into(),
            profiler: Arc::default(),
        })
    }

    /// Whether this is the host emulator.
    pub fn is_emulated(&self) -> bool {
        matches!(self.engine, Engine::Emu(_))
    }

    /// Whether stream capture into CUDA graphs is available (not under the emulator).
    pub fn supports_graphs(&self) -> bool {
        !self.is_emulated()
    }

    /// A zero-filled buffer of `len` bytes.
    pub fn alloc(&self, len: usize) -> Result<DevBuf, CudaError> {
        match &self.engine {
            Engine::Cuda { stream, .. } => {
                let slice = stream
                    .alloc_zeros::<u8>(len.max(16))
                    .map_err(drv(&format!("cuMemAlloc({len} bytes)")))?;
                let ptr = {
                    let (p, _sync) = slice.device_ptr(stream);
                    p
                };
                Ok(DevBuf {
                    storage: Storage::Cuda(slice),
                    ptr,
                    len,
                })
            }
            Engine::Emu(_) => {
                let mut b = vec![0u128; len.div_ceil(16).max(1)].into_boxed_slice();
                let ptr = b.as_mut_ptr() as u64;
                Ok(DevBuf {
                    storage: Storage::Host(b),
                    ptr,
                    len,
                })
            }
        }
    }

    /// Copies `bytes` to a new buffer.
    pub fn upload(&self, bytes: &[u8]) -> Result<DevBuf, CudaError> {
        if bytes.is_empty() {
            return self.alloc(0);
        }
        match &self.engine {
            Engine::Cuda { stream, .. } => {
                let slice = stream
                    .clone_htod(bytes)
                    .map_err(drv(&format!("cuMemcpyHtoD({} bytes)", bytes.len())))?;
                let ptr = {
                    let (p, _sync) = slice.device_ptr(stream);
                    p
                };
                Ok(DevBuf {
                    storage: Storage::Cuda(slice),
                    ptr,
                    len: bytes.len(),
                })
            }
            Engine::Emu(_) => {
                let mut b = self.alloc(bytes.len())?;
                self.write(&mut b, 0, bytes)?;
                Ok(b)
            }
        }
    }

    /// Copies f32 values to a new buffer.
    pub fn upload_f32(&self, v: &[f32]) -> Result<DevBuf, CudaError> {
        self.upload(&f32_bytes(v))
    }

    /// Writes `bytes` at `offset` of `buf` (synchronous).
    pub fn write(&self, buf: &mut DevBuf, offset: usize, bytes: &[u8]) -> Result<(), CudaError> {
        if offset + bytes.len() > buf.len {
            return Err(CudaError::Invalid(format!(
                "write of {} bytes at {offset} past a {}-byte buffer",
                bytes.len(),
                buf.len
            )));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        match (&self.engine, &mut buf.storage) {
            (Engine::Cuda { stream, .. }, Storage::Cuda(slice)) => {
                let mut view = slice.slice_mut(offset..offset + bytes.len());
                stream
                    .memcpy_htod(bytes, &mut view)
                    .map_err(drv("cuMemcpyHtoD"))
            }
            (Engine::Emu(_), Storage::Host(b)) => {
                host_bytes_mut(b)[offset..offset + bytes.len()].copy_from_slice(bytes);
                Ok(())
            }
            _ => Err(mixed()),
        }
    }

    /// A staging buffer of `len` bytes (page-locked on a GPU), zero-filled.
    pub fn alloc_staging(&self, len: usize) -> Result<Staging, CudaError> {
        let mem = match &self.engine {
            Engine::Cuda { ctx, stream, .. } => {
                // SAFETY: the allocation is uninitialised; it is zero-filled through its raw
                // pointer below before any slice of it is made.
                let mut slice = unsafe { ctx.alloc_pinned_with_flags::<u8>(len.max(1), 0) }
                    .map_err(drv(&format!("cuMemHostAlloc({len} bytes)")))?;
                let ptr = slice.as_mut_ptr().map_err(drv("cuEventSynchronize"))?;
                // SAFETY: `ptr` points to `slice.len()` bytes owned by `slice`, nothing else
                // refers to them yet.
                unsafe { std::ptr::write_bytes(ptr, 0, slice.len()) };
                StagingMem::Pinned {
                    slice,
                    stream: stream.clone(),
                }
            }
            Engine::Emu(_) => StagingMem::Host(vec![0u8; len.max(1)]),
        };
        Ok(Staging {
            mem,
            pending: false,
        })
    }

    /// Copies `staging[range]` to `buf` at `offset`. On a GPU the copy is queued on the stream
    /// and this returns at once: the next [`Staging::writable`] waits for it. Synchronous under
    /// the emulator.
    pub fn copy_from_staging(
        &self,
        staging: &mut Staging,
        range: std::ops::Range<usize>,
        buf: &mut DevBuf,
        offset: usize,
    ) -> Result<(), CudaError> {
        let len = range.end.saturating_sub(range.start);
        if range.end > staging.len() || offset.saturating_add(len) > buf.len {
            return Err(CudaError::Invalid(format!(
                "staged copy of bytes {range:?} (staging {}) to offset {offset} of a {}-byte \
                 buffer is out of bounds",
                staging.len(),
                buf.len
            )));
        }
        if len == 0 {
            return Ok(());
        }
        match (&self.engine, &mut staging.mem, &mut buf.storage) {
            (
                Engine::Cuda { ctx, stream, .. },
                StagingMem::Pinned { slice, .. },
                Storage::Cuda(_),
            ) => {
                let src = &slice.as_slice().map_err(drv("cuEventSynchronize"))?[range];
                ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))?;
                // SAFETY: the destination range lies inside `buf` (checked above); the source is
                // page-locked memory owned by `staging`, which is not written again before the
                // stream is synchronised (`Staging::writable`) and not freed before that
                // (`Staging`'s drop synchronises).
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(
                        buf.ptr + offset as u64,
                        src,
                        stream.cu_stream(),
                    )
                }
                .map_err(drv("cuMemcpyHtoDAsync"))?;
                staging.pending = true;
                Ok(())
            }
            (Engine::Emu(_), StagingMem::Host(v), Storage::Host(b)) => {
                host_bytes_mut(b)[offset..offset + len].copy_from_slice(&v[range]);
                Ok(())
            }
            _ => Err(mixed()),
        }
    }

    /// Reads `len` bytes at `offset` of `buf` (synchronous).
    pub fn read(&self, buf: &DevBuf, offset: usize, len: usize) -> Result<Vec<u8>, CudaError> {
        if offset + len > buf.len {
            return Err(CudaError::Invalid(format!(
                "read of {len} bytes at {offset} past a {}-byte buffer",
                buf.len
            )));
        }
        let mut out = vec![0u8; len];
        if len == 0 {
            return Ok(out);
        }
        match (&self.engine, &buf.storage) {
            (Engine::Cuda { stream, .. }, Storage::Cuda(slice)) => {
                let view = slice.slice(offset..offset + len);
                stream
                    .memcpy_dtoh(&view, &mut out)
                    .map_err(drv("cuMemcpyDtoH"))?;
            }
            (Engine::Emu(_), Storage::Host(b)) => {
                out.copy_from_slice(&host_bytes(b)[offset..offset + len]);
            }
            _ => return Err(mixed()),
        }
        Ok(out)
    }

    /// Reads `n` f32 values starting at element `first`.
    pub fn read_f32(&self, buf: &DevBuf, first: usize, n: usize) -> Result<Vec<f32>, CudaError> {
        Ok(bytes_f32(&self.read(buf, first * 4, n * 4)?))
    }

    /// Reads `n` u32 values starting at element `first`.
    pub fn read_u32(&self, buf: &DevBuf, first: usize, n: usize) -> Result<Vec<u32>, CudaError> {
        let b = self.read(buf, first * 4, n * 4)?;
        Ok(b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Device-to-device copy of `len` bytes.
    pub fn copy(&self, src: &DevBuf, dst: &mut DevBuf, len: usize) -> Result<(), CudaError> {
        if len > src.len || len > dst.len {
            return Err(CudaError::Invalid("copy larger than a buffer".into()));
        }
        match (&self.engine, &src.storage, &mut dst.storage) {
            (Engine::Cuda { stream, .. }, Storage::Cuda(s), Storage::Cuda(d)) => {
                let s = s.slice(0..len);
                let mut d = d.slice_mut(0..len);
                stream.memcpy_dtod(&s, &mut d).map_err(drv("cuMemcpyDtoD"))
            }
            (Engine::Emu(_), Storage::Host(s), Storage::Host(d)) => {
                host_bytes_mut(d)[..len].copy_from_slice(&host_bytes(s)[..len]);
                Ok(())
            }
            _ => Err(mixed()),
        }
    }

    /// Waits for all queued work.
    pub fn sync(&self) -> Result<(), CudaError> {
        match &self.engine {
            Engine::Cuda { stream, .. } => stream.synchronize().map_err(drv("cuStreamSynchronize")),
            Engine::Emu(_) => Ok(()),
        }
    }

    /// Launches kernel `name` with `shape` and `args` (asynchronous on a GPU, synchronous
    /// under the emulator).
    pub fn launch(&self, name: &str, shape: Shape, args: &[Arg]) -> Result<(), CudaError> {
        match &self.engine {
            Engine::Cuda { stream, funcs, .. } => {
                let f = funcs
                    .get(name)
                    .ok_or_else(|| CudaError::Invalid(format!("kernel {name} not loaded")))?;
                let mut b = stream.launch_builder(f);
                for a in args {
                    match a {
                        Arg::Ptr(p) => b.arg(p),
                        Arg::I32(v) => b.arg(v),
                        Arg::U32(v) => b.arg(v),
                        Arg::I64(v) => b.arg(v),
                        Arg::F32(v) => b.arg(v),
                    };
                }
                let cfg = LaunchConfig {
                    grid_dim: shape.grid,
                    block_dim: shape.block,
                    shared_mem_bytes: shape.smem,
                };
                // SAFETY: every kernel's parameter list is matched by its call sites (backend.rs,
                // checks.rs; see the signatures in kernels.rs); pointers are device buffers
                // owned by the caller that outlive the queued work (they are freed only after a
                // stream sync on drop), and sizes derive from the dimensions used to allocate.
                unsafe { b.launch(cfg) }
                    .map(|_| ())
                    .map_err(drv(&format!("cuLaunchKernel({name})")))?;
                if self.profiler.on.load(Ordering::Relaxed) {
                    let ev = stream
                        .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(drv("cuEventRecord"))?;
                    let mut st = self.lock_profiler();
                    let (label, bytes) = st.note.take().unwrap_or_default();
                    st.launches.push((name.to_string(), label, bytes, ev));
                }
                Ok(())
            }
            Engine::Emu(lib) => {
                let mut vals: Vec<u64> = args
                    .iter()
                    .map(|a| match *a {
                        Arg::Ptr(p) => p,
                        Arg::I32(v) => v as u32 as u64,
                        Arg::U32(v) => v as u64,
                        Arg::I64(v) => v as u64,
                        Arg::F32(v) => v.to_bits() as u64,
                    })
                    .collect();
                // Each value sits in its own 8-byte slot, little endian, so a pointer to the
                // slot is a valid pointer to the 4-byte or 8-byte argument.
                let mut ptrs: Vec<*mut std::ffi::c_void> = vals
                    .iter_mut()
                    .map(|v| v as *mut u64 as *mut std::ffi::c_void)
                    .collect();
                lib.launch(name, shape.grid, shape.block, shape.smem, &mut ptrs)
                    .map_err(emu_err)
            }
        }
    }

    /// Starts timing every launch with device events (not while capturing a graph; GPU only).
    pub fn profile_start(&self) -> Result<(), CudaError> {
        let Engine::Cuda { stream, .. } = &self.engine else {
            return Err(CudaError::Invalid(
                "profiling needs a GPU (not the emulator)".into(),
            ));
        };
        let ev = stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv("cuEventRecord"))?;
        let mut st = self.lock_profiler();
        *st = ProfState {
            start: Some(ev),
            ..ProfState::default()
        };
        self.profiler.on.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Labels the next launch in the profile (`bytes`: weight bytes it reads). No-op unless
    /// profiling.
    pub fn note(&self, label: impl FnOnce() -> (String, usize)) {
        if self.profiler.on.load(Ordering::Relaxed) {
            self.lock_profiler().note = Some(label());
        }
    }

    /// Stops profiling, waits for the device and returns each launch's time since the
    /// previous one ended (kernel time plus the gap before it).
    pub fn profile_stop(&self) -> Result<Vec<ProfiledLaunch>, CudaError> {
        self.profiler.on.store(false, Ordering::SeqCst);
        let st = std::mem::take(&mut *self.lock_profiler());
        let Some(mut prev) = st.start else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(st.launches.len());
        for (kernel, label, bytes, ev) in st.launches {
            let ms = prev.elapsed_ms(&ev).map_err(drv("cuEventElapsedTime"))? as f64;
            out.push(ProfiledLaunch {
                kernel,
                label,
                bytes,
                ms,
            });
            prev = ev;
        }
        Ok(out)
    }

    fn lock_profiler(&self) -> std::sync::MutexGuard<'_, ProfState> {
        self.profiler
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts capturing the stream into a graph.
    pub fn begin_capture(&self) -> Result<(), CudaError> {
        match &self.engine {
            Engine::Cuda { stream, .. } => stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(drv("cuStreamBeginCapture")),
            Engine::Emu(_) => Err(CudaError::Invalid(
                "CUDA graphs are not available in the host emulator".into(),
            )),
        }
    }

    /// Ends the capture and instantiates the graph.
    pub fn end_capture(&self) -> Result<cudarc::driver::CudaGraph, CudaError> {
        match &self.engine {
            Engine::Cuda { stream, .. } => {
                let g = stream
                    .end_capture(sys::CUgraphInstantiate_flags_enum(0))
                    .map_err(drv("cuStreamEndCapture/cuGraphInstantiate"))?;
                g.ok_or_else(|| CudaError::Invalid("stream capture produced an empty graph".into()))
            }
            Engine::Emu(_) => Err(CudaError::Invalid(
                "CUDA graphs are not available in the host emulator".into(),
            )),
        }
    }
}

/// Host memory that uploads are staged in: page-locked on a GPU (so the copy engine reads it
/// directly and [`Gpu::copy_from_staging`] returns before the copy ends), plain memory under the
/// emulator. Its size bounds the host memory a streamed upload uses, whatever the model size.
pub struct Staging {
    mem: StagingMem,
    /// A copy issued from this buffer may still be running.
    pending: bool,
}

enum StagingMem {
    Pinned {
        slice: PinnedHostSlice<u8>,
        stream: Arc<CudaStream>,
    },
    Host(Vec<u8>),
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("len", &self.len())
            .field("pinned", &matches!(self.mem, StagingMem::Pinned { .. }))
            .field("pending", &self.pending)
            .finish()
    }
}

impl Staging {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        match &self.mem {
            StagingMem::Pinned { slice, .. } => slice.len(),
            StagingMem::Host(v) => v.len(),
        }
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffer, for filling: first waits until the copies still reading it are done.
    pub fn writable(&mut self) -> Result<&mut [u8], CudaError> {
        if self.pending {
            if let StagingMem::Pinned { stream, .. } = &self.mem {
                stream.synchronize().map_err(drv("cuStreamSynchronize"))?;
            }
            self.pending = false;
        }
        match &mut self.mem {
            StagingMem::Pinned { slice, .. } => {
                slice.as_mut_slice().map_err(drv("cuEventSynchronize"))
            }
            StagingMem::Host(v) => Ok(v.as_mut_slice()),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The copy engine may still read the page-locked memory: wait before it is freed.
        if self.pending
            && let StagingMem::Pinned { stream, .. } = &self.mem
        {
            let _ = stream.synchronize();
        }
    }
}

fn mixed() -> CudaError {
    CudaError::Invalid("buffer belongs to a different engine".into())
}

fn host_bytes(b: &[u128]) -> &[u8] {
    // SAFETY: u128 has no padding and any byte pattern is a valid u8; the length is the slice's
    // size in bytes and the lifetime is tied to `b`.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<u8>(), std::mem::size_of_val(b)) }
}

fn host_bytes_mut(b: &mut [u128]) -> &mut [u8] {
    // SAFETY: as in `host_bytes`; the exclusive borrow of `b` is carried over.
    unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(b)) }
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f32 values of little-endian bytes.
pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn no_gpu_here_gives_a_reason() {
        if driver_present() {
            eprintln!("libcuda present on this machine; skipping the no-GPU message check");
            return;
        }
        let e = cuda_available().unwrap_err();
        assert!(e.contains("libcuda"), "{e}");
        let e = Gpu::new(0).unwrap_err();
        assert!(e.to_string().contains("no usable CUDA GPU"), "{e}");
        let ie: InferenceError = e.into();
        assert!(ie.to_string().contains("cuda"), "{ie}");
    }

    #[test]
    fn byte_conversions_round_trip() {
        let v = [1.5f32, -0.0, f32::MAX, 3.25e-8];
        assert_eq!(bytes_f32(&f32_bytes(&v)), v.to_vec());
    }

    #[test]
    fn info_display() {
        let i = DeviceInfo {
            ordinal: 0,
            name: "NVIDIA H200".into(),
            compute_capability: (9, 0),
            total_mem: 150_000_000_000,
            sm_count: 132,
            driver_version: 13000,
            nvrtc_version: Some((13, 0)),
            device_count: 1,
        };
        let s = i.to_string();
        assert!(
            s.contains("sm_90") && s.contains("CUDA 13.0") && s.contains("NVRTC 13.0"),
            "{s}"
        );
    }
}
