//! TLS on the HTTP front (`daemon.tls`): agents present bearer tokens, which must not cross a
//! network in the clear. The certificate and key are read when the policy is loaded; a reload
//! (a changed file is one) replaces them for new connections, so a certificate is renewed
//! without a restart, and adding or removing `daemon.tls` turns TLS on or off for new
//! connections. Handshakes run in tasks of their own, so a slow or silent client holds up no
//! other.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::IntCounterVec;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

use crate::policy::FrontTls;

/// How long a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections handshaken and not yet taken by the server.
const HANDSHAKEN_BACKLOG: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of `daemon.tls` (`field`: its policy path) that cannot be used.
    #[error("{field} \"{}\": {reason}", path.display())]
    File {
        field: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("daemon.tls: {0}")]
    Config(String),
}

const CERT_FILE: &str = "daemon.tls.cert_file";
const KEY_FILE: &str = "daemon.tls.key_file";

impl TlsError {
    /// The policy field at fault.
    pub fn field_path(&self) -> &'static str {
        match self {
            Self::File { field, .. } => field,
            Self::Config(_) => "daemon.tls",
        }
    }

    /// What is wrong, without the field.
    pub fn reason(&self) -> String {
        match self {
            Self::File { path, reason, .. } => format!("\"{}\": {reason}", path.display()),
            Self::Config(reason) => reason.clone(),
        }
    }
}

/// The certificate chain and private key `tls` names, read now, checked to belong together.
pub fn load_certified_key(tls: &FrontTls) -> Result<CertifiedKey, TlsError> {
    let chain = read_certificates(&tls.cert_file)?;
    let unusable_key = |reason: String| TlsError::File {
        field: KEY_FILE,
        path: tls.key_file.clone(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| unusable_key(format!("no private key read: {e}")))?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map_err(|e| unusable_key(format!("{e} (is it the key of cert_file?)")))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let unreadable = |reason: String| TlsError::File {
        field: CERT_FILE,
        path: path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(unreadable(
            "holds no CERTIFICATE block: give the server's certificate, then its chain".into(),
        ));
    }
    Ok(chain)
}

/// The certificate the front presents, or none: plain HTTP. A reload replaces it; connections
/// already open keep what they were made with.
#[derive(Debug)]
pub struct FrontCertificate(RwLock<Option<Arc<CertifiedKey>>>);

impl FrontCertificate {
    pub fn new(key: Option<CertifiedKey>) -> Arc<FrontCertificate> {
        Arc::new(FrontCertificate(RwLock::new(key.map(Arc::new))))
    }

    /// Puts `key` in place for new connections; `None` turns TLS off.
    pub fn replace(&self, key: Option<CertifiedKey>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = key.map(Arc::new);
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn is_on(&self) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }
}

impl ResolvesServerCert for FrontCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // None (TLS turned off during this handshake) fails the handshake.
        self.current()
    }
}

/// The front's server configuration: TLS 1.2 and 1.3 with rustls's safe defaults, HTTP/1.1.
pub fn server_config(certificate: Arc<FrontCertificate>) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A connection of the front: plain, or TLS once its handshake is done.
pub type FrontStream = Either<TcpStream, TlsStream<TcpStream>>;

/// A listener that hands the HTTP front its connections: as they come while the front's
/// certificate is off, once their TLS handshake is done while it is on. Accepting and
/// handshaking run in a task that stops when this is dropped.
pub struct FrontListener {
    ready: mpsc::Receiver<(FrontStream, SocketAddr)>,
    local_addr: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl FrontListener {
    /// Accepts on `tcp`, with TLS whenever `certificate` is on, counting failed handshakes in
    /// `failures` (by reason: `error`, `timeout`).
    pub fn new(
        tcp: TcpListener,
        certificate: Arc<FrontCertificate>,
        failures: IntCounterVec,
    ) -> Result<FrontListener, TlsError> {
        let local_addr = tcp
            .local_addr()
            .map_err(|e| TlsError::Config(format!("the front's listener: {e}")))?;
        let (sender, ready) = mpsc::channel(HANDSHAKEN_BACKLOG);
        let acceptor = TlsAcceptor::from(server_config(certificate.clone())?);
        let accepting = tokio::spawn(accept_and_handshake(
            tcp,
            certificate,
            acceptor,
            sender,
            failures,
        ));
        Ok(FrontListener {
            ready,
            local_addr,
            accepting,
        })
    }
}

impl Drop for FrontListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for FrontListener {
    type Io = FrontStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accepting task ended (it only does when aborted): nothing comes any more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

async fn accept_and_handshake(
    tcp: TcpListener,
    certificate: Arc<FrontCertificate>,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(FrontStream, SocketAddr)>,
    failures: IntCounterVec,
) {
    loop {
        let (mut stream, peer) = match tcp.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                super::serve::pause_after_failed_accept(&e, "HTTP front").await;
                continue;
            }
        };
        super::serve::disable_nagle(&mut stream);
        if !certificate.is_on() {
            if ready.send((Either::Left(stream), peer)).await.is_err() {
                return;
            }
            continue;
        }
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        let failures = failures.clone();
        tokio::spawn(async move {
            let failed =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = ready.send((Either::Right(tls), peer)).await;
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        "error"
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        "timeout"
                    }
                };
            failures.with_label_values(&[failed]).inc();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn testdata(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("src/transport/testdata")
            .join(name)
    }

    fn front_tls(cert: &str, key: PathBuf) -> FrontTls {
        FrontTls {
            cert_file: testdata(cert),
            key_file: key,
        }
    }

    #[test]
    fn a_certificate_and_its_key_load() {
        let key = load_certified_key(&front_tls("front.pem", testdata("front-key.pem"))).unwrap();
        assert_eq!(key.cert.len(), 1);
        let config = server_config(FrontCertificate::new(Some(key))).unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_at_the_key_file() {
        let other_key = testdata("../../identity/testdata/ec_private.pem");
        let error = load_certified_key(&front_tls("front.pem", other_key)).unwrap_err();
        assert_eq!(error.field_path(), "daemon.tls.key_file");
        assert!(
            error.reason().contains("is it the key of cert_file?"),
            "{error}"
        );
    }

    /// A client that trusts the self-signed test certificate completes a handshake through
    /// [`FrontListener`], and the connection handed on has Nagle's algorithm off. With the
    /// certificate taken away, the next connection is handed on as it is, plain.
    #[tokio::test]
    async fn handshaken_connections_are_handed_on_without_nagle() {
        let key = load_certified_key(&front_tls("front.pem", testdata("front-key.pem"))).unwrap();
        let certificate = FrontCertificate::new(Some(key));
        let failures = IntCounterVec::new(prometheus::Opts::new("f", "f"), &["reason"]).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut listener = FrontListener::new(tcp, certificate.clone(), failures.clone()).unwrap();
        let addr = axum::serve::Listener::local_addr(&listener).unwrap();

        let mut roots = rustls::RootCertStore::empty();
        for certificate in read_certificates(&testdata("front.pem")).unwrap() {
            roots.add(certificate).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let connecting = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            connector.connect(name, tcp).await.unwrap()
        });
        let handshake = connecting.await.unwrap();
        // Bounded, so that a failed handshake fails the test rather than hangs it.
        let accepting = axum::serve::Listener::accept(&mut listener);
        let (accepted, _) = tokio::time::timeout(Duration::from_secs(10), accepting)
            .await
            .expect("the handshaken connection is handed on");
        drop(handshake);
        let Either::Right(tls) = accepted else {
            panic!("a TLS connection was handed on as plain");
        };
        assert!(tls.get_ref().0.nodelay().unwrap());
        assert_eq!(failures.with_label_values(&["error"]).get(), 0);

        certificate.replace(None);
        let _plain = TcpStream::connect(addr).await.unwrap();
        let accepting = axum::serve::Listener::accept(&mut listener);
        let (accepted, _) = tokio::time::timeout(Duration::from_secs(10), accepting)
            .await
            .expect("the plain connection is handed on");
        let Either::Left(tcp) = accepted else {
            panic!("TLS is off, yet a connection was handshaken");
        };
        assert!(tcp.nodelay().unwrap());
    }

    #[test]
    fn missing_or_empty_files_are_named() {
        let missing = load_certified_key(&front_tls("absent.pem", testdata("front-key.pem")));
        let error = missing.unwrap_err();
        assert_eq!(error.field_path(), "daemon.tls.cert_file");
        assert!(error.reason().contains("absent.pem"), "{error}");
        // A key file as the certificate: PEM, but no CERTIFICATE block in it.
        let keys_only = load_certified_key(&front_tls("front-key.pem", testdata("front-key.pem")));
        let error = keys_only.unwrap_err();
        assert_eq!(error.field_path(), "daemon.tls.cert_file");
        assert!(error.reason().contains("no CERTIFICATE block"), "{error}");
        let no_key = load_certified_key(&front_tls("front.pem", testdata("front.pem")));
        assert_eq!(no_key.unwrap_err().field_path(), "daemon.tls.key_file");
    }
}
