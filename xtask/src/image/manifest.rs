//! `out/<image>/manifest.json` (schema version 1, see ARCHITECTURE.md): the boot parts with their
//! hashes, launch defaults, the kernel release, the SBOM (= the lock) and build facts.

use serde::{Deserialize, Serialize};

use super::definition::Role;
use super::lock::LockedPackage;

pub const MANIFEST_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub image: ImageId,
    /// Sorted by path (byte order).
    pub files: Vec<FileEntry>,
    pub launch: Launch,
    pub kernel_release: String,
    pub inputs: Vec<Input>,
    pub build: BuildInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageId {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    /// firmware | kernel | initrd | cmdline
    pub role: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    pub memory_mib: u64,
    pub cpus: u32,
    pub cmdline: String,
    /// The TDX launch shapes and QEMU versions of `image/worker.yaml` (absent in manifests
    /// written before shapes existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tdx: Option<worker_api::shapes::TdxLaunch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    pub name: String,
    pub version: String,
    pub arch: String,
    pub suite: String,
    /// kernel | firmware | runtime (in the image) or build (in the build root only).
    pub role: Role,
    pub sha256: String,
    pub size: u64,
}

impl From<&LockedPackage> for Input {
    fn from(p: &LockedPackage) -> Self {
        Input {
            name: p.name.clone(),
            version: p.version.clone(),
            arch: p.arch.clone(),
            suite: p.suite.clone(),
            role: p.role,
            sha256: p.sha256.clone(),
            size: p.size,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    pub source_date_epoch: u64,
    /// `rustc -V` of the toolchain that built the agent.
    pub rustc: String,
    /// `commit-hash` of that rustc (`rustc -vV`).
    pub rustc_commit: String,
    /// The toolchain `rust-toolchain.toml` pins (the build refuses any other).
    pub rust_toolchain: String,
    pub agent_target: String,
    /// SHA-256 of the exact `image/worker.lock` bytes.
    pub lock_sha256: String,
    /// The C compiler of the build root (`cc --version`, first line): the agent is compiled
    /// and linked inside a root made only of the lock's `build` inputs.
    pub build_root_cc: String,
}

impl Manifest {
    /// Sort files by path and inputs by name so the text is canonical.
    pub fn normalize(&mut self) {
        self.files.sort_by(|a, b| a.path.cmp(&b.path));
        self.inputs
            .sort_by(|a, b| (&a.name, &a.suite, a.role).cmp(&(&b.name, &b.suite, b.role)));
    }

    /// Canonical pretty JSON with a final newline.
    pub fn to_text(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_manifest() {
        let mut m = Manifest {
            schema_version: MANIFEST_SCHEMA_VERSION,
            image: ImageId {
                name: "worker".into(),
                version: "0.1.0".into(),
            },
            files: vec![
                FileEntry {
                    path: "vmlinuz".into(),
                    role: "kernel".into(),
                    sha256: "22".repeat(32),
                    size: 2,
                },
                FileEntry {
                    path: "OVMF.fd".into(),
                    role: "firmware".into(),
                    sha256: "11".repeat(32),
                    size: 1,
                },
                FileEntry {
                    path: "initrd".into(),
                    role: "initrd".into(),
                    sha256: "33".repeat(32),
                    size: 3,
                },
                FileEntry {
                    path: "cmdline".into(),
                    role: "cmdline".into(),
                    sha256: "44".repeat(32),
                    size: 4,
                },
            ],
            launch: Launch {
                memory_mib: 2048,
                cpus: 1,
                cmdline: "console=ttyS0".into(),
                tdx: Some(worker_api::shapes::TdxLaunch {
                    qemu_versions: vec!["10.1".into()],
                    machine: "pc-q35-10.1".into(),
                    shapes: vec![worker_api::shapes::LaunchShape {
                        name: "cpu-1c-2g".into(),
                        memory_mib: 2048,
                        cpus: 1,
                        gpus: 0,
                        pci_hole64_gib: None,
                    }],
                }),
            },
            kernel_release: "6.12.95+deb12-amd64".into(),
            inputs: vec![Input {
                name: "ovmf".into(),
                version: "2025.02-8+deb13u1".into(),
                arch: "all".into(),
                suite: "trixie".into(),
                role: Role::Firmware,
                sha256: "55".repeat(32),
                size: 5,
            }],
            build: BuildInfo {
                source_date_epoch: 1_700_000_000,
                rustc: "rustc 1.95.0 (59807616e 2026-04-14)".into(),
                agent_target: "x86_64-unknown-linux-gnu".into(),
                rustc_commit: "59807616e1fa2540724bfbac14d7976d7e4a3860".into(),
                rust_toolchain: "1.95.0".into(),
                lock_sha256: "66".repeat(32),
                build_root_cc: "x86_64-linux-gnu-gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0".into(),
            },
        };
        m.normalize();
        expect_test::expect_file!["../../tests/golden/manifest.json"].assert_eq(&m.to_text());
        let back: Manifest = serde_json::from_str(&m.to_text()).expect("parse");
        assert_eq!(back, m);
    }

    #[test]
    fn readers_ignore_unknown_fields() {
        let mut v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/golden/manifest.json")).expect("json");
        v["future_field"] = serde_json::json!({"x": 1});
        v["files"][0]["extra"] = serde_json::json!(true);
        let m: Manifest = serde_json::from_value(v).expect("unknown fields are ignored");
        assert_eq!(m.files[0].path, "OVMF.fd");
    }
}
