//! Console logging: one line per event, on standard error.
//!
//! Every line looks like `[    1.234567] guest-agent: <message>`: a monotonic timestamp in the
//! kernel's own `dmesg` style first (so agent and kernel lines interleave readably on the serial
//! console), then the `guest-agent:` prefix. The prefix is kept directly in front of the message so
//! that [`worker_api::READY_MARKER`] (`guest-agent: ready`) appears verbatim in the ready line.
//!
//! As PID 1 the agent points its standard streams at `/dev/console` (which the kernel command line
//! makes `ttyS0`) with [`attach_console`]; in `serve` mode they stay whatever the caller gave.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Writes one formatted log line to standard error (the console when running as PID 1).
#[macro_export]
macro_rules! log_line {
    ($($arg:tt)*) => {
        $crate::console::write_line(format_args!($($arg)*))
    };
}

/// Time since boot from `CLOCK_MONOTONIC` (the clock the kernel's console timestamps use).
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes into it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Formats one log line (without writing it), e.g. `[    1.234567] guest-agent: hello\n`.
pub fn format_line(at: Duration, message: std::fmt::Arguments<'_>) -> String {
    format!(
        "[{:5}.{:06}] guest-agent: {}\n",
        at.as_secs(),
        at.subsec_micros(),
        message
    )
}

/// Writes one log line to standard error in a single `write` so lines from different threads do
/// not interleave. Errors are ignored: there is nowhere else to report them.
pub fn write_line(message: std::fmt::Arguments<'_>) {
    let line = format_line(monotonic_now(), message);
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(line.as_bytes());
    let _ = err.flush();
}

/// Points standard input, output and error at `console` (normally `/dev/console`).
///
/// The kernel already does this for `/init` when the initramfs contains a `/dev/console` node;
/// calling it again after mounting devtmpfs makes the agent's logging independent of that.
/// (The node is still required: Rust's runtime aborts at start-up when descriptors 0-2 are closed
/// and `/dev/null` cannot be opened, so the initramfs must carry `/dev/console` and `/dev/null`.)
/// Returns the OS error if the console cannot be opened.
pub fn attach_console(console: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(console)?;
    let fd = file.as_raw_fd();
    for target in 0..=2 {
        if fd == target {
            continue;
        }
        // SAFETY: `fd` is an open descriptor owned by `file` for the duration of this call and
        // 0..=2 are the standard descriptors; dup2 atomically replaces them.
        let rc = unsafe { libc::dup2(fd, target) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if fd <= 2 {
        // The console itself landed on a standard descriptor (they were closed): keep it open.
        let _ = std::os::fd::IntoRawFd::into_raw_fd(file);
    }
    // Otherwise `file` closes its own descriptor on drop; the duplicates stay open.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_kernel_style_timestamp_then_prefix() {
        let line = format_line(
            Duration::new(3, 141_592_653),
            format_args!("loaded {}", "virtio_net"),
        );
        assert_eq!(line, "[    3.141592] guest-agent: loaded virtio_net\n");
    }

    #[test]
    fn ready_marker_appears_verbatim_in_ready_line() {
        let line = format_line(
            Duration::from_secs(7),
            format_args!("ready on {}", "0.0.0.0:8443"),
        );
        assert!(line.contains(worker_api::READY_MARKER), "{line}");
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_now();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_now();
        assert!(b > a, "{a:?} !< {b:?}");
    }
}
