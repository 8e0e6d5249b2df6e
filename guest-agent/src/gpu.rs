//! NVIDIA GPUs in the guest: PCI scan, GPU kernel modules, NVML, confidential-computing mode.
//!
//! At start-up (after the host config is measured, before inference starts) the agent:
//! 1. scans `/sys/bus/pci/devices` for NVIDIA devices (vendor 0x10de) — none: it says plainly
//!    that no GPU is present and serves on CPU ([`worker_api::NO_GPU_SUMMARY`]);
//! 2. loads the modules of `/etc/worker-image/gpu-modules.list` (`kernel.gpu_modules` of
//!    image/worker.yaml; only as the image's init);
//! 3. opens NVML (`libnvidia-ml.so.1`, dlopened at run time: no link-time dependency), reads the
//!    driver version, the devices (name, memory) and the system's confidential-computing state;
//! 4. decides ([`decide`]): CC on → set the GPUs ready to accept work
//!    (`nvmlSystemSetConfComputeGpusReadyState(1)`) and serve; CC off or not checkable → refuse to
//!    serve and say why, unless the measured host config sets `dev_allow_gpu_without_cc`
//!    (development; in RTMR3, so verifiers see it);
//! 5. reports it all in `/health` (`gpu`) and logs the initialisation time.
//!
//! [`GpuManagement`] also fetches the GPU's attestation report for a 32-byte nonce and its
//! certificate chains as raw bytes, for the RA-TLS GPU evidence.
//!
//! The NVML structures below follow NVIDIA's public `nvml.h` (R535 and later).

use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong, c_void};
use std::path::Path;
use std::time::Instant;

use worker_api::{GpuDevice, GpuStatus, NO_GPU_SUMMARY};

/// NVIDIA's PCI vendor id.
pub const NVIDIA_VENDOR: u16 = 0x10de;
/// The NVML library the agent dlopens.
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";
/// Nonce size of a GPU attestation report (`NVML_CC_GPU_CEC_NONCE_SIZE`).
pub const NONCE_SIZE: usize = 0x20;
/// `NVML_CC_GPU_ATTESTATION_REPORT_SIZE`.
pub const ATTESTATION_REPORT_SIZE: usize = 0x2000;
/// `NVML_CC_GPU_CEC_ATTESTATION_REPORT_SIZE`.
pub const CEC_ATTESTATION_REPORT_SIZE: usize = 0x1000;
/// `NVML_GPU_CERT_CHAIN_SIZE`.
pub const CERT_CHAIN_SIZE: usize = 0x1000;
/// `NVML_GPU_ATTESTATION_CERT_CHAIN_SIZE`.
pub const ATTESTATION_CERT_CHAIN_SIZE: usize = 0x1400;

/// An NVIDIA PCI device found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciNvidia {
    /// `0000:01:00.0`.
    pub bdf: String,
    pub device: u16,
    /// PCI class (0x030200: 3D controller).
    pub class: u32,
}

fn hex_file(p: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(p).ok()?;
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// The NVIDIA devices under `dir` (normally `/sys/bus/pci/devices`), sorted by address.
pub fn scan_pci(dir: &Path) -> Vec<PciNvidia> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PciNvidia> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            (hex_file(&p.join("vendor"))? == u64::from(NVIDIA_VENDOR)).then(|| PciNvidia {
                bdf: e.file_name().to_string_lossy().into_owned(),
                device: hex_file(&p.join("device"))
                    .and_then(|d| u16::try_from(d).ok())
                    .unwrap_or(0),
                class: hex_file(&p.join("class"))
                    .and_then(|c| u32::try_from(c).ok())
                    .unwrap_or(0),
            })
        })
        .collect();
    v.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    v
}

/// Why an NVML call failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The library or one of its functions could not be loaded.
    #[error(
        "cannot load {NVML_LIBRARY}: {0} (the image must carry NVIDIA's NVML of the same driver \
         version as its nvidia module)"
    )]
    Load(String),
    /// An NVML function returned an error.
    #[error("{func} failed: {msg} (NVML error {code})")]
    Nvml {
        func: &'static str,
        code: i32,
        msg: String,
    },
    /// NVML returned something out of range.
    #[error("{0}")]
    Invalid(String),
}

/// The system's confidential-computing state (`nvmlConfComputeSystemState_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct CcState {
    /// `NVML_CC_SYSTEM_ENVIRONMENT_*`: 0 unavailable, 1 simulation, 2 production.
    pub environment: c_uint,
    /// `NVML_CC_SYSTEM_FEATURE_*`: 0 disabled, 1 enabled.
    pub cc_feature: c_uint,
    /// `NVML_CC_SYSTEM_DEVTOOLS_MODE_*`: 0 off, 1 on.
    pub dev_tools_mode: c_uint,
}

impl CcState {
    /// CC mode on, in production (not devtools) mode.
    pub fn on(&self) -> bool {
        self.cc_feature == 1
    }
    pub fn environment_name(&self) -> &'static str {
        match self.environment {
            0 => "unavailable",
            1 => "sim",
            2 => "prod",
            _ => "unknown",
        }
    }
}

/// A GPU as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlDevice {
    pub index: u32,
    pub name: String,
    pub memory_total: u64,
}

/// A GPU attestation report (`nvmlConfComputeGpuAttestationReport_t`), raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuAttestationReport {
    /// The nonce the report was asked for.
    pub nonce: [u8; NONCE_SIZE],
    /// The SPDM attestation report, as the GPU signed it.
    pub report: Vec<u8>,
    /// The CEC (Hopper's security processor) report, when present.
    pub cec_report: Option<Vec<u8>>,
}

/// The GPU's certificate chains (`nvmlConfComputeGpuCertificate_t`), raw (DER certificates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuCertificates {
    /// The device-identity chain.
    pub cert_chain: Vec<u8>,
    /// The attestation key's chain (signs the report).
    pub attestation_cert_chain: Vec<u8>,
}

/// What the agent asks of NVML (a trait so the decisions are tested without a GPU).
pub trait GpuManagement: Send + Sync {
    fn driver_version(&self) -> Result<String, GpuError>;
    fn devices(&self) -> Result<Vec<NvmlDevice>, GpuError>;
    fn cc_state(&self) -> Result<CcState, GpuError>;
    /// `nvmlSystemSetConfComputeGpusReadyState`.
    fn set_ready(&self, ready: bool) -> Result<(), GpuError>;
    /// The GPU's attestation report over `nonce`.
    fn attestation_report(
        &self,
        index: u32,
        nonce: &[u8; NONCE_SIZE],
    ) -> Result<GpuAttestationReport, GpuError>;
    /// The GPU's certificate chains.
    fn certificates(&self, index: u32) -> Result<GpuCertificates, GpuError>;
}

// --- NVML FFI (layouts of nvml.h) ---

type NvmlReturn = c_int;
type NvmlDeviceT = *mut c_void;

#[repr(C)]
struct NvmlMemory {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

#[repr(C)]
struct NvmlCcReport {
    is_cec_attestation_report_present: c_uint,
    attestation_report_size: c_uint,
    cec_attestation_report_size: c_uint,
    nonce: [u8; NONCE_SIZE],
    attestation_report: [u8; ATTESTATION_REPORT_SIZE],
    cec_attestation_report: [u8; CEC_ATTESTATION_REPORT_SIZE],
}

#[repr(C)]
struct NvmlCcCertificate {
    cert_chain_size: c_uint,
    attestation_cert_chain_size: c_uint,
    cert_chain: [u8; CERT_CHAIN_SIZE],
    attestation_cert_chain: [u8; ATTESTATION_CERT_CHAIN_SIZE],
}

/// `NVML_DEVICE_NAME_V2_BUFFER_SIZE`.
const NAME_BUFFER: usize = 96;
/// `NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE`.
const DRIVER_VERSION_BUFFER: usize = 80;

struct Fns {
    shutdown: unsafe extern "C" fn() -> NvmlReturn,
    error_string: unsafe extern "C" fn(NvmlReturn) -> *const c_char,
    driver_version: unsafe extern "C" fn(*mut c_char, c_uint) -> NvmlReturn,
    count: unsafe extern "C" fn(*mut c_uint) -> NvmlReturn,
    handle: unsafe extern "C" fn(c_uint, *mut NvmlDeviceT) -> NvmlReturn,
    name: unsafe extern "C" fn(NvmlDeviceT, *mut c_char, c_uint) -> NvmlReturn,
    memory: unsafe extern "C" fn(NvmlDeviceT, *mut NvmlMemory) -> NvmlReturn,
    cc_state: unsafe extern "C" fn(*mut CcState) -> NvmlReturn,
    set_ready: unsafe extern "C" fn(c_uint) -> NvmlReturn,
    report: unsafe extern "C" fn(NvmlDeviceT, *mut NvmlCcReport) -> NvmlReturn,
    certificate: unsafe extern "C" fn(NvmlDeviceT, *mut NvmlCcCertificate) -> NvmlReturn,
}

/// NVML, dlopened and initialised (`nvmlInit_v2`); shut down on drop.
pub struct Nvml {
    f: Fns,
    // Keeps the function pointers in `f` valid; dropped after them.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Nvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nvml")
    }
}

impl Nvml {
    /// Opens [`NVML_LIBRARY`] and calls `nvmlInit_v2`.
    pub fn load() -> Result<Nvml, GpuError> {
        // SAFETY: loading NVML runs its initialisers, which have no preconditions on our side.
        let lib = unsafe { libloading::Library::new(NVML_LIBRARY) }
            .map_err(|e| GpuError::Load(e.to_string()))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol is NVML's C function of that name; the type it is read as
                // is its prototype in nvml.h, and the pointer is only used while `lib` lives.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| GpuError::Load(format!("{}: {e}", $name)))?
            };
        }
        let init: unsafe extern "C" fn() -> NvmlReturn = sym!("nvmlInit_v2");
        let f = Fns {
            shutdown: sym!("nvmlShutdown"),
            error_string: sym!("nvmlErrorString"),
            driver_version: sym!("nvmlSystemGetDriverVersion"),
            count: sym!("nvmlDeviceGetCount_v2"),
            handle: sym!("nvmlDeviceGetHandleByIndex_v2"),
            name: sym!("nvmlDeviceGetName"),
            memory: sym!("nvmlDeviceGetMemoryInfo"),
            cc_state: sym!("nvmlSystemGetConfComputeState"),
            set_ready: sym!("nvmlSystemSetConfComputeGpusReadyState"),
            report: sym!("nvmlDeviceGetConfComputeGpuAttestationReport"),
            certificate: sym!("nvmlDeviceGetConfComputeGpuCertificate"),
        };
        let nvml = Nvml { f, _lib: lib };
        // SAFETY: nvmlInit_v2 takes no arguments.
        nvml.check("nvmlInit_v2", unsafe { init() })?;
        Ok(nvml)
    }

    fn check(&self, func: &'static str, rc: NvmlReturn) -> Result<(), GpuError> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: nvmlErrorString returns a static NUL-terminated string for any code (or NULL).
        let p = unsafe { (self.f.error_string)(rc) };
        let msg = if p.is_null() {
            "unknown error".to_owned()
        } else {
            // SAFETY: non-null, NUL-terminated and static, as above.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        };
        Err(GpuError::Nvml {
            func,
            code: rc,
            msg,
        })
    }

    fn device(&self, index: u32) -> Result<NvmlDeviceT, GpuError> {
        let mut h: NvmlDeviceT = std::ptr::null_mut();
        // SAFETY: `h` is a valid out-pointer for the handle.
        self.check("nvmlDeviceGetHandleByIndex_v2", unsafe {
            (self.f.handle)(index, &mut h)
        })?;
        Ok(h)
    }
}

fn c_buf_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn checked_len(what: &str, n: c_uint, cap: usize) -> Result<usize, GpuError> {
    let n = n as usize;
    if n > cap {
        return Err(GpuError::Invalid(format!(
            "NVML says the {what} has {n} bytes, more than its {cap}-byte buffer"
        )));
    }
    Ok(n)
}

impl GpuManagement for Nvml {
    fn driver_version(&self) -> Result<String, GpuError> {
        let mut buf = [0 as c_char; DRIVER_VERSION_BUFFER];
        // SAFETY: `buf` has the length passed.
        self.check("nvmlSystemGetDriverVersion", unsafe {
            (self.f.driver_version)(buf.as_mut_ptr(), DRIVER_VERSION_BUFFER as c_uint)
        })?;
        Ok(c_buf_string(&buf))
    }

    fn devices(&self) -> Result<Vec<NvmlDevice>, GpuError> {
        let mut n: c_uint = 0;
        // SAFETY: `n` is a valid out-pointer.
        self.check("nvmlDeviceGetCount_v2", unsafe { (self.f.count)(&mut n) })?;
        let mut v = Vec::new();
        for index in 0..n {
            let h = self.device(index)?;
            let mut name = [0 as c_char; NAME_BUFFER];
            // SAFETY: `h` is a handle NVML returned; `name` has the length passed.
            self.check("nvmlDeviceGetName", unsafe {
                (self.f.name)(h, name.as_mut_ptr(), NAME_BUFFER as c_uint)
            })?;
            let mut mem = NvmlMemory {
                total: 0,
                free: 0,
                used: 0,
            };
            // SAFETY: `h` is a handle NVML returned; `mem` is an nvmlMemory_t.
            self.check("nvmlDeviceGetMemoryInfo", unsafe {
                (self.f.memory)(h, &mut mem)
            })?;
            v.push(NvmlDevice {
                index,
                name: c_buf_string(&name),
                memory_total: mem.total,
            });
        }
        Ok(v)
    }

    fn cc_state(&self) -> Result<CcState, GpuError> {
        let mut s = CcState::default();
        // SAFETY: `s` is an nvmlConfComputeSystemState_t (same layout, repr(C)).
        self.check("nvmlSystemGetConfComputeState", unsafe {
            (self.f.cc_state)(&mut s)
        })?;
        Ok(s)
    }

    fn set_ready(&self, ready: bool) -> Result<(), GpuError> {
        // SAFETY: plain integer argument.
        self.check("nvmlSystemSetConfComputeGpusReadyState", unsafe {
            (self.f.set_ready)(c_uint::from(ready))
        })
    }

    fn attestation_report(
        &self,
        index: u32,
        nonce: &[u8; NONCE_SIZE],
    ) -> Result<GpuAttestationReport, GpuError> {
        let h = self.device(index)?;
        let mut r = Box::new(NvmlCcReport {
            is_cec_attestation_report_present: 0,
            attestation_report_size: 0,
            cec_attestation_report_size: 0,
            nonce: *nonce,
            attestation_report: [0; ATTESTATION_REPORT_SIZE],
            cec_attestation_report: [0; CEC_ATTESTATION_REPORT_SIZE],
        });
        // SAFETY: `h` is a handle NVML returned; `r` is an nvmlConfComputeGpuAttestationReport_t
        // with the nonce filled in, as the call expects.
        self.check("nvmlDeviceGetConfComputeGpuAttestationReport", unsafe {
            (self.f.report)(h, &mut *r)
        })?;
        let n = checked_len(
            "attestation report",
            r.attestation_report_size,
            ATTESTATION_REPORT_SIZE,
        )?;
        let cec = if r.is_cec_attestation_report_present == 1 {
            let m = checked_len(
                "CEC attestation report",
                r.cec_attestation_report_size,
                CEC_ATTESTATION_REPORT_SIZE,
            )?;
            Some(r.cec_attestation_report[..m].to_vec())
        } else {
            None
        };
        Ok(GpuAttestationReport {
            nonce: *nonce,
            report: r.attestation_report[..n].to_vec(),
            cec_report: cec,
        })
    }

    fn certificates(&self, index: u32) -> Result<GpuCertificates, GpuError> {
        let h = self.device(index)?;
        let mut c = Box::new(NvmlCcCertificate {
            cert_chain_size: 0,
            attestation_cert_chain_size: 0,
            cert_chain: [0; CERT_CHAIN_SIZE],
            attestation_cert_chain: [0; ATTESTATION_CERT_CHAIN_SIZE],
        });
        // SAFETY: `h` is a handle NVML returned; `c` is an nvmlConfComputeGpuCertificate_t.
        self.check("nvmlDeviceGetConfComputeGpuCertificate", unsafe {
            (self.f.certificate)(h, &mut *c)
        })?;
        let n = checked_len("certificate chain", c.cert_chain_size, CERT_CHAIN_SIZE)?;
        let m = checked_len(
            "attestation certificate chain",
            c.attestation_cert_chain_size,
            ATTESTATION_CERT_CHAIN_SIZE,
        )?;
        Ok(GpuCertificates {
            cert_chain: c.cert_chain[..n].to_vec(),
            attestation_cert_chain: c.attestation_cert_chain[..m].to_vec(),
        })
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        // SAFETY: NVML was initialised by `load`; shutdown takes no arguments.
        unsafe { (self.f.shutdown)() };
    }
}

// --- Decisions ---

/// What the agent does with the GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No NVIDIA device: serve on CPU.
    NoGpu,
    /// CC on: set ready, serve.
    Serve,
    /// CC off (or not checkable) but allowed: serve, with this warning.
    ServeUnprotected(String),
    /// Do not serve inference: the reason.
    Refuse(String),
}

/// The policy from the measured host config and the run mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// `dev_allow_gpu_without_cc` of the measured host config.
    pub allow_without_cc: bool,
    /// Whether the CC requirement is enforced: always as the image's init or in a TD; a
    /// development `serve --no-init` outside a TD only warns.
    pub enforce: bool,
}

/// The verdict for the GPUs found, given NVML's CC state (or why it could not be read).
pub fn decide(gpus_present: bool, cc: &Result<CcState, String>, policy: Policy) -> Verdict {
    if !gpus_present {
        return Verdict::NoGpu;
    }
    let problem = match cc {
        Ok(s) if s.on() => return Verdict::Serve,
        Ok(s) => format!(
            "the GPU is not in confidential-computing mode (NVML: CC feature off, environment {}): \
             its memory and the CPU<->GPU traffic would be visible to the host. Turn CC on on the \
             host (NVIDIA's gpu-admin-tools: --set-cc-mode on, then reset the GPU) and boot again",
            s.environment_name()
        ),
        Err(e) => format!(
            "cannot check the GPU's confidential-computing mode ({e}): the image's NVIDIA modules \
             and NVML must load and match"
        ),
    };
    if policy.allow_without_cc {
        Verdict::ServeUnprotected(format!(
            "{problem}; serving anyway because the host config sets dev_allow_gpu_without_cc \
             (development only, measured in RTMR3)"
        ))
    } else if !policy.enforce {
        Verdict::ServeUnprotected(format!(
            "{problem}; serving anyway: not enforced outside the image's init"
        ))
    } else {
        Verdict::Refuse(format!(
            "{problem}. Not serving inference (a development host config may set \
             dev_allow_gpu_without_cc, which verifiers see)"
        ))
    }
}

/// The outcome of [`evaluate`]: `/health`'s view and the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: GpuStatus,
    pub verdict: Verdict,
}

/// The status for a guest without NVIDIA devices.
pub fn no_gpu_status() -> GpuStatus {
    GpuStatus {
        present: false,
        summary: NO_GPU_SUMMARY.into(),
        driver_version: None,
        cc_mode: None,
        cc_environment: None,
        ready: false,
        serving: false,
        error: None,
        pci: Vec::new(),
        devices: Vec::new(),
        init_ms: 0,
    }
}

/// Queries `mgmt` (or takes why it is unavailable), decides, and sets the GPUs ready when the
/// verdict serves with CC on.
pub fn evaluate(
    pci: &[PciNvidia],
    mgmt: Result<&dyn GpuManagement, String>,
    policy: Policy,
) -> Outcome {
    if pci.is_empty() {
        return Outcome {
            status: no_gpu_status(),
            verdict: Verdict::NoGpu,
        };
    }
    let mut st = GpuStatus {
        present: true,
        pci: pci.iter().map(|p| p.bdf.clone()).collect(),
        cc_mode: Some("unknown".into()),
        ..no_gpu_status()
    };
    let cc = match &mgmt {
        Err(e) => Err(e.clone()),
        Ok(m) => {
            let m = *m;
            st.driver_version = m.driver_version().ok();
            match m.devices() {
                Ok(d) => {
                    st.devices = d
                        .into_iter()
                        .map(|d| GpuDevice {
                            index: d.index,
                            name: d.name,
                            memory_mib: d.memory_total >> 20,
                        })
                        .collect();
                }
                Err(e) => st.error = Some(e.to_string()),
            }
            m.cc_state().map_err(|e| e.to_string())
        }
    };
    if let Ok(s) = &cc {
        st.cc_mode = Some(if s.on() { "on" } else { "off" }.into());
        st.cc_environment = Some(s.environment_name().into());
    }
    let mut verdict = decide(true, &cc, policy);
    if verdict == Verdict::Serve
        && let Ok(m) = mgmt
        && let Err(e) = m.set_ready(true)
    {
        verdict = Verdict::Refuse(format!(
            "cannot set the GPUs ready to accept work ({e}): not serving inference"
        ));
    }
    let names = if st.devices.is_empty() {
        format!("{} NVIDIA PCI device(s)", st.pci.len())
    } else {
        st.devices
            .iter()
            .map(|d| format!("{} ({} MiB)", d.name, d.memory_mib))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match &verdict {
        Verdict::Serve => {
            st.ready = true;
            st.serving = true;
            st.summary = format!("{names}; CC on; ready");
        }
        Verdict::ServeUnprotected(w) => {
            st.serving = true;
            st.summary = format!("{names}; WARNING: {w}");
        }
        Verdict::Refuse(r) => {
            st.summary = format!("{names}; not serving: {r}");
            st.error = Some(r.clone());
        }
        Verdict::NoGpu => {}
    }
    Outcome {
        status: st,
        verdict,
    }
}

/// What [`setup`] leaves for the rest of the agent.
pub struct Setup {
    pub outcome: Outcome,
    /// NVML, kept open for the GPU evidence (attestation report, certificates).
    pub nvml: Option<std::sync::Arc<dyn GpuManagement>>,
}

/// The RA-TLS evidence source over NVML: for a nonce, every GPU's attestation report (SPDM,
/// signed by the key of its attestation certificate chain), that chain (PEM) and the system's
/// CC mode. `Ok(None)` when NVML sees no device.
pub fn evidence_source(
    nvml: std::sync::Arc<dyn GpuManagement>,
) -> crate::gpu_evidence::GpuEvidenceSource {
    crate::gpu_evidence::GpuEvidenceSource::new(move |nonce| {
        let cc = nvml.cc_state().map_err(|e| e.to_string())?;
        let devices = nvml.devices().map_err(|e| e.to_string())?;
        if devices.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(devices.len());
        for i in 0..devices.len() {
            let index = u32::try_from(i).map_err(|_| "too many GPUs".to_string())?;
            let report = nvml
                .attestation_report(index, nonce)
                .map_err(|e| format!("GPU {i}: attestation report: {e}"))?;
            if &report.nonce != nonce {
                return Err(format!(
                    "GPU {i}: the driver returned a report for another nonce"
                ));
            }
            let certs = nvml
                .certificates(index)
                .map_err(|e| format!("GPU {i}: certificates: {e}"))?;
            out.push(crate::gpu_evidence::RawGpuEvidence {
                report: report.report,
                cert_chain_pem: certs.attestation_cert_chain,
                cc_on: cc.cc_feature != 0,
                dev_tools: cc.dev_tools_mode != 0,
            });
        }
        Ok(Some(out))
    })
}

/// The start-up sequence (module docs): scan, modules (when `load_modules`), NVML, decision;
/// logs each step and the time it took.
pub fn setup(paths: &crate::paths::Paths, policy: Policy, load_modules: bool) -> Setup {
    use crate::platform::modules;
    let start = Instant::now();
    let pci = scan_pci(&paths.sys_bus_pci_devices());
    if pci.is_empty() {
        crate::log_line!(
            "gpu: no GPU present (no NVIDIA PCI device, vendor 0x10de); serving on CPU"
        );
        return Setup {
            outcome: evaluate(&pci, Err(String::new()), policy),
            nvml: None,
        };
    }
    for p in &pci {
        crate::log_line!(
            "gpu: NVIDIA device {} [10de:{:04x}] class {:06x}",
            p.bdf,
            p.device,
            p.class
        );
    }
    let mut module_error = None;
    if load_modules {
        let list_path = paths.gpu_modules_list();
        match modules::read_modules_list(&list_path) {
            Ok(Some(list)) => {
                for problem in &list.problems {
                    crate::log_line!("warning: gpu: {problem}");
                }
                let reports = modules::load_all(&list.modules, modules::finit_module, |r| {
                    crate::log_line!("gpu: {}", r.describe())
                });
                let failed: Vec<&str> = reports
                    .iter()
                    .filter(|r| matches!(r.outcome, modules::LoadOutcome::Failed(_)))
                    .map(|r| r.name.as_str())
                    .collect();
                if !failed.is_empty() {
                    module_error = Some(format!(
                        "GPU kernel module(s) failed to load: {}",
                        failed.join(", ")
                    ));
                }
            }
            Ok(None) => {
                module_error = Some(format!(
                    "this image has no GPU modules ({} is missing; kernel.gpu_modules in \
                     image/worker.yaml)",
                    list_path.display()
                ));
            }
            Err(e) => module_error = Some(e.to_string()),
        }
        if let Some(e) = &module_error {
            crate::log_line!("error: gpu: {e}");
        }
    }
    let nvml = Nvml::load().map_err(|e| match &module_error {
        Some(m) => format!("{m}; {e}"),
        None => e.to_string(),
    });
    let (outcome, nvml) = match nvml {
        Ok(n) => {
            let n: std::sync::Arc<dyn GpuManagement> = std::sync::Arc::new(n);
            (evaluate(&pci, Ok(n.as_ref()), policy), Some(n))
        }
        Err(e) => (evaluate(&pci, Err(e), policy), None),
    };
    let mut outcome = outcome;
    outcome.status.init_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    let s = &outcome.status;
    crate::log_line!(
        "gpu: initialised in {} ms: driver {}, CC {}, {}",
        s.init_ms,
        s.driver_version.as_deref().unwrap_or("unknown"),
        s.cc_mode.as_deref().unwrap_or("unknown"),
        s.summary
    );
    Setup { outcome, nvml }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn dev(root: &Path, bdf: &str, vendor: &str, class: &str) {
        let d = root.join(bdf);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("vendor"), format!("{vendor}\n")).expect("vendor");
        std::fs::write(d.join("device"), "0x2330\n").expect("device");
        std::fs::write(d.join("class"), format!("{class}\n")).expect("class");
    }

    #[test]
    fn the_pci_scan_finds_nvidia_devices_only() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("sys/bus/pci/devices");
        assert!(scan_pci(&root).is_empty(), "no sysfs: nothing");
        dev(&root, "0000:00:01.0", "0x1af4", "0x020000");
        dev(&root, "0000:00:11.0", "0x10de", "0x030200");
        dev(&root, "0000:00:10.0", "0x10de", "0x030200");
        std::fs::create_dir_all(root.join("0000:00:12.0")).expect("no vendor file");
        let found = scan_pci(&root);
        assert_eq!(
            found,
            vec![
                PciNvidia {
                    bdf: "0000:00:10.0".into(),
                    device: 0x2330,
                    class: 0x030200
                },
                PciNvidia {
                    bdf: "0000:00:11.0".into(),
                    device: 0x2330,
                    class: 0x030200
                },
            ]
        );
        // The agent's Paths find the same tree.
        let paths = crate::paths::Paths::new(t.path());
        assert_eq!(scan_pci(&paths.sys_bus_pci_devices()).len(), 2);
    }

    const ON: CcState = CcState {
        environment: 2,
        cc_feature: 1,
        dev_tools_mode: 0,
    };
    const OFF: CcState = CcState {
        environment: 0,
        cc_feature: 0,
        dev_tools_mode: 0,
    };
    const ENFORCE: Policy = Policy {
        allow_without_cc: false,
        enforce: true,
    };

    #[test]
    fn cc_on_serves_cc_off_refuses_unless_the_dev_flag() {
        assert_eq!(decide(false, &Ok(OFF), ENFORCE), Verdict::NoGpu);
        assert_eq!(decide(true, &Ok(ON), ENFORCE), Verdict::Serve);
        let Verdict::Refuse(r) = decide(true, &Ok(OFF), ENFORCE) else {
            panic!("CC off must refuse")
        };
        assert!(r.contains("not in confidential-computing mode"), "{r}");
        assert!(r.contains("--set-cc-mode on"), "{r}");
        assert!(r.contains("dev_allow_gpu_without_cc"), "{r}");
        let dev = Policy {
            allow_without_cc: true,
            enforce: true,
        };
        let Verdict::ServeUnprotected(w) = decide(true, &Ok(OFF), dev) else {
            panic!("the dev flag serves")
        };
        assert!(w.contains("development only, measured in RTMR3"), "{w}");
        // NVML missing: the CC mode is unproven, so refused too.
        let Verdict::Refuse(r) =
            decide(true, &Err("cannot load libnvidia-ml.so.1".into()), ENFORCE)
        else {
            panic!("unknown CC must refuse")
        };
        assert!(
            r.contains("cannot check the GPU's confidential-computing mode"),
            "{r}"
        );
        // Outside the image's init (serve --no-init on a dev box): a warning only.
        let lax = Policy::default();
        assert!(matches!(
            decide(true, &Ok(OFF), lax),
            Verdict::ServeUnprotected(w) if w.contains("not enforced outside")
        ));
    }

    /// NVML stand-in: a fixed CC state; records set_ready calls.
    struct FakeNvml {
        cc: CcState,
        ready: Mutex<Vec<bool>>,
        ready_fails: bool,
    }

    impl GpuManagement for FakeNvml {
        fn driver_version(&self) -> Result<String, GpuError> {
            Ok("550.127.05".into())
        }
        fn devices(&self) -> Result<Vec<NvmlDevice>, GpuError> {
            Ok(vec![NvmlDevice {
                index: 0,
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total: 81559 << 20,
            }])
        }
        fn cc_state(&self) -> Result<CcState, GpuError> {
            Ok(self.cc)
        }
        fn set_ready(&self, ready: bool) -> Result<(), GpuError> {
            if self.ready_fails {
                return Err(GpuError::Nvml {
                    func: "nvmlSystemSetConfComputeGpusReadyState",
                    code: 3,
                    msg: "Not Supported".into(),
                });
            }
            self.ready.lock().expect("lock").push(ready);
            Ok(())
        }
        fn attestation_report(
            &self,
            _index: u32,
            nonce: &[u8; NONCE_SIZE],
        ) -> Result<GpuAttestationReport, GpuError> {
            Ok(GpuAttestationReport {
                nonce: *nonce,
                report: vec![1, 2, 3],
                cec_report: None,
            })
        }
        fn certificates(&self, _index: u32) -> Result<GpuCertificates, GpuError> {
            Ok(GpuCertificates {
                cert_chain: vec![4],
                attestation_cert_chain: vec![5],
            })
        }
    }

    fn h100() -> Vec<PciNvidia> {
        vec![PciNvidia {
            bdf: "0000:00:10.0".into(),
            device: 0x2330,
            class: 0x030200,
        }]
    }

    #[test]
    fn the_evidence_source_asks_each_gpu_for_the_nonce_and_its_attestation_chain() {
        use attestation::ratls::GpuEvidenceProvider as _;
        let nv = std::sync::Arc::new(FakeNvml {
            cc: ON,
            ready: Mutex::default(),
            ready_fails: false,
        });
        let src = evidence_source(nv);
        // The raw bytes reach the converter: the fake's PEM chain ([5]) is not a certificate,
        // so the conversion names the GPU and the problem (never a panic, never "verified").
        let e = src
            .gpu_evidence(&[9; NONCE_SIZE])
            .expect_err("fake chain is not PEM");
        assert!(e.contains("GPU 0"), "{e}");
    }

    #[test]
    fn cc_on_sets_the_gpus_ready_and_reports_them() {
        let nv = FakeNvml {
            cc: ON,
            ready: Mutex::default(),
            ready_fails: false,
        };
        let o = evaluate(&h100(), Ok(&nv), ENFORCE);
        assert_eq!(o.verdict, Verdict::Serve);
        assert_eq!(*nv.ready.lock().expect("lock"), vec![true]);
        let s = &o.status;
        assert!(s.present && s.ready && s.serving && s.error.is_none());
        assert_eq!(s.driver_version.as_deref(), Some("550.127.05"));
        assert_eq!(s.cc_mode.as_deref(), Some("on"));
        assert_eq!(s.cc_environment.as_deref(), Some("prod"));
        assert_eq!(s.devices[0].memory_mib, 81559);
        assert_eq!(s.summary, "NVIDIA H100 80GB HBM3 (81559 MiB); CC on; ready");
        // The evidence functions hand back raw bytes and the nonce asked for.
        let r = nv.attestation_report(0, &[7; NONCE_SIZE]).expect("report");
        assert_eq!((r.nonce, r.report), ([7; NONCE_SIZE], vec![1, 2, 3]));
    }

    #[test]
    fn cc_off_is_not_set_ready_and_health_says_why() {
        let nv = FakeNvml {
            cc: OFF,
            ready: Mutex::default(),
            ready_fails: false,
        };
        let o = evaluate(&h100(), Ok(&nv), ENFORCE);
        assert!(matches!(o.verdict, Verdict::Refuse(_)));
        assert!(nv.ready.lock().expect("lock").is_empty(), "never set ready");
        assert!(!o.status.serving && !o.status.ready);
        assert_eq!(o.status.cc_mode.as_deref(), Some("off"));
        assert!(
            o.status
                .error
                .as_deref()
                .is_some_and(|e| e.contains("not in confidential-computing mode"))
        );
        // A failing ready call refuses too.
        let nv = FakeNvml {
            cc: ON,
            ready: Mutex::default(),
            ready_fails: true,
        };
        let o = evaluate(&h100(), Ok(&nv), ENFORCE);
        assert!(
            matches!(&o.verdict, Verdict::Refuse(r) if r.contains("cannot set the GPUs ready")),
            "{:?}",
            o.verdict
        );
    }

    #[test]
    fn no_gpu_and_no_nvml_statuses_serialise_into_health() {
        let o = evaluate(&[], Err(String::new()), ENFORCE);
        assert_eq!(o.verdict, Verdict::NoGpu);
        let j = serde_json::to_value(&o.status).expect("json");
        assert_eq!(j["present"], false);
        assert_eq!(j["summary"], NO_GPU_SUMMARY);
        assert!(j.get("cc_mode").is_none(), "{j}");
        let o = evaluate(
            &h100(),
            Err("cannot load libnvidia-ml.so.1".into()),
            ENFORCE,
        );
        let j = serde_json::to_value(&o.status).expect("json");
        assert_eq!(j["present"], true);
        assert_eq!(j["pci"][0], "0000:00:10.0");
        assert_eq!(j["cc_mode"], "unknown");
        assert_eq!(j["serving"], false);
        assert!(
            j["summary"]
                .as_str()
                .is_some_and(|s| s.starts_with("1 NVIDIA PCI device(s); not serving:")),
            "{j}"
        );
    }

    #[test]
    fn nvml_layouts_match_nvml_h() {
        // Sizes from nvml.h: 3 uints + nonce + both reports; 2 uints + both chains.
        assert_eq!(
            std::mem::size_of::<NvmlCcReport>(),
            12 + 32 + 0x2000 + 0x1000
        );
        assert_eq!(
            std::mem::size_of::<NvmlCcCertificate>(),
            8 + 0x1000 + 0x1400
        );
        assert_eq!(std::mem::size_of::<CcState>(), 12);
        assert_eq!(std::mem::size_of::<NvmlMemory>(), 24);
        assert_eq!(std::mem::offset_of!(NvmlCcReport, nonce), 12);
        assert_eq!(std::mem::offset_of!(NvmlCcReport, attestation_report), 44);
    }

    #[test]
    fn setup_without_a_gpu_says_so_and_loads_nothing() {
        let t = tempfile::tempdir().expect("tempdir");
        let paths = crate::paths::Paths::new(t.path());
        let s = setup(&paths, ENFORCE, true);
        assert_eq!(s.outcome.verdict, Verdict::NoGpu);
        assert_eq!(s.outcome.status.summary, NO_GPU_SUMMARY);
        assert!(s.nvml.is_none());
    }

    #[test]
    fn setup_with_a_gpu_but_no_modules_or_nvml_refuses() {
        // This machine has no NVML: the fake tree's GPU cannot be checked, so it is refused,
        // naming the missing module list and library.
        let t = tempfile::tempdir().expect("tempdir");
        dev(
            &t.path().join("sys/bus/pci/devices"),
            "0000:00:10.0",
            "0x10de",
            "0x030200",
        );
        let paths = crate::paths::Paths::new(t.path());
        let s = setup(&paths, ENFORCE, true);
        if s.nvml.is_some() {
            println!(
                "SKIPPED: {NVML_LIBRARY} loads on this machine; the no-NVML path is not tested here"
            );
            return;
        }
        let Verdict::Refuse(r) = &s.outcome.verdict else {
            panic!("{:?}", s.outcome.verdict)
        };
        assert!(r.contains("gpu-modules.list is missing"), "{r}");
        assert!(r.contains(NVML_LIBRARY), "{r}");
    }
}
