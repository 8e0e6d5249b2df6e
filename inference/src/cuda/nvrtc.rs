//! Run-time compilation of [`super::kernels::KERNEL_SOURCE`] with NVRTC, and the library
//! lookup that makes it work on machines where NVRTC is not on the default search path.
//!
//! Target choice: if NVRTC supports the device's exact architecture we compile straight to
//! machine code (`--gpu-architecture=sm_XY`, CUBIN) so the driver does no JIT work and the PTX
//! version of the NVRTC library cannot be newer than the driver accepts. Otherwise we emit PTX
//! for the newest `compute_XY` NVRTC knows that is not newer than the device, and the driver
//! JIT-compiles it.
//!
//! Library lookup: cudarc loads `libnvrtc.so` (and versioned names `.so.12`, `.so.11`, ... for
//! the CUDA version feature it is built with) with `dlopen`, which searches `LD_LIBRARY_PATH`
//! and the linker cache. [`nvrtc_search_dirs`] lists the usual install places (the CUDA toolkit,
//! pip's `nvidia-cuda-nvrtc` wheels) so a binary can tell the user what to put on
//! `LD_LIBRARY_PATH`, or re-execute itself with it (see the `gpu-check` binary).

use std::ffi::{CStr, CString, c_char, c_int};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::sys;

/// What NVRTC is asked to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Machine code for `sm_<n>` (n = major*10 + minor).
    Cubin(i32),
    /// PTX for `compute_<n>`, JIT-compiled by the driver.
    Ptx(i32),
}

impl Target {
    /// The `--gpu-architecture` option value.
    pub fn arch_option(self) -> String {
        match self {
            Target::Cubin(n) => format!("--gpu-architecture=sm_{n}"),
            Target::Ptx(n) => format!("--gpu-architecture=compute_{n}"),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Cubin(n) => write!(f, "sm_{n} (cubin)"),
            Target::Ptx(n) => write!(f, "compute_{n} (ptx, driver JIT)"),
        }
    }
}

/// Picks the compile target for a device of compute capability `cc` given the architectures
/// NVRTC reports (`supported`, as numbers like 80, 90). Devices below sm_80 are refused.
pub fn choose_target(cc: (i32, i32), supported: &[i32]) -> Result<Target, String> {
    let want = cc.0 * 10 + cc.1;
    if want < 80 {
        return Err(format!(
            "GPU compute capability {}.{} is older than 8.0 (Ampere); the CUDA backend needs sm_80 or newer",
            cc.0, cc.1
        ));
    }
    if supported.is_empty() || supported.contains(&want) {
        return Ok(Target::Cubin(want));
    }
    match supported.iter().copied().filter(|&a| a <= want).max() {
        Some(a) => Ok(Target::Ptx(a)),
        None => Err(format!(
            "NVRTC supports none of the architectures up to sm_{want} (it knows {supported:?}); install an NVRTC that matches the driver"
        )),
    }
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the candidate names; no symbol is called.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    if !nvrtc_present() {
        return Err(no_nvrtc_message());
    }
    let mut major: c_int = 0;
    let mut minor: c_int = 0;
    // SAFETY: the library is present (checked above); both pointers are valid for writes.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {r:?}"));
    }
    Ok((major, minor))
}

/// The architectures NVRTC can target (e.g. `[75, 80, 86, 89, 90, ...]`); empty if unknown.
pub fn supported_archs() -> Vec<i32> {
    if !nvrtc_present() {
        return Vec::new();
    }
    let mut n: c_int = 0;
    // SAFETY: library present; `n` is valid for writes.
    let r = unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS || n <= 0 || n > 1024 {
        return Vec::new();
    }
    let mut v = vec![0 as c_int; n as usize];
    // SAFETY: `v` has room for the `n` entries NVRTC reported.
    let r = unsafe { sys::nvrtcGetSupportedArchs(v.as_mut_ptr()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Vec::new();
    }
    v
}

/// A failed compilation: the options used and NVRTC's log.
#[derive(Debug, Clone)]
pub struct CompileFailure {
    /// What failed.
    pub message: String,
    /// Options passed.
    pub options: Vec<String>,
    /// The program log (compiler diagnostics).
    pub log: String,
}

impl std::fmt::Display for CompileFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NVRTC: {} (options {:?})\n--- NVRTC log ---\n{}\n--- end of log ---",
            self.message, self.options, self.log
        )
    }
}

/// A compiled module image.
#[derive(Debug, Clone)]
pub enum Image {
    /// CUBIN bytes.
    Cubin(Vec<u8>),
    /// PTX text (no trailing NUL).
    Ptx(String),
}

/// The compile options used for `target`.
pub fn compile_options(target: Target) -> Vec<String> {
    vec![
        target.arch_option(),
        "--std=c++17".to_string(),
        // Precise division/sqrt and no flush-to-zero: results are checked against the CPU.
        "--fmad=true".to_string(),
    ]
}

struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once.
            unsafe {
                let _ = sys::nvrtcDestroyProgram(&mut self.0);
            }
        }
    }
}

fn check(r: sys::nvrtcResult, what: &str) -> Result<(), String> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what} failed: {r:?}"))
    }
}

/// Compiles `src` for `target`. On failure the returned error carries NVRTC's log.
pub fn compile(src: &str, target: Target) -> Result<(Image, String), CompileFailure> {
    let options = compile_options(target);
    let fail = |message: String, log: String| CompileFailure {
        message,
        options: options.clone(),
        log,
    };
    if !nvrtc_present() {
        return Err(fail(no_nvrtc_message(), String::new()));
    }
    let c_src =
        CString::new(src).map_err(|_| fail("source contains a NUL byte".into(), String::new()))?;
    let c_name = c"inference_kernels.cu";
    let mut prog = Program(std::ptr::null_mut());
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the program (c_src and
    // c_name are kept until the end of this function; the program is destroyed in Drop first).
    let r = unsafe {
        sys::nvrtcCreateProgram(
            &mut prog.0,
            c_src.as_ptr(),
            c_name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    check(r, "nvrtcCreateProgram").map_err(|m| fail(m, String::new()))?;
    let c_opts: Vec<CString> = options
        .iter()
        .map(|o| CString::new(o.as_str()).unwrap_or_default())
        .collect();
    let ptrs: Vec<*const c_char> = c_opts.iter().map(|c| c.as_ptr()).collect();
    // SAFETY: `ptrs` holds `ptrs.len()` valid C strings owned by `c_opts`.
    let r = unsafe { sys::nvrtcCompileProgram(prog.0, ptrs.len() as c_int, ptrs.as_ptr()) };
    let log = program_log(&prog);
    check(r, "nvrtcCompileProgram").map_err(|m| fail(m, log.clone()))?;
    let image = match target {
        Target::Cubin(_) => {
            let mut size = 0usize;
            // SAFETY: compiled program; `size` is valid for writes.
            let r = unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) };
            check(r, "nvrtcGetCUBINSize").map_err(|m| fail(m, log.clone()))?;
            let mut buf = vec![0u8; size];
            // SAFETY: `buf` has the size NVRTC reported.
            let r = unsafe { sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast()) };
            check(r, "nvrtcGetCUBIN").map_err(|m| fail(m, log.clone()))?;
            if buf.is_empty() {
                return Err(fail("NVRTC returned an empty CUBIN".into(), log));
            }
            Image::Cubin(buf)
        }
        Target::Ptx(_) => {
            let mut size = 0usize;
            // SAFETY: compiled program; `size` is valid for writes.
            let r = unsafe { sys::nvrtcGetPTXSize(prog.0, &mut size) };
            check(r, "nvrtcGetPTXSize").map_err(|m| fail(m, log.clone()))?;
            let mut buf = vec![0u8; size];
            // SAFETY: `buf` has the size NVRTC reported.
            let r = unsafe { sys::nvrtcGetPTX(prog.0, buf.as_mut_ptr().cast()) };
            check(r, "nvrtcGetPTX").map_err(|m| fail(m, log.clone()))?;
            while buf.last() == Some(&0) {
                buf.pop();
            }
            Image::Ptx(String::from_utf8_lossy(&buf).into_owned())
        }
    };
    Ok((image, log))
}

fn program_log(prog: &Program) -> String {
    let mut size = 0usize;
    // SAFETY: valid program; `size` is valid for writes.
    let r = unsafe { sys::nvrtcGetProgramLogSize(prog.0, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return String::new();
    }
    let mut buf = vec![0u8; size + 1];
    // SAFETY: `buf` has room for the `size` bytes NVRTC reported (plus one spare NUL).
    let r = unsafe { sys::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr().cast()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return String::new();
    }
    CStr::from_bytes_until_nul(&buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The message shown when NVRTC cannot be loaded.
pub fn no_nvrtc_message() -> String {
    let found = find_library_dirs("libnvrtc.so");
    let hint = if found.is_empty() {
        "no libnvrtc was found in the usual places either; install the CUDA toolkit's NVRTC (or the pip package nvidia-cuda-nvrtc)".to_string()
    } else {
        format!(
            "found it in {}: run with LD_LIBRARY_PATH={}",
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            found[0].display()
        )
    };
    format!("the NVRTC library (libnvrtc.so) could not be loaded; {hint}")
}

/// Directories where CUDA libraries usually live (toolkit, distribution, pip wheels).
pub fn nvrtc_search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(home) = std::env::var("CUDA_HOME").or_else(|_| std::env::var("CUDA_PATH")) {
        dirs.push(Path::new(&home).join("lib64"));
        dirs.push(Path::new(&home).join("lib"));
    }
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/local/nvidia/lib64",
        "/usr/local/nvidia/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    // Versioned toolkits: /usr/local/cuda-13.0/lib64 etc.
    if let Ok(rd) = std::fs::read_dir("/usr/local") {
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("cuda-"))
            })
            .map(|p| p.join("lib64"))
            .collect();
        v.sort();
        v.reverse();
        dirs.extend(v);
    }
    // pip wheels: <site-packages>/nvidia/{cuda_nvrtc,cu13,cu12}/lib
    for root in python_site_dirs() {
        let nv = root.join("nvidia");
        if let Ok(rd) = std::fs::read_dir(&nv) {
            let mut v: Vec<PathBuf> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("lib"))
                .collect();
            v.sort();
            dirs.extend(v);
        }
    }
    dirs
}

fn python_site_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(pp) = std::env::var("PYTHONPATH") {
        out.extend(pp.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    for base in [
        "/usr/local/lib",
        "/usr/lib",
        "/opt/conda/lib",
        "/opt/torch/.venv/lib",
    ] {
        if let Ok(rd) = std::fs::read_dir(base) {
            for e in rd.filter_map(|e| e.ok()) {
                let p = e.path();
                if p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
                {
                    out.push(p.join("site-packages"));
                    out.push(p.join("dist-packages"));
                }
            }
        }
    }
    out
}

/// Directories (from [`nvrtc_search_dirs`]) holding a file whose name starts with `prefix`
/// (e.g. `libnvrtc.so` matches `libnvrtc.so.13`).
pub fn find_library_dirs(prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for d in nvrtc_search_dirs() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let hit = rd.filter_map(|e| e.ok()).any(|e| {
            e.file_name().to_str().is_some_and(|n| {
                n.starts_with(prefix) && !n.contains("builtins") && !n.contains("alt")
            })
        });
        if hit && !found.contains(&d) {
            found.push(d);
        }
    }
    found
}

/// The exact file names starting with `prefix` in `dir`, sorted.
pub fn library_files(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn target_choice() {
        let all = [75, 80, 86, 87, 89, 90, 100, 120];
        assert_eq!(choose_target((9, 0), &all), Ok(Target::Cubin(90)));
        assert_eq!(choose_target((8, 0), &all), Ok(Target::Cubin(80)));
        // A device newer than the compiler knows: PTX for the newest known arch.
        assert_eq!(choose_target((10, 3), &all), Ok(Target::Ptx(100)));
        assert_eq!(choose_target((9, 0), &[]), Ok(Target::Cubin(90)));
        assert!(choose_target((7, 5), &all).unwrap_err().contains("8.0"));
        assert!(choose_target((8, 0), &[90, 100]).is_err());
        assert_eq!(Target::Cubin(90).arch_option(), "--gpu-architecture=sm_90");
        assert_eq!(
            Target::Ptx(80).arch_option(),
            "--gpu-architecture=compute_80"
        );
    }

    #[test]
    fn options_are_conservative() {
        let o = compile_options(Target::Cubin(90));
        assert!(o.contains(&"--gpu-architecture=sm_90".to_string()));
        assert!(!o.iter().any(|s| s.contains("fast_math")));
    }

    #[test]
    fn lookup_helpers_do_not_panic() {
        let dirs = nvrtc_search_dirs();
        assert!(dirs.iter().any(|d| d.ends_with("lib64")));
        let _ = find_library_dirs("libnvrtc.so");
        assert!(library_files(Path::new("/nonexistent-dir"), "lib").is_empty());
        let m = no_nvrtc_message();
        assert!(m.contains("libnvrtc"), "{m}");
    }

    /// The whole kernel source compiles with the real NVRTC where one is installed (sm_80, the
    /// oldest supported architecture, and sm_90). No GPU needed.
    #[test]
    fn kernel_source_compiles_with_nvrtc_when_present() {
        if !nvrtc_present() {
            eprintln!("SKIPPED: no NVRTC library here; the kernel source was not compiled");
            return;
        }
        let supported = supported_archs();
        for arch in [80, 90] {
            if !supported.is_empty() && !supported.contains(&arch) {
                continue;
            }
            let (image, log) = compile(super::super::kernels::KERNEL_SOURCE, Target::Cubin(arch))
                .unwrap_or_else(|e| panic!("sm_{arch}: {e}"));
            assert!(matches!(image, Image::Cubin(ref b) if !b.is_empty()));
            assert!(!log.contains("error"), "sm_{arch}: {log}");
        }
    }

    #[test]
    fn without_nvrtc_compile_fails_with_message() {
        if nvrtc_present() {
            eprintln!("NVRTC present here; skipping the no-NVRTC check");
            return;
        }
        let e = compile("extern \"C\" __global__ void k() {}", Target::Cubin(90)).unwrap_err();
        assert!(e.to_string().contains("NVRTC"), "{e}");
        assert!(supported_archs().is_empty());
        assert!(nvrtc_version().is_err());
    }
}
