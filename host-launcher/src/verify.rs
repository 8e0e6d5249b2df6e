//! `host-launcher verify --url https://HOST:PORT`: check any running worker over RA-TLS and print
//! the verdict with every reason.
//!
//! The flags (`gateway::trust::TrustArgs`, shared with the gateway) build one
//! [`attestation::Verifier`] ([`verifier_from_args`]): policy (TCB statuses,
//! simulated evidence only with `--allow-simulated` and a trusted `--simulated-key`), collateral
//! (`--collateral`), image-hash checks (`--allow-list FILE`, `--image DIR`; both must hold when both
//! are given) and the expected host config (`--host-config FILE`). Other allow-list sources (e.g.
//! a root contract on chain) plug in as an extra `Arc<dyn AllowList>` argument.
//!
//! Exit status: [`EXIT_ACCEPTED`] 0, [`EXIT_REJECTED`] 3, [`EXIT_UNREACHABLE`] 4, [`EXIT_USAGE`] 2.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use attestation::{AllowList, Verifier};
use clap::Args;
use gateway::trust::TrustArgs;

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
    /// What to trust (shared with `gateway`: simulated evidence, allow-lists, --image, collateral,
    /// the root contract, the expected host config).
    #[command(flatten)]
    pub trust: TrustArgs,
    /// Seconds to wait for the worker.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Print the verdict as JSON (accepted, simulated, tcb_status, image_hash_cw_v1,
    /// image_hash_cocoon_v1, registers, rtmr3, reasons[{code,message}], ... plus url and agent).
    #[arg(long)]
    pub json: bool,
}

/// Build the verifier from the flags; `extra` is another allow-list source (e.g. on chain) that
/// must also approve the image hash.
pub fn verifier_from_args(a: &VerifyArgs, extra: Option<Arc<dyn AllowList>>) -> Result<Verifier> {
    Ok(a.trust.verifier(extra)?)
}

/// Run `verify` with the root-contract allow-list of `--root/--rpc` (if given).
pub fn cmd_verify_with_chain(a: &VerifyArgs) -> i32 {
    match a.trust.chain.image_allow_list() {
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
    let client = match a.trust.client(verifier) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("host-launcher: error: {e}");
            return EXIT_USAGE;
        }
    };
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
    use attestation::StaticAllowList;
    use clap::Parser;
    use gateway::trust::{AllOf, parse_key};

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
