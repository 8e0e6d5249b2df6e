//! Where the agent looks for things, relative to an injectable root directory.
//!
//! In the guest the root is `/`. Tests and `guest-agent serve --root DIR` point it at a fake tree,
//! so every lookup (release file, module list, fw_cfg, TDX devices, network interfaces) can be
//! exercised without a VM.

use std::path::{Path, PathBuf};

/// Directory (inside the image) holding the image pipeline's files for the agent.
pub const IMAGE_DIR: &str = "/etc/worker-image";

/// File listing the kernel modules to load, one absolute path per line, in dependency order.
pub const MODULES_LIST_PATH: &str = "/etc/worker-image/modules.list";

/// File listing the GPU kernel modules (`kernel.gpu_modules` of image/worker.yaml, with their
/// dependencies), loaded only when an NVIDIA PCI device is present; absent when the image has none.
pub const GPU_MODULES_LIST_PATH: &str = "/etc/worker-image/gpu-modules.list";

/// PCI devices known to the kernel.
pub const SYS_BUS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// The TDX guest device (`tdx-guest.ko`).
pub const TDX_GUEST_DEVICE: &str = "/dev/tdx_guest";

/// The configfs-tsm report directory (`tsm.ko` with configfs mounted).
pub const CONFIGFS_TSM_REPORT: &str = "/sys/kernel/config/tsm/report";

/// RTMR3 of the TSM measurement-register sysfs ABI (Linux >= 6.16, `tdx-guest.ko` in a TD): read
/// 48 bytes for the value, write exactly 48 bytes at offset 0 to extend it.
pub const RTMR3_SYSFS: &str = "/sys/class/misc/tdx_guest/measurements/rtmr3:sha384";

/// Root of the QEMU fw_cfg sysfs interface (`qemu_fw_cfg.ko`).
pub const FW_CFG_BY_NAME: &str = "/sys/firmware/qemu_fw_cfg/by_name";

/// Network interfaces known to the kernel.
pub const SYS_CLASS_NET: &str = "/sys/class/net";

/// Resolves the agent's well-known absolute paths below a root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    root: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Self::new("/")
    }
}

impl Paths {
    /// Paths below `root` (use `/` in the guest).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory everything is resolved against.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `absolute` (which must start with `/`) re-rooted below [`Paths::root`].
    pub fn resolve(&self, absolute: &str) -> PathBuf {
        self.root.join(absolute.trim_start_matches('/'))
    }

    /// The image release file ([`worker_api::IMAGE_RELEASE_PATH`]).
    pub fn release(&self) -> PathBuf {
        self.resolve(worker_api::IMAGE_RELEASE_PATH)
    }

    /// The module list ([`MODULES_LIST_PATH`]).
    pub fn modules_list(&self) -> PathBuf {
        self.resolve(MODULES_LIST_PATH)
    }

    /// The GPU module list ([`GPU_MODULES_LIST_PATH`]).
    pub fn gpu_modules_list(&self) -> PathBuf {
        self.resolve(GPU_MODULES_LIST_PATH)
    }

    /// [`SYS_BUS_PCI_DEVICES`].
    pub fn sys_bus_pci_devices(&self) -> PathBuf {
        self.resolve(SYS_BUS_PCI_DEVICES)
    }

    /// The fw_cfg sysfs root ([`FW_CFG_BY_NAME`]).
    pub fn fw_cfg_by_name(&self) -> PathBuf {
        self.resolve(FW_CFG_BY_NAME)
    }

    /// The raw contents of the host config fw_cfg file
    /// (`.../by_name/<HOST_CONFIG_FW_CFG_NAME>/raw`; the slashes of the name become directories).
    pub fn host_config_raw(&self) -> PathBuf {
        self.fw_cfg_by_name()
            .join(worker_api::HOST_CONFIG_FW_CFG_NAME)
            .join("raw")
    }

    /// The raw contents of the simulated-TEE fw_cfg file
    /// (`.../by_name/<SIMULATED_TEE_FW_CFG_NAME>/raw`; present only with `run --tee none`).
    pub fn simulated_tee_raw(&self) -> PathBuf {
        self.fw_cfg_by_name()
            .join(worker_api::SIMULATED_TEE_FW_CFG_NAME)
            .join("raw")
    }

    /// [`TDX_GUEST_DEVICE`].
    pub fn tdx_guest_device(&self) -> PathBuf {
        self.resolve(TDX_GUEST_DEVICE)
    }

    /// [`CONFIGFS_TSM_REPORT`].
    pub fn configfs_tsm_report(&self) -> PathBuf {
        self.resolve(CONFIGFS_TSM_REPORT)
    }

    /// [`RTMR3_SYSFS`].
    pub fn rtmr3_sysfs(&self) -> PathBuf {
        self.resolve(RTMR3_SYSFS)
    }

    /// [`SYS_CLASS_NET`].
    pub fn sys_class_net(&self) -> PathBuf {
        self.resolve(SYS_CLASS_NET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_are_the_documented_ones() {
        let p = Paths::default();
        assert_eq!(p.release(), Path::new("/etc/worker-image/release.json"));
        assert_eq!(
            p.host_config_raw(),
            Path::new("/sys/firmware/qemu_fw_cfg/by_name/opt/org.confidential-worker/config/raw")
        );
        assert_eq!(p.tdx_guest_device(), Path::new("/dev/tdx_guest"));
        assert_eq!(
            p.rtmr3_sysfs(),
            Path::new("/sys/class/misc/tdx_guest/measurements/rtmr3:sha384")
        );
    }

    #[test]
    fn paths_are_rerooted() {
        let p = Paths::new("/tmp/fake");
        assert_eq!(
            p.modules_list(),
            Path::new("/tmp/fake/etc/worker-image/modules.list")
        );
        assert_eq!(
            p.configfs_tsm_report(),
            Path::new("/tmp/fake/sys/kernel/config/tsm/report")
        );
    }
}
