//! `host-launcher verify --url https://HOST:PORT`: check any running worker over RA-TLS and print
//! the verdict with every reason.
//!
//! The flags build one [`attestation::Verifier`] ([`verifier_from_args`]): policy (TCB statuses,
//! simulated evidence only with `--allow-simulated` and a trusted `--simulated-key`), collateral
//! (`--collateral`), image-hash checks (`--allow-list FILE`, `--image DIR`; both must hold when both
//! are given) and the expected host config (`--host-config FILE`). Other allow-list sources (e.g.
//! a root contract on chain) plug in as an extra `Arc<dyn AllowList>` argument.
//!
//! Exit status: [`EXIT_ACCEPTED`] 0, [`EXIT_REJECTED`] 3, [`EXIT_UNREACHABLE`] 4, [`EXIT_USAGE`] 2.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use attestation::allowlist::AllowListError;
use attestation::{AllowList, ImageHashKind, Policy, RaTlsHttpClient, StaticAllowList, Verifier};
use clap::Args;

/// Accepted.
pub const EXIT_ACCEPTED: i32 = 0;
/// Bad arguments or unreadable input files.
pub const EXIT_USAGE: i32 = 2;
/// The worker answered and its evidence was rejected.
pub const EXIT_REJECTED: i32 = 3;
/// The worker could not be reached (or the transport failed before a verdict).
pub const EXIT_UNREACHABLE: i32 = 4;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The worker's RA-TLS endpoint, e.g. https://127.0.0.1:8443.
    #[arg(long, value_name = "https://HOST:PORT")]
    pub url: String,
    /// Accept evidence from the simulated TEE (INSECURE: no hardware is involved). Also needs
    /// the simulator's public key (--simulated-key). Never use it for production workers.
    #[arg(long)]
    pub allow_simulated: bool,
    /// Trusted simulator public key: 64 hex digits, or @FILE holding them (`host-launcher run
    /// --tee none` writes simulated-tee.pub beside the console log). Repeatable.
    #[arg(long, value_name = "HEX|@FILE")]
    pub simulated_key: Vec<String>,
    /// JSON array of allowed image hashes (64 hex digits each; cw-v1 unless --image-hash).
    #[arg(long, value_name = "FILE")]
    pub allow_list: Option<PathBuf>,
    /// Which image hash the allow-lists hold: cw-v1 (ours) or cocoon-v1 (Cocoon roots).
    #[arg(long, value_name = "KIND", default_value = "cw-v1")]
    pub image_hash: ImageHashKind,
    /// Expect exactly the image in this directory: its hash (for --memory/--cpus; needs its
    /// captured acpi/) must be the worker's.
    #[arg(long, value_name = "DIR")]
    pub image: Option<PathBuf>,
    /// Guest memory of the launch, for --image (default: the manifest's), e.g. 2048 or 2G.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<crate::settings::MemSize>,
    /// vCPUs of the launch, for --image (default: the manifest's).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Collateral JSON (dcap-qvl QuoteCollateralV3) for real TDX quotes.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["pccs_url", "offline"])]
    pub collateral: Option<PathBuf>,
    /// Fetch the collateral for the worker's platform from this PCCS (or Intel's PCS) base URL
    /// (v4 API), caching it in --collateral-cache when given.
    #[arg(long, value_name = "URL")]
    pub pccs_url: Option<String>,
    /// Directory caching fetched collateral (one file per platform); reused while valid.
    #[arg(long, value_name = "DIR")]
    pub collateral_cache: Option<PathBuf>,
    /// Use only --collateral-cache, never the network.
    #[arg(long, requires = "collateral_cache", conflicts_with = "pccs_url")]
    pub offline: bool,
    /// Refetch cached collateral older than this many seconds (default one day).
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    pub cache_max_age: u64,
    /// The image allow-list from a root contract (--root ADDRESS --rpc URL): every list given
    /// (--allow-list, --image, --root) must approve the worker's image hash.
    #[command(flatten)]
    pub onchain: crate::onchain::OnchainListArgs,
    /// The exact host-config bytes the worker must have measured (e.g. the launcher's
    /// <run dir>/host-config.json): checked against the RTMR3 `host_config` event.
    #[arg(long, value_name = "FILE")]
    pub host_config: Option<PathBuf>,
    /// Also accept this TCB status (repeatable; UpToDate always is, Revoked never).
    #[arg(long = "allow-status", value_name = "STATUS")]
    pub allow_status: Vec<String>,
    /// Seconds to wait for the worker.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Print the verdict as JSON (accepted, simulated, tcb_status, image_hash_cw_v1,
    /// image_hash_cocoon_v1, registers, rtmr3, reasons[{code,message}], ... plus url and agent).
    #[arg(long)]
    pub json: bool,
}

/// A key given as hex or @FILE.
pub fn parse_key(arg: &str) -> Result<[u8; 32]> {
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the simulator key file {path}"))?,
        None => arg.to_owned(),
    };
    let b =
        hex::decode(text.trim()).map_err(|e| anyhow!("simulator key {arg:?} is not hex: {e}"))?;
    <[u8; 32]>::try_from(b.as_slice())
        .map_err(|_| anyhow!("simulator key {arg:?} must be 32 bytes (64 hex digits)"))
}

/// Every list must approve the hash.
#[derive(Debug)]
struct AllOf(Vec<Arc<dyn AllowList>>);

impl AllowList for AllOf {
    fn contains(&self, h: &[u8; 32]) -> Result<bool, AllowListError> {
        for l in &self.0 {
            if !l.contains(h)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The image hash of `--image` for the launch given by --memory/--cpus.
fn image_hash(a: &VerifyArgs, dir: &std::path::Path) -> Result<[u8; 32]> {
    let runtime = match (&a.host_config, a.image_hash) {
        (Some(p), ImageHashKind::CocoonV1) => Some(attestation::runtime::runtime_inputs(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )),
        (None, ImageHashKind::CocoonV1) => bail!(
            "the cocoon-v1 hash covers RTMR3, which depends on the host config: pass --host-config with --image"
        ),
        _ => None,
    };
    let opts = measurements::image::Options {
        memory: a.memory.map(|m| m.mib * 1024 * 1024),
        cpus: a.cpus,
        runtime,
        ..measurements::image::Options::default()
    };
    let m = measurements::image::measure_image_dir(dir, &opts)
        .with_context(|| format!("cannot measure the image {}", dir.display()))?;
    let h = match a.image_hash {
        ImageHashKind::CwV1 => m.image_hash_cw_v1,
        ImageHashKind::CocoonV1 => m.image_hash_cocoon_v1,
    }
    .ok_or_else(|| {
        anyhow!(
            "the image hash of {} cannot be computed ({}); capture its ACPI tables with `cargo xtask image capture-acpi`",
            dir.display(),
            m.missing.values().cloned().collect::<Vec<_>>().join("; ")
        )
    })?;
    let b = hex::decode(&h)?;
    <[u8; 32]>::try_from(b.as_slice()).map_err(|_| anyhow!("image hash {h} is not 32 bytes"))
}

/// Build the verifier from the flags; `extra` is another allow-list source (e.g. on chain) that
/// must also approve the image hash.
pub fn verifier_from_args(a: &VerifyArgs, extra: Option<Arc<dyn AllowList>>) -> Result<Verifier> {
    let mut policy = Policy::default().with_simulated(a.allow_simulated);
    for s in &a.allow_status {
        policy = policy.allow_status(s);
    }
    if a.allow_simulated && a.simulated_key.is_empty() {
        bail!(
            "--allow-simulated needs the simulator's public key: --simulated-key HEX or @FILE \
             (host-launcher run --tee none writes simulated-tee.pub beside the console log)"
        );
    }
    let collateral = attestation::cli::collateral_source(
        a.collateral.as_deref(),
        a.pccs_url.as_deref(),
        a.collateral_cache.as_deref(),
        a.offline,
        a.cache_max_age,
        attestation::verify::unix_secs(std::time::SystemTime::now()),
    )?;
    let mut v = Verifier::new(policy, collateral).with_image_hash_kind(a.image_hash);
    for k in &a.simulated_key {
        v = v.with_simulated_key(parse_key(k)?);
    }
    let mut lists: Vec<Arc<dyn AllowList>> = Vec::new();
    if let Some(p) = &a.allow_list {
        lists.push(Arc::new(StaticAllowList::from_file(p)?));
    }
    if let Some(dir) = &a.image {
        lists.push(Arc::new(StaticAllowList::new([image_hash(a, dir)?])));
    }
    lists.extend(extra);
    if !lists.is_empty() {
        v = v.with_allow_list(Arc::new(AllOf(lists)));
    }
    if let Some(p) = &a.host_config {
        v = v.with_expected_host_config(
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        );
    }
    Ok(v)
}

/// Run `verify` with the root-contract allow-list of `--root/--rpc` (if given).
pub fn cmd_verify_with_chain(a: &VerifyArgs) -> i32 {
    match a.onchain.allow_list() {
        Ok(list) => cmd_verify(a, list),
        Err(e) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({ "accepted": false, "error": format!("{e:#}") })
                );
            } else {
                eprintln!("host-launcher verify: {e:#}");
            }
            2
        }
    }
}

/// Run `verify`; returns the exit status. `extra`: see [`verifier_from_args`].
pub fn cmd_verify(a: &VerifyArgs, extra: Option<Arc<dyn AllowList>>) -> i32 {
    let verifier = match verifier_from_args(a, extra) {
        Ok(v) => v,
        Err(e) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"accepted": false, "url": a.url, "error": format!("{e:#}")})
                );
            }
            eprintln!("host-launcher: error: {e:#}");
            return EXIT_USAGE;
        }
    };
    let client = RaTlsHttpClient::new(verifier);
    let (verdict, agent) = match client.attest(&a.url, Duration::from_secs(a.timeout.max(1))) {
        Ok(at) => (at.verdict, at.attestation),
        Err(attestation::HttpError::Rejected(v)) => (*v, None),
        Err(e) => {
            let code = if matches!(e, attestation::HttpError::Url { .. }) {
                EXIT_USAGE
            } else {
                EXIT_UNREACHABLE
            };
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"accepted": false, "unreachable": code == EXIT_UNREACHABLE,
                        "url": a.url, "error": e.to_string()})
                );
            }
            eprintln!("host-launcher: error: {e}");
            return code;
        }
    };
    if a.json {
        let mut j = serde_json::to_value(&verdict).unwrap_or_default();
        if let Some(o) = j.as_object_mut() {
            o.insert("url".into(), a.url.clone().into());
            o.insert(
                "agent".into(),
                serde_json::to_value(&agent).unwrap_or_default(),
            );
        }
        println!("{j}");
    } else {
        println!("{}: {}", a.url, verdict.summary());
        if verdict.simulated {
            println!(
                "  SIMULATED TEE: no hardware attestation (accepted only with --allow-simulated)"
            );
        }
        attestation::cli::print_details(&verdict);
    }
    if verdict.accepted {
        EXIT_ACCEPTED
    } else {
        EXIT_REJECTED
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: VerifyArgs,
    }

    fn args(extra: &[&str]) -> VerifyArgs {
        let mut v = vec!["t", "--url", "https://127.0.0.1:1"];
        v.extend_from_slice(extra);
        T::try_parse_from(v).unwrap().a
    }

    #[test]
    fn keys_parse_from_hex_or_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("k.pub");
        std::fs::write(&f, format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(parse_key(&"ab".repeat(32)).unwrap(), [0xab; 32]);
        assert_eq!(parse_key(&format!("@{}", f.display())).unwrap(), [0xab; 32]);
        assert!(
            parse_key("abcd")
                .unwrap_err()
                .to_string()
                .contains("32 bytes")
        );
        assert!(parse_key("@/nonexistent").is_err());
    }

    #[test]
    fn allow_simulated_needs_a_key_and_lists_combine() {
        let e = verifier_from_args(&args(&["--allow-simulated"]), None).unwrap_err();
        assert!(e.to_string().contains("--simulated-key"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("l.json");
        std::fs::write(&f, format!("[\"{}\"]", "11".repeat(32))).unwrap();
        let a = args(&["--allow-list", f.to_str().unwrap()]);
        assert!(verifier_from_args(&a, None).is_ok());
        let both = AllOf(vec![
            Arc::new(StaticAllowList::new([[1; 32], [2; 32]])),
            Arc::new(StaticAllowList::new([[2; 32]])),
        ]);
        assert!(both.contains(&[2; 32]).unwrap());
        assert!(!both.contains(&[1; 32]).unwrap());
    }

    #[test]
    fn unreachable_worker_has_its_own_exit_code() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut a = args(&["--timeout", "2"]);
        a.url = format!("https://127.0.0.1:{port}");
        assert_eq!(cmd_verify(&a, None), EXIT_UNREACHABLE);
        a.url = "http://127.0.0.1:1".into();
        assert_eq!(cmd_verify(&a, None), EXIT_USAGE);
    }
}
