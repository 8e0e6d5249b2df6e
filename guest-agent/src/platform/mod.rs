//! Linux platform duties of PID 1, kept apart from the server: mounts, kernel modules, network,
//! child reaping and power. Each module separates the pure decisions (what to mount, which
//! interface, how a module load ended) from the system calls, so the decisions are unit-tested.

pub mod modules;
pub mod mounts;
pub mod net;
pub mod power;
pub mod reaper;

use std::ffi::CString;

/// A failed platform operation, saying what was attempted on what.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was attempted, e.g. "mount proc on /proc".
        what: String,
        /// The OS error (errno).
        #[source]
        source: std::io::Error,
    },
    /// An input was unusable (a path with a NUL byte, a bad interface name, ...).
    #[error("{0}")]
    Invalid(String),
}

impl PlatformError {
    /// Wraps the current `errno` with a description of the attempted operation.
    pub fn last_os(what: impl Into<String>) -> Self {
        PlatformError::Os {
            what: what.into(),
            source: std::io::Error::last_os_error(),
        }
    }
}

/// A C string for a system call argument; rejects interior NUL bytes.
pub(crate) fn c_string(s: &str) -> Result<CString, PlatformError> {
    CString::new(s).map_err(|_| PlatformError::Invalid(format!("{s:?} contains a NUL byte")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_string_rejects_nul() {
        assert!(c_string("/proc").is_ok());
        assert!(matches!(c_string("a\0b"), Err(PlatformError::Invalid(_))));
    }

    #[test]
    fn os_error_display_names_the_operation() {
        let e = PlatformError::Os {
            what: "mount proc on /proc".into(),
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        };
        let text = e.to_string();
        assert!(text.starts_with("mount proc on /proc: "), "{text}");
        assert!(text.contains("not permitted"), "{text}");
    }
}
