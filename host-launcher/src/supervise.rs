//! Running the guest: spawn QEMU, wait for the agent's health, verify it, stop cleanly.
//!
//! Every request to the agent goes through RA-TLS ([`attestation::RaTlsHttpClient`] with the
//! launcher's verifier, see [`crate::attest`]): health polling, `/shutdown`, and the final check
//! ([`crate::attest::check_agent`]) before the guest is reported ready. A guest whose evidence is
//! rejected is stopped at once and every reason is printed.
//!
//! Stop order: `POST /shutdown` (the agent syncs and powers off; `-no-reboot` makes QEMU exit),
//! then QMP `quit`, then SIGKILL, each after a timeout. QEMU runs in its own process group so
//! that a terminal Ctrl-C reaches only the launcher, which then stops the guest in that order;
//! if the launcher itself dies, the kernel sends QEMU SIGTERM (parent-death signal).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use sha2::{Digest, Sha384};
use worker_api::Health;

use crate::qemu::{self, LaunchPlan};

/// What `run` does once the guest is healthy.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub health_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub exit_when_healthy: bool,
    pub json: bool,
    /// Log of QEMU's own stdout/stderr.
    pub qemu_log: PathBuf,
    /// The exact host-config bytes sent, to compare with the agent's SHA-384.
    pub host_config: Vec<u8>,
    /// Image name and version from the manifest, to compare with the agent's.
    pub expected_image: worker_api::ImageRelease,
    /// Print the agent's health on stdout once healthy (`run`); otherwise one line on stderr.
    pub print_health: bool,
    /// The RA-TLS client (with the launcher's verifier) for every request to the agent.
    pub client: attestation::RaTlsHttpClient,
    /// What the booted image must prove (its cw-v1 hash, when known).
    pub expected: crate::attest::Expected,
    /// A ready-to-paste `host-launcher verify ...` line (simulated TEE), printed once verified.
    pub verify_line: Option<String>,
    /// `--tee tdx` of a declared shape: explains an RTMR0 that is not the shape's when the
    /// verification fails ([`crate::rtmr0diag`]).
    pub rtmr0_diag: Option<crate::rtmr0diag::Rtmr0Diag>,
}

/// Finds the QEMU binary and checks its version for `tee`; returns the version.
pub fn check_qemu(binary: &Path, tee: crate::settings::Tee) -> Result<(u32, u32, u32)> {
    let out = match Command::new(binary).arg("--version").output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "QEMU not found ({}): install qemu-system-x86 from bookworm-backports \
             (`apt-get install -t bookworm-backports qemu-system-x86`; QEMU >= 10.1 for \
             --tee tdx), or point --qemu at the binary",
            binary.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot run {} --version", binary.display()));
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let v = qemu::parse_version(&text).ok_or_else(|| {
        anyhow!(
            "cannot read the version of {} (it printed {:?}): is it qemu-system-x86_64?",
            binary.display(),
            text.lines().next().unwrap_or("")
        )
    })?;
    qemu::check_version(tee, v).map_err(|e| anyhow!(e))?;
    Ok(v)
}

/// What one health poll found.
enum Poll {
    Healthy(Box<Health>),
    /// Not answering yet (or a transient error), with the reason.
    NotYet(String),
    /// The agent's RA-TLS evidence was rejected.
    Rejected(Box<attestation::Verdict>),
}

/// One `GET /health` over RA-TLS.
fn get_health(client: &attestation::RaTlsHttpClient, port: u16, t: Duration) -> Poll {
    let url = format!(
        "{}{}",
        crate::attest::base_url(port),
        worker_api::HEALTH_PATH
    );
    match client.get(&url, t) {
        Ok(r) if r.status == 200 => match r.json::<Health>(&url) {
            Ok(h) => Poll::Healthy(Box::new(h)),
            Err(e) => Poll::NotYet(e.to_string()),
        },
        Ok(r) => Poll::NotYet(format!("GET {url} answered HTTP {}", r.status)),
        Err(attestation::HttpError::Rejected(v)) => Poll::Rejected(v),
        Err(e) => Poll::NotYet(e.to_string()),
    }
}

/// `POST /shutdown` over RA-TLS; true when the agent acknowledged.
fn post_shutdown(client: &attestation::RaTlsHttpClient, port: u16) -> bool {
    let url = format!(
        "{}{}",
        crate::attest::base_url(port),
        worker_api::SHUTDOWN_PATH
    );
    match client.post_json(&url, b"", Duration::from_secs(10)) {
        Ok(r) if r.status == 200 => r
            .json::<worker_api::ShutdownAck>(&url)
            .map(|a| a.powering_off)
            .unwrap_or(true),
        _ => false,
    }
}

/// Sends QMP `quit` over the control socket.
pub fn qmp_quit(socket: &Path) -> Result<()> {
    let s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to QMP socket {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.contains("\"QMP\"") {
        bail!("unexpected QMP greeting: {line}");
    }
    for cmd in ["qmp_capabilities", "quit"] {
        writeln!(w, "{{\"execute\":\"{cmd}\"}}")?;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(()); // QEMU closed the socket: it is quitting.
            }
            if line.contains("\"return\"") {
                break;
            }
            if line.contains("\"error\"") {
                bail!("QMP {cmd} failed: {}", line.trim());
            }
        }
    }
    Ok(())
}

/// The last `n` lines of a (console) log, lossy UTF-8, without carriage returns.
pub fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    let Ok(bytes) = fs::read(path) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&bytes).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

fn log_contains(path: &Path, needle: &str) -> bool {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).contains(needle))
        .unwrap_or(false)
}

fn wait_timeout(child: &mut Child, t: Duration) -> Result<Option<ExitStatus>> {
    let end = Instant::now() + t;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= end {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops the guest: agent shutdown, then QMP quit, then kill. Returns QEMU's exit status and
/// how it was stopped.
fn stop(
    child: &mut Child,
    plan: &LaunchPlan,
    client: &attestation::RaTlsHttpClient,
    timeout: Duration,
) -> Result<(ExitStatus, &'static str)> {
    if let Some(s) = child.try_wait()? {
        return Ok((s, "already exited"));
    }
    eprintln!("host-launcher: asking the agent to power off (POST /shutdown)");
    if post_shutdown(client, plan.host_port)
        && let Some(s) = wait_timeout(child, timeout)?
    {
        return Ok((s, "agent powered off"));
    }
    eprintln!("host-launcher: guest still running; sending QMP quit");
    match qmp_quit(&plan.qmp_socket) {
        Err(e) => eprintln!("host-launcher: QMP quit failed: {e:#}"),
        Ok(()) => {
            if let Some(s) = wait_timeout(child, Duration::from_secs(10))? {
                return Ok((s, "QMP quit"));
            }
        }
    }
    eprintln!("host-launcher: QEMU did not quit; killing it");
    child.kill()?;
    Ok((child.wait()?, "killed"))
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => status.to_string(),
    }
}

fn failure_report(what: &str, plan: &LaunchPlan, qemu_log: &Path) -> anyhow::Error {
    let mut msg = format!("{what}\n");
    let qlog = tail_lines(qemu_log, 10);
    if !qlog.is_empty() {
        msg.push_str(&format!("--- QEMU said ({}) ---\n", qemu_log.display()));
        for l in qlog {
            msg.push_str(&format!("  {l}\n"));
        }
    }
    let con = tail_lines(&plan.console_log, 20);
    msg.push_str(&format!(
        "--- last {} console lines ({}) ---\n",
        con.len(),
        plan.console_log.display()
    ));
    for l in con {
        msg.push_str(&format!("  {l}\n"));
    }
    anyhow!(msg.trim_end().to_owned())
}

/// Boots the plan and supervises it until healthy (and then until a signal, or at once with
/// `exit_when_healthy`).
pub fn run(plan: &LaunchPlan, opts: &RunOptions) -> Result<()> {
    run_then(plan, opts, &mut |_| Ok(()))
}

/// [`run`], calling `while_healthy` with the agent's health once the guest is healthy and its
/// health checks passed, before waiting or stopping. An error from `while_healthy` stops the
/// guest cleanly and is returned.
pub fn run_then(
    plan: &LaunchPlan,
    opts: &RunOptions,
    while_healthy: &mut dyn FnMut(&Health) -> Result<()>,
) -> Result<()> {
    let stop_flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while the clean stop is under way exits at once (exit code 130); the
        // parent-death signal then stops QEMU.
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop_flag))
            .context("cannot install the signal handler")?;
        signal_hook::flag::register(sig, Arc::clone(&stop_flag))
            .context("cannot install the signal handler")?;
    }
    let argv = qemu::argv(plan);
    let qlog = fs::File::create(&opts.qemu_log)
        .with_context(|| format!("cannot create {}", opts.qemu_log.display()))?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(qlog.try_clone()?)
        .stderr(qlog)
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2), which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", argv[0]))?;
    eprintln!(
        "host-launcher: QEMU started (pid {}), tee {}, accelerator {}; console log: {}",
        child.id(),
        plan.tee,
        plan.accelerator(),
        plan.console_log.display()
    );

    // Before the agent says it is ready, a request to the forwarded port can hang (QEMU's user
    // network accepts at once and then waits for the guest): poll with a short timeout so the
    // moment of readiness is seen within about a second. Once the console shows the ready
    // marker, allow a slow (TCG, loaded host) answer more time.
    let quick = Duration::from_millis(1500);
    let patient = Duration::from_secs(10);
    let mut ready_seen = false;
    let mut last_error: String;
    let mut last_note = Instant::now();
    let health = loop {
        if let Some(status) = child.try_wait()? {
            return Err(failure_report(
                &format!(
                    "QEMU exited before the guest became healthy ({}) after {:.1} s",
                    describe(status),
                    started.elapsed().as_secs_f64()
                ),
                plan,
                &opts.qemu_log,
            ));
        }
        if stop_flag.load(Ordering::SeqCst) {
            let (s, how) = stop(&mut child, plan, &opts.client, opts.shutdown_timeout)?;
            bail!(
                "interrupted before the guest became healthy; QEMU stopped ({how}, {})",
                describe(s)
            );
        }
        ready_seen = ready_seen || log_contains(&plan.console_log, worker_api::READY_MARKER);
        let t = if ready_seen { patient } else { quick };
        match get_health(&opts.client, plan.host_port, t) {
            Poll::Healthy(h) => break *h,
            Poll::NotYet(why) => last_error = why,
            Poll::Rejected(v) => {
                let (s, how) = stop(&mut child, plan, &opts.client, opts.shutdown_timeout)?;
                return Err(failure_report(
                    &format!(
                        "{} (QEMU stopped: {how}, {})",
                        crate::attest::describe_rejection(&v),
                        describe(s)
                    ),
                    plan,
                    &opts.qemu_log,
                ));
            }
        }
        let elapsed = started.elapsed();
        if elapsed >= opts.health_timeout {
            let (s, how) = stop(&mut child, plan, &opts.client, Duration::from_secs(5))?;
            return Err(failure_report(
                &format!(
                    "the guest did not answer GET {} over RA-TLS on 127.0.0.1:{} within {} s \
                     (last error: {last_error}; QEMU stopped: {how}, {}); raise \
                     --health-timeout if the machine is slow",
                    worker_api::HEALTH_PATH,
                    plan.host_port,
                    opts.health_timeout.as_secs(),
                    describe(s)
                ),
                plan,
                &opts.qemu_log,
            ));
        }
        if last_note.elapsed() >= Duration::from_secs(5) {
            last_note = Instant::now();
            let ready = if ready_seen {
                "agent reported ready on the console"
            } else {
                "booting"
            };
            eprintln!(
                "host-launcher: waiting for health on 127.0.0.1:{} ... {} s ({ready})",
                plan.host_port,
                elapsed.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let boot_secs = started.elapsed().as_secs_f64();
    // A guest is only reported ready once it has proven what it runs.
    let verified = std::time::Instant::now();
    let verdict = match crate::attest::check_agent(&opts.client, plan.host_port, &opts.expected) {
        Ok(v) => v,
        Err(e) => {
            // A TD whose RTMR0 is not its shape's: say which ACPI blob and table differ.
            let why = opts
                .rtmr0_diag
                .as_ref()
                .map(|d| d.run(plan.host_port))
                .unwrap_or_default();
            let why = if why.is_empty() {
                String::new()
            } else {
                format!(
                    "\nRTMR0 diagnosis (the TD's ACPI tables against its launch shape's):\n  {}",
                    why.join("\n  ")
                )
            };
            let (s, how) = stop(&mut child, plan, &opts.client, opts.shutdown_timeout)?;
            bail!("{e:#}{why}\n(guest stopped: {how}, {})", describe(s));
        }
    };
    eprintln!(
        "host-launcher: attestation verified in {:.1} s: {}{}",
        verified.elapsed().as_secs_f64(),
        verdict.summary(),
        match (&opts.expected.image_hash_cw_v1, &verdict.rtmr3) {
            (Some(_), Some(r)) if r.host_config_checked =>
                "; image hash = booted image; RTMR3 log replays to the quote and covers the host config sent",
            (None, Some(r)) if r.host_config_checked =>
                "; image hash NOT checked (unknown); RTMR3 log replays to the quote and covers the host config sent",
            _ => "",
        }
    );
    if let Some(line) = &opts.verify_line {
        eprintln!("host-launcher: check it yourself: {line}");
    }
    let health = settle_model(
        &opts.client,
        plan.host_port,
        health,
        opts.health_timeout,
        &mut child,
    );
    let health = settle_approval(&opts.client, plan.host_port, health);
    let problems = check_health(&health, opts);
    if !opts.print_health {
        eprintln!(
            "host-launcher: guest healthy after {boot_secs:.1} s (agent on 127.0.0.1:{})",
            plan.host_port
        );
    } else if opts.json {
        println!("{}", serde_json::to_string(&health)?);
        eprintln!("host-launcher: guest healthy after {boot_secs:.1} s");
    } else {
        print_summary(
            &health,
            plan,
            boot_secs,
            &verdict,
            opts.verify_line.as_deref(),
        );
    }
    for p in &problems.warnings {
        eprintln!("host-launcher: warning: {p}");
    }
    if let Some(e) = problems.fatal {
        let (s, how) = stop(&mut child, plan, &opts.client, opts.shutdown_timeout)?;
        bail!("{e} (guest stopped: {how}, {})", describe(s));
    }
    if let Err(e) = while_healthy(&health) {
        let (s, how) = stop(&mut child, plan, &opts.client, opts.shutdown_timeout)?;
        bail!("{e:#} (guest stopped: {how}, {})", describe(s));
    }

    if !opts.exit_when_healthy {
        eprintln!(
            "host-launcher: running; press Ctrl-C to stop the guest cleanly (twice to force)"
        );
        loop {
            if let Some(status) = child.try_wait()? {
                if status.success() {
                    eprintln!(
                        "host-launcher: the guest powered off ({})",
                        describe(status)
                    );
                    return Ok(());
                }
                return Err(failure_report(
                    &format!("QEMU exited unexpectedly ({})", describe(status)),
                    plan,
                    &opts.qemu_log,
                ));
            }
            if stop_flag.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let (status, how) = stop(&mut child, plan, &opts.client, opts.shutdown_timeout)?;
    eprintln!(
        "host-launcher: guest stopped ({how}, QEMU {}) after {:.1} s in all",
        describe(status),
        started.elapsed().as_secs_f64()
    );
    if how == "killed" || !status.success() {
        bail!(
            "the guest did not stop cleanly ({how}, {})",
            describe(status)
        );
    }
    Ok(())
}

/// How long to wait for the agent's first approval check (two get-methods, each with bounded
/// retries) before reporting what `/health` says.
const APPROVAL_SETTLE: Duration = Duration::from_secs(30);

/// While the agent's approval check is still "checking", polls `/health` (up to
/// [`APPROVAL_SETTLE`]) so the report shows the settled state.
fn settle_approval(client: &attestation::RaTlsHttpClient, port: u16, first: Health) -> Health {
    let checking =
        |h: &Health| matches!(&h.approval, Some(a) if a.state == worker_api::APPROVAL_CHECKING);
    let deadline = Instant::now() + APPROVAL_SETTLE;
    let mut h = first;
    while checking(&h) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        if let Poll::Healthy(next) = get_health(client, port, Duration::from_secs(10)) {
            h = *next;
        }
    }
    h
}

/// While the agent is still loading its model (a dm-verity disk loads in the background),
/// polls `/health` until it serves or fails, printing the progress every 10 s; gives up after
/// `timeout` (the report then shows the state reached) or when QEMU exits.
fn settle_model(
    client: &attestation::RaTlsHttpClient,
    port: u16,
    first: Health,
    timeout: Duration,
    child: &mut std::process::Child,
) -> Health {
    let loading = |h: &Health| {
        h.model
            .as_ref()
            .and_then(|m| m.load.as_ref())
            .is_some_and(|l| l.state == worker_api::MODEL_LOADING)
    };
    let deadline = Instant::now() + timeout;
    let mut last_print = Instant::now();
    let mut h = first;
    while loading(&h) && Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            if let Some(l) = h.model.as_ref().and_then(|m| m.load.as_ref()) {
                eprintln!("host-launcher: {}", describe_load(l));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        if let Poll::Healthy(next) = get_health(client, port, Duration::from_secs(10)) {
            h = *next;
        }
    }
    h
}

/// One line describing a model load.
fn describe_load(l: &worker_api::ModelLoad) -> String {
    format!(
        "model {} via {} into {}: {} of {} MiB verified ({} %) in {:.1} s, {:.1} MiB/s, agent peak RSS {} MiB, guest memory in use at most {} MiB",
        l.state,
        l.source,
        l.backend,
        l.bytes_verified >> 20,
        l.bytes_total >> 20,
        (l.bytes_verified.saturating_mul(100) / l.bytes_total.max(1)).min(100),
        l.elapsed_ms as f64 / 1000.0,
        l.bytes_per_sec as f64 / 1048576.0,
        l.peak_rss_bytes >> 20,
        l.guest_mem_peak_bytes >> 20
    )
}

/// One line describing the agent's root-contract approval.
fn describe_approval(h: &Health) -> String {
    match &h.approval {
        None => "not reported (older agent)".into(),
        Some(a) => match &a.reason {
            Some(r) if a.state != worker_api::APPROVAL_NOT_CONFIGURED => {
                format!("{}: {r}", a.state)
            }
            _ => a.state.clone(),
        },
    }
}

#[derive(Debug, Default)]
struct HealthProblems {
    warnings: Vec<String>,
    fatal: Option<String>,
}

/// Compares the health answer with what the launcher booted and sent.
fn check_health(h: &Health, opts: &RunOptions) -> HealthProblems {
    let mut p = HealthProblems::default();
    if h.status != "ok" {
        p.warnings
            .push(format!("agent status is {:?}, not \"ok\"", h.status));
    }
    if h.image != opts.expected_image {
        p.warnings.push(format!(
            "the guest reports image {} {}, but manifest.json says {} {}",
            h.image.name, h.image.version, opts.expected_image.name, opts.expected_image.version
        ));
    }
    if let Some(a) = &h.approval
        && a.state != worker_api::APPROVAL_APPROVED
        && a.state != worker_api::APPROVAL_NOT_CONFIGURED
    {
        p.warnings.push(format!(
            "the guest does not serve inference: approval {}",
            describe_approval(h)
        ));
    }
    let sent = hex::encode(Sha384::digest(&opts.host_config));
    match &h.host_config {
        None => p
            .warnings
            .push("the agent reports no host config: it did not read the fw_cfg file".to_owned()),
        Some(c) if c.sha384 != sent => {
            p.fatal = Some(format!(
                "the agent received a different host config (sha384 {}, sent {sent}): refusing \
                 to serve with a config the owner did not choose",
                c.sha384
            ));
        }
        Some(c) => {
            if let Some(err) = &c.error {
                p.fatal = Some(format!(
                    "the agent rejected the host config ({err}): fix the settings and run again"
                ));
            }
        }
    }
    if let Some(m) = &h.model {
        if let Some(err) = &m.error {
            p.fatal = Some(format!(
                "the guest refused to serve model {} ({err}): {}",
                m.name,
                if m.root_hash.is_some() {
                    "check --model-disk (model.img and model.json as `cargo xtask model pack` \
                     wrote them)"
                } else {
                    "check --model and --model-sha256"
                }
            ));
        } else if let Some(l) = m
            .load
            .as_ref()
            .filter(|l| l.state == worker_api::MODEL_LOADING)
        {
            p.fatal = Some(format!(
                "the guest was still loading model {} when the health timeout ran out ({}): \
                 raise --health-timeout",
                m.name,
                describe_load(l)
            ));
        }
    }
    p
}

fn print_summary(
    h: &Health,
    plan: &LaunchPlan,
    boot_secs: f64,
    verdict: &attestation::Verdict,
    verify_line: Option<&str>,
) {
    println!("guest healthy after {boot_secs:.1} s");
    println!("  image:        {} {}", h.image.name, h.image.version);
    println!("  agent:        {}", h.agent_version);
    println!("  accelerator:  {}", plan.accelerator());
    println!(
        "  tee:          {} (tdx_guest device: {}, configfs-tsm: {}, RTMR3 sysfs: {})",
        h.tee.kind, h.tee.tdx_guest_device, h.tee.configfs_tsm, h.tee.rtmr3_sysfs
    );
    println!(
        "  host config:  {}",
        h.host_config.as_ref().map_or("none", |c| c.sha384.as_str())
    );
    if let Some(m) = &h.model {
        match &m.root_hash {
            Some(root) => println!(
                "  model:        {} (dm-verity root hash {root}, model hash {}, {})",
                m.name,
                m.sha256,
                if m.serving { "serving" } else { "not served" }
            ),
            None => println!(
                "  model:        {} (sha256 {}, {})",
                m.name,
                m.sha256,
                if m.serving { "serving" } else { "not served" }
            ),
        }
        if let Some(l) = &m.load {
            println!("  model load:   {}", describe_load(l));
        }
    }
    if let Some(g) = &h.gpu {
        println!("  gpu:          {}", g.summary);
    }
    println!("  attestation:  {}", verdict.summary());
    println!("  approval:     {}", describe_approval(h));
    println!(
        "  agent URL:    {}{} (RA-TLS)",
        crate::attest::base_url(plan.host_port),
        worker_api::HEALTH_PATH
    );
    if let Some(l) = verify_line {
        println!("  verify:       {l}");
    }
    println!("  console log:  {}", plan.console_log.display());
    println!("  QMP socket:   {}", plan.qmp_socket.display());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use worker_api::{HostConfigStatus, ImageRelease, TeeStatus};

    fn opts(cfg: &[u8]) -> RunOptions {
        RunOptions {
            health_timeout: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(1),
            exit_when_healthy: true,
            json: true,
            qemu_log: "/nonexistent".into(),
            host_config: cfg.to_vec(),
            expected_image: ImageRelease {
                name: "worker".into(),
                version: "0.1.0".into(),
            },
            print_health: true,
            client: attestation::RaTlsHttpClient::new(attestation::Verifier::new(
                attestation::Policy::default(),
                std::sync::Arc::new(attestation::NoCollateral),
            )),
            expected: crate::attest::Expected {
                image_hash_cw_v1: None,
                image_hash_note: None,
            },
            verify_line: None,
            rtmr0_diag: None,
        }
    }

    fn health(sha: Option<String>) -> Health {
        Health {
            status: "ok".into(),
            image: ImageRelease {
                name: "worker".into(),
                version: "0.1.0".into(),
            },
            agent_version: "0.1.0".into(),
            tee: TeeStatus {
                tdx_guest_device: false,
                configfs_tsm: false,
                rtmr3_sysfs: false,
                kind: "none".into(),
                rtmr3_error: None,
            },
            uptime_secs: 3,
            gpu: None,
            approval: None,
            host_config: sha.map(|sha384| HostConfigStatus {
                sha384,
                error: None,
            }),
            model: None,
        }
    }

    #[test]
    fn health_is_checked_against_what_was_sent() {
        let cfg = b"{\"model\":null}";
        let good = hex::encode(Sha384::digest(cfg));
        let p = check_health(&health(Some(good)), &opts(cfg));
        assert!(p.warnings.is_empty() && p.fatal.is_none(), "{p:?}");
        let p = check_health(&health(Some("00".into())), &opts(cfg));
        assert!(p.fatal.unwrap().contains("different host config"));
        let mut h = health(Some(hex::encode(Sha384::digest(cfg))));
        if let Some(c) = h.host_config.as_mut() {
            c.error = Some("unknown field `x`".into());
        }
        let p = check_health(&h, &opts(cfg));
        assert!(
            p.fatal
                .unwrap()
                .contains("rejected the host config (unknown field")
        );
        let p = check_health(&health(None), &opts(cfg));
        assert!(p.fatal.is_none() && p.warnings[0].contains("no host config"));
        let mut h = health(None);
        h.image.version = "9.9.9".into();
        let p = check_health(&h, &opts(cfg));
        assert!(p.warnings.iter().any(|w| w.contains("9.9.9")), "{p:?}");
        let mut h = health(Some(hex::encode(Sha384::digest(cfg))));
        h.model = Some(worker_api::ModelStatus {
            root_hash: None,
            load: None,
            batch: None,
            name: "m".into(),
            sha256: "00".repeat(32),
            serving: false,
            error: Some("model sha256 mismatch".into()),
        });
        let p = check_health(&h, &opts(cfg));
        assert!(
            p.fatal
                .unwrap()
                .contains("refused to serve model m (model sha256 mismatch")
        );
    }

    #[test]
    fn unapproved_guests_are_reported() {
        let cfg = b"{}";
        let mut h = health(Some(hex::encode(Sha384::digest(cfg))));
        assert_eq!(describe_approval(&h), "not reported (older agent)");
        let status = |state: &str, reason: Option<&str>| worker_api::ApprovalStatus {
            state: state.into(),
            root: Some("EQroot".into()),
            image_hash: None,
            model_hash: None,
            checked_at: None,
            reason: reason.map(str::to_owned),
        };
        h.approval = Some(status(worker_api::APPROVAL_NOT_CONFIGURED, Some("no root")));
        assert_eq!(describe_approval(&h), "not_configured");
        assert!(check_health(&h, &opts(cfg)).warnings.is_empty());
        h.approval = Some(status(worker_api::APPROVAL_APPROVED, None));
        assert!(check_health(&h, &opts(cfg)).warnings.is_empty());
        h.approval = Some(status(
            worker_api::APPROVAL_NOT_APPROVED,
            Some("image hash ab is not approved"),
        ));
        let p = check_health(&h, &opts(cfg));
        assert!(p.fatal.is_none(), "the guest itself refuses to serve");
        assert_eq!(
            p.warnings,
            [
                "the guest does not serve inference: approval not_approved: image hash ab is not approved"
            ]
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.log");
        let text: String = (1..=30).map(|i| format!("line {i}\r\n")).collect();
        fs::write(&f, text).unwrap();
        let t = tail_lines(&f, 20);
        assert_eq!(t.len(), 20);
        assert_eq!((t[0].as_str(), t[19].as_str()), ("line 11", "line 30"));
        assert!(tail_lines(&d.path().join("none"), 20).is_empty());
    }

    #[test]
    fn missing_qemu_says_how_to_install() {
        let e = check_qemu(
            Path::new("/nonexistent/qemu-system-x86_64"),
            crate::settings::Tee::None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("install qemu-system-x86 from bookworm-backports"),
            "{e}"
        );
        assert!(e.contains("QEMU >= 10.1 for --tee tdx"), "{e}");
    }

    #[test]
    fn qmp_quit_speaks_the_protocol() {
        use std::os::unix::net::UnixListener;
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("qmp.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut got = Vec::new();
            for _ in 0..2 {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                got.push(line.trim().to_owned());
                writeln!(w, r#"{{"event": "X"}}"#).unwrap();
                writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            }
            got
        });
        qmp_quit(&sock).unwrap();
        assert_eq!(
            server.join().unwrap(),
            [r#"{"execute":"qmp_capabilities"}"#, r#"{"execute":"quit"}"#]
        );
    }
}
