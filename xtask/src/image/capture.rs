//! `cargo xtask image capture-acpi`: capture the launch's ACPI blobs and refresh
//! `measurements.json`.
//!
//! Runs `host-launcher capture-acpi --all-shapes --image DIR` (through `cargo run -p
//! host-launcher`, as the demo does; for each TDX launch shape the image declares it runs the
//! firmware under QEMU TCG with the shape's machine line and devices and reads the ACPI blobs,
//! into `DIR/acpi/shapes/<name>/`, and the launch defaults' shape also into `DIR/acpi/`), then
//! rewrites `DIR/measurements.json` with [`super::build::write_measurements_json`], which now
//! includes RTMR0 and both image hashes, for the defaults and for every shape (`shapes`).
//! `image build` itself never needs QEMU: this is a separate step.

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;

use super::manifest::Manifest;
use crate::progress::Progress;

/// What the capture produced.
#[derive(Debug, serde::Serialize)]
pub struct CaptureReport {
    pub image_dir: std::path::PathBuf,
    pub rtmr0: Option<String>,
    pub image_hash_cocoon_v1: Option<String>,
    pub image_hash_cw_v1: Option<String>,
    /// Registers still not computable, with the reason.
    pub missing: Vec<String>,
    /// Every TDX launch shape's cw-v1 image hash (what a TD of that shape reports).
    pub shapes: std::collections::BTreeMap<String, Option<String>>,
}

/// Captures ACPI for the image in `dir` (launch values from its manifest) and rewrites its
/// `measurements.json`.
pub fn capture_acpi(repo: &Path, dir: &Path, quiet: bool) -> anyhow::Result<CaptureReport> {
    let manifest_path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path).with_context(|| {
        format!(
            "reading {}: build the image first with `cargo xtask image build`",
            manifest_path.display()
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an image manifest", manifest_path.display()))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "capture-acpi: cargo run -p host-launcher -- capture-acpi --all-shapes --image {}",
        dir.display()
    );
    let st = Command::new(&cargo)
        .current_dir(repo)
        .args([
            "run",
            "--quiet",
            "-p",
            "host-launcher",
            "--",
            "capture-acpi",
            "--all-shapes",
            "--image",
        ])
        .arg(dir)
        // Its report goes to stderr so that stdout stays ours (`--json`).
        .stdout(std::io::stderr())
        .status()
        .context("running host-launcher capture-acpi")?;
    if !st.success() {
        anyhow::bail!(
            "host-launcher capture-acpi failed ({st}); its messages above say why \
             (measurements.json was left unchanged)"
        );
    }
    let progress = Progress::new(quiet);
    let m = super::build::write_measurements_json(dir, &manifest, &progress)?;
    Ok(CaptureReport {
        image_dir: dir.to_path_buf(),
        rtmr0: m.rtmr0.map(|r| r.to_string()),
        image_hash_cocoon_v1: m.image_hash_cocoon_v1,
        image_hash_cw_v1: m.image_hash_cw_v1,
        missing: m.missing.iter().map(|(k, v)| format!("{k}: {v}")).collect(),
        shapes: m
            .shapes
            .iter()
            .map(|(k, v)| (k.clone(), v.image_hash_cw_v1.clone()))
            .collect(),
    })
}
