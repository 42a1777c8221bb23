//! The HTTP/1.1 accept loop both binaries serve their warp routes with, so that a listener
//! holds under abuse: a header-read timeout that actually fires, a cap on open
//! connections, optional TLS, and a graceful stop.
//!
//! Why not `warp::serve`: warp 0.4 builds hyper without a timer, so hyper's
//! `header_read_timeout` never applies and a client that sends half a request line keeps
//! its socket (and its task) for good. Here hyper gets tokio's timer.
//!
//! Why HTTP/1.1 only (no h2c sniffing): everything that reaches these listeners (Twilio's
//! webhooks and WebSocket upgrades, health probes, Prometheus) speaks HTTP/1.1, and
//! hyper-util's protocol sniffing waits for the first 24 bytes with no timer of its own —
//! a connection that sends nothing would stay open.
//!
//! Timeouts: the header timeout runs from the moment hyper waits for a request head,
//! which is both when the connection opens and after every answer on a keep-alive
//! connection, so it is also the idle timeout. A TLS handshake gets the same time.
//!
//! Stop: the loop stops accepting, then takes what the kernel's backlog already holds
//! (a client there may have sent its whole request) and closes the listener; every
//! connection finishes the request it has started, and closes. A connection that has sent
//! nothing yet gets its first request answered (hyper alone would close it at once, under
//! a request that may be on its way), within the header timeout. Only a kept-alive
//! connection between requests closes at once — which is why a draining relay answers
//! with `Connection: close` first.
//!
//! Connection cap: one semaphore permit per accepted connection, held until the socket is
//! closed — for an upgraded WebSocket that is the end of the call, since the permit lives
//! inside the socket hyper hands over. At the cap the loop stops accepting: new clients
//! wait in the kernel's backlog (and are refused by it once that is full) instead of
//! being accepted and closed, so a flood costs no accepted socket and a legitimate
//! client is served as soon as a slot frees up.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The TLS acceptor [`serve`] takes (rustls; see [`crate::tls`] for a reloading one).
pub use tokio_rustls::TlsAcceptor;

/// Limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time a client has to send a complete request head (and, on a kept-alive
    /// connection, to start the next request; for TLS also the handshake).
    pub header_timeout: Duration,
    /// Connections open at once, upgraded ones included; the loop stops accepting above.
    pub max_connections: usize,
}

/// Told about every connection, for metrics. Every method has a no-op default.
pub trait Observer: Send + Sync + 'static {
    /// A connection was accepted (and holds a slot).
    fn opened(&self) {}
    /// A connection's slot was freed: closed, or the upgraded socket dropped.
    fn closed(&self) {}
    /// A client did not send its request head (or finish its handshake) in time.
    fn header_timeout(&self) {}
    /// Every slot is taken: accepting pauses until one frees up.
    fn at_capacity(&self) {}
}

/// The observer that observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {}

/// Serves `service` on `listener` (over TLS when `tls` is set) until `stop` is cancelled,
/// then stops accepting (connections already in the kernel's backlog are still taken and
/// answered), lets the requests in flight finish (kept-alive connections close after their
/// current answer, idle ones at once) and returns when every connection is closed. Upgraded
/// connections are no longer the server's: whoever took the upgrade owns them.
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    limits: Limits,
    observer: Arc<dyn Observer>,
    stop: CancellationToken,
) where
    S: Service<hyper::Request<Incoming>, Response = hyper::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                observer.at_capacity();
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        // The semaphore is never closed.
                        Err(_) => break,
                    },
                    () = stop.cancelled() => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                // Out of file descriptors or similar: waiting beats a hot loop.
                tracing::warn!(error = %e, "Accept failed; pausing briefly.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Without it a 20 ms media frame waits for the ACK of the previous one whenever
        // the round trip exceeds 20 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "Cannot set TCP_NODELAY.");
        }
        observer.opened();
        let held = Held {
            io: tcp,
            _slot: Slot {
                _permit: Some(slot),
                observer: observer.clone(),
            },
        };
        connections.spawn(connection(
            held,
            tls.clone(),
            service.clone(),
            limits.header_timeout,
            observer.clone(),
            stop.clone(),
        ));
    }
    // Clients whose handshake the kernel completed before the stop may have sent their
    // request already: dropping the listener would reset them mid-request. They are
    // accepted and answered like the others (a slot if one is free: the backlog is
    // bounded by the kernel, and this happens once).
    for tcp in accept_backlog(listener) {
        observer.opened();
        let slot = Slot {
            _permit: slots.clone().try_acquire_owned().ok(),
            observer: observer.clone(),
        };
        connections.spawn(connection(
            Held {
                io: tcp,
                _slot: slot,
            },
            tls.clone(),
            service.clone(),
            limits.header_timeout,
            observer.clone(),
            stop.clone(),
        ));
    }
    connections.close();
    connections.wait().await;
}

/// Every connection already waiting in `listener`'s backlog, then closes the listener.
/// Accepted with plain non-blocking `accept` calls, so a connection the kernel completed
/// but tokio's reactor has not reported yet is not missed.
fn accept_backlog(listener: TcpListener) -> Vec<TcpStream> {
    let listener = match listener.into_std() {
        Ok(listener) => listener,
        Err(e) => {
            tracing::debug!(error = %e, "Cannot take the listener back; its backlog is dropped.");
            return Vec::new();
        }
    };
    let mut accepted = Vec::new();
    loop {
        match listener.accept() {
            Ok((tcp, _peer)) => {
                let tcp = tcp
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(tcp));
                match tcp {
                    Ok(tcp) => {
                        let _ = tcp.set_nodelay(true);
                        accepted.push(tcp);
                    }
                    Err(e) => tracing::debug!(error = %e, "A backlog connection is unusable."),
                }
            }
            Err(e) if is_per_connection(&e) => {}
            // WouldBlock: the backlog is empty. Anything else: nothing more to take.
            Err(_) => break,
        }
    }
    accepted
}

/// Errors of one incoming connection (it was reset before `accept` returned): the
/// listener itself is fine.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn connection<S, B>(
    tcp: Held<TcpStream>,
    tls: Option<TlsAcceptor>,
    service: S,
    header_timeout: Duration,
    observer: Arc<dyn Observer>,
    stop: CancellationToken,
) where
    S: Service<hyper::Request<Incoming>, Response = hyper::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tls {
        None => http1(tcp, service, header_timeout, observer, stop).await,
        Some(acceptor) => {
            let Held { io, _slot } = tcp;
            let handshake = tokio::select! {
                done = tokio::time::timeout(header_timeout, acceptor.accept(io)) => done,
                () = stop.cancelled() => return,
            };
            match handshake {
                Ok(Ok(stream)) => {
                    let held = Held { io: stream, _slot };
                    http1(held, service, header_timeout, observer, stop).await;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed."),
                Err(_) => {
                    observer.header_timeout();
                    tracing::debug!("TLS handshake timed out.");
                }
            }
        }
    }
}

async fn http1<IO, S, B>(
    io: IO,
    service: S,
    header_timeout: Duration,
    observer: Arc<dyn Observer>,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<hyper::Request<Incoming>, Response = hyper::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let (first_read, mut read_something) = oneshot::channel();
    let io = FirstRead {
        io,
        first: Some(first_read),
    };
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stop.cancelled() => {
            // hyper's graceful shutdown closes a connection that has read nothing yet at
            // once, but a client that has just connected may be sending its request right
            // now: it gets to arrive first (hyper's header timeout bounds the wait).
            tokio::select! {
                result = conn.as_mut() => result,
                _ = &mut read_something => {
                    // Finish the request in flight, then close instead of keeping alive.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            observer.header_timeout();
        }
        tracing::debug!(error = %e, "HTTP connection ended with an error.");
    }
}

/// A socket that says when its first bytes arrived.
struct FirstRead<IO> {
    io: IO,
    first: Option<oneshot::Sender<()>>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for FirstRead<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before
            && let Some(first) = self.first.take()
        {
            let _ = first.send(());
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FirstRead<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A connection's slot: frees the permit (and tells the observer) when dropped.
struct Slot {
    /// `None` only for a connection taken from the backlog at the stop.
    _permit: Option<OwnedSemaphorePermit>,
    observer: Arc<dyn Observer>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.observer.closed();
    }
}

/// A socket that holds its connection slot for as long as it lives, upgrades included.
struct Held<IO> {
    io: IO,
    _slot: Slot,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Held<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Held<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    //! Over loopback sockets: the real loop, a one-route service.

    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[derive(Default)]
    struct Counts {
        opened: AtomicUsize,
        closed: AtomicUsize,
        timeouts: AtomicUsize,
        at_capacity: AtomicUsize,
    }

    impl Observer for Counts {
        fn opened(&self) {
            self.opened.fetch_add(1, Ordering::SeqCst);
        }
        fn closed(&self) {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
        fn header_timeout(&self) {
            self.timeouts.fetch_add(1, Ordering::SeqCst);
        }
        fn at_capacity(&self) {
            self.at_capacity.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Server {
        addr: std::net::SocketAddr,
        counts: Arc<Counts>,
        stop: CancellationToken,
        done: tokio::task::JoinHandle<()>,
    }

    async fn server(limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let counts = Arc::new(Counts::default());
        let stop = CancellationToken::new();
        // Reads the whole body first, like a form handler.
        let service = hyper::service::service_fn(|req: hyper::Request<Incoming>| async {
            use http_body_util::BodyExt;
            let _ = req.into_body().collect().await;
            Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"ok\n"),
            )))
        });
        let done = tokio::spawn(serve(
            listener,
            None,
            service,
            limits,
            counts.clone(),
            stop.clone(),
        ));
        Server {
            addr,
            counts,
            stop,
            done,
        }
    }

    /// Reads until the server closes the socket (bounded, so a broken server fails the
    /// test instead of hanging it); returns what was read.
    async fn read_to_close(sock: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), sock.read_to_end(&mut out));
        match read.await {
            Ok(Ok(_)) => {}
            // A reset also means closed.
            Ok(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
            Err(_) => panic!("the server never closed the connection"),
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn wait_for(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..400 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{what} never happened");
    }

    const SHORT: Limits = Limits {
        header_timeout: Duration::from_millis(300),
        max_connections: 64,
    };

    #[tokio::test]
    async fn half_sent_silent_and_idle_connections_are_closed() {
        let s = server(SHORT).await;
        let mut half = TcpStream::connect(s.addr).await.expect("connect");
        half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let mut silent = TcpStream::connect(s.addr).await.expect("connect");
        let mut idle = TcpStream::connect(s.addr).await.expect("connect");
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let half_answer = read_to_close(&mut half).await;
        assert!(
            half_answer.is_empty() || half_answer.starts_with("HTTP/1.1 408"),
            "{half_answer}"
        );
        assert_eq!(read_to_close(&mut silent).await, "", "nothing was asked");
        let idle_answer = read_to_close(&mut idle).await;
        assert!(idle_answer.starts_with("HTTP/1.1 200"), "{idle_answer}");
        assert!(idle_answer.ends_with("ok\n"), "one answer, then closed");
        wait_for("three slots freed", || {
            s.counts.closed.load(Ordering::SeqCst) == 3
        })
        .await;
        assert_eq!(s.counts.opened.load(Ordering::SeqCst), 3);
        assert!(s.counts.timeouts.load(Ordering::SeqCst) >= 2);
        s.stop.cancel();
        s.done.await.expect("server ends");
    }

    #[tokio::test]
    async fn a_stop_answers_the_requests_in_flight_and_in_the_backlog() {
        let s = server(Limits {
            header_timeout: Duration::from_secs(60),
            max_connections: 1,
        })
        .await;
        // In flight: the head is in, the body is not.
        let mut slow = TcpStream::connect(s.addr).await.expect("connect");
        slow.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
            .await
            .expect("write");
        wait_for("the cap reached", || {
            s.counts.at_capacity.load(Ordering::SeqCst) >= 1
        })
        .await;
        // In the backlog: the loop is at the cap, so it never accepts this one itself.
        let mut queued = TcpStream::connect(s.addr).await.expect("connect");
        queued
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        s.stop.cancel();
        let answer = read_to_close(&mut queued).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok\n"), "{answer}");
        // The listener is closed by now: a new client is refused.
        assert!(TcpStream::connect(s.addr).await.is_err(), "still accepting");
        slow.write_all(b"cd").await.expect("write");
        let answer = read_to_close(&mut slow).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        s.done.await.expect("server ends");
        assert_eq!(s.counts.opened.load(Ordering::SeqCst), 2);
        assert_eq!(s.counts.closed.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn above_the_cap_clients_wait_until_a_slot_frees() {
        let s = server(Limits {
            header_timeout: Duration::from_secs(60),
            max_connections: 2,
        })
        .await;
        let first = TcpStream::connect(s.addr).await.expect("connect");
        let second = TcpStream::connect(s.addr).await.expect("connect");
        wait_for("the cap reached", || {
            s.counts.at_capacity.load(Ordering::SeqCst) >= 1
        })
        .await;
        // The kernel completes the handshake (backlog); the loop does not accept it.
        let mut third = TcpStream::connect(s.addr).await.expect("connect");
        third
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(s.counts.opened.load(Ordering::SeqCst), 2);
        drop(first);
        let answer = read_to_close(&mut third).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(s.counts.opened.load(Ordering::SeqCst), 3);
        s.stop.cancel();
        // The second connection has sent nothing yet: the stop waits for its request
        // (bounded by the header timeout) rather than cutting it; its client goes away.
        drop(second);
        s.done.await.expect("server ends");
        assert_eq!(s.counts.closed.load(Ordering::SeqCst), 3);
    }
}
