//! Which model the agent serves, and the OpenAI-compatible router that serves it.
//!
//! The model is named by the host config, measured with the rest of it:
//! - with `model_size`: `model` is a name, and the bytes come from the read-only model disk
//!   (virtio serial [`worker_api::MODEL_DISK_SERIAL`]); [`crate::model_disk`] reads exactly
//!   `model_size` bytes into private memory and checks `model_sha256` before anything parses them;
//! - without `model_size`: `model` is an absolute path inside the guest (development images);
//! - in development (`serve --no-init`), `--model FILE --model-sha256 HEX` override both.
//!
//! A model is never served without an expected SHA-256; a mismatch refuses to serve. Without a
//! model the agent serves only its own endpoints. The outcome is published once in
//! [`model_status`] so `/health` can say why a configured model is not served.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use worker_api::{HostConfig, ModelStatus};

/// Where the model's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A file inside the guest (or on the development host).
    File(PathBuf),
    /// The read-only model disk; exactly this many bytes are the model.
    Disk { size: u64 },
}

/// The model to serve and its expected digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChoice {
    /// The id clients name on `/v1/*`.
    pub name: String,
    pub source: ModelSource,
    pub sha256: String,
}

/// Picks the model: command-line overrides first, then the host config.
///
/// `Ok(None)`: no model configured. `Err`: configured but unusable (named without a digest,
/// not an absolute path, empty disk) — the caller logs it and serves without inference.
pub fn choose_model(
    cli_model: Option<&PathBuf>,
    cli_sha256: Option<&String>,
    config: Option<&HostConfig>,
) -> Result<Option<ModelChoice>, String> {
    let (name, source, sha) = match (cli_model, config.and_then(|c| c.model.as_ref())) {
        (Some(p), _) => (
            name_from_path(p),
            ModelSource::File(p.clone()),
            cli_sha256.cloned(),
        ),
        (None, Some(m)) => {
            let sha = config.and_then(|c| c.model_sha256.clone());
            match config.and_then(|c| c.model_size) {
                Some(0) => return Err(format!("model {m} has model_size 0: nothing to serve")),
                Some(size) => (m.clone(), ModelSource::Disk { size }, sha),
                None => {
                    let p = PathBuf::from(m);
                    if !p.is_absolute() {
                        return Err(format!(
                            "model {m:?} has no model_size (so no model disk) and is not an \
                             absolute path inside the guest; attach the model with \
                             `host-launcher run --model FILE`"
                        ));
                    }
                    (name_from_path(&p), ModelSource::File(p), sha)
                }
            }
        }
        (None, None) => return Ok(None),
    };
    let Some(sha256) = sha else {
        return Err(format!(
            "model {name} has no expected sha256 (model_sha256 / --model-sha256): refusing to serve an unchecked model"
        ));
    };
    Ok(Some(ModelChoice {
        name,
        source,
        sha256,
    }))
}

/// The served id for a model file: its file stem, lowercased.
fn name_from_path(p: &std::path::Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_else(|| "model".into())
}

static MODEL_STATUS: OnceLock<ModelStatus> = OnceLock::new();

/// The configured model's outcome, once [`publish_status`] ran (None: no model configured).
pub fn model_status() -> Option<ModelStatus> {
    MODEL_STATUS.get().cloned()
}

/// Records the outcome for `/health` (first call wins; the agent decides once at start-up).
pub fn publish_status(status: ModelStatus) {
    let _ = MODEL_STATUS.set(status);
}

/// Chooses, checks and loads the configured model; returns the `/v1/*` router (empty when no
/// model is configured or it cannot be used) and publishes the outcome for `/health`. Called
/// once before the server listens; every failure is logged on the console with its reason.
pub fn start(
    cli_model: Option<&PathBuf>,
    cli_sha256: Option<&String>,
    config: Option<&HostConfig>,
    paths: &crate::paths::Paths,
) -> axum::Router {
    let choice = match choose_model(cli_model, cli_sha256, config) {
        Ok(None) => return axum::Router::new(),
        Ok(Some(c)) => c,
        Err(why) => {
            crate::log_line!("error: not serving inference: {why}");
            publish_status(ModelStatus {
                name: config
                    .and_then(|c| c.model.clone())
                    .unwrap_or_else(|| "model".into()),
                sha256: config
                    .and_then(|c| c.model_sha256.clone())
                    .unwrap_or_default(),
                serving: false,
                error: Some(why),
            });
            return axum::Router::new();
        }
    };
    let (router, error) = match router(&choice, paths) {
        Ok(r) => {
            crate::log_line!(
                "serving model {} (sha256 checked: {})",
                choice.name,
                choice.sha256
            );
            (r, None)
        }
        Err(e) => {
            crate::log_line!("error: not serving inference: {e:#}");
            (axum::Router::new(), Some(format!("{e:#}")))
        }
    };
    publish_status(ModelStatus {
        name: choice.name,
        sha256: choice.sha256,
        serving: error.is_none(),
        error,
    });
    router
}

/// CPU threads for inference: every vCPU.
fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Loads the model (checking its digest) and builds the `/v1/*` router.
pub fn router(choice: &ModelChoice, paths: &crate::paths::Paths) -> anyhow::Result<axum::Router> {
    let engine = match &choice.source {
        ModelSource::File(path) => {
            let backend = if inference::cuda::cuda_available().is_ok() {
                inference::cli::BackendKind::Cuda
            } else {
                inference::cli::BackendKind::Cpu
            };
            inference::cli::load_engine(&inference::cli::LoadOptions {
                path: path.clone(),
                sha256: Some(choice.sha256.clone()),
                backend,
                threads: threads(),
                max_context: 2048,
            })?
        }
        ModelSource::Disk { size } => {
            let (bytes, info) = crate::model_disk::load_from_disk(
                paths,
                *size,
                &choice.sha256,
                crate::model_disk::DISK_WAIT,
            )?;
            let secs = info.elapsed.as_secs_f64().max(1e-9);
            crate::log_line!(
                "model disk: {} bytes read and sha256 checked in {:.1} s ({:.1} MiB/s) from {}",
                bytes.len(),
                secs,
                bytes.len() as f64 / secs / 1048576.0,
                info.device.display()
            );
            let start = Instant::now();
            // The CPU backend keeps its own (repacked) copy of the weights; `bytes` is dropped
            // after loading.
            let engine = inference::engine::load_cpu_from_bytes(
                &bytes,
                &inference::cpu::CpuOptions {
                    threads: threads(),
                    max_context: 2048,
                    ..inference::cpu::CpuOptions::default()
                },
            )?;
            crate::log_line!(
                "model loaded into the CPU backend ({} threads) in {:.1} s",
                threads(),
                start.elapsed().as_secs_f64()
            );
            engine
        }
    };
    Ok(inference::server::router(
        engine,
        inference::server::ServerOptions {
            model_name: choice.name.clone(),
            ..inference::server::ServerOptions::default()
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_choice_rules() {
        assert_eq!(choose_model(None, None, None), Ok(None));
        let cfg = HostConfig {
            model: Some("/models/m.gguf".into()),
            model_sha256: Some("ab".into()),
            ..HostConfig::default()
        };
        assert_eq!(
            choose_model(None, None, Some(&cfg)),
            Ok(Some(ModelChoice {
                name: "m".into(),
                source: ModelSource::File("/models/m.gguf".into()),
                sha256: "ab".into()
            }))
        );
        let cli = PathBuf::from("/tmp/x.gguf");
        let sha = "cd".to_string();
        assert_eq!(
            choose_model(Some(&cli), Some(&sha), Some(&cfg))
                .expect("cli wins")
                .expect("some")
                .source,
            ModelSource::File(cli)
        );
        let no_hash = HostConfig {
            model: Some("/m.gguf".into()),
            ..HostConfig::default()
        };
        assert!(
            choose_model(None, None, Some(&no_hash))
                .expect_err("no digest")
                .contains("refusing")
        );
        let relative = HostConfig {
            model: Some("smollm2".into()),
            model_sha256: Some("ab".into()),
            ..HostConfig::default()
        };
        assert!(
            choose_model(None, None, Some(&relative))
                .expect_err("relative")
                .contains("absolute")
        );
        let disk = HostConfig {
            model: Some("smollm2".into()),
            model_sha256: Some("ab".into()),
            model_size: Some(1000),
            ..HostConfig::default()
        };
        assert_eq!(
            choose_model(None, None, Some(&disk)),
            Ok(Some(ModelChoice {
                name: "smollm2".into(),
                source: ModelSource::Disk { size: 1000 },
                sha256: "ab".into()
            }))
        );
        let empty = HostConfig {
            model_size: Some(0),
            ..disk
        };
        assert!(
            choose_model(None, None, Some(&empty))
                .expect_err("empty")
                .contains("model_size 0")
        );
    }
}
