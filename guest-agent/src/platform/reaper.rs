//! Reaping of orphaned children.
//!
//! As PID 1 the agent inherits every orphaned process of the guest; each must be waited for or it
//! stays a zombie. The binary calls [`reap_zombies`] on every `SIGCHLD`.
//!
//! Note for later work: `waitpid(-1)` also collects children the agent spawned itself; code that
//! needs a child's exit status must not rely on `tokio::process` while the reaper runs (or the
//! reaper must learn to skip those pids).

/// Waits for every child that has exited, without blocking. Returns `(pid, raw wait status)` of
/// each reaped child.
pub fn reap_zombies() -> Vec<(i32, i32)> {
    let mut reaped = Vec::new();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid writable int; WNOHANG makes the call non-blocking.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            // 0: children exist but none has exited; -1: no children (ECHILD) or EINTR.
            return reaped;
        }
        reaped.push((pid, status));
    }
}

/// A short description of a wait status ("exited with 3", "killed by signal 9").
pub fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status:#x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn exited_child_is_reaped() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .expect("spawn sh");
        let pid = i32::try_from(child.id()).expect("pid");
        // Poll until the child has become a zombie and is collected.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = None;
        while Instant::now() < deadline && got.is_none() {
            got = reap_zombies().into_iter().find(|(p, _)| *p == pid);
            std::thread::sleep(Duration::from_millis(5));
        }
        let (_, status) = got.expect("child reaped");
        assert_eq!(describe_status(status), "exited with 3");
        drop(child);
    }

    #[test]
    fn status_descriptions() {
        assert_eq!(describe_status(0), "exited with 0");
        assert_eq!(describe_status(9), "killed by signal 9");
    }
}
