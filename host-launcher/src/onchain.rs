//! `publish`, `remove` and `check-onchain`: the team's and auditors' side of the root contract.
//!
//! Publishing is one command and idempotent (a hash already listed sends nothing); checking is
//! one command with an exit status scripts can use. The chain is reached through a toncenter v2
//! endpoint (`--rpc`); the local chain (`cargo xtask chain`, `contract/`) speaks the same subset.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use clap::{Args, ValueEnum};
use ton_root::ops::{Change, HashUpdate};
use ton_root::publish::{Outcome, PublishOptions, Publisher};
use ton_root::wallet::{Network, Signer, WalletKind, parse_address};
use ton_root::{Hash256, HashKind, Toncenter, ToncenterConfig};

/// Which list a hash goes to (named as on the command line: `image-hash`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[allow(clippy::enum_variant_names)]
pub enum ListKind {
    /// Worker image hashes (an image directory's `image_hash_cw_v1`, or a hash).
    ImageHash,
    /// Model hashes (a hash, or a `model.json` written by `cargo xtask model pack`, or its
    /// directory).
    ModelHash,
    /// Proxy image hashes.
    ProxyHash,
}

impl ListKind {
    fn kind(self) -> HashKind {
        match self {
            ListKind::ImageHash => HashKind::Image,
            ListKind::ModelHash => HashKind::Model,
            ListKind::ProxyHash => HashKind::Proxy,
        }
    }
}

/// Where the chain is and which root contract to use.
#[derive(Debug, Args)]
pub struct ChainArgs {
    /// Root contract address (EQ…/UQ… or 0:hex).
    #[arg(long, env = "WORKER_ROOT_CONTRACT", value_name = "ADDRESS")]
    pub root: String,
    /// toncenter v2 endpoint up to /api/v2, e.g. http://127.0.0.1:8081/api/v2 for the local chain.
    #[arg(long, env = "TONCENTER_URL", value_name = "URL")]
    pub rpc: String,
    /// toncenter API key (sent as X-API-Key; never printed).
    #[arg(
        long,
        env = "TONCENTER_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Network the addresses must belong to: mainnet, testnet or local (accepts either flag).
    #[arg(long, default_value = "mainnet")]
    pub network: String,
    /// Per-request timeout in seconds (failed requests are retried a few times).
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    pub timeout: u64,
}

impl ChainArgs {
    fn publisher(&self) -> Result<(Publisher<Toncenter>, Network)> {
        let network: Network = self.network.parse()?;
        let root = parse_address(&self.root, network).context("--root")?;
        let mut cfg = ToncenterConfig::new(&self.rpc);
        cfg.api_key = self.api_key.clone();
        cfg.timeout = Duration::from_secs(self.timeout);
        Ok((Publisher::new(Toncenter::new(cfg), root), network))
    }
}

/// `publish` / `remove` arguments.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Which list.
    #[arg(value_enum)]
    pub list: ListKind,
    /// The hash (64 hex digits); for image-hash also an image directory built by
    /// `cargo xtask image build` (its cw-v1 image hash is used); for model-hash also a
    /// `model.json` written by `cargo xtask model pack`, or its directory (the file is validated
    /// and its model hash, sha256("name@revision:verity_root"), is used).
    pub target: String,
    /// With an image directory: only this TDX launch shape's hash (repeatable). Default: every
    /// shape the image declares (measurements.json `shapes`), each a hash of its own.
    #[arg(long = "shape", value_name = "NAME")]
    pub shapes: Vec<String>,
    #[command(flatten)]
    pub chain: ChainArgs,
    /// File with the owner wallet's 24-word mnemonic (or env TEAM_WALLET_MNEMONIC).
    #[arg(long, value_name = "FILE", conflicts_with = "key_file")]
    pub mnemonic_file: Option<PathBuf>,
    /// Key file: a mnemonic, 64 hex digits or base64 of a 32-byte Ed25519 seed.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Wallet contract version of the owner wallet: v4r2 or v5r1.
    #[arg(long, default_value = "v4r2")]
    pub wallet: String,
    /// TON attached to the message (the contract returns the excess).
    #[arg(long, default_value = "0.05", value_name = "TON")]
    pub value: String,
    /// Seconds to wait until the get-method shows the change.
    #[arg(long, default_value_t = 90, value_name = "SECS")]
    pub wait: u64,
    /// Build the signed message and print it; send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How `run` checks the image against the root contract before it boots.
#[derive(Debug, Args)]
pub struct ApprovalArgs {
    /// toncenter v2 endpoint used to check, before booting, that the image's hash is approved
    /// by `root_contract` (e.g. http://127.0.0.1:8081/api/v2 for `cargo xtask chain`).
    #[arg(long, env = "TONCENTER_URL", value_name = "URL")]
    pub rpc: Option<String>,
    /// toncenter API key (sent as X-API-Key; never printed).
    #[arg(
        long,
        env = "TONCENTER_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Network the root contract address belongs to: mainnet, testnet or local.
    #[arg(long, default_value = "mainnet")]
    pub network: String,
    /// Boot even when the image's hash is not approved (or cannot be checked). Development only:
    /// the network's clients will refuse such a worker.
    #[arg(long)]
    pub allow_unapproved: bool,
    /// toncenter v2 endpoint the guest uses to re-check its own approval (goes into the measured
    /// host config as `ton_rpc`). Default: --rpc, with a loopback host (127.0.0.1, localhost,
    /// [::1]) replaced by 10.0.2.2, the host as QEMU's user network shows it to the guest. The
    /// guest has no DNS and no TLS client: give http://IP:PORT/api/v2.
    #[arg(long, value_name = "URL")]
    pub guest_rpc: Option<String>,
}

/// QEMU user networking's address of the host, as the guest sees it.
pub const QEMU_USER_NET_HOST: &str = "10.0.2.2";

/// The endpoint the guest should use for `rpc`: a loopback host becomes [`QEMU_USER_NET_HOST`]
/// (the guest's own loopback has no chain). Returns the URL and, when the guest will not be able
/// to use it (https, or a host name: the guest has neither a TLS client nor DNS), a warning.
pub fn guest_rpc_url(rpc: &str) -> Result<(String, Option<String>)> {
    let rpc = rpc.trim();
    let Some((scheme, rest)) = rpc.split_once("://") else {
        bail!("--rpc {rpc:?} is not a URL; give http://HOST:PORT/api/v2");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    // Host and optional port; IPv6 hosts are bracketed.
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let Some((h, p)) = after.split_once(']') else {
            bail!("--rpc {rpc:?}: unterminated [IPv6] host");
        };
        (format!("[{h}]"), p)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h.to_string(), &authority[h.len()..][..p.len() + 1]),
            None => (authority.to_string(), ""),
        }
    };
    if host.is_empty() {
        bail!("--rpc {rpc:?} has no host; give http://HOST:PORT/api/v2");
    }
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host == "[::1]"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback());
    let guest_host = if loopback {
        QEMU_USER_NET_HOST.to_string()
    } else {
        host.clone()
    };
    let url = format!("{scheme}://{guest_host}{port}{path}");
    let is_ip = guest_host.parse::<std::net::Ipv4Addr>().is_ok() || guest_host.starts_with('[');
    let warning = if !scheme.eq_ignore_ascii_case("http") {
        Some(format!(
            "the guest cannot use {url} to check its approval: it speaks plain http only; pass --guest-rpc http://IP:PORT/api/v2 (e.g. a toncenter-compatible relay on the host, reached at {QEMU_USER_NET_HOST})"
        ))
    } else if !is_ip {
        Some(format!(
            "the guest cannot use {url} to check its approval: it has no DNS; pass --guest-rpc with an IP address"
        ))
    } else {
        None
    };
    Ok((url, warning))
}

/// The `ton_rpc` the host config carries: only with a root contract, from --guest-rpc or
/// --rpc (see [`guest_rpc_url`]); warnings are printed.
pub fn guest_rpc(root: Option<&str>, a: &ApprovalArgs) -> Result<Option<String>> {
    if root.is_none() {
        return Ok(None);
    }
    let Some(rpc) = a.guest_rpc.as_ref().or(a.rpc.as_ref()) else {
        eprintln!(
            "host-launcher: WARNING: no --rpc: the guest cannot check its approval on the root contract and will not serve inference"
        );
        return Ok(None);
    };
    let (url, warning) = if a.guest_rpc.is_some() {
        let (_, w) = guest_rpc_url(rpc)?;
        (rpc.trim().to_string(), w)
    } else {
        guest_rpc_url(rpc)?
    };
    if let Some(w) = warning {
        eprintln!("host-launcher: WARNING: {w}");
    }
    Ok(Some(url))
}

/// `verify-quote`: attestation's offline verifier, with the image allow-list optionally taken
/// from the root contract.
#[derive(Debug, Clone, Args)]
pub struct VerifyQuoteArgs {
    #[command(flatten)]
    pub quote: attestation::cli::Args,
    /// The root contract as the image allow-list (shared with `verify` and `gateway`).
    #[command(flatten)]
    pub onchain: gateway::trust::ChainArgs,
}

/// Runs `verify-quote`; returns the exit status (0 accepted, 1 rejected, 2 input error).
pub fn cmd_verify_quote(args: &VerifyQuoteArgs) -> i32 {
    match args.onchain.image_allow_list() {
        Ok(list) => {
            if let (Some(root), Some(rpc)) = (&args.onchain.root, &args.onchain.rpc)
                && !args.quote.json
            {
                eprintln!(
                    "verify-quote: image allow-list: root contract {root} via {rpc} (answers reused for at most {} s)",
                    args.onchain.max_age
                );
            }
            attestation::cli::run_with(&args.quote, list)
        }
        Err(e) => {
            if args.quote.json {
                println!(
                    "{}",
                    serde_json::json!({ "accepted": false, "error": format!("{e:#}") })
                );
            }
            eprintln!("error: {e:#}");
            2
        }
    }
}

/// Before booting: with a root contract configured, the image's cw-v1 hash (for this launch's
/// memory and vCPUs) must be listed by it, unless `--allow-unapproved`. A check that cannot be
/// made refuses the boot the same way.
pub fn check_before_boot(
    launch: &crate::Launch,
    root: Option<&str>,
    a: &ApprovalArgs,
) -> Result<()> {
    let Some(root) = root else {
        if a.rpc.is_some() {
            eprintln!("host-launcher: --rpc given but no root_contract: nothing to check on-chain");
        }
        return Ok(());
    };
    let refuse = |why: String| -> Result<()> {
        if a.allow_unapproved {
            eprintln!("host-launcher: WARNING: {why}; booting anyway (--allow-unapproved)");
            Ok(())
        } else {
            bail!(
                "{why}. Publish the image's hash (host-launcher publish image-hash <image dir> ...) or pass --allow-unapproved (development only)"
            )
        }
    };
    let Some(rpc) = &a.rpc else {
        return refuse(format!(
            "root contract {root} is set but the image's approval cannot be checked without --rpc URL (a toncenter v2 endpoint)"
        ));
    };
    let opts = crate::attest::measure_options(
        launch.shape.as_deref(),
        launch.plan.memory_mib,
        launch.plan.cpus,
    );
    let m = measurements::image::measure_image_dir(&launch.image.dir, &opts)
        .with_context(|| format!("measuring {}", launch.image.dir.display()))?;
    let Some(h) = m.image_hash_cw_v1 else {
        let why = m.missing.values().cloned().collect::<Vec<_>>().join("; ");
        return refuse(format!(
            "the image hash of {} cannot be computed ({why}); capture the launch's ACPI tables with `cargo xtask image capture-acpi`",
            launch.image.dir.display()
        ));
    };
    let hash: Hash256 = h.parse()?;
    let chain = ChainArgs {
        root: root.to_string(),
        rpc: rpc.clone(),
        api_key: a.api_key.clone(),
        network: a.network.clone(),
        timeout: 15,
    };
    let (publisher, _) = chain.publisher()?;
    if publisher.is_listed(HashKind::Image, &hash)? {
        eprintln!("host-launcher: image hash {hash} is approved by root {root}");
        Ok(())
    } else {
        refuse(format!("image hash {hash} is not approved by root {root}"))
    }
}

/// `check-onchain` arguments.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// An image directory (its cw-v1 image hash is checked), a model.json or its directory
    /// (with --list model-hash), or a hash (64 hex digits).
    pub target: String,
    /// Which list to look in.
    #[arg(long, value_enum, default_value = "image-hash")]
    pub list: ListKind,
    /// With an image directory: only this TDX launch shape's hash (repeatable). Default: every
    /// shape the image declares; the exit status is 0 only when all are approved.
    #[arg(long = "shape", value_name = "NAME")]
    pub shapes: Vec<String>,
    #[command(flatten)]
    pub chain: ChainArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses `0.05` TON into nanotons.
pub fn parse_ton(s: &str) -> Result<u128> {
    let (whole, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    if whole.is_empty() && frac.is_empty()
        || frac.len() > 9
        || !(whole.chars().chain(frac.chars())).all(|c| c.is_ascii_digit())
    {
        bail!("`{s}` is not an amount of TON (e.g. 0.05)");
    }
    let w: u128 = if whole.is_empty() { 0 } else { whole.parse()? };
    let f: u128 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse()?
    };
    Ok(w * ton_root::NANOTONS_PER_TON + f)
}

/// The model hash of a `model.json` (validated: format, fields, model id and hash agree).
fn model_json_hash(path: &Path) -> Result<(Hash256, String)> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cannot read {}: pass the model.json written by `cargo xtask model pack`",
            path.display()
        )
    })?;
    let m = measurements::model_disk::ModelJson::parse(&bytes)
        .with_context(|| format!("{} is not a valid model.json", path.display()))?;
    let hash = Hash256(m.model_hash_bytes()?);
    Ok((
        hash,
        format!("model hash of {} ({})", path.display(), m.model_id),
    ))
}

/// One hash to publish or check, with what it is (for messages) and, for an image directory's
/// TDX launch shapes, the shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub hash: Hash256,
    pub what: String,
    pub shape: Option<String>,
}

/// The hash named by `target`: a hash, an image directory's cw-v1 image hash, or (model-hash)
/// a model.json's model hash. For an image directory with TDX shapes this is the launch
/// defaults' hash; [`resolve_targets`] gives every shape's.
#[cfg(test)]
pub fn resolve_hash(target: &str, list: ListKind) -> Result<(Hash256, String)> {
    let t = resolve_targets(target, list, &[], false)?;
    let first = t
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("{target}: no hash"))?;
    Ok((first.hash, first.what))
}

/// The hashes named by `target`. An image directory that declares TDX launch shapes gives one
/// hash per shape (`shapes` restricts them; `all_shapes` false gives the launch defaults' hash
/// only); one without shapes gives its cw-v1 hash.
pub fn resolve_targets(
    target: &str,
    list: ListKind,
    shapes: &[String],
    all_shapes: bool,
) -> Result<Vec<Target>> {
    let path = Path::new(target);
    let one = |(hash, what): (Hash256, String)| {
        Ok(vec![Target {
            hash,
            what,
            shape: None,
        }])
    };
    if !(shapes.is_empty() || list == ListKind::ImageHash && path.is_dir()) {
        bail!("--shape applies to image-hash with an image directory (not to a hash or a model)");
    }
    if list == ListKind::ModelHash {
        if path.is_file() {
            return one(model_json_hash(path)?);
        }
        let inside = path.join(measurements::model_disk::JSON_FILE);
        if path.is_dir() && inside.is_file() {
            return one(model_json_hash(&inside)?);
        }
        if target.ends_with(".json") {
            bail!(
                "{target}: no such file; pass the model.json written by `cargo xtask model pack` \
                 or the model hash (64 hex digits)"
            );
        }
    } else if path.is_file() {
        bail!("{target} is a file; only model-hash accepts a file (a model.json)");
    }
    if path.is_dir() {
        if list != ListKind::ImageHash {
            bail!(
                "{target} is a directory without model.json; image-hash accepts an image \
                 directory, model-hash a directory with the model.json of `cargo xtask model pack`"
            );
        }
        let m =
            measurements::image::measure_image_dir(path, &measurements::image::Options::default())
                .with_context(|| format!("measuring the image in {target}"))?;
        let id = format!("{} {}", m.image.name, m.image.version);
        if (all_shapes || !shapes.is_empty()) && !m.shapes.is_empty() {
            for s in shapes {
                if !m.shapes.contains_key(s) {
                    bail!(
                        "--shape {s}: {target} declares no such TDX launch shape (declared: {})",
                        m.shapes.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
            }
            let mut out = Vec::new();
            let mut missing = Vec::new();
            for (name, sm) in &m.shapes {
                if !shapes.is_empty() && !shapes.contains(name) {
                    continue;
                }
                match &sm.image_hash_cw_v1 {
                    Some(h) => out.push(Target {
                        hash: h.parse()?,
                        what: format!("cw-v1 image hash of {target} ({id}), TDX shape {name}"),
                        shape: Some(name.clone()),
                    }),
                    None => missing.push(format!(
                        "{name} ({})",
                        sm.missing.as_deref().unwrap_or("not computed")
                    )),
                }
            }
            if !missing.is_empty() {
                bail!(
                    "the image hash of TDX launch shape(s) of {target} cannot be computed: {}. \
                     Run `cargo xtask image capture-acpi`, which captures every shape, or name \
                     the shapes to use with --shape",
                    missing.join("; ")
                );
            }
            return Ok(out);
        }
        let Some(h) = m.image_hash_cw_v1 else {
            let why = m.missing.values().cloned().collect::<Vec<_>>().join("; ");
            bail!(
                "the image hash of {target} cannot be computed: {why}. Capture the launch's ACPI tables \
                 into {target}/acpi/ (see measurements/README.md) or pass the hash itself"
            );
        };
        return one((h.parse()?, format!("cw-v1 image hash of {target} ({id})")));
    }
    let hash: Hash256 = target.parse()?;
    one((hash, hash.to_hex()))
}

fn signer(args: &PublishArgs) -> Result<Signer> {
    let kind: WalletKind = args.wallet.parse()?;
    if let Some(f) = &args.key_file {
        return Ok(Signer::from_key_file(f, kind)?);
    }
    let words = match &args.mnemonic_file {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        None => std::env::var("TEAM_WALLET_MNEMONIC").map_err(|_| {
            anyhow::anyhow!("no wallet key: pass --mnemonic-file FILE or --key-file FILE, or set TEAM_WALLET_MNEMONIC")
        })?,
    };
    Ok(Signer::from_mnemonic(&words, kind)?)
}

/// `host-launcher publish` (change = Add) and `host-launcher remove` (change = Remove). An
/// image directory with TDX launch shapes publishes every shape's hash (or those named).
pub fn cmd_publish(args: &PublishArgs, change: Change) -> Result<()> {
    let targets = resolve_targets(&args.target, args.list, &args.shapes, true)?;
    let (publisher, _) = args.chain.publisher()?;
    let signer = signer(args)?;
    let opts = PublishOptions {
        value_nanotons: parse_ton(&args.value)?,
        wait: Duration::from_secs(args.wait),
        dry_run: args.dry_run,
        ..PublishOptions::default()
    };
    let verb = if change == Change::Add {
        "publish"
    } else {
        "remove"
    };
    for (i, Target { hash, what, shape }) in targets.into_iter().enumerate() {
        let query_id = (u64::from(std::process::id()) << 32
            | u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0),
            ))
        .wrapping_add(i as u64);
        let update = HashUpdate {
            kind: args.list.kind(),
            change,
            query_id,
            hash,
        };
        if !args.json {
            eprintln!(
                "{verb}: {} {what} on root {}",
                args.list.kind().noun(),
                args.chain.root
            );
        }
        let outcome = publisher.apply(&signer, update, &opts)?;
        let (status, detail) = match &outcome {
            Outcome::AlreadyDone => (
                "unchanged",
                if change == Change::Add {
                    "already approved: nothing sent".to_string()
                } else {
                    "not listed: nothing sent".to_string()
                },
            ),
            Outcome::DryRun { description, .. } => {
                ("dry-run", format!("would send: {description}"))
            }
            Outcome::Confirmed { seqno, waited } => (
                "confirmed",
                format!(
                    "sent with wallet seqno {seqno}; the root shows the change after {:.1} s",
                    waited.as_secs_f64()
                ),
            ),
        };
        if args.json {
            // One JSON object per line (one per hash).
            let mut v = serde_json::json!({
                "action": verb, "list": args.list.kind().get_method(), "hash": hash.to_hex(),
                "root": args.chain.root, "status": status, "detail": detail,
            });
            if let Some(s) = &shape {
                v["shape"] = serde_json::Value::String(s.clone());
            }
            if let Outcome::DryRun { boc_base64, .. } = &outcome {
                v["boc_base64"] = serde_json::Value::String(boc_base64.clone());
            }
            println!("{v}");
        } else {
            match &shape {
                Some(s) => println!("{status}: shape {s}: {detail}"),
                None => println!("{status}: {detail}"),
            }
            if let Outcome::DryRun { boc_base64, .. } = &outcome {
                println!("message (BOC, base64): {boc_base64}");
            }
        }
    }
    Ok(())
}

/// `host-launcher check-onchain`: exit 0 when approved (every TDX shape's hash, for an image
/// directory with shapes), 3 when not, 1 on errors.
pub fn cmd_check(args: &CheckArgs) -> Result<bool> {
    let targets = resolve_targets(&args.target, args.list, &args.shapes, true)?;
    let (publisher, _) = args.chain.publisher()?;
    let mut all = true;
    for Target { hash, what, shape } in targets {
        let listed = publisher.is_listed(args.list.kind(), &hash)?;
        all &= listed;
        if args.json {
            let mut v = serde_json::json!({"hash": hash.to_hex(), "list": args.list.kind().get_method(), "root": args.chain.root, "approved": listed});
            if let Some(s) = &shape {
                v["shape"] = serde_json::Value::String(s.clone());
            }
            println!("{v}");
        } else if listed {
            println!("approved: {what} is approved by root {}", args.chain.root);
        } else {
            println!(
                "NOT approved: {what} is not listed by root {}",
                args.chain.root
            );
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ton_amounts_parse_exactly() {
        assert_eq!(parse_ton("0.05").expect("ok"), 50_000_000);
        assert_eq!(parse_ton("1").expect("ok"), 1_000_000_000);
        assert_eq!(parse_ton("2.000000001").expect("ok"), 2_000_000_001);
        assert_eq!(parse_ton(".5").expect("ok"), 500_000_000);
        for bad in ["", "abc", "1.0000000001", "-1", "1e3"] {
            assert!(parse_ton(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_rpc_becomes_the_user_net_host_for_the_guest() {
        for (rpc, want) in [
            (
                "http://127.0.0.1:8081/api/v2",
                "http://10.0.2.2:8081/api/v2",
            ),
            (
                "http://localhost:8081/api/v2/",
                "http://10.0.2.2:8081/api/v2/",
            ),
            ("http://[::1]:9/api/v2", "http://10.0.2.2:9/api/v2"),
            ("http://127.0.0.1", "http://10.0.2.2"),
            (
                "http://192.168.1.5:8081/api/v2",
                "http://192.168.1.5:8081/api/v2",
            ),
        ] {
            let (url, warn) = guest_rpc_url(rpc).expect(rpc);
            assert_eq!(url, want, "{rpc}");
            assert_eq!(warn, None, "{rpc}");
        }
        let (url, warn) = guest_rpc_url("https://toncenter.example/api/v2").expect("https");
        assert_eq!(url, "https://toncenter.example/api/v2");
        assert!(warn.expect("warns").contains("plain http only"));
        let (_, warn) = guest_rpc_url("http://chain.internal:80/api/v2").expect("dns");
        assert!(warn.expect("warns").contains("no DNS"));
        assert!(guest_rpc_url("127.0.0.1:8081").is_err());
        assert!(guest_rpc_url("http:///api/v2").is_err());
    }

    #[test]
    fn guest_rpc_only_with_a_root_and_guest_rpc_wins() {
        let mut a = ApprovalArgs {
            rpc: Some("http://127.0.0.1:8081/api/v2".into()),
            api_key: None,
            network: "local".into(),
            allow_unapproved: false,
            guest_rpc: None,
        };
        assert_eq!(guest_rpc(None, &a).expect("ok"), None);
        assert_eq!(
            guest_rpc(Some("EQ"), &a).expect("ok").as_deref(),
            Some("http://10.0.2.2:8081/api/v2")
        );
        a.guest_rpc = Some("http://10.0.2.2:9999/api/v2".into());
        assert_eq!(
            guest_rpc(Some("EQ"), &a).expect("ok").as_deref(),
            Some("http://10.0.2.2:9999/api/v2")
        );
        a.rpc = None;
        a.guest_rpc = None;
        assert_eq!(guest_rpc(Some("EQ"), &a).expect("ok"), None);
    }

    #[test]
    fn onchain_allow_list_needs_root_and_rpc() {
        let none = gateway::trust::ChainArgs {
            root: None,
            rpc: Some("http://127.0.0.1:9/api/v2".into()),
            api_key: None,
            max_age: 60,
        };
        assert!(none.image_allow_list().expect("ok").is_none());
        let bad = gateway::trust::ChainArgs {
            root: Some("not-an-address".into()),
            ..none.clone()
        };
        assert!(format!("{:#}", bad.image_allow_list().expect_err("bad")).contains("--root"));
        // Unreachable chain: the list exists but every check fails closed.
        let down = gateway::trust::ChainArgs {
            root: Some("0:0000000000000000000000000000000000000000000000000000000000000001".into()),
            ..none
        };
        let list = down.image_allow_list().expect("ok").expect("some");
        let e = list.contains(&[0; 32]).expect_err("unreachable");
        assert!(e.to_string().contains("fails closed"), "{e}");
    }

    #[test]
    fn hashes_and_non_image_directories() {
        let (h, _) = resolve_hash(&"ab".repeat(32), ListKind::ModelHash).expect("hash");
        assert_eq!(h.to_hex(), "ab".repeat(32));
        let e = resolve_hash("abcd", ListKind::ImageHash).expect_err("short");
        assert!(e.to_string().contains("expected 64"), "{e}");
        let dir = tempfile::tempdir().expect("tmp");
        let e =
            resolve_hash(dir.path().to_str().expect("utf8"), ListKind::ModelHash).expect_err("dir");
        assert!(e.to_string().contains("without model.json"), "{e}");
        let e = resolve_hash(dir.path().to_str().expect("utf8"), ListKind::ImageHash)
            .expect_err("not an image");
        assert!(format!("{e:#}").contains("manifest.json"), "{e:#}");
    }

    #[test]
    fn model_json_file_or_directory_gives_its_model_hash() {
        use measurements::model_disk::{Layout, ModelJson, model_hash};
        let dir = tempfile::tempdir().expect("tmp");
        let layout = Layout::new(5000).expect("layout");
        let root = [7u8; 32];
        let m = ModelJson::new("tiny", "r1", &layout, &[1u8; 32], &root);
        let file = dir.path().join("model.json");
        std::fs::write(&file, m.to_canonical_json()).expect("write");
        let want = model_hash("tiny", "r1", &root);
        for target in [
            file.to_str().expect("utf8"),
            dir.path().to_str().expect("utf8"),
        ] {
            let (h, what) = resolve_hash(target, ListKind::ModelHash).expect("model.json");
            assert_eq!(h.0, want);
            assert!(what.contains("tiny@r1:"), "{what}");
        }
        // A file for another list, a tampered or malformed model.json, a missing one: clear errors.
        let e = resolve_hash(file.to_str().expect("utf8"), ListKind::ImageHash).expect_err("file");
        assert!(e.to_string().contains("only model-hash"), "{e}");
        let tampered = m.to_canonical_json().replace("\"r1\"", "\"r2\"");
        std::fs::write(&file, tampered).expect("write");
        let e = resolve_hash(file.to_str().expect("utf8"), ListKind::ModelHash).expect_err("bad");
        let e = format!("{e:#}");
        assert!(
            e.contains("not a valid model.json") && e.contains("model_id"),
            "{e}"
        );
        std::fs::write(&file, "{\"name\": 1}").expect("write");
        let e = resolve_hash(file.to_str().expect("utf8"), ListKind::ModelHash).expect_err("bad");
        assert!(format!("{e:#}").contains("cargo xtask model pack"), "{e:#}");
        let absent = dir.path().join("absent.json");
        let e =
            resolve_hash(absent.to_str().expect("utf8"), ListKind::ModelHash).expect_err("absent");
        assert!(e.to_string().contains("no such file"), "{e}");
    }
}
