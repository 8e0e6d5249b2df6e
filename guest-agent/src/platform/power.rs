//! Power: is this PID 1, and a clean power-off (sync, then `reboot(RB_POWER_OFF)`).
//!
//! PID 1 must never exit (the kernel would panic), so [`power_off`] never returns: if the reboot
//! call itself fails it logs and parks the process forever.

use std::time::Duration;

/// Whether this process is PID 1 (the init of its PID namespace).
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Flushes file systems and powers the machine off. Never returns.
///
/// Needs `CAP_SYS_BOOT`; only call it as PID 1 in the guest.
pub fn power_off() -> ! {
    crate::log_line!("syncing file systems and powering off");
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with a valid command constant; on success it does not return.
    let rc = unsafe { libc::reboot(libc::RB_POWER_OFF) };
    let err = std::io::Error::last_os_error();
    crate::log_line!(
        "error: power-off failed (reboot returned {rc}: {err}); halting here, stop the VM from the host"
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_process_is_not_pid1() {
        // Tests never run as init; this guards the init-only code paths in the binary.
        assert!(!is_pid1());
    }
}
