//! Remote attestation for the confidential worker: TDX quote verification (dcap-qvl, fully offline
//! against collateral), a policy layer with a structured [`Verdict`], Cocoon-compatible RA-TLS
//! certificates and their rustls integration (TLS 1.3, mutual), a clearly marked simulated TEE for
//! machines without TDX, the guest-side TDX interfaces (configfs-tsm quotes, RTMR3 extension, CCEL),
//! and the `verify-quote` CLI.
//!
//! Map: [`quote`] (layout parsing, cocoon-v1 image hash), [`collateral`] (sources), [`policy`],
//! [`allowlist`], [`gpu`] (NVIDIA GPU evidence), [`verify`] (the [`Verifier`]), [`verdict`], [`simulated`], [`ratls`]
//! (certificates), [`tls`] (rustls), [`client_auth`] (pinned client certificates), [`https`] (blocking RA-TLS HTTPS client), [`runtime`] (RTMR3
//! event-log replay and host-config check), [`guest`] (inside the TD), [`cli`].

pub mod allowlist;
pub mod cli;
pub mod client_auth;
pub mod collateral;
pub mod gpu;
pub mod guest;
pub mod https;
pub mod policy;
pub mod quote;
pub mod ratls;
pub mod runtime;
pub mod simulated;
pub mod tls;
pub mod verdict;
pub mod verify;

pub use allowlist::{AllowList, StaticAllowList};
pub use collateral::{CollateralSource, FileCollateral, NoCollateral};
pub use https::{HttpError, HttpResponse, RaTlsHttpClient};
pub use policy::Policy;
pub use quote::{ParsedQuote, TdRegisters, parse_quote};
pub use ratls::{QuoteProvider, RaTlsIdentity};
pub use simulated::SimulatedTee;
pub use verdict::{Reason, ReasonCode, Verdict};
pub use verify::{ImageHashKind, Verifier};
