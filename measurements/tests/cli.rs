//! End-to-end tests of the `measurements` binary on the shared fixtures: JSON shape, lowercase
//! hex, missing-input reporting and error messages.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var_os("WORKER_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        });
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: fixtures not found at {}", dir.display());
        assert!(
            std::env::var_os("CI").is_none(),
            "fixtures are required when CI is set"
        );
        None
    }
}

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_measurements"))
        .args(args)
        .output()
        .expect("run measurements");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn compute_json_leaves_out_what_it_cannot_compute() {
    let Some(f) = fixtures() else { return };
    let fw = f.join("firmware/debian-ovmf-2025.02-8+deb13u1-OVMF.fd");
    let (code, out, err) = run(&[
        "compute",
        "--firmware",
        fw.to_str().expect("utf8"),
        "--memory",
        "1024M",
        "--cpus",
        "1",
        "--cmdline",
        "console=ttyS0",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let mrtd = v["mrtd"].as_str().expect("mrtd");
    assert_eq!(mrtd.len(), 96);
    assert_eq!(mrtd, mrtd.to_lowercase());
    assert!(v.get("rtmr0").is_none());
    assert!(v.get("rtmr1").is_none());
    assert!(v["rtmr2"].is_string());
    assert!(
        v["missing"]["rtmr0"]
            .as_str()
            .expect("reason")
            .contains("ACPI")
    );
}

#[test]
fn quote_json_has_image_hashes_and_event_log_replays() {
    let Some(f) = fixtures() else { return };
    let q = f.join("ccel/go-tdx-guest-cos-113-tdx-quote.dat");
    let (code, out, err) = run(&["quote", q.to_str().expect("utf8"), "--json"]);
    assert_eq!(code, 0, "{err}");
    let qv: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(qv["image_hash_cocoon_v1"].as_str().map(str::len), Some(64));
    assert_eq!(qv["image_hash_cw_v1"].as_str().map(str::len), Some(64));
    let t = f.join("ccel/go-tdx-guest-cos-ccel_table.dat");
    let d = f.join("ccel/go-tdx-guest-cos-ccel_data.dat");
    let (code, out, err) = run(&[
        "event-log",
        "--ccel-table",
        t.to_str().expect("utf8"),
        "--ccel-data",
        d.to_str().expect("utf8"),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let lv: serde_json::Value = serde_json::from_str(&out).expect("json");
    for r in ["rtmr0", "rtmr1", "rtmr2"] {
        assert_eq!(lv[r], qv["report"][r], "{r}");
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let Some(f) = fixtures() else { return };
    let acpi = f.join("acpi/qemu-tdx-1cpu-1g.acpi-tables.bin");
    // Not a firmware.
    let (code, _, err) = run(&[
        "compute",
        "--firmware",
        acpi.to_str().expect("utf8"),
        "--memory",
        "1G",
        "--cpus",
        "1",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("no TDVF metadata"), "{err}");
    // Not a quote.
    let (code, _, err) = run(&["quote", acpi.to_str().expect("utf8")]);
    assert_eq!(code, 1);
    assert!(err.contains("TDX quote"), "{err}");
    // Bad size.
    let fw = f.join("firmware/debian-ovmf-2025.02-8+deb13u1-OVMF.fd");
    let (code, _, err) = run(&[
        "compute",
        "--firmware",
        fw.to_str().expect("utf8"),
        "--memory",
        "1Q",
        "--cpus",
        "1",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("size"), "{err}");
}

#[test]
fn diff_explains_a_log_mismatch() {
    let Some(f) = fixtures() else { return };
    let fw = f.join("firmware/debian-ovmf-2025.02-8+deb13u1-OVMF.fd");
    let d = f.join("ccel/go-tdx-guest-cos-ccel_data.dat");
    let q = f.join("ccel/go-tdx-guest-cos-113-tdx-quote.dat");
    let (code, out, err) = run(&[
        "diff",
        "--firmware",
        fw.to_str().expect("utf8"),
        "--memory",
        "1G",
        "--cpus",
        "1",
        "--cmdline",
        "console=ttyS0",
        "--quote",
        q.to_str().expect("utf8"),
        "--ccel-data",
        d.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("MRTD differs"), "{out}");
    assert!(
        out.contains("RTMR2 differs: expected cmdline digest"),
        "{out}"
    );
    assert!(out.contains("RTMR0 not compared"), "{out}");
}

#[test]
fn acpi_diff_compares_the_real_td_tables_table_by_table() {
    let Some(f) = fixtures() else { return };
    let real = f.join("acpi/qemu-tdx-1cpu-1g.acpi-tables.bin");
    let real = real.to_str().expect("utf-8 path");
    let (code, out, err) = run(&["acpi-diff", real, real, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let sigs: Vec<&str> = v["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|t| t["signature"].as_str().expect("signature"))
        .collect();
    assert_eq!(
        sigs,
        ["FACS", "DSDT", "FACP", "APIC", "MCFG", "WAET", "RSDT"]
    );
    // One edge-triggered override turned level: the MADT differs and says how.
    let mut bytes = std::fs::read(real).expect("fixture");
    let madt = bytes.windows(4).position(|w| w == b"APIC").expect("a MADT");
    let first_override = (madt + 44..madt + 230)
        .find(|&o| bytes[o] == 2 && bytes[o + 1] == 10)
        .expect("an interrupt source override");
    bytes[first_override + 8] = 0x0d;
    let d = tempfile::tempdir().expect("tmp");
    let changed = d.path().join("tables");
    std::fs::write(&changed, &bytes).expect("write");
    let (code, out, _) = run(&["acpi-diff", real, changed.to_str().expect("utf-8")]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("APIC  differs"), "{out}");
    assert!(out.contains("MADT interrupt source overrides"), "{out}");
    let (code, _, err) = run(&["acpi-diff", real, "/nonexistent/tables"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/tables"), "{err}");
}
