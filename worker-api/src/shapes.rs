//! TDX launch shapes: the guest-visible machine a TD is launched as.
//!
//! RTMR0 (and so the image hash published on chain) covers the ACPI tables QEMU builds, and
//! those depend on the QEMU version and machine type, the memory, the vCPUs, the devices (each
//! GPU sits behind its own PCIe root port) and the 64-bit PCI hole. A *shape* pins all of them.
//! The image definition (`image/worker.yaml`, `tdx:`) declares the shapes and the QEMU versions
//! a TDX host must use; `cargo xtask image build` copies them into `manifest.json`
//! (`launch.tdx`), and `host-launcher run --tee tdx` builds its command line from one of them and
//! refuses anything else (unless told the hash will not be on chain).

use serde::{Deserialize, Serialize};

/// One declared launch shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchShape {
    /// Short name (`[a-z0-9-]`), e.g. `cpu-1c-2g`, `h100x1`.
    pub name: String,
    pub memory_mib: u64,
    pub cpus: u32,
    /// GPUs passed through, each behind its own `pcie-root-port` on `pcie.0`.
    #[serde(default)]
    pub gpus: u32,
    /// Size of the 64-bit PCI hole (`q35-pcihost.pci-hole64-size`) in GiB; GPUs need it to
    /// map their large BARs. `None`: QEMU's default for the machine type.
    #[serde(default)]
    pub pci_hole64_gib: Option<u64>,
}

/// What a TDX host must run: the QEMU releases and the versioned machine type the shapes'
/// tables are made for, and the shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TdxLaunch {
    /// QEMU `major.minor` releases allowed for `--tee tdx` (e.g. `10.1`).
    pub qemu_versions: Vec<String>,
    /// Versioned q35 machine type (`pc-q35-X.Y`), never the bare `q35` alias whose meaning
    /// changes with every QEMU release.
    pub machine: String,
    pub shapes: Vec<LaunchShape>,
}

/// A problem with a declared [`TdxLaunch`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShapeError(pub String);

impl TdxLaunch {
    /// Checks names, versions and the machine type.
    pub fn validate(&self) -> Result<(), ShapeError> {
        let bad = |m: String| Err(ShapeError(m));
        if self.qemu_versions.is_empty() {
            return bad(
                "tdx.qemu_versions is empty: name the QEMU releases (e.g. \"10.1\")".into(),
            );
        }
        for v in &self.qemu_versions {
            if parse_major_minor(v).is_none() {
                return bad(format!(
                    "tdx.qemu_versions entry {v:?} is not MAJOR.MINOR (e.g. \"10.1\")"
                ));
            }
        }
        let Some(mv) = self.machine.strip_prefix("pc-q35-") else {
            return bad(format!(
                "tdx.machine {:?} must be a versioned q35 machine type, pc-q35-X.Y (never the bare q35 alias)",
                self.machine
            ));
        };
        let Some(machine_version) = parse_major_minor(mv) else {
            return bad(format!("tdx.machine {:?} must be pc-q35-X.Y", self.machine));
        };
        // A machine type exists from its own release on.
        if let Some(v) = self
            .qemu_versions
            .iter()
            .find(|v| parse_major_minor(v).is_some_and(|q| q < machine_version))
        {
            return bad(format!(
                "tdx.qemu_versions has {v}, which predates machine type {}",
                self.machine
            ));
        }
        if self.shapes.is_empty() {
            return bad("tdx.shapes is empty: declare at least one launch shape".into());
        }
        for (i, s) in self.shapes.iter().enumerate() {
            if s.name.is_empty()
                || !s
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return bad(format!(
                    "shape name {:?} must be non-empty [a-z0-9-]",
                    s.name
                ));
            }
            if self.shapes[..i].iter().any(|o| o.name == s.name) {
                return bad(format!("shape {} is declared twice", s.name));
            }
            if s.memory_mib == 0 || s.cpus == 0 {
                return bad(format!(
                    "shape {}: memory_mib and cpus must be positive",
                    s.name
                ));
            }
            if s.gpus > 16 {
                return bad(format!("shape {}: at most 16 GPUs", s.name));
            }
            if s.gpus > 0 && s.pci_hole64_gib.is_none() {
                return bad(format!(
                    "shape {}: a shape with GPUs must set pci_hole64_gib (their BARs need a large 64-bit PCI hole)",
                    s.name
                ));
            }
            if let Some(o) = self.shapes[..i]
                .iter()
                .find(|o| (o.memory_mib, o.cpus, o.gpus) == (s.memory_mib, s.cpus, s.gpus))
            {
                return bad(format!(
                    "shapes {} and {} have the same memory, vCPUs and GPUs: a launch could not tell them apart",
                    o.name, s.name
                ));
            }
        }
        Ok(())
    }

    /// The shape called `name`.
    pub fn shape(&self, name: &str) -> Option<&LaunchShape> {
        self.shapes.iter().find(|s| s.name == name)
    }

    /// The shape with exactly these resources.
    pub fn matching(&self, memory_mib: u64, cpus: u32, gpus: u32) -> Option<&LaunchShape> {
        self.shapes
            .iter()
            .find(|s| s.memory_mib == memory_mib && s.cpus == cpus && s.gpus == gpus)
    }

    /// Whether a QEMU `(major, minor)` is one of the declared releases.
    pub fn allows_qemu(&self, major: u32, minor: u32) -> bool {
        self.qemu_versions
            .iter()
            .any(|v| parse_major_minor(v) == Some((major, minor)))
    }

    /// One line per shape, for error messages and `--help`.
    pub fn describe(&self) -> String {
        self.shapes
            .iter()
            .map(|s| {
                format!(
                    "{} ({} MiB, {} vCPU{}, {} GPU{})",
                    s.name,
                    s.memory_mib,
                    s.cpus,
                    if s.cpus == 1 { "" } else { "s" },
                    s.gpus,
                    if s.gpus == 1 { "" } else { "s" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `"10.1"` → `(10, 1)`.
pub fn parse_major_minor(v: &str) -> Option<(u32, u32)> {
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn launch() -> TdxLaunch {
        TdxLaunch {
            qemu_versions: vec!["10.1".into(), "10.2".into()],
            machine: "pc-q35-10.1".into(),
            shapes: vec![
                LaunchShape {
                    name: "cpu-1c-2g".into(),
                    memory_mib: 2048,
                    cpus: 1,
                    gpus: 0,
                    pci_hole64_gib: None,
                },
                LaunchShape {
                    name: "h100x1".into(),
                    memory_mib: 131072,
                    cpus: 16,
                    gpus: 1,
                    pci_hole64_gib: Some(512),
                },
            ],
        }
    }

    #[test]
    fn finds_shapes_by_name_and_resources() {
        let l = launch();
        l.validate().unwrap();
        assert_eq!(l.shape("h100x1").unwrap().gpus, 1);
        assert_eq!(l.matching(2048, 1, 0).unwrap().name, "cpu-1c-2g");
        assert!(l.matching(2048, 2, 0).is_none());
        assert!(l.allows_qemu(10, 1) && l.allows_qemu(10, 2));
        assert!(!l.allows_qemu(10, 0) && !l.allows_qemu(9, 2));
        assert_eq!(
            l.describe(),
            "cpu-1c-2g (2048 MiB, 1 vCPU, 0 GPUs), h100x1 (131072 MiB, 16 vCPUs, 1 GPU)"
        );
    }

    #[test]
    fn rejects_bad_declarations_naming_the_fix() {
        let mut l = launch();
        l.machine = "q35".into();
        assert!(l.validate().unwrap_err().0.contains("never the bare q35"));
        let mut l = launch();
        l.qemu_versions = vec!["10.0".into()];
        assert!(l.validate().unwrap_err().0.contains("predates"));
        let mut l = launch();
        l.shapes[1].pci_hole64_gib = None;
        assert!(l.validate().unwrap_err().0.contains("pci_hole64_gib"));
        let mut l = launch();
        l.shapes[1].name = "cpu-1c-2g".into();
        assert!(l.validate().unwrap_err().0.contains("declared twice"));
        let mut l = launch();
        l.shapes[1] = LaunchShape {
            name: "other".into(),
            ..l.shapes[0].clone()
        };
        assert!(l.validate().unwrap_err().0.contains("tell them apart"));
        let mut l = launch();
        l.qemu_versions = vec!["ten".into()];
        assert!(l.validate().unwrap_err().0.contains("MAJOR.MINOR"));
    }
}
