//! `verify-quote`: verify a TDX quote (or an RA-TLS certificate) offline against collateral and a
//! policy, print the verdict, exit 0 only when accepted. Mounted by the lead as
//! `host-launcher verify-quote`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::allowlist::{AllowList, StaticAllowList};
use crate::collateral::{FileCollateral, NoCollateral, parse_rfc3339};
use crate::policy::Policy;
use crate::verdict::Verdict;
use crate::verify::{Verifier, unix_secs};

/// Verify a TDX quote against Intel collateral, offline.
///
/// Checks the quote's signature chain up to Intel's root CA, its TCB status against the allowed
/// statuses, that the TD is not in DEBUG mode, optionally that REPORTDATA binds a key and that the
/// image hash (cocoon-v1) is on an allow-list. Prints every reason for a rejection.
///
/// Exit status: 0 accepted, 1 rejected, 2 usage or input error.
///
/// Example: verify-quote --quote q.bin --collateral q_collateral.json --at 2025-07-01T00:00:00Z --json
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
    /// e.g. fetched from a PCCS. Required for real quotes.
    #[arg(long, value_name = "FILE")]
    pub collateral: Option<PathBuf>,
    /// Verification time (RFC 3339, e.g. 2025-07-01T00:00:00Z); default: now. Use it to check a
    /// quote against archived collateral.
    #[arg(long, value_name = "RFC3339-TIME")]
    pub at: Option<String>,
    /// Also accept this TCB status (repeatable): SWHardeningNeeded, ConfigurationNeeded,
    /// ConfigurationAndSWHardeningNeeded, OutOfDate, OutOfDateConfigurationNeeded, TDRelaunchAdvised...
    /// UpToDate is always accepted; Revoked never is.
    #[arg(long = "allow-status", value_name = "STATUS")]
    pub allow_status: Vec<String>,
    /// JSON array of allowed image hashes (cocoon-v1, 64 hex digits each). Without it the image
    /// hash is printed but not checked.
    #[arg(long, value_name = "FILE")]
    pub allow_list: Option<PathBuf>,
    /// Expected REPORTDATA (128 hex digits), e.g. SHA-512 of the peer's TLS key.
    #[arg(long, value_name = "HEX")]
    pub report_data: Option<String>,
    /// Maximum collateral age in seconds at the verification time.
    #[arg(long, value_name = "SECONDS")]
    pub max_collateral_age: Option<u64>,
    /// Print the verdict as JSON (fields: accepted, tcb_status, image_hash_cocoon_v1, registers, reasons[{code,message}], ...).
    #[arg(long)]
    pub json: bool,
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
    let mut verifier = match &args.collateral {
        Some(p) => Verifier::new(policy, Arc::new(FileCollateral::load(p)?)),
        None => Verifier::new(policy, Arc::new(NoCollateral)),
    };
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
    Ok(if args.cert {
        let verifier = verifier.with_fixed_time(at);
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
                if let Some(h) = &v.image_hash_cocoon_v1 {
                    println!("  image_hash_cocoon_v1: {h}");
                }
                if let Some(r) = &v.registers {
                    println!(
                        "  MRTD:  {}\n  RTMR0: {}\n  RTMR1: {}\n  RTMR2: {}\n  RTMR3: {}",
                        r.mrtd, r.rtmr0, r.rtmr1, r.rtmr2, r.rtmr3
                    );
                }
                for r in &v.reasons {
                    println!("  - [{}] {}", r.code.as_str(), r.message);
                }
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
