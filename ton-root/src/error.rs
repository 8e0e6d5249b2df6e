//! The crate's error type: every variant says what went wrong and what to do next.

use thiserror::Error;

/// Errors of the root-contract client.
#[derive(Debug, Error)]
pub enum Error {
    /// A hash argument is not 32 bytes of hex.
    #[error(
        "invalid hash {input:?}: {reason}; give 64 hex characters (a SHA-256), optionally prefixed with 0x"
    )]
    InvalidHash { input: String, reason: String },

    /// An address could not be parsed.
    #[error("invalid TON address {input:?}: {reason}")]
    InvalidAddress { input: String, reason: String },

    /// The address is for another network than the one selected.
    #[error(
        "address {address} is a {found} address but --network is {expected}; use an address of that network or change --network"
    )]
    WrongNetwork {
        address: String,
        found: &'static str,
        expected: &'static str,
    },

    /// A mnemonic or key file is unusable.
    #[error("wallet key: {0}")]
    Key(String),

    /// A message body could not be parsed.
    #[error("malformed message body: {0}")]
    Body(String),

    /// Building cells or messages failed (should not happen with valid inputs).
    #[error("building the message failed: {0}")]
    Build(String),

    /// The HTTP endpoint could not be reached or answered with a server error, after retries.
    #[error("transport: {0}")]
    Transport(String),

    /// The endpoint answered, but with an API error (`ok: false`).
    #[error("the API answered an error (code {code}): {message}")]
    Api { code: i64, message: String },

    /// The endpoint's reply is not what the API promises.
    #[error("unexpected reply from the API: {0}")]
    BadReply(String),

    /// A get-method failed or returned something the contract would not return.
    #[error("get-method {method} on {address}: {reason}")]
    GetMethod {
        method: String,
        address: String,
        reason: String,
    },

    /// The signing wallet is not the root contract's owner: the change would bounce.
    #[error(
        "wallet {wallet} is not the owner of root {root} (owner is {owner}); use the owner's key"
    )]
    NotOwner {
        wallet: String,
        root: String,
        owner: String,
    },

    /// The wallet cannot pay for the message.
    #[error(
        "wallet {wallet} has {balance} TON, needs at least {needed} TON for this message; top it up"
    )]
    InsufficientBalance {
        wallet: String,
        balance: String,
        needed: String,
    },

    /// The wallet is not deployed / not a wallet.
    #[error(
        "wallet {wallet} is not an active wallet on this network (state: {state}); deploy or fund it first"
    )]
    WalletNotActive { wallet: String, state: String },

    /// The transaction was sent but the change did not show within the wait time.
    #[error(
        "sent, but the change is not visible after {waited_secs} s; check later (publishing again is safe: it sends nothing if the change landed)"
    )]
    NotConfirmed { waited_secs: u64 },

    /// The wallet processed the message but the contract did not change.
    #[error(
        "the wallet's seqno advanced but root {root} did not change: the message was rejected (is the wallet the owner, is the value enough?)"
    )]
    Rejected { root: String },
}
