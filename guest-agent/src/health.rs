//! What `/health` reports, assembled from injected inputs so it can be tested without a VM.
//!
//! The static facts (image release, host config) are gathered once at start-up into
//! [`AgentInfo`]; the TEE interfaces are probed on every request (modules may appear later) with
//! [`probe_tee`]; the uptime comes from a start instant and a caller-supplied "now".

use std::path::Path;
use std::time::Instant;

use worker_api::{Health, HostConfigStatus, ImageRelease, TeeStatus};

use crate::paths::Paths;

/// Version of this agent binary.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Image name reported when no release file exists (a developer running `serve`).
pub const DEV_IMAGE_NAME: &str = "dev";

/// Facts fixed at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// The image release (or the development placeholder).
    pub release: ImageRelease,
    /// The host config summary, `None` when the host gave none.
    pub host_config: Option<HostConfigStatus>,
    /// When the agent started (uptime is measured from here).
    pub started: Instant,
    /// What the GPU start-up found ([`crate::gpu::setup`]); `None` before it ran (tests).
    pub gpu: Option<worker_api::GpuStatus>,
}

/// Outcome of reading the release file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseSource {
    /// Read from the image's release file.
    File(ImageRelease),
    /// No release file: a development run; reports [`DEV_IMAGE_NAME`] and the agent version.
    Missing,
    /// The file exists but is not valid; the reason, for the log.
    Invalid(String),
}

impl ReleaseSource {
    /// The release to report: the file's, or a placeholder saying where it came from.
    pub fn release(&self) -> ImageRelease {
        match self {
            ReleaseSource::File(r) => r.clone(),
            ReleaseSource::Missing => ImageRelease {
                name: DEV_IMAGE_NAME.into(),
                version: AGENT_VERSION.into(),
            },
            ReleaseSource::Invalid(_) => ImageRelease {
                name: "invalid-release-file".into(),
                version: AGENT_VERSION.into(),
            },
        }
    }
}

/// Reads the image release file at `path`.
pub fn read_release(path: &Path) -> ReleaseSource {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<ImageRelease>(&bytes) {
            Ok(r) => ReleaseSource::File(r),
            Err(e) => ReleaseSource::Invalid(format!(
                "{} is not a valid release file ({e}); the image build must write \
                 {{\"name\":..,\"version\":..}}",
                path.display()
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ReleaseSource::Missing,
        Err(e) => ReleaseSource::Invalid(format!("cannot read {}: {e}", path.display())),
    }
}

/// Probes the TDX guest interfaces below `paths`.
pub fn probe_tee(paths: &Paths) -> TeeStatus {
    let mut tee = tee_status(
        paths.tdx_guest_device().exists(),
        paths.configfs_tsm_report().exists(),
    );
    tee.rtmr3_sysfs = paths.rtmr3_sysfs().exists();
    tee
}

/// The TEE status for the given findings.
pub fn tee_status(tdx_guest_device: bool, configfs_tsm: bool) -> TeeStatus {
    TeeStatus {
        tdx_guest_device,
        configfs_tsm,
        rtmr3_sysfs: false,
        kind: if tdx_guest_device { "tdx" } else { "none" }.into(),
        rtmr3_error: None,
    }
}

/// Assembles the `/health` answer.
pub fn assemble(info: &AgentInfo, tee: TeeStatus, now: Instant) -> Health {
    Health {
        status: "ok".into(),
        image: info.release.clone(),
        agent_version: AGENT_VERSION.into(),
        tee,
        uptime_secs: now.saturating_duration_since(info.started).as_secs(),
        host_config: info.host_config.clone(),
        approval: None,
        model: crate::inference_service::model_status(),
        gpu: info.gpu.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn release_file_read_missing_and_invalid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("release.json");
        assert_eq!(read_release(&path), ReleaseSource::Missing);
        assert_eq!(read_release(&path).release().name, "dev");
        assert_eq!(read_release(&path).release().version, AGENT_VERSION);

        std::fs::write(&path, br#"{"name":"worker","version":"0.1.0"}"#).expect("write");
        assert_eq!(
            read_release(&path),
            ReleaseSource::File(ImageRelease {
                name: "worker".into(),
                version: "0.1.0".into()
            })
        );

        std::fs::write(&path, b"{nope").expect("write");
        match read_release(&path) {
            ReleaseSource::Invalid(why) => assert!(why.contains("release.json"), "{why}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn tee_probe_sees_fake_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths::new(dir.path());
        assert_eq!(probe_tee(&paths), tee_status(false, false));
        assert_eq!(probe_tee(&paths).kind, "none");
        std::fs::create_dir_all(dir.path().join("dev")).expect("mkdir");
        std::fs::write(dir.path().join("dev/tdx_guest"), b"").expect("touch");
        std::fs::create_dir_all(dir.path().join("sys/kernel/config/tsm/report")).expect("mkdir");
        let tee = probe_tee(&paths);
        assert!(tee.tdx_guest_device && tee.configfs_tsm && !tee.rtmr3_sysfs);
        assert_eq!(tee.kind, "tdx");
        let mr = dir.path().join("sys/class/misc/tdx_guest/measurements");
        std::fs::create_dir_all(&mr).expect("mkdir");
        std::fs::write(mr.join("rtmr3:sha384"), [0u8; 48]).expect("touch");
        assert!(probe_tee(&paths).rtmr3_sysfs);
    }

    #[test]
    fn health_uses_injected_clock_and_facts() {
        let started = Instant::now();
        let info = AgentInfo {
            release: ReleaseSource::Missing.release(),
            host_config: Some(HostConfigStatus {
                sha384: "ab".into(),
                error: None,
            }),
            started,
            gpu: Some(crate::gpu::no_gpu_status()),
        };
        let h = assemble(
            &info,
            tee_status(false, true),
            started + Duration::from_millis(12_500),
        );
        assert_eq!(h.status, "ok");
        assert_eq!(h.uptime_secs, 12);
        assert_eq!(h.image.name, "dev");
        assert_eq!(h.agent_version, AGENT_VERSION);
        assert!(h.tee.configfs_tsm && !h.tee.tdx_guest_device);
        assert_eq!(h.host_config.expect("config").sha384, "ab");
        let gpu = h.gpu.expect("gpu");
        assert!(!gpu.present);
        assert_eq!(gpu.summary, worker_api::NO_GPU_SUMMARY);
        // A clock that goes backwards never underflows.
        let earlier = assemble(&info, tee_status(false, false), started);
        assert_eq!(earlier.uptime_secs, 0);
    }
}
