//! host-launcher: boots the worker image under QEMU on the GPU owner's host.
//!
//! `host-launcher run` reads settings (a `worker.yaml` plus command-line overrides), checks the
//! image (directory or signed-off bundle), writes the host config for the guest, builds the QEMU
//! command line ([`qemu::argv`], a pure function), boots, waits for the agent's `/health`, and
//! stops the guest cleanly on Ctrl-C. See ARCHITECTURE.md for where it sits.

mod accel;
mod attest;
mod capture;
mod chat;
mod fwcapture;
mod gpu;
mod image;
mod onchain;
mod qemu;
mod rtmr0diag;
mod settings;
mod shape;
mod supervise;
mod verify;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};

use settings::{AccelMode, FileSettings, MemSize, PciBdf, Tee};

#[derive(Debug, Parser)]
#[command(
    name = "host-launcher",
    version,
    about = "Boot the confidential worker image under QEMU and supervise it",
    long_about = "Boot the confidential worker image under QEMU and supervise it.\n\n\
        Typical use:\n  \
        host-launcher run --config worker.yaml\n  \
        host-launcher run --image out/worker --tee none --exit-when-healthy   (test without TDX)\n  \
        host-launcher verify --url https://127.0.0.1:PORT --allow-simulated --simulated-key @RUN/simulated-tee.pub\n  \
        host-launcher run --image worker-0.1.0.tar.zst --tee tdx --gpu 0000:3b:00.0 --dry-run"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check the image, boot it, wait until the agent is healthy, run until Ctrl-C.
    ///
    /// Settings come from --config (a YAML file; see host-launcher/examples/worker.yaml), then
    /// the flags below override them; memory and cpus default to the image manifest's launch
    /// values. The guest console goes to a log file in the run directory; its path is printed.
    /// Ctrl-C (or SIGTERM) asks the agent to power off, then QMP quit, then kill.
    Run(Box<RunArgs>),
    /// Add a hash to a root-contract list (idempotent: an approved hash sends nothing).
    ///
    /// Example (local chain): host-launcher publish image-hash out/worker --root EQ... \
    ///   --rpc http://127.0.0.1:8081/api/v2 --network local --mnemonic-file team.mnemonic
    Publish(Box<onchain::PublishArgs>),
    /// Remove a hash from a root-contract list (idempotent).
    Remove(Box<onchain::PublishArgs>),
    /// Check whether an image (directory or hash) or model hash is approved by a root contract.
    /// Exit status: 0 approved, 3 not approved, 1 error.
    CheckOnchain(Box<onchain::CheckArgs>),
    /// Verify a running worker over RA-TLS and print the verdict (every reason).
    ///
    /// Connects to --url, verifies the agent's RA-TLS certificate (quote signature chain and TCB
    /// against --collateral, or the simulated TEE with --allow-simulated and its --simulated-key;
    /// DEBUG rejected; REPORTDATA bound to the TLS key), the image hash (against --allow-list
    /// and/or the hash of --image), then fetches GET /attestation and replays the RTMR3 event log
    /// against the quote (and checks it covers --host-config, when given).
    ///
    /// Exit status: 0 accepted, 3 rejected, 4 unreachable or transport error, 2 bad arguments.
    /// Example (as `host-launcher run --tee none` prints it):
    ///   host-launcher verify --url https://127.0.0.1:PORT --allow-simulated \
    ///     --simulated-key @RUN/simulated-tee.pub --image out/worker --host-config RUN/host-config.json
    Verify(Box<verify::VerifyArgs>),
    /// Verify a stored TDX quote (or RA-TLS certificate) offline against Intel collateral.
    ///
    /// Collateral comes from a file (--collateral), from a PCCS or Intel's PCS (--pccs-url,
    /// cached with --collateral-cache), or from that cache alone (--offline). Exit status 0 only
    /// when accepted. With --json the verdict carries "tcb_status" (e.g. "UpToDate"), the
    /// registers, both image hashes (cw-v1, cocoon-v1) and every reason.
    /// Examples: host-launcher verify-quote --quote q.dat --collateral c.json --at 2025-07-01T00:00:00Z --json;
    /// host-launcher verify-quote --quote q.dat --pccs-url https://pccs.example:8081 --collateral-cache ~/.cache/cw-collateral
    ///
    /// With --root ADDRESS --rpc URL the image hash must be listed by that root contract
    /// (worker_hash_is_valid); answers are reused for --max-age seconds and an unreachable chain
    /// rejects.
    VerifyQuote(Box<onchain::VerifyQuoteArgs>),
    /// Capture the ACPI blobs QEMU builds for the image's TDX launch shapes (RTMR0) into <image>/acpi/.
    ///
    /// RTMR0 covers the ACPI tables QEMU generates at launch, so `measurements image` needs them
    /// (see measurements/README.md, "Capturing ACPI"). By default this captures the tables of
    /// the image's TDX launch shape (`--shape NAME`, or `--all-shapes` into <out>/shapes/NAME/):
    /// QEMU runs under TCG with the shape's machine line and PCI slots (stand-ins for vsock and
    /// GPUs), paused once the firmware has read the tables over fw_cfg, and the three blobs
    /// `etc/acpi/tables`, `etc/acpi/rsdp`, `etc/table-loader` are read from QEMU (`--via
    /// guest`: boot the image and ask the agent instead; same bytes). Writes `tables`, `rsdp`,
    /// `table-loader` and `capture.json` into --out. Always TCG: the tables may differ under
    /// KVM. The tables depend on the QEMU version, so a TDX host with another QEMU may differ:
    /// `run --tee tdx` then explains which blob and table differ.
    ///
    /// Example: host-launcher capture-acpi --image out/worker --all-shapes && measurements image
    /// out/worker (or `cargo xtask image capture-acpi`, which also rewrites measurements.json).
    CaptureAcpi(Box<capture::CaptureArgs>),
    /// Read the ACPI blobs any QEMU command line builds (for a launch the launcher does not
    /// make, e.g. another project's TD line run under TCG).
    ///
    /// Give the whole QEMU command after `--`; it is started paused with a qtest socket, QMP
    /// and the fw_cfg trace added, run until the firmware has read the tables, and the three
    /// blobs are written into --out with their SHA-384 (what a TD's RTMR0 "ACPI DATA" events
    /// carry). The command must not use -S, -qtest or -qmp itself.
    ///
    /// Example: host-launcher acpi-of --out /tmp/t -- qemu-system-x86_64 -accel tcg -cpu
    /// max,phys-bits=46 -machine q35,smm=off,pic=off,hpet=off -m 2G -nodefaults -bios OVMF.fd
    AcpiOf(capture::AcpiOfArgs),
    /// Send one chat completion to a running worker and print the reply as it streams in.
    ///
    /// Prints the reply on stdout and a summary (tokens, time to first token, decode tokens/s)
    /// on stderr; --json prints one JSON object instead. Temperature 0 (the default) is greedy.
    /// Example (as `run --tee none` prints the trust flags): host-launcher chat --url https://127.0.0.1:18443 --allow-simulated --simulated-key @RUN/simulated-tee.pub --image out/worker --max-tokens 32 \
    ///   "What is the capital of France?"
    Chat(Box<chat::ChatArgs>),
    /// GPU passthrough on this host: `gpu bind BDF` (to vfio-pci, with its IOMMU group; root),
    /// `gpu unbind BDF`, `gpu status`.
    ///
    /// `run --tee tdx --gpu BDF` checks the same things before it starts QEMU and names the
    /// fix for each problem (bind, IOMMU, iommufd, 64-bit PCI hole, host memory).
    Gpu(gpu::GpuArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// YAML settings file: keys as the long flags with `_` (listen_port, model_sha256, ...;
    /// the timeouts are health_timeout_secs and shutdown_timeout_secs).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Image directory (from `cargo xtask image build`) or bundle .tar.zst (from `cargo xtask
    /// image package`, with its .sha256 beside it). Default: out/worker if it exists.
    #[arg(long, value_name = "DIR|BUNDLE")]
    image: Option<PathBuf>,
    /// TEE mode: tdx (KVM + TDX, QEMU >= 10.1; the agent's quote is verified with --collateral)
    /// or none (KVM or TCG, see --accel; for tests: the guest gets an INSECURE simulated TEE with
    /// a fresh key, written to simulated-tee.pub beside the console log). Default: tdx.
    #[arg(long, value_enum)]
    tee: Option<Tee>,
    /// Accelerator for --tee none: auto (KVM when /dev/kvm can create VMs on a CPU with
    /// VMX/SVM, else TCG; the launcher prints which and why), kvm (or an error naming the fix),
    /// tcg. --tee tdx always runs under KVM. Default: auto.
    #[arg(long, value_enum, value_name = "MODE")]
    accel: Option<AccelMode>,
    /// Guest memory: 2048 (MiB), 2048M, 2G, 2GiB. Default: the manifest's launch.memory_mib.
    #[arg(long, value_name = "SIZE")]
    memory: Option<MemSize>,
    /// Virtual CPUs. Default: the manifest's launch.cpus.
    #[arg(long)]
    cpus: Option<u32>,
    /// GPU to pass through (PCI address as `lspci -D` prints it, e.g. 0000:3b:00.0); tdx only.
    /// Repeat for several GPUs; each gets its own PCIe root port, in the order given.
    #[arg(long, value_name = "BDF")]
    gpu: Vec<PciBdf>,
    /// TDX launch shape declared by the image (manifest.json launch.tdx.shapes; the image's
    /// hash for that shape is what gets published). Default: the shape whose memory, vCPUs and
    /// GPU count match this launch; --tee tdx refuses a launch that matches none.
    #[arg(long, value_name = "NAME")]
    shape: Option<String>,
    /// Let --tee tdx run outside the declared shapes and QEMU releases. The TD then reports an
    /// RTMR0, and so an image hash, that nobody published: verifiers and the root contract
    /// will reject it. For bring-up on new hardware only.
    #[arg(long)]
    allow_unlisted_shape: bool,
    /// Packed model disk (the directory `cargo xtask model pack` wrote, or its model.json): the
    /// recommended way to serve a model. model.img is attached read-only; name, revision, root
    /// hash, salt, sizes and offsets go into the measured host config, and the guest reads the
    /// model only through a dm-verity mapping with that root hash (every block checked on
    /// read). Memory: the CPU backend keeps one copy of the repacked weights; with --gpu the
    /// model's size does not count.
    #[arg(long, value_name = "DIR|model.json", conflicts_with = "model")]
    model_disk: Option<PathBuf>,
    /// Model file (GGUF) the agent serves, for small models: attached read-only as a raw
    /// virtio disk; the guest copies it into private memory and checks its SHA-256 (in the
    /// measured host config) before serving it on /v1/*. The guest needs memory for about
    /// twice the file (see --memory); larger models need --model-disk.
    #[arg(long, value_name = "FILE")]
    model: Option<PathBuf>,
    /// Expected SHA-256 of --model (64 lowercase hex digits). Default: the launcher hashes the
    /// file. Either way the guest checks the bytes it reads against it.
    #[arg(long, value_name = "HEX")]
    model_sha256: Option<String>,
    /// The model's id on /v1/* (default: the file name without extension, lowercased).
    #[arg(long, value_name = "NAME")]
    model_name: Option<String>,
    /// TON wallet address that receives payouts.
    #[arg(long, value_name = "ADDRESS")]
    payout_wallet: Option<String>,
    /// Root contract address whose allow-lists this worker follows.
    #[arg(long, value_name = "ADDRESS")]
    root_contract: Option<String>,
    /// Host port on 127.0.0.1 forwarded to the agent. Default: a free port.
    #[arg(long = "listen-port", alias = "port", value_name = "PORT")]
    listen_port: Option<u16>,
    /// Guest serial console log. Default: <run dir>/console.log.
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// Directory for this run's files (console log, QMP socket, host config).
    /// Default: <tmp>/host-launcher/run-<time>-<pid>.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Where bundles are unpacked. Default: $XDG_CACHE_HOME/host-launcher or ~/.cache/host-launcher.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// QEMU binary. Default: qemu-system-x86_64 from PATH.
    #[arg(long, value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// Seconds to wait for /health. Default: 120 (none), 300 (tdx).
    #[arg(long = "health-timeout", value_name = "SECS")]
    health_timeout_secs: Option<u64>,
    /// Seconds to wait for the guest to power off after POST /shutdown. Default: 30.
    #[arg(long = "shutdown-timeout", value_name = "SECS")]
    shutdown_timeout_secs: Option<u64>,
    /// vsock context id of the guest (tdx only). Default: 3.
    #[arg(long, value_name = "CID")]
    guest_cid: Option<u32>,
    /// Print the QEMU command line (shell-quoted) and exit without booting.
    #[arg(long)]
    dry_run: bool,
    /// Once healthy, print the health and stop the guest cleanly (for scripts and tests).
    #[arg(long)]
    exit_when_healthy: bool,
    /// Machine-readable stdout: the agent's Health JSON (or, with --dry-run, {"argv": [...]}).
    #[arg(long)]
    json: bool,
    /// Collateral JSON (dcap-qvl QuoteCollateralV3, e.g. from a PCCS) to verify the agent's
    /// real TDX quote with (`--tee tdx`). Without it a TDX agent cannot be verified and the run
    /// stops. (With `--tee none` the launcher verifies its own simulated TEE instead.)
    #[arg(long, value_name = "FILE")]
    collateral: Option<PathBuf>,
    /// DEVELOPMENT ONLY: let the guest serve on GPUs that are not in confidential-computing
    /// mode (it refuses to otherwise). Written into the measured host config
    /// (`dev_allow_gpu_without_cc`), so every verifier of this worker can see it.
    #[arg(long)]
    dev_allow_gpu_without_cc: bool,
    #[command(flatten)]
    approval: onchain::ApprovalArgs,
    /// Mutual RA-TLS: admit only TLS clients presenting this certificate (PEM; repeatable).
    /// Each certificate's SHA-256 goes into the measured host config (client_auth) and its own
    /// RTMR3 event, so clients verifying the worker see that it requires a client certificate
    /// and which ones; anyone else fails the handshake. Clients present theirs with
    /// `gateway`/`chat`/`verify --client-cert FILE --client-key FILE`. The launcher pins one
    /// more: a fresh certificate of its own, whose key lives only in its memory for this run
    /// (for its health checks and the clean shutdown); it prints that pin.
    #[arg(long, value_name = "FILE")]
    allow_client_cert: Vec<PathBuf>,
}

impl RunArgs {
    fn overrides(&self) -> FileSettings {
        FileSettings {
            image: self.image.clone(),
            tee: self.tee,
            accel: self.accel,
            memory: self.memory,
            cpus: self.cpus,
            gpu: None,
            gpus: (!self.gpu.is_empty()).then(|| self.gpu.clone()),
            shape: self.shape.clone(),
            allow_unlisted_shape: self.allow_unlisted_shape.then_some(true),
            model: self.model.clone(),
            model_disk: self.model_disk.clone(),
            model_sha256: self.model_sha256.clone(),
            model_name: self.model_name.clone(),
            payout_wallet: self.payout_wallet.clone(),
            root_contract: self.root_contract.clone(),
            listen_port: self.listen_port,
            console_log: self.console_log.clone(),
            run_dir: self.run_dir.clone(),
            cache_dir: self.cache_dir.clone(),
            qemu: self.qemu.clone(),
            health_timeout_secs: self.health_timeout_secs,
            shutdown_timeout_secs: self.shutdown_timeout_secs,
            guest_cid: self.guest_cid,
            dev_allow_gpu_without_cc: self.dev_allow_gpu_without_cc.then_some(true),
            allow_client_cert: (!self.allow_client_cert.is_empty())
                .then(|| self.allow_client_cert.clone()),
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => cmd_run(&args),
        Cmd::Publish(args) => onchain::cmd_publish(&args, ton_root::Change::Add),
        Cmd::Remove(args) => onchain::cmd_publish(&args, ton_root::Change::Remove),
        Cmd::VerifyQuote(args) => std::process::exit(onchain::cmd_verify_quote(&args)),
        Cmd::Verify(args) => std::process::exit(verify::cmd_verify_with_chain(&args)),
        Cmd::CaptureAcpi(args) => capture::cmd_capture(&args),
        Cmd::AcpiOf(args) => capture::cmd_acpi_of(&args),
        Cmd::Chat(args) => chat::cmd_chat(&args),
        Cmd::Gpu(args) => gpu::cmd_gpu(&args),
        Cmd::CheckOnchain(args) => match onchain::cmd_check(&args) {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(3),
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        eprintln!("host-launcher: error: {e:#}");
        std::process::exit(1);
    }
}

fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("host-launcher");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".cache/host-launcher");
    }
    std::env::temp_dir().join("host-launcher-cache")
}

fn default_run_dir() -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    std::env::temp_dir()
        .join("host-launcher")
        .join(format!("run-{secs}-{}", std::process::id()))
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind(("127.0.0.1", 0))
        .context("cannot find a free TCP port on 127.0.0.1: pass --listen-port")?;
    Ok(l.local_addr()?.port())
}

/// The model file as attached to the guest: where, under which name, how big, which hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelDisk {
    pub path: PathBuf,
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// The packed model's description when the disk is a dm-verity model disk
    /// (`--model-disk`); `None` for a raw GGUF (`--model`).
    pub verity: Option<Box<measurements::model_disk::ModelJson>>,
}

/// Checks the model (a packed dm-verity disk, or a raw GGUF file) and settles its name, size
/// and digest (hashing a raw file, with progress on stderr, unless `model_sha256` is given).
fn model_disk(s: &FileSettings) -> Result<Option<ModelDisk>> {
    if let Some(dir) = &s.model_disk {
        if s.model.is_some() {
            bail!(
                "both model (a raw GGUF) and model_disk (a packed dm-verity disk) are set: use one"
            );
        }
        if s.model_sha256.is_some() || s.model_name.is_some() {
            bail!(
                "model_sha256/model_name do not apply to --model-disk: the name and the root \
                 hash come from model.json (pack again with `cargo xtask model pack --name`)"
            );
        }
        return verity_disk(dir).map(Some);
    }
    let Some(path) = &s.model else {
        if s.model_sha256.is_some() || s.model_name.is_some() {
            bail!("model_sha256/model_name are set but no model file: pass --model FILE");
        }
        return Ok(None);
    };
    let path = absolute(path)?;
    let meta = std::fs::metadata(&path).with_context(|| {
        format!(
            "cannot read model file {}: check --model (fetch the demo model with `cargo xtask \
             model fetch smollm2-135m`)",
            path.display()
        )
    })?;
    if !meta.is_file() || meta.len() == 0 {
        bail!(
            "model {} is not a non-empty regular file: pass the GGUF file itself",
            path.display()
        );
    }
    let name = match &s.model_name {
        Some(n) => n.clone(),
        None => path
            .file_stem()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_else(|| "model".into()),
    };
    if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control()) {
        bail!("model name {name:?} must be 1-128 printable characters: pass --model-name");
    }
    let sha256 = match &s.model_sha256 {
        Some(h) => {
            settings::validate_sha256_hex("model_sha256", h).map_err(|e| anyhow!(e))?;
            h.clone()
        }
        None => sha256_file_with_progress(&path, meta.len())?,
    };
    Ok(Some(ModelDisk {
        path,
        name,
        size: meta.len(),
        sha256,
        verity: None,
    }))
}

/// A packed model directory (or its model.json): validates model.json and checks that
/// model.img beside it has exactly the size it names (a truncated or foreign disk is refused
/// here; its content is checked by the guest, block by block, through dm-verity).
fn verity_disk(arg: &Path) -> Result<ModelDisk> {
    use measurements::model_disk::{DISK_FILE, JSON_FILE, ModelJson};
    let arg = absolute(arg)?;
    let json_path = if arg.is_dir() {
        arg.join(JSON_FILE)
    } else {
        arg.clone()
    };
    let bytes = std::fs::read(&json_path).with_context(|| {
        format!(
            "cannot read {}: pass the directory `cargo xtask model pack` wrote (model.json and \
             model.img), or its model.json",
            json_path.display()
        )
    })?;
    let json = ModelJson::parse(&bytes).with_context(|| format!("{}", json_path.display()))?;
    let dir = json_path.parent().unwrap_or(Path::new("."));
    let disk = dir.join(DISK_FILE);
    let meta = std::fs::metadata(&disk).with_context(|| {
        format!(
            "cannot read the model disk {} named by {}: keep model.img beside model.json",
            disk.display(),
            json_path.display()
        )
    })?;
    if !meta.is_file() || meta.len() != json.disk_size {
        bail!(
            "model disk {} is {} bytes but {} says {}: it is truncated or not this model's \
             disk; pack the model again with `cargo xtask model pack`",
            disk.display(),
            meta.len(),
            json_path.display(),
            json.disk_size
        );
    }
    eprintln!(
        "host-launcher: model disk {} ({} {}, root hash {}, model hash {})",
        disk.display(),
        json.name,
        json.revision,
        json.verity.root_hash,
        json.model_hash
    );
    Ok(ModelDisk {
        path: disk,
        name: json.name.clone(),
        size: json.gguf.size,
        sha256: json.model_hash.clone(),
        verity: Some(Box::new(json)),
    })
}

/// The measured `model_verity` of a packed model.
fn model_verity(j: &measurements::model_disk::ModelJson) -> worker_api::ModelVerity {
    let v = &j.verity;
    worker_api::ModelVerity {
        revision: j.revision.clone(),
        file_size: j.gguf.size,
        disk_size: j.disk_size,
        format: v.format,
        hash_algorithm: v.hash_algorithm.clone(),
        data_block_size: v.data_block_size,
        hash_block_size: v.hash_block_size,
        data_blocks: v.data_blocks,
        hash_blocks: v.hash_blocks,
        hash_offset: v.hash_offset,
        salt: v.salt.clone(),
        root_hash: v.root_hash.clone(),
    }
}

/// SHA-256 of a file, lowercase hex, printing progress on stderr for big files.
fn sha256_file_with_progress(path: &Path, size: u64) -> Result<String> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("cannot open model file {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let (mut done, mut shown) = (0u64, 0u64);
    let start = std::time::Instant::now();
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read model file {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        done += n as u64;
        let pct = done * 100 / size.max(1);
        if size > 64 << 20 && pct >= shown + 25 {
            shown = pct - pct % 25;
            eprintln!(
                "host-launcher: hashing model {}: {pct}%",
                path.file_name().unwrap_or_default().to_string_lossy()
            );
        }
    }
    if done != size {
        bail!(
            "model file {} changed size while it was hashed ({size} -> {done} bytes)",
            path.display()
        );
    }
    let hex = hex::encode(h.finalize());
    eprintln!(
        "host-launcher: model sha256 {hex} ({done} bytes, {:.1} s); pass --model-sha256 to skip \
         hashing next time",
        start.elapsed().as_secs_f64()
    );
    Ok(hex)
}

/// Mutual RA-TLS: the pins of the `--allow-client-cert` files plus a fresh per-run certificate
/// of the launcher's own (returned, for its health checks and shutdown); `(None, None)` when no
/// file is given.
fn client_auth(
    files: Option<&[PathBuf]>,
) -> Result<(
    Option<worker_api::ClientAuth>,
    Option<attestation::client_auth::ClientIdentity>,
)> {
    use attestation::client_auth::{ClientIdentity, cert_sha256_from_pem};
    let Some(files) = files.filter(|f| !f.is_empty()) else {
        return Ok((None, None));
    };
    let mut pins = Vec::new();
    for f in files {
        let pem = std::fs::read(f).with_context(|| {
            format!(
                "cannot read --allow-client-cert {}: give the PEM certificate of a client to                  admit",
                f.display()
            )
        })?;
        let pin = cert_sha256_from_pem(&format!("--allow-client-cert {}", f.display()), &pem)?;
        eprintln!(
            "host-launcher: admitting TLS clients with certificate {} (SHA-256 {})",
            f.display(),
            hex::encode(pin)
        );
        pins.push(pin);
    }
    let (cert, key) = ClientIdentity::generate_pem("host-launcher (per run)")?;
    let own = ClientIdentity::from_pem(cert.as_bytes(), key.as_bytes())?;
    eprintln!(
        "host-launcher: also pinned: the launcher's own per-run client certificate (SHA-256 {};          its key never leaves this process) for health checks and shutdown",
        hex::encode(own.cert_sha256())
    );
    pins.push(own.cert_sha256());
    pins.sort_unstable();
    pins.dedup();
    Ok((
        Some(worker_api::ClientAuth {
            cert_sha256: pins.iter().map(hex::encode).collect(),
        }),
        Some(own),
    ))
}

/// Builds the host config from settings, validating each field.
fn host_config(
    s: &FileSettings,
    model: Option<&ModelDisk>,
    ton_rpc: Option<String>,
) -> Result<worker_api::HostConfig> {
    if let Some(a) = &s.payout_wallet {
        settings::validate_ton_address("payout_wallet", a).map_err(|e| anyhow!(e))?;
    }
    if let Some(a) = &s.root_contract {
        settings::validate_ton_address("root_contract", a).map_err(|e| anyhow!(e))?;
    }
    let raw = model.filter(|m| m.verity.is_none());
    if s.dev_allow_gpu_without_cc == Some(true) {
        eprintln!(
            "host-launcher: WARNING: dev_allow_gpu_without_cc: the guest will serve on GPUs that              are not in confidential-computing mode (development only; measured in the host config)"
        );
    }
    Ok(worker_api::HostConfig {
        model: model.map(|m| m.name.clone()),
        model_sha256: raw.map(|m| m.sha256.clone()),
        payout_wallet: s.payout_wallet.clone(),
        root_contract: s.root_contract.clone(),
        ton_rpc,
        model_size: raw.map(|m| m.size),
        model_verity: model
            .and_then(|m| m.verity.as_deref())
            .map(|j| Box::new(model_verity(j))),
        dev_allow_gpu_without_cc: s.dev_allow_gpu_without_cc.filter(|a| *a),
        client_auth: None,
    })
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot resolve path {}", p.display()))
}

fn cmd_run(args: &RunArgs) -> Result<()> {
    let file = match &args.config {
        Some(c) => settings::load_yaml(c)?,
        None => FileSettings::default(),
    };
    let s = settings::overlay(file, args.overrides());
    let ton_rpc = onchain::guest_rpc(s.root_contract.as_deref(), &args.approval)?;
    let mut launch = prepare_with(&s, ton_rpc)?;
    let preflight = launch.gpu_preflight(&gpu::HostRoot::default());
    if args.dry_run {
        if let Some(pf) = &preflight {
            for line in &pf.notes {
                eprintln!("host-launcher: preflight: {line}");
            }
            for p in &pf.problems {
                eprintln!(
                    "host-launcher: preflight (not enforced with --dry-run): {}; fix: {}",
                    p.what, p.fix
                );
            }
        }
    } else if let Some(pf) = preflight {
        let pf = pf.into_result()?;
        for line in &pf.notes {
            eprintln!("host-launcher: preflight: {line}");
        }
        launch.plan.vfio_legacy = !pf.iommufd;
    }
    let plan = &launch.plan;

    if args.dry_run {
        let argv = qemu::argv(plan);
        if args.json {
            println!("{}", serde_json::json!({ "argv": argv }));
        } else {
            println!("{}", qemu::shell_line(&argv));
        }
        eprintln!(
            "host-launcher: dry run; host config written to {}",
            plan.host_config_file.display()
        );
        return Ok(());
    }

    onchain::check_before_boot(&launch, s.root_contract.as_deref(), &args.approval)?;
    launch.check_qemu(s.allow_unlisted_shape.unwrap_or(false))?;
    let opts = launch.run_options(
        &s,
        args.exit_when_healthy,
        args.json,
        true,
        args.collateral.as_deref(),
    )?;
    let result = supervise::run(plan, &opts);
    drop(launch);
    result
}

/// Everything a boot needs, checked and written: the image, the run directory (locked for this
/// launcher), the host config file and the QEMU plan. Shared by `run` and `capture-acpi`.
pub(crate) struct Launch {
    pub image: image::Image,
    pub plan: qemu::LaunchPlan,
    pub run_dir: PathBuf,
    /// The exact host-config bytes written for the guest.
    pub cfg_bytes: Vec<u8>,
    /// The simulated TEE handed to a `--tee none` guest.
    pub simulated: Option<attest::SimulatedLaunch>,
    /// Where the simulator's public key was written.
    pub simulated_key_file: Option<PathBuf>,
    /// What the launcher expects of the booted image (its cw-v1 hash, when computable).
    pub expected: attest::Expected,
    /// The declared TDX launch shape (`--tee tdx`; `None` for `--tee none` or an unlisted one).
    pub shape: Option<String>,
    /// The image's measurements for this launch (the shape's, for `--tee tdx`).
    pub measured: Option<measurements::image::ImageMeasurements>,
    /// With `--allow-client-cert`: the launcher's own per-run client certificate (pinned too).
    pub client_identity: Option<attestation::client_auth::ClientIdentity>,
    /// Held while the guest runs: one launcher per run directory.
    _run_lock: std::fs::File,
}

impl Launch {
    /// The host preflight of a `--tee tdx` launch ([`gpu::preflight`]: host memory, and each
    /// GPU's binding, IOMMU group, VFIO and BARs); `None` for `--tee none`.
    pub fn gpu_preflight(&self, root: &gpu::HostRoot) -> Option<gpu::Preflight> {
        if self.plan.tee != Tee::Tdx {
            return None;
        }
        let m = self.plan.tdx_machine.as_ref();
        Some(gpu::preflight(
            root,
            &gpu::Request {
                gpus: &self.plan.gpus,
                memory_mib: self.plan.memory_mib,
                pci_hole64_gib: m.and_then(|m| m.pci_hole64_gib),
                shape: self.shape.as_deref(),
            },
        ))
    }

    /// Checks the QEMU binary for the plan's TEE, prints the launch line, returns the version.
    pub fn check_qemu(&self, allow_unlisted_shape: bool) -> Result<(u32, u32, u32)> {
        let v = supervise::check_qemu(&self.plan.qemu, self.plan.tee)?;
        if self.plan.tee == Tee::Tdx
            && let Some(warning) = shape::check_qemu(
                self.image.manifest.launch.tdx.as_ref(),
                v,
                allow_unlisted_shape,
            )
            .map_err(|e| anyhow!(e))?
        {
            eprintln!("host-launcher: WARNING: {warning}");
        }
        eprintln!(
            "host-launcher: QEMU {}.{}.{}; {} MiB, {} vCPU(s); agent on 127.0.0.1:{}; run dir {}",
            v.0,
            v.1,
            v.2,
            self.plan.memory_mib,
            self.plan.cpus,
            self.plan.host_port,
            self.run_dir.display()
        );
        Ok(v)
    }

    /// An RA-TLS client presenting the launcher's per-run certificate, if any.
    fn ratls_client(&self, verifier: attestation::Verifier) -> attestation::RaTlsHttpClient {
        let c = attestation::RaTlsHttpClient::new(verifier);
        match &self.client_identity {
            Some(id) => c.with_client_identity(id.clone()),
            None => c,
        }
    }

    /// The supervisor options for these settings, with the RA-TLS client that checks the guest.
    pub fn run_options(
        &self,
        s: &FileSettings,
        exit_when_healthy: bool,
        json: bool,
        print_health: bool,
        collateral: Option<&Path>,
    ) -> Result<supervise::RunOptions> {
        let verifier = attest::launcher_verifier(
            self.simulated.as_ref(),
            collateral,
            &self.expected,
            &self.cfg_bytes,
        )?;
        let verify_line = self.simulated_key_file.as_ref().map(|k| {
            let mut l = format!(
                "host-launcher verify --url {} --allow-simulated --simulated-key @{}",
                attest::base_url(self.plan.host_port),
                qemu::shell_quote(&k.display().to_string())
            );
            if self.expected.image_hash_cw_v1.is_some() {
                l.push_str(&format!(
                    " --image {} --memory {} --cpus {}",
                    qemu::shell_quote(&self.image.dir.display().to_string()),
                    self.plan.memory_mib,
                    self.plan.cpus
                ));
            }
            l.push_str(&format!(
                " --host-config {}",
                qemu::shell_quote(&self.plan.host_config_file.display().to_string())
            ));
            if self.client_identity.is_some() {
                // Mutual RA-TLS: the worker admits only the pinned certificates.
                l.push_str(" --client-cert CERT.pem --client-key KEY.pem");
            }
            l
        });
        Ok(supervise::RunOptions {
            health_timeout: Duration::from_secs(s.health_timeout_secs.unwrap_or(
                match self.plan.tee {
                    Tee::None => 120,
                    Tee::Tdx => 300,
                },
            )),
            shutdown_timeout: Duration::from_secs(s.shutdown_timeout_secs.unwrap_or(30)),
            exit_when_healthy,
            json,
            qemu_log: self.run_dir.join("qemu.log"),
            host_config: self.cfg_bytes.clone(),
            expected_image: self.image.manifest.image.clone(),
            print_health,
            client: self.ratls_client(verifier),
            expected: self.expected.clone(),
            verify_line,
            rtmr0_diag: self.rtmr0_diag(collateral)?,
        })
    }

    /// The first-boot RTMR0 diagnosis of a `--tee tdx` launch of a declared shape whose RTMR0
    /// is known ([`rtmr0diag`]).
    fn rtmr0_diag(&self, collateral: Option<&Path>) -> Result<Option<rtmr0diag::Rtmr0Diag>> {
        let (Tee::Tdx, Some(shape), Some(m)) = (self.plan.tee, &self.shape, &self.measured) else {
            return Ok(None);
        };
        if m.rtmr0.is_none() {
            return Ok(None);
        }
        // The same checks as the launcher's verifier, without the image hash.
        let no_hash = attest::Expected {
            image_hash_cw_v1: None,
            image_hash_note: None,
        };
        let verifier = attest::launcher_verifier(None, collateral, &no_hash, &self.cfg_bytes)?;
        Ok(Some(rtmr0diag::Rtmr0Diag {
            client: self.ratls_client(verifier),
            expected: m.clone(),
            shape: shape.clone(),
            acpi_dir: self
                .image
                .dir
                .join("acpi")
                .join(measurements::image::SHAPES_DIR)
                .join(shape),
            out_dir: self.run_dir.join("actual-acpi"),
        }))
    }
}

/// Validates settings, checks the image, prepares the run directory and host config, and builds
/// the QEMU plan (nothing is started).
pub(crate) fn prepare(s: &FileSettings) -> Result<Launch> {
    prepare_with(s, None)
}

/// [`prepare`], with the `ton_rpc` the guest uses to check its approval (see
/// [`onchain::guest_rpc`]).
pub(crate) fn prepare_with(s: &FileSettings, ton_rpc: Option<String>) -> Result<Launch> {
    let tee = s.tee.unwrap_or(Tee::Tdx);
    if s.gpu.is_some() && s.gpus.is_some() {
        bail!("the settings name both `gpu` and `gpus`: list every GPU under `gpus`");
    }
    let gpus: Vec<PciBdf> = s
        .gpu
        .iter()
        .chain(s.gpus.iter().flatten())
        .cloned()
        .collect();
    if let Some(dup) = gpus
        .iter()
        .enumerate()
        .find_map(|(i, g)| gpus[..i].contains(g).then_some(g))
    {
        bail!("GPU {} is given twice", dup.as_str());
    }
    if tee == Tee::None && !gpus.is_empty() {
        bail!("--gpu needs --tee tdx: GPU passthrough is only set up for TDX guests");
    }
    if tee == Tee::None && s.shape.is_some() {
        bail!("--shape applies to --tee tdx launches only (--tee none takes any --memory/--cpus)");
    }
    let accel = accel::choose(
        tee,
        s.accel.unwrap_or_default(),
        Path::new(accel::KVM_DEVICE),
        accel::probe,
    )
    .map_err(|e| anyhow!(e))?;
    eprintln!("host-launcher: {}", accel.line());
    if s.cpus == Some(0) {
        bail!("cpus must be at least 1");
    }
    let image_arg = match &s.image {
        Some(i) => i.clone(),
        None if Path::new("out/worker").is_dir() => PathBuf::from("out/worker"),
        None => bail!(
            "no image given: pass --image <dir|bundle.tar.zst> or set `image:` in the config \
             (build one with `cargo xtask image build`)"
        ),
    };
    let model = model_disk(s)?;
    let (client_auth, client_identity) = client_auth(s.allow_client_cert.as_deref())?;
    let mut cfg = host_config(s, model.as_ref(), ton_rpc)?;
    cfg.client_auth = client_auth;
    let cache_dir = s.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let image = image::resolve(&image_arg, &cache_dir)?;
    eprintln!(
        "host-launcher: image {} {} (kernel {}) checked ({} files match manifest.json) in {}",
        image.manifest.image.name,
        image.manifest.image.version,
        image.manifest.kernel_release.as_deref().unwrap_or("?"),
        image.manifest.files.len(),
        image.dir.display()
    );

    let run_dir = absolute(&s.run_dir.clone().unwrap_or_else(default_run_dir))?;
    std::fs::create_dir_all(&run_dir).with_context(|| {
        format!(
            "cannot create run directory {}: choose another with --run-dir",
            run_dir.display()
        )
    })?;
    // One launcher per run directory: a second one would share the console log and socket.
    let lock_path = run_dir.join("launcher.lock");
    let run_lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    if run_lock.try_lock().is_err() {
        bail!(
            "another host-launcher is using run directory {}: stop it first or pass another \
             --run-dir",
            run_dir.display()
        );
    }
    let qmp_socket = run_dir.join("qmp.sock");
    if qmp_socket.as_os_str().len() > 100 {
        bail!(
            "run directory path {} is too long for a unix socket: choose a shorter --run-dir",
            run_dir.display()
        );
    }
    if std::fs::symlink_metadata(&qmp_socket).is_ok() {
        std::fs::remove_file(&qmp_socket)
            .with_context(|| format!("cannot remove stale {}", qmp_socket.display()))?;
    }
    let host_config_file = run_dir.join("host-config.json");
    let cfg_bytes = cfg.to_canonical_json();
    std::fs::write(&host_config_file, &cfg_bytes)
        .with_context(|| format!("cannot write {}", host_config_file.display()))?;

    let console_log = absolute(
        &s.console_log
            .clone()
            .unwrap_or_else(|| run_dir.join("console.log")),
    )?;
    let (memory_mib, cpus, tdx_machine, shape_name) = match tee {
        Tee::None => (
            s.memory.map_or(image.manifest.launch.memory_mib, |m| m.mib),
            s.cpus.unwrap_or(image.manifest.launch.cpus).max(1),
            None,
            None,
        ),
        Tee::Tdx => {
            let chosen = shape::choose(
                image.manifest.launch.tdx.as_ref(),
                &shape::Request {
                    shape: s.shape.as_deref(),
                    memory_mib: s.memory.map(|m| m.mib),
                    cpus: s.cpus,
                    gpus: gpus.len(),
                    allow_unlisted: s.allow_unlisted_shape.unwrap_or(false),
                },
                (image.manifest.launch.memory_mib, image.manifest.launch.cpus),
            )
            .map_err(|e| anyhow!(e))?;
            match &chosen.shape {
                Some(sh) => eprintln!(
                    "host-launcher: TDX launch shape {} ({} MiB, {} vCPUs, {} GPUs, machine {})",
                    sh.name, sh.memory_mib, sh.cpus, sh.gpus, chosen.machine.machine
                ),
                None => eprintln!(
                    "host-launcher: WARNING: unlisted TDX launch shape ({} MiB, {} vCPUs, {} GPUs; \
                     --allow-unlisted-shape): the TD reports an image hash that is on no allow-list",
                    chosen.memory_mib,
                    chosen.cpus,
                    gpus.len()
                ),
            }
            let name = chosen.shape.as_ref().map(|sh| sh.name.clone());
            (chosen.memory_mib, chosen.cpus, Some(chosen.machine), name)
        }
    };
    let (measured, expected) = attest::measure(&image.dir, shape_name.as_deref(), memory_mib, cpus);
    let (simulated, simulated_tee_file, simulated_key_file) = if tee == Tee::None {
        let sim = attest::simulated_launch(measured.as_ref())?;
        if let Some(parent) = console_log.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let (cfg, key) = attest::write_simulated(&sim, &run_dir, &console_log)?;
        eprintln!(
            "host-launcher: simulated TEE (insecure, test-only) for --tee none: key {} in {}",
            hex::encode(sim.public_key),
            key.display()
        );
        (Some(sim), Some(cfg), Some(key))
    } else {
        (None, None, None)
    };
    if let Some(note) = &expected.image_hash_note {
        eprintln!("host-launcher: note: {note}");
    }
    let plan = qemu::LaunchPlan {
        qemu: s
            .qemu
            .clone()
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
        tee,
        accel: accel.accel,
        memory_mib,
        cpus,
        gpus,
        vfio_legacy: false,
        tdx_machine,
        firmware: absolute(&image.firmware)?,
        kernel: absolute(&image.kernel)?,
        initrd: absolute(&image.initrd)?,
        cmdline: image.cmdline.clone(),
        host_port: match s.listen_port {
            Some(p) => p,
            None => free_port()?,
        },
        console_log,
        qmp_socket,
        host_config_file,
        simulated_tee_file,
        guest_cid: s.guest_cid.unwrap_or(3),
        model_disk: model.as_ref().map(|m| m.path.clone()),
    };
    if let Some(m) = &model {
        match &m.verity {
            None => check_memory_for_model(plan.memory_mib, m.size)?,
            Some(_) => check_memory_for_verity_model(
                &m.path,
                m.size,
                plan.memory_mib,
                !plan.gpus.is_empty(),
            )?,
        }
    }
    if let Some(parent) = plan.console_log.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if plan.guest_cid < 3 {
        bail!("guest_cid must be 3 or more (0-2 are reserved by vsock)");
    }
    Ok(Launch {
        image,
        plan,
        run_dir,
        cfg_bytes,
        simulated,
        simulated_key_file,
        expected,
        shape: shape_name,
        measured,
        client_identity,
        _run_lock: run_lock,
    })
}

/// Guest memory the model needs besides itself: kernel, initramfs, agent, KV cache.
const MODEL_MEMORY_HEADROOM_MIB: u64 = 512;

/// The guest holds the model twice while loading (the checked copy read from the disk and the
/// backend's weights) plus the system; refuses launches that would run out of memory.
fn check_memory_for_model(memory_mib: u64, model_bytes: u64) -> Result<()> {
    let need_mib = (2 * model_bytes).div_ceil(1 << 20) + MODEL_MEMORY_HEADROOM_MIB;
    if memory_mib < need_mib {
        bail!(
            "guest memory {memory_mib} MiB is too small for a {} MiB model: the guest reads the \
             model into private memory and loads it, so it needs about {need_mib} MiB; pass \
             --memory {need_mib}M, or pack the model (`cargo xtask model pack`) and pass \
             --model-disk: through dm-verity the guest keeps one copy of the weights",
            model_bytes >> 20,
        );
    }
    Ok(())
}

/// Context length the guest's backends allocate their KV cache for.
const GUEST_MAX_CONTEXT: u64 = 2048;

/// Guest memory a dm-verity model needs: nothing for its size on a GPU (tensors stream
/// through a bounded staging buffer into device memory); on the CPU backend one copy of the
/// repacked weights and the KV cache, computed from the GGUF header at the start of the disk.
fn verity_memory_need(disk: &Path, file_size: u64, gpu: bool) -> Result<(u64, String)> {
    if gpu {
        return Ok((
            MODEL_MEMORY_HEADROOM_MIB,
            "the GPU backend streams the weights into device memory".into(),
        ));
    }
    let f = std::fs::File::open(disk).with_context(|| format!("cannot open {}", disk.display()))?;
    let src = inference::stream::FileReadAt {
        file: f,
        len: file_size,
    };
    let header = inference::stream::read_header(&src)
        .with_context(|| format!("reading the GGUF header of {}", disk.display()))?;
    let g = inference::Gguf::parse_header(&header, file_size)
        .with_context(|| format!("the GGUF inside {}", disk.display()))?;
    let weights = inference::stream::cpu_weight_bytes(&g);
    // An unsupported model is the guest's to refuse (and name); count its weights only.
    let kv = inference::LlamaConfig::from_gguf(&g).map_or(0, |c| {
        2 * 4
            * (c.n_layers as u64)
            * GUEST_MAX_CONTEXT.min(c.context_len as u64)
            * c.kv_dim() as u64
    });
    let need = (weights + kv).div_ceil(1 << 20) + MODEL_MEMORY_HEADROOM_MIB;
    Ok((
        need,
        format!(
            "the CPU backend keeps {} MiB of repacked weights and a {} MiB KV cache",
            weights >> 20,
            kv >> 20
        ),
    ))
}

/// Refuses a launch whose guest memory cannot hold what a dm-verity model needs.
fn check_memory_for_verity_model(
    disk: &Path,
    file_size: u64,
    memory_mib: u64,
    gpu: bool,
) -> Result<()> {
    let (need_mib, why) = verity_memory_need(disk, file_size, gpu)?;
    if memory_mib < need_mib {
        bail!(
            "guest memory {memory_mib} MiB is too small for this model: {why}, so the guest \
             needs about {need_mib} MiB; pass --memory {need_mib}M"
        );
    }
    eprintln!(
        "host-launcher: guest memory {memory_mib} MiB for the model: {why} (needs about {need_mib} MiB)"
    );
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn accel_flag_parses() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["host-launcher", "run", "--tee", "none"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Cmd::Run(a)) => Ok(a.overrides().accel),
                Ok(other) => panic!("expected run, got {other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&["--accel", "auto"]), Ok(Some(AccelMode::Auto)));
        assert_eq!(parse(&["--accel", "kvm"]), Ok(Some(AccelMode::Kvm)));
        assert_eq!(parse(&["--accel=tcg"]), Ok(Some(AccelMode::Tcg)));
        let e = parse(&["--accel", "hvf"]).unwrap_err();
        assert!(e.contains("possible values: auto, kvm, tcg"), "{e}");
    }

    #[test]
    fn dry_run_uses_the_chosen_accelerator() {
        let d = tempfile::tempdir().unwrap();
        image::tests::write_fake_image(d.path());
        let s = |accel| FileSettings {
            image: Some(d.path().to_path_buf()),
            tee: Some(Tee::None),
            accel,
            run_dir: Some(d.path().join("run")),
            ..FileSettings::default()
        };
        let tcg = prepare(&s(Some(AccelMode::Tcg))).unwrap();
        assert_eq!(tcg.plan.accel, accel::Accel::Tcg);
        let a = qemu::argv(&tcg.plan);
        assert!(a.windows(4).any(|w| w == ["-accel", "tcg", "-cpu", "max"]));
        drop(tcg);
        // auto follows this host's probe; forced kvm is either kvm or an error with the fix.
        let usable = accel::probe(Path::new(accel::KVM_DEVICE)) == accel::KvmProbe::Usable;
        let auto = prepare(&s(None)).unwrap();
        assert_eq!(auto.plan.accel == accel::Accel::Kvm, usable);
        drop(auto);
        match prepare(&s(Some(AccelMode::Kvm))) {
            Ok(l) => {
                assert!(usable);
                let a = qemu::argv(&l.plan);
                assert!(a.windows(4).any(|w| w == ["-accel", "kvm", "-cpu", "host"]));
            }
            Err(e) => {
                assert!(!usable);
                let e = e.to_string();
                assert!(e.contains("--accel kvm: KVM is not usable"), "{e}");
                assert!(e.contains("or use --accel tcg"), "{e}");
            }
        }
        let mut tdx = s(Some(AccelMode::Tcg));
        tdx.tee = Some(Tee::Tdx);
        let e = prepare(&tdx).err().unwrap().to_string();
        assert!(
            e.contains("--accel tcg does not work with --tee tdx"),
            "{e}"
        );
    }

    #[test]
    fn allow_client_cert_pins_the_files_and_the_launchers_own_certificate() {
        use attestation::client_auth::ClientIdentity;
        assert!(client_auth(None).unwrap().0.is_none());
        assert!(client_auth(Some(&[])).unwrap().1.is_none());
        let d = tempfile::tempdir().unwrap();
        let (cert, _key) = ClientIdentity::generate_pem("gateway").unwrap();
        let f = d.path().join("gateway.crt");
        std::fs::write(&f, &cert).unwrap();
        let (auth, own) = client_auth(Some(std::slice::from_ref(&f))).unwrap();
        let (auth, own) = (auth.unwrap(), own.unwrap());
        let pin = hex::encode(
            attestation::client_auth::cert_sha256_from_pem("t", cert.as_bytes()).unwrap(),
        );
        let own_pin = hex::encode(own.cert_sha256());
        let mut want = vec![pin, own_pin];
        want.sort();
        assert_eq!(auth.cert_sha256, want);
        // The host config with it measures the client_auth event with both pins.
        let cfg = worker_api::HostConfig {
            client_auth: Some(auth),
            ..worker_api::HostConfig::default()
        };
        let inp =
            measurements::rtmr3::RuntimeInputs::from_host_config(&cfg.to_canonical_json()).unwrap();
        assert_eq!(inp.client_cert_sha256.map(|p| p.len()), Some(2));
        // Not a certificate: an error naming the flag and the file.
        let bad = d.path().join("key.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        let err = client_auth(Some(&[bad])).unwrap_err().to_string();
        assert!(err.contains("--allow-client-cert"), "{err}");
        let err = client_auth(Some(&[d.path().join("missing.crt")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.crt"), "{err}");
    }

    #[test]
    fn host_config_fields_are_validated() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("SmolLM2-Tiny.Q4_1.gguf");
        std::fs::write(&file, b"GGUF not really").unwrap();
        let ok = FileSettings {
            model: Some(file.clone()),
            model_sha256: Some("ab".repeat(32)),
            ..FileSettings::default()
        };
        let m = model_disk(&ok).unwrap().unwrap();
        assert_eq!(
            (m.name.as_str(), m.size, m.sha256.as_str()),
            ("smollm2-tiny.q4_1", 15, "ab".repeat(32).as_str())
        );
        let cfg = host_config(&ok, Some(&m), None).unwrap();
        assert_eq!(cfg.model_sha256.as_deref(), Some("ab".repeat(32).as_str()));
        assert_eq!(cfg.model_size, Some(15));
        // Without a given hash the launcher computes it.
        let hashed = model_disk(&FileSettings {
            model: Some(file.clone()),
            model_name: Some("tiny".into()),
            ..FileSettings::default()
        })
        .unwrap()
        .unwrap();
        assert_eq!(hashed.name, "tiny");
        assert_eq!(
            hashed.sha256,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"GGUF not really"))
        );
        for bad in [
            FileSettings {
                model: Some(d.path().join("absent.gguf")),
                ..FileSettings::default()
            },
            FileSettings {
                model: Some(file.clone()),
                model_sha256: Some("AB".repeat(32)),
                ..FileSettings::default()
            },
            FileSettings {
                model_sha256: Some("ab".repeat(32)),
                ..FileSettings::default()
            },
        ] {
            assert!(model_disk(&bad).is_err(), "{bad:?}");
        }
        assert!(check_memory_for_model(2048, 98_362_432).is_ok());
        let e = check_memory_for_model(1024, 600 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--memory 1712M") && e.contains("--model-disk"),
            "{e}"
        );
        let bad = FileSettings {
            payout_wallet: Some("nope".into()),
            ..FileSettings::default()
        };
        assert!(
            host_config(&bad, None, None)
                .unwrap_err()
                .to_string()
                .contains("payout_wallet")
        );
    }

    /// Packs `gguf` as `cargo xtask model pack` does (model.img + model.json) into `dir`.
    pub(crate) fn pack(
        dir: &Path,
        gguf: &[u8],
        name: &str,
        revision: &str,
    ) -> measurements::model_disk::ModelJson {
        use measurements::model_disk::{Layout, ModelJson, SALT, TreeBuilder};
        use sha2::Digest as _;
        std::fs::create_dir_all(dir).unwrap();
        let layout = Layout::new(gguf.len() as u64).unwrap();
        let mut tb = TreeBuilder::new(layout.clone(), &SALT, Vec::new());
        tb.update(gguf).unwrap();
        let (root, tree) = tb.finish().unwrap();
        let mut img = gguf.to_vec();
        img.resize(layout.hash_offset() as usize, 0);
        img.extend_from_slice(&tree);
        std::fs::write(dir.join("model.img"), &img).unwrap();
        let sha: [u8; 32] = sha2::Sha256::digest(gguf).into();
        let j = ModelJson::new(name, revision, &layout, &sha, &root);
        std::fs::write(dir.join("model.json"), j.to_canonical_json()).unwrap();
        j
    }

    #[test]
    fn a_packed_model_disk_goes_into_the_measured_host_config() {
        let d = tempfile::tempdir().unwrap();
        image::tests::write_fake_image(d.path());
        let gguf = inference::synthetic::synthetic_gguf(
            &inference::LlamaConfig::tiny(),
            inference::GgmlType::Q8_0,
            3,
        )
        .unwrap();
        let packed = d.path().join("packed");
        let j = pack(&packed, &gguf, "tiny", "r1");
        let run = d.path().join("run");
        let argv = |extra: &[&str]| {
            let mut a = vec![
                "host-launcher",
                "run",
                "--image",
                d.path().to_str().unwrap(),
                "--tee",
                "none",
                "--accel",
                "tcg",
                "--run-dir",
                run.to_str().unwrap(),
                "--dry-run",
            ];
            a.extend_from_slice(extra);
            let Cmd::Run(a) = Cli::try_parse_from(a).unwrap().command else {
                panic!("expected run")
            };
            a
        };
        // The directory or its model.json.
        for arg in [packed.clone(), packed.join("model.json")] {
            cmd_run(&argv(&["--model-disk", arg.to_str().unwrap()])).unwrap();
            let cfg: worker_api::HostConfig =
                serde_json::from_slice(&std::fs::read(run.join("host-config.json")).unwrap())
                    .unwrap();
            assert_eq!(cfg.model.as_deref(), Some("tiny"));
            assert_eq!((cfg.model_sha256, cfg.model_size), (None, None));
            let v = cfg.model_verity.unwrap();
            assert_eq!(v.root_hash, j.verity.root_hash);
            assert_eq!(
                (v.revision.as_str(), v.file_size),
                ("r1", gguf.len() as u64)
            );
            assert_eq!(
                (v.hash_offset, v.disk_size),
                (j.verity.hash_offset, j.disk_size)
            );
            // The RTMR3 model event of this config is the model hash model.json names.
            let inp = measurements::rtmr3::RuntimeInputs::from_host_config(
                &std::fs::read(run.join("host-config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(
                inp.model_sha256.map(hex::encode),
                Some(j.model_hash.clone())
            );
        }
        let a = qemu::argv(
            &prepare(&settings::overlay(
                FileSettings::default(),
                argv(&["--model-disk", packed.to_str().unwrap()]).overrides(),
            ))
            .unwrap()
            .plan,
        )
        .join(" ");
        assert!(
            a.contains(&format!(
                "file={},if=none,id=model,format=raw,readonly=on",
                packed.join("model.img").display()
            )),
            "{a}"
        );
        // Raw-model keys do not mix with a packed disk.
        let e = cmd_run(&argv(&[
            "--model-disk",
            packed.to_str().unwrap(),
            "--model-name",
            "x",
        ]))
        .unwrap_err();
        assert!(
            e.to_string().contains("do not apply to --model-disk"),
            "{e}"
        );
        assert!(
            Cli::try_parse_from(["host-launcher", "run", "--model-disk", "a", "--model", "b"])
                .is_err()
        );
        // A truncated model.img is refused before boot.
        let img = std::fs::read(packed.join("model.img")).unwrap();
        std::fs::write(packed.join("model.img"), &img[..img.len() - 4096]).unwrap();
        let e = format!(
            "{:#}",
            cmd_run(&argv(&["--model-disk", packed.to_str().unwrap()])).unwrap_err()
        );
        assert!(e.contains("truncated or not this model's disk"), "{e}");
        // A model.json that is not one is refused with the fix.
        std::fs::write(packed.join("model.json"), b"{}").unwrap();
        let e = format!(
            "{:#}",
            cmd_run(&argv(&["--model-disk", packed.to_str().unwrap()])).unwrap_err()
        );
        assert!(e.contains("cargo xtask model pack"), "{e}");
    }

    #[test]
    fn verity_models_need_one_copy_of_the_weights_and_nothing_on_a_gpu() {
        let d = tempfile::tempdir().unwrap();
        let cfg = inference::LlamaConfig {
            dim: 512,
            ffn_dim: 1536,
            n_heads: 8,
            n_kv_heads: 4,
            head_dim: 64,
            vocab: 4096,
            n_layers: 8,
            ..inference::LlamaConfig::tiny()
        };
        let gguf =
            inference::synthetic::synthetic_gguf_fast(&cfg, inference::GgmlType::Q8_0, 1).unwrap();
        pack(d.path(), &gguf, "m", "r");
        let disk = d.path().join("model.img");
        let (need, why) = verity_memory_need(&disk, gguf.len() as u64, false).unwrap();
        let weights_mib = gguf.len() as u64 >> 20;
        // One copy of the (repacked, same-size) weights + KV cache + headroom, not two copies.
        assert!(
            need >= weights_mib + MODEL_MEMORY_HEADROOM_MIB,
            "{need} {why}"
        );
        assert!(
            need < 2 * weights_mib + MODEL_MEMORY_HEADROOM_MIB + 16 * 2 + 20,
            "{need} {why}"
        );
        assert!(
            why.contains("repacked weights") && why.contains("KV cache"),
            "{why}"
        );
        let (gpu_need, why) = verity_memory_need(&disk, gguf.len() as u64, true).unwrap();
        assert_eq!(gpu_need, MODEL_MEMORY_HEADROOM_MIB, "{why}");
        let e = check_memory_for_verity_model(&disk, gguf.len() as u64, 256, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("--memory {need}M")), "{e}");
        check_memory_for_verity_model(&disk, gguf.len() as u64, need, false).unwrap();
    }

    #[test]
    fn a_run_directory_serves_one_launcher() {
        let d = tempfile::tempdir().unwrap();
        image::tests::write_fake_image(d.path());
        let run = d.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let held = std::fs::File::create(run.join("launcher.lock")).unwrap();
        held.lock().unwrap();
        let args = Cli::try_parse_from([
            "host-launcher",
            "run",
            "--image",
            d.path().to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--dry-run",
        ])
        .unwrap();
        let Cmd::Run(a) = args.command else {
            panic!("expected run")
        };
        let e = cmd_run(&a).unwrap_err().to_string();
        assert!(
            e.contains("another host-launcher is using run directory"),
            "{e}"
        );
        drop(held);
        cmd_run(&a).unwrap();
    }

    #[test]
    fn dry_run_writes_the_canonical_host_config() {
        let d = tempfile::tempdir().unwrap();
        image::tests::write_fake_image(d.path());
        let run = d.path().join("run");
        let model = d.path().join("m.gguf");
        std::fs::write(&model, vec![1u8; 1000]).unwrap();
        let args = Cli::try_parse_from([
            "host-launcher",
            "run",
            "--image",
            d.path().to_str().unwrap(),
            "--tee",
            "tdx",
            "--model",
            model.to_str().unwrap(),
            "--model-sha256",
            &"cd".repeat(32),
            "--run-dir",
            run.to_str().unwrap(),
            "--dry-run",
        ])
        .unwrap();
        let Cmd::Run(a) = args.command else {
            panic!("expected run")
        };
        cmd_run(&a).unwrap();
        let want = worker_api::HostConfig {
            model: Some("m".into()),
            model_sha256: Some("cd".repeat(32)),
            model_size: Some(1000),
            ..Default::default()
        }
        .to_canonical_json();
        assert_eq!(std::fs::read(run.join("host-config.json")).unwrap(), want);
    }

    fn dry_run_argv(dir: &Path, extra: &[&str]) -> Result<Vec<String>> {
        let run = dir.join("run-shape");
        let mut argv = vec![
            "host-launcher",
            "run",
            "--image",
            dir.to_str().unwrap(),
            "--tee",
            "tdx",
            "--run-dir",
            run.to_str().unwrap(),
            "--dry-run",
        ];
        argv.extend(extra);
        let Cmd::Run(a) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("expected run")
        };
        let s = settings::overlay(FileSettings::default(), a.overrides());
        let launch = prepare(&s)?;
        Ok(qemu::argv(&launch.plan))
    }

    #[test]
    fn a_tdx_gpu_launch_is_preflighted_against_its_shape() {
        let d = tempfile::tempdir().unwrap();
        image::tests::write_fake_image(d.path());
        let run = d.path().join("run-pf");
        let argv = [
            "host-launcher",
            "run",
            "--image",
            d.path().to_str().unwrap(),
            "--tee",
            "tdx",
            "--run-dir",
            run.to_str().unwrap(),
            "--shape",
            "h100x1",
            "--gpu",
            "41:00.0",
        ];
        let Cmd::Run(a) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("expected run")
        };
        let s = settings::overlay(FileSettings::default(), a.overrides());
        let launch = prepare(&s).unwrap();
        let f = gpu::tests::Fake::new();
        f.gpu("0000:41:00.0", Some("nvidia"), "42");
        let e = launch
            .gpu_preflight(&f.root())
            .unwrap()
            .into_result()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sudo host-launcher gpu bind 0000:41:00.0"),
            "{e}"
        );
        let f = gpu::tests::Fake::new();
        f.gpu("0000:41:00.0", Some("vfio-pci"), "42");
        let pf = launch
            .gpu_preflight(&f.root())
            .unwrap()
            .into_result()
            .unwrap();
        // The shape's 1024 GiB hole holds the H100's BARs.
        assert!(
            pf.notes
                .iter()
                .any(|n| n.contains("of the 1024 GiB 64-bit hole")),
            "{:?}",
            pf.notes
        );
        // Too little host memory for the shape's 128 GiB.
        f.meminfo(64 << 10);
        let e = launch.gpu_preflight(&f.root()).unwrap().problems;
        assert!(e[0].what.contains("needs 131072 MiB"), "{e:?}");
    }

    #[test]
    fn tdx_launches_follow_the_declared_shapes() {
        let d = tempfile::tempdir().unwrap();
        image::tests::write_fake_image(d.path());
        // The manifest's defaults are the cpu-1c-2g shape.
        let a = dry_run_argv(d.path(), &[]).unwrap().join(" ");
        assert!(
            a.contains("-machine pc-q35-10.1,kernel-irqchip=split,smm=off,pic=off,hpet=off,"),
            "{a}"
        );
        assert!(a.contains("size=2048M") && a.contains("-smp 1"), "{a}");
        // A named GPU shape brings its memory, vCPUs, PCI hole and one root port per GPU.
        let a = dry_run_argv(d.path(), &["--shape", "h100x1", "--gpu", "0000:3b:00.0"])
            .unwrap()
            .join(" ");
        assert!(a.contains("size=131072M") && a.contains("-smp 16"), "{a}");
        assert!(
            a.contains("-global q35-pcihost.pci-hole64-size=1024G"),
            "{a}"
        );
        assert!(
            a.contains("pcie-root-port,id=rp0,bus=pcie.0,addr=0x10.0,chassis=1"),
            "{a}"
        );
        // Outside the shapes: refused with the fix, unless explicitly allowed.
        let e = dry_run_argv(d.path(), &["--memory", "3G"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no declared TDX launch shape has 3072 MiB"),
            "{e}"
        );
        assert!(
            e.contains("--shape NAME") && e.contains("--allow-unlisted-shape"),
            "{e}"
        );
        let a = dry_run_argv(d.path(), &["--memory", "3G", "--allow-unlisted-shape"])
            .unwrap()
            .join(" ");
        assert!(
            a.contains("-machine pc-q35-10.1,") && a.contains("size=3072M"),
            "{a}"
        );
        let e = dry_run_argv(d.path(), &["--shape", "nope"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--shape nope") && e.contains("h100x1"), "{e}");
        let e = dry_run_argv(d.path(), &["--shape", "h100x1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("takes 1 GPU(s) but 0 --gpu given"), "{e}");
    }
}
