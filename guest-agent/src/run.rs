//! Running the agent: init duties (as PID 1), config and release, the tokio runtime, the server,
//! signal handling, child reaping, and the final stop (exit, or power-off as PID 1).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use anyhow::Context;
use guest_agent::health::{AgentInfo, ReleaseSource, read_release};
use guest_agent::log_line;
use guest_agent::measured_config::load_measured_config;
use guest_agent::paths::Paths;
use guest_agent::platform::{power, reaper};
use guest_agent::server::{self, ServerContext, StopReason, StopSwitch};

/// What to run.
pub struct AgentOptions {
    /// Where the server listens.
    pub listen: SocketAddr,
    /// Whether to perform the init duties first (PID 1 only).
    pub init_duties: bool,
    /// Where to look for the image's files.
    pub paths: Paths,
    /// Model file to serve (development override of the host config's `model`).
    pub model: Option<std::path::PathBuf>,
    /// Expected SHA-256 of `model`.
    pub model_sha256: Option<String>,
    /// Development: without TDX or a simulated-TEE fw_cfg file, simulate a TEE with a fresh key.
    pub simulate_tee: bool,
    /// Development override of the agent's own cw-v1 image hash (`serve --assume-image-hash`);
    /// `None` (always, for the image's init): the hash of the quote's registers is checked
    /// against the root contract.
    pub image_hash: Option<[u8; 32]>,
    /// How often the approval gate re-checks the root contract.
    pub approval_recheck: std::time::Duration,
}

impl AgentOptions {
    /// The image's PID 1: init duties, all interfaces, the contract port.
    pub fn init() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, worker_api::AGENT_PORT)),
            init_duties: true,
            paths: Paths::default(),
            model: None,
            model_sha256: None,
            simulate_tee: false,
            // The image's init has no override: the hash comes from the TEE evidence.
            image_hash: None,
            approval_recheck: guest_agent::approval::DEFAULT_RECHECK,
        }
    }
}

/// Logs panics on the console (so they are visible on the serial log before a power-off).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        log_line!("panic: {info}");
    }));
}

/// Runs the agent as PID 1 and powers off at the end, whatever happens: PID 1 must never exit.
pub fn run_as_pid1(opts: AgentOptions) -> ! {
    match std::panic::catch_unwind(move || run_agent(opts)) {
        Ok(Ok(reason)) => log_line!("stopping: {reason}"),
        Ok(Err(e)) => log_line!("fatal: {e:#}"),
        Err(_) => log_line!("fatal: the agent panicked (see above)"),
    }
    power::power_off()
}

/// Runs init duties (if asked), then the server until a stop; returns why it stopped.
pub fn run_agent(opts: AgentOptions) -> anyhow::Result<StopReason> {
    let started = if opts.init_duties {
        // As init, uptime counts from boot (CLOCK_MONOTONIC is what Instant uses on Linux).
        Instant::now()
            .checked_sub(guest_agent::console::monotonic_now())
            .unwrap_or_else(Instant::now)
    } else {
        Instant::now()
    };
    if opts.init_duties {
        guest_agent::init::run_init_duties(&opts.paths).context("init duties failed")?;
    }

    let measured = load_measured_config(&opts.paths.host_config_raw());
    log_line!("{}", measured.describe());
    if matches!(
        measured,
        guest_agent::measured_config::MeasuredConfig::Absent
    ) && opts.init_duties
        && !opts.paths.fw_cfg_by_name().exists()
    {
        log_line!(
            "warning: {} does not exist; the qemu_fw_cfg module must be in modules.list for the \
             agent to see a host config",
            opts.paths.fw_cfg_by_name().display()
        );
    }

    // Measure the config into RTMR3 and choose the evidence before anything acts on it.
    let attestor = std::sync::Arc::new(guest_agent::attest::Attestor::setup(
        &opts.paths,
        measured.measured_bytes(),
        guest_agent::attest::DevOptions {
            simulate_tee: opts.simulate_tee,
        },
        unix_now(),
    )?);
    if let Some(pk) = attestor.simulator_public_key()
        && !opts.init_duties
    {
        // Development: the key a verifier must be given (`--simulated-key`).
        println!("simulated TEE public key: {}", hex::encode(pk));
    }

    let release_source = read_release(&opts.paths.release());
    match &release_source {
        ReleaseSource::File(r) => log_line!("image {} {}", r.name, r.version),
        ReleaseSource::Missing => log_line!(
            "no release file at {}; reporting image \"dev\"",
            opts.paths.release().display()
        ),
        ReleaseSource::Invalid(why) => log_line!("error: {why}"),
    }

    // The model named by the host config (or --model in development) is checked and loaded
    // before the server listens; a model that cannot be used is logged and not served.
    let model_choice = guest_agent::inference_service::choose_model(
        opts.model.as_ref(),
        opts.model_sha256.as_ref(),
        measured.config(),
    );
    // Inference is served only while the root contract (if any) approves image and model.
    // The agent's own image hash comes from its evidence (the quote's registers). Only the
    // development flag `serve --assume-image-hash` overrides it; the image's init never sets it.
    let own_image_hash = opts.image_hash.or_else(|| attestor.image_hash_cw_v1());
    if let Some(h) = own_image_hash {
        log_line!("own image hash (cw-v1): {}", hex::encode(h));
    }
    let approval = guest_agent::approval::ApprovalGate::from_host_config(
        measured.config(),
        own_image_hash,
        model_choice
            .as_ref()
            .ok()
            .and_then(|c| c.as_ref())
            .map(|c| c.sha256.as_str()),
        opts.approval_recheck,
    );
    // GPUs: modules, NVML, confidential-computing mode (after the host config is measured: its
    // development flag decides whether a GPU without CC may serve).
    let gpu = guest_agent::gpu::setup(
        &opts.paths,
        guest_agent::gpu::Policy {
            // From the measured RTMR3 event, not the parsed config: what verifiers see.
            allow_without_cc: attestor.dev_gpu_without_cc(),
            enforce: opts.init_duties || opts.paths.tdx_guest_device().exists(),
        },
        opts.init_duties,
    );
    let inference_router = match &gpu.outcome.verdict {
        guest_agent::gpu::Verdict::Refuse(why) => {
            log_line!("error: not serving inference: {why}");
            if model_choice.as_ref().is_ok_and(|c| c.is_some()) {
                guest_agent::inference_service::refuse(measured.config(), why.clone());
            }
            axum::Router::new()
        }
        _ => guest_agent::inference_service::start(
            opts.model.as_ref(),
            opts.model_sha256.as_ref(),
            measured.config(),
            &opts.paths,
        ),
    };
    // GPU evidence in RA-TLS: from now on every identity carries each GPU's report over the
    // identity's own key (a GPU that may not serve gets no evidence attached).
    if let Some(nvml) = gpu.nvml.clone()
        && !matches!(gpu.outcome.verdict, guest_agent::gpu::Verdict::Refuse(_))
    {
        let source = guest_agent::gpu::evidence_source(nvml);
        match attestor.attach_gpu(std::sync::Arc::new(source), unix_now()) {
            Ok(()) => match attestor.gpu_error() {
                None => log_line!("gpu: attestation reports embedded in the RA-TLS certificate"),
                Some(why) => log_line!("warning: RA-TLS certificate without GPU evidence: {why}"),
            },
            Err(e) => log_line!("error: reissuing the RA-TLS identity with GPU evidence: {e:#}"),
        }
    }

    let stop = StopSwitch::new();
    let ctx = ServerContext {
        info: AgentInfo {
            release: release_source.release(),
            host_config: measured.status(),
            started,
            gpu: Some(gpu.outcome.status),
        },
        paths: opts.paths.clone(),
        stop: stop.clone(),
        powers_off: power::is_pid1(),
        attestation: Some(attestor.clone()),
        approval: approval.clone(),
    };
    let inference_router = approval.guard(inference_router);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("agent")
        .build()
        .context("cannot start the async runtime")?;
    let reap = opts.init_duties;
    runtime.block_on(async move {
        let listener = guest_agent::tls_listener::bind(opts.listen).with_context(|| {
            format!(
                "cannot listen on {} (is another agent running, or is the address wrong? \
                     pass --listen ADDR:PORT)",
                opts.listen
            )
        })?;
        let local = listener.local_addr().unwrap_or(opts.listen);
        // Mutual RA-TLS: the pins come from the measured client_auth event.
        let client_verifier = attestor.client_auth_pins()?.map(|pins| {
            log_line!(
                "RA-TLS listener requires a client certificate: {} pinned SHA-256 (measured in \
                 RTMR3 as client_auth): {}",
                pins.len(),
                pins.iter().map(hex::encode).collect::<Vec<_>>().join(", ")
            );
            attestation::client_auth::PinnedClientCerts::new(pins).verifier()
        });
        let tls_config = attestation::tls::server_config(attestor.resolver(), client_verifier)
            .context("cannot build the RA-TLS server configuration")?;
        let listener =
            guest_agent::tls_listener::TlsListener::new(listener, std::sync::Arc::new(tls_config))
                .context("cannot start the RA-TLS listener")?;
        spawn_rotation(attestor.clone());
        spawn_signal_handlers(&stop)?;
        if reap {
            spawn_reaper()?;
        }
        approval.spawn(opts.approval_recheck);
        log_line!("{}", server::ready_message(local));
        // Integration point: other routers (inference, built from `measured.config()`) are
        // passed here instead of the empty one; they must not define a fallback.
        let app = server::build_app(ctx, inference_router);
        let reason = server::serve(listener, app, stop)
            .await
            .context("HTTPS server failed")?;
        Ok(reason)
    })
}

fn unix_now() -> u64 {
    attestation::verify::unix_secs(std::time::SystemTime::now())
}

/// Checks every minute whether the RA-TLS certificate is due for its hourly rotation.
fn spawn_rotation(attestor: std::sync::Arc<guest_agent::attest::Attestor>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            let a = attestor.clone();
            match tokio::task::spawn_blocking(move || a.rotate_if_needed(unix_now())).await {
                Ok(Ok(true)) => log_line!("RA-TLS certificate rotated"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => log_line!("error: RA-TLS rotation failed: {e:#}"),
                Err(e) => log_line!("error: RA-TLS rotation task failed: {e}"),
            }
        }
    });
}

/// SIGTERM and SIGINT flip the stop switch (clean exit, or power-off as PID 1).
fn spawn_signal_handlers(stop: &StopSwitch) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    for (kind, number) in [
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::interrupt(), libc::SIGINT),
    ] {
        let mut stream = signal(kind).with_context(|| format!("cannot handle signal {number}"))?;
        let stop = stop.clone();
        tokio::spawn(async move {
            if stream.recv().await.is_some() {
                log_line!("received signal {number}; stopping");
                stop.stop(StopReason::Signal(number));
            }
        });
    }
    Ok(())
}

/// Reaps orphaned children on every SIGCHLD (PID 1 duty).
fn spawn_reaper() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut stream = signal(SignalKind::child()).context("cannot handle SIGCHLD")?;
    tokio::spawn(async move {
        loop {
            for (pid, status) in reaper::reap_zombies() {
                log_line!("reaped process {pid} ({})", reaper::describe_status(status));
            }
            if stream.recv().await.is_none() {
                return;
            }
        }
    });
    Ok(())
}
