//! [`PccsCollateral`]: collateral fetched from an Intel PCS or a PCCS (provisioning certificate
//! caching service) over the v4 API, with an on-disk cache and a fully offline mode.
//!
//! For a quote it reads the PCK certificate chain from the quote's certification data (type 5),
//! takes the FMSPC from the PCK certificate's Intel SGX extension and the CA type (`processor` or
//! `platform`) from its issuer, and fetches (all under `<base>/{sgx,tdx}/certification/v4/`):
//!
//! | what | path | issuer chain (URL-encoded PEM) in header |
//! | --- | --- | --- |
//! | TDX TCB info | `tdx/.../tcb?fmspc=<FMSPC>` → `{"tcbInfo":{…},"signature":"<hex>"}` | `TCB-Info-Issuer-Chain` (or `SGX-TCB-Info-Issuer-Chain`) |
//! | QE identity | `tdx/.../qe/identity` → `{"enclaveIdentity":{…},"signature":"<hex>"}` | `SGX-Enclave-Identity-Issuer-Chain` |
//! | PCK CRL | `sgx/.../pckcrl?ca=<ca>&encoding=der` → DER (PEM or hex accepted) | `SGX-PCK-CRL-Issuer-Chain` |
//! | root CA CRL | `sgx/.../rootcacrl` (PCCS; hex or DER) — else the CRL distribution point of the root certificate (Intel PCS) | — |
//!
//! The signed JSON documents are kept byte for byte as the server sent them (the signatures cover
//! those bytes). The result is cached in `<cache dir>/tdx-<FMSPC>-<ca>.json` (the fetch time, the
//! base URL and the collateral in dcap-qvl's `QuoteCollateralV3` JSON, the same format as
//! `--collateral FILE`) and reused while the verification time is inside the collateral's
//! validity window (latest `issueDate` .. earliest `nextUpdate`) and the entry is younger than the
//! configured maximum age. Offline mode reads the cache only and never opens a connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dcap_qvl::QuoteCollateralV3;
use serde::{Deserialize, Serialize};

use super::{CollateralError, CollateralSource, collateral_window, format_rfc3339};

/// Default maximum age of a cache entry (one day): Intel refreshes TCB info and CRLs at most daily.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Default timeout of one HTTP request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body accepted (a PCK CRL of a busy CA is a few hundred KiB).
const MAX_BODY: u64 = 8 * 1024 * 1024;

/// Which PCK CA issued the quote's PCK certificate (the `ca=` of the PCK CRL request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PckCa {
    /// "Intel SGX PCK Processor CA".
    Processor,
    /// "Intel SGX PCK Platform CA".
    Platform,
}

impl PckCa {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PckCa::Processor => "processor",
            PckCa::Platform => "platform",
        }
    }
}

/// What a quote needs fetched: its platform's FMSPC and its PCK CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollateralKey {
    /// 12 upper-case hex digits.
    pub fmspc: String,
    /// PCK CA type.
    pub ca: PckCa,
}

/// How [`PccsCollateral`] obtains collateral.
#[derive(Debug, Clone)]
pub struct PccsConfig {
    /// Base URL of the PCS/PCCS, e.g. `https://pccs.example:8081` (a trailing
    /// `/sgx/certification/v4` or `/tdx/certification/v4` is accepted and stripped). `None` is
    /// only valid together with `offline`.
    pub base_url: Option<String>,
    /// Cache directory (created on first write). `None`: no cache (every quote fetches).
    pub cache_dir: Option<PathBuf>,
    /// Never fetch: use the cache only.
    pub offline: bool,
    /// A cache entry older than this is fetched again (online) or refused (offline).
    pub max_age: Duration,
    /// Timeout of one HTTP request.
    pub timeout: Duration,
}

impl Default for PccsConfig {
    fn default() -> Self {
        Self {
            base_url: None,
            cache_dir: None,
            offline: false,
            max_age: DEFAULT_MAX_AGE,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// One cache file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheEntry {
    /// Unix seconds (wall clock) of the fetch.
    fetched_at: u64,
    /// Base URL it came from.
    source: String,
    fmspc: String,
    ca: PckCa,
    collateral: QuoteCollateralV3,
}

/// Collateral from a PCS/PCCS URL, cached on disk; see the module docs.
#[derive(Debug, Clone)]
pub struct PccsCollateral {
    cfg: PccsConfig,
    base: Option<String>,
    /// Verification time for the validity-window check; `None`: the wall clock.
    at: Option<u64>,
}

impl PccsCollateral {
    /// Check the configuration: a URL is needed unless offline, offline needs a cache directory.
    pub fn new(cfg: PccsConfig) -> Result<Self, CollateralError> {
        let base = match &cfg.base_url {
            Some(u) => Some(normalize_base(u)?),
            None => None,
        };
        if cfg.offline && cfg.cache_dir.is_none() {
            return Err(CollateralError::Missing(
                "offline mode reads collateral from the cache only: give a cache directory \
                 (--collateral-cache DIR) filled by an earlier online run, or a --collateral FILE"
                    .to_owned(),
            ));
        }
        if !cfg.offline && base.is_none() {
            return Err(CollateralError::Missing(
                "no PCCS URL: pass --pccs-url URL (your PCCS, or Intel's PCS), or --offline with \
                 --collateral-cache DIR, or --collateral FILE"
                    .to_owned(),
            ));
        }
        Ok(Self {
            cfg,
            base,
            at: None,
        })
    }

    /// Judge cache validity at this verification time (Unix seconds) instead of now; use the same
    /// time the quote is verified at.
    pub fn at_time(mut self, unix_secs: u64) -> Self {
        self.at = Some(unix_secs);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &PccsConfig {
        &self.cfg
    }

    /// Collateral for an FMSPC and CA: from the cache while valid, else fetched (and cached).
    pub fn collateral_for_key(
        &self,
        key: &CollateralKey,
    ) -> Result<QuoteCollateralV3, CollateralError> {
        let now = now_secs();
        let at = self.at.unwrap_or(now);
        let cached = match &self.cfg.cache_dir {
            // Online, an unreadable entry is simply fetched again (and overwritten).
            Some(dir) => match read_cache(&cache_path(dir, key)) {
                Err(CollateralError::Format { .. }) if !self.cfg.offline => None,
                other => other?,
            },
            None => None,
        };
        let stale = match &cached {
            Some(e) => self.staleness(e, at, now),
            None => Some("absent".to_owned()),
        };
        match (cached, stale) {
            (Some(e), None) => Ok(e.collateral),
            (_, Some(why)) if self.cfg.offline => {
                let dir = self
                    .cfg
                    .cache_dir
                    .as_deref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                Err(CollateralError::Missing(format!(
                    "offline, and the cached collateral for FMSPC {} (PCK CA {}) in {dir} is {why}: \
                     run once online (--pccs-url URL --collateral-cache {dir}) to fill the cache, \
                     or pass --collateral FILE",
                    key.fmspc,
                    key.ca.as_str()
                )))
            }
            _ => {
                let base = self
                    .base
                    .as_deref()
                    .ok_or_else(|| CollateralError::Missing("no PCCS URL configured".to_owned()))?;
                let collateral = fetch(base, key, self.cfg.timeout)?;
                if let Some(dir) = &self.cfg.cache_dir {
                    write_cache(
                        dir,
                        &cache_path(dir, key),
                        &CacheEntry {
                            fetched_at: now,
                            source: base.to_owned(),
                            fmspc: key.fmspc.clone(),
                            ca: key.ca,
                            collateral: collateral.clone(),
                        },
                    )?;
                }
                Ok(collateral)
            }
        }
    }

    /// `None` when the entry may be used at `at`; else why not.
    fn staleness(&self, e: &CacheEntry, at: u64, now: u64) -> Option<String> {
        let age = now.saturating_sub(e.fetched_at);
        if age > self.cfg.max_age.as_secs() {
            return Some(format!(
                "{age} s old (fetched {}), older than the maximum age of {} s",
                format_rfc3339(e.fetched_at),
                self.cfg.max_age.as_secs()
            ));
        }
        match collateral_window(&e.collateral) {
            Ok((from, until)) if at >= from && at <= until => None,
            Ok((from, until)) => Some(format!(
                "valid from {} to {}, not at the verification time {}",
                format_rfc3339(from),
                format_rfc3339(until),
                format_rfc3339(at)
            )),
            Err(e) => Some(format!("unusable ({e})")),
        }
    }
}

impl CollateralSource for PccsCollateral {
    fn collateral_for(&self, raw_quote: &[u8]) -> Result<Arc<QuoteCollateralV3>, CollateralError> {
        let key = collateral_key(raw_quote)?;
        self.collateral_for_key(&key).map(Arc::new)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `http(s)://host[:port][/prefix]` without a trailing slash or API suffix.
fn normalize_base(url: &str) -> Result<String, CollateralError> {
    let u = url.trim();
    if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() < "http://x".len() {
        return Err(CollateralError::Missing(format!(
            "PCCS URL {url:?} must start with http:// or https:// (e.g. https://pccs.example:8081)"
        )));
    }
    let mut u = u.trim_end_matches('/');
    for suffix in ["/sgx/certification/v4", "/tdx/certification/v4"] {
        u = u.strip_suffix(suffix).unwrap_or(u);
    }
    Ok(u.trim_end_matches('/').to_owned())
}

fn cache_path(dir: &Path, key: &CollateralKey) -> PathBuf {
    dir.join(format!("tdx-{}-{}.json", key.fmspc, key.ca.as_str()))
}

fn cache_error(path: &Path, detail: String) -> CollateralError {
    CollateralError::Format {
        path: path.display().to_string(),
        detail: format!("{detail} (delete the file to fetch again)"),
    }
}

fn read_cache(path: &Path) -> Result<Option<CacheEntry>, CollateralError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CollateralError::Read {
                path: path.display().to_string(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| cache_error(path, format!("not a collateral cache entry: {e}")))
}

fn write_cache(dir: &Path, path: &Path, entry: &CacheEntry) -> Result<(), CollateralError> {
    let io = |source| CollateralError::Read {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let text = serde_json::to_string_pretty(entry)
        .map_err(|e| cache_error(path, format!("cannot serialize: {e}")))?;
    let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// FMSPC and PCK CA of a quote, from the PCK certificate chain in its certification data.
pub fn collateral_key(raw_quote: &[u8]) -> Result<CollateralKey, CollateralError> {
    let bad = |d: String| CollateralError::Missing(format!("cannot tell what to fetch: {d}"));
    let quote = dcap_qvl::quote::Quote::parse(raw_quote)
        .map_err(|e| bad(format!("the quote does not parse: {e}")))?;
    if quote.header.is_sgx() {
        return Err(bad(
            "this is an SGX quote; only TDX quotes are supported".into()
        ));
    }
    let chain = quote.raw_cert_chain().map_err(|e| {
        bad(format!(
            "{e}: the quote carries no PCK certificate chain (certification data type 5); \
             pass --collateral FILE"
        ))
    })?;
    pck_key_from_chain(chain).map_err(bad)
}

/// Intel SGX extension of PCK certificates, and its FMSPC entry.
const SGX_EXTENSION_OID: &str = "1.2.840.113741.1.13.1";
const FMSPC_OID: &str = "1.2.840.113741.1.13.1.4";

/// FMSPC and CA type from the first (leaf) certificate of a PEM chain.
pub fn pck_key_from_chain(pem_chain: &[u8]) -> Result<CollateralKey, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_chain)
        .map_err(|e| format!("the PCK chain is not PEM: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("the PCK certificate does not parse: {e}"))?;
    let issuer = cert.issuer().to_string();
    let ca = if issuer.contains("Platform CA") {
        PckCa::Platform
    } else if issuer.contains("Processor CA") {
        PckCa::Processor
    } else {
        return Err(format!(
            "the PCK certificate's issuer {issuer:?} is neither the PCK Processor CA nor the Platform CA"
        ));
    };
    let ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == SGX_EXTENSION_OID)
        .ok_or("the PCK certificate has no Intel SGX extension")?;
    let fmspc = find_fmspc(ext.value).ok_or("the Intel SGX extension has no FMSPC")?;
    Ok(CollateralKey {
        fmspc: hex::encode_upper(fmspc),
        ca,
    })
}

/// The extension is `SEQUENCE OF SEQUENCE { OID, value }`; FMSPC is a 6-byte OCTET STRING.
fn find_fmspc(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::der_parser::ber::BerObjectContent;
    let (_, top) = x509_parser::der_parser::parse_der(der).ok()?;
    for item in top.as_sequence().ok()? {
        let pair = item.as_sequence().ok()?;
        let (Some(oid), Some(value)) = (pair.first(), pair.get(1)) else {
            continue;
        };
        if oid.as_oid().ok()?.to_id_string() == FMSPC_OID {
            if let BerObjectContent::OctetString(b) = &value.content
                && b.len() == 6
            {
                return Some(b.to_vec());
            }
            return None;
        }
    }
    None
}

/// One HTTP GET: status 200 or an error naming the URL.
struct Fetched {
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

impl Fetched {
    fn header(&self, names: &[&str], url: &str) -> Result<String, CollateralError> {
        let raw = names
            .iter()
            .find_map(|n| {
                self.headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(n))
                    .map(|(_, v)| v)
            })
            .ok_or_else(|| {
                fetch_error(url, format!("the response lacks the {} header", names[0]))
            })?;
        percent_decode(raw).ok_or_else(|| {
            fetch_error(
                url,
                format!("the {} header is not URL-encoded UTF-8", names[0]),
            )
        })
    }
}

fn fetch_error(url: &str, detail: String) -> CollateralError {
    CollateralError::Fetch {
        url: url.to_owned(),
        detail,
    }
}

fn get(agent: &ureq::Agent, url: &str) -> Result<Fetched, CollateralError> {
    let mut resp = agent
        .get(url)
        .call()
        .map_err(|e| fetch_error(url, e.to_string()))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()
        .map_err(|e| fetch_error(url, format!("reading the body: {e}")))?;
    if status != 200 {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(fetch_error(
            url,
            format!(
                "HTTP {status}{}",
                if text.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", text.trim())
                }
            ),
        ));
    }
    Ok(Fetched { body, headers })
}

/// Fetch the four pieces (and their issuer chains) for `key` from `base`.
fn fetch(
    base: &str,
    key: &CollateralKey,
    timeout: Duration,
) -> Result<QuoteCollateralV3, CollateralError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();

    let url = format!("{base}/tdx/certification/v4/tcb?fmspc={}", key.fmspc);
    let r = get(&agent, &url)?;
    let tcb_info_issuer_chain = r.header(
        &["TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"],
        &url,
    )?;
    let (tcb_info, tcb_info_signature) = signed_document(&r.body, "tcbInfo", &url)?;

    let url = format!("{base}/tdx/certification/v4/qe/identity");
    let r = get(&agent, &url)?;
    let qe_identity_issuer_chain = r.header(&["SGX-Enclave-Identity-Issuer-Chain"], &url)?;
    let (qe_identity, qe_identity_signature) = signed_document(&r.body, "enclaveIdentity", &url)?;

    let url = format!(
        "{base}/sgx/certification/v4/pckcrl?ca={}&encoding=der",
        key.ca.as_str()
    );
    let r = get(&agent, &url)?;
    let pck_crl_issuer_chain = r.header(&["SGX-PCK-CRL-Issuer-Chain"], &url)?;
    let pck_crl = crl_der(&r.body).map_err(|d| fetch_error(&url, d))?;

    let url = format!("{base}/sgx/certification/v4/rootcacrl");
    let root_ca_crl = match get(&agent, &url) {
        Ok(r) => crl_der(&r.body).map_err(|d| fetch_error(&url, d))?,
        // Intel's PCS has no rootcacrl endpoint: use the root certificate's CRL distribution point.
        Err(CollateralError::Fetch { detail, .. }) if detail.starts_with("HTTP 404") => {
            let dp = root_crl_url(&qe_identity_issuer_chain)
                .map_err(|d| fetch_error(&url, format!("HTTP 404, and {d}")))?;
            let r = get(&agent, &dp)?;
            crl_der(&r.body).map_err(|d| fetch_error(&dp, d))?
        }
        Err(e) => return Err(e),
    };

    Ok(QuoteCollateralV3 {
        pck_crl_issuer_chain,
        root_ca_crl,
        pck_crl,
        tcb_info_issuer_chain,
        tcb_info,
        tcb_info_signature,
        qe_identity_issuer_chain,
        qe_identity,
        qe_identity_signature,
        pck_certificate_chain: None,
    })
}

/// `{"<field>": {...}, "signature": "<hex>"}` → (the exact bytes of the object, signature).
fn signed_document(
    body: &[u8],
    field: &str,
    url: &str,
) -> Result<(String, Vec<u8>), CollateralError> {
    type Doc<'a> = std::collections::BTreeMap<&'a str, &'a serde_json::value::RawValue>;
    let shape = || format!("{{\"{field}\": {{…}}, \"signature\": \"<hex>\"}}");
    let text = std::str::from_utf8(body)
        .map_err(|_| fetch_error(url, format!("the body is not UTF-8 JSON {}", shape())))?;
    let doc: Doc = serde_json::from_str(text)
        .map_err(|e| fetch_error(url, format!("the body is not JSON {}: {e}", shape())))?;
    let raw = doc
        .get(field)
        .filter(|r| r.get().starts_with('{'))
        .ok_or_else(|| fetch_error(url, format!("the body has no \"{field}\" object")))?;
    let signature: String = doc
        .get("signature")
        .and_then(|r| serde_json::from_str(r.get()).ok())
        .ok_or_else(|| fetch_error(url, "the body has no \"signature\" string".to_owned()))?;
    let sig = hex::decode(signature)
        .map_err(|e| fetch_error(url, format!("\"signature\" is not hex: {e}")))?;
    Ok((raw.get().to_owned(), sig))
}

/// A CRL body as DER: DER as is, PEM (`-----BEGIN X509 CRL-----`) or hex-encoded DER decoded.
fn crl_der(body: &[u8]) -> Result<Vec<u8>, String> {
    let der = if body.first() == Some(&0x30) {
        body.to_vec()
    } else if body.starts_with(b"-----BEGIN") {
        let (_, pem) = x509_parser::pem::parse_x509_pem(body)
            .map_err(|e| format!("the CRL is not valid PEM: {e}"))?;
        pem.contents
    } else {
        let text = std::str::from_utf8(body).map_err(|_| "the CRL is neither DER, PEM nor hex")?;
        hex::decode(text.trim()).map_err(|_| "the CRL is neither DER, PEM nor hex".to_owned())?
    };
    x509_parser::parse_x509_crl(&der).map_err(|e| format!("the CRL does not parse: {e}"))?;
    Ok(der)
}

/// The CRL distribution point URL of the last (root) certificate of a PEM chain.
fn root_crl_url(pem_chain: &str) -> Result<String, String> {
    let root = x509_parser::pem::Pem::iter_from_buffer(pem_chain.as_bytes())
        .filter_map(Result::ok)
        .last()
        .ok_or("the issuer chain has no certificate")?;
    let cert = root
        .parse_x509()
        .map_err(|e| format!("the root certificate does not parse: {e}"))?;
    for ext in cert.extensions() {
        if let x509_parser::extensions::ParsedExtension::CRLDistributionPoints(points) =
            ext.parsed_extension()
        {
            for p in points.iter() {
                if let Some(x509_parser::extensions::DistributionPointName::FullName(names)) =
                    &p.distribution_point
                {
                    for n in names {
                        if let x509_parser::extensions::GeneralName::URI(u) = n {
                            return Ok((*u).to_owned());
                        }
                    }
                }
            }
        }
    }
    Err("the root certificate names no CRL distribution point".to_owned())
}

/// Decode `%XX` escapes (PCS headers carry URL-encoded PEM); `None` for a bad escape or non-UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("-----BEGIN%20CERTIFICATE-----%0AMII%2B").as_deref(),
            Some("-----BEGIN CERTIFICATE-----\nMII+")
        );
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff").as_deref(), None);
    }

    #[test]
    fn base_url_normalization() {
        assert_eq!(
            normalize_base("https://pccs.example:8081/").expect("ok"),
            "https://pccs.example:8081"
        );
        assert_eq!(
            normalize_base("https://api.example/sgx/certification/v4/").expect("ok"),
            "https://api.example"
        );
        assert_eq!(
            normalize_base("http://127.0.0.1:1/tdx/certification/v4").expect("ok"),
            "http://127.0.0.1:1"
        );
        assert!(normalize_base("pccs.example").is_err());
        assert!(normalize_base("ftp://x").is_err());
    }

    #[test]
    fn configuration_errors_say_what_to_pass() {
        let err = PccsCollateral::new(PccsConfig::default())
            .expect_err("no url")
            .to_string();
        assert!(err.contains("--pccs-url"), "{err}");
        let err = PccsCollateral::new(PccsConfig {
            offline: true,
            ..PccsConfig::default()
        })
        .expect_err("offline without cache")
        .to_string();
        assert!(err.contains("--collateral-cache"), "{err}");
    }

    #[test]
    fn signed_documents_keep_their_exact_bytes() {
        let body = br#"{"tcbInfo":{"id":"TDX","version":3,"b":1.50,"a":[]},"signature":"0a0B"}"#;
        let (doc, sig) = signed_document(body, "tcbInfo", "u").expect("parse");
        assert_eq!(doc, r#"{"id":"TDX","version":3,"b":1.50,"a":[]}"#);
        assert_eq!(sig, [0x0a, 0x0b]);
        let err = signed_document(b"<html>", "tcbInfo", "http://x/tcb")
            .expect_err("garbage")
            .to_string();
        assert!(err.contains("http://x/tcb"), "{err}");
        assert!(signed_document(br#"{"signature":"zz","tcbInfo":{}}"#, "tcbInfo", "u").is_err());
        assert!(signed_document(br#"{"signature":"00"}"#, "tcbInfo", "u").is_err());
    }

    #[test]
    fn crl_bodies_in_der_hex_and_garbage() {
        assert!(crl_der(b"not a crl").is_err());
        assert!(crl_der(&[0x30, 0x00]).is_err());
        assert!(crl_der(b"3000").is_err());
    }
}
