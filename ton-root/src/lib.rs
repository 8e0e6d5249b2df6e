//! Client for the root contract on TON.
//!
//! The team publishes approved image hashes (and model and proxy hashes) to a root smart contract;
//! workers, proxies, clients and auditors trust only what it lists. This crate is everything the
//! Rust side needs to talk to that contract, shared by `host-launcher` (publish, check) and the
//! guest (allow-list checks):
//!
//! - [`hash`]: 256-bit hashes as the contract stores them, and which list they belong to.
//! - [`ops`]: the message bodies (Cocoon-compatible opcodes), built and parsed byte for byte.
//! - [`wallet`]: the team wallet (v4r2 or v5r1) from a mnemonic or key file, signing transfers.
//! - [`transport`]: the [`transport::Transport`] trait and its toncenter v2 HTTP implementation.
//! - [`publish`]: the idempotent publish/remove flow and the read-only check.
//! - [`allowlist`]: [`RootAllowList`], the contract as attestation's `AllowList`, with a
//!   freshness-bounded cache (verifiers and the guest's approval gate).

pub mod allowlist;
pub mod error;
pub mod hash;
pub mod ops;
pub mod publish;
pub mod transport;
pub mod wallet;

pub use allowlist::{Answer, DEFAULT_MAX_AGE, RootAllowList};
pub use error::Error;
pub use hash::{Hash256, HashKind};
pub use ops::{Change, HashUpdate};
pub use publish::{Outcome, PublishOptions, Publisher};
pub use transport::{Toncenter, ToncenterConfig, Transport};
pub use wallet::{Signer, WalletKind};

/// One TON in nanotons.
pub const NANOTONS_PER_TON: u128 = 1_000_000_000;

/// Formats nanotons as TON with up to 9 decimals (`0.05`).
pub fn format_ton(nanotons: u128) -> String {
    let whole = nanotons / NANOTONS_PER_TON;
    let frac = nanotons % NANOTONS_PER_TON;
    if frac == 0 {
        return whole.to_string();
    }
    let s = format!("{frac:09}");
    format!("{whole}.{}", s.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::format_ton;

    #[test]
    fn formats_ton_amounts() {
        assert_eq!(format_ton(0), "0");
        assert_eq!(format_ton(50_000_000), "0.05");
        assert_eq!(format_ton(1_000_000_000), "1");
        assert_eq!(format_ton(1_234_000_001), "1.234000001");
    }
}
