//! `verify-quote`: verify a TDX quote (or an RA-TLS certificate) offline against collateral and a
//! policy, print the verdict, exit 0 only when accepted. Mounted by the lead as
//! `host-launcher verify-quote`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::allowlist::{AllowList, StaticAllowList};
use crate::collateral::{
    CollateralSource, FileCollateral, NoCollateral, PccsCollateral, PccsConfig, parse_rfc3339,
};
use crate::policy::Policy;
use crate::verdict::Verdict;
use crate::verify::{Verifier, unix_secs};

/// Verify a TDX quote against Intel collateral, offline.
///
/// Checks the quote's signature chain up to Intel's root CA, its TCB status against the allowed
/// statuses, that the TD is not in DEBUG mode, optionally that REPORTDATA binds a key and that the
/// image hash (cw-v1 by default, or cocoon-v1) is on an allow-list. Prints every reason for a rejection.
///
/// Exit status: 0 accepted, 1 rejected, 2 usage or input error.
///
/// Collateral comes from a file (--collateral), from a PCCS/PCS (--pccs-url, optionally cached
/// with --collateral-cache), or from that cache alone (--offline --collateral-cache DIR).
///
/// Examples:
///   verify-quote --quote q.bin --collateral q_collateral.json --at 2025-07-01T00:00:00Z --json
///   verify-quote --quote q.bin --pccs-url https://pccs.example:8081 --collateral-cache ~/.cache/cw-collateral
///   verify-quote --quote q.bin --offline --collateral-cache ~/.cache/cw-collateral
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The quote file (raw binary TDX v4/v5 quote). With --cert, a DER RA-TLS certificate instead.
    #[arg(long, value_name = "FILE")]
    pub quote: PathBuf,
    /// Treat --quote as a DER RA-TLS certificate: check it (depth 0, extensions, key binding) and
    /// the quote inside it.
    #[arg(long)]
    pub cert: bool,
    /// Collateral JSON (dcap-qvl QuoteCollateralV3 format: TCB info, QE identity, CRLs, chains),
    /// e.g. saved from an earlier --collateral-cache. Real quotes need this or --pccs-url or
    /// --offline.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["pccs_url", "offline", "collateral_cache"])]
    pub collateral: Option<PathBuf>,
    /// Fetch the collateral for the quote's platform (FMSPC and PCK CA, read from the PCK
    /// certificate in the quote) from this PCCS or Intel PCS base URL, v4 API: e.g.
    /// https://pccs.example:8081 or https://api.trustedservices.intel.com. With
    /// --collateral-cache the answers are cached and reused while valid.
    #[arg(long, value_name = "URL")]
    pub pccs_url: Option<String>,
    /// Cache directory for fetched collateral (one tdx-<FMSPC>-<ca>.json per platform, the
    /// same JSON as --collateral plus the fetch time). An entry is reused while the verification
    /// time is inside its validity window and it is younger than --cache-max-age.
    #[arg(long, value_name = "DIR")]
    pub collateral_cache: Option<PathBuf>,
    /// Never touch the network: take collateral from --collateral-cache only (fill it by one
    /// online run with --pccs-url first). A missing or stale entry is an error.
    #[arg(long, requires = "collateral_cache", conflicts_with = "pccs_url")]
    pub offline: bool,
    /// Refetch a cache entry older than this many seconds (online), refuse it (offline).
    #[arg(long, value_name = "SECONDS", default_value_t = 86_400)]
    pub cache_max_age: u64,
    /// Verification time (RFC 3339, e.g. 2025-07-01T00:00:00Z); default: now. Use it to check a
    /// quote against archived collateral.
    #[arg(long, value_name = "RFC3339-TIME")]
    pub at: Option<String>,
    /// Also accept this TCB status (repeatable): SWHardeningNeeded, ConfigurationNeeded,
    /// ConfigurationAndSWHardeningNeeded, OutOfDate, OutOfDateConfigurationNeeded, TDRelaunchAdvised...
    /// UpToDate is always accepted; Revoked never is.
    #[arg(long = "allow-status", value_name = "STATUS")]
    pub allow_status: Vec<String>,
    /// JSON array of allowed image hashes (64 hex digits each; cw-v1 unless --image-hash says
    /// otherwise). Without it the image hashes are printed but not checked.
    #[arg(long, value_name = "FILE")]
    pub allow_list: Option<PathBuf>,
    /// Which image hash the allow-list holds: cw-v1 (ours, what `host-launcher publish` puts on
    /// chain) or cocoon-v1 (Telegram Cocoon's root contracts).
    #[arg(long, value_name = "KIND", default_value = "cw-v1")]
    pub image_hash: crate::verify::ImageHashKind,
    /// Expected REPORTDATA (128 hex digits), e.g. SHA-512 of the peer's TLS key.
    #[arg(long, value_name = "HEX")]
    pub report_data: Option<String>,
    /// Maximum collateral age in seconds at the verification time.
    #[arg(long, value_name = "SECONDS")]
    pub max_collateral_age: Option<u64>,
    /// Print the verdict as JSON (fields: accepted, tcb_status, image_hash_cocoon_v1, registers, reasons[{code,message}], ...).
    #[arg(long)]
    pub json: bool,
    /// GPU evidence checks (with --cert).
    #[command(flatten)]
    pub gpu: crate::gpu::GpuArgs,
}

/// Input errors (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad argument.
    #[error("{0}")]
    Usage(String),
    /// Unreadable file.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Bad collateral.
    #[error(transparent)]
    Collateral(#[from] crate::collateral::CollateralError),
    /// Bad allow-list.
    #[error(transparent)]
    AllowList(#[from] crate::allowlist::AllowListError),
}

impl CliError {
    /// Process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        2
    }
}

/// Compute the verdict for `args` without printing.
pub fn verdict(args: &Args) -> Result<Verdict, CliError> {
    verdict_with(args, None)
}

/// The collateral source the collateral flags select: a file, a PCCS/PCS (cached in `cache_dir`
/// when given, judged at `at`), the cache alone (`offline`), or none. Shared by `verify-quote`
/// and `host-launcher verify`.
pub fn collateral_source(
    collateral: Option<&Path>,
    pccs_url: Option<&str>,
    cache_dir: Option<&Path>,
    offline: bool,
    cache_max_age_secs: u64,
    at: u64,
) -> Result<Arc<dyn CollateralSource>, CliError> {
    Ok(match collateral {
        Some(p) => Arc::new(FileCollateral::load(p)?),
        None if pccs_url.is_some() || offline => Arc::new(
            PccsCollateral::new(PccsConfig {
                base_url: pccs_url.map(str::to_owned),
                cache_dir: cache_dir.map(Path::to_path_buf),
                offline,
                max_age: Duration::from_secs(cache_max_age_secs),
                ..PccsConfig::default()
            })?
            .at_time(at),
        ),
        None if cache_dir.is_some() => {
            return Err(CliError::Usage(
                "--collateral-cache needs --pccs-url URL (fetch and cache) or --offline (cache only)"
                    .to_owned(),
            ));
        }
        None => Arc::new(NoCollateral),
    })
}

/// [`verdict`], with an image allow-list supplied by the caller instead of `--allow-list` (e.g.
/// the root contract, plugged in by `host-launcher verify-quote --rpc --root`). Giving both is a
/// usage error.
pub fn verdict_with(
    args: &Args,
    allow_list: Option<Arc<dyn AllowList>>,
) -> Result<Verdict, CliError> {
    let input = std::fs::read(&args.quote).map_err(|source| CliError::Read {
        path: args.quote.display().to_string(),
        source,
    })?;
    let at = match &args.at {
        Some(s) => parse_rfc3339(s).map_err(CliError::Usage)?,
        None => unix_secs(std::time::SystemTime::now()),
    };
    let report_data = match &args.report_data {
        None => None,
        Some(h) => {
            let b = hex::decode(h.trim())
                .map_err(|e| CliError::Usage(format!("--report-data is not hex: {e}")))?;
            Some(<[u8; 64]>::try_from(b.as_slice()).map_err(|_| {
                CliError::Usage(format!(
                    "--report-data must be 64 bytes (128 hex digits), got {}",
                    b.len()
                ))
            })?)
        }
    };
    let mut policy = Policy {
        max_collateral_age: args.max_collateral_age.map(Duration::from_secs),
        ..Policy::default()
    };
    for s in &args.allow_status {
        policy = policy.allow_status(s);
    }
    let collateral = collateral_source(
        args.collateral.as_deref(),
        args.pccs_url.as_deref(),
        args.collateral_cache.as_deref(),
        args.offline,
        args.cache_max_age,
        at,
    )?;
    let mut verifier = Verifier::new(policy, collateral);
    verifier = verifier.with_image_hash_kind(args.image_hash);
    match (&args.allow_list, allow_list) {
        (Some(_), Some(_)) => {
            return Err(CliError::Usage(
                "give one image allow-list: --allow-list FILE or the root contract, not both"
                    .into(),
            ));
        }
        (Some(p), None) => {
            verifier = verifier.with_allow_list(Arc::new(StaticAllowList::from_file(p)?));
        }
        (None, Some(list)) => verifier = verifier.with_allow_list(list),
        (None, None) => {}
    }
    let gpu = args
        .gpu
        .policy()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    if gpu.is_some() && !args.cert {
        return Err(CliError::Usage(
            "GPU evidence is in RA-TLS certificates: the --gpu-* and --require-gpu flags need \
             --cert"
                .into(),
        ));
    }
    Ok(if args.cert {
        let mut verifier = verifier.with_fixed_time(at);
        if let Some(p) = gpu {
            verifier = verifier.with_gpu_policy(p);
        }
        let mut v = crate::ratls::verify_certificate(&verifier, &input, 1, at);
        if let Some(rd) = report_data
            && v.report_data.as_deref() != Some(hex::encode(rd).as_str())
        {
            v.reject(
                crate::ReasonCode::ReportDataMismatch,
                "REPORTDATA differs from --report-data",
            );
        }
        v
    } else {
        verifier.verify_quote(&input, report_data.as_ref(), at)
    })
}

/// Print a verdict's details for people (image hashes, registers, RTMR3 check, every reason),
/// after its one-line [`Verdict::summary`].
pub fn print_details(v: &Verdict) {
    if let Some(h) = &v.image_hash_cw_v1 {
        println!("  image_hash_cw_v1:     {h}");
    }
    if let Some(h) = &v.image_hash_cocoon_v1 {
        println!("  image_hash_cocoon_v1: {h}");
    }
    match &v.image_hash_checked {
        Some(k) => println!("  allow-list checked:   {k}"),
        None => println!("  allow-list checked:   no (no allow-list given)"),
    }
    if let Some(r) = &v.registers {
        println!(
            "  MRTD:  {}\n  RTMR0: {}\n  RTMR1: {}\n  RTMR2: {}\n  RTMR3: {}",
            r.mrtd, r.rtmr0, r.rtmr1, r.rtmr2, r.rtmr3
        );
    }
    if let Some(c) = &v.rtmr3 {
        println!(
            "  RTMR3 log: {} events ({}), replayed {}, host config {}",
            c.events,
            c.event_types.join(", "),
            if c.replayed.is_some() && c.replayed == c.quote_rtmr3 {
                "= quote"
            } else {
                "!= quote"
            },
            if c.host_config_checked {
                "checked"
            } else {
                "not checked (no expected config given)"
            }
        );
        match &c.client_cert_sha256 {
            Some(pins) => println!(
                "  client auth: REQUIRED (mutual RA-TLS); admits only client certificates with \
                 SHA-256 {}",
                pins.join(", ")
            ),
            None => println!("  client auth: none (any TLS client may connect)"),
        }
    }
    if let Some(g) = &v.gpu {
        let status = serde_json::to_value(g.status)
            .ok()
            .and_then(|s| s.as_str().map(str::to_owned))
            .unwrap_or_default();
        println!(
            "  GPU evidence:         {status}{}{}",
            if g.required { " (required)" } else { "" },
            g.note
                .as_deref()
                .map(|n| format!(" - {n}"))
                .unwrap_or_default()
        );
        for (i, gpu) in g.gpus.iter().enumerate() {
            println!(
                "    GPU {i}: cc_mode={} dev_tools={} driver={} vbios={} blocks={} checked={:?} \
                 unchecked={:?} root_sha256={}",
                gpu.cc.cc_on,
                gpu.cc.dev_tools,
                gpu.driver_version.as_deref().unwrap_or("-"),
                gpu.vbios_version.as_deref().unwrap_or("-"),
                gpu.measurement_blocks,
                gpu.checked_indices,
                gpu.unchecked_indices,
                gpu.root_sha256.as_deref().unwrap_or("-")
            );
        }
    }
    for r in &v.reasons {
        println!("  - [{}] {}", r.code.as_str(), r.message);
    }
}

/// Run the command: print the verdict (human or JSON) and return the exit status (0 accepted,
/// 1 rejected, 2 input error).
pub fn run(args: &Args) -> i32 {
    run_with(args, None)
}

/// [`run`] with a caller-supplied image allow-list (see [`verdict_with`]).
pub fn run_with(args: &Args, allow_list: Option<Arc<dyn AllowList>>) -> i32 {
    match verdict_with(args, allow_list) {
        Ok(v) => {
            if args.json {
                match serde_json::to_string_pretty(&v) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: cannot serialize verdict: {e}");
                        return 2;
                    }
                }
            } else {
                println!("{}", v.summary());
                if let Some(q) = v.quote_version {
                    println!("  quote version:        {q}");
                }
                print_details(&v);
            }
            if v.accepted { 0 } else { 1 }
        }
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "accepted": false, "error": e.to_string() })
                );
            }
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}
