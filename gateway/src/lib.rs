//! A verifying OpenAI-compatible gateway: any OpenAI SDK talks plain HTTP (or TLS) to the gateway
//! on the client's own machine, and the gateway forwards every request over RA-TLS to a worker it
//! verified itself — TDX (or, for development, simulated) quote, image hash approved by the root
//! contract, RTMR3 log replayed, model hash approved, certificate pinned per connection.
//!
//! Map: [`trust`] (the trust flags shared with `host-launcher verify`/`chat` and the verifier they
//! build), [`chain`] (the root contract's image and model lists with freshness-bounded answers),
//! [`check`] (verifying one worker completely), [`pool`] (workers, verdict cache, routing by
//! model and in-flight requests), [`upstream`] (verified RA-TLS + HTTP/1.1 connections to
//! workers), [`sse`] (checking a worker's event stream), [`server`] (routes, forwarding with
//! failover before the first token, the connection loop), [`metrics`], [`chat`] (one streamed
//! chat completion as a client, used by `host-launcher chat`).

pub mod chain;
pub mod chat;
pub mod check;
pub mod metrics;
pub mod pool;
pub mod server;
pub mod sse;
pub mod trust;
pub mod upstream;

pub use server::{Gateway, Options};

/// Seconds since the Unix epoch, with milliseconds, for log lines.
pub fn log_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One log line on stderr: `[unix.millis] gateway: message`.
#[macro_export]
macro_rules! log {
    ($($t:tt)*) => {
        eprintln!("[{:.3}] gateway: {}", $crate::log_time(), format!($($t)*))
    };
}
