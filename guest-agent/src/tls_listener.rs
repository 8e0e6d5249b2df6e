//! The agent's RA-TLS listener: TLS 1.3 (rustls, [`attestation::tls::server_config`] with the
//! agent's rotating RA-TLS certificate) in front of axum.
//!
//! TCP connections are accepted by a background task; each handshake runs in its own task with a
//! timeout, so a slow or hostile client cannot hold up others, and only completed TLS streams
//! reach the server through [`axum::serve::Listener`]. When the server drops the listener (stop),
//! the accept task ends and the port closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

/// Longest a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Pending connections the kernel queues before `accept` (the default 128 makes a burst of
/// connections wait for SYN retransmissions).
pub const BACKLOG: u32 = 4096;

/// Binds `addr` with [`BACKLOG`], after raising the soft open-files limit to the hard one (every
/// connection, idle or not, is a descriptor; running out would stall `accept` for everyone).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    raise_nofile();
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(BACKLOG)
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// A listener yielding established TLS streams.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Serve TLS with `config` on the bound `tcp` listener (call inside a tokio runtime).
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    r = tcp.accept() => r,
                    () = tx.closed() => return,
                };
                let (sock, addr) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        crate::log_line!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => crate::log_line!("TLS handshake with {addr} failed: {e}"),
                        Err(_) => crate::log_line!(
                            "TLS handshake with {addr} timed out after {} s",
                            HANDSHAKE_TIMEOUT.as_secs()
                        ),
                    }
                });
            }
        });
        Ok(Self { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accept task ended (it only does when the listener is dropped): wait forever.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
