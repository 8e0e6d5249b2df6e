//! End-to-end: the Rust root-contract client against the local chain (`contract/chain/server.mjs`,
//! a real TVM in @ton/sandbox behind a toncenter v2 HTTP subset).
//!
//! Publishes an image hash with a v4r2 and a v5r1 team wallet, checks idempotency (a second
//! publish sends nothing), removal, the owner check, and that message bodies built in Rust are
//! accepted by the Tolk contract byte for byte.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e_tests::{host_launcher, repo_root, skip};
use ton_root::ops::{Change, HashUpdate};
use ton_root::publish::{Outcome, PublishOptions, Publisher};
use ton_root::wallet::{Network, Signer, WalletKind, parse_address};
use ton_root::{Hash256, HashKind, Toncenter, ToncenterConfig};

/// The running chain; killed on drop.
struct Chain {
    child: Child,
    state: serde_json::Value,
}

impl Drop for Chain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_chain(wallet: &str) -> Option<Chain> {
    let contract = repo_root().join("contract");
    if !contract.join("node_modules/@ton/sandbox").is_dir() {
        skip(
            "local chain",
            "contract/node_modules is missing: run `cd contract && npm ci` (cargo xtask test does)",
        );
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let state_file = dir.path().join("state.json");
    let mut child = Command::new("node")
        .current_dir(&contract)
        .args([
            "chain/server.mjs",
            "--port",
            "0",
            "--json",
            "--wallet",
            wallet,
            "--state-file",
        ])
        .arg(&state_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node must be installed to run the local chain");
    // The service prints one JSON line when ready.
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("ready line");
    assert!(
        !line.trim().is_empty(),
        "local chain exited before it was ready"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).expect("state file"))
            .expect("state json");
    Some(Chain { child, state })
}

/// The team wallet's mnemonic from the state file (an array of words or one string).
fn mnemonic_words(state: &serde_json::Value) -> String {
    let m = &state["wallet"]["mnemonic"];
    m.as_array().map_or_else(
        || m.as_str().expect("mnemonic").to_string(),
        |a| {
            a.iter()
                .filter_map(|w| w.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        },
    )
}

fn client(chain: &Chain) -> (Publisher<Toncenter>, Signer) {
    let s = &chain.state;
    let rpc = s["rpc_url"].as_str().expect("rpc_url");
    let mut cfg = ToncenterConfig::new(rpc);
    cfg.timeout = Duration::from_secs(20);
    let root = parse_address(s["root"]["address"].as_str().expect("root"), Network::Local)
        .expect("root address");
    let kind: WalletKind = s["wallet"]["version"]
        .as_str()
        .expect("version")
        .parse()
        .expect("kind");
    let words = mnemonic_words(s);
    let signer = Signer::from_mnemonic(&words, kind).expect("mnemonic");
    let expected = parse_address(
        s["wallet"]["address"].as_str().expect("wallet"),
        Network::Local,
    )
    .expect("addr");
    assert_eq!(
        signer.address(),
        &expected,
        "Rust derives the same {kind:?} wallet address as @ton/ton"
    );
    (Publisher::new(Toncenter::new(cfg), root), signer)
}

fn opts() -> PublishOptions {
    PublishOptions {
        poll_interval: Duration::from_millis(200),
        wait: Duration::from_secs(30),
        ..PublishOptions::default()
    }
}

#[test]
fn publish_check_and_remove_against_the_local_chain() {
    for wallet in ["v4r2", "v5r1"] {
        let Some(chain) = start_chain(wallet) else {
            return;
        };
        let (p, signer) = client(&chain);
        let hash: Hash256 = "c0ffee00".repeat(8).parse().expect("hash");
        let add = HashUpdate {
            kind: HashKind::Image,
            change: Change::Add,
            query_id: 1,
            hash,
        };

        assert!(!p.is_listed(HashKind::Image, &hash).expect("check before"));
        let dry = p
            .apply(
                &signer,
                add,
                &PublishOptions {
                    dry_run: true,
                    ..opts()
                },
            )
            .expect("dry run");
        assert!(matches!(dry, Outcome::DryRun { .. }), "{dry:?}");
        assert!(
            !p.is_listed(HashKind::Image, &hash)
                .expect("dry run sent nothing")
        );

        let out = p.apply(&signer, add, &opts()).expect("publish");
        assert!(
            matches!(out, Outcome::Confirmed { .. }),
            "{wallet}: {out:?}"
        );
        assert!(p.is_listed(HashKind::Image, &hash).expect("check after"));
        assert!(
            !p.is_listed(HashKind::Model, &hash)
                .expect("other list untouched")
        );
        assert_eq!(
            p.apply(&signer, add, &opts()).expect("again"),
            Outcome::AlreadyDone
        );

        let model = HashUpdate {
            kind: HashKind::Model,
            ..add
        };
        assert!(matches!(
            p.apply(&signer, model, &opts()).expect("model"),
            Outcome::Confirmed { .. }
        ));
        assert!(p.is_listed(HashKind::Model, &hash).expect("model listed"));

        let remove = HashUpdate {
            change: Change::Remove,
            ..add
        };
        assert!(matches!(
            p.apply(&signer, remove, &opts()).expect("remove"),
            Outcome::Confirmed { .. }
        ));
        assert!(!p.is_listed(HashKind::Image, &hash).expect("removed"));

        // A stranger's wallet is refused before anything is sent.
        let stranger = Signer::from_seed(&[5u8; 32], WalletKind::V4R2).expect("seed");
        let e = p.apply(&stranger, add, &opts()).expect_err("not the owner");
        assert!(e.to_string().contains("is not the owner"), "{e}");
    }
}

#[test]
fn host_launcher_publish_and_check_onchain_cli() {
    let Some(chain) = start_chain("v4r2") else {
        return;
    };
    let s = &chain.state;
    let dir = tempfile::tempdir().expect("tmp");
    let mnemonic = dir.path().join("team.mnemonic");
    let words = mnemonic_words(s);
    std::fs::write(&mnemonic, words).expect("write mnemonic");
    let root = s["root"]["address"].as_str().expect("root");
    let rpc = s["rpc_url"].as_str().expect("rpc");
    let hash = "5eed".repeat(16);
    let chain_args = ["--root", root, "--rpc", rpc, "--network", "local"];
    let run = |args: &[&str]| {
        let out = std::process::Command::new(host_launcher())
            .args(args)
            .args(chain_args)
            .output()
            .expect("run host-launcher");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    let (code, out, err) = run(&["check-onchain", &hash]);
    assert_eq!(code, Some(3), "not yet approved: exit 3\n{out}{err}");
    assert!(out.contains("NOT approved"), "{out}");

    let m = mnemonic.to_str().expect("utf8");
    let (code, out, err) = run(&[
        "publish",
        "image-hash",
        &hash,
        "--mnemonic-file",
        m,
        "--dry-run",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["status"], "dry-run");
    assert!(v["boc_base64"].as_str().is_some_and(|b| !b.is_empty()));

    let (code, out, err) = run(&["publish", "image-hash", &hash, "--mnemonic-file", m]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("confirmed"), "{out}");
    let (code, out, err) = run(&["publish", "image-hash", &hash, "--mnemonic-file", m]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("already approved: nothing sent"), "{out}");

    let (code, out, _) = run(&["check-onchain", &hash, "--json"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(out.trim()).expect("json")["approved"],
        true
    );

    let (code, _, err) = run(&["publish", "image-hash", "abcd", "--mnemonic-file", m]);
    assert_eq!(code, Some(1));
    assert!(err.contains("expected 64"), "{err}");
    let (code, out, err) = run(&["remove", "image-hash", &hash, "--mnemonic-file", m]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, _) = run(&["check-onchain", &hash]);
    assert_eq!(code, Some(3));
}

/// `host-launcher run` with a root contract refuses an image whose hash the root does not list,
/// and boots it once the hash is published. The image copy carries the ACPI tables of the shared
/// fixture (1 vCPU, 1 GiB), so the launch uses that configuration.
#[test]
fn run_refuses_an_unapproved_image_and_boots_an_approved_one() {
    if !e2e_tests::qemu_or_skip("run with root contract") {
        return;
    }
    let tables = repo_root().join("../shared/fixtures/acpi/qemu-tdx-1cpu-1g.acpi-tables.bin");
    if !tables.is_file() {
        skip("run with root contract", "shared fixtures not found");
        return;
    }
    let Some(chain) = start_chain("v4r2") else {
        return;
    };
    let s = &chain.state;
    let root = s["root"]["address"].as_str().expect("root");
    let rpc = s["rpc_url"].as_str().expect("rpc");
    let dir = tempfile::tempdir().expect("tmp");
    let image = dir.path().join("worker");
    e2e_tests::copy_image(e2e_tests::image_dir(), &image);
    std::fs::create_dir_all(image.join("acpi")).expect("acpi dir");
    std::fs::copy(&tables, image.join("acpi/tables")).expect("copy tables");
    let m = measurements::image::measure_image_dir(
        &image,
        &measurements::image::Options {
            memory: Some(1 << 30),
            cpus: Some(1),
            ..measurements::image::Options::default()
        },
    )
    .expect("measure");
    let hash = m.image_hash_cw_v1.expect("cw-v1 hash with ACPI tables");

    let run = |extra: &[&str]| {
        std::process::Command::new(host_launcher())
            .arg("run")
            .arg("--image")
            .arg(&image)
            .args([
                "--tee",
                "none",
                "--memory",
                "1G",
                "--cpus",
                "1",
                "--exit-when-healthy",
            ])
            .args(["--root-contract", root, "--rpc", rpc, "--network", "local"])
            .args(extra)
            .output()
            .expect("run host-launcher")
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "unapproved image must not boot:\n{err}"
    );
    assert!(
        err.contains(&format!("image hash {hash} is not approved")),
        "{err}"
    );
    assert!(!err.contains("QEMU started"), "refused before QEMU: {err}");

    let (p, signer) = client(&chain);
    let add = HashUpdate {
        kind: HashKind::Image,
        change: Change::Add,
        query_id: 3,
        hash: hash.parse().expect("hash"),
    };
    assert!(matches!(
        p.apply(&signer, add, &opts()).expect("publish"),
        Outcome::Confirmed { .. }
    ));

    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "approved image boots:\n{err}");
    assert!(err.contains("is approved by root"), "{err}");
}
