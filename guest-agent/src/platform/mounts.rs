//! The file systems PID 1 mounts: the early set right after start, configfs after the modules.
//!
//! The list is data ([`EARLY_MOUNTS`], [`CONFIGFS_MOUNT`]); [`mount`] performs one entry and is
//! idempotent (a target that is already a mount point is left alone).

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use super::{PlatformError, c_string};

/// One mount to perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountSpec {
    /// Source (the device, or the file system name for pseudo file systems).
    pub source: &'static str,
    /// Absolute mount point.
    pub target: &'static str,
    /// File system type.
    pub fstype: &'static str,
    /// `MS_*` flags.
    pub flags: libc::c_ulong,
    /// File-system-specific options.
    pub data: &'static str,
    /// Whether the agent may create the mount point (false inside sysfs, where the kernel does).
    pub create_target: bool,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Mounted first, in this order (parents before children).
pub const EARLY_MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        create_target: true,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        create_target: true,
    },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
        create_target: true,
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "mode=0620,ptmxmode=0666",
        create_target: true,
    },
    MountSpec {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
        create_target: true,
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
        create_target: true,
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
        create_target: true,
    },
];

/// configfs, mounted once `configfs.ko` is loaded (the kernel then creates `/sys/kernel/config`).
/// The configfs-tsm attestation interface lives below it.
pub const CONFIGFS_MOUNT: MountSpec = MountSpec {
    source: "configfs",
    target: "/sys/kernel/config",
    fstype: "configfs",
    flags: NOSUID_NODEV_NOEXEC,
    data: "",
    create_target: false,
};

/// How a mount request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOutcome {
    /// Newly mounted.
    Mounted,
    /// The target already was a mount point; nothing done.
    AlreadyMounted,
}

/// Whether `path` is a mount point: it is on a different device than its parent (or is `/`).
pub fn is_mount_point(path: &Path) -> std::io::Result<bool> {
    let here = std::fs::metadata(path)?;
    let Some(parent) = path.parent() else {
        return Ok(true);
    };
    let parent = std::fs::metadata(if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    })?;
    Ok(here.dev() != parent.dev())
}

/// Performs one mount (needs `CAP_SYS_ADMIN`, i.e. PID 1 in the guest).
pub fn mount(spec: &MountSpec) -> Result<MountOutcome, PlatformError> {
    let target = Path::new(spec.target);
    let what = || format!("mount {} on {}", spec.fstype, spec.target);
    if !target.exists() {
        if !spec.create_target {
            return Err(PlatformError::Invalid(format!(
                "{}: {} does not exist (is the {} kernel module in /etc/worker-image/modules.list?)",
                what(),
                spec.target,
                spec.fstype
            )));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(target)
            .map_err(|source| PlatformError::Os {
                what: format!("create mount point {}", spec.target),
                source,
            })?;
    }
    match is_mount_point(target) {
        Ok(true) => return Ok(MountOutcome::AlreadyMounted),
        Ok(false) => {}
        Err(source) => {
            return Err(PlatformError::Os {
                what: format!("inspect {}", spec.target),
                source,
            });
        }
    }
    let source = c_string(spec.source)?;
    let target_c = c_string(spec.target)?;
    let fstype = c_string(spec.fstype)?;
    let data = c_string(spec.data)?;
    // SAFETY: all four pointers are valid NUL-terminated strings that outlive the call; mount does
    // not retain them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            spec.flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(PlatformError::last_os(what()));
    }
    Ok(MountOutcome::Mounted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_mounts_list_parents_before_children() {
        for (i, m) in EARLY_MOUNTS.iter().enumerate() {
            assert!(m.target.starts_with('/'), "{m:?}");
            let parent = Path::new(m.target).parent().expect("parent");
            if parent != Path::new("/") {
                let pos = EARLY_MOUNTS
                    .iter()
                    .position(|p| Path::new(p.target) == parent)
                    .unwrap_or_else(|| panic!("parent of {} not mounted", m.target));
                assert!(pos < i, "{} mounted before its parent", m.target);
            }
        }
        let targets: Vec<_> = EARLY_MOUNTS.iter().map(|m| m.target).collect();
        for needed in ["/proc", "/sys", "/dev", "/dev/pts", "/run", "/tmp"] {
            assert!(targets.contains(&needed), "{needed} missing");
        }
    }

    #[test]
    fn configfs_goes_below_sys_and_is_not_created_by_us() {
        assert!(CONFIGFS_MOUNT.target.starts_with("/sys/"));
        assert_eq!(CONFIGFS_MOUNT.fstype, "configfs");
    }

    #[test]
    fn mount_point_detection() {
        // `/` is always a mount point; a fresh directory on the same file system is not.
        assert!(is_mount_point(Path::new("/")).expect("stat /"));
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        assert!(!is_mount_point(&sub).expect("stat"));
        if Path::new("/proc/self").exists() {
            assert!(is_mount_point(Path::new("/proc")).expect("stat /proc"));
        }
    }

    #[test]
    fn missing_sysfs_target_explains_the_module() {
        let spec = MountSpec {
            target: "/nonexistent-for-test/config",
            ..CONFIGFS_MOUNT
        };
        let err = mount(&spec).expect_err("must fail");
        assert!(err.to_string().contains("modules.list"), "{err}");
    }
}
