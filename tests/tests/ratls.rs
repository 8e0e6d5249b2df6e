//! End-to-end RA-TLS with the simulated TEE: the real image boots (KVM or TCG) with
//! `host-launcher run --tee none`; the agent inside proves itself over RA-TLS (simulated quote
//! with the image's registers, RTMR3 event log) and the launcher verifies it before "ready"; then
//! `host-launcher verify --url ...` checks the running worker:
//!
//! - with `--allow-simulated --simulated-key K --image DIR --host-config F --json`: exit 0,
//!   accepted, image hash = the image's cw-v1, RTMR3 replayed and host config checked;
//! - without `--allow-simulated`: refused (exit 3) with a reason naming simulated evidence;
//! - with a wrong key: refused; with an allow-list lacking the image's hash: refused; with another
//!   host config: refused; a closed port: unreachable (exit 4).
//!
//! The image needs captured ACPI tables for its image hash: when `WORKER_IMAGE_DIR` has no
//! `acpi/`, a copy is captured first (`host-launcher capture-acpi`, one more TCG boot).
//! Without QEMU: "SKIPPED" (a failure under CI).
//!
//! Run: `WORKER_IMAGE_DIR=$PWD/out/worker cargo test -p e2e-tests --test ratls -- --nocapture`.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e_tests::{copy_image, host_launcher, image_dir, qemu_or_skip};

fn launcher(args: &[&str]) -> Output {
    Command::new(host_launcher())
        .args(args)
        .output()
        .expect("run host-launcher")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The image to boot, with `acpi/` (captured into a copy when missing).
fn image_with_acpi(tmp: &Path) -> PathBuf {
    let src = image_dir();
    if src.join("acpi").is_dir() {
        return src.to_path_buf();
    }
    let image = tmp.join("worker");
    copy_image(src, &image);
    eprintln!("ratls: capturing ACPI tables into a copy of the image (one TCG boot)");
    let out = launcher(&[
        "capture-acpi",
        "--image",
        image.to_str().unwrap(),
        "--health-timeout",
        "300",
        "--run-dir",
        tmp.join("capture-run").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "capture-acpi failed: {}",
        text(&out.stderr)
    );
    image
}

/// Stops the launcher (SIGTERM: clean guest stop) when dropped.
struct Running {
    child: Child,
    log: mpsc::Receiver<String>,
    seen: String,
}

impl Running {
    fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        while !self.seen.contains(needle) {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {needle:?} within {timeout:?}; launcher said:\n{}",
                self.seen
            );
            match self.log.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok(line) => {
                    eprintln!("  launcher: {line}");
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "the launcher exited ({:?}) before {needle:?}:\n{}",
                    self.child.try_wait(),
                    self.seen
                ),
            }
        }
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                while let Ok(l) = self.log.try_recv() {
                    self.seen.push_str(&l);
                    self.seen.push('\n');
                }
                return s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("the launcher did not stop after SIGTERM:\n{}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn verify(args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = launcher(&all);
    let code = out.status.code().unwrap_or(-1);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}): {}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    (code, v, text(&out.stderr))
}

fn codes(v: &serde_json::Value) -> Vec<String> {
    v["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["code"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ratls_simulated_tee_end_to_end() {
    if !qemu_or_skip("ratls_simulated_tee_end_to_end") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = image_with_acpi(tmp.path());
    let run = tmp.path().join("run");
    let port = free_port();
    let wallet = "EQCns7bYSp0igFvS1wpb5wsZjCKCV19MD5AVzI4EyxsnU73k";
    host_launcher();
    let started = Instant::now();
    let mut child = Command::new(host_launcher())
        .args([
            "run",
            "--image",
            image.to_str().unwrap(),
            "--tee",
            "none",
            "--health-timeout",
            "300",
            "--payout-wallet",
            wallet,
            "--listen-port",
            &port.to_string(),
            "--run-dir",
            run.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn host-launcher run");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut r = Running {
        child,
        log: rx,
        seen: String::new(),
    };
    r.wait_for(
        "host-launcher: check it yourself:",
        Duration::from_secs(420),
    );
    eprintln!(
        "ratls: booted and verified by the launcher in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        r.seen.contains("attestation verified") && r.seen.contains("image hash = booted image"),
        "{}",
        r.seen
    );
    assert!(r.seen.contains("(SIMULATED)"), "{}", r.seen);

    let url = format!("https://127.0.0.1:{port}");
    let key_file = run.join("simulated-tee.pub");
    let key = format!("@{}", key_file.display());
    let host_config = run.join("host-config.json");
    let expected_hash = {
        let m = measurements::image::measure_image_dir(
            &image,
            &measurements::image::Options::default(),
        )
        .unwrap();
        m.image_hash_cw_v1.expect("cw-v1 with acpi/")
    };

    // Accepted with the launcher's own simulator key, the image and the host config.
    let t = Instant::now();
    let (code, v, err) = verify(&[
        "--url",
        &url,
        "--allow-simulated",
        "--simulated-key",
        &key,
        "--image",
        image.to_str().unwrap(),
        "--host-config",
        host_config.to_str().unwrap(),
    ]);
    eprintln!(
        "ratls: verify (handshake + /attestation) took {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(code, 0, "{v}\n{err}");
    assert_eq!(v["accepted"], true, "{v}");
    assert_eq!(v["simulated"], true, "{v}");
    assert_eq!(v["image_hash_cw_v1"], expected_hash.as_str(), "{v}");
    assert_eq!(v["image_hash_checked"], "cw-v1", "{v}");
    assert_eq!(v["rtmr3"]["host_config_checked"], true, "{v}");
    assert_eq!(v["rtmr3"]["replayed"], v["rtmr3"]["quote_rtmr3"], "{v}");
    assert_eq!(v["agent"]["tee"], "simulated", "{v}");
    let wallet_event = &v["agent"]["rtmr3_events"][2];
    assert_eq!(wallet_event["event_type"], "payout_wallet");
    assert_eq!(wallet_event["payload"], hex::encode(wallet), "{v}");

    // Refused without --allow-simulated, naming simulated evidence.
    let (code, v, _) = verify(&["--url", &url, "--simulated-key", &key]);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["accepted"], false);
    assert!(
        codes(&v).contains(&"simulated_not_allowed".to_owned()),
        "{v}"
    );
    assert!(v["reasons"].to_string().contains("simulated"), "{v}");

    // Refused with a key that is not the simulator's.
    let (code, v, _) = verify(&[
        "--url",
        &url,
        "--allow-simulated",
        "--simulated-key",
        &"5a".repeat(32),
    ]);
    assert_eq!(code, 3, "{v}");
    assert!(
        codes(&v).contains(&"simulated_signature_invalid".to_owned()),
        "{v}"
    );

    // Refused by an allow-list without the image's hash.
    let list = tmp.path().join("allow.json");
    std::fs::write(&list, format!("[\"{}\"]", "00".repeat(32))).unwrap();
    let (code, v, _) = verify(&[
        "--url",
        &url,
        "--allow-simulated",
        "--simulated-key",
        &key,
        "--allow-list",
        list.to_str().unwrap(),
    ]);
    assert_eq!(code, 3, "{v}");
    assert!(
        codes(&v).contains(&"image_hash_not_allowed".to_owned()),
        "{v}"
    );
    // ... and accepted by one that has it.
    std::fs::write(&list, format!("[\"{expected_hash}\"]")).unwrap();
    let (code, v, _) = verify(&[
        "--url",
        &url,
        "--allow-simulated",
        "--simulated-key",
        &key,
        "--allow-list",
        list.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{v}");

    // Refused when the worker measured another host config than the one expected.
    let other = tmp.path().join("other-config.json");
    std::fs::write(
        &other,
        br#"{"model":null,"model_sha256":null,"payout_wallet":null,"root_contract":null}"#,
    )
    .unwrap();
    let (code, v, _) = verify(&[
        "--url",
        &url,
        "--allow-simulated",
        "--simulated-key",
        &key,
        "--host-config",
        other.to_str().unwrap(),
    ]);
    assert_eq!(code, 3, "{v}");
    assert!(
        codes(&v).contains(&"host_config_mismatch".to_owned()),
        "{v}"
    );

    // The launcher stops the guest cleanly (POST /shutdown over RA-TLS).
    let status = r.stop();
    assert!(status.success(), "{status}\n{}", r.seen);
    assert!(r.seen.contains("agent powered off"), "{}", r.seen);

    // Nothing listens any more: unreachable, a distinct exit status.
    let (code, v, _) = verify(&["--url", &url, "--timeout", "3"]);
    assert_eq!(code, 4, "{v}");
    assert_eq!(v["unreachable"], true, "{v}");
}
