//! The launcher's side of attestation: the simulated TEE it hands a `--tee none` guest, the
//! [`Verifier`] it checks the booted agent with, and the final check before "ready".
//!
//! `--tee none`: a fresh simulator seed per launch; the registers are the ones `measurements`
//! computes for the image and launch (memory, vCPUs) it boots, so the simulated quotes carry the
//! image's MRTD/RTMR1/RTMR2 and — when the image has captured ACPI tables (`acpi/`) — RTMR0.
//! Without `acpi/`, RTMR0 cannot be computed: the simulator reports RTMR0 = 0, the image hash is
//! then NOT checked against the booted image, and the launcher says so. The config travels as a
//! second fw_cfg file (`worker_api::SIMULATED_TEE_FW_CFG_NAME`, not part of the measured host
//! config); the simulator's public key is written beside the console log
//! (`simulated-tee.pub`). The launcher accepts simulated evidence only because it is its own
//! simulator key with `--tee none`.
//!
//! `--tee tdx`: real DCAP verification against `--collateral FILE` (a PCCS source is planned).
//!
//! Before "ready" ([`check_agent`]): RA-TLS accepted, `cw-v1` image hash equal to the booted
//! image's (allow-list of exactly that hash), RTMR3 replay equal to the quote's and its
//! `host_config` event equal to the bytes sent.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use attestation::{
    FileCollateral, NoCollateral, Policy, RaTlsHttpClient, SimulatedTee, StaticAllowList,
    TdRegisters, Verdict, Verifier,
};
use worker_api::SimulatedTeeConfig;

/// File name of the simulator's public key (hex), beside the console log.
pub const SIMULATED_KEY_FILE: &str = "simulated-tee.pub";
/// File name of the simulated-TEE config handed to the guest, in the run directory.
pub const SIMULATED_CONFIG_FILE: &str = "simulated-tee.json";

/// What the launcher expects of the image it boots.
#[derive(Debug, Clone)]
pub struct Expected {
    /// `cw-v1` of the image for this launch, when computable (needs `acpi/`).
    pub image_hash_cw_v1: Option<[u8; 32]>,
    /// Why the image hash is not known, when it is not.
    pub image_hash_note: Option<String>,
}

/// The simulated TEE of one `--tee none` launch.
#[derive(Debug, Clone)]
pub struct SimulatedLaunch {
    /// The config handed to the guest.
    pub config: SimulatedTeeConfig,
    /// The simulator's public key.
    pub public_key: [u8; 32],
}

fn random_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("cannot read /dev/urandom for the simulator seed")?;
    Ok(seed)
}

/// How to measure the image for a launch: a declared TDX shape's registers and tables
/// (`acpi/shapes/<name>/`), or the given memory and vCPUs with the image's `acpi/` (a
/// `--tee none` launch, which reports the launch defaults' TDX tables, or an unlisted shape).
pub fn measure_options(
    shape: Option<&str>,
    memory_mib: u64,
    cpus: u32,
) -> measurements::image::Options {
    match shape {
        Some(s) => measurements::image::Options {
            shape: Some(s.to_owned()),
            ..measurements::image::Options::default()
        },
        None => measurements::image::Options {
            memory: Some(memory_mib * 1024 * 1024),
            cpus: Some(cpus),
            ..measurements::image::Options::default()
        },
    }
}

/// Measure the image for this launch (a TDX shape, or memory in MiB and vCPUs). Never fails:
/// what cannot be computed is explained in the note.
pub fn measure(
    image_dir: &Path,
    shape: Option<&str>,
    memory_mib: u64,
    cpus: u32,
) -> (Option<measurements::image::ImageMeasurements>, Expected) {
    let opts = measure_options(shape, memory_mib, cpus);
    match measurements::image::measure_image_dir(image_dir, &opts) {
        Err(e) => (
            None,
            Expected {
                image_hash_cw_v1: None,
                image_hash_note: Some(format!(
                    "the image's registers cannot be computed ({e}); the image hash is not checked"
                )),
            },
        ),
        Ok(m) => {
            let hash = m
                .image_hash_cw_v1
                .as_deref()
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok());
            let note = hash.is_none().then(|| {
                format!(
                    "RTMR0 and the image hash cannot be computed: {} has no captured ACPI tables \
                     ({}). The simulated TEE reports RTMR0 = 0 and the image hash is NOT \
                     checked against the booted image; run `cargo xtask image capture-acpi` first",
                    image_dir.display(),
                    match shape {
                        Some(s) => format!("acpi/shapes/{s}/"),
                        None => "acpi/".to_owned(),
                    }
                )
            });
            (
                Some(m),
                Expected {
                    image_hash_cw_v1: hash,
                    image_hash_note: note,
                },
            )
        }
    }
}

/// A fresh simulated TEE for a `--tee none` launch with the image's registers.
pub fn simulated_launch(
    m: Option<&measurements::image::ImageMeasurements>,
) -> Result<SimulatedLaunch> {
    let seed = random_seed()?;
    let defaults = measurements::image::Options::default();
    let zero = measurements::Mr::ZERO;
    let config = SimulatedTeeConfig {
        seed: hex::encode(seed),
        mrtd: m.map_or(zero, |m| m.mrtd).to_hex(),
        rtmr0: m.and_then(|m| m.rtmr0).unwrap_or(zero).to_hex(),
        rtmr1: m.map_or(zero, |m| m.rtmr1).to_hex(),
        rtmr2: m.map_or(zero, |m| m.rtmr2).to_hex(),
        td_attributes: defaults.td_attributes,
        xfam: defaults.xfam,
    };
    let public_key = SimulatedTee::from_seed(&seed, TdRegisters::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .public_key();
    Ok(SimulatedLaunch { config, public_key })
}

/// Write the simulated config (mode 0600: it holds the seed) and the public key file.
pub fn write_simulated(
    sim: &SimulatedLaunch,
    run_dir: &Path,
    console_log: &Path,
) -> Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let cfg_path = run_dir.join(SIMULATED_CONFIG_FILE);
    let _ = std::fs::remove_file(&cfg_path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&cfg_path)
        .with_context(|| format!("cannot create {}", cfg_path.display()))?;
    std::io::Write::write_all(&mut f, &serde_json::to_vec(&sim.config)?)
        .with_context(|| format!("cannot write {}", cfg_path.display()))?;
    let key_path = console_log
        .parent()
        .unwrap_or(run_dir)
        .join(SIMULATED_KEY_FILE);
    std::fs::write(&key_path, format!("{}\n", hex::encode(sim.public_key)))
        .with_context(|| format!("cannot write {}", key_path.display()))?;
    Ok((cfg_path, key_path))
}

/// The verifier the launcher checks its own guest with.
pub fn launcher_verifier(
    sim: Option<&SimulatedLaunch>,
    collateral: Option<&Path>,
    expected: &Expected,
    host_config: &[u8],
) -> Result<Verifier> {
    let v = match sim {
        // Simulated evidence is accepted only from this launch's own simulator key.
        Some(s) => Verifier::simulated(Policy::default().with_simulated(true), s.public_key),
        None => match collateral {
            Some(p) => Verifier::new(
                Policy::default(),
                Arc::new(
                    FileCollateral::load(p)
                        .with_context(|| format!("cannot load the collateral {}", p.display()))?,
                ),
            ),
            None => Verifier::new(Policy::default(), Arc::new(NoCollateral)),
        },
    };
    let v = v.with_expected_host_config(host_config.to_vec());
    Ok(match expected.image_hash_cw_v1 {
        Some(h) => v.with_allow_list(Arc::new(StaticAllowList::new([h]))),
        None => v,
    })
}

/// The agent's base URL on the forwarded port.
pub fn base_url(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

/// Verify the booted agent completely (RA-TLS + RTMR3); an error carries every reason.
pub fn check_agent(client: &RaTlsHttpClient, port: u16, expected: &Expected) -> Result<Verdict> {
    let a = client
        .attest(&base_url(port), Duration::from_secs(60))
        .map_err(|e| match e.verdict() {
            Some(v) => anyhow::anyhow!("{}", describe_rejection(v)),
            None => anyhow::anyhow!("cannot verify the agent: {e}"),
        })?;
    if !a.verdict.accepted {
        bail!("{}", describe_rejection(&a.verdict));
    }
    if let (Some(want), Some(got)) = (expected.image_hash_cw_v1, &a.verdict.image_hash_cw_v1)
        && hex::encode(want) != *got
    {
        bail!(
            "the agent's cw-v1 image hash {got} is not the booted image's {}",
            hex::encode(want)
        );
    }
    Ok(a.verdict)
}

/// A rejection as text: the summary and every reason.
pub fn describe_rejection(v: &Verdict) -> String {
    let mut s = format!("the agent's attestation was REJECTED ({})", v.summary());
    for r in &v.reasons {
        s.push_str(&format!("\n  - [{}] {}", r.code.as_str(), r.message));
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn simulated_launch_without_measurements_is_zero_registers_and_fresh_keys() {
        let a = simulated_launch(None).unwrap();
        let b = simulated_launch(None).unwrap();
        assert_ne!(a.public_key, b.public_key, "a fresh seed per launch");
        assert_eq!(a.config.mrtd, "00".repeat(48));
        assert_eq!(a.config.seed.len(), 64);
        let d = tempfile::tempdir().unwrap();
        let (cfg, key) = write_simulated(&a, d.path(), &d.path().join("console.log")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back: SimulatedTeeConfig =
            serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
        assert_eq!(back, a.config);
        assert_eq!(
            std::fs::read_to_string(key).unwrap().trim(),
            hex::encode(a.public_key)
        );
    }

    #[test]
    fn unmeasurable_image_is_said_honestly() {
        let d = tempfile::tempdir().unwrap();
        let (m, e) = measure(d.path(), None, 1024, 1);
        assert!(m.is_none());
        assert!(e.image_hash_cw_v1.is_none());
        assert!(e.image_hash_note.unwrap().contains("not checked"));
    }
}
