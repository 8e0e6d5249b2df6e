//! The wire contract between the host (`host-launcher`) and the guest (`guest-agent`).
//!
//! Guest and host never link each other's binaries; everything they must agree on lives here:
//! the agent's HTTP endpoints and their JSON bodies, the host-supplied configuration document and
//! the channel it travels through (a QEMU fw_cfg file), and fixed ports.
//!
//! Everything in this crate is plain data: no I/O, no policy.

use serde::{Deserialize, Serialize};

pub mod shapes;

/// TCP port the agent's HTTP(S) server listens on inside the guest.
pub const AGENT_PORT: u16 = 8443;

/// fw_cfg file name through which the host hands the [`HostConfig`] to the guest
/// (`-fw_cfg name=<this>,file=<path>`). The guest reads it from
/// `/sys/firmware/qemu_fw_cfg/by_name/<this>/raw`. Names under `opt/` are reserved for users.
pub const HOST_CONFIG_FW_CFG_NAME: &str = "opt/org.confidential-worker/config";

/// fw_cfg file through which `host-launcher run --tee none` hands the guest a
/// [`SimulatedTeeConfig`] (JSON): the stand-in for TDX hardware on machines without it.
///
/// **Insecure, test-only.** It is given ONLY with `--tee none`, it is NOT part of the measured
/// [`HostConfig`], and everything the simulated TEE signs proves nothing about hardware: the host
/// chose the key and the registers. Verifiers accept simulated evidence only when explicitly told
/// to (`--allow-simulated`) and only from a simulator public key they trust. A guest with real TDX
/// interfaces ignores this file.
pub const SIMULATED_TEE_FW_CFG_NAME: &str = "opt/org.confidential-worker/simulated-tee";

/// Configuration of the simulated TEE (see [`SIMULATED_TEE_FW_CFG_NAME`]; insecure, test-only).
///
/// The launcher computes the registers for the image it boots (with `measurements`), so that the
/// simulated quotes carry the image's real MRTD/RTMR0-2 and the whole path (image hash,
/// allow-list, verdict) is exercised; RTMR3 is not given: the agent computes it from the events it
/// measures, starting at zero, exactly as a TD would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedTeeConfig {
    /// Ed25519 seed of the simulator's signing key, 64 hex digits (fresh per launch).
    pub seed: String,
    /// MRTD, 96 hex digits.
    pub mrtd: String,
    /// RTMR0, 96 hex digits (zeros when the launcher could not compute it: no captured ACPI).
    pub rtmr0: String,
    /// RTMR1, 96 hex digits.
    pub rtmr1: String,
    /// RTMR2, 96 hex digits.
    pub rtmr2: String,
    /// TD_ATTRIBUTES the simulated quotes report (the value the image hash assumed).
    pub td_attributes: u64,
    /// XFAM the simulated quotes report (the value the image hash assumed).
    pub xfam: u64,
}

/// Path of the attestation document (GET, JSON [`AttestationInfo`]), served over RA-TLS like
/// every route. Verifiers replay its RTMR3 events against the RTMR3 of the quote in the agent's
/// RA-TLS certificate.
pub const ATTESTATION_PATH: &str = "/attestation";

/// One RTMR3 event as the agent extended it, in the JSON form of `measurements::rtmr3::Event`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rtmr3Event {
    /// Event type (`host_config`, `model`, `payout_wallet`, `root_contract`, `agent_ready`).
    pub event_type: String,
    /// Payload bytes, lowercase hex.
    pub payload: String,
    /// SHA-384 digest extended into RTMR3, lowercase hex.
    pub digest: String,
}

/// Answer of [`ATTESTATION_PATH`]: what the agent measured and the evidence it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationInfo {
    /// Evidence source: "tdx" (configfs-tsm quotes), "simulated" (the insecure simulated TEE) or
    /// "none" (no evidence: the RA-TLS certificate carries no quote and every verifier rejects it).
    pub tee: String,
    /// The RTMR3 events, in extend order (replay them from zero to get RTMR3).
    pub rtmr3_events: Vec<Rtmr3Event>,
    /// On real TDX: why extending RTMR3 failed (then the quote's RTMR3 does not match the events
    /// and verifiers reject the agent). Absent when the extension worked or was simulated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtmr3_error: Option<String>,
    /// The registers of the quote in the current certificate, lowercase hex (absent with "none").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registers: Option<AttestedRegisters>,
    /// `cw-v1` image hash of those registers (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_hash_cw_v1: Option<String>,
    /// `cocoon-v1` image hash of those registers (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_hash_cocoon_v1: Option<String>,
    /// The RA-TLS public key currently served (hex), bound by the quote's REPORTDATA.
    pub tls_public_key: String,
    /// Why the agent has no evidence, when `tee` is "none".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence_error: Option<String>,
}

/// TD registers as lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestedRegisters {
    pub mrtd: String,
    pub mrconfigid: String,
    pub mrowner: String,
    pub mrownerconfig: String,
    pub rtmr0: String,
    pub rtmr1: String,
    pub rtmr2: String,
    pub rtmr3: String,
    /// TD_ATTRIBUTES.
    pub td_attributes: u64,
    /// XFAM.
    pub xfam: u64,
}

/// Path of the TD's firmware event log (GET, JSON [`CcelLog`]; 404 [`ErrorBody`] outside a TD,
/// where the firmware installs no CCEL table). It is what RTMR0-2 were extended with:
/// `measurements event-log` replays it and `measurements diff` explains a register mismatch.
pub const CCEL_PATH: &str = "/attestation/ccel";

/// Answer of [`CCEL_PATH`]: the ACPI CCEL table and its TCG2 crypto-agile event log, base64
/// (standard alphabet, padded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CcelLog {
    /// The raw CCEL ACPI table (`/sys/firmware/acpi/tables/CCEL`).
    pub table_base64: String,
    /// The event log (`/sys/firmware/acpi/tables/data/CCEL`).
    pub log_base64: String,
    /// Length of the decoded event log.
    pub log_bytes: u64,
}

/// Path of the health endpoint (GET, JSON [`Health`]).
pub const HEALTH_PATH: &str = "/health";

/// Path of the clean power-off request (POST, empty body, answers [`ShutdownAck`]).
/// The host can always pull the plug; this only makes the stop clean (filesystems synced,
/// children reaped), so it needs no authentication.
pub const SHUTDOWN_PATH: &str = "/shutdown";

/// Serial console marker the agent prints once its server listens; the launcher may watch for it.
pub const READY_MARKER: &str = "guest-agent: ready";

/// Answer of [`HEALTH_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Always "ok" when the agent answers at all.
    pub status: String,
    /// Image name and version, from the image's release file.
    pub image: ImageRelease,
    /// Version of the guest-agent binary.
    pub agent_version: String,
    /// What the agent found of the TDX guest interfaces.
    pub tee: TeeStatus,
    /// Seconds since the agent started (≈ since boot).
    pub uptime_secs: u64,
    /// Whether a host config was supplied and parsed, and its SHA-384 (lowercase hex).
    pub host_config: Option<HostConfigStatus>,
    /// Whether the root contract approves this worker's image and model (inference is served
    /// only when it does). Absent from agents that predate the check.
    #[serde(default)]
    pub approval: Option<ApprovalStatus>,
    /// The model the host configured and whether it is served; absent when none was configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelStatus>,
    /// What the agent found of NVIDIA GPUs (PCI scan, NVML, confidential-computing mode).
    /// Absent from agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuStatus>,
}

/// `summary` of a [`GpuStatus`] when the guest has no NVIDIA device.
pub const NO_GPU_SUMMARY: &str = "no GPU present; serving on CPU";

/// The guest's GPUs (part of [`Health`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuStatus {
    /// Whether an NVIDIA PCI device (vendor 0x10de) is present.
    pub present: bool,
    /// One line saying what the agent does with the GPUs ([`NO_GPU_SUMMARY`] without one).
    pub summary: String,
    /// NVIDIA driver version (from NVML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// Confidential-computing mode of the GPUs: "on", "off", or "unknown" (NVML unavailable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cc_mode: Option<String>,
    /// CC environment: "prod", "sim" or "unavailable".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cc_environment: Option<String>,
    /// Whether the GPUs were set ready to accept work (`nvmlSystemSetConfComputeGpusReadyState`).
    #[serde(default)]
    pub ready: bool,
    /// Whether inference may use the GPUs (false: refused, see `error`).
    #[serde(default)]
    pub serving: bool,
    /// Why the GPUs are not used; absent when they are (or there are none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// PCI addresses of the NVIDIA devices found in the guest.
    #[serde(default)]
    pub pci: Vec<String>,
    /// The GPUs as NVML reports them (empty when NVML is unavailable).
    #[serde(default)]
    pub devices: Vec<GpuDevice>,
    /// Milliseconds the GPU initialisation took (modules, NVML, CC checks).
    #[serde(default)]
    pub init_ms: u64,
}

/// One GPU (part of [`GpuStatus`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    /// NVML's device index.
    pub index: u32,
    /// Name from NVML (e.g. "NVIDIA H100 80GB HBM3").
    pub name: String,
    /// Total device memory in MiB.
    pub memory_mib: u64,
}

/// What became of the configured model (part of [`Health`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// The model's name (the id clients pass as `model` on `/v1/*`).
    pub name: String,
    /// The expected digest (lowercase hex) it was checked against: the file's SHA-256 (raw
    /// model disk), or the model hash (dm-verity model disk, see `root_hash`).
    pub sha256: String,
    /// Whether `/v1/*` serves it.
    pub serving: bool,
    /// Why it is not served (hash mismatch, missing disk, ...); absent when serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The dm-verity root hash the model disk was mapped with (lowercase hex); `sha256` is then
    /// the model hash SHA-256("name@revision:root_hash"). Absent for other sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_hash: Option<String>,
    /// Load progress and throughput; absent from agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<ModelLoad>,
    /// The continuous-batching scheduler's live counters once serving; absent before, and from
    /// agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchStatus>,
}

/// The serving scheduler's occupancy and counters (part of [`ModelStatus`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStatus {
    /// Most sequences the backend decodes together.
    pub slots: u64,
    /// Sequences in the running batch now.
    pub running: u64,
    /// Sequences waiting for a slot now.
    pub waiting: u64,
    /// KV blocks in the budget.
    pub kv_blocks: u64,
    /// KV blocks not held by any sequence now (free, or cached and reclaimable).
    pub free_kv_blocks: u64,
    /// Of those, blocks the prefix cache keeps from ended requests (adoptable by a later
    /// request with the same prefix; evicted least recently used first when space is needed).
    #[serde(default)]
    pub cached_kv_blocks: u64,
    /// Scheduler steps run since start.
    pub steps: u64,
    /// Decode tokens computed since start.
    pub decoded_tokens: u64,
    /// Prompt tokens computed since start.
    #[serde(default)]
    pub prefilled_tokens: u64,
    /// Prompt tokens not computed since start because another sequence's KV blocks already
    /// held the same prefix (`n` choices, a shared system prompt; paged backends only).
    #[serde(default)]
    pub shared_prompt_tokens: u64,
    /// Of those, prompt tokens taken from the prefix cache (blocks of ended requests: a
    /// multi-turn chat, a system prompt seen before).
    #[serde(default)]
    pub cached_prompt_tokens: u64,
    /// Sequences ended since start (finished, cancelled or failed).
    pub ended: u64,
    /// Of those, sequences whose client went away.
    pub cancelled: u64,
}

/// The agent's own approval check against the root contract (see [`Health::approval`]).
///
/// The agent reads the root through the host-supplied `ton_rpc`, so a malicious host can lie to
/// it: this is an operator aid, not a guarantee. Clients verify RA-TLS and the chain themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalStatus {
    /// One of the `APPROVAL_*` constants.
    pub state: String,
    /// The root contract checked (from the host config).
    #[serde(default)]
    pub root: Option<String>,
    /// The agent's own cw-v1 image hash (lowercase hex), when it could determine it.
    #[serde(default)]
    pub image_hash: Option<String>,
    /// SHA-256 of the served model file (lowercase hex), when a model is configured.
    #[serde(default)]
    pub model_hash: Option<String>,
    /// When the chain's answers in use were obtained (Unix seconds); absent before any answer.
    #[serde(default)]
    pub checked_at: Option<u64>,
    /// What is not approved (or why it cannot be checked) and how the operator fixes it.
    #[serde(default)]
    pub reason: Option<String>,
}

/// [`ApprovalStatus::state`]: image and model are approved; inference is served.
pub const APPROVAL_APPROVED: &str = "approved";
/// [`ApprovalStatus::state`]: the root does not list the image or model hash (or the agent cannot
/// name its own image hash); inference answers 503.
pub const APPROVAL_NOT_APPROVED: &str = "not_approved";
/// [`ApprovalStatus::state`]: the chain could not be asked; inference answers 503.
pub const APPROVAL_UNAVAILABLE: &str = "unavailable";
/// [`ApprovalStatus::state`]: the first check has not finished yet; inference answers 503.
pub const APPROVAL_CHECKING: &str = "checking";
/// [`ApprovalStatus::state`]: no root contract in the host config; nothing is checked.
pub const APPROVAL_NOT_CONFIGURED: &str = "not_configured";

/// Contents of the image's release file (`/etc/worker-image/release.json` inside the image),
/// written by the image pipeline from `image/worker.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRelease {
    pub name: String,
    pub version: String,
}

/// Path of the release file inside the image.
pub const IMAGE_RELEASE_PATH: &str = "/etc/worker-image/release.json";

/// TDX interfaces visible to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeeStatus {
    /// `/dev/tdx_guest` exists.
    pub tdx_guest_device: bool,
    /// configfs-tsm report interface (`/sys/kernel/config/tsm/report`) exists.
    pub configfs_tsm: bool,
    /// The RTMR3 measurement-register file
    /// (`/sys/class/misc/tdx_guest/measurements/rtmr3:sha384`, Linux >= 6.16 in a TDX guest)
    /// exists, so the agent can extend RTMR3. Absent in answers of older agents (= false).
    #[serde(default)]
    pub rtmr3_sysfs: bool,
    /// Evidence the agent serves: "tdx" (TDX guest interfaces), "simulated" (the insecure
    /// simulated TEE, `--tee none`), "none" (no evidence).
    pub kind: String,
    /// Why extending RTMR3 with the runtime events failed on real TDX (verifiers will reject the
    /// agent on replay); absent when it worked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtmr3_error: Option<String>,
}

/// Summary of the host config the agent received.
///
/// Present whenever the host supplied a config file at all, valid or not: `sha384` is the hash of
/// the exact bytes received (what attestation measures), `error` says why the agent is not using
/// them (malformed JSON, unknown field, unreadable file). `error` absent means the config parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostConfigStatus {
    /// SHA-384 of the received bytes, lowercase hex; empty when the file could not be read at all.
    pub sha384: String,
    /// Why the config is not in use; absent (not serialised) when it parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// JSON body of every error answer of the agent (unknown path, wrong method, failed request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable reason, saying what to do next where possible.
    pub error: String,
}

/// Answer of [`SHUTDOWN_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownAck {
    pub powering_off: bool,
}

/// Path of the ACPI capture endpoint (GET, JSON [`FirmwareAcpi`]; 404 [`ErrorBody`] when the
/// guest has no QEMU fw_cfg interface). Read-only: it returns QEMU's ACPI fw_cfg blobs exactly as
/// the guest sees them, which are public (the host built them). `host-launcher capture-acpi`
/// uses it to produce the `acpi/` folder that RTMR0 is computed from.
pub const FIRMWARE_ACPI_PATH: &str = "/firmware/acpi";

/// fw_cfg file holding QEMU's ACPI tables blob (measured into RTMR0 as "ACPI DATA").
pub const FW_CFG_ACPI_TABLES: &str = "etc/acpi/tables";
/// fw_cfg file holding QEMU's RSDP blob (before the firmware patches it).
pub const FW_CFG_ACPI_RSDP: &str = "etc/acpi/rsdp";
/// fw_cfg file holding QEMU's table-loader commands.
pub const FW_CFG_TABLE_LOADER: &str = "etc/table-loader";

/// Answer of [`FIRMWARE_ACPI_PATH`]: the three fw_cfg blobs, each base64-encoded (standard
/// alphabet, with padding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareAcpi {
    /// `etc/acpi/tables`.
    pub tables: FwCfgBlob,
    /// `etc/acpi/rsdp`.
    pub rsdp: FwCfgBlob,
    /// `etc/table-loader`.
    pub table_loader: FwCfgBlob,
}

/// One fw_cfg file as read by the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgBlob {
    /// The fw_cfg file name (e.g. `etc/acpi/tables`).
    pub name: String,
    /// Length of the decoded bytes.
    pub size: u64,
    /// The bytes, base64 (standard alphabet, padded).
    pub base64: String,
}

/// virtio serial of the read-only disk that carries the model file (`-device
/// virtio-blk-pci,serial=<this>`); the guest finds it as `/sys/block/vd*/serial`. At most 20
/// bytes (the virtio-blk serial limit).
pub const MODEL_DISK_SERIAL: &str = "cw-model";

/// virtio serial of a second, raw copy of the model disk that only `cargo xtask bench
/// model-disk` attaches: the agent then times a raw read of it against a read through the
/// dm-verity mapping and logs both (never used to load anything).
pub const BENCH_RAW_DISK_SERIAL: &str = "cw-bench-raw";

/// Configuration chosen by the host (GPU owner) and handed to the guest at boot.
///
/// The exact bytes the guest receives are hashed and (with the attestation work) measured into
/// RTMR3, so every field here is covered by attestation. Unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Model identifier or file name the agent should serve (None: no inference).
    #[serde(default)]
    pub model: Option<String>,
    /// Expected SHA-256 of the model file (lowercase hex), checked before use.
    #[serde(default)]
    pub model_sha256: Option<String>,
    /// TON address that receives payouts.
    #[serde(default)]
    pub payout_wallet: Option<String>,
    /// Address of the root contract whose allow-list this worker follows.
    #[serde(default)]
    pub root_contract: Option<String>,
    /// toncenter v2 endpoint (up to `/api/v2`) through which the guest reads `root_contract` to
    /// check that its own image and model hashes are approved. Plain http with an IP address
    /// (the guest has no DNS and no TLS client); QEMU user networking shows the host as 10.0.2.2.
    #[serde(default)]
    pub ton_rpc: Option<String>,
    /// Size in bytes of the model file on the read-only model disk (virtio serial
    /// [`MODEL_DISK_SERIAL`]). When set, `model` is a name and the guest reads exactly this many
    /// bytes from that disk into its private memory, checks them against `model_sha256`, and
    /// serves them; when absent, `model` is an absolute path inside the guest (development).
    #[serde(default)]
    pub model_size: Option<u64>,
    /// The dm-verity model disk (`cargo xtask model pack`'s `model.json`): everything the guest
    /// needs to map the disk with virtio serial [`MODEL_DISK_SERIAL`] through dm-verity. When
    /// set, `model` is the model's name, `model_sha256` and `model_size` are absent, and the
    /// RTMR3 `model` event carries the model hash SHA-256("name@revision:root_hash") (see
    /// `measurements::rtmr3`), which is what the root contract lists. Absent from the JSON when
    /// not set (configs without it keep their bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_verity: Option<Box<ModelVerity>>,
    /// DEVELOPMENT ONLY: serve on GPUs that are not in confidential-computing mode (the agent
    /// refuses to otherwise). Measured like every field (RTMR3), so a verifier sees it; absent
    /// from the JSON when not set (configs without it keep their bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_allow_gpu_without_cc: Option<bool>,
    /// Mutual RA-TLS: when set, the agent's listener requires every TLS client to present one
    /// of these certificates (handshake failure otherwise). Measured twice: in the `host_config`
    /// event with the rest of the config, and as its own RTMR3 `client_auth` event (the sorted
    /// pins), so a verifier sees from the log alone that, and whom, the worker admits. Absent
    /// from the JSON when not set (configs without it keep their bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
}

/// Which TLS clients the agent admits (see [`HostConfig::client_auth`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// SHA-256 of each allowed client certificate's DER encoding, 64 lowercase hex digits,
    /// sorted, no duplicates, at least one (`host-launcher run --allow-client-cert FILE`).
    /// The certificate is pinned as a whole: its key, not a CA, is what is trusted, and its
    /// validity dates are not checked (replace the pin to revoke it).
    pub cert_sha256: Vec<String>,
}

/// The dm-verity parameters of a packed model disk, as measured in the host config (the
/// `verity` and `gguf` parts of `model.json`; format in `measurements::model_disk`). The guest
/// checks them against the format (layout for `file_size`, fixed salt, SHA-256, 4 KiB blocks)
/// before it creates the mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelVerity {
    /// The model's revision (with `model` and `root_hash`, the model id `name@revision:root`).
    pub revision: String,
    /// Size of the GGUF at the start of the disk, in bytes.
    pub file_size: u64,
    /// Size of the whole disk (data blocks + hash tree), in bytes.
    pub disk_size: u64,
    /// dm-verity hash format version (1).
    pub format: u32,
    /// Hash algorithm (`sha256`).
    pub hash_algorithm: String,
    /// Data block size in bytes (4096).
    pub data_block_size: u64,
    /// Hash block size in bytes (4096).
    pub hash_block_size: u64,
    /// Number of data blocks (the GGUF rounded up to whole blocks).
    pub data_blocks: u64,
    /// Number of hash blocks after the data.
    pub hash_blocks: u64,
    /// Byte offset of the hash tree on the disk.
    pub hash_offset: u64,
    /// Salt, lowercase hex.
    pub salt: String,
    /// Root hash of the tree, lowercase hex.
    pub root_hash: String,
}

/// Name of the guest's device-mapper device for the model disk (`/dev/mapper/<this>`).
pub const MODEL_VERITY_DM_NAME: &str = "cw-model";

/// [`ModelLoad::state`]: the model is being read (through dm-verity) and loaded.
pub const MODEL_LOADING: &str = "loading";
/// [`ModelLoad::state`]: loaded; `/v1/*` serves it (subject to approval).
pub const MODEL_SERVING: &str = "serving";
/// [`ModelLoad::state`]: refused or failed; [`ModelStatus::error`] says why.
pub const MODEL_FAILED: &str = "failed";

/// Progress of loading the model (part of [`ModelStatus`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelLoad {
    /// One of [`MODEL_LOADING`], [`MODEL_SERVING`], [`MODEL_FAILED`].
    pub state: String,
    /// How the model is read: `dm-verity` (model disk), `copy-sha256` (raw disk copied into
    /// memory and hashed), `file`.
    pub source: String,
    /// Backend the weights go to (`cpu`, `cuda`).
    pub backend: String,
    /// Bytes of the model file.
    pub bytes_total: u64,
    /// Bytes read and verified so far (through dm-verity: every block checked against the
    /// tree before it was returned). Can end slightly above `bytes_total`: the header is read
    /// in a power-of-two prefix that overlaps the first tensors, which are read again.
    pub bytes_verified: u64,
    /// Milliseconds since loading started (until it ended).
    pub elapsed_ms: u64,
    /// `bytes_verified` per second of `elapsed_ms`.
    pub bytes_per_sec: u64,
    /// Highest resident memory of the agent so far (VmHWM), in bytes; 0 when unknown.
    #[serde(default)]
    pub peak_rss_bytes: u64,
    /// Highest memory in use in the whole guest while loading (MemTotal - MemAvailable of
    /// /proc/meminfo, sampled every 200 ms), in bytes; 0 when unknown.
    #[serde(default)]
    pub guest_mem_peak_bytes: u64,
}

impl HostConfig {
    /// Canonical bytes of this config (compact JSON, fields in declaration order).
    /// The launcher sends exactly these bytes; the agent hashes exactly what it received.
    pub fn to_canonical_json(&self) -> Vec<u8> {
        // Serialising a struct of strings and options cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_config_round_trips_and_rejects_unknown_fields() {
        let c = HostConfig {
            model: Some("smollm2-135m".into()),
            payout_wallet: Some("EQabc".into()),
            ..HostConfig::default()
        };
        let bytes = c.to_canonical_json();
        assert_eq!(
            std::str::from_utf8(&bytes).expect("utf8"),
            r#"{"model":"smollm2-135m","model_sha256":null,"payout_wallet":"EQabc","root_contract":null,"ton_rpc":null,"model_size":null}"#
        );
        let back: HostConfig = serde_json::from_slice(&bytes).expect("parse");
        assert_eq!(back, c);
        let err =
            serde_json::from_str::<HostConfig>(r#"{"modle":"x"}"#).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn host_config_with_a_verity_model_disk() {
        let c = HostConfig {
            model: Some("smollm2-135m".into()),
            model_verity: Some(Box::new(ModelVerity {
                revision: "r1".into(),
                file_size: 5000,
                disk_size: 8192,
                format: 1,
                hash_algorithm: "sha256".into(),
                data_block_size: 4096,
                hash_block_size: 4096,
                data_blocks: 2,
                hash_blocks: 0,
                hash_offset: 8192,
                salt: "ab".repeat(32),
                root_hash: "cd".repeat(32),
            })),
            ..HostConfig::default()
        };
        let text = String::from_utf8(c.to_canonical_json()).expect("utf8");
        assert!(
            text.starts_with(r#"{"model":"smollm2-135m","model_sha256":null,"#),
            "{text}"
        );
        assert!(
            text.ends_with(&format!(
                r#""model_size":null,"model_verity":{{"revision":"r1","file_size":5000,"disk_size":8192,"format":1,"hash_algorithm":"sha256","data_block_size":4096,"hash_block_size":4096,"data_blocks":2,"hash_blocks":0,"hash_offset":8192,"salt":"{}","root_hash":"{}"}}}}"#,
                "ab".repeat(32),
                "cd".repeat(32)
            )),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<HostConfig>(&text).expect("parse"), c);
        let extra = text.replace(r#""revision":"r1","#, r#""revision":"r1","x":1,"#);
        assert!(serde_json::from_str::<HostConfig>(&extra).is_err());
    }

    #[test]
    fn host_config_with_client_auth() {
        let c = HostConfig {
            model: Some("m".into()),
            client_auth: Some(ClientAuth {
                cert_sha256: vec!["ab".repeat(32)],
            }),
            ..HostConfig::default()
        };
        let text = String::from_utf8(c.to_canonical_json()).expect("utf8");
        assert!(
            text.ends_with(&format!(
                r#""model_size":null,"client_auth":{{"cert_sha256":["{}"]}}}}"#,
                "ab".repeat(32)
            )),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<HostConfig>(&text).expect("parse"), c);
        let extra = text.replace(r#""cert_sha256""#, r#""ca":"x","cert_sha256""#);
        assert!(serde_json::from_str::<HostConfig>(&extra).is_err());
    }

    #[test]
    fn firmware_acpi_wire_shape() {
        let blob = |name: &str| FwCfgBlob {
            name: name.into(),
            size: 3,
            base64: "AQID".into(),
        };
        let a = FirmwareAcpi {
            tables: blob(FW_CFG_ACPI_TABLES),
            rsdp: blob(FW_CFG_ACPI_RSDP),
            table_loader: blob(FW_CFG_TABLE_LOADER),
        };
        let text = serde_json::to_string(&a).expect("json");
        assert!(
            text.starts_with(r#"{"tables":{"name":"etc/acpi/tables","size":3,"base64":"AQID"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#""table_loader":{"name":"etc/table-loader""#),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<FirmwareAcpi>(&text).expect("parse"),
            a
        );
    }

    #[test]
    fn simulated_tee_config_wire_shape_rejects_unknown_fields() {
        let c = SimulatedTeeConfig {
            seed: "00".repeat(32),
            mrtd: "11".repeat(48),
            rtmr0: "22".repeat(48),
            rtmr1: "33".repeat(48),
            rtmr2: "44".repeat(48),
            td_attributes: 1 << 28,
            xfam: 0x602e7,
        };
        let text = serde_json::to_string(&c).expect("json");
        assert!(text.starts_with(r#"{"seed":"0000"#), "{text}");
        assert_eq!(
            serde_json::from_str::<SimulatedTeeConfig>(&text).expect("parse"),
            c
        );
        let extra = text.replace(r#"{"seed""#, r#"{"rtmr3":"00","seed""#);
        assert!(serde_json::from_str::<SimulatedTeeConfig>(&extra).is_err());
    }

    #[test]
    fn host_config_status_error_is_optional_on_the_wire() {
        let ok: HostConfigStatus = serde_json::from_str(r#"{"sha384":"ab"}"#).expect("parse");
        assert_eq!(ok.error, None);
        assert_eq!(
            serde_json::to_string(&ok).expect("json"),
            r#"{"sha384":"ab"}"#
        );
        let bad = HostConfigStatus {
            sha384: "ab".into(),
            error: Some("unknown field".into()),
        };
        let text = serde_json::to_string(&bad).expect("json");
        assert_eq!(text, r#"{"sha384":"ab","error":"unknown field"}"#);
    }
}
