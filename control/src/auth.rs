//! Bearer-token checks for the public and relay services (constant-time comparison).

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::config::Secret;
use crate::metrics::{AuthLabels, Metrics};

/// Which API a token list guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `Agents` and `Calls`.
    Public,
    /// `Relay`.
    Relay,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Api::Public => "public",
            Api::Relay => "relay",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Api::Public => "the public API (Agents, Calls)",
            Api::Relay => "the relay API (Relay)",
        }
    }
}

/// A tonic interceptor accepting only this API's tokens.
#[derive(Clone)]
pub struct Auth {
    api: Api,
    accepted: Arc<Vec<Secret>>,
    other: Arc<Vec<Secret>>,
    open: bool,
    metrics: Option<Arc<Metrics>>,
}

impl Auth {
    /// Guards `api` with `accepted`; `other` (the other API's tokens) only sharpens the
    /// refusal message. `open` (no tokens configured, insecure mode) lets everyone in.
    pub fn new(api: Api, accepted: Vec<Secret>, other: Vec<Secret>, open: bool) -> Self {
        Auth {
            api,
            accepted: Arc::new(accepted),
            other: Arc::new(other),
            open,
            metrics: None,
        }
    }

    /// Counts refusals in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Which entry of `list` is `token`; every entry is compared, in constant time each.
    fn position(list: &[Secret], token: &[u8]) -> Option<usize> {
        list.iter().enumerate().fold(None, |found, (i, secret)| {
            let hit = bool::from(secret.expose().as_bytes().ct_eq(token));
            found.or(hit.then_some(i))
        })
    }

    fn matches(list: &[Secret], token: &[u8]) -> bool {
        // Every entry is compared (no early exit) so timing does not reveal which one matched.
        list.iter().fold(false, |found, secret| {
            found | bool::from(secret.expose().as_bytes().ct_eq(token))
        })
    }

    /// Checks the `authorization` header of a request.
    pub fn check(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<crate::grpc_limits::TokenId, Status> {
        if self.open {
            return Ok(crate::grpc_limits::TokenId(None));
        }
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token>"))?;
        let value = header
            .to_str()
            .map_err(|_| Status::unauthenticated("authorization header is not ASCII"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be 'Bearer <token>'"))?
            .trim()
            .as_bytes();
        if let Some(index) = Self::position(&self.accepted, token) {
            return Ok(crate::grpc_limits::TokenId(Some(index)));
        }
        if Self::matches(&self.other, token) {
            let kind = match self.api {
                Api::Public => "a relay token",
                Api::Relay => "an application token",
            };
            return Err(Status::unauthenticated(format!(
                "{kind} cannot be used on {}",
                self.api.name()
            )));
        }
        Err(Status::unauthenticated(format!(
            "invalid token for {}",
            self.api.name()
        )))
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        // Which token it was: the watch-stream cap counts per token.
        let status = match self.check(request.metadata()) {
            Ok(token) => {
                request.extensions_mut().insert(token);
                return Ok(request);
            }
            Err(status) => status,
        };
        if let Some(metrics) = &self.metrics {
            metrics
                .auth_refused
                .get_or_create(&AuthLabels {
                    api: self.api.label(),
                })
                .inc();
        }
        // The token itself is never logged.
        tracing::debug!(
            api = self.api.label(),
            reason = status.message(),
            "Request refused."
        );
        Err(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(value: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("authorization", value.parse().expect("ascii"));
        m
    }

    #[test]
    fn tokens_of_the_other_api_are_refused_with_a_clear_message() {
        let public = Auth::new(
            Api::Public,
            vec![Secret::new("app")],
            vec![Secret::new("relay")],
            false,
        );
        assert!(public.check(&md("Bearer app")).is_ok());
        let err = public.check(&md("Bearer relay")).expect_err("relay token");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("relay token"), "{}", err.message());
        let err = public.check(&md("Bearer nope")).expect_err("wrong");
        assert!(err.message().contains("invalid token"));
        let err = public
            .check(&tonic::metadata::MetadataMap::new())
            .expect_err("none");
        assert!(err.message().contains("missing"));
    }
}
