//! The init duties of PID 1, in order: early mounts, console, kernel modules, configfs, network.
//!
//! Errors that leave the agent unreachable (a failed early mount, no network) are returned and the
//! binary powers off after logging them; a module that fails to load or a missing configfs is only
//! logged, because the agent can still answer `/health` and say what is missing.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::log_line;
use crate::paths::Paths;
use crate::platform::PlatformError;
use crate::platform::modules::{self, LoadOutcome, ModuleReport};
use crate::platform::mounts::{self, CONFIGFS_MOUNT, EARLY_MOUNTS, MountOutcome};
use crate::platform::net::{self, NetReport};

/// How long to wait for the NIC to show up after the modules are loaded.
pub const NIC_WAIT: Duration = Duration::from_secs(5);

/// What the init duties did.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// One entry per module of the module list.
    pub modules: Vec<ModuleReport>,
    /// Whether configfs is mounted (needed for configfs-tsm).
    pub configfs: bool,
    /// The configured network.
    pub net: NetReport,
}

impl InitReport {
    /// Modules that really failed (not counting expected `ENODEV`s).
    pub fn failed_modules(&self) -> Vec<&str> {
        self.modules
            .iter()
            .filter(|m| matches!(m.outcome, LoadOutcome::Failed(_)))
            .map(|m| m.name.as_str())
            .collect()
    }
}

/// Runs all init duties. Must run as PID 1 in the guest; `paths` is normally `Paths::default()`.
pub fn run_init_duties(paths: &Paths) -> Result<InitReport, PlatformError> {
    let start = Instant::now();
    for spec in EARLY_MOUNTS {
        if mounts::mount(spec)? == MountOutcome::AlreadyMounted {
            log_line!("{} already mounted", spec.target);
        }
    }
    if let Err(e) = crate::console::attach_console(Path::new("/dev/console")) {
        log_line!("warning: cannot attach /dev/console ({e}); logging to the inherited stderr");
    }
    log_line!(
        "starting guest-agent {} (kernel {})",
        crate::health::AGENT_VERSION,
        kernel_release()
    );

    let module_reports = load_listed_modules(&paths.modules_list());

    let configfs = match mounts::mount(&CONFIGFS_MOUNT) {
        Ok(_) => true,
        Err(e) => {
            log_line!(
                "warning: configfs not mounted: {e}; attestation via configfs-tsm is unavailable"
            );
            false
        }
    };

    let cmdline_path = paths.resolve("/proc/cmdline");
    let cmdline = std::fs::read_to_string(&cmdline_path).map_err(|source| PlatformError::Os {
        what: format!("read {}", cmdline_path.display()),
        source,
    })?;
    let net_config = net::config_from_cmdline(&cmdline)?;
    let net = net::configure(&paths.sys_class_net(), &net_config, NIC_WAIT)?;
    log_line!(
        "network: {} {}/{} gateway {}",
        net.interface,
        net.config.address,
        net.config.prefix_len,
        net.config
            .gateway
            .map_or_else(|| "none".to_string(), |g| g.to_string())
    );

    let report = InitReport {
        modules: module_reports,
        configfs,
        net,
    };
    let failed = report.failed_modules();
    log_line!(
        "init duties done in {} ms ({} modules, {} failed{})",
        start.elapsed().as_millis(),
        report.modules.len(),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(": {}", failed.join(", "))
        }
    );
    Ok(report)
}

/// Loads the modules named in the module list, logging each; a missing list is a warning.
fn load_listed_modules(list_path: &Path) -> Vec<ModuleReport> {
    let list = match modules::read_modules_list(list_path) {
        Ok(Some(list)) => list,
        Ok(None) => {
            log_line!(
                "warning: no module list at {}; continuing with built-in drivers only",
                list_path.display()
            );
            return Vec::new();
        }
        Err(e) => {
            log_line!("error: {e}; continuing with built-in drivers only");
            return Vec::new();
        }
    };
    for problem in &list.problems {
        log_line!("warning: {problem}");
    }
    modules::load_all(&list.modules, modules::finit_module, |r| {
        log_line!("{}", r.describe())
    })
}

/// The running kernel's release (`uname -r`), or "unknown".
pub fn kernel_release() -> String {
    // SAFETY: utsname is a plain struct of byte arrays; all-zero is valid.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid writable utsname; uname only writes into it.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "unknown".into();
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::net::NetConfig;

    #[test]
    fn kernel_release_is_read() {
        let r = kernel_release();
        assert!(!r.is_empty() && r != "unknown", "{r}");
        assert!(r.chars().next().is_some_and(|c| c.is_ascii_digit()), "{r}");
    }

    #[test]
    fn failed_modules_excludes_expected_enodev() {
        let report = |name: &str, outcome| ModuleReport {
            name: name.into(),
            path: format!("/m/{name}.ko.xz").into(),
            outcome,
            elapsed: Duration::ZERO,
        };
        let r = InitReport {
            modules: vec![
                report("virtio_net", LoadOutcome::Loaded),
                report("tdx_guest", LoadOutcome::NoDeviceExpected),
                report("erofs", LoadOutcome::Failed(libc::ENOEXEC)),
            ],
            configfs: true,
            net: NetReport {
                interface: "eth0".into(),
                config: NetConfig::default(),
            },
        };
        assert_eq!(r.failed_modules(), vec!["erofs"]);
    }
}
