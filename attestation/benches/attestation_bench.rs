//! Benchmark (no criterion): quote verification latency with cached vs re-parsed collateral,
//! verifications per second, RA-TLS certificate issuance and handshake latency.
//! Run: `cargo bench -p attestation --bench attestation_bench` (set SHARED_FIXTURES to move the fixtures).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use attestation::collateral::{FileCollateral, parse_collateral_json, parse_rfc3339};
use attestation::tls::{
    RaTlsCertResolver, RaTlsClientVerifier, RaTlsServerVerifier, client_config,
    handshake_in_memory, server_config,
};
use attestation::{Policy, RaTlsIdentity, SimulatedTee, TdRegisters, Verifier};

fn time<F: FnMut() -> bool>(iters: u32, mut f: F) -> Duration {
    for _ in 0..iters.min(5) {
        assert!(f(), "benchmark body failed during warm-up");
    }
    let start = Instant::now();
    for _ in 0..iters {
        assert!(f(), "benchmark body failed");
    }
    start.elapsed() / iters
}

fn row(name: &str, d: Duration) {
    println!(
        "| {name:<58} | {:>10.1} | {:>10.0} |",
        d.as_secs_f64() * 1e6,
        1.0 / d.as_secs_f64()
    );
}

fn main() {
    let iters: u32 = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    println!(
        "| {:<58} | {:>10} | {:>10} |",
        "operation", "mean µs", "per second"
    );
    println!("|{}|{}|{}|", "-".repeat(60), "-".repeat(12), "-".repeat(12));

    let dir = std::env::var_os("SHARED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        })
        .join("quotes");
    match (
        std::fs::read(dir.join("dcap-qvl-tdx_quote")),
        std::fs::read_to_string(dir.join("dcap-qvl-tdx_quote_collateral.json")),
    ) {
        (Ok(quote), Ok(json)) => {
            let at = parse_rfc3339("2025-07-01T00:00:00Z").unwrap_or(0);
            let collateral =
                parse_collateral_json(&json, "bench").expect("fixture collateral parses");
            let cached = Verifier::new(
                Policy::default(),
                Arc::new(FileCollateral::from_collateral(collateral)),
            );
            let d = time(iters, || cached.verify_quote(&quote, None, at).accepted);
            row("real TDX v4 quote, cached collateral (ring)", d);
            let rc = cached
                .clone()
                .with_backend(attestation::verify::CryptoBackend::RustCrypto);
            let d = time(iters, || rc.verify_quote(&quote, None, at).accepted);
            row("real TDX v4 quote, cached collateral (RustCrypto)", d);
            let d = time(iters, || {
                let c = parse_collateral_json(&json, "bench").expect("parse");
                Verifier::new(
                    Policy::default(),
                    Arc::new(FileCollateral::from_collateral(c)),
                )
                .verify_quote(&quote, None, at)
                .accepted
            });
            row(
                "real TDX v4 quote, collateral re-parsed each time (ring)",
                d,
            );
            let d = time(iters, || parse_collateral_json(&json, "bench").is_ok());
            row("collateral JSON parse alone", d);
        }
        _ => println!(
            "SKIPPED: fixtures not found in {} (real-quote rows)",
            dir.display()
        ),
    }

    let now = attestation::verify::unix_secs(std::time::SystemTime::now());
    let tee = SimulatedTee::from_seed(&[5; 32], TdRegisters::default()).expect("tee");
    let verifier = Verifier::simulated(Policy::default().with_simulated(true), tee.public_key());
    let id = RaTlsIdentity::generate(&tee, now).expect("identity");
    let d = time(iters, || RaTlsIdentity::generate(&tee, now).is_ok());
    row(
        "RA-TLS identity issue (Ed25519 keygen + sim quote + cert)",
        d,
    );
    let d = time(iters, || {
        attestation::ratls::verify_certificate(&verifier, &id.cert_der, 1, now).accepted
    });
    row("RA-TLS certificate verification (simulated quote)", d);

    let server_res = Arc::new(RaTlsCertResolver::new(id.clone()).expect("resolver"));
    let client_res = Arc::new(
        RaTlsCertResolver::new(RaTlsIdentity::generate(&tee, now).expect("id")).expect("resolver"),
    );
    let server = Arc::new(server_config(server_res.clone(), None).expect("server"));
    let client = Arc::new(
        client_config(Arc::new(RaTlsServerVerifier::new(verifier.clone())), None).expect("client"),
    );
    let d = time(iters, || {
        handshake_in_memory(client.clone(), server.clone()).is_ok()
    });
    row("RA-TLS TLS 1.3 handshake in memory (server auth)", d);
    let mserver = Arc::new(
        server_config(
            server_res,
            Some(Arc::new(RaTlsClientVerifier::new(verifier.clone()))),
        )
        .expect("server"),
    );
    let mclient = Arc::new(
        client_config(
            Arc::new(RaTlsServerVerifier::new(verifier)),
            Some(client_res),
        )
        .expect("client"),
    );
    let d = time(iters, || {
        handshake_in_memory(mclient.clone(), mserver.clone()).is_ok()
    });
    row("RA-TLS TLS 1.3 handshake in memory (mutual)", d);

    // Full RA-TLS request over loopback TCP as a client makes it: connect, TLS 1.3 handshake with
    // the certificate's quote verified, one HTTP/1.1 GET, close.
    let port = spawn_https_server(server);
    let http = attestation::RaTlsHttpClient::new(Verifier::simulated(
        Policy::default().with_simulated(true),
        tee.public_key(),
    ));
    let url = format!("https://127.0.0.1:{port}/health");
    let d = time(iters, || {
        http.get(&url, Duration::from_secs(10))
            .is_ok_and(|r| r.status == 200)
    });
    row("RA-TLS GET over loopback TCP (connect+handshake+HTTP)", d);
}

/// A loopback RA-TLS server answering every connection with `200 ok` (for the TCP row).
fn spawn_https_server(cfg: Arc<rustls::ServerConfig>) -> u16 {
    use std::io::{Read as _, Write as _};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for sock in l.incoming() {
            let Ok(sock) = sock else { continue };
            let Ok(conn) = rustls::ServerConnection::new(cfg.clone()) else {
                continue;
            };
            let mut s = rustls::StreamOwned::new(conn, sock);
            let mut req = Vec::new();
            let mut buf = [0u8; 2048];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    });
    port
}
