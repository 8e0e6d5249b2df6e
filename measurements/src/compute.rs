//! One launch configuration in, the expected registers (with the events behind each) out.
//!
//! A register whose inputs are missing is left out and the reason is recorded in `missing`:
//! RTMR0 needs the ACPI tables, RTMR1 the kernel, RTMR2 the command line (and initrd, if any).

use crate::acpi::{AcpiBlobs, list_tables, synthesize};
use crate::kernel::{KernelInputs, QEMU_ACPI_DATA_SIZE, rtmr1_events, rtmr2_events};
use crate::rtmr0::{ExpectedEvent, FirmwareLayout, Rtmr0Inputs};
use crate::tdvf::{PageOrder, Tdvf};
use crate::{Error, Mr, Result, replay_digests};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Events of RTMR1 and RTMR2 (each absent when its inputs are).
type KernelEvents = (Option<Vec<ExpectedEvent>>, Option<Vec<ExpectedEvent>>);

/// Where RTMR0's ACPI blobs come from.
#[derive(Debug, Clone)]
pub enum AcpiSource {
    /// Only `etc/acpi/tables`: RSDP and loader are synthesized.
    Tables(Vec<u8>),
    /// All three blobs as captured.
    Blobs(AcpiBlobs),
}

impl AcpiSource {
    /// The three blobs (synthesizing where needed).
    pub fn blobs(&self) -> Result<AcpiBlobs> {
        match self {
            AcpiSource::Tables(t) => synthesize(t),
            AcpiSource::Blobs(b) => Ok(b.clone()),
        }
    }

    /// Read a capture folder: `tables` (required), `rsdp` and `table-loader` (optional; synthesized
    /// from `tables` when absent). The names are those under
    /// `/sys/firmware/qemu_fw_cfg/by_name/etc/` (`acpi/tables`, `acpi/rsdp`, `table-loader`); a
    /// flat folder with the three files is accepted too.
    pub fn from_dir(dir: &Path) -> Result<AcpiSource> {
        let find = |names: &[&str]| names.iter().map(|n| dir.join(n)).find(|p| p.is_file());
        let tables = find(&["tables", "acpi/tables", "etc/acpi/tables", "acpi-tables.bin"])
            .ok_or_else(|| {
                Error::Input(format!(
                    "{} has no ACPI tables file (expected `tables`): see measurements/README.md, \"Capturing ACPI\"",
                    dir.display()
                ))
            })?;
        let tables = crate::read_file(&tables)?;
        let rsdp = find(&["rsdp", "acpi/rsdp", "etc/acpi/rsdp"]);
        let loader = find(&["table-loader", "etc/table-loader"]);
        match (rsdp, loader) {
            (Some(r), Some(l)) => Ok(AcpiSource::Blobs(AcpiBlobs {
                loader: crate::read_file(&l)?,
                rsdp: crate::read_file(&r)?,
                tables,
            })),
            _ => Ok(AcpiSource::Tables(tables)),
        }
    }
}

/// Count the processors a MADT (APIC table) in the tables blob declares (local APIC and x2APIC
/// entries). `None` if there is no MADT.
pub fn madt_cpu_count(tables: &[u8]) -> Option<u32> {
    let list = list_tables(tables).ok()?;
    let t = list.iter().find(|t| t.signature == "APIC")?;
    let body = tables.get(t.offset as usize..(t.offset + t.length) as usize)?;
    let mut off = 44usize;
    let mut n = 0;
    while off + 2 <= body.len() {
        let ty = body[off];
        let len = usize::from(body[off + 1]);
        if len < 2 {
            break;
        }
        if ty == 0 || ty == 9 {
            n += 1;
        }
        off += len;
    }
    Some(n)
}

/// A launch configuration.
#[derive(Debug, Clone)]
pub struct LaunchInputs<'a> {
    /// OVMF.fd bytes.
    pub firmware: &'a [u8],
    /// RAM size in bytes.
    pub ram: u64,
    /// vCPU count.
    pub cpus: u32,
    /// ACPI blobs (RTMR0).
    pub acpi: Option<AcpiSource>,
    /// Kernel (RTMR1).
    pub kernel: Option<&'a [u8]>,
    /// Initrd (RTMR1 patch, RTMR2).
    pub initrd: Option<&'a [u8]>,
    /// Command line (RTMR2).
    pub cmdline: Option<&'a str>,
    /// MRTD page order.
    pub page_order: PageOrder,
    /// RTMR0 layout.
    pub layout: FirmwareLayout,
}

/// Computed registers. JSON: `mrtd`, `rtmr0..2` (absent when not computable), `missing`
/// (register -> why), `events` (register -> [{label, digest}]), and the options used.
#[derive(Debug, Clone, Serialize)]
pub struct Computed {
    /// MRTD in the chosen page order.
    pub mrtd: Mr,
    /// RTMR0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtmr0: Option<Mr>,
    /// RTMR1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtmr1: Option<Mr>,
    /// RTMR2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtmr2: Option<Mr>,
    /// Page order used for `mrtd`.
    pub page_order: PageOrder,
    /// Firmware event layout used for RTMR0.
    pub firmware_layout: FirmwareLayout,
    /// Registers left out and why.
    pub missing: BTreeMap<String, String>,
    /// The events behind each computed RTMR.
    pub events: BTreeMap<String, Vec<ExpectedEvent>>,
}

impl Computed {
    /// RTMR i (0..=2) if computed.
    pub fn rtmr(&self, i: usize) -> Option<Mr> {
        match i {
            0 => self.rtmr0,
            1 => self.rtmr1,
            2 => self.rtmr2,
            _ => None,
        }
    }
}

/// Compute every register the inputs allow.
pub fn compute(inp: &LaunchInputs<'_>) -> Result<Computed> {
    let tdvf = Tdvf::parse(inp.firmware)?;
    if inp.cpus == 0 {
        return Err(Error::Input("--cpus must be at least 1".into()));
    }
    let initrd = inp.initrd;
    // Hash the big parts in parallel: MRTD and RTMR0 here, kernel+initrd on another thread.
    let (mrtd, rtmr12) = std::thread::scope(|s| {
        let h = s.spawn(|| -> Result<KernelEvents> {
            let r1 = match inp.kernel {
                Some(k) => Some(rtmr1_events(&KernelInputs {
                    kernel: k,
                    initrd_size: initrd.map(|i| i.len() as u64).unwrap_or(0),
                    ram: inp.ram,
                    acpi_data_size: QEMU_ACPI_DATA_SIZE,
                })?),
                None => None,
            };
            let r2 = inp.cmdline.map(|c| rtmr2_events(c, initrd));
            Ok((r1, r2))
        });
        let mrtd = tdvf.mrtd(inp.page_order);
        let r12 = h
            .join()
            .unwrap_or_else(|_| Err(Error::Input("hashing thread failed".into())));
        (mrtd, r12)
    });
    let mrtd = mrtd?;
    let (r1, r2) = rtmr12?;
    let mut out = Computed {
        mrtd,
        rtmr0: None,
        rtmr1: None,
        rtmr2: None,
        page_order: inp.page_order,
        firmware_layout: inp.layout,
        missing: BTreeMap::new(),
        events: BTreeMap::new(),
    };
    match &inp.acpi {
        Some(src) => {
            let blobs = src.blobs()?;
            if let Some(n) = madt_cpu_count(&blobs.tables)
                && n != inp.cpus
            {
                return Err(Error::Input(format!(
                    "the ACPI tables describe {n} vCPUs but the launch uses {}: capture the tables for this configuration",
                    inp.cpus
                )));
            }
            let ev = crate::rtmr0::events(&Rtmr0Inputs {
                tdvf: &tdvf,
                ram: inp.ram,
                acpi: &blobs,
                layout: inp.layout,
            })?;
            out.rtmr0 = Some(replay_digests(ev.iter().map(|e| &e.digest)));
            out.events.insert("rtmr0".into(), ev);
        }
        None => {
            out.missing.insert(
                "rtmr0".into(),
                "no ACPI tables given (--acpi-tables or --acpi-dir): they depend on the host's QEMU \
                 version, vCPU count, RAM and devices; see measurements/README.md, \"Capturing ACPI\""
                    .into(),
            );
        }
    }
    match r1 {
        Some(ev) => {
            out.rtmr1 = Some(replay_digests(ev.iter().map(|e| &e.digest)));
            out.events.insert("rtmr1".into(), ev);
        }
        None => {
            out.missing
                .insert("rtmr1".into(), "no kernel given (--kernel)".into());
        }
    }
    match r2 {
        Some(ev) => {
            out.rtmr2 = Some(replay_digests(ev.iter().map(|e| &e.digest)));
            out.events.insert("rtmr2".into(), ev);
        }
        None => {
            out.missing
                .insert("rtmr2".into(), "no command line given (--cmdline)".into());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;

    #[test]
    fn debian_ovmf_with_fixture_acpi() {
        let (Some(fw), Some(t)) = (
            fixture("firmware/debian-ovmf-2025.02-8+deb13u1-OVMF.fd"),
            fixture("acpi/qemu-tdx-1cpu-1g.acpi-tables.bin"),
        ) else {
            return;
        };
        assert_eq!(madt_cpu_count(&t), Some(1));
        let base = LaunchInputs {
            firmware: &fw,
            ram: 1 << 30,
            cpus: 1,
            acpi: Some(AcpiSource::Tables(t.clone())),
            kernel: None,
            initrd: None,
            cmdline: Some("console=ttyS0"),
            page_order: PageOrder::SinglePass,
            layout: FirmwareLayout::Edk2Stable202502,
        };
        let c = compute(&base).expect("compute");
        assert!(c.rtmr0.is_some());
        assert!(c.rtmr1.is_none());
        assert!(c.missing.contains_key("rtmr1"));
        assert_eq!(c.events["rtmr0"].len(), 13);
        assert_eq!(c.events["rtmr2"].len(), 1);
        let j = serde_json::to_value(&c).expect("json");
        assert!(j.get("rtmr1").is_none());
        assert_eq!(j["mrtd"].as_str().map(|s| s.len()), Some(96));
        // Wrong vCPU count is caught.
        let wrong = LaunchInputs { cpus: 2, ..base };
        assert!(compute(&wrong).is_err());
    }
}
