//! Measure an xtask-built image directory (`out/<image>/`, manifest schema 1): the registers for
//! the launch configuration in its manifest and both image hashes. This is the library form of
//! `measurements image --json`; xtask writes its output as `measurements.json`.
//!
//! Boot parts read: `OVMF.fd`, `vmlinuz`, `initrd`, `cmdline` (exact bytes, no trailing newline).
//! RTMR0 needs the ACPI tables of the launch: `Options::acpi` or an `acpi/` folder in the image
//! directory (see [`crate::compute::AcpiSource::from_dir`]); without them RTMR0 and both image
//! hashes are left out and `missing` says so.

use crate::compute::{AcpiSource, Computed, LaunchInputs, compute};
use crate::image_hash::{TD_ATTR_SEPT_VE_DISABLE, TdIdentity, cocoon_v1, cw_v1};
use crate::rtmr0::{ExpectedEvent, FirmwareLayout};
use crate::rtmr3::{Event, RuntimeInputs, rtmr3_events};
use crate::tdvf::{PageOrder, Tdvf};
use crate::{Error, Mr, Result, read_file, replay_digests};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// XFAM QEMU gives a TD with `-cpu host` on Sapphire/Emerald Rapids (x87, SSE, AVX, AVX-512, PKRU,
/// AMX): 0x602e7. It depends on the host CPU; override it for other hosts.
pub const DEFAULT_XFAM: u64 = 0x602e7;

/// Options of [`measure_image_dir`].
#[derive(Debug, Clone)]
pub struct Options {
    /// ACPI blobs of the launch (overrides `<dir>/acpi/`).
    pub acpi: Option<AcpiSource>,
    /// The capture folder to read instead of `<dir>/acpi/` (its `shapes/<name>/` included),
    /// e.g. a release's `acpi/` next to a rebuilt image.
    pub acpi_dir: Option<std::path::PathBuf>,
    /// MRTD page order for `mrtd` (both are always reported in `mrtd_by_page_order`).
    pub page_order: PageOrder,
    /// Firmware event layout.
    pub layout: FirmwareLayout,
    /// Runtime inputs for RTMR3; `None`: RTMR3 is taken as zero (before the agent runs).
    pub runtime: Option<RuntimeInputs>,
    /// TD_ATTRIBUTES the launch uses.
    pub td_attributes: u64,
    /// XFAM the launch uses.
    pub xfam: u64,
    /// Override the manifest's RAM (bytes).
    pub memory: Option<u64>,
    /// Override the manifest's vCPU count.
    pub cpus: Option<u32>,
    /// Measure this declared TDX launch shape (manifest `launch.tdx.shapes`): its memory and
    /// vCPUs (unless `memory`/`cpus` are given) and its tables from
    /// `<dir>/acpi/shapes/<name>/` (unless `acpi` is given).
    pub shape: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            acpi: None,
            acpi_dir: None,
            page_order: PageOrder::SinglePass,
            layout: FirmwareLayout::default(),
            runtime: None,
            td_attributes: TD_ATTR_SEPT_VE_DISABLE,
            xfam: DEFAULT_XFAM,
            memory: None,
            cpus: None,
            shape: None,
        }
    }
}

/// Sub-folder of `<image>/acpi/` with one capture folder per TDX launch shape.
pub const SHAPES_DIR: &str = "shapes";

/// The parts of manifest.json this crate reads (unknown fields are ignored).
#[derive(Debug, Clone, Deserialize)]
struct Manifest {
    schema_version: u32,
    image: ImageId,
    launch: ManifestLaunch,
}

/// The manifest's `launch`: defaults and the declared TDX shapes.
#[derive(Debug, Clone, Deserialize)]
struct ManifestLaunch {
    memory_mib: u64,
    cpus: u32,
    #[serde(default)]
    cmdline: String,
    #[serde(default)]
    tdx: Option<ManifestTdx>,
}

/// The manifest's `launch.tdx` (only the shapes are read here).
#[derive(Debug, Clone, Deserialize)]
struct ManifestTdx {
    #[serde(default)]
    shapes: Vec<ShapeDecl>,
}

/// A declared TDX launch shape, as `measurements` needs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShapeDecl {
    /// Name.
    pub name: String,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub cpus: u32,
    /// GPUs.
    #[serde(default)]
    pub gpus: u32,
    /// `pci-hole64-size` in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_hole64_gib: Option<u64>,
}

/// The registers and image hashes of one TDX launch shape (`measurements.json` `shapes`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShapeMeasurement {
    /// RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub cpus: u32,
    /// GPUs.
    pub gpus: u32,
    /// `pci-hole64-size` in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_hole64_gib: Option<u64>,
    /// RTMR0 (absent without this shape's tables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtmr0: Option<Mr>,
    /// RTMR1 (the kernel digest can depend on RAM below 2816 MiB; absent when the shape could
    /// not be measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtmr1: Option<Mr>,
    /// RTMR2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtmr2: Option<Mr>,
    /// `cocoon-v1` image hash (needs RTMR0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_hash_cocoon_v1: Option<String>,
    /// `cw-v1` image hash (needs RTMR0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_hash_cw_v1: Option<String>,
    /// SHA-384 of the shape's three ACPI blobs (what the RTMR0 "ACPI DATA" events carry):
    /// `tables`, `rsdp`, `table-loader`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub acpi_sha384: BTreeMap<String, String>,
    /// Why RTMR0 and the hashes are absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<String>,
}

/// Image name and version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageId {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
}

/// The launch configuration measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Launch {
    /// RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

/// Everything `measurements image --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ImageMeasurements {
    /// Output format version.
    pub schema_version: u32,
    /// Image name/version from the manifest.
    pub image: ImageId,
    /// The launch configuration measured.
    pub launch: Launch,
    /// Firmware event layout.
    pub firmware_layout: FirmwareLayout,
    /// Page order of `mrtd`.
    pub page_order: PageOrder,
    /// MRTD.
    pub mrtd: Mr,
    /// MRTD in both page orders.
    pub mrtd_by_page_order: BTreeMap<String, Mr>,
    /// RTMR0 (absent without ACPI tables).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtmr0: Option<Mr>,
    /// RTMR1.
    pub rtmr1: Mr,
    /// RTMR2.
    pub rtmr2: Mr,
    /// RTMR3 (zero, or replayed from the runtime inputs).
    pub rtmr3: Mr,
    /// What RTMR3 is based on.
    pub rtmr3_basis: String,
    /// MRCONFIGID, MROWNER, MROWNERCONFIG (zero: QEMU's default).
    pub mrconfigid: Mr,
    /// MROWNER.
    pub mrowner: Mr,
    /// MROWNERCONFIG.
    pub mrownerconfig: Mr,
    /// TD_ATTRIBUTES as 0x-hex u64.
    pub td_attributes: String,
    /// XFAM as 0x-hex u64.
    pub xfam: String,
    /// `cocoon-v1` image hash (needs RTMR0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_hash_cocoon_v1: Option<String>,
    /// `cw-v1` image hash (needs RTMR0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_hash_cw_v1: Option<String>,
    /// Whether the kernel digest (RTMR1) is independent of the exact RAM size.
    pub kernel_hash_ram_independent: bool,
    /// Values left out and why.
    pub missing: BTreeMap<String, String>,
    /// Events behind RTMR0..2.
    pub events: BTreeMap<String, Vec<ExpectedEvent>>,
    /// RTMR3 events (empty without runtime inputs).
    pub rtmr3_events: Vec<Event>,
    /// The TDX launch shape measured (with [`Options::shape`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape: Option<String>,
    /// Every declared TDX launch shape (measuring the manifest's launch without
    /// [`Options::shape`], [`Options::acpi`], `memory` or `cpus`): its registers and image
    /// hashes from `acpi/shapes/<name>/`. This is what `publish image-hash` publishes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub shapes: BTreeMap<String, ShapeMeasurement>,
}

impl ImageMeasurements {
    /// The expected registers in the form [`crate::diff::compare`] takes.
    pub fn to_computed(&self) -> Computed {
        Computed {
            mrtd: self.mrtd,
            rtmr0: self.rtmr0,
            rtmr1: Some(self.rtmr1),
            rtmr2: Some(self.rtmr2),
            page_order: self.page_order,
            firmware_layout: self.firmware_layout,
            missing: self.missing.clone(),
            events: self.events.clone(),
        }
    }
}

/// Checks the blobs of a capture folder against its `capture.json` (size and SHA-384 of each
/// file, as `host-launcher capture-acpi` writes them), when there is one: a blob changed after
/// the capture would give an RTMR0 nobody captured.
pub fn verify_capture_record(acpi_dir: &Path) -> Result<()> {
    let rec_path = acpi_dir.join("capture.json");
    if !rec_path.is_file() {
        return Ok(());
    }
    let recapture = "capture it again with `cargo xtask image capture-acpi`";
    let rec: serde_json::Value =
        serde_json::from_slice(&read_file(&rec_path)?).map_err(|e| Error::Malformed {
            what: "capture.json",
            reason: format!("{e} (in {}); {recapture}", rec_path.display()),
        })?;
    let files = rec
        .get("files")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    for f in files {
        let (Some(name), Some(size), Some(sha)) = (
            f.get("file").and_then(serde_json::Value::as_str),
            f.get("size").and_then(serde_json::Value::as_u64),
            f.get("sha384").and_then(serde_json::Value::as_str),
        ) else {
            return Err(Error::Malformed {
                what: "capture.json",
                reason: format!(
                    "an entry of `files` lacks file, size or sha384 (in {}); {recapture}",
                    rec_path.display()
                ),
            });
        };
        if name.contains('/') || name.contains("..") {
            return Err(Error::Malformed {
                what: "capture.json",
                reason: format!("file name {name:?} is not a plain name"),
            });
        }
        let p = acpi_dir.join(name);
        let data = read_file(&p)?;
        let actual = crate::sha384(&data).to_string();
        if data.len() as u64 != size || !actual.eq_ignore_ascii_case(sha) {
            return Err(Error::Input(format!(
                "{} ({} bytes, sha384 {actual}) is not what {} recorded ({size} bytes, sha384 \
                 {sha}): the blob was changed after the capture; {recapture}",
                p.display(),
                data.len(),
                rec_path.display()
            )));
        }
    }
    Ok(())
}

/// Measure the image in `dir` for the launch in its manifest.
pub fn measure_image_dir(dir: &Path, opts: &Options) -> Result<ImageMeasurements> {
    let manifest_path = dir.join("manifest.json");
    let m: Manifest =
        serde_json::from_slice(&read_file(&manifest_path)?).map_err(|e| Error::Malformed {
            what: "manifest.json",
            reason: format!("{e} (in {})", manifest_path.display()),
        })?;
    if m.schema_version != 1 {
        return Err(Error::Unsupported {
            what: "manifest.json",
            reason: format!("schema_version {}; this tool reads 1", m.schema_version),
        });
    }
    let need = |name: &str| -> Result<Vec<u8>> {
        let p = dir.join(name);
        if !p.is_file() {
            return Err(Error::Input(format!(
                "{} is missing: the image directory must hold OVMF.fd, vmlinuz, initrd and cmdline \
                 (build it with `cargo xtask image build`)",
                p.display()
            )));
        }
        read_file(&p)
    };
    let firmware = need("OVMF.fd")?;
    let kernel = need("vmlinuz")?;
    let initrd = need("initrd")?;
    let cmdline_bytes = need("cmdline")?;
    let cmdline = String::from_utf8(cmdline_bytes).map_err(|_| Error::Malformed {
        what: "cmdline file",
        reason: "not UTF-8".into(),
    })?;
    if !m.launch.cmdline.is_empty() && m.launch.cmdline != cmdline {
        return Err(Error::Input(format!(
            "manifest launch.cmdline {:?} differs from the cmdline file {:?}: rebuild the image",
            m.launch.cmdline, cmdline
        )));
    }
    let declared: Vec<ShapeDecl> = m
        .launch
        .tdx
        .as_ref()
        .map(|t| t.shapes.clone())
        .unwrap_or_default();
    let shape = match &opts.shape {
        None => None,
        Some(name) => Some(
            declared
                .iter()
                .find(|s| &s.name == name)
                .cloned()
                .ok_or_else(|| {
                    Error::Input(format!(
                        "the image declares no TDX launch shape {name:?} (declared: {}): pick                          one of those",
                        declared
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?,
        ),
    };
    let ram = opts
        .memory
        .unwrap_or(shape.as_ref().map_or(m.launch.memory_mib, |s| s.memory_mib) << 20);
    let cpus = opts
        .cpus
        .unwrap_or(shape.as_ref().map_or(m.launch.cpus, |s| s.cpus));
    let launch = Launch {
        memory_mib: ram >> 20,
        cpus,
        cmdline: cmdline.clone(),
    };
    let acpi_root = opts.acpi_dir.clone().unwrap_or_else(|| dir.join("acpi"));
    let acpi_dir = match &shape {
        Some(s) => acpi_root.join(SHAPES_DIR).join(&s.name),
        None => acpi_root.clone(),
    };
    let acpi = match &opts.acpi {
        Some(a) => Some(a.clone()),
        // A folder with only `shapes/` (no capture of its own) is no capture.
        None if acpi_dir.is_dir()
            && [
                "tables",
                "acpi/tables",
                "etc/acpi/tables",
                "acpi-tables.bin",
            ]
            .iter()
            .any(|f| acpi_dir.join(f).is_file()) =>
        {
            verify_capture_record(&acpi_dir)?;
            Some(AcpiSource::from_dir(&acpi_dir)?)
        }
        None => None,
    };
    let inputs = LaunchInputs {
        firmware: &firmware,
        ram,
        cpus,
        acpi,
        kernel: Some(&kernel),
        initrd: Some(&initrd),
        cmdline: Some(&cmdline),
        page_order: opts.page_order,
        layout: opts.layout,
    };
    let c = compute(&inputs)?;
    let other = match opts.page_order {
        PageOrder::SinglePass => PageOrder::TwoPass,
        PageOrder::TwoPass => PageOrder::SinglePass,
    };
    let other_mrtd = Tdvf::parse(&firmware)?.mrtd(other)?;
    let name = |o: PageOrder| match o {
        PageOrder::SinglePass => "single-pass".to_string(),
        PageOrder::TwoPass => "two-pass".to_string(),
    };
    let mrtd_by_page_order =
        BTreeMap::from([(name(opts.page_order), c.mrtd), (name(other), other_mrtd)]);
    let (rtmr3, rtmr3_basis, rtmr3_ev) = match &opts.runtime {
        Some(r) => {
            let ev = rtmr3_events(r);
            (
                replay_digests(ev.iter().map(|e| &e.digest)),
                "runtime inputs (host config) replayed".to_string(),
                ev,
            )
        }
        None => (
            Mr::ZERO,
            "zero: no runtime inputs given (pass --host-config to include the agent's events)"
                .to_string(),
            Vec::new(),
        ),
    };
    let mut missing = c.missing.clone();
    let (rtmr1, rtmr2) = match (c.rtmr1, c.rtmr2) {
        (Some(a), Some(b)) => (a, b),
        _ => return Err(Error::Input("kernel or cmdline not measured".into())),
    };
    let hashes = c.rtmr0.map(|r0| {
        let id = TdIdentity {
            mrtd: c.mrtd,
            mrconfigid: Mr::ZERO,
            mrowner: Mr::ZERO,
            mrownerconfig: Mr::ZERO,
            rtmr: [r0, rtmr1, rtmr2, rtmr3],
            td_attributes: opts.td_attributes,
            xfam: opts.xfam,
        };
        (hex::encode(cocoon_v1(&id)), hex::encode(cw_v1(&id)))
    });
    if hashes.is_none() {
        missing.insert(
            "image_hashes".into(),
            match &shape {
                // No host path here: measurements.json must be the same in every build directory.
                Some(s) => format!(
                    "both image hashes cover RTMR0, which needs shape {0}'s ACPI tables in \
                     <image>/acpi/{SHAPES_DIR}/{0}/ (`cargo xtask image capture-acpi` captures \
                     every shape)",
                    s.name
                ),
                None => "both image hashes cover RTMR0, which needs the ACPI tables \
                         (--acpi-tables or <image>/acpi/)"
                    .into(),
            },
        );
    }
    let plain =
        opts.shape.is_none() && opts.acpi.is_none() && opts.memory.is_none() && opts.cpus.is_none();
    let mut shapes = BTreeMap::new();
    if plain {
        for decl in &declared {
            // A shape whose capture is unusable (e.g. tables for another vCPU count) is
            // reported as such; the other shapes are still measured.
            let one = measure_image_dir(
                dir,
                &Options {
                    shape: Some(decl.name.clone()),
                    ..opts.clone()
                },
            );
            let shape_dir = acpi_root.join(SHAPES_DIR).join(&decl.name);
            let acpi_sha384 = [
                ("tables", "tables"),
                ("rsdp", "rsdp"),
                ("table-loader", "table-loader"),
            ]
            .iter()
            .filter_map(|(key, file)| {
                let p = shape_dir.join(file);
                p.is_file()
                    .then(|| read_file(&p).ok())
                    .flatten()
                    .map(|b| ((*key).to_owned(), crate::sha384(&b).to_string()))
            })
            .collect();
            let base = ShapeMeasurement {
                memory_mib: decl.memory_mib,
                cpus: decl.cpus,
                gpus: decl.gpus,
                pci_hole64_gib: decl.pci_hole64_gib,
                rtmr0: None,
                rtmr1: None,
                rtmr2: None,
                image_hash_cocoon_v1: None,
                image_hash_cw_v1: None,
                acpi_sha384,
                missing: None,
            };
            let sm = match one {
                Ok(one) => ShapeMeasurement {
                    rtmr0: one.rtmr0,
                    rtmr1: Some(one.rtmr1),
                    rtmr2: Some(one.rtmr2),
                    image_hash_cocoon_v1: one.image_hash_cocoon_v1,
                    image_hash_cw_v1: one.image_hash_cw_v1,
                    missing: one.missing.get("image_hashes").cloned(),
                    ..base
                },
                Err(e) => ShapeMeasurement {
                    missing: Some(format!(
                        "shape {} cannot be measured: {e} (capture it again with `cargo xtask \
                         image capture-acpi`)",
                        decl.name
                    )),
                    ..base
                },
            };
            shapes.insert(decl.name.clone(), sm);
        }
    }
    Ok(ImageMeasurements {
        schema_version: 1,
        image: m.image,
        launch,
        firmware_layout: opts.layout,
        page_order: opts.page_order,
        mrtd: c.mrtd,
        mrtd_by_page_order,
        rtmr0: c.rtmr0,
        rtmr1,
        rtmr2,
        rtmr3,
        rtmr3_basis,
        mrconfigid: Mr::ZERO,
        mrowner: Mr::ZERO,
        mrownerconfig: Mr::ZERO,
        td_attributes: format!("{:#018x}", opts.td_attributes),
        xfam: format!("{:#018x}", opts.xfam),
        image_hash_cocoon_v1: hashes.as_ref().map(|h| h.0.clone()),
        image_hash_cw_v1: hashes.map(|h| h.1),
        kernel_hash_ram_independent: crate::kernel::kernel_hash_is_ram_independent(ram),
        missing,
        events: c.events,
        rtmr3_events: rtmr3_ev,
        shape: shape.map(|s| s.name),
        shapes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;

    /// A fake but structurally valid image dir: the Debian OVMF, a tiny PE "kernel".
    #[test]
    fn measures_an_image_dir() {
        let (Some(fw), Some(acpi)) = (
            fixture("firmware/debian-ovmf-2025.02-8+deb13u1-OVMF.fd"),
            fixture("acpi/qemu-tdx-1cpu-1g.acpi-tables.bin"),
        ) else {
            return;
        };
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        std::fs::write(d.join("OVMF.fd"), &fw).expect("w");
        std::fs::write(d.join("vmlinuz"), crate::kernel::tests_support::tiny_pe()).expect("w");
        std::fs::write(d.join("initrd"), b"initrd bytes").expect("w");
        std::fs::write(d.join("cmdline"), b"console=ttyS0").expect("w");
        std::fs::write(
            d.join("manifest.json"),
            br#"{"schema_version":1,"image":{"name":"worker","version":"0.1.0"},"files":[],
                "launch":{"memory_mib":1024,"cpus":1,"cmdline":"console=ttyS0"},"future":1}"#,
        )
        .expect("w");
        let no_acpi = measure_image_dir(d, &Options::default()).expect("measure");
        assert!(no_acpi.rtmr0.is_none());
        assert!(no_acpi.image_hash_cocoon_v1.is_none());
        assert!(no_acpi.missing.contains_key("rtmr0"));
        std::fs::create_dir(d.join("acpi")).expect("mkdir");
        std::fs::write(d.join("acpi/tables"), &acpi).expect("w");
        let full = measure_image_dir(d, &Options::default()).expect("measure");
        assert!(full.rtmr0.is_some());
        assert_eq!(full.image_hash_cw_v1.as_ref().map(|s| s.len()), Some(64));
        assert_eq!(full.mrtd_by_page_order.len(), 2);
        assert_eq!(full.rtmr3, Mr::ZERO);
        let with_rt = measure_image_dir(
            d,
            &Options {
                runtime: Some(RuntimeInputs::from_host_config(b"{}").expect("rt")),
                ..Options::default()
            },
        )
        .expect("measure");
        assert_ne!(with_rt.rtmr3, Mr::ZERO);
        assert_eq!(with_rt.image_hash_cw_v1, full.image_hash_cw_v1);
        assert_ne!(with_rt.image_hash_cocoon_v1, full.image_hash_cocoon_v1);
        // Declared TDX shapes: each measured from acpi/shapes/<name>/, or said missing.
        std::fs::write(
            d.join("manifest.json"),
            br#"{"schema_version":1,"image":{"name":"worker","version":"0.1.0"},"files":[],
                "launch":{"memory_mib":1024,"cpus":1,"cmdline":"console=ttyS0","tdx":{
                "machine":"pc-q35-10.0","qemu_versions":["10.1"],"shapes":[
                {"name":"one","memory_mib":1024,"cpus":1},
                {"name":"big","memory_mib":131072,"cpus":16,"gpus":1,"pci_hole64_gib":1024}]}}}"#,
        )
        .expect("w");
        std::fs::create_dir_all(d.join("acpi/shapes/one")).expect("mkdir");
        std::fs::write(d.join("acpi/shapes/one/tables"), &acpi).expect("w");
        let shaped = measure_image_dir(d, &Options::default()).expect("measure");
        assert_eq!(shaped.shapes.len(), 2);
        let one = &shaped.shapes["one"];
        assert_eq!(
            one.image_hash_cw_v1, full.image_hash_cw_v1,
            "same tables, same launch"
        );
        assert_eq!(one.acpi_sha384["tables"], crate::sha384(&acpi).to_string());
        let big = &shaped.shapes["big"];
        assert!(big.image_hash_cw_v1.is_none() && big.rtmr0.is_none());
        assert!(
            big.missing.as_deref().unwrap_or("").contains("shape big"),
            "{big:?}"
        );
        assert_eq!((big.memory_mib, big.cpus, big.gpus), (131072, 16, 1));
        // No host path in the output: the same image elsewhere measures to the same JSON.
        let elsewhere = tempfile::tempdir().expect("tmp");
        let e = elsewhere.path().join("other-place");
        for sub in ["", "acpi", "acpi/shapes", "acpi/shapes/one"] {
            std::fs::create_dir_all(e.join(sub)).expect("mkdir");
            for f in std::fs::read_dir(d.join(sub)).expect("ls") {
                let f = f.expect("entry");
                if f.file_type().expect("type").is_file() {
                    std::fs::copy(f.path(), e.join(sub).join(f.file_name())).expect("cp");
                }
            }
        }
        let there = measure_image_dir(&e, &Options::default()).expect("measure");
        assert_eq!(
            serde_json::to_string(&there).expect("json"),
            serde_json::to_string(&shaped).expect("json")
        );
        let only = measure_image_dir(
            d,
            &Options {
                shape: Some("one".into()),
                ..Options::default()
            },
        )
        .expect("measure");
        assert_eq!(only.shape.as_deref(), Some("one"));
        assert!(only.shapes.is_empty());
        assert_eq!(only.image_hash_cw_v1, one.image_hash_cw_v1);
        let e = measure_image_dir(
            d,
            &Options {
                shape: Some("nope".into()),
                ..Options::default()
            },
        )
        .expect_err("unknown shape");
        assert!(e.to_string().contains("one, big"), "{e}");
        // A blob that does not match its capture.json is refused, naming the fix.
        std::fs::write(
            d.join("acpi/shapes/one/capture.json"),
            format!(
                r#"{{"files":[{{"file":"tables","size":{},"sha384":"{}"}}]}}"#,
                acpi.len(),
                crate::sha384(b"other").to_hex()
            ),
        )
        .expect("w");
        let one_only = Options {
            shape: Some("one".into()),
            ..Options::default()
        };
        let e = measure_image_dir(d, &one_only).expect_err("checksum");
        assert!(e.to_string().contains("changed after the capture"), "{e}");
        std::fs::write(
            d.join("acpi/shapes/one/capture.json"),
            format!(
                r#"{{"files":[{{"file":"tables","size":{},"sha384":"{}"}}]}}"#,
                acpi.len(),
                crate::sha384(&acpi).to_hex()
            ),
        )
        .expect("w");
        assert!(measure_image_dir(d, &one_only).is_ok());
        // Missing part: a clear error.
        std::fs::remove_file(d.join("initrd")).expect("rm");
        let e = measure_image_dir(d, &Options::default()).expect_err("missing initrd");
        assert!(e.to_string().contains("initrd is missing"), "{e}");
    }
}
