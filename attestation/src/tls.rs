//! rustls 0.23 integration (TLS 1.3 only, ring crypto provider chosen explicitly).
//!
//! - [`RaTlsCertResolver`]: serves the current RA-TLS certificate and can rotate it at run time
//!   (server side, and client side for mutual RA-TLS).
//! - [`RaTlsServerVerifier`]: a client's `ServerCertVerifier` running the full RA-TLS verification;
//!   it stores the [`Verdict`] of the last handshake ([`RaTlsServerVerifier::last_verdict`]).
//! - [`RaTlsClientVerifier`]: a server's `ClientCertVerifier` for mutual RA-TLS.
//! - [`server_config`] / [`client_config`] build the configs; [`handshake_in_memory`] runs a handshake
//!   between two configs without sockets (tests, benchmarks).
//!
//! The server name is not checked (RA-TLS certificates name no host: the quote identifies the peer).
//! Handshake signatures are checked against the certificate's raw SubjectPublicKeyInfo, because
//! webpki would refuse the certificate's critical private extensions.

use std::sync::{Arc, Mutex, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature_with_raw_key};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};

use crate::ratls::{QuoteProvider, RaTlsIdentity, verify_certificate};
use crate::verdict::Verdict;
use crate::verify::Verifier;

/// Errors building TLS configurations or keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused something.
    #[error("TLS configuration error: {0}")]
    Rustls(#[from] rustls::Error),
    /// Issuing a new identity failed.
    #[error(transparent)]
    Identity(#[from] crate::ratls::RaTlsError),
}

/// The crypto provider used everywhere in this crate: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified_key(id: &RaTlsIdentity) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_pkcs8_der.clone()));
    let signing = provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(id.cert_der.clone())],
        signing,
    )))
}

/// Serves the current RA-TLS certificate; [`rotate`](Self::rotate) swaps it atomically.
#[derive(Debug)]
pub struct RaTlsCertResolver {
    current: RwLock<(Arc<CertifiedKey>, RaTlsIdentity)>,
}

impl RaTlsCertResolver {
    /// Start with `identity`.
    pub fn new(identity: RaTlsIdentity) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new((certified_key(&identity)?, identity)),
        })
    }

    /// Replace the certificate (new handshakes use it; open connections keep theirs).
    pub fn rotate(&self, identity: RaTlsIdentity) -> Result<(), TlsError> {
        let ck = certified_key(&identity)?;
        let mut g = self.current.write().unwrap_or_else(|p| p.into_inner());
        *g = (ck, identity);
        Ok(())
    }

    /// Issue and install a new identity when the current one [`needs_rotation`](RaTlsIdentity::needs_rotation).
    /// Returns whether it rotated. Call it periodically (e.g. every minute).
    pub fn rotate_if_needed(
        &self,
        provider: &dyn QuoteProvider,
        now_unix: u64,
    ) -> Result<bool, TlsError> {
        if !self.identity().needs_rotation(now_unix) {
            return Ok(false);
        }
        self.rotate(RaTlsIdentity::generate(provider, now_unix)?)?;
        Ok(true)
    }

    /// The identity currently served.
    pub fn identity(&self) -> RaTlsIdentity {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }
}

impl ResolvesServerCert for RaTlsCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl ResolvesClientCert for RaTlsCertResolver {
    fn resolve(&self, _hints: &[&[u8]], schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        schemes
            .contains(&SignatureScheme::ED25519)
            .then(|| self.key())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The error a rejected certificate gives rustls: carries the verdict's summary.
#[derive(Debug, thiserror::Error)]
#[error("RA-TLS verification {0}")]
pub struct RejectedVerdict(pub String);

fn reject(v: &Verdict) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        RejectedVerdict(v.summary()),
    ))))
}

fn check_sig(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let mut scratch = Verdict::default();
    let parsed = crate::ratls::check_certificate(cert.as_ref(), 0, &mut scratch).ok_or(
        rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
    )?;
    verify_tls13_signature_with_raw_key(
        message,
        &SubjectPublicKeyInfoDer::from(parsed.spki_der.as_slice()),
        dss,
        &provider().signature_verification_algorithms,
    )
}

#[derive(Debug)]
struct Shared {
    verifier: Verifier,
    last: Mutex<Option<Verdict>>,
}

impl Shared {
    fn run(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: usize,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let v = verify_certificate(
            &self.verifier,
            end_entity.as_ref(),
            1 + intermediates,
            now.as_secs(),
        );
        let accepted = v.accepted;
        let err = (!accepted).then(|| reject(&v));
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
        err.map_or(Ok(()), Err)
    }
    fn last(&self) -> Option<Verdict> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Client side: verifies the server's RA-TLS certificate. Use one per connection to read that
/// connection's verdict reliably.
#[derive(Debug)]
pub struct RaTlsServerVerifier(Shared);

impl RaTlsServerVerifier {
    /// Wrap a [`Verifier`].
    pub fn new(verifier: Verifier) -> Self {
        Self(Shared {
            verifier,
            last: Mutex::new(None),
        })
    }
    /// The verdict of the last certificate checked (accepted or not).
    pub fn last_verdict(&self) -> Option<Verdict> {
        self.0.last()
    }
}

impl ServerCertVerifier for RaTlsServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.run(end_entity, intermediates.len(), now)?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("RA-TLS is TLS 1.3 only".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_sig(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Server side of mutual RA-TLS: requires and verifies the client's RA-TLS certificate.
#[derive(Debug)]
pub struct RaTlsClientVerifier(Shared);

impl RaTlsClientVerifier {
    /// Wrap a [`Verifier`].
    pub fn new(verifier: Verifier) -> Self {
        Self(Shared {
            verifier,
            last: Mutex::new(None),
        })
    }
    /// The verdict of the last client certificate checked.
    pub fn last_verdict(&self) -> Option<Verdict> {
        self.0.last()
    }
}

impl ClientCertVerifier for RaTlsClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.run(end_entity, intermediates.len(), now)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("RA-TLS is TLS 1.3 only".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_sig(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// A TLS 1.3-only server config serving `resolver`'s certificate; with `client_verifier`, clients
/// must present a certificate it accepts (mutual TLS: an [`RaTlsClientVerifier`] for RA-TLS
/// peers, [`crate::client_auth::PinnedClientCerts`] for pinned clients).
pub fn server_config(
    resolver: Arc<RaTlsCertResolver>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<ServerConfig, TlsError> {
    let b = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let b = match client_verifier {
        Some(v) => b.with_client_cert_verifier(v),
        None => b.with_no_client_auth(),
    };
    Ok(b.with_cert_resolver(resolver))
}

/// A TLS 1.3-only client config verifying the server with `verifier`; with `identity`, the client
/// presents a certificate when the server asks (its own RA-TLS certificate through a
/// [`RaTlsCertResolver`], or a [`crate::client_auth::ClientIdentity`]).
pub fn client_config(
    verifier: Arc<RaTlsServerVerifier>,
    identity: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<ClientConfig, TlsError> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    Ok(match identity {
        Some(r) => b.with_client_cert_resolver(r),
        None => b.with_no_client_auth(),
    })
}

/// The server name clients use (not checked by RA-TLS).
pub const RATLS_SERVER_NAME: &str = "ratls.invalid";

/// Run a complete handshake between a client and a server config in memory.
pub fn handshake_in_memory(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> Result<(), rustls::Error> {
    let name = ServerName::try_from(RATLS_SERVER_NAME)
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut c = rustls::Connection::Client(rustls::ClientConnection::new(client, name)?);
    let mut s = rustls::Connection::Server(rustls::ServerConnection::new(server)?);
    for _ in 0..16 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
        transfer(&mut c, &mut s)?;
        s.process_new_packets()?;
        transfer(&mut s, &mut c)?;
        c.process_new_packets()?;
    }
    Err(rustls::Error::General("handshake did not complete".into()))
}

fn transfer(
    from: &mut rustls::Connection,
    to: &mut rustls::Connection,
) -> Result<(), rustls::Error> {
    let io = |e: std::io::Error| rustls::Error::General(e.to_string());
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).map_err(io)?;
    }
    let mut rd = buf.as_slice();
    while !rd.is_empty() {
        to.read_tls(&mut rd).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::quote::TdRegisters;
    use crate::simulated::SimulatedTee;
    use crate::verify::unix_secs;
    use std::io::{Read, Write};

    fn now() -> u64 {
        unix_secs(std::time::SystemTime::now())
    }

    fn setup(allow_simulated: bool) -> (SimulatedTee, Arc<RaTlsCertResolver>, Verifier) {
        let tee = SimulatedTee::from_seed(&[8; 32], TdRegisters::default()).expect("tee");
        let id = RaTlsIdentity::generate(&tee, now()).expect("id");
        let resolver = Arc::new(RaTlsCertResolver::new(id).expect("resolver"));
        let verifier = Verifier::simulated(
            Policy::default().with_simulated(allow_simulated),
            tee.public_key(),
        );
        (tee, resolver, verifier)
    }

    #[test]
    fn loopback_tcp_handshake_accepts_simulated_only_when_allowed() {
        for allow in [true, false] {
            let (_tee, resolver, verifier) = setup(allow);
            let server = Arc::new(server_config(resolver, None).expect("server"));
            let sv = Arc::new(RaTlsServerVerifier::new(verifier));
            let client = Arc::new(client_config(sv.clone(), None).expect("client"));
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let srv = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
                let (sock, _) = listener.accept()?;
                let conn = rustls::ServerConnection::new(server).map_err(std::io::Error::other)?;
                let mut tls = rustls::StreamOwned::new(conn, sock);
                let mut buf = [0u8; 5];
                tls.read_exact(&mut buf)?;
                tls.write_all(b"world")?;
                tls.flush()?;
                Ok(buf.to_vec())
            });
            let sock = std::net::TcpStream::connect(addr).expect("connect");
            let conn = rustls::ClientConnection::new(
                client,
                ServerName::try_from(RATLS_SERVER_NAME).expect("name"),
            )
            .expect("conn");
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let res = tls.write_all(b"hello").and_then(|_| {
                let mut buf = [0u8; 5];
                tls.read_exact(&mut buf).map(|_| buf)
            });
            let verdict = sv.last_verdict().expect("verdict recorded");
            if allow {
                assert_eq!(&res.expect("handshake ok"), b"world");
                assert_eq!(srv.join().expect("join").expect("server ok"), b"hello");
                assert!(verdict.accepted && verdict.simulated);
                assert_eq!(
                    tls.conn.protocol_version(),
                    Some(rustls::ProtocolVersion::TLSv1_3)
                );
            } else {
                assert!(res.is_err(), "must refuse a simulated peer by default");
                assert!(srv.join().expect("join").is_err());
                assert!(verdict.has(crate::ReasonCode::SimulatedNotAllowed));
            }
        }
    }

    #[test]
    fn mutual_ratls_in_memory_and_rotation() {
        let (tee, server_res, verifier) = setup(true);
        let (_t2, client_res, _) = setup(true);
        let cv = Arc::new(RaTlsClientVerifier::new(verifier.clone()));
        let server = Arc::new(server_config(server_res.clone(), Some(cv.clone())).expect("server"));
        let sv = Arc::new(RaTlsServerVerifier::new(verifier.clone()));
        let client = Arc::new(client_config(sv.clone(), Some(client_res)).expect("client"));
        handshake_in_memory(client, server.clone()).expect("mutual handshake");
        assert!(cv.last_verdict().expect("client verdict").accepted);
        assert!(sv.last_verdict().expect("server verdict").accepted);

        // A client without a certificate is refused by the mutual server.
        let anon =
            Arc::new(client_config(Arc::new(RaTlsServerVerifier::new(verifier)), None).expect("c"));
        assert!(handshake_in_memory(anon, server).is_err());

        // Rotation installs a new key.
        let before = server_res.identity().public_key;
        assert!(!server_res.rotate_if_needed(&tee, now()).expect("rotate"));
        assert!(
            server_res
                .rotate_if_needed(&tee, now() + 3601)
                .expect("rotate")
        );
        assert_ne!(server_res.identity().public_key, before);
    }
}
