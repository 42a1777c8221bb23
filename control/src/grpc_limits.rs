//! Limits of the gRPC server that tonic's builder does not express: a deadline for unary
//! calls that leaves streams alone, and a cap on watch streams per application token.
//!
//! tonic's `Server::builder().timeout(..)` applies to every request, and a streaming RPC
//! "completes" only when its stream ends — a deadline there would cut every live attach
//! and watch stream. [`UnaryTimeout`] wraps a service and times only the methods that
//! stream in neither direction, as read from the descriptor sets the binary serves (so a
//! new streaming method is never timed by mistake).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use prost::Message as _;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

use crate::error::Error;

/// gRPC paths (`/package.Service/Method`) of every method that streams, from encoded
/// `FileDescriptorSet`s.
pub fn streaming_methods(descriptor_sets: &[&[u8]]) -> HashSet<String> {
    let mut out = HashSet::new();
    for set in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = service.name.unwrap_or_default();
                for method in service.method {
                    if method.client_streaming() || method.server_streaming() {
                        let full = if package.is_empty() {
                            service_name.clone()
                        } else {
                            format!("{package}.{service_name}")
                        };
                        out.insert(format!("/{full}/{}", method.name.unwrap_or_default()));
                    }
                }
            }
        }
    }
    out
}

/// A service whose unary methods answer `DEADLINE_EXCEEDED` when they take longer than
/// the timeout; streaming methods pass untouched.
#[derive(Clone)]
pub struct UnaryTimeout<S> {
    inner: S,
    timeout: Duration,
    streaming: Arc<HashSet<String>>,
}

impl<S> UnaryTimeout<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, timeout: Duration, streaming: Arc<HashSet<String>>) -> Self {
        Self {
            inner,
            timeout,
            streaming,
        }
    }
}

impl<S: NamedService> NamedService for UnaryTimeout<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<Body>> for UnaryTimeout<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    B: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let streams = self.streaming.contains(req.uri().path());
        let timeout = self.timeout;
        let fut = self.inner.call(req);
        if streams {
            return Box::pin(async move { Ok(fut.await?.map(Body::new)) });
        }
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(result) => Ok(result?.map(Body::new)),
                Err(_) => Ok(Status::from(Error::UnaryTimeout {
                    ms: timeout.as_millis(),
                })
                .into_http()),
            }
        })
    }
}

/// Which token a request was authenticated with: its index in the accepted list (`None`
/// when auth is off). Put in the request's extensions by [`crate::auth::Auth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenId(pub Option<usize>);

/// Open watch streams per token, capped.
#[derive(Debug)]
pub struct WatchSlots {
    cap: usize,
    open: Mutex<HashMap<TokenId, usize>>,
}

/// One open watch stream's place; freed when dropped (the stream task ends).
#[derive(Debug)]
pub struct WatchSlot {
    slots: Arc<WatchSlots>,
    token: TokenId,
}

impl WatchSlots {
    /// At most `cap` watch streams per token.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more stream of `token`, or [`Error::TooManyWatchStreams`].
    pub fn acquire(self: &Arc<Self>, token: TokenId) -> Result<WatchSlot, Error> {
        let mut open = match self.open.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let count = open.entry(token).or_insert(0);
        if *count >= self.cap {
            return Err(Error::TooManyWatchStreams { cap: self.cap });
        }
        *count += 1;
        Ok(WatchSlot {
            slots: self.clone(),
            token,
        })
    }

    /// Streams open for `token` now.
    pub fn open(&self, token: TokenId) -> usize {
        let open = match self.open.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        open.get(&token).copied().unwrap_or(0)
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = match self.slots.open.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(count) = open.get_mut(&self.token) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_streaming_methods_are_read_from_the_descriptors() {
        let streaming = streaming_methods(&[
            callbridge_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ]);
        for method in [
            "/callbridge.v1.Relay/Attach",
            "/callbridge.v1.Calls/WatchCall",
            "/callbridge.v1.Calls/WatchCalls",
            "/callbridge.v1.Calls/WatchCampaign",
            "/grpc.health.v1.Health/Watch",
        ] {
            assert!(streaming.contains(method), "{method} in {streaming:?}");
        }
        for unary in [
            "/callbridge.v1.Calls/GetCall",
            "/callbridge.v1.Relay/Admit",
            "/grpc.health.v1.Health/Check",
        ] {
            assert!(!streaming.contains(unary), "{unary}");
        }
    }

    /// A service that answers after `delay`, with an empty body.
    #[derive(Clone)]
    struct Slow(Duration);

    impl Service<http::Request<Body>> for Slow {
        type Response = http::Response<Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            let delay = self.0;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(http::Response::new(Body::empty()))
            })
        }
    }

    fn request(path: &str) -> http::Request<Body> {
        http::Request::builder()
            .uri(path)
            .body(Body::empty())
            .expect("request")
    }

    #[tokio::test]
    async fn unary_calls_past_the_deadline_answer_deadline_exceeded_and_streams_are_spared() {
        let streaming = Arc::new(streaming_methods(&[callbridge_proto::FILE_DESCRIPTOR_SET]));
        let mut svc = UnaryTimeout::new(
            Slow(Duration::from_millis(1500)),
            Duration::from_millis(100),
            streaming,
        );
        let resp = svc
            .call(request("/callbridge.v1.Calls/GetCall"))
            .await
            .expect("answered");
        assert_eq!(resp.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
        let message = resp.headers()["grpc-message"].to_str().expect("ascii");
        assert!(
            message.contains("CONTROL_GRPC_UNARY_TIMEOUT_MS"),
            "{message}"
        );
        // A stream runs for as long as it runs: the inner answer, not a deadline.
        let resp = svc
            .call(request("/callbridge.v1.Relay/Attach"))
            .await
            .expect("answered");
        assert!(resp.headers().get("grpc-status").is_none(), "not cut");
        // A quick unary call is untouched.
        let mut quick = UnaryTimeout::new(
            Slow(Duration::from_millis(10)),
            Duration::from_secs(1),
            Arc::new(HashSet::new()),
        );
        let resp = quick
            .call(request("/callbridge.v1.Calls/GetCall"))
            .await
            .expect("answered");
        assert!(resp.headers().get("grpc-status").is_none());
    }

    #[test]
    fn watch_slots_cap_each_token_and_free_on_drop() {
        let slots = WatchSlots::new(2);
        let a = TokenId(Some(0));
        let b = TokenId(Some(1));
        let first = slots.acquire(a).expect("first");
        let _second = slots.acquire(a).expect("second");
        let err = Status::from(slots.acquire(a).expect_err("third"));
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("CONTROL_WATCH_STREAMS_PER_TOKEN"));
        let _other = slots.acquire(b).expect("another token has its own cap");
        drop(first);
        assert_eq!(slots.open(a), 1);
        let _again = slots.acquire(a).expect("a freed place");
    }
}
