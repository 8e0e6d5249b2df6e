//! What a client trusts: the flags shared by `gateway` and `host-launcher verify`/`chat`
//! ([`TrustArgs`]) and the [`Verifier`] they build ([`TrustArgs::verifier`]).
//!
//! Policy (TCB statuses; simulated evidence only with `--allow-simulated` and a trusted
//! `--simulated-key`), collateral (`--collateral`, or a PCCS with `--pccs-url`/`--offline`),
//! image-hash checks (`--allow-list FILE`, `--image DIR`, and the root contract `--root/--rpc`;
//! every list given must approve the hash) and the expected host config (`--host-config FILE`,
//! checked against the RTMR3 `host_config` event) and GPUs (`--require-gpu`, `--gpu-reference
//! FILE`, `--gpu-root FILE`, `--gpu-root-sha256 HEX`; see `attestation::gpu`).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use attestation::allowlist::AllowListError;
use attestation::{AllowList, ImageHashKind, Policy, StaticAllowList, Verifier};
use clap::Args;

/// Why the trust flags cannot be turned into a verifier.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A flag's value is wrong; the message says which and how to fix it.
    #[error("{0}")]
    Config(String),
    /// A file named by a flag cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The allow-list file is not valid.
    #[error(transparent)]
    AllowList(#[from] AllowListError),
    /// Collateral settings.
    #[error(transparent)]
    Collateral(#[from] attestation::cli::CliError),
    /// GPU trust flags.
    #[error(transparent)]
    Gpu(#[from] attestation::gpu::GpuArgsError),
}

fn read(path: &Path) -> Result<Vec<u8>, TrustError> {
    std::fs::read(path).map_err(|source| TrustError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// A guest memory size in MiB: `2048`, `2048M`, `2G`, `2GiB` (binary units, as QEMU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemMib(pub u64);

impl FromStr for MemMib {
    type Err = String;

    /// Accepts `2048` (MiB), `2048M`, `2048MiB`, `2G`, `2GiB`, `1T` (binary units, as QEMU).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let help = "write the size as a number with an optional unit: 2048, 2048M, 2G, 2GiB";
        if num.is_empty() {
            return Err(format!("invalid memory size `{s}`: {help}"));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("memory size `{s}` is too large: {help}"))?;
        let factor_mib: u64 = match unit.trim() {
            "" | "M" | "MiB" | "m" | "MB" => 1,
            "G" | "GiB" | "g" | "GB" => 1024,
            "T" | "TiB" | "t" | "TB" => 1024 * 1024,
            other => {
                return Err(format!(
                    "invalid memory size unit `{other}` in `{s}`: {help}"
                ));
            }
        };
        let mib = n
            .checked_mul(factor_mib)
            .ok_or_else(|| format!("memory size `{s}` is too large"))?;
        if mib < 64 {
            return Err(format!(
                "memory size `{s}` is below 64 MiB; the guest cannot boot with that: {help}"
            ));
        }
        Ok(MemMib(mib))
    }
}

/// The root contract as a source of approved image and model hashes.
#[derive(Debug, Clone, Args)]
pub struct ChainArgs {
    /// Check the image hash (and, in the gateway, the model hash) against this root contract
    /// (get-methods worker_hash_is_valid / model_hash_is_valid). Needs --rpc.
    #[arg(long, value_name = "ADDRESS", requires = "rpc")]
    pub root: Option<String>,
    /// toncenter v2 endpoint up to /api/v2 used with --root (e.g. http://127.0.0.1:8081/api/v2
    /// for `cargo xtask chain`).
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
    /// Reuse the chain's answers for at most this many seconds (a removed hash stops being
    /// accepted at most this long after its removal). 0: ask every time.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub max_age: u64,
}

impl ChainArgs {
    /// The root contract's `kind` list (answers reused for `max_age`), or `None` without --root.
    pub fn root_list(
        &self,
        kind: ton_root::HashKind,
        max_age: Duration,
    ) -> Result<Option<ton_root::RootAllowList<ton_root::Toncenter>>, TrustError> {
        let (Some(root), Some(rpc)) = (&self.root, &self.rpc) else {
            return Ok(None);
        };
        // Verifiers only read: accept an address of any network (a wrong one fails at the
        // get-method).
        let addr = ton_root::wallet::parse_address(root, ton_root::wallet::Network::Local)
            .map_err(|e| TrustError::Config(format!("--root: {e}")))?;
        let mut cfg = ton_root::ToncenterConfig::new(rpc.clone());
        cfg.api_key = self.api_key.clone();
        cfg.timeout = Duration::from_secs(15);
        Ok(Some(
            ton_root::RootAllowList::new(ton_root::Toncenter::new(cfg), addr, kind)
                .with_max_age(max_age),
        ))
    }

    /// The image allow-list of the root contract (`worker_hash_is_valid`), or `None` without
    /// --root. Answers are reused for --max-age; an unreachable chain fails closed.
    pub fn image_allow_list(&self) -> Result<Option<Arc<dyn AllowList>>, TrustError> {
        Ok(self
            .root_list(ton_root::HashKind::Image, Duration::from_secs(self.max_age))?
            .map(|l| Arc::new(l) as Arc<dyn AllowList>))
    }
}

/// The trust flags of `host-launcher verify`, `chat` and `gateway`.
#[derive(Debug, Clone, Args)]
pub struct TrustArgs {
    /// Accept evidence from the simulated TEE (INSECURE: no hardware is involved). Also needs
    /// the simulator's public key (--simulated-key). Never use it for production workers.
    #[arg(long)]
    pub allow_simulated: bool,
    /// Trusted simulator public key: 64 hex digits, or @FILE holding them (`host-launcher run
    /// --tee none` writes simulated-tee.pub beside the console log). Repeatable.
    #[arg(long, value_name = "HEX|@FILE")]
    pub simulated_key: Vec<String>,
    /// Accept a worker whose measured host config lets it serve on GPUs that are not in
    /// confidential-computing mode (`host-launcher run --dev-allow-gpu-without-cc`; INSECURE:
    /// the host can read GPU memory). Rejected by default (reason dev_gpu_without_cc).
    #[arg(long)]
    pub allow_dev_gpu_without_cc: bool,
    /// JSON array of allowed image hashes (64 hex digits each; cw-v1 unless --image-hash).
    #[arg(long, value_name = "FILE")]
    pub allow_list: Option<PathBuf>,
    /// Which image hash the allow-lists hold: cw-v1 (ours) or cocoon-v1 (Cocoon roots).
    #[arg(long, value_name = "KIND", default_value = "cw-v1")]
    pub image_hash: ImageHashKind,
    /// Expect exactly the image in this directory: its hash (for --memory/--cpus; needs its
    /// captured acpi/) must be the worker's.
    #[arg(long, value_name = "DIR")]
    pub image: Option<PathBuf>,
    /// Guest memory of the launch, for --image (default: the manifest's), e.g. 2048 or 2G.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<MemMib>,
    /// vCPUs of the launch, for --image (default: the manifest's).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Collateral JSON (dcap-qvl QuoteCollateralV3) for real TDX quotes.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["pccs_url", "offline"])]
    pub collateral: Option<PathBuf>,
    /// Fetch the collateral for the worker's platform from this PCCS (or Intel's PCS) base URL
    /// (v4 API), caching it in --collateral-cache when given.
    #[arg(long, value_name = "URL")]
    pub pccs_url: Option<String>,
    /// Directory caching fetched collateral (one file per platform); reused while valid.
    #[arg(long, value_name = "DIR")]
    pub collateral_cache: Option<PathBuf>,
    /// Use only --collateral-cache, never the network.
    #[arg(long, requires = "collateral_cache", conflicts_with = "pccs_url")]
    pub offline: bool,
    /// Refetch cached collateral older than this many seconds (default one day).
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    pub cache_max_age: u64,
    /// The image allow-list from a root contract (--root ADDRESS --rpc URL): every list given
    /// (--allow-list, --image, --root) must approve the worker's image hash.
    #[command(flatten)]
    pub chain: ChainArgs,
    /// The exact host-config bytes the worker must have measured (e.g. the launcher's
    /// <run dir>/host-config.json): checked against the RTMR3 `host_config` event.
    #[arg(long, value_name = "FILE")]
    pub host_config: Option<PathBuf>,
    /// Also accept this TCB status (repeatable; UpToDate always is, Revoked never).
    #[arg(long = "allow-status", value_name = "STATUS")]
    pub allow_status: Vec<String>,
    /// GPU evidence: --require-gpu, --gpu-reference FILE, --gpu-root FILE, --gpu-root-sha256.
    #[command(flatten)]
    pub gpu: attestation::gpu::GpuArgs,
    /// Mutual RA-TLS: present this client certificate (PEM) to workers that require one (their
    /// RTMR3 `client_auth` event lists the certificates they admit; the launcher's
    /// `run --allow-client-cert FILE` pins it). Needs --client-key.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM: PKCS#8, PKCS#1 or SEC1; Ed25519, ECDSA or RSA).
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// A key given as hex or @FILE.
pub fn parse_key(arg: &str) -> Result<[u8; 32], TrustError> {
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|source| TrustError::Read {
            path: format!("the simulator key file {path}"),
            source,
        })?,
        None => arg.to_owned(),
    };
    let b = hex::decode(text.trim())
        .map_err(|e| TrustError::Config(format!("simulator key {arg:?} is not hex: {e}")))?;
    <[u8; 32]>::try_from(b.as_slice()).map_err(|_| {
        TrustError::Config(format!(
            "simulator key {arg:?} must be 32 bytes (64 hex digits)"
        ))
    })
}

/// Every list must approve the hash.
#[derive(Debug)]
pub struct AllOf(pub Vec<Arc<dyn AllowList>>);

impl AllowList for AllOf {
    fn contains(&self, h: &[u8; 32]) -> Result<bool, AllowListError> {
        for l in &self.0 {
            if !l.contains(h)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl TrustArgs {
    /// The image hash of `--image` for the launch given by --memory/--cpus.
    fn image_hash(&self, dir: &Path) -> Result<[u8; 32], TrustError> {
        let runtime = match (&self.host_config, self.image_hash) {
            (Some(p), ImageHashKind::CocoonV1) => {
                Some(attestation::runtime::runtime_inputs(&read(p)?))
            }
            (None, ImageHashKind::CocoonV1) => {
                return Err(TrustError::Config(
                    "the cocoon-v1 hash covers RTMR3, which depends on the host config: pass \
                     --host-config with --image"
                        .into(),
                ));
            }
            _ => None,
        };
        let opts = measurements::image::Options {
            memory: self.memory.map(|m| m.0 * 1024 * 1024),
            cpus: self.cpus,
            runtime,
            ..measurements::image::Options::default()
        };
        let m = measurements::image::measure_image_dir(dir, &opts).map_err(|e| {
            TrustError::Config(format!("cannot measure the image {}: {e}", dir.display()))
        })?;
        let h = match self.image_hash {
            ImageHashKind::CwV1 => m.image_hash_cw_v1,
            ImageHashKind::CocoonV1 => m.image_hash_cocoon_v1,
        }
        .ok_or_else(|| {
            TrustError::Config(format!(
                "the image hash of {} cannot be computed ({}); capture its ACPI tables with \
                 `cargo xtask image capture-acpi`",
                dir.display(),
                m.missing.values().cloned().collect::<Vec<_>>().join("; ")
            ))
        })?;
        let b = hex::decode(&h)
            .map_err(|e| TrustError::Config(format!("image hash {h} is not hex: {e}")))?;
        <[u8; 32]>::try_from(b.as_slice())
            .map_err(|_| TrustError::Config(format!("image hash {h} is not 32 bytes")))
    }

    /// The client certificate to present (`--client-cert`/`--client-key`), if given.
    pub fn client_identity(
        &self,
    ) -> Result<Option<attestation::client_auth::ClientIdentity>, TrustError> {
        let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) else {
            return Ok(None);
        };
        attestation::client_auth::ClientIdentity::from_pem_files(cert, key)
            .map(Some)
            .map_err(|e| {
                TrustError::Config(format!(
                    "--client-cert {} / --client-key {}: {e}",
                    cert.display(),
                    key.display()
                ))
            })
    }

    /// An RA-TLS client with `verifier` that presents `--client-cert`, if given.
    pub fn client(&self, verifier: Verifier) -> Result<attestation::RaTlsHttpClient, TrustError> {
        let c = attestation::RaTlsHttpClient::new(verifier);
        Ok(match self.client_identity()? {
            Some(id) => c.with_client_identity(id),
            None => c,
        })
    }

    /// Build the verifier; `extra` is another allow-list source (e.g. the root contract) that
    /// must also approve the image hash.
    pub fn verifier(&self, extra: Option<Arc<dyn AllowList>>) -> Result<Verifier, TrustError> {
        let mut policy = Policy::default().with_simulated(self.allow_simulated);
        policy.allow_dev_gpu_without_cc = self.allow_dev_gpu_without_cc;
        for s in &self.allow_status {
            policy = policy.allow_status(s);
        }
        if self.allow_simulated && self.simulated_key.is_empty() {
            return Err(TrustError::Config(
                "--allow-simulated needs the simulator's public key: --simulated-key HEX or \
                 @FILE (host-launcher run --tee none writes simulated-tee.pub beside the console \
                 log)"
                    .into(),
            ));
        }
        let collateral = attestation::cli::collateral_source(
            self.collateral.as_deref(),
            self.pccs_url.as_deref(),
            self.collateral_cache.as_deref(),
            self.offline,
            self.cache_max_age,
            attestation::verify::unix_secs(std::time::SystemTime::now()),
        )?;
        let mut v = Verifier::new(policy, collateral).with_image_hash_kind(self.image_hash);
        for k in &self.simulated_key {
            v = v.with_simulated_key(parse_key(k)?);
        }
        let mut lists: Vec<Arc<dyn AllowList>> = Vec::new();
        if let Some(p) = &self.allow_list {
            lists.push(Arc::new(StaticAllowList::from_file(p)?));
        }
        if let Some(dir) = &self.image {
            lists.push(Arc::new(StaticAllowList::new([self.image_hash(dir)?])));
        }
        lists.extend(extra);
        if !lists.is_empty() {
            v = v.with_allow_list(Arc::new(AllOf(lists)));
        }
        if let Some(p) = &self.host_config {
            v = v.with_expected_host_config(read(p)?);
        }
        if let Some(p) = self.gpu.policy()? {
            v = v.with_gpu_policy(p);
        }
        Ok(v)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: TrustArgs,
    }

    fn args(extra: &[&str]) -> TrustArgs {
        let mut v = vec!["t"];
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
        let e = args(&["--allow-simulated"]).verifier(None).unwrap_err();
        assert!(e.to_string().contains("--simulated-key"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("l.json");
        std::fs::write(&f, format!("[\"{}\"]", "11".repeat(32))).unwrap();
        assert!(
            args(&["--allow-list", f.to_str().unwrap()])
                .verifier(None)
                .is_ok()
        );
        let both = AllOf(vec![
            Arc::new(StaticAllowList::new([[1; 32], [2; 32]])),
            Arc::new(StaticAllowList::new([[2; 32]])),
        ]);
        assert!(both.contains(&[2; 32]).unwrap());
        assert!(!both.contains(&[1; 32]).unwrap());
    }

    #[test]
    fn dev_gpu_workers_are_refused_unless_the_flag() {
        assert!(
            !args(&[])
                .verifier(None)
                .unwrap()
                .policy
                .allow_dev_gpu_without_cc
        );
        assert!(
            args(&["--allow-dev-gpu-without-cc"])
                .verifier(None)
                .unwrap()
                .policy
                .allow_dev_gpu_without_cc
        );
    }

    #[test]
    fn gpu_flags_reach_the_verifier() {
        assert!(args(&[]).verifier(None).unwrap().gpu_policy().is_none());
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("gpu-ref.json");
        std::fs::write(
            &f,
            format!(r#"{{"measurements": {{"1": ["{}"]}}}}"#, "ab".repeat(48)),
        )
        .unwrap();
        let v = args(&["--require-gpu", "--gpu-reference", f.to_str().unwrap()])
            .verifier(None)
            .unwrap();
        let p = v.gpu_policy().unwrap();
        assert!(p.required);
        assert_eq!(p.pinned_roots.len(), 1, "NVIDIA's root only");
        std::fs::write(&f, "{}").unwrap();
        let e = args(&["--gpu-reference", f.to_str().unwrap()])
            .verifier(None)
            .unwrap_err();
        assert!(e.to_string().contains("--gpu-reference"), "{e}");
        let bad = <T as clap::Parser>::try_parse_from(["t", "--require-gpu"]);
        assert!(bad.is_err(), "--require-gpu needs --gpu-reference");
    }

    #[test]
    fn memory_sizes_parse_like_the_launcher() {
        assert_eq!("2048".parse::<MemMib>().unwrap(), MemMib(2048));
        assert_eq!("2G".parse::<MemMib>().unwrap(), MemMib(2048));
        assert!("2X".parse::<MemMib>().is_err());
        assert!("16".parse::<MemMib>().is_err());
        assert!("".parse::<MemMib>().is_err());
    }

    #[test]
    fn chain_lists_need_root_and_rpc() {
        assert!(args(&[]).chain.image_allow_list().unwrap().is_none());
        let a = args(&["--root", "nonsense", "--rpc", "http://127.0.0.1:1/api/v2"]);
        assert!(
            a.chain
                .image_allow_list()
                .unwrap_err()
                .to_string()
                .contains("--root")
        );
    }
}
