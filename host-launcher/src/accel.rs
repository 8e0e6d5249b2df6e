//! Which QEMU accelerator a launch uses: KVM when this host can really run a KVM guest, else TCG.
//!
//! Two halves, so the decision is testable without a KVM host:
//! - [`probe`] does the I/O: opens the KVM device, checks `KVM_GET_API_VERSION` == 12, creates a
//!   VM with `KVM_CREATE_VM` (and closes it at once), and checks that the CPU has hardware
//!   virtualization (VMX or SVM in CPUID). The last check exists because a `/dev/kvm` can be
//!   served by a paravirtual KVM (e.g. `kvm_pvm` inside a VM without nested virtualization) that
//!   creates VMs but cannot run unmodified firmware: QEMU aborts there while setting up the vCPU
//!   (seen with QEMU 7.2: "failed to set MSR 0x10a"), so an ioctl-only probe would pick a KVM
//!   that cannot boot the image.
//! - [`choose`] turns the requested [`AccelMode`] and the probe's answer into an [`Accel`] and the
//!   one line `run` prints (`accelerator: kvm (/dev/kvm can create VMs)`), or an error that says
//!   what to fix.
//!
//! `--tee tdx` always runs under KVM (TDX is a KVM feature) and is not probed here; its own
//! checks (QEMU version, the TDX objects) decide. `capture-acpi` always uses TCG: see
//! [`crate::capture`].

use std::fmt;
use std::path::Path;

use crate::settings::{AccelMode, Tee};

/// The KVM device node.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// The only KVM API version Linux has ever reported (and the one QEMU requires).
pub const KVM_API_VERSION: i32 = 12;

/// `_IO(KVMIO, 0x00)`, KVMIO = 0xAE (linux/kvm.h).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// `_IO(KVMIO, 0x01)`; the argument is the machine type (0 = default).
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;

/// The accelerator a launch runs under (part of the QEMU plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm` (`-accel kvm -cpu host`).
    Kvm,
    /// QEMU's Tiny Code Generator: full emulation, works everywhere, much slower (`-accel tcg
    /// -cpu max`).
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Why KVM cannot be used on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// The device node does not exist (or no driver is behind it).
    NoDevice,
    /// The device exists but this user may not open it.
    PermissionDenied,
    /// Opening failed for another reason (the OS error).
    Open(String),
    /// `KVM_GET_API_VERSION` failed (the OS error).
    ApiVersionFailed(String),
    /// The kernel speaks another KVM API version.
    ApiVersion(i32),
    /// `KVM_CREATE_VM` failed (the OS error).
    CreateVm(String),
    /// VMs can be created, but the CPU reports no VMX/SVM: a paravirtual KVM (the loaded `kvm_*`
    /// modules, when any are seen) that cannot run the unmodified firmware and kernel.
    NoHardwareVirtualization { modules: Vec<String> },
    /// Not an x86-64 host: KVM cannot run `qemu-system-x86_64` guests.
    NotX86_64,
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unusable::NoDevice => f.write_str("no such device"),
            Unusable::PermissionDenied => f.write_str("permission denied"),
            Unusable::Open(e) => write!(f, "cannot open it: {e}"),
            Unusable::ApiVersionFailed(e) => write!(f, "KVM_GET_API_VERSION failed: {e}"),
            Unusable::ApiVersion(v) => {
                write!(f, "KVM API version {v}, expected {KVM_API_VERSION}")
            }
            Unusable::CreateVm(e) => write!(f, "KVM_CREATE_VM failed: {e}"),
            Unusable::NoHardwareVirtualization { modules } => {
                f.write_str(
                    "KVM_CREATE_VM works, but the CPU has no VMX/SVM in CPUID, so this KVM",
                )?;
                if !modules.is_empty() {
                    write!(f, " ({})", modules.join(", "))?;
                }
                f.write_str(" cannot boot an unmodified guest")
            }
            Unusable::NotX86_64 => f.write_str("this host is not x86-64"),
        }
    }
}

impl Unusable {
    /// What the user can do about it (always ending with the TCG way out).
    pub fn fix(&self) -> &'static str {
        match self {
            Unusable::NoDevice => {
                "load the KVM module (`modprobe kvm_intel` or `modprobe kvm_amd`) after enabling \
                 virtualization (VT-x/AMD-V) in the BIOS, or use --accel tcg"
            }
            Unusable::PermissionDenied => {
                "add this user to the `kvm` group (`usermod -aG kvm USER`, then log in again) or \
                 run as root, or use --accel tcg"
            }
            Unusable::Open(_) | Unusable::ApiVersionFailed(_) | Unusable::CreateVm(_) => {
                "enable virtualization (VT-x/AMD-V) in the BIOS, load kvm_intel or kvm_amd, add \
                 this user to the `kvm` group, check `dmesg | grep -i kvm`; or use --accel tcg"
            }
            Unusable::ApiVersion(_) => "use a kernel with the standard KVM API, or use --accel tcg",
            Unusable::NoHardwareVirtualization { .. } => {
                "enable virtualization (VT-x/AMD-V) in the BIOS and load kvm_intel or kvm_amd \
                 (inside a VM: enable nested virtualization on its host), or use --accel tcg"
            }
            Unusable::NotX86_64 => "use --accel tcg",
        }
    }
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmProbe {
    /// The device opened, API version 12, `KVM_CREATE_VM` succeeded, the CPU has VMX/SVM.
    Usable,
    Unavailable(Unusable),
}

impl fmt::Display for KvmProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmProbe::Usable => f.write_str("usable: can create VMs"),
            KvmProbe::Unavailable(r) => write!(f, "unavailable: {r}"),
        }
    }
}

/// Checks whether KVM at `device` can run this launcher's guests (see the module docs). Never
/// panics; every failure is a [`KvmProbe::Unavailable`] with its reason.
pub fn probe(device: &Path) -> KvmProbe {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    if !cfg!(target_arch = "x86_64") {
        return KvmProbe::Unavailable(Unusable::NotX86_64);
    }
    // std opens with O_CLOEXEC.
    let kvm = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
    {
        Ok(f) => f,
        Err(e) => {
            return KvmProbe::Unavailable(match (e.kind(), e.raw_os_error()) {
                (std::io::ErrorKind::NotFound, _)
                | (_, Some(libc::ENODEV))
                | (_, Some(libc::ENXIO)) => Unusable::NoDevice,
                (std::io::ErrorKind::PermissionDenied, _) => Unusable::PermissionDenied,
                _ => Unusable::Open(e.to_string()),
            });
        }
    };
    // SAFETY: `kvm` is an open file for the whole call; KVM_GET_API_VERSION takes no argument
    // and touches no memory of ours (on a non-KVM file the kernel answers ENOTTY).
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version < 0 {
        let e = std::io::Error::last_os_error();
        return KvmProbe::Unavailable(Unusable::ApiVersionFailed(e.to_string()));
    }
    if version != KVM_API_VERSION {
        return KvmProbe::Unavailable(Unusable::ApiVersion(version));
    }
    // SAFETY: as above; the argument is the machine type by value (0 = default), no pointer.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        let e = std::io::Error::last_os_error();
        return KvmProbe::Unavailable(Unusable::CreateVm(e.to_string()));
    }
    // SAFETY: KVM_CREATE_VM returned a new file descriptor that nothing else owns; the OwnedFd
    // takes it over and closes it right away (the VM is destroyed with its last fd).
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    if !cpu_has_hardware_virtualization() {
        return KvmProbe::Unavailable(Unusable::NoHardwareVirtualization {
            modules: loaded_kvm_modules(Path::new("/sys/module")),
        });
    }
    KvmProbe::Usable
}

/// VMX (Intel: CPUID.1:ECX bit 5) or SVM (AMD: CPUID.8000_0001h:ECX bit 2), as the CPU reports
/// it to this kernel's user space.
#[cfg(target_arch = "x86_64")]
fn cpu_has_hardware_virtualization() -> bool {
    use std::arch::x86_64::__cpuid;
    let vmx = __cpuid(1).ecx & (1 << 5) != 0;
    let max_ext = __cpuid(0x8000_0000).eax;
    let svm = max_ext >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 2) != 0;
    vmx || svm
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_hardware_virtualization() -> bool {
    false
}

/// The `kvm_*` vendor modules under `sys_module` (e.g. `kvm_intel`, `kvm_pvm`), sorted; empty
/// when none are visible. Only used to explain a failed probe.
fn loaded_kvm_modules(sys_module: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(sys_module)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("kvm_"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// The accelerator chosen for a launch, with the reason shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub accel: Accel,
    pub why: String,
}

impl Choice {
    /// The line `run` prints: `accelerator: kvm (/dev/kvm can create VMs)`.
    pub fn line(&self) -> String {
        format!("accelerator: {} ({})", self.accel, self.why)
    }
}

/// Decides the accelerator for `tee` and the requested `mode`, calling `probe` on `device` only
/// when the answer depends on it (`--tee none` with `auto` or `kvm`). The error says what to fix.
pub fn choose(
    tee: Tee,
    mode: AccelMode,
    device: &Path,
    probe: impl FnOnce(&Path) -> KvmProbe,
) -> Result<Choice, String> {
    let dev = device.display();
    match (tee, mode) {
        (Tee::Tdx, AccelMode::Tcg) => Err(
            "--accel tcg does not work with --tee tdx: a TDX guest always runs under KVM; use \
             --tee none to run without TDX under TCG, or drop --accel"
                .to_owned(),
        ),
        (Tee::Tdx, _) => Ok(Choice {
            accel: Accel::Kvm,
            why: "--tee tdx always runs under KVM".to_owned(),
        }),
        (Tee::None, AccelMode::Tcg) => Ok(Choice {
            accel: Accel::Tcg,
            why: format!("requested; {dev} not probed"),
        }),
        (Tee::None, AccelMode::Auto) => Ok(match probe(device) {
            KvmProbe::Usable => Choice {
                accel: Accel::Kvm,
                why: format!("{dev} can create VMs"),
            },
            KvmProbe::Unavailable(r) => Choice {
                accel: Accel::Tcg,
                why: format!("{dev}: {r}; pass --accel kvm to insist"),
            },
        }),
        (Tee::None, AccelMode::Kvm) => match probe(device) {
            KvmProbe::Usable => Ok(Choice {
                accel: Accel::Kvm,
                why: format!("requested; {dev} can create VMs"),
            }),
            KvmProbe::Unavailable(r) => Err(format!(
                "--accel kvm: KVM is not usable on this host ({dev}: {r}): {}",
                r.fix()
            )),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DEV: &str = "/dev/kvm";

    fn no_probe(_: &Path) -> KvmProbe {
        panic!("the probe must not run")
    }

    #[test]
    fn auto_uses_kvm_when_the_probe_succeeds() {
        let c = choose(Tee::None, AccelMode::Auto, Path::new(DEV), |p| {
            assert_eq!(p, Path::new(DEV));
            KvmProbe::Usable
        })
        .unwrap();
        assert_eq!(c.accel, Accel::Kvm);
        assert_eq!(c.line(), "accelerator: kvm (/dev/kvm can create VMs)");
    }

    #[test]
    fn auto_falls_back_to_tcg_with_the_reason() {
        let failed = KvmProbe::Unavailable(Unusable::CreateVm(
            "Operation not supported (os error 95)".into(),
        ));
        let c = choose(Tee::None, AccelMode::Auto, Path::new(DEV), |_| failed).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!(
            c.line(),
            "accelerator: tcg (/dev/kvm: KVM_CREATE_VM failed: Operation not supported (os \
             error 95); pass --accel kvm to insist)"
        );
        let c = choose(Tee::None, AccelMode::Auto, Path::new(DEV), |_| {
            KvmProbe::Unavailable(Unusable::NoDevice)
        })
        .unwrap();
        assert_eq!(
            c.line(),
            "accelerator: tcg (/dev/kvm: no such device; pass --accel kvm to insist)"
        );
    }

    #[test]
    fn forced_kvm_without_kvm_is_an_error_naming_the_fix() {
        for (why, reason, fix) in [
            (
                Unusable::NoDevice,
                "no such device",
                "modprobe kvm_intel` or `modprobe kvm_amd`",
            ),
            (
                Unusable::PermissionDenied,
                "permission denied",
                "`kvm` group",
            ),
            (
                Unusable::CreateVm("Invalid argument (os error 22)".into()),
                "KVM_CREATE_VM failed: Invalid argument",
                "enable virtualization (VT-x/AMD-V) in the BIOS",
            ),
            (
                Unusable::NoHardwareVirtualization {
                    modules: vec!["kvm_pvm".into()],
                },
                "no VMX/SVM in CPUID, so this KVM (kvm_pvm) cannot boot",
                "nested virtualization",
            ),
            (
                Unusable::ApiVersion(11),
                "KVM API version 11, expected 12",
                "standard KVM API",
            ),
        ] {
            let e = choose(Tee::None, AccelMode::Kvm, Path::new(DEV), |_| {
                KvmProbe::Unavailable(why.clone())
            })
            .unwrap_err();
            assert!(e.starts_with("--accel kvm: KVM is not usable"), "{e}");
            assert!(e.contains(reason), "{e}");
            assert!(e.contains(fix), "{e}");
            assert!(e.ends_with("or use --accel tcg"), "{e}");
        }
        let c = choose(Tee::None, AccelMode::Kvm, Path::new(DEV), |_| {
            KvmProbe::Usable
        })
        .unwrap();
        assert_eq!(c.accel, Accel::Kvm);
    }

    #[test]
    fn forced_tcg_never_probes() {
        let c = choose(Tee::None, AccelMode::Tcg, Path::new(DEV), no_probe).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!(
            c.line(),
            "accelerator: tcg (requested; /dev/kvm not probed)"
        );
    }

    #[test]
    fn tdx_is_always_kvm_and_never_probed() {
        for mode in [AccelMode::Auto, AccelMode::Kvm] {
            let c = choose(Tee::Tdx, mode, Path::new(DEV), no_probe).unwrap();
            assert_eq!(c.accel, Accel::Kvm);
        }
        let e = choose(Tee::Tdx, AccelMode::Tcg, Path::new(DEV), no_probe).unwrap_err();
        assert!(e.contains("--tee none"), "{e}");
    }

    #[test]
    fn probe_of_a_missing_device_says_no_such_device() {
        let d = tempfile::tempdir().unwrap();
        let p = probe(&d.path().join("kvm"));
        assert_eq!(p, KvmProbe::Unavailable(Unusable::NoDevice));
        assert_eq!(p.to_string(), "unavailable: no such device");
    }

    #[test]
    fn probe_of_a_non_kvm_file_fails_with_a_reason() {
        // A regular file opens, but the KVM ioctls are not for it (ENOTTY).
        let f = tempfile::NamedTempFile::new().unwrap();
        match probe(f.path()) {
            KvmProbe::Unavailable(Unusable::ApiVersionFailed(e)) => {
                assert!(!e.is_empty());
            }
            other => panic!("expected a failed KVM_GET_API_VERSION, got {other:?}"),
        }
    }

    /// The real device on this machine: a well-formed answer either way (usable on a KVM host;
    /// on a host without KVM, or with a KVM that cannot run our guest, a reason and a fix).
    #[test]
    fn probe_of_this_hosts_kvm_is_well_formed() {
        let p = probe(Path::new(KVM_DEVICE));
        eprintln!("probe of {KVM_DEVICE} on this host: {p}");
        match &p {
            KvmProbe::Usable => assert_eq!(p.to_string(), "usable: can create VMs"),
            KvmProbe::Unavailable(r) => {
                let shown = p.to_string();
                assert!(shown.starts_with("unavailable: ") && shown.len() > 13);
                assert!(r.fix().ends_with("--accel tcg"), "{}", r.fix());
            }
        }
        let c = choose(Tee::None, AccelMode::Auto, Path::new(KVM_DEVICE), probe).unwrap();
        eprintln!("{}", c.line());
        assert_eq!(c.accel == Accel::Kvm, p == KvmProbe::Usable);
    }

    #[test]
    fn kvm_modules_are_listed_from_sysfs() {
        let d = tempfile::tempdir().unwrap();
        for m in ["kvm", "kvm_pvm", "kvm_amd", "virtio_net"] {
            std::fs::create_dir(d.path().join(m)).unwrap();
        }
        assert_eq!(loaded_kvm_modules(d.path()), ["kvm_amd", "kvm_pvm"]);
        assert!(loaded_kvm_modules(&d.path().join("absent")).is_empty());
    }
}
