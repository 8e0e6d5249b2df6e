//! The reproducible image pipeline (`cargo xtask image ...`).
//!
//! `definition` (worker.yaml) → `resolve` + `apt` + `sources` (→ worker.lock, `lock`) →
//! `cache` (verified .debs) → `toolchain` (the pinned rustc) + `buildroot` (the locked compiler
//! root the agent is built in) → `build` (agent, `elf`, `kmod`, `kconfig`, `cpio`) → `manifest` →
//! `package` / `repro` (+ `crosshost`: the same build inside another distribution's root);
//! `audit` (a release against a rebuild of this checkout); `capture` (boots the image once to
//! capture ACPI for RTMR0, then refreshes `measurements.json`).

pub mod apt;
pub mod audit;
pub mod build;
pub mod buildroot;
pub mod cache;
pub mod capture;
pub mod cpio;
pub mod crosshost;
pub mod definition;
pub mod elf;
pub mod kconfig;
pub mod kmod;
pub mod lock;
pub mod manifest;
pub mod package;
pub mod repro;
pub mod resolve;
pub mod sources;
pub mod toolchain;
