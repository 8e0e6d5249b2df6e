//! attestation
