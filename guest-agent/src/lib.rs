//! The guest agent: PID 1 of the worker TD.
//!
//! As `/init` of the initramfs it performs the init duties (mount pseudo file systems, load the
//! image's kernel modules, configure the NIC, reap orphans, power off cleanly), reads and hashes
//! the host config ([`measured_config`]), measures it into RTMR3 and sets up its RA-TLS evidence
//! ([`attest`]), then serves the host↔guest HTTP contract of [`worker_api`] ([`server`]) over
//! RA-TLS ([`tls_listener`]). The same server runs without init duties on a developer machine
//! (`guest-agent serve`).
//!
//! The [`approval`] gate serves inference only while the root contract approves the image and
//! model.
//!
//! Layout: [`platform`] holds everything that talks to the kernel; [`health`], [`server`],
//! [`firmware`], [`measured_config`] and [`paths`] are platform-independent and tested in-process.

pub mod approval;
pub mod attest;
pub mod console;
pub mod dm;
pub mod firmware;
pub mod gpu;
pub mod gpu_evidence;
pub mod health;
pub mod inference_service;
pub mod init;
pub mod measured_config;
pub mod model_disk;
pub mod paths;
pub mod platform;
pub mod server;
pub mod tls_listener;
