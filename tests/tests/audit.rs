//! End-to-end: `cargo xtask image audit` on a release bundle of this checkout.
//!
//! - `audit_reproduces_a_bundle_and_names_a_flipped_vmlinuz`: packages the image under test
//!   (`WORKER_IMAGE_DIR`, set by `cargo xtask test`, or one built once) with `cargo xtask image
//!   package`, audits the bundle (a real rebuild from this checkout, sharing the agent target
//!   directory with `image build`, so the agent is not recompiled) and expects exit 0 with every
//!   part identical and every register matching; then packages a copy whose `vmlinuz` has one
//!   byte flipped and expects exit 3 with `vmlinuz` named as the only difference.
//!
//! Run: `cargo test -p e2e-tests --test audit -- --nocapture` (needs the Debian mirror or a warm
//! cache at `WORKER_CACHE_DIR` / `~/.cache/confidential-worker/debs`, and dpkg-deb).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use e2e_tests::{cargo, image_dir};

/// This checkout's root, from this test's own manifest directory (a target directory shared by
/// several checkouts may hold another checkout's build of the e2e-tests library, whose
/// `repo_root()` would then audit with that checkout's xtask).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `cargo xtask <args>` from the repository root.
fn xtask(args: &[&str]) -> Output {
    Command::new(cargo())
        .current_dir(repo_root())
        .args(["run", "--quiet", "-p", "xtask", "--"])
        .args(args)
        .output()
        .expect("run cargo xtask")
}

/// Copies an image directory with its sub-folders (`acpi/`).
fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            copy_tree(&e.path(), &dst.join(e.file_name()));
        } else if t.is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// Packages `image` into `out` and returns the bundle's path.
fn package(image: &Path, out: &Path) -> PathBuf {
    let o = xtask(&[
        "image",
        "package",
        "--json",
        "--image",
        image.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "cargo xtask image package failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    PathBuf::from(v["archive"].as_str().unwrap())
}

/// Runs the audit; returns (exit code, JSON report, stderr).
fn audit(bundle: &Path) -> (i32, serde_json::Value, String) {
    let t = Instant::now();
    let o = xtask(&[
        "image",
        "audit",
        bundle.to_str().unwrap(),
        "--quiet",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!(
        "audit of {} took {:.1} s",
        bundle.display(),
        t.elapsed().as_secs_f64()
    );
    let report = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("audit printed no JSON report ({e}):\n{stderr}"));
    (o.status.code().unwrap_or(-1), report, stderr)
}

fn statuses(report: &serde_json::Value, list: &str) -> Vec<(String, String)> {
    report[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[if list == "parts" { "path" } else { "name" }]
                    .as_str()
                    .unwrap()
                    .to_string(),
                p["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn audit_reproduces_a_bundle_and_names_a_flipped_vmlinuz() {
    let tmp = tempfile::tempdir().unwrap();
    let honest = tmp.path().join("honest/worker");
    copy_tree(image_dir(), &honest);
    let bundle = package(&honest, &tmp.path().join("release"));

    let (code, report, stderr) = audit(&bundle);
    assert_eq!(
        code, 0,
        "an untouched bundle of this checkout must reproduce:\n{report:#}\n{stderr}"
    );
    assert_eq!(report["verdict"], "reproduced");
    assert_eq!(report["bundle"]["checksum_file"]["status"], "matches");
    let parts = statuses(&report, "parts");
    assert_eq!(
        parts.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
        ["OVMF.fd", "vmlinuz", "initrd", "cmdline", "manifest.json"]
    );
    assert!(parts.iter().all(|p| p.1 == "identical"), "{parts:?}");
    let registers = statuses(&report, "registers");
    // The seven top-level registers and hashes, then RTMR0 and both hashes of every TDX shape.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(honest.join("manifest.json")).unwrap()).unwrap();
    let shapes = manifest["launch"]["tdx"]["shapes"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(registers.len(), 7 + 3 * shapes, "{registers:?}");
    assert!(
        registers
            .iter()
            .skip(7)
            .all(|(n, _)| n.starts_with("shapes.")),
        "{registers:?}"
    );
    for (name, status) in &registers {
        let captured = match name.strip_prefix("shapes.") {
            Some(rest) => {
                let shape = rest.split('.').next().unwrap_or_default();
                honest.join("acpi/shapes").join(shape).is_dir()
            }
            None => honest.join("acpi").join("tables").is_file(),
        };
        let want = if ["mrtd", "rtmr1", "rtmr2", "rtmr3"].contains(&name.as_str()) || captured {
            "match"
        } else {
            "absent"
        };
        assert_eq!(status, want, "{name}: {registers:?}");
    }

    let tampered = tmp.path().join("tampered/worker");
    copy_tree(&honest, &tampered);
    let mut kernel = std::fs::read(tampered.join("vmlinuz")).unwrap();
    let mid = kernel.len() / 2;
    kernel[mid] ^= 0x01;
    std::fs::write(tampered.join("vmlinuz"), kernel).unwrap();
    let bundle = package(&tampered, &tmp.path().join("tampered-release"));

    let (code, report, stderr) = audit(&bundle);
    assert_eq!(
        code, 3,
        "a flipped vmlinuz byte must not reproduce:\n{report:#}\n{stderr}"
    );
    assert_eq!(report["verdict"], "not_reproduced");
    let differing: Vec<String> = statuses(&report, "parts")
        .into_iter()
        .filter(|p| p.1 != "identical")
        .map(|p| format!("{} {}", p.0, p.1))
        .collect();
    assert_eq!(differing, ["vmlinuz differs"]);
    assert_eq!(
        report["failures"],
        serde_json::json!(["vmlinuz differs from the rebuild"])
    );
}
