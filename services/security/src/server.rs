//! Serving TLS: a rustls config rebuilt when the certificate, key or client CA file changes
//! (each new connection gets the current one; open connections keep theirs), and the accepted
//! connections, plain or TLS, as one stream for tonic and one listener for axum. Handshakes run
//! in their own tasks, so a slow or silent client holds up no one else's accept.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::args::ServerTlsArgs;
use crate::watched::Watched;
use crate::{SecurityError, pem, provider};

/// ALPN of gRPC (HTTP/2; tonic's and grpc-go's clients insist on it).
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN of the HTTP API (axum serves HTTP/1.1 here).
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS side of a server: the current config, re-read from the flags' files on change.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<Watched<Arc<ServerConfig>>>,
    mutual: bool,
}

impl ServerTls {
    /// `None` without `--tls-cert`. Reads every file now, so a missing or bad one stops the
    /// start with an error naming its flag.
    pub fn from_args(args: &ServerTlsArgs, alpn: &[&[u8]]) -> Result<Option<Self>, SecurityError> {
        let (cert, key) = match (&args.tls_cert, &args.tls_key) {
            (None, None) => {
                if args.tls_client_ca.is_some() {
                    return Err(SecurityError::Config {
                        flag: "--tls-client-ca",
                        msg: "needs --tls-cert and --tls-key (client certificates are checked only over TLS)".into(),
                    });
                }
                return Ok(None);
            }
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            (Some(_), None) => {
                return Err(SecurityError::Config {
                    flag: "--tls-key",
                    msg: "missing: --tls-cert needs the key of its certificate".into(),
                });
            }
            (None, Some(_)) => {
                return Err(SecurityError::Config {
                    flag: "--tls-cert",
                    msg: "missing: --tls-key needs the certificate it belongs to".into(),
                });
            }
        };
        let ca = args.tls_client_ca.clone();
        let mut paths = vec![cert.clone(), key.clone()];
        paths.extend(ca.clone());
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let config = Watched::new(paths, move || {
            build(&cert, &key, ca.as_deref(), &alpn).map(Arc::new)
        })?;
        Ok(Some(ServerTls {
            config: Arc::new(config),
            mutual: args.tls_client_ca.is_some(),
        }))
    }

    /// Whether clients must present a certificate signed by `--tls-client-ca`.
    pub fn mutual(&self) -> bool {
        self.mutual
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from((*self.config.get()).clone())
    }
}

fn build(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
    alpn: &[Vec<u8>],
) -> Result<ServerConfig, SecurityError> {
    let certs = pem::certs("--tls-cert", cert)?;
    let key_der = pem::key("--tls-key", key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SecurityError::Config {
            flag: "--tls-cert",
            msg: e.to_string(),
        })?;
    let builder = match client_ca {
        Some(ca) => {
            let roots = pem::roots("--tls-client-ca", ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| SecurityError::Invalid {
                    flag: "--tls-client-ca",
                    path: ca.to_path_buf(),
                    msg: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config =
        builder
            .with_single_cert(certs, key_der)
            .map_err(|e| SecurityError::Invalid {
                flag: "--tls-key",
                path: key.to_path_buf(),
                msg: format!("does not go with --tls-cert {}: {e}", cert.display()),
            })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// An accepted connection: plain TCP, or TLS over it.
pub enum ServerIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ServerIo {
    fn tcp(&self) -> &TcpStream {
        match self {
            ServerIo::Plain(s) => s,
            ServerIo::Tls(s) => s.get_ref().0,
        }
    }
}

impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp().connect_info()
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerIo::Plain(s) => s.is_write_vectored(),
            ServerIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connections accepted on a listener, TLS handshakes done. Dropping it (the server shutting
/// down) stops accepting and closes the listening socket.
pub struct Incoming {
    rx: mpsc::Receiver<(ServerIo, SocketAddr)>,
    local: SocketAddr,
}

impl Incoming {
    /// Accepts on `listener` with TCP_NODELAY (small messages must not wait on Nagle), through
    /// `tls` when given.
    pub fn new(listener: TcpListener, tls: Option<ServerTls>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(accept_loop(listener, tls, tx));
        Ok(Incoming { rx, local })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next connection; `None` once the accept loop has stopped.
    pub async fn accept(&mut self) -> Option<(ServerIo, SocketAddr)> {
        self.rx.recv().await
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<ServerIo>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|o| o.map(|(io, _)| Ok(io)))
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<ServerTls>,
    tx: mpsc::Sender<(ServerIo, SocketAddr)>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = tx.closed() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let Some(tls) = tls.clone() else {
            if tx.send((ServerIo::Plain(tcp), peer)).await.is_err() {
                return;
            }
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(tcp)).await {
                Ok(Ok(s)) => {
                    let _ = tx.send((ServerIo::Tls(Box::new(s)), peer)).await;
                }
                // A client without our CA, or without a client certificate under mTLS: its own
                // side reports the alert; here it is routine, not an error.
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
