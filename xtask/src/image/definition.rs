//! The declarative image definition, `image/worker.yaml`: what goes into the image.
//!
//! Parsing is strict (`deny_unknown_fields`) and errors carry the line, the column and the key
//! path, so a typo points at itself.

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;

/// Root of `image/worker.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageDefinition {
    /// Image name; also the output directory name (`out/<name>/`).
    pub name: String,
    /// Image version (goes into `/etc/worker-image/release.json`).
    pub version: String,
    /// Every timestamp inside the outputs (cpio mtimes, archive mtimes, the agent build).
    pub source_date_epoch: u64,
    /// Where Debian inputs come from.
    pub debian: DebianSource,
    /// The exact Debian packages the image is made of.
    pub packages: Vec<PackageSpec>,
    /// Kernel command line and modules.
    pub kernel: KernelSpec,
    /// Firmware file inside the firmware package.
    pub firmware: FirmwareSpec,
    /// Default QEMU resources (copied into `manifest.json`).
    pub launch: LaunchSpec,
    /// How the guest agent (`/init`) is built.
    pub agent: AgentSpec,
    /// The root the agent is compiled and linked in: these Debian packages and everything they
    /// depend on, locked like every other input. Nothing of the build host but the pinned Rust
    /// toolchain takes part in compiling or linking what goes into the image.
    pub build_root: BuildRootSpec,
    /// TDX launch shapes and the QEMU a TDX host must run (copied into `manifest.json`).
    pub tdx: worker_api::shapes::TdxLaunch,
    /// CUDA kernels compiled ahead of time (absent: none in the image; the guest would need
    /// NVRTC at start-up).
    #[serde(default)]
    pub cuda: Option<CudaSpec>,
}

/// Ahead-of-time CUDA kernels: the build runs `cuda-aot` (inference's kernel source through the
/// NVRTC of the lock's `cuda-compiler` packages) in the build root, once per architecture, and
/// puts the CUBINs with their index in the initrd under `/usr/lib/worker/cuda/`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CudaSpec {
    /// Architectures as `major*10+minor` (90 = sm_90: H100, H200).
    pub archs: Vec<i32>,
}

/// The hermetic build root (see `image::buildroot`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRootSpec {
    /// Suite the packages and their dependency closure come from.
    pub suite: String,
    /// Packages to install; the lock adds their `Pre-Depends`/`Depends` closure.
    pub packages: Vec<String>,
    /// C compiler driver inside the root (CC, and the linker driver of rustc).
    pub cc: String,
    /// Archiver inside the root (AR for C code in build scripts).
    pub ar: String,
}

/// Debian suites and architecture the lock resolves against.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebianSource {
    pub architecture: String,
    pub components: Vec<String>,
    /// Every suite a package may name (the private apt configuration lists exactly these).
    pub suites: Vec<String>,
}

/// What a package contributes to the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// `linux-image-*`: `vmlinuz`, the modules.
    Kernel,
    /// `ovmf`: `OVMF.fd`.
    Firmware,
    /// Shared libraries the agent needs at run time (`libc6`, `libgcc-s1`).
    Runtime,
    /// Part of the build root the agent is compiled in (`build_root` in worker.yaml); nothing
    /// of these packages is copied into the image.
    Build,
    /// NVRTC (`libnvrtc12`, its builtins): compiles the CUDA kernels to CUBINs during the build
    /// (`cuda` in worker.yaml); only the CUBINs go into the image, not the compiler.
    CudaCompiler,
}

/// How a package name in the definition turns into the locked package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Resolve {
    /// Lock the package with exactly this name.
    #[default]
    Exact,
    /// The name is a metapackage: lock the package its `Depends` names (the entry sharing the
    /// metapackage's stem, else the first; for `linux-image-amd64` the concrete
    /// `linux-image-<abi>-amd64`) plus every package that one pins to its own version,
    /// transitively (Debian's split kernel: `linux-binary-<abi>` with `vmlinuz`,
    /// `linux-modules-<abi>`, `linux-base-<abi>` with `config` and `modules.builtin`).
    MetapackageDepends,
}

/// One Debian input.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageSpec {
    pub name: String,
    pub suite: String,
    pub role: Role,
    #[serde(default)]
    pub resolve: Resolve,
}

/// Kernel settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSpec {
    /// Exact kernel command line (written to `cmdline` without a trailing newline).
    pub cmdline: String,
    /// Module names (as in `modinfo`, `-` or `_`) to put in the initrd with their dependencies,
    /// loaded in this order after their dependencies. Built-in ones are reported and skipped.
    pub modules: Vec<String>,
    /// GPU driver modules (`nvidia`, `nvidia-uvm`, ...) put in the initrd with the dependencies
    /// `modules` does not load, listed in `/etc/worker-image/gpu-modules.list`: the agent loads
    /// them only when an NVIDIA PCI device is present. Optional; empty by default.
    #[serde(default)]
    pub gpu_modules: Vec<String>,
    /// Options the locked kernel's `config` must have (`CONFIG_X=y`, `CONFIG_X=m`, or
    /// `CONFIG_X` for either); the build fails naming each unmet one.
    #[serde(default)]
    pub required_config: Vec<String>,
}

/// Firmware settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareSpec {
    /// Path of the firmware image inside the firmware package.
    pub path: String,
}

/// Default resources of a launch.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchSpec {
    pub memory_mib: u64,
    pub cpus: u32,
}

/// Guest-agent build settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Cargo package to build.
    pub package: String,
    /// Rust target triple (glibc: the agent dlopens libcuda later).
    pub target: String,
    /// Cargo features to enable.
    #[serde(default)]
    pub features: Vec<String>,
}

impl ImageDefinition {
    /// Parse a definition; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Self> {
        let def: ImageDefinition = serde_yaml_ng::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("{origin}:{}:{}", l.line(), l.column()))
                .unwrap_or_else(|| origin.to_string());
            anyhow::anyhow!("{at}: invalid image definition: {e}")
        })?;
        def.validate(origin)?;
        Ok(def)
    }

    /// Read and parse a definition file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading image definition {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn validate(&self, origin: &str) -> anyhow::Result<()> {
        let bad = |msg: String| anyhow::anyhow!("{origin}: {msg}");
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(format!(
                "`name` {:?} must be non-empty [A-Za-z0-9_-]",
                self.name
            )));
        }
        for p in &self.packages {
            if !self.debian.suites.contains(&p.suite) {
                return Err(bad(format!(
                    "package {} names suite {:?}, which is not in `debian.suites` {:?}",
                    p.name, p.suite, self.debian.suites
                )));
            }
        }
        if !self.debian.suites.contains(&self.build_root.suite) {
            return Err(bad(format!(
                "`build_root.suite` {:?} is not in `debian.suites` {:?}",
                self.build_root.suite, self.debian.suites
            )));
        }
        if self.build_root.packages.is_empty() {
            return Err(bad(
                "`build_root.packages` is empty: name at least the C compiler and libc6-dev".into(),
            ));
        }
        if let Some(p) = self.packages.iter().find(|p| p.role == Role::Build) {
            return Err(bad(format!(
                "package {} has role build: list build-root packages under `build_root.packages`",
                p.name
            )));
        }
        self.tdx
            .validate()
            .map_err(|e| bad(format!("`tdx`: {e}")))?;
        for role in [Role::Kernel, Role::Firmware] {
            let n = self.packages.iter().filter(|p| p.role == role).count();
            if n != 1 {
                return Err(bad(format!(
                    "exactly one package must have role {role:?}, found {n}"
                )));
            }
        }
        if let Some(r) = self
            .kernel
            .required_config
            .iter()
            .find(|r| !super::kconfig::valid_requirement(r))
        {
            return Err(bad(format!(
                "`kernel.required_config` entry {r:?} is not CONFIG_NAME, CONFIG_NAME=y or CONFIG_NAME=m"
            )));
        }
        if self.kernel.cmdline.contains('\n') {
            return Err(bad("`kernel.cmdline` must be a single line".into()));
        }
        if self.launch.memory_mib == 0 || self.launch.cpus == 0 {
            return Err(bad(
                "`launch.memory_mib` and `launch.cpus` must be positive".into(),
            ));
        }
        let compilers = self
            .packages
            .iter()
            .filter(|p| p.role == Role::CudaCompiler)
            .count();
        match &self.cuda {
            Some(c) => {
                if c.archs.is_empty() {
                    return Err(bad(
                        "`cuda.archs` is empty: name the GPU architectures (90 for H100/H200) or drop `cuda`".into(),
                    ));
                }
                if let Some(a) = c.archs.iter().find(|a| !(80..=130).contains(*a)) {
                    return Err(bad(format!(
                        "`cuda.archs` entry {a} is not an architecture from 80 (sm_80) to 130 (sm_130)"
                    )));
                }
                if compilers == 0 {
                    return Err(bad(
                        "`cuda` needs the NVRTC packages: add libnvrtc12 and its builtins with role cuda-compiler".into(),
                    ));
                }
            }
            None if compilers > 0 => {
                return Err(bad(
                    "packages with role cuda-compiler are listed but there is no `cuda` section to use them".into(),
                ));
            }
            None => {}
        }
        Ok(())
    }

    /// The package with the given (unique) role.
    #[cfg(test)]
    pub fn package_with_role(&self, role: Role) -> Option<&PackageSpec> {
        self.packages.iter().find(|p| p.role == role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn the_cuda_section_needs_its_compiler_and_sane_archs() {
        let with = |extra_pkg: &str, cuda: &str| {
            let text = GOOD.replace(
                "  - { name: libc6, suite: bookworm, role: runtime }\n",
                &format!("  - {{ name: libc6, suite: bookworm, role: runtime }}\n{extra_pkg}"),
            );
            ImageDefinition::parse(&format!("{text}{cuda}"), "w.yaml")
        };
        let nvrtc = "  - { name: libnvrtc12, suite: trixie, role: cuda-compiler }\n";
        let def = with(nvrtc, "cuda:\n  archs: [90]\n").unwrap();
        assert_eq!(def.cuda, Some(CudaSpec { archs: vec![90] }));
        let e = with("", "cuda:\n  archs: [90]\n").unwrap_err().to_string();
        assert!(e.contains("cuda-compiler"), "{e}");
        let e = with(nvrtc, "").unwrap_err().to_string();
        assert!(e.contains("no `cuda` section"), "{e}");
        let e = with(nvrtc, "cuda:\n  archs: [52]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("52"), "{e}");
        let e = with(nvrtc, "cuda:\n  archs: []\n").unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        assert_eq!(ImageDefinition::parse(GOOD, "w.yaml").unwrap().cuda, None);
    }

    const GOOD: &str = r#"
name: worker
version: 0.1.0
source_date_epoch: 1700000000
debian:
  architecture: amd64
  components: [main]
  suites: [bookworm, bookworm-backports, trixie]
packages:
  - { name: linux-image-amd64, suite: bookworm-backports, role: kernel, resolve: metapackage-depends }
  - { name: ovmf, suite: trixie, role: firmware }
  - { name: libc6, suite: bookworm, role: runtime }
kernel:
  cmdline: console=ttyS0 panic=-1
  modules: [virtio_net, tdx-guest]
firmware:
  path: usr/share/ovmf/OVMF.fd
launch:
  memory_mib: 2048
  cpus: 1
agent:
  package: guest-agent
  target: x86_64-unknown-linux-gnu
build_root:
  suite: bookworm
  packages: [gcc-12, libc6-dev]
  cc: x86_64-linux-gnu-gcc-12
  ar: x86_64-linux-gnu-ar
tdx:
  qemu_versions: ["10.1"]
  machine: pc-q35-10.1
  shapes:
    - { name: cpu-1c-2g, memory_mib: 2048, cpus: 1 }
"#;

    #[test]
    fn parses_a_full_definition() {
        let d = ImageDefinition::parse(GOOD, "worker.yaml").expect("parse");
        assert_eq!(d.name, "worker");
        assert_eq!(d.source_date_epoch, 1_700_000_000);
        assert_eq!(d.packages.len(), 3);
        assert_eq!(d.packages[0].resolve, Resolve::MetapackageDepends);
        assert_eq!(d.packages[1].resolve, Resolve::Exact);
        assert_eq!(
            d.package_with_role(Role::Firmware).map(|p| p.name.as_str()),
            Some("ovmf")
        );
        assert_eq!(d.kernel.modules, vec!["virtio_net", "tdx-guest"]);
        assert!(
            d.kernel.gpu_modules.is_empty(),
            "optional, empty by default"
        );
        assert!(d.agent.features.is_empty());
    }

    #[test]
    fn the_repository_definition_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../image/worker.yaml");
        let d = ImageDefinition::load(Path::new(path)).expect("image/worker.yaml parses");
        assert_eq!(d.name, "worker");
        assert!(d.kernel.modules.iter().any(|m| m == "tdx-guest"));
        // The agent extends RTMR3 through the TSM measurement-register sysfs ABI (Linux 6.16).
        assert!(
            d.kernel
                .required_config
                .iter()
                .any(|c| c == "CONFIG_TSM_MEASUREMENTS=y"),
            "{:?}",
            d.kernel.required_config
        );
    }

    #[test]
    fn unknown_key_reports_line_column_and_key() {
        let text = GOOD.replace("  memory_mib: 2048", "  memory_mb: 2048");
        let err = ImageDefinition::parse(&text, "worker.yaml")
            .expect_err("must fail")
            .to_string();
        // `memory_mb` is on line 19, column 3 of the text above.
        assert!(err.starts_with("worker.yaml:19:3: "), "{err}");
        assert!(err.contains("launch"), "names the parent key: {err}");
        assert!(err.contains("unknown field `memory_mb`"), "{err}");
    }

    #[test]
    fn wrong_type_reports_the_key_path() {
        let text = GOOD.replace("cpus: 1", "cpus: many");
        let err = ImageDefinition::parse(&text, "w.yaml")
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("launch.cpus"), "{err}");
        assert!(err.starts_with("w.yaml:20:"), "{err}");
    }

    #[test]
    fn syntax_error_has_a_location() {
        let err = ImageDefinition::parse("name: [unclosed\nversion: 1\n", "x.yaml")
            .expect_err("must fail")
            .to_string();
        assert!(err.starts_with("x.yaml:"), "{err}");
        let loc: Vec<&str> = err.splitn(4, ':').collect();
        assert!(
            loc[1].parse::<u32>().is_ok() && loc[2].parse::<u32>().is_ok(),
            "{err}"
        );
    }

    #[test]
    fn semantic_checks() {
        let text = GOOD.replace(
            "suite: trixie, role: firmware",
            "suite: sid, role: firmware",
        );
        let err = ImageDefinition::parse(&text, "w")
            .expect_err("unknown suite")
            .to_string();
        assert!(err.contains("sid"), "{err}");
        let text = GOOD.replace("role: firmware", "role: runtime");
        let err = ImageDefinition::parse(&text, "w")
            .expect_err("no firmware")
            .to_string();
        assert!(err.contains("Firmware"), "{err}");
        let text = GOOD.replace(
            "  modules: [virtio_net, tdx-guest]",
            "  modules: [virtio_net, tdx-guest]\n  required_config: [CONFIG_TSM_MEASUREMENTS=n]",
        );
        let err = ImageDefinition::parse(&text, "w")
            .expect_err("bad requirement")
            .to_string();
        assert!(err.contains("CONFIG_TSM_MEASUREMENTS=n"), "{err}");
    }
}
