//! Progress lines for long steps: `[  12.3s] step: message` on stderr.

use std::time::Instant;

/// A clock started at the beginning of a command.
#[derive(Debug, Clone)]
pub struct Progress {
    start: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress {
            start: Instant::now(),
            quiet,
        }
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Print one progress line.
    pub fn step(&self, step: &str, msg: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("[{:>7.1}s] {step}: {msg}", self.elapsed());
        }
    }
}

/// Human-readable byte count.
pub fn bytes(n: u64) -> String {
    const MB: f64 = 1024.0 * 1024.0;
    if n >= 1024 * 1024 {
        format!("{:.1} MiB", n as f64 / MB)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}
