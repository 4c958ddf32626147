//! Serving an HTTP application (the MCP front, the metrics endpoint) on a listener: hyper's
//! HTTP/1.1 server, one task per connection, a request-head timeout (`axum::serve` sets none,
//! so a client that sends nothing or dribbles a head would hold its connection for ever), and
//! a graceful shutdown.

use std::sync::Arc;

use axum::Router;
use tokio::net::TcpStream;
use tower::ServiceExt as _;

use crate::answer_polling::{Linger, Lingering};

/// Turns Nagle's algorithm off on an accepted connection. An answer is often written in more
/// than one piece (an SSE response's head, then each event as it comes, such as a progress
/// notification and then the result), and with Nagle a piece waits until the previous one is
/// acknowledged, which the client's delayed ACK can hold up for 40 ms.
pub fn disable_nagle(stream: &mut TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "setting TCP_NODELAY on an accepted connection");
    }
}

/// Serves `router` on `listener` until `shutdown` completes; then no new connection or
/// request is taken, and this returns once the requests already in flight are answered and
/// their connections closed. A client must send a request's head within
/// `header_read_timeout` of the connection asking for one (its first request, or the next on
/// a kept-alive connection), so that connections that send nothing, or dribble headers, are
/// closed rather than held for ever.
pub async fn serve_until<L>(
    mut listener: L,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    header_read_timeout: std::time::Duration,
    linger: std::time::Duration,
) where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
    L::Io: Unpin,
{
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        // Handlers read the client's address as axum's `ConnectInfo`, as with `axum::serve`.
        let service = router.clone().map_request(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                request
            },
        );
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(
                hyper_util::rt::TokioIo::new(Lingering::new(io, Arc::new(Linger::new(linger)))),
                hyper_util::service::TowerToHyperService::new(service),
            );
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
}

/// After a failed `accept` (out of file descriptors, say): logs it and waits a moment, so the
/// accept loop of `listener` does not spin while the condition lasts.
pub async fn pause_after_failed_accept(error: &std::io::Error, listener: &str) {
    tracing::warn!(error = %error, listener, "accepting a connection failed");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}
