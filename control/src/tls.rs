//! TLS for control's gRPC listener. The certificate files, their reloading and the rustls
//! server configuration are shared with the relay and live in
//! [`callbridge_telemetry::tls`]; re-exported here under their old paths.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

pub use callbridge_telemetry::tls::{
    KeyPairFiles, RELOAD_EVERY, ReloadingCert, ServerTls, TlsFileError, certificates, provider,
    server_config, watch,
};

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the gRPC server to take them.
const ACCEPTED_SLOTS: usize = 64;

/// Accepts TCP connections on `listener` and yields each once its TLS handshake is done,
/// until `shutdown`. Handshakes run in their own tasks, so a slow or silent client holds
/// up nobody; a failed one is logged (peer and reason) and dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_SLOTS);
    let acceptor = TlsAcceptor::from(config);
    // Detached: it ends with the token, and dropping `tx` then ends the stream.
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "Accepting a gRPC connection failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Acks and watch frames are small: without NODELAY they wait for Nagle.
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake failed; connection dropped.");
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out; connection dropped.");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Whether `err` (or what caused it) is a TLS failure: a handshake refused by either side,
/// a certificate that does not verify. Logs say "TLS" for these, so an operator looks at
/// certificates rather than at the network.
pub fn is_tls_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        next = e.source();
    }
    // The redis crate keeps only the text of the rustls error it wraps; its messages
    // start with these.
    let text = err.to_string();
    [
        "invalid peer certificate",
        "received fatal alert",
        "peer sent no certificates",
        "peer is incompatible",
        "received corrupt message",
    ]
    .iter()
    .any(|m| text.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_are_recognised_through_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert!(is_tls_failure(&io));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(!is_tls_failure(&plain));
        let flattened = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        assert!(is_tls_failure(&flattened));
    }
}
