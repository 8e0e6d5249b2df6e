//! End-to-end: the Rust root-contract client against the local chain (`contract/chain/server.mjs`,
//! a real TVM in @ton/sandbox behind a toncenter v2 HTTP subset).
//!
//! Publishes an image hash with a v4r2 and a v5r1 team wallet, checks idempotency (a second
//! publish sends nothing), removal, the owner check, and that message bodies built in Rust are
//! accepted by the Tolk contract byte for byte. Then the readers: the root as a cached
//! allow-list, `verify-quote --root`, and the guest agent's approval gate.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use attestation::allowlist::{AllowList as _, AllowListError};

use e2e_tests::{host_launcher, repo_root, skip};
use ton_root::ops::{Change, HashUpdate};
use ton_root::publish::{Outcome, PublishOptions, Publisher};
use ton_root::wallet::{Network, Signer, WalletKind, parse_address};
use ton_root::{Hash256, HashKind, RootAllowList, Toncenter, ToncenterConfig};

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

    // Booted with a model the root does not list: inference is not served, and the guest's
    // answer names the model hash it got from the root (through ton_rpc = 10.0.2.2), which proves
    // the host config carries the endpoint and the guest reaches the host's chain.
    let Some(model) = std::env::var_os("SMOLLM2_GGUF")
        .map(std::path::PathBuf::from)
        .or_else(|| inference::default_model_path().ok())
        .filter(|p| p.is_file())
    else {
        skip(
            "run_refuses_an_unapproved_image_and_boots_an_approved_one (approved-image boot)",
            "SmolLM2 model not found: run `cargo xtask model fetch smollm2-135m` or set SMOLLM2_GGUF",
        );
        return;
    };
    let model_sha = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(
            std::fs::read(&model).expect("read model"),
        ))
    };
    let model_arg = model.display().to_string();
    let out = run(&[
        "--json",
        "--model",
        &model_arg,
        "--model-sha256",
        &model_sha,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "approved image boots:\n{err}");
    assert!(err.contains("is approved by root"), "{err}");
    let health: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "health JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let a = &health["approval"];
    assert_eq!(a["root"], root, "{health}");
    assert_eq!(a["model_hash"], model_sha.as_str(), "{health}");
    assert_eq!(a["state"], "not_approved", "{health}");
    let reason = a["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("model hash {model_sha} is not approved by root")),
        "the guest got an answer from the chain via 10.0.2.2: {reason}"
    );
    assert!(a["checked_at"].as_u64().is_some(), "{health}");
    assert!(
        err.contains("the guest does not serve inference"),
        "launcher warns: {err}"
    );
}

/// A manual clock for [`ton_root::RootAllowList`]: seconds since the epoch, advanced by the test.
fn manual_clock() -> (ton_root::allowlist::Clock, Arc<AtomicU64>) {
    let secs = Arc::new(AtomicU64::new(1_800_000_000));
    let s = secs.clone();
    (
        Arc::new(move || std::time::UNIX_EPOCH + Duration::from_secs(s.load(Ordering::SeqCst))),
        secs,
    )
}

fn publish_hash(chain: &Chain, kind: HashKind, change: Change, hash: &str) {
    let (p, signer) = client(chain);
    let update = HashUpdate {
        kind,
        change,
        query_id: u64::from(std::process::id()),
        hash: hash.parse().expect("hash"),
    };
    let out = p.apply(&signer, update, &opts()).expect("publish/remove");
    assert!(
        matches!(out, Outcome::Confirmed { .. } | Outcome::AlreadyDone),
        "{out:?}"
    );
}

/// The root contract as an `AllowList`: a negative answer is reused until `max_age`, then the
/// published hash is allowed; after a removal the cached "yes" lasts at most `max_age`.
#[test]
fn root_allow_list_follows_publish_and_remove_within_max_age() {
    let Some(chain) = start_chain("v4r2") else {
        return;
    };
    let s = &chain.state;
    let root = parse_address(s["root"]["address"].as_str().expect("root"), Network::Local)
        .expect("root address");
    let (clock, secs) = manual_clock();
    let mut cfg = ToncenterConfig::new(s["rpc_url"].as_str().expect("rpc"));
    cfg.timeout = Duration::from_secs(20);
    let list = RootAllowList::new(Toncenter::new(cfg), root.clone(), HashKind::Image)
        .with_max_age(Duration::from_secs(60))
        .with_clock(clock);
    let hex_hash = "a110".repeat(16);
    let h: Hash256 = hex_hash.parse().expect("hash");

    assert!(!list.contains(&h.0).expect("not yet published"));
    publish_hash(&chain, HashKind::Image, Change::Add, &hex_hash);
    assert!(
        !list.contains(&h.0).expect("cached"),
        "the negative answer is reused within max_age"
    );
    secs.fetch_add(60, Ordering::SeqCst);
    let a = list.check(&h.0).expect("fresh answer");
    assert!(a.approved && !a.cached, "{a:?}");
    assert_eq!(
        a.checked_at,
        std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_060)
    );

    publish_hash(&chain, HashKind::Image, Change::Remove, &hex_hash);
    assert!(list.contains(&h.0).expect("cached yes within max_age"));
    secs.fetch_add(60, Ordering::SeqCst);
    assert!(
        !list.contains(&h.0).expect("asked again"),
        "removed: not allowed after max_age"
    );

    // The model list is separate; an unreachable chain fails closed.
    let models = RootAllowList::new(
        Toncenter::new(ToncenterConfig::new(s["rpc_url"].as_str().expect("rpc"))),
        root.clone(),
        HashKind::Model,
    );
    assert!(!models.contains(&h.0).expect("model list"));
    let mut down = ToncenterConfig::new("http://127.0.0.1:9/api/v2");
    down.max_attempts = 1;
    let e = RootAllowList::new(Toncenter::new(down), root, HashKind::Image)
        .contains(&h.0)
        .expect_err("unreachable");
    assert!(matches!(e, AllowListError::Unavailable(_)), "{e}");
}

/// The hash a `verify-quote` rejection names (the allow-list reason carries it).
fn rejected_image_hash(verdict: &serde_json::Value) -> Option<String> {
    verdict["reasons"]
        .as_array()?
        .iter()
        .find(|r| r["code"] == "image_hash_not_allowed")?["message"]
        .as_str()?
        .split(|c: char| !c.is_ascii_hexdigit())
        .find(|w| w.len() == 64)
        .map(str::to_string)
}

/// `host-launcher verify-quote --root --rpc`: a real Intel-signed fixture quote is rejected while
/// the root does not list its image hash, accepted once the hash is published, and rejected when
/// the chain cannot be reached.
#[test]
fn verify_quote_takes_its_allow_list_from_the_root_contract() {
    let quotes = repo_root().join("../shared/fixtures/quotes");
    if !quotes.join("dcap-qvl-tdx_quote").is_file() {
        skip("verify-quote --root", "shared fixtures not found");
        return;
    }
    let Some(chain) = start_chain("v4r2") else {
        return;
    };
    let s = &chain.state;
    let root = s["root"]["address"].as_str().expect("root");
    let rpc = s["rpc_url"].as_str().expect("rpc");
    let verify = |rpc: &str| {
        let out = std::process::Command::new(host_launcher())
            .arg("verify-quote")
            .arg("--quote")
            .arg(quotes.join("dcap-qvl-tdx_quote"))
            .arg("--collateral")
            .arg(quotes.join("dcap-qvl-tdx_quote_collateral.json"))
            .args(["--at", "2025-07-01T00:00:00Z", "--json"])
            .args(["--root", root, "--rpc", rpc, "--max-age", "0"])
            .env_remove("TONCENTER_URL")
            .output()
            .expect("run host-launcher");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "verdict is not JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), v)
    };

    let (code, v) = verify(rpc);
    assert_eq!(code, Some(1), "unpublished image hash is rejected: {v}");
    let hash = rejected_image_hash(&v).unwrap_or_else(|| panic!("no allow-list reason: {v}"));
    assert_eq!(
        v["reasons"].as_array().expect("reasons").len(),
        1,
        "only the allow-list rejects inside the collateral window: {v}"
    );

    publish_hash(&chain, HashKind::Image, Change::Add, &hash);
    let (code, v) = verify(rpc);
    assert_eq!(code, Some(0), "published: accepted: {v}");
    assert_eq!(v["accepted"], true);

    let (code, v) = verify("http://127.0.0.1:9/api/v2");
    assert_eq!(code, Some(1), "unreachable chain rejects: {v}");
    assert!(
        v["reasons"]
            .as_array()
            .expect("reasons")
            .iter()
            .any(|r| r["code"] == "allow_list_unavailable"),
        "{v}"
    );
}

/// GET over RA-TLS from the natively running agent, trusting its simulated TEE key.
fn https_get(key: [u8; 32], port: u16, path: &str) -> Option<(u16, String)> {
    let verifier =
        attestation::Verifier::simulated(attestation::Policy::default().with_simulated(true), key);
    let r = attestation::RaTlsHttpClient::new(verifier)
        .get(
            &format!("https://127.0.0.1:{port}{path}"),
            Duration::from_secs(30),
        )
        .ok()?;
    Some((r.status, String::from_utf8_lossy(&r.body).into_owned()))
}

/// Kills the agent on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The guest agent (run natively with `serve --no-init`, its host config under `--root`) refuses
/// inference with a 503 naming what is not approved, and serves once the image and model hashes
/// are published and the next check has run.
#[test]
fn guest_agent_serves_only_once_image_and_model_are_approved() {
    let model = std::env::var_os("SMOLLM2_GGUF")
        .map(std::path::PathBuf::from)
        .or_else(|| inference::default_model_path().ok())
        .filter(|p| p.is_file());
    let Some(model) = model else {
        skip(
            "guest approval gate",
            "SmolLM2 model not found: run `cargo xtask model fetch smollm2-135m` or set SMOLLM2_GGUF",
        );
        return;
    };
    let Some(chain) = start_chain("v4r2") else {
        return;
    };
    let s = &chain.state;
    let root = s["root"]["address"].as_str().expect("root");
    let rpc = s["rpc_url"].as_str().expect("rpc");
    let model_sha256 = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(
            std::fs::read(&model).expect("read model"),
        ))
    };
    let image_hash = "1a9e".repeat(16);

    let dir = tempfile::tempdir().expect("tmp");
    let cfg_path = dir
        .path()
        .join("sys/firmware/qemu_fw_cfg/by_name")
        .join(worker_api::HOST_CONFIG_FW_CFG_NAME)
        .join("raw");
    std::fs::create_dir_all(cfg_path.parent().expect("parent")).expect("mkdir");
    let cfg = worker_api::HostConfig {
        root_contract: Some(root.into()),
        ton_rpc: Some(rpc.into()),
        ..worker_api::HostConfig::default()
    };
    std::fs::write(&cfg_path, cfg.to_canonical_json()).expect("write host config");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let agent = e2e_tests::workspace_bin("guest-agent", "guest-agent");
    // The agent speaks only RA-TLS: with --simulate-tee it signs its certificate's quote with a
    // fresh simulator key and prints the public key, which this client then trusts.
    let mut agent = Agent(
        Command::new(agent)
            .args([
                "serve",
                "--no-init",
                "--simulate-tee",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--root")
            .arg(dir.path())
            .arg("--model")
            .arg(&model)
            .args(["--model-sha256", &model_sha256])
            .args(["--assume-image-hash", &image_hash])
            .args(["--approval-recheck-secs", "1"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start guest-agent"),
    );
    let key: [u8; 32] = {
        let out = agent.0.stdout.take().expect("agent stdout");
        let mut lines = BufReader::new(out).lines();
        let key = loop {
            let line = lines
                .next()
                .expect("the agent printed its simulated TEE key")
                .expect("stdout");
            if let Some(k) = line.strip_prefix("simulated TEE public key: ") {
                break hex::decode(k.trim())
                    .ok()
                    .and_then(|k| <[u8; 32]>::try_from(k).ok())
                    .expect("32-byte hex key");
            }
        };
        // Keep draining the agent's stdout so it never blocks on a full pipe.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
        key
    };
    let http_get = |port: u16, path: &str| https_get(key, port, path);
    let health = || -> Option<serde_json::Value> {
        let (code, body) = http_get(port, "/health")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    };
    // Waits until /health's approval state is `want` and its reason passes `reason_ok`.
    let wait_until = |want: &str, reason_ok: &dyn Fn(&str) -> bool, secs: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(h) = health()
                && h["approval"]["state"] == want
                && reason_ok(h["approval"]["reason"].as_str().unwrap_or_default())
            {
                return h;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "approval state never became {want} (with the expected reason): {:?}",
                health()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let wait_for = |want: &str, secs: u64| wait_until(want, &|_| true, secs);

    let h = wait_for("not_approved", 300);
    assert_eq!(h["approval"]["root"], root);
    assert_eq!(h["approval"]["image_hash"], image_hash.as_str());
    assert_eq!(h["approval"]["model_hash"], model_sha256.as_str());
    assert!(h["approval"]["checked_at"].as_u64().is_some(), "{h}");
    let (code, body) = http_get(port, "/v1/models").expect("agent answers");
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("OpenAI-style error");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains(&format!("image hash {image_hash} is not approved")),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("model hash {model_sha256} is not approved")),
        "{msg}"
    );
    assert!(msg.contains("host-launcher publish model-hash"), "{msg}");
    assert_eq!(v["error"]["code"], "worker_not_approved");

    publish_hash(&chain, HashKind::Image, Change::Add, &image_hash);
    // Image approved, model not yet: the reason names only the model.
    wait_until(
        "not_approved",
        &|r| r.contains("model hash") && !r.contains("image hash"),
        30,
    );
    let (code, _) = http_get(port, "/v1/models").expect("agent answers");
    assert_eq!(code, 503, "model still unapproved");

    publish_hash(&chain, HashKind::Model, Change::Add, &model_sha256);
    let h = wait_for("approved", 30);
    assert!(h["approval"]["reason"].is_null(), "{h}");
    let (code, body) = http_get(port, "/v1/models").expect("agent answers");
    assert_eq!(code, 200, "approved: serves: {body}");

    publish_hash(&chain, HashKind::Model, Change::Remove, &model_sha256);
    wait_until("not_approved", &|r| r.contains("model hash"), 30);
    let (code, _) = http_get(port, "/v1/models").expect("agent answers");
    assert_eq!(code, 503, "removed model: refuses again");
}

/// An image directory with several TDX launch shapes: `publish image-hash DIR` publishes every
/// shape's hash (one JSON line each), `check-onchain DIR` reports each and exits 0 only when all
/// are approved, `--shape` restricts both. The shapes' captures here are the shared fixture's
/// tables for each declared shape (their hashes differ anyway: memory and vCPUs enter RTMR0).
#[test]
fn publish_and_check_every_shape_of_an_image() {
    let tables = repo_root().join("../shared/fixtures/acpi/qemu-tdx-1cpu-1g.acpi-tables.bin");
    if !tables.is_file() {
        skip("publish shapes", "shared fixtures not found");
        return;
    }
    let Some(chain) = start_chain("v4r2") else {
        return;
    };
    let s = &chain.state;
    let root = s["root"]["address"].as_str().expect("root");
    let rpc = s["rpc_url"].as_str().expect("rpc");
    let dir = tempfile::tempdir().expect("tmp");
    let mnemonic = dir.path().join("team.mnemonic");
    std::fs::write(&mnemonic, mnemonic_words(s)).expect("write mnemonic");
    let image = dir.path().join("worker");
    e2e_tests::copy_image(e2e_tests::image_dir(), &image);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("manifest.json")).expect("manifest"))
            .expect("json");
    let names: Vec<String> = manifest["launch"]["tdx"]["shapes"]
        .as_array()
        .expect("declared shapes")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_string())
        .collect();
    assert!(names.len() >= 2, "{names:?}");
    // Only the first two shapes have tables: publishing "every shape" is refused.
    for n in &names[..2] {
        let d = image.join("acpi/shapes").join(n);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::copy(&tables, d.join("tables")).expect("copy");
    }
    let chain_args = ["--root", root, "--rpc", rpc, "--network", "local"];
    let m = mnemonic.to_str().expect("utf8");
    let img = image.to_str().expect("utf8");
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
    let (code, _, err) = run(&["publish", "image-hash", img, "--mnemonic-file", m]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&names[2]) && err.contains("cargo xtask image capture-acpi"),
        "{err}"
    );
    // A capture for the wrong vCPU count is named as such, not silently measured.
    let bad = image.join("acpi/shapes").join(&names[2]);
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::copy(&tables, bad.join("tables")).expect("copy");
    let (code, _, err) = run(&["check-onchain", img]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("vCPUs"), "{err}");
    // The two shapes with tables (the fixture has 1 vCPU: the 1-vCPU shapes), by name.
    let two = ["--shape", names[0].as_str(), "--shape", names[1].as_str()];
    let with = |base: &[&str], more: &[&str]| -> Vec<String> {
        base.iter().chain(more).map(|s| s.to_string()).collect()
    };
    let runv = |v: Vec<String>| run(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let (code, out, _) = runv(with(&["check-onchain", img, "--json"], &two));
    assert_eq!(code, Some(3), "nothing approved yet: {out}");
    let (code, out, err) = runv(with(
        &["publish", "image-hash", img, "--mnemonic-file", m, "--json"],
        &two,
    ));
    assert_eq!(code, Some(0), "{out}{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line per shape"))
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_ne!(
        lines[0]["hash"], lines[1]["hash"],
        "one hash per shape: {out}"
    );
    for (l, n) in lines.iter().zip(&names) {
        assert_eq!(l["status"], "confirmed", "{l}");
        assert_eq!(l["shape"], n.as_str(), "{l}");
    }
    let (code, out, _) = runv(with(&["check-onchain", img], &two));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.matches("approved:").count(), 2, "{out}");
    // Remove one shape's hash: check-onchain names it and fails; the other stays approved.
    let gone = &names[0];
    let (code, out, err) = run(&[
        "remove",
        "image-hash",
        img,
        "--shape",
        gone,
        "--mnemonic-file",
        m,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, _) = runv(with(&["check-onchain", img], &two));
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("NOT approved") && l.contains(&format!("TDX shape {gone}"))),
        "{out}"
    );
    let (code, _, _) = run(&["check-onchain", img, "--shape", &names[1]]);
    assert_eq!(code, Some(0));
    let (code, _, err) = run(&["check-onchain", img, "--shape", "no-such-shape"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("declares no such TDX launch shape"), "{err}");
}
