//! The wire contract between the host (`host-launcher`) and the guest (`guest-agent`).
//!
//! Guest and host never link each other's binaries; everything they must agree on lives here:
//! the agent's HTTP endpoints and their JSON bodies, the host-supplied configuration document and
//! the channel it travels through (a QEMU fw_cfg file), and fixed ports.
//!
//! Everything in this crate is plain data: no I/O, no policy.

use serde::{Deserialize, Serialize};

/// TCP port the agent's HTTP(S) server listens on inside the guest.
pub const AGENT_PORT: u16 = 8443;

/// fw_cfg file name through which the host hands the [`HostConfig`] to the guest
/// (`-fw_cfg name=<this>,file=<path>`). The guest reads it from
/// `/sys/firmware/qemu_fw_cfg/by_name/<this>/raw`. Names under `opt/` are reserved for users.
pub const HOST_CONFIG_FW_CFG_NAME: &str = "opt/org.confidential-worker/config";

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
    /// The model the host configured and whether it is served; absent when none was configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelStatus>,
}

/// What became of the configured model (part of [`Health`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// The model's name (the id clients pass as `model` on `/v1/*`).
    pub name: String,
    /// The expected SHA-256 (lowercase hex) it was checked against.
    pub sha256: String,
    /// Whether `/v1/*` serves it.
    pub serving: bool,
    /// Why it is not served (hash mismatch, missing disk, ...); absent when serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

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
    /// "tdx" when a TDX guest device is present, "none" otherwise (later: "simulated").
    pub kind: String,
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
    /// Size in bytes of the model file on the read-only model disk (virtio serial
    /// [`MODEL_DISK_SERIAL`]). When set, `model` is a name and the guest reads exactly this many
    /// bytes from that disk into its private memory, checks them against `model_sha256`, and
    /// serves them; when absent, `model` is an absolute path inside the guest (development).
    #[serde(default)]
    pub model_size: Option<u64>,
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
            r#"{"model":"smollm2-135m","model_sha256":null,"payout_wallet":"EQabc","root_contract":null,"model_size":null}"#
        );
        let back: HostConfig = serde_json::from_slice(&bytes).expect("parse");
        assert_eq!(back, c);
        let err =
            serde_json::from_str::<HostConfig>(r#"{"modle":"x"}"#).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field"), "{err}");
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
