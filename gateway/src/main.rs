//! `gateway`: the OpenAI API on this machine, every request forwarded over verified RA-TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use gateway::chain::{BlockingView, ChainList, FreshView};
use gateway::check::Verification;
use gateway::trust::TrustArgs;
use gateway::{Gateway, Options, log};

const EXAMPLES: &str = "\
Example (a worker started with `host-launcher run --tee none`, checked against a local chain):
  gateway --listen 127.0.0.1:8080 --worker https://127.0.0.1:18443 \\
      --allow-simulated --simulated-key @RUN/simulated-tee.pub --root EQ... --rpc http://127.0.0.1:8081/api/v2
  then any OpenAI SDK: base_url=http://127.0.0.1:8080/v1 (any API key).
GET /gateway/workers shows each worker's verdict with its reasons; GET /metrics is Prometheus text.";

/// A verifying OpenAI-compatible gateway in front of confidential workers.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, after_help = EXAMPLES)]
struct Cli {
    /// Where OpenAI clients connect (plain HTTP unless --tls-cert; loopback unless
    /// --allow-remote-clients).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// A worker's RA-TLS endpoint (repeatable).
    #[arg(long = "worker", required = true, value_name = "https://HOST:PORT")]
    workers: Vec<String>,
    #[command(flatten)]
    trust: TrustArgs,
    /// Serve clients over TLS with this certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Accept clients from other machines (then use --tls-cert: prompts travel to the gateway
    /// in clear otherwise).
    #[arg(long)]
    allow_remote_clients: bool,
    /// Seconds between two verifications of each worker (at most half of --max-age with --root).
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    check_interval: u64,
    /// Seconds a worker's complete verification (RTMR3 log, model hash) is trusted without a
    /// newer one (default: --max-age with --root, else 3 check intervals).
    #[arg(long, value_name = "SECS")]
    verdict_ttl: Option<u64>,
    /// Most requests in flight per worker; more wait in the gateway (the agent itself queues 8).
    #[arg(long, default_value_t = 8, value_name = "N")]
    max_in_flight: usize,
    /// Seconds a request may wait for a free worker before 429.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    queue_timeout: u64,
    /// Seconds for a whole non-streamed request, or a stream's first token.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    request_timeout: u64,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
    max_body: usize,
    /// Seconds a client has to send a request head (idle connections are closed after it) and,
    /// for --tls-cert, the TLS handshake.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    header_timeout: u64,
    /// Seconds for each request of a verification (handshake, /attestation, /v1/models).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    verify_timeout: u64,
}

/// Raise the soft open-files limit to the hard one: every client and worker connection is a
/// descriptor.
fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Binds with a backlog of 4096 (the default 128 makes bursts of clients wait for SYN
/// retransmissions).
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{} is not a PEM private key", key.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(attestation::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the --tls-cert and --tls-key do not form a usable pair")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if !cli.listen.ip().is_loopback() && !cli.allow_remote_clients {
        bail!(
            "--listen {} is not a loopback address: clients' prompts would reach the gateway \
             unprotected over the network; listen on 127.0.0.1, or pass --allow-remote-clients \
             (with --tls-cert/--tls-key)",
            cli.listen
        );
    }
    raise_nofile();
    let max_age = Duration::from_secs(cli.trust.chain.max_age);
    let image_list = cli
        .trust
        .chain
        .root_list(ton_root::HashKind::Image, max_age)?
        .map(|l| Arc::new(ChainList::from_root("image", l, max_age)));
    let model_list = cli
        .trust
        .chain
        .root_list(ton_root::HashKind::Model, max_age)?
        .map(|l| Arc::new(ChainList::from_root("model", l, max_age)));
    let blocking = cli
        .trust
        .verifier(image_list.clone().map(|l| Arc::new(BlockingView(l)) as _))?;
    let fresh = cli
        .trust
        .verifier(image_list.clone().map(|l| Arc::new(FreshView(l)) as _))?;
    let mut interval = Duration::from_secs(cli.check_interval.max(1));
    if image_list.is_some() && max_age >= Duration::from_secs(2) {
        interval = interval.min(max_age / 2);
    }
    let ttl = match (cli.verdict_ttl, &image_list) {
        (Some(s), _) => Duration::from_secs(s),
        (None, Some(_)) => max_age.max(interval * 2),
        (None, None) => interval * 3,
    };
    let opts = Options {
        max_in_flight: cli.max_in_flight,
        check_interval: interval,
        verdict_ttl: ttl,
        request_timeout: Duration::from_secs(cli.request_timeout),
        queue_timeout: Duration::from_secs(cli.queue_timeout),
        max_body: cli.max_body,
        header_timeout: Duration::from_secs(cli.header_timeout.max(1)),
        ..Options::default()
    };
    let header_timeout = opts.header_timeout;
    let verification = Verification {
        verifier: blocking,
        models: model_list,
        timeout: Duration::from_secs(cli.verify_timeout.max(1)),
        client_identity: cli.trust.client_identity()?,
    };
    let gw = Gateway::new(&cli.workers, fresh, verification, opts).map_err(anyhow::Error::msg)?;
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gateway")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = bind(cli.listen)
            .with_context(|| format!("cannot listen on {} (in use? pass --listen ADDR:PORT)", cli.listen))?;
        let local = listener.local_addr()?;
        log!(
            "verifying {} worker(s) every {} s (verdicts trusted for {} s{})",
            cli.workers.len(),
            interval.as_secs(),
            ttl.as_secs(),
            if image_list.is_some() { ", image and model hashes from the root contract" } else { "" }
        );
        gw.check_all().await;
        gw.spawn_checks();
        let scheme = if tls.is_some() { "https" } else { "http" };
        log!("ready: OpenAI API on {scheme}://{local}/v1 (workers: {scheme}://{local}/gateway/workers)");
        gateway::server::serve(listener, gw.router(), tls, header_timeout, shutdown_signal()).await;
        log!("stopping");
        Ok(())
    })
}
