//! End-to-end: the real `host-launcher` binary boots the real image under QEMU (no TEE; KVM where
//! `/dev/kvm` can run it, else TCG; `capture-acpi` always TCG).
//!
//! The image comes from `WORKER_IMAGE_DIR` when set, else `cargo xtask image build` builds one
//! into the target directory. Without `qemu-system-x86_64` the boot tests print
//! "SKIPPED: qemu-system-x86_64 not found", except under CI (`CI=true`), where they fail.
//! Tests that need neither QEMU nor an image (dry run, tampered image, early QEMU exit) always run.
//! `capture_acpi_...` runs `host-launcher capture-acpi` on a copy of the image and checks that
//! `measurements` then computes RTMR0 and both image hashes.
//!
//! Run: `cargo test -p e2e-tests --test boot -- --nocapture`.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use e2e_tests::{cargo, copy_image, host_launcher, image_dir, qemu_or_skip, repo_root};
use sha2::{Digest, Sha256, Sha384};

fn launcher(args: &[&str]) -> Output {
    Command::new(host_launcher())
        .args(args)
        .output()
        .expect("run host-launcher")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fake image (fake boot parts, correct manifest) for tests that do not boot.
fn fake_image(dir: &Path) {
    let parts: [(&str, &str, &[u8]); 4] = [
        ("OVMF.fd", "firmware", b"firmware"),
        ("cmdline", "cmdline", b"console=ttyS0 panic=-1"),
        ("initrd", "initrd", b"initrd"),
        ("vmlinuz", "kernel", b"kernel"),
    ];
    let files: Vec<_> = parts
        .iter()
        .map(|(name, role, data)| {
            fs::write(dir.join(name), data).unwrap();
            serde_json::json!({"path": name, "role": role,
                "sha256": hex::encode(Sha256::digest(data)), "size": data.len()})
        })
        .collect();
    let m = serde_json::json!({"schema_version": 1, "image": {"name": "worker", "version": "0.1.0"},
        "files": files, "launch": {"memory_mib": 1024, "cpus": 1, "tdx": {
            "qemu_versions": ["10.1"], "machine": "pc-q35-10.1",
            "shapes": [{"name": "gpu-1c-1g", "memory_mib": 1024, "cpus": 1, "gpus": 1,
                        "pci_hole64_gib": 64}]}}});
    fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
}

#[test]
fn boot_tcg_until_healthy_then_stop_cleanly() {
    if !qemu_or_skip("boot_tcg_until_healthy_then_stop_cleanly") {
        return;
    }
    let image = image_dir();
    let manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(image.join("manifest.json")).unwrap()).unwrap();
    let run = tempfile::tempdir().unwrap();
    let wallet = "EQCns7bYSp0igFvS1wpb5wsZjCKCV19MD5AVzI4EyxsnU73k";
    host_launcher(); // built before the clock starts
    let started = std::time::Instant::now();
    let out = launcher(&[
        "run",
        "--image",
        image.to_str().unwrap(),
        "--tee",
        "none",
        "--exit-when-healthy",
        "--json",
        "--health-timeout",
        "240",
        "--payout-wallet",
        wallet,
        "--run-dir",
        run.path().to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "host-launcher failed: {stderr}");
    let health: worker_api::Health = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not Health JSON ({e}): {}", text(&out.stdout)));
    assert_eq!(health.status, "ok");
    assert_eq!(
        health.image.name,
        manifest["image"]["name"].as_str().unwrap()
    );
    assert_eq!(
        health.image.version,
        manifest["image"]["version"].as_str().unwrap()
    );
    // --tee none hands the guest the simulated TEE; the launcher verified it over RA-TLS.
    assert_eq!(health.tee.kind, "simulated");
    assert!(!health.tee.tdx_guest_device);
    // A --tee none guest (KVM or TCG) is no TD: tdx-guest.ko finds no TDX and creates no measurement registers.
    assert!(!health.tee.rtmr3_sysfs);
    assert!(
        stderr.contains("host-launcher: attestation verified"),
        "{stderr}"
    );
    let sent = fs::read(run.path().join("host-config.json")).unwrap();
    assert!(text(&sent).contains(wallet));
    let hc = health
        .host_config
        .expect("the agent reports the host config");
    assert_eq!(hc.sha384, hex::encode(Sha384::digest(&sent)));
    assert_eq!(hc.error, None);
    // A TCG guest has no GPU: the agent says so plainly and serves on CPU.
    let gpu = health.gpu.as_ref().expect("the agent reports the GPU");
    assert!(!gpu.present && !gpu.serving, "{gpu:?}");
    assert_eq!(gpu.summary, worker_api::NO_GPU_SUMMARY);
    let console = fs::read(run.path().join("console.log")).unwrap();
    assert!(
        text(&console)
            .contains("gpu: no GPU present (no NVIDIA PCI device, vendor 0x10de); serving on CPU"),
        "console log lacks the no-GPU line"
    );
    assert!(
        text(&console).contains(worker_api::READY_MARKER),
        "console log lacks {:?}",
        worker_api::READY_MARKER
    );
    assert!(
        stderr.contains("guest stopped (agent powered off"),
        "{stderr}"
    );
    let healthy = stderr
        .lines()
        .find_map(|l| l.strip_prefix("host-launcher: guest healthy after "))
        .unwrap_or("?");
    let accel = stderr
        .lines()
        .find_map(|l| l.strip_prefix("host-launcher: accelerator: "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the launcher names its accelerator");
    eprintln!(
        "MEASURED: {accel} boot to healthy {healthy}; whole run incl. clean stop {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn dry_run_tdx_prints_the_tdx_guest_object() {
    let d = tempfile::tempdir().unwrap();
    fake_image(d.path());
    let run = d.path().join("run");
    let out = launcher(&[
        "run",
        "--image",
        d.path().to_str().unwrap(),
        "--tee",
        "tdx",
        "--gpu",
        "0000:3B:00.0",
        "--listen-port",
        "18443",
        "--run-dir",
        run.to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The host preflight runs but a dry run does not enforce it (this host need not have the GPU).
    let err = text(&out.stderr);
    assert!(err.contains("host-launcher: preflight"), "{err}");
    if !std::path::Path::new("/sys/bus/pci/devices/0000:3b:00.0").exists() {
        assert!(
            err.contains("preflight (not enforced with --dry-run): no PCI device 0000:3b:00.0"),
            "{err}"
        );
    }
    let line = text(&out.stdout);
    assert_eq!(line.lines().count(), 1, "one invocation: {line}");
    for want in [
        r#"-object '{"qom-type":"tdx-guest","id":"tdx","quote-generation-socket":{"type":"vsock","cid":"2","port":"4050"}}'"#,
        "-accel kvm -cpu host",
        "confidential-guest-support=tdx",
        "-object memory-backend-ram,id=mem0,size=1024M",
        "-machine pc-q35-10.1,kernel-irqchip=split,smm=off,pic=off,hpet=off,",
        "-global q35-pcihost.pci-hole64-size=64G",
        "-device pcie-root-port,id=rp0,bus=pcie.0,addr=0x10.0,chassis=1",
        "-device vfio-pci,host=0000:3b:00.0,bus=rp0,iommufd=iommufd0",
        "hostfwd=tcp:127.0.0.1:18443-:8443",
        "-fw_cfg name=opt/org.confidential-worker/config,file=",
    ] {
        assert!(line.contains(want), "missing {want} in {line}");
    }
    assert_eq!(
        fs::read(run.join("host-config.json")).unwrap(),
        worker_api::HostConfig::default().to_canonical_json()
    );

    // --tee none: TCG when asked for; with the default (auto) the accelerator the launcher
    // announces is the one on the command line (KVM only where /dev/kvm can run the guest).
    for (accel, want) in [(Some("tcg"), Some("tcg")), (None, None)] {
        let mut args = vec![
            "run",
            "--image",
            d.path().to_str().unwrap(),
            "--tee",
            "none",
            "--run-dir",
            run.to_str().unwrap(),
            "--dry-run",
            "--json",
        ];
        if let Some(a) = accel {
            args.extend(["--accel", a]);
        }
        let out = launcher(&args);
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let announced = stderr
            .lines()
            .find_map(|l| l.strip_prefix("host-launcher: accelerator: "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no accelerator line in {stderr}"))
            .to_owned();
        if let Some(w) = want {
            assert_eq!(announced, w, "{stderr}");
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let argv: Vec<&str> = v["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let cpu = if announced == "kvm" { "host" } else { "max" };
        assert!(
            argv.windows(4)
                .any(|w| w == ["-accel", announced.as_str(), "-cpu", cpu]),
            "{argv:?}"
        );
        assert!(!argv.iter().any(|a| a.contains("tdx")), "{argv:?}");
    }
}

#[test]
fn tampered_image_is_refused_before_boot() {
    let d = tempfile::tempdir().unwrap();
    fake_image(d.path());
    fs::write(d.path().join("initrd"), b"initrX").unwrap();
    let out = launcher(&[
        "run",
        "--image",
        d.path().to_str().unwrap(),
        "--tee",
        "none",
        "--dry-run",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("image file `initrd` does not match manifest.json"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn early_qemu_exit_reports_status_and_console_tail() {
    let d = tempfile::tempdir().unwrap();
    fake_image(d.path());
    // A stand-in QEMU: answers --version, writes console lines to the -chardev file, exits 3.
    let fake = d.path().join("fake-qemu");
    fs::write(
        &fake,
        "#!/bin/sh\n\
         if [ \"$1\" = --version ]; then echo 'QEMU emulator version 10.0.2'; exit 0; fi\n\
         for a in \"$@\"; do case \"$a\" in file,id=con,path=*) log=\"${a#file,id=con,path=}\";; esac; done\n\
         i=1; while [ $i -le 30 ]; do echo \"console line $i\" >> \"$log\"; i=$((i+1)); done\n\
         echo 'qemu: could not load kernel' >&2\n\
         exit 3\n",
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let out = launcher(&[
        "run",
        "--image",
        d.path().to_str().unwrap(),
        "--tee",
        "none",
        "--qemu",
        fake.to_str().unwrap(),
        "--run-dir",
        d.path().join("run").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("QEMU exited before the guest became healthy (exit code 3)"),
        "{err}"
    );
    assert!(err.contains("qemu: could not load kernel"), "{err}");
    assert!(
        err.contains("console line 30") && err.contains("console line 11"),
        "{err}"
    );
    assert!(
        !err.contains("console line 10\n"),
        "only the last 20 lines: {err}"
    );
}

#[test]
fn health_timeout_stops_qemu_and_fails() {
    let d = tempfile::tempdir().unwrap();
    fake_image(d.path());
    // A stand-in QEMU that never boots anything (and has no QMP socket): it must be killed.
    let fake = d.path().join("fake-qemu");
    fs::write(
        &fake,
        "#!/bin/sh
         if [ \"$1\" = --version ]; then echo 'QEMU emulator version 10.0.2'; exit 0; fi
         exec sleep 60
",
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let started = std::time::Instant::now();
    let out = launcher(&[
        "run",
        "--image",
        d.path().to_str().unwrap(),
        "--tee",
        "none",
        "--qemu",
        fake.to_str().unwrap(),
        "--health-timeout",
        "2",
        "--run-dir",
        d.path().join("run").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("did not answer GET /health") && err.contains("within 2 s"),
        "{err}"
    );
    assert!(err.contains("killed"), "{err}");
    assert!(started.elapsed().as_secs() < 30, "stopped promptly");
}

#[test]
fn bundle_from_xtask_package_is_checked_and_unpacked() {
    if !qemu_or_skip("bundle_from_xtask_package_is_checked_and_unpacked") {
        return;
    }
    let image = image_dir();
    let d = tempfile::tempdir().unwrap();
    let st = Command::new(cargo())
        .current_dir(repo_root())
        .args([
            "run", "--quiet", "-p", "xtask", "--", "image", "package", "--image",
        ])
        .arg(image)
        .arg("--out")
        .arg(d.path())
        .status()
        .expect("run cargo xtask image package");
    assert!(st.success(), "cargo xtask image package failed ({st})");
    let bundle = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".tar.zst"))
        .expect("a .tar.zst bundle");
    let cache = d.path().join("cache");
    let args = |b: &Path| {
        launcher(&[
            "run",
            "--image",
            b.to_str().unwrap(),
            "--tee",
            "none",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--run-dir",
            d.path().join("run").to_str().unwrap(),
            "--dry-run",
        ])
    };
    let out = args(&bundle);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("-kernel {}", cache.join("images").display())),
        "{}",
        text(&out.stdout)
    );
    // A bundle that does not match its .sha256 is refused.
    let mut bytes = fs::read(&bundle).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&bundle, bytes).unwrap();
    let out = args(&bundle);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not match"),
        "{}",
        text(&out.stderr)
    );
}

/// Copies the regular files of `src` (the image's top level) into `dst`.
#[test]
fn capture_acpi_makes_rtmr0_and_image_hashes_computable() {
    if !qemu_or_skip("capture_acpi_makes_rtmr0_and_image_hashes_computable") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let image = d.path().join("worker");
    copy_image(image_dir(), &image);
    let opts = measurements::image::Options::default();
    let before = measurements::image::measure_image_dir(&image, &opts).unwrap();
    assert!(before.rtmr0.is_none() && before.missing.contains_key("rtmr0"));

    let out = launcher(&[
        "capture-acpi",
        "--image",
        image.to_str().unwrap(),
        "--health-timeout",
        "240",
        "--run-dir",
        d.path().join("run").to_str().unwrap(),
        "--json",
    ]);
    let stderr = text(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "capture-acpi failed: {stderr}");
    assert!(stderr.contains("captured under TCG"), "{stderr}");
    // The default reads the blobs from QEMU once the firmware has read them (no kernel boot;
    // tdx_tables.rs checks that booting the image and asking the agent gives the same bytes).
    assert!(
        stderr.contains("firmware read the tables after"),
        "not a firmware capture: {stderr}"
    );
    let record: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&out.stdout)));
    assert_eq!(record["via"], "firmware", "{record}");
    assert_eq!(record["shape"], "cpu-1c-2g", "{record}");
    assert_eq!(record["memory_mib"], 2048, "{record}");
    assert_eq!(record["cpus"], 1, "{record}");
    assert!(record["qemu_version"].as_str().unwrap().starts_with("10."));

    let acpi = image.join("acpi");
    let rsdp = fs::read(acpi.join("rsdp")).unwrap();
    assert!(rsdp.starts_with(b"RSD PTR ") && (rsdp.len() == 20 || rsdp.len() == 36));
    assert_eq!(fs::read(acpi.join("table-loader")).unwrap().len() % 128, 0);
    assert!(!fs::read(acpi.join("tables")).unwrap().is_empty());
    let rec: serde_json::Value =
        serde_json::from_slice(&fs::read(acpi.join("capture.json")).unwrap()).unwrap();
    assert_eq!(rec["files"][0]["file"], "tables");

    let after = measurements::image::measure_image_dir(&image, &opts).unwrap();
    assert!(after.rtmr0.is_some(), "missing: {:?}", after.missing);
    assert!(!after.missing.contains_key("rtmr0"), "{:?}", after.missing);
    let cocoon = after.image_hash_cocoon_v1.expect("cocoon-v1 image hash");
    let cw = after.image_hash_cw_v1.expect("cw-v1 image hash");
    assert_eq!((cocoon.len(), cw.len()), (64, 64));
    // The other registers do not depend on ACPI.
    assert_eq!(after.mrtd.to_string(), before.mrtd.to_string());
    assert_eq!(after.rtmr1.to_string(), before.rtmr1.to_string());
    eprintln!(
        "rtmr0 {} cocoon-v1 {cocoon} cw-v1 {cw}",
        after.rtmr0.map(|r| r.to_string()).unwrap_or_default()
    );
}
