//! End-to-end: `host-launcher verify-quote` on the real Intel-signed quotes in the shared
//! fixtures (dcap-qvl's TDX quotes with their collateral), inside and outside the collateral's
//! validity window.

use std::path::PathBuf;
use std::process::Command;

use e2e_tests::{host_launcher, repo_root, skip};

fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var_os("WORKER_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/fixtures"));
    if dir.join("quotes").is_dir() {
        Some(dir)
    } else {
        skip(
            "verify-quote e2e",
            &format!("fixtures not found at {}", dir.display()),
        );
        None
    }
}

fn verify(quote: &str, at: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let f = fixtures().expect("fixtures checked by caller");
    let out = Command::new(host_launcher())
        .arg("verify-quote")
        .arg("--quote")
        .arg(f.join("quotes").join(quote))
        .arg("--collateral")
        .arg(f.join("quotes").join(format!("{quote}_collateral.json")))
        .args(["--at", at, "--json"])
        .args(extra)
        .output()
        .expect("run host-launcher");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verdict is not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn real_quote_is_accepted_inside_the_window_and_rejected_after() {
    if fixtures().is_none() {
        return;
    }
    let (code, v) = verify("dcap-qvl-tdx_quote", "2025-07-01T00:00:00Z", &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["accepted"], true);
    assert_eq!(v["tcb_status"], "UpToDate");
    assert_eq!(v["simulated"], false);

    let (code, v) = verify("dcap-qvl-tdx_quote", "2025-08-01T00:00:00Z", &[]);
    assert_ne!(code, 0, "expired collateral must be rejected: {v}");
    assert_eq!(v["accepted"], false);
    assert!(!v["reasons"].as_array().expect("reasons").is_empty(), "{v}");
}

#[test]
fn td15_quote_verifies_and_outdated_needs_an_explicit_allowance() {
    if fixtures().is_none() {
        return;
    }
    let (code, v) = verify("dcap-qvl-tdx_quote_td15ex", "2026-10-20T00:00:00Z", &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["tcb_status"], "UpToDate");

    let (code, v) = verify("dcap-qvl-tdx_quote_outdated", "2026-03-01T00:00:00Z", &[]);
    assert_ne!(code, 0, "{v}");
    let (code, v) = verify(
        "dcap-qvl-tdx_quote_outdated",
        "2026-03-01T00:00:00Z",
        &["--allow-status", "OutOfDate"],
    );
    assert_eq!(code, 0, "{v}");
}
