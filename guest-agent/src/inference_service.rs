//! Which model the agent serves, and the OpenAI-compatible router that serves it.
//!
//! The model is named either by the host config (`model` = a path inside the guest, with
//! `model_sha256`, both measured with the rest of the config) or, in development
//! (`serve --no-init`), by `--model FILE --model-sha256 HEX`. A model is never served without an
//! expected SHA-256: the file is hashed before use and a mismatch refuses to serve. Without a
//! model the agent serves only its own endpoints.

use std::path::PathBuf;

use worker_api::HostConfig;

/// The model to serve and its expected digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChoice {
    pub path: PathBuf,
    pub sha256: String,
}

/// Picks the model: command-line overrides first, then the host config.
///
/// `Ok(None)`: no model configured. `Err`: configured but unusable (named without a digest,
/// or not an absolute path) — the caller logs it and serves without inference.
pub fn choose_model(
    cli_model: Option<&PathBuf>,
    cli_sha256: Option<&String>,
    config: Option<&HostConfig>,
) -> Result<Option<ModelChoice>, String> {
    let (path, sha) = match (cli_model, config.and_then(|c| c.model.as_ref())) {
        (Some(p), _) => (p.clone(), cli_sha256.cloned()),
        (None, Some(m)) => (
            PathBuf::from(m),
            config.and_then(|c| c.model_sha256.clone()),
        ),
        (None, None) => return Ok(None),
    };
    if !path.is_absolute() {
        return Err(format!(
            "model {:?} is not an absolute path inside the guest; name the model file (e.g. on the model disk)",
            path.display()
        ));
    }
    let Some(sha256) = sha else {
        return Err(format!(
            "model {} has no expected sha256 (model_sha256 / --model-sha256): refusing to serve an unchecked model",
            path.display()
        ));
    };
    Ok(Some(ModelChoice { path, sha256 }))
}

/// Loads the model (checking its digest) and builds the `/v1/*` router.
pub fn router(choice: &ModelChoice) -> anyhow::Result<axum::Router> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let backend = if inference::cuda::cuda_available().is_ok() {
        inference::cli::BackendKind::Cuda
    } else {
        inference::cli::BackendKind::Cpu
    };
    let engine = inference::cli::load_engine(&inference::cli::LoadOptions {
        path: choice.path.clone(),
        sha256: Some(choice.sha256.clone()),
        backend,
        threads,
        max_context: 2048,
    })?;
    let model_name = choice
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_else(|| "model".into());
    Ok(inference::server::router(
        engine,
        inference::server::ServerOptions {
            model_name,
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
                path: "/models/m.gguf".into(),
                sha256: "ab".into()
            }))
        );
        let cli = PathBuf::from("/tmp/x.gguf");
        let sha = "cd".to_string();
        assert_eq!(
            choose_model(Some(&cli), Some(&sha), Some(&cfg))
                .expect("cli wins")
                .expect("some")
                .path,
            cli
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
    }
}
