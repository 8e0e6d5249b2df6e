//! Why a real TD's RTMR0 is not its launch shape's: the first-boot diagnosis of `run --tee tdx`.
//!
//! RTMR0 covers the ACPI blobs QEMU built for the launch. If a TD reports an RTMR0 other than
//! the one computed for its shape (the host's QEMU builds other tables than the capture did),
//! its image hash is on no allow-list and verification fails. Instead of only failing, the
//! launcher then asks the agent — through a client that verifies the quote and the host config
//! but not the image hash — for the TD's firmware event log (`GET /attestation/ccel`) and the
//! tables the guest sees (`GET /firmware/acpi`), and explains:
//!
//! - which RTMR0 event differs first (replay of the log against the shape's expected events:
//!   `acpi_table_loader`, `acpi_rsdp`, `acpi_tables`, or a firmware event before them);
//! - for each of the three blobs, whether it equals the shape's capture, and for the tables
//!   which ACPI tables differ and in which fields ([`measurements::acpi_diff`]);
//! - where the TD's actual blobs were written (`<run dir>/actual-acpi/`, with `capture.json`)
//!   for the team to review and, if right, to publish as a new capture.
//!
//! [`explain`] is pure (tested with a real TD's event log and tables from the fixtures);
//! [`Rtmr0Diag::run`] does the I/O. Untested against a real TDX host (none available here).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use measurements::Mr;
use measurements::compute::Computed;
use measurements::image::ImageMeasurements;

use crate::capture::Blobs;

/// Everything the diagnosis needs, prepared before the boot.
#[derive(Debug, Clone)]
pub struct Rtmr0Diag {
    /// Verifies the quote and host config, not the image hash (so it can talk to the TD whose
    /// image hash is the problem).
    pub client: attestation::RaTlsHttpClient,
    /// The shape's expected measurements (RTMR0 and its events).
    pub expected: ImageMeasurements,
    /// The shape's name.
    pub shape: String,
    /// The shape's captured blobs (`acpi/shapes/<name>/`).
    pub acpi_dir: PathBuf,
    /// Where the TD's actual blobs go (`<run dir>/actual-acpi/`).
    pub out_dir: PathBuf,
}

/// Reads the three blobs of a capture folder, if all are there.
pub fn read_blobs(dir: &Path) -> Option<Blobs> {
    Some(Blobs {
        tables: std::fs::read(dir.join(crate::capture::TABLES_FILE)).ok()?,
        rsdp: std::fs::read(dir.join(crate::capture::RSDP_FILE)).ok()?,
        loader: std::fs::read(dir.join(crate::capture::LOADER_FILE)).ok()?,
    })
}

/// Explains an RTMR0 mismatch from what could be fetched: the TD's event log (`log`, the
/// CCEL's TCG2 log) and the tables the guest sees (`actual`), against the shape's `expected`
/// measurements and captured blobs. Returns one line per finding.
pub fn explain(
    shape: &str,
    expected: &Computed,
    expected_blobs: Option<&Blobs>,
    actual_rtmr0: Mr,
    log: Option<&[u8]>,
    actual: Option<&Blobs>,
) -> Vec<String> {
    let mut out = Vec::new();
    match expected.rtmr0 {
        Some(want) if want == actual_rtmr0 => {
            out.push(format!("RTMR0 matches shape {shape}'s ({want})"));
            return out;
        }
        Some(want) => out.push(format!(
            "RTMR0 of the TD is {actual_rtmr0}, shape {shape}'s is {want}"
        )),
        None => out.push(format!(
            "RTMR0 of the TD is {actual_rtmr0}; shape {shape}'s is not computed (no capture)"
        )),
    }
    match log.map(measurements::eventlog::replay) {
        None => out.push("no event log from the TD (GET /attestation/ccel failed)".into()),
        Some(Err(e)) => out.push(format!("the TD's event log does not parse: {e}")),
        Some(Ok(replay)) => {
            if replay.rtmr[0] != actual_rtmr0 {
                out.push(format!(
                    "the event log replays RTMR0 to {}, not the quote's {actual_rtmr0}: the log \
                     is not this TD's, or it is incomplete",
                    replay.rtmr[0]
                ));
            }
            let report = measurements::diff::compare(expected, None, Some(&replay));
            out.extend(
                report
                    .findings
                    .into_iter()
                    .filter(|f| f.register == "RTMR0")
                    .map(|f| f.message),
            );
        }
    }
    if let (Some(want), Some(got)) = (expected_blobs, actual) {
        for (name, w, g) in [
            ("etc/table-loader", &want.loader, &got.loader),
            ("etc/acpi/rsdp", &want.rsdp, &got.rsdp),
            ("etc/acpi/tables", &want.tables, &got.tables),
        ] {
            if w == g {
                out.push(format!("{name}: identical to shape {shape}'s capture"));
            } else {
                out.push(format!(
                    "{name}: DIFFERS from shape {shape}'s capture ({} vs {} bytes, sha384 {} vs {})",
                    g.len(),
                    w.len(),
                    measurements::sha384(g),
                    measurements::sha384(w)
                ));
            }
        }
        if want.tables != got.tables {
            match measurements::acpi_diff::diff(&want.tables, &got.tables) {
                Ok(d) => {
                    for t in d.tables.iter().filter(|t| t.status != "identical") {
                        let mut line = format!(
                            "  table {}: {} (capture {} bytes, TD {} bytes)",
                            t.signature,
                            t.status
                                .replace("only_in_a", "only in the capture")
                                .replace("only_in_b", "only in the TD"),
                            t.length_a.map_or("-".into(), |l| l.to_string()),
                            t.length_b.map_or("-".into(), |l| l.to_string())
                        );
                        for n in &t.notes {
                            line.push_str(&format!("; {n}"));
                        }
                        out.push(line);
                    }
                }
                Err(e) => out.push(format!("  the TD's tables do not parse: {e}")),
            }
        }
    } else if actual.is_none() {
        out.push("no ACPI blobs from the TD (GET /firmware/acpi failed)".into());
    }
    out
}

impl Rtmr0Diag {
    /// Fetches the TD's RTMR0, event log and tables and explains the difference. Never fails:
    /// what cannot be fetched is said in the lines.
    pub fn run(&self, port: u16) -> Vec<String> {
        let base = crate::attest::base_url(port);
        let rtmr0 = match self.client.attest(&base, Duration::from_secs(60)) {
            Ok(a) => a
                .verdict
                .registers
                .as_ref()
                .and_then(|r| Mr::from_hex(&r.rtmr0).ok()),
            Err(e) => match e.verdict().and_then(|v| v.registers.as_ref()) {
                Some(r) => Mr::from_hex(&r.rtmr0).ok(),
                None => {
                    return vec![format!(
                        "RTMR0 diagnosis: cannot get the TD's quote even without the image-hash \
                         check: {e}"
                    )];
                }
            },
        };
        let Some(rtmr0) = rtmr0 else {
            return vec!["RTMR0 diagnosis: the quote carries no readable RTMR0".into()];
        };
        if self.expected.rtmr0 == Some(rtmr0) {
            return Vec::new();
        }
        let log = self.fetch_log(&base).map_err(|e| format!("{e:#}"));
        let actual = crate::capture::fetch(&self.client, port).map_err(|e| format!("{e:#}"));
        let mut lines = explain(
            &self.shape,
            &self.expected.to_computed(),
            read_blobs(&self.acpi_dir).as_ref(),
            rtmr0,
            log.as_deref().ok(),
            actual.as_ref().ok(),
        );
        if let Err(e) = &log {
            lines.push(format!("  (event log: {e})"));
        }
        match &actual {
            Ok(b) => match self.write_actual(b) {
                Ok(()) => lines.push(format!(
                    "the TD's ACPI blobs are in {} for the team to review (`measurements \
                     acpi-diff {}/tables {}/tables`); if the host's QEMU is right, capture that \
                     shape with it and publish the new hash",
                    self.out_dir.display(),
                    self.acpi_dir.display(),
                    self.out_dir.display()
                )),
                Err(e) => lines.push(format!("  (writing the TD's blobs: {e:#})")),
            },
            Err(e) => lines.push(format!("  (ACPI blobs: {e})")),
        }
        lines
    }

    fn fetch_log(&self, base: &str) -> Result<Vec<u8>> {
        let url = format!("{base}{}", worker_api::CCEL_PATH);
        let resp = self
            .client
            .get(&url, Duration::from_secs(60))
            .with_context(|| format!("GET {url}"))?;
        if resp.status != 200 {
            return Err(anyhow!("GET {url} answered {}", resp.status));
        }
        let c: worker_api::CcelLog = resp.json(&url).context("not a CcelLog")?;
        STANDARD
            .decode(c.log_base64.as_bytes())
            .context("the event log is not base64")
    }

    fn write_actual(&self, b: &Blobs) -> Result<()> {
        let record = crate::capture::CaptureRecord {
            schema_version: 1,
            image: worker_api::ImageRelease {
                name: self.expected.image.name.clone(),
                version: self.expected.image.version.clone(),
            },
            qemu_version: "unknown (the TDX host's)".into(),
            qemu: "the TDX host's".into(),
            accelerator: "kvm (TDX)".into(),
            tables_for: crate::capture::CaptureFor::Tdx,
            shape: Some(self.shape.clone()),
            machine: String::new(),
            memory_mib: self.expected.launch.memory_mib,
            cpus: self.expected.launch.cpus,
            gpus: 0,
            pci_hole64_gib: None,
            via: crate::capture::Via::Guest,
            devices: Vec::new(),
            files: Vec::new(),
            caveat: "read from a real TD whose RTMR0 differed from its shape's".into(),
        };
        crate::capture::write_capture(&self.out_dir, b, record).map(|_| ())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> Option<Vec<u8>> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures")
            .join(rel);
        match std::fs::read(&p) {
            Ok(b) => Some(b),
            Err(_) => {
                assert!(
                    std::env::var("CI").map_or(true, |v| v != "true"),
                    "fixture {} missing under CI",
                    p.display()
                );
                eprintln!("SKIPPED: fixture {} not found (rtmr0diag)", p.display());
                None
            }
        }
    }

    /// Expected registers of a launch of the Debian OVMF whose tables are `tables` (RTMR0 only
    /// needs the firmware and the blobs).
    fn expected_with(tables: &[u8]) -> Option<(Computed, Blobs)> {
        let fw = fixture("firmware/debian-ovmf-2025.02-8+deb13u1-OVMF.fd")?;
        let synth = measurements::acpi::synthesize(tables).unwrap();
        let blobs = Blobs {
            tables: tables.to_vec(),
            rsdp: synth.rsdp.clone(),
            loader: synth.loader.clone(),
        };
        let c = measurements::compute::compute(&measurements::compute::LaunchInputs {
            firmware: &fw,
            ram: 1 << 30,
            cpus: 1,
            acpi: Some(measurements::compute::AcpiSource::Blobs(
                measurements::acpi::AcpiBlobs {
                    loader: blobs.loader.clone(),
                    rsdp: blobs.rsdp.clone(),
                    tables: blobs.tables.clone(),
                },
            )),
            kernel: None,
            initrd: None,
            cmdline: None,
            page_order: measurements::tdvf::PageOrder::SinglePass,
            layout: measurements::rtmr0::FirmwareLayout::default(),
        })
        .unwrap();
        Some((c, blobs))
    }

    #[test]
    fn a_matching_rtmr0_needs_no_explanation() {
        let Some(tables) = fixture("acpi/qemu-tdx-1cpu-1g.acpi-tables.bin") else {
            return;
        };
        let Some((m, blobs)) = expected_with(&tables) else {
            return;
        };
        let want = m.rtmr0.unwrap();
        let lines = explain("cpu-1c-1g", &m, Some(&blobs), want, None, Some(&blobs));
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("matches"), "{lines:?}");
    }

    #[test]
    fn names_the_differing_blob_and_tables_from_a_real_td_log() {
        let (Some(tables), Some(log)) = (
            fixture("acpi/qemu-tdx-1cpu-1g.acpi-tables.bin"),
            fixture("ccel/go-tdx-guest-cos-ccel_data.dat"),
        ) else {
            return;
        };
        let Some((m, blobs)) = expected_with(&tables) else {
            return;
        };
        // The TD's tables: the same blob with the MADT's PCAT_COMPAT flag cleared (a PIC-less
        // QEMU >= 9.1), as a real host with another QEMU would give.
        let list = measurements::acpi::list_tables(&tables).unwrap();
        let madt = list.iter().find(|t| t.signature == "APIC").unwrap();
        let mut td_tables = tables.clone();
        td_tables[madt.offset as usize + 40] &= !1;
        let actual = Blobs {
            tables: td_tables,
            ..blobs.clone()
        };
        let replay = measurements::eventlog::replay(&log).unwrap();
        let lines = explain(
            "cpu-1c-1g",
            &m,
            Some(&blobs),
            replay.rtmr[0],
            Some(&log),
            Some(&actual),
        );
        let text = lines.join("\n");
        assert!(text.contains("RTMR0 of the TD is"), "{text}");
        // The real log's first RTMR0 event that differs is named with its label.
        assert!(text.contains("RTMR0 differs: expected"), "{text}");
        assert!(
            text.contains("etc/table-loader: identical")
                && text.contains("etc/acpi/rsdp: identical"),
            "{text}"
        );
        assert!(text.contains("etc/acpi/tables: DIFFERS"), "{text}");
        assert!(text.contains("table APIC: differs"), "{text}");
        assert!(text.contains("PCAT_COMPAT"), "{text}");
        // A log that is not the quote's is called out.
        let lines = explain("cpu-1c-1g", &m, None, Mr::ZERO, Some(&log), None);
        assert!(
            lines.iter().any(|l| l.contains("not the quote's")),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains("no ACPI blobs")),
            "{lines:?}"
        );
        // Garbage instead of a log: said, not a panic.
        let lines = explain("x", &m, None, Mr::ZERO, Some(b"garbage"), None);
        assert!(
            lines.iter().any(|l| l.contains("does not parse")),
            "{lines:?}"
        );
    }
}
