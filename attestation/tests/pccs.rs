//! `PccsCollateral` against a mock PCS (v4 API) on 127.0.0.1 that serves the pieces of a real
//! fixture collateral the way Intel's PCS / a PCCS does (signed JSON bodies, URL-encoded issuer
//! chains in headers, DER PCK CRL, hex root CA CRL): the real quote must verify exactly as with
//! `FileCollateral`, later runs come from the cache, offline mode never connects, and every server
//! failure is an error naming the URL. Skips visibly when the fixtures are missing.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use attestation::collateral::{
    CollateralSource, FileCollateral, PccsCollateral, PccsConfig, QuoteCollateralV3,
    parse_collateral_json, parse_rfc3339,
};
use attestation::{Policy, Verifier};

const QUOTE: &str = "dcap-qvl-tdx_quote";
const AT: &str = "2025-07-01T00:00:00Z";

fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var_os("SHARED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        });
    if dir.join("quotes").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: shared fixtures not found at {} (set SHARED_FIXTURES)",
            dir.display()
        );
        None
    }
}

fn load(dir: &Path) -> (Vec<u8>, QuoteCollateralV3) {
    let q = std::fs::read(dir.join("quotes").join(QUOTE)).unwrap();
    let c = std::fs::read_to_string(dir.join("quotes").join(format!("{QUOTE}_collateral.json")))
        .unwrap();
    (q, parse_collateral_json(&c, QUOTE).unwrap())
}

/// What the mock answers for a path+query: status, headers, body.
type Reply = (u16, Vec<(String, String)>, Vec<u8>);

/// A tiny HTTP/1.1 server on 127.0.0.1 (one request per connection).
struct MockPcs {
    url: String,
    routes: Arc<Mutex<BTreeMap<String, Reply>>>,
    hits: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    port: u16,
    thread: Option<JoinHandle<()>>,
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl MockPcs {
    /// Serve `c` for the FMSPC in its TCB info.
    fn serving(c: &QuoteCollateralV3) -> Self {
        let fmspc = serde_json::from_str::<serde_json::Value>(&c.tcb_info).unwrap()["fmspc"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut routes = BTreeMap::new();
        let h = |k: &str, v: &str| vec![(k.to_owned(), percent_encode(v))];
        routes.insert(
            format!("/tdx/certification/v4/tcb?fmspc={fmspc}"),
            (
                200,
                h("TCB-Info-Issuer-Chain", &c.tcb_info_issuer_chain),
                format!(
                    r#"{{"tcbInfo":{},"signature":"{}"}}"#,
                    c.tcb_info,
                    hex::encode(&c.tcb_info_signature)
                )
                .into_bytes(),
            ),
        );
        routes.insert(
            "/tdx/certification/v4/qe/identity".to_owned(),
            (
                200,
                h(
                    "SGX-Enclave-Identity-Issuer-Chain",
                    &c.qe_identity_issuer_chain,
                ),
                format!(
                    r#"{{"enclaveIdentity":{},"signature":"{}"}}"#,
                    c.qe_identity,
                    hex::encode(&c.qe_identity_signature)
                )
                .into_bytes(),
            ),
        );
        routes.insert(
            "/sgx/certification/v4/pckcrl?ca=platform&encoding=der".to_owned(),
            (
                200,
                h("SGX-PCK-CRL-Issuer-Chain", &c.pck_crl_issuer_chain),
                c.pck_crl.clone(),
            ),
        );
        // A PCCS answers the root CA CRL as hex text.
        routes.insert(
            "/sgx/certification/v4/rootcacrl".to_owned(),
            (200, vec![], hex::encode(&c.root_ca_crl).into_bytes()),
        );
        Self::start(routes)
    }

    fn start(routes: BTreeMap<String, Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes = Arc::new(Mutex::new(routes));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, hi, st) = (routes.clone(), hits.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    serve(conn, &r, &hi);
                }
            }
        });
        Self {
            url: format!("http://127.0.0.1:{port}"),
            routes,
            hits,
            stop,
            port,
            thread: Some(thread),
        }
    }

    fn hits(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    fn set(&self, path: &str, reply: Reply) {
        self.routes.lock().unwrap().insert(path.to_owned(), reply);
    }

    /// Stop accepting; afterwards nothing listens on the port.
    fn shutdown(mut self) -> String {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.url.clone()
    }
}

fn serve(conn: TcpStream, routes: &Mutex<BTreeMap<String, Reply>>, hits: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
    }
    hits.lock().unwrap().push(target.clone());
    let (status, headers, body) = routes.lock().unwrap().get(&target).cloned().unwrap_or((
        404,
        vec![],
        b"no such resource".to_vec(),
    ));
    let mut out = conn;
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = out.write_all(head.as_bytes());
    let _ = out.write_all(&body);
}

fn pccs(url: Option<&str>, cache: Option<&Path>, offline: bool) -> PccsCollateral {
    PccsCollateral::new(PccsConfig {
        base_url: url.map(str::to_owned),
        cache_dir: cache.map(Path::to_path_buf),
        offline,
        timeout: Duration::from_secs(10),
        ..PccsConfig::default()
    })
    .unwrap()
    .at_time(parse_rfc3339(AT).unwrap())
}

fn verify(source: impl CollateralSource + 'static, q: &[u8]) -> attestation::Verdict {
    Verifier::new(Policy::default(), Arc::new(source)).verify_quote(
        q,
        None,
        parse_rfc3339(AT).unwrap(),
    )
}

#[test]
fn fetched_collateral_verifies_like_the_file_then_comes_from_the_cache() {
    let Some(dir) = fixtures() else { return };
    let (q, c) = load(&dir);
    let server = MockPcs::serving(&c);
    let cache = tempfile::tempdir().unwrap();

    let source = pccs(Some(&server.url), Some(cache.path()), false);
    let fetched = source.collateral_for(&q).unwrap();
    assert_eq!(
        serde_json::to_value(&*fetched).unwrap(),
        serde_json::to_value(&c).unwrap(),
        "the fetched pieces reassemble the fixture collateral byte for byte"
    );
    assert_eq!(
        server.hits(),
        4,
        "TCB info, QE identity, PCK CRL, root CA CRL"
    );

    let via_pccs = verify(source, &q);
    assert!(via_pccs.accepted, "{:?}", via_pccs.reasons);
    let via_file = verify(FileCollateral::from_collateral(c.clone()), &q);
    assert_eq!(
        via_pccs, via_file,
        "same verdict as with the collateral file"
    );
    assert_eq!(via_pccs.tcb_status.as_deref(), Some("UpToDate"));

    let files: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, ["tdx-B0C06F000000-platform.json"]);

    // Second run: the server is gone, the cache answers (online mode) ...
    let url = server.shutdown();
    let again = verify(pccs(Some(&url), Some(cache.path()), false), &q);
    assert_eq!(again, via_file);
    // ... and offline mode needs no URL at all.
    let offline = verify(pccs(None, Some(cache.path()), true), &q);
    assert_eq!(offline, via_file);
}

#[test]
fn offline_without_a_cache_entry_is_a_clear_error() {
    let Some(dir) = fixtures() else { return };
    let (q, _) = load(&dir);
    let cache = tempfile::tempdir().unwrap();
    let err = pccs(None, Some(cache.path()), true)
        .collateral_for(&q)
        .unwrap_err()
        .to_string();
    assert!(err.contains("offline"), "{err}");
    assert!(err.contains("B0C06F000000"), "names the FMSPC: {err}");
    assert!(
        err.contains("--pccs-url"),
        "says how to fill the cache: {err}"
    );
    assert!(
        std::fs::read_dir(cache.path()).unwrap().next().is_none(),
        "nothing written"
    );
    // The verifier turns it into a rejection carrying the same message.
    let v = verify(pccs(None, Some(cache.path()), true), &q);
    assert!(!v.accepted);
    assert!(
        v.reasons.iter().any(|r| r.message.contains("offline")),
        "{:?}",
        v.reasons
    );
}

#[test]
fn server_failures_name_the_url() {
    let Some(dir) = fixtures() else { return };
    let (q, c) = load(&dir);
    let server = MockPcs::serving(&c);
    let tcb = "/tdx/certification/v4/tcb?fmspc=B0C06F000000";
    let cases: [(Reply, &str, &str); 4] = [
        ((404, vec![], b"not here".to_vec()), tcb, "HTTP 404"),
        ((500, vec![], b"internal".to_vec()), tcb, "HTTP 500"),
        (
            (
                200,
                vec![("TCB-Info-Issuer-Chain".into(), "x".into())],
                b"<html>garbage</html>".to_vec(),
            ),
            tcb,
            "not JSON",
        ),
        (
            (200, vec![], br#"{"tcbInfo":{},"signature":"00"}"#.to_vec()),
            tcb,
            "lacks the TCB-Info-Issuer-Chain header",
        ),
    ];
    for (reply, path, want) in cases {
        let good = server.routes.lock().unwrap().get(path).cloned().unwrap();
        server.set(path, reply);
        let cache = tempfile::tempdir().unwrap();
        let err = pccs(Some(&server.url), Some(cache.path()), false)
            .collateral_for(&q)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{}{path}", server.url)), "{err}");
        assert!(err.contains(want), "{want}: {err}");
        assert!(
            std::fs::read_dir(cache.path()).unwrap().next().is_none(),
            "a failed fetch caches nothing"
        );
        server.set(path, good);
    }
    // A garbage PCK CRL.
    let crl = "/sgx/certification/v4/pckcrl?ca=platform&encoding=der";
    let mut bad = server.routes.lock().unwrap().get(crl).cloned().unwrap();
    bad.2 = b"definitely not a CRL".to_vec();
    server.set(crl, bad);
    let err = pccs(Some(&server.url), None, false)
        .collateral_for(&q)
        .unwrap_err()
        .to_string();
    assert!(err.contains(crl) && err.contains("CRL"), "{err}");
    // Nothing listening.
    let url = server.shutdown();
    let err = pccs(Some(&url), None, false)
        .collateral_for(&q)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&url), "{err}");
}

#[test]
fn stale_cache_entries_are_fetched_again() {
    let Some(dir) = fixtures() else { return };
    let (q, c) = load(&dir);
    let server = MockPcs::serving(&c);
    let cache = tempfile::tempdir().unwrap();
    pccs(Some(&server.url), Some(cache.path()), false)
        .collateral_for(&q)
        .unwrap();
    assert_eq!(server.hits(), 4);
    pccs(Some(&server.url), Some(cache.path()), false)
        .collateral_for(&q)
        .unwrap();
    assert_eq!(server.hits(), 4, "fresh entry: no request");

    // Verification time after the collateral's nextUpdate: expired, fetched again.
    let later = parse_rfc3339("2025-08-01T00:00:00Z").unwrap();
    let src = pccs(Some(&server.url), Some(cache.path()), false).at_time(later);
    src.collateral_for(&q).unwrap();
    assert_eq!(server.hits(), 8, "expired entry refetched");
    // Offline, the same expired entry is refused with the window in the message.
    let err = pccs(None, Some(cache.path()), true)
        .at_time(later)
        .collateral_for(&q)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2025-07-19") && err.contains("offline"),
        "{err}"
    );

    // An entry older than the maximum age is fetched again.
    let file = cache.path().join("tdx-B0C06F000000-platform.json");
    let mut entry: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    entry["fetched_at"] = 1_000.into();
    std::fs::write(&file, entry.to_string()).unwrap();
    pccs(Some(&server.url), Some(cache.path()), false)
        .collateral_for(&q)
        .unwrap();
    assert_eq!(server.hits(), 12, "too old: refetched");
    // A corrupt cache file: offline it is an error that says to delete it; online it is
    // fetched again and overwritten.
    std::fs::write(&file, "{").unwrap();
    let err = pccs(None, Some(cache.path()), true)
        .collateral_for(&q)
        .unwrap_err()
        .to_string();
    assert!(err.contains("delete the file"), "{err}");
    pccs(Some(&server.url), Some(cache.path()), false)
        .collateral_for(&q)
        .unwrap();
    assert_eq!(server.hits(), 16, "corrupt: refetched");
    pccs(None, Some(cache.path()), true)
        .collateral_for(&q)
        .unwrap();
}

#[test]
fn verify_quote_cli_fetches_caches_and_runs_offline() {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Cmd {
        #[command(flatten)]
        args: attestation::cli::Args,
    }
    let Some(dir) = fixtures() else { return };
    let (_, c) = load(&dir);
    let quote = dir.join("quotes").join(QUOTE);
    let quote = quote.to_str().unwrap();
    let server = MockPcs::serving(&c);
    let cache = tempfile::tempdir().unwrap();
    let cache_s = cache.path().to_str().unwrap();
    let parse = |extra: &[&str]| {
        let mut argv = vec!["verify-quote", "--quote", quote, "--at", AT];
        argv.extend_from_slice(extra);
        Cmd::try_parse_from(argv).map(|c| c.args)
    };
    let online = parse(&["--pccs-url", &server.url, "--collateral-cache", cache_s]).unwrap();
    let v = attestation::cli::verdict(&online).unwrap();
    assert!(v.accepted, "{:?}", v.reasons);
    server.shutdown();
    let offline = parse(&["--offline", "--collateral-cache", cache_s]).unwrap();
    assert!(attestation::cli::verdict(&offline).unwrap().accepted);

    // Inconsistent combinations are usage errors.
    let file = dir.join("quotes").join(format!("{QUOTE}_collateral.json"));
    assert!(
        parse(&[
            "--collateral",
            file.to_str().unwrap(),
            "--pccs-url",
            "http://x"
        ])
        .is_err()
    );
    assert!(parse(&["--offline"]).is_err(), "offline needs a cache");
    assert!(
        parse(&[
            "--offline",
            "--collateral-cache",
            cache_s,
            "--pccs-url",
            "http://x"
        ])
        .is_err()
    );
    let only_cache = parse(&["--collateral-cache", cache_s]).unwrap();
    let err = attestation::cli::verdict(&only_cache)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--pccs-url") && err.contains("--offline"),
        "{err}"
    );
}
