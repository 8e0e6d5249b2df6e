//! Which model the agent serves, and the OpenAI-compatible router that serves it.
//!
//! The model is named by the host config, measured with the rest of it:
//! - with `model_verity`: `model` is a name, and the model disk is mapped through dm-verity
//!   with the measured root hash ([`crate::model_disk::open_verity`]); the weights are read
//!   only through that mapping, in the background while the agent already answers `/health`
//!   with the load's progress (`/v1/*` answers 503 "loading" until it is done), straight into
//!   the backend: the CUDA backend when a GPU is present (streamed through a bounded staging
//!   buffer), else the CPU backend (one copy of the repacked weights in RAM). A read the
//!   kernel refuses (a block that does not match the tree) fails the load with the block it
//!   named; the model is then never served. The expected digest is the model hash
//!   SHA-256("name@revision:root_hash"), the RTMR3 `model` event and what the root contract
//!   lists;
//! - with `model_size`: `model` is a name, and the bytes come from the read-only model disk
//!   (virtio serial [`worker_api::MODEL_DISK_SERIAL`]); [`crate::model_disk`] reads exactly
//!   `model_size` bytes into private memory and checks `model_sha256` before anything parses them;
//! - without `model_size`: `model` is an absolute path inside the guest (development images);
//! - in development (`serve --no-init`), `--model FILE --model-sha256 HEX` override both.
//!
//! A model is never served without an expected digest; a mismatch refuses to serve. Without a
//! model the agent serves only its own endpoints. The state (loading with progress, serving,
//! failed with the reason) is kept for [`model_status`] so `/health` can say why a configured
//! model is not (yet) served.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use worker_api::{HostConfig, ModelLoad, ModelStatus, ModelVerity};

use crate::model_disk::Progress;

/// Where the model's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A file inside the guest (or on the development host).
    File(PathBuf),
    /// The read-only raw model disk; exactly this many bytes are the model.
    Disk { size: u64 },
    /// The dm-verity model disk with these measured parameters.
    Verity(Box<ModelVerity>),
}

impl ModelSource {
    fn label(&self) -> &'static str {
        match self {
            ModelSource::File(_) => "file",
            ModelSource::Disk { .. } => "copy-sha256",
            ModelSource::Verity(_) => "dm-verity",
        }
    }
}

/// The model to serve and its expected digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChoice {
    /// The id clients name on `/v1/*`.
    pub name: String,
    pub source: ModelSource,
    /// The expected digest, lowercase hex: the file's SHA-256, or for a dm-verity disk the
    /// model hash SHA-256("name@revision:root_hash") (what RTMR3 and the root contract hold).
    pub sha256: String,
}

/// Picks the model: command-line overrides first, then the host config.
///
/// `Ok(None)`: no model configured. `Err`: configured but unusable (named without a digest,
/// not an absolute path, empty disk, both a raw and a verity disk) — the caller logs it and
/// serves without inference.
pub fn choose_model(
    cli_model: Option<&PathBuf>,
    cli_sha256: Option<&String>,
    config: Option<&HostConfig>,
) -> Result<Option<ModelChoice>, String> {
    if cli_model.is_none()
        && let Some(c) = config
        && let Some(v) = &c.model_verity
    {
        return verity_choice(c, v).map(Some);
    }
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
                            "model {m:?} has no model_size or model_verity (so no model disk) \
                             and is not an absolute path inside the guest; attach the model \
                             with `host-launcher run --model-disk DIR`"
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

/// The choice for a dm-verity model disk: checks the name, revision and root hash and computes
/// the model hash.
fn verity_choice(c: &HostConfig, v: &ModelVerity) -> Result<ModelChoice, String> {
    if c.model_sha256.is_some() || c.model_size.is_some() {
        return Err(
            "the host config names both a raw model disk (model_sha256/model_size) and a \
             dm-verity model disk (model_verity): refusing an ambiguous model"
                .into(),
        );
    }
    let name = c
        .model
        .clone()
        .ok_or("model_verity is set but model (the name) is not")?;
    measurements::model_disk::check_label("model", &name).map_err(|e| e.to_string())?;
    measurements::model_disk::check_label("model_verity.revision", &v.revision)
        .map_err(|e| e.to_string())?;
    let root: [u8; 32] = hex::decode(&v.root_hash)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            format!(
                "model_verity.root_hash {:?} is not 64 hex digits",
                v.root_hash
            )
        })?;
    Ok(ModelChoice {
        sha256: hex::encode(measurements::model_disk::model_hash(
            &name,
            &v.revision,
            &root,
        )),
        name,
        source: ModelSource::Verity(Box::new(v.clone())),
    })
}

/// The served id for a model file: its file stem, lowercased.
fn name_from_path(p: &std::path::Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_else(|| "model".into())
}

/// The load as `/health` shows it.
#[derive(Debug)]
struct LoadState {
    /// Highest MemTotal - MemAvailable seen while loading.
    guest_mem_peak: u64,
    name: String,
    sha256: String,
    root_hash: Option<String>,
    source: &'static str,
    backend: String,
    total: u64,
    progress: Arc<Progress>,
    started: Instant,
    ended: Option<Instant>,
    state: &'static str,
    error: Option<String>,
}

static STATE: Mutex<Option<LoadState>> = Mutex::new(None);

/// The serving scheduler's counters, once a model serves.
static BATCH: OnceLock<Arc<inference::server::ServerStats>> = OnceLock::new();

/// `/health`'s view of the scheduler.
fn batch_status() -> Option<worker_api::BatchStatus> {
    let b = BATCH.get()?;
    let u = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as u64;
    Some(worker_api::BatchStatus {
        slots: u(&b.slots),
        running: u(&b.running),
        waiting: u(&b.waiting),
        kv_blocks: u(&b.kv_blocks),
        free_kv_blocks: u(&b.free_kv_blocks),
        cached_kv_blocks: u(&b.cached_kv_blocks),
        steps: b.steps.load(Ordering::Relaxed),
        decoded_tokens: b.decoded.load(Ordering::Relaxed),
        prefilled_tokens: b.prefilled.load(Ordering::Relaxed),
        shared_prompt_tokens: b.shared.load(Ordering::Relaxed),
        cached_prompt_tokens: b.cached.load(Ordering::Relaxed),
        ended: b.ended.load(Ordering::Relaxed),
        cancelled: b.cancelled.load(Ordering::Relaxed),
    })
}

/// The `/v1/*` router over `engine` (the continuous-batching scheduler), its counters kept for
/// `/health`.
fn serve(engine: inference::engine::Engine, name: &str) -> anyhow::Result<axum::Router> {
    let opts = inference::server::ServerOptions {
        model_name: name.to_owned(),
        ..inference::server::ServerOptions::default()
    };
    let (slots, cfg) = (
        opts.max_batch,
        inference::server::scheduler_config(&opts, engine.max_context()),
    );
    let (r, stats) = inference::server::serve(engine, opts).map_err(|e| {
        anyhow::anyhow!(
            "cannot set up the batch ({slots} sequences, {} KV blocks of {} positions): {e}",
            cfg.kv_blocks,
            cfg.block_size
        )
    })?;
    crate::log_line!(
        "serving with continuous batching: up to {slots} sequences per step, KV budget {} \
         blocks of {} positions, {} more may wait",
        cfg.kv_blocks,
        cfg.block_size,
        cfg.max_queued
    );
    let _ = BATCH.set(stats);
    Ok(r)
}

fn with_state<T>(f: impl FnOnce(&mut Option<LoadState>) -> T) -> T {
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut g)
}

/// The agent's peak resident memory (VmHWM of /proc/self/status) in bytes; 0 when unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Memory in use in the whole guest: MemTotal - MemAvailable of /proc/meminfo, in bytes; 0
/// when unknown.
pub fn guest_mem_used() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    match (field("MemTotal:"), field("MemAvailable:")) {
        (Some(t), Some(a)) => t.saturating_sub(a) * 1024,
        _ => 0,
    }
}

fn sample_guest_mem() {
    let used = guest_mem_used();
    with_state(|s| {
        if let Some(s) = s.as_mut() {
            s.guest_mem_peak = s.guest_mem_peak.max(used);
        }
    })
}

/// The configured model's state for `/health` (None: no model configured).
pub fn model_status() -> Option<ModelStatus> {
    with_state(|s| {
        let s = s.as_ref()?;
        let verified = s.progress.verified.load(Ordering::Relaxed);
        let elapsed = s.ended.unwrap_or_else(Instant::now) - s.started;
        let ms = elapsed.as_millis() as u64;
        Some(ModelStatus {
            name: s.name.clone(),
            sha256: s.sha256.clone(),
            serving: s.state == worker_api::MODEL_SERVING,
            error: s.error.clone(),
            root_hash: s.root_hash.clone(),
            load: Some(ModelLoad {
                state: s.state.into(),
                source: s.source.into(),
                backend: s.backend.clone(),
                bytes_total: s.total,
                bytes_verified: verified,
                elapsed_ms: ms,
                bytes_per_sec: verified.saturating_mul(1000).checked_div(ms).unwrap_or(0),
                peak_rss_bytes: peak_rss_bytes(),
                guest_mem_peak_bytes: s.guest_mem_peak,
            }),
            batch: batch_status(),
        })
    })
}

fn begin(choice: &ModelChoice, total: u64, backend: &str) -> Arc<Progress> {
    let progress = Arc::new(Progress::default());
    let root_hash = match &choice.source {
        ModelSource::Verity(v) => Some(v.root_hash.clone()),
        _ => None,
    };
    with_state(|s| {
        *s = Some(LoadState {
            guest_mem_peak: guest_mem_used(),
            name: choice.name.clone(),
            sha256: choice.sha256.clone(),
            root_hash,
            source: choice.source.label(),
            backend: backend.into(),
            total,
            progress: progress.clone(),
            started: Instant::now(),
            ended: None,
            state: worker_api::MODEL_LOADING,
            error: None,
        })
    });
    progress
}

fn finish(result: &Result<(), String>, backend: Option<&str>) {
    with_state(|s| {
        if let Some(s) = s.as_mut() {
            s.ended = Some(Instant::now());
            if let Some(b) = backend {
                s.backend = b.into();
            }
            match result {
                Ok(()) => s.state = worker_api::MODEL_SERVING,
                Err(e) => {
                    s.state = worker_api::MODEL_FAILED;
                    s.error = Some(e.clone());
                }
            }
        }
    })
}

/// Records a configuration error (no load started) for `/health`.
/// Records that the configured model is not served, and why (reported in `/health`).
pub fn refuse(config: Option<&HostConfig>, why: String) {
    with_state(|s| {
        *s = Some(LoadState {
            guest_mem_peak: 0,
            name: config
                .and_then(|c| c.model.clone())
                .unwrap_or_else(|| "model".into()),
            sha256: config
                .and_then(|c| c.model_sha256.clone())
                .unwrap_or_default(),
            root_hash: config
                .and_then(|c| c.model_verity.as_ref())
                .map(|v| v.root_hash.clone()),
            source: if config.is_some_and(|c| c.model_verity.is_some()) {
                "dm-verity"
            } else {
                "none"
            },
            backend: "none".into(),
            total: 0,
            progress: Arc::new(Progress::default()),
            started: Instant::now(),
            ended: Some(Instant::now()),
            state: worker_api::MODEL_FAILED,
            error: Some(why),
        })
    })
}

/// Chooses, checks and loads the configured model; returns the `/v1/*` router (empty when no
/// model is configured or it cannot be used) and records the outcome for `/health`. Called
/// once before the server listens; every failure is logged on the console with its reason.
/// A dm-verity model loads in the background: the returned router answers 503 with the load
/// state until the model serves, and keeps answering 503 with the reason if it fails.
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
            refuse(config, why);
            return axum::Router::new();
        }
    };
    if let ModelSource::Verity(v) = &choice.source {
        return start_verity(choice.clone(), (**v).clone(), paths.clone());
    }
    let total = match &choice.source {
        ModelSource::Disk { size } => *size,
        ModelSource::File(p) => std::fs::metadata(p).map_or(0, |m| m.len()),
        ModelSource::Verity(_) => 0,
    };
    let progress = begin(&choice, total, "cpu");
    let (router, result) = match router(&choice, paths, &progress) {
        Ok((r, backend)) => {
            crate::log_line!(
                "serving model {} (sha256 checked: {})",
                choice.name,
                choice.sha256
            );
            finish(&Ok(()), Some(backend));
            (r, Ok(()))
        }
        Err(e) => {
            crate::log_line!("error: not serving inference: {e:#}");
            (axum::Router::new(), Err(format!("{e:#}")))
        }
    };
    if result.is_err() {
        finish(&result, None);
    }
    router
}

/// The inference router once the background load is done.
#[derive(Debug, Default)]
struct Slot {
    router: OnceLock<axum::Router>,
}

/// Starts loading a dm-verity model in the background; returns the router that forwards to the
/// real one once it is ready (503 with the state before, or the reason after a failure).
fn start_verity(choice: ModelChoice, v: ModelVerity, paths: crate::paths::Paths) -> axum::Router {
    let progress = begin(&choice, v.file_size, "pending");
    let slot = Arc::new(Slot::default());
    let s2 = slot.clone();
    let spawned = std::thread::Builder::new()
        .name("model-load".into())
        .spawn(move || {
            let started = Instant::now();
            match load_verity(&v, &paths, progress.clone()) {
                Ok((engine, backend, node)) => {
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    let bytes = progress.verified.load(Ordering::Relaxed);
                    sample_guest_mem();
                    let guest_peak = with_state(|s| s.as_ref().map_or(0, |s| s.guest_mem_peak));
                    crate::log_line!(
                        "model {} loaded through dm-verity into the {backend} backend: {} bytes \
                         verified in {:.1} s ({:.1} MiB/s), agent peak RSS {} MiB, guest memory \
                         in use at most {} MiB; serving (model hash {})",
                        choice.name,
                        bytes,
                        secs,
                        bytes as f64 / secs / 1048576.0,
                        peak_rss_bytes() >> 20,
                        guest_peak >> 20,
                        choice.sha256
                    );
                    let r = match serve(engine, &choice.name) {
                        Ok(r) => r,
                        Err(e) => {
                            let why = format!("{e:#}");
                            crate::log_line!(
                                "error: not serving inference: model {}: {why}",
                                choice.name
                            );
                            finish(&Err(why), None);
                            return;
                        }
                    };
                    let _ = s2.router.set(r);
                    finish(&Ok(()), Some(backend));
                    crate::model_disk::bench_probe(&paths, &node, v.file_size);
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    crate::log_line!("error: not serving inference: model {}: {why}", choice.name);
                    finish(&Err(why), None);
                }
            }
        });
    if let Err(e) = spawned {
        let why = format!("cannot start the model loading thread: {e}");
        crate::log_line!("error: not serving inference: {why}");
        finish(&Err(why), None);
    }
    axum::Router::new()
        .route("/v1/{*rest}", axum::routing::any(forward))
        .with_state(slot)
}

/// Forwards to the loaded router, or answers 503 with the load state.
async fn forward(State(slot): State<Arc<Slot>>, req: Request) -> Response {
    use tower::ServiceExt as _;
    if let Some(r) = slot.router.get() {
        return match r.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(e) => match e {},
        };
    }
    let (message, code) = match model_status() {
        Some(ModelStatus {
            name,
            error: Some(why),
            ..
        }) => (format!("model {name} is not served: {why}"), "model_failed"),
        Some(ModelStatus {
            name,
            load: Some(l),
            ..
        }) => (
            format!(
                "model {name} is loading: {} of {} bytes verified ({} %); retry later",
                l.bytes_verified,
                l.bytes_total,
                (l.bytes_verified.saturating_mul(100) / l.bytes_total.max(1)).min(100)
            ),
            "model_loading",
        ),
        _ => ("no model is configured".into(), "model_missing"),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({"error": {
            "message": message,
            "type": "server_error",
            "param": null,
            "code": code,
        }})),
    )
        .into_response()
}

/// Maps the verity disk and loads the model through it into the GPU (when one is present) or
/// the CPU backend. Logs progress every 10 %.
fn load_verity(
    v: &ModelVerity,
    paths: &crate::paths::Paths,
    progress: Arc<Progress>,
) -> anyhow::Result<(inference::engine::Engine, &'static str, PathBuf)> {
    let (reader, device) =
        crate::model_disk::open_verity(paths, v, crate::model_disk::DISK_WAIT, progress.clone())?;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let (done, progress, total) = (done.clone(), progress.clone(), v.file_size);
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut last = 0;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(200));
                sample_guest_mem();
                let got = progress.verified.load(Ordering::Relaxed);
                let decile = got.saturating_mul(10) / total.max(1);
                if decile > last && decile < 10 {
                    last = decile;
                    crate::log_line!(
                        "model disk: {}% verified ({} MiB, {:.1} s, agent RSS peak {} MiB)",
                        decile * 10,
                        got >> 20,
                        start.elapsed().as_secs_f64(),
                        peak_rss_bytes() >> 20
                    );
                }
            }
        })
    };
    let result = if inference::cuda::cuda_available().is_ok() {
        with_state(|s| {
            if let Some(s) = s.as_mut() {
                s.backend = "cuda".into();
            }
        });
        inference::engine::load_cuda_streamed(
            &reader,
            &inference::cuda::CudaOptions {
                max_context: Some(2048),
                ..Default::default()
            },
        )
        .map(|e| (e, "cuda"))
    } else {
        with_state(|s| {
            if let Some(s) = s.as_mut() {
                s.backend = "cpu".into();
            }
        });
        inference::engine::load_cpu_streamed(
            &reader,
            &inference::cpu::CpuOptions {
                threads: threads(),
                max_context: 2048,
                ..inference::cpu::CpuOptions::default()
            },
        )
        .map(|e| (e, "cpu"))
    };
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let (engine, backend) = result?;
    Ok((engine, backend, device.node))
}

/// CPU threads for inference: every vCPU.
fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Loads the model (checking its digest) and builds the `/v1/*` router; returns it with the
/// backend's name.
pub fn router(
    choice: &ModelChoice,
    paths: &crate::paths::Paths,
    progress: &Progress,
) -> anyhow::Result<(axum::Router, &'static str)> {
    let (engine, backend) = match &choice.source {
        ModelSource::File(path) => {
            let backend = if inference::cuda::cuda_available().is_ok() {
                inference::cli::BackendKind::Cuda
            } else {
                inference::cli::BackendKind::Cpu
            };
            let e = inference::cli::load_engine(&inference::cli::LoadOptions {
                path: path.clone(),
                sha256: Some(choice.sha256.clone()),
                backend,
                threads: threads(),
                max_context: 2048,
            })?;
            let name = match backend {
                inference::cli::BackendKind::Cuda => "cuda",
                inference::cli::BackendKind::Cpu => "cpu",
            };
            (e, name)
        }
        ModelSource::Disk { size } => {
            let (bytes, info) = crate::model_disk::load_from_disk(
                paths,
                *size,
                &choice.sha256,
                crate::model_disk::DISK_WAIT,
                &progress.verified,
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
            (engine, "cpu")
        }
        ModelSource::Verity(_) => {
            anyhow::bail!("internal error: a dm-verity model is loaded in the background")
        }
    };
    Ok((serve(engine, &choice.name)?, backend))
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

    #[test]
    fn a_verity_disk_is_chosen_by_its_model_hash() {
        let v = ModelVerity {
            revision: "r1".into(),
            file_size: 5000,
            disk_size: 8192,
            format: 1,
            hash_algorithm: "sha256".into(),
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: 2,
            hash_blocks: 1,
            hash_offset: 8192,
            salt: "00".repeat(32),
            root_hash: "ab".repeat(32),
        };
        let cfg = HostConfig {
            model: Some("tiny".into()),
            model_verity: Some(Box::new(v.clone())),
            ..HostConfig::default()
        };
        let c = choose_model(None, None, Some(&cfg))
            .expect("ok")
            .expect("some");
        assert_eq!(c.name, "tiny");
        assert_eq!(c.source, ModelSource::Verity(Box::new(v.clone())));
        assert_eq!(
            c.sha256,
            hex::encode(measurements::model_disk::model_hash(
                "tiny",
                "r1",
                &[0xab; 32]
            ))
        );
        // The RTMR3 model event carries the same digest.
        let inputs = measurements::rtmr3::RuntimeInputs::from_host_config(&cfg.to_canonical_json())
            .expect("inputs");
        assert_eq!(inputs.model_sha256.map(hex::encode), Some(c.sha256.clone()));
        for (bad, why) in [
            (
                HostConfig {
                    model_sha256: Some("00".repeat(32)),
                    ..cfg.clone()
                },
                "ambiguous",
            ),
            (
                HostConfig {
                    model: None,
                    ..cfg.clone()
                },
                "model (the name)",
            ),
            (
                HostConfig {
                    model: Some("a/b".into()),
                    ..cfg.clone()
                },
                "not allowed",
            ),
            (
                HostConfig {
                    model_verity: Some(Box::new(ModelVerity {
                        root_hash: "zz".into(),
                        ..v.clone()
                    })),
                    ..cfg.clone()
                },
                "64 hex digits",
            ),
        ] {
            let e = choose_model(None, None, Some(&bad)).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
    }
}
