//! `POST /api/twilio/after-simple?stream=&leg=`: the `<Connect action>` of a standalone
//! stream (no `CONTROL_URL`), deciding what the caller gets once the stream is over, as
//! control decides for a stored call (`docs/resilience.md`, "Standalone relays"):
//!
//! - the model failed or could not be reached → the apology of
//!   [`crate::twilio_fallback`], then a `<Dial>` to `RELAY_FALLBACK_DIAL` when set, else a
//!   hang-up;
//! - the agent or the caller ended the call (or a limit did) → `<Hangup/>`; a transfer →
//!   `<Dial>` to its number;
//! - no note of the stream's end ([`crate::stream_ends`]): the relay that carried it
//!   crashed, was cut by its drain, or is another pod → a fresh standalone stream, the
//!   next `leg`, up to [`MAX_LEGS`]; past it (or while the model's circuit breaker is
//!   open) the fallback.
//!
//! Both query parameters are part of the URL Twilio signs, so a forged `leg` (to get
//! streams without end) fails the signature. Not served with a control plane: such a
//! relay never hands this URL out.

use std::convert::Infallible;

use callbridge_proto::paths;
use http::StatusCode;
use tracing::{info, warn};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::call_id::CallId;
use crate::http::{Deps, model_admits, query_param, signed, text, twilio_path, with_query};
use crate::stream_ends::Ended;
use crate::{stream_credential, twilio_fallback, twiml};

/// Largest body accepted (Twilio's voice parameters).
const MAX_FORM_BYTES: u64 = 64 * 1024;

/// Streams a standalone call may get: the voice webhook's and fresh ones after lost ones.
pub const MAX_LEGS: u32 = 3;
/// The answer to a `leg` outside `1..=MAX_LEGS`.
const LEG_INVALID: &str = "leg: not a whole number from 1 to 3\n";

/// What the caller gets after a standalone stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// `<Hangup/>`.
    Hangup,
    /// The apology, then `RELAY_FALLBACK_DIAL` or a hang-up.
    Fallback,
    /// `<Dial>` this number (the agent's transfer).
    Dial(String),
    /// A fresh standalone stream, the call's `leg`th.
    Stream {
        /// Which stream of the call it is.
        leg: u32,
    },
}

/// The decision (module docs): how stream `leg` ended, if known, and whether the model
/// endpoint takes new calls.
pub fn next(ended: Option<Ended>, leg: u32, model_admits: bool) -> Next {
    match ended {
        Some(Ended::Failed) => Next::Fallback,
        Some(Ended::Finished) => Next::Hangup,
        Some(Ended::Transferred(number)) => Next::Dial(number),
        None if leg < MAX_LEGS && model_admits => Next::Stream { leg: leg + 1 },
        None => Next::Fallback,
    }
}

/// The route.
pub fn route(deps: Deps) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    twilio_path(paths::AFTER_SIMPLE)
        .and(warp::path::end())
        .and(warp::post())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::optional::<String>("x-twilio-signature"))
        .and(warp::body::content_length_limit(MAX_FORM_BYTES))
        .and(warp::body::form::<Vec<(String, String)>>())
        .and(warp::any().map(move || deps.clone()))
        .and_then(after_simple)
}

async fn after_simple(
    raw_query: String,
    sig: Option<String>,
    form: Vec<(String, String)>,
    deps: Deps,
) -> Result<Response, Infallible> {
    if deps.call.control.is_some() {
        return Ok(text(StatusCode::NOT_FOUND, "not found\n"));
    }
    let config = deps.call.config.clone();
    let url = with_query(paths::after_simple_path(&config.public_url), &raw_query);
    if !signed(&deps, "action_simple", &url, &form, sig.as_deref()) {
        return Ok(text(StatusCode::FORBIDDEN, "invalid X-Twilio-Signature\n"));
    }
    let stream = match query_param(&raw_query, paths::AFTER_STREAM_PARAM) {
        Some(id) if stream_credential::is_id(&id) => id,
        Some(_) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "stream: not a stream id (32 lowercase hex digits)\n",
            ));
        }
        None => return Ok(text(StatusCode::BAD_REQUEST, "stream: missing\n")),
    };
    let leg = match query_param(&raw_query, paths::AFTER_LEG_PARAM).map(|l| l.parse::<u32>()) {
        Some(Ok(leg)) if (1..=MAX_LEGS).contains(&leg) => leg,
        Some(_) => return Ok(text(StatusCode::BAD_REQUEST, LEG_INVALID)),
        None => return Ok(text(StatusCode::BAD_REQUEST, "leg: missing\n")),
    };
    let ended = deps.call.stream_ends.get(&stream).await;
    let call_sid = crate::http::param(&form, "CallSid");
    let next = next(ended.clone(), leg, model_admits(&deps));
    let body = match next {
        Next::Hangup => twiml::hangup(),
        Next::Dial(number) => twiml::dial(&number),
        Next::Fallback => {
            if ended.is_none() {
                warn!(
                    call_sid,
                    leg,
                    "A standalone stream was lost and no fresh one can follow (the last leg, or the model endpoint is down): the caller gets the fallback."
                );
            }
            twilio_fallback::answer(config.fallback_dial.as_deref())
        }
        Next::Stream { leg } => {
            info!(
                call_sid,
                leg,
                "No note of how the standalone stream ended (its relay stopped, or is another one): a fresh stream."
            );
            let credential = deps.streams.mint_standalone();
            twiml::connect_simple(
                &config.public_url,
                &config.public_ws_base(),
                &credential,
                leg,
            )
        }
    };
    // A draining relay waits for the action requests of the streams it ended (the stream
    // id stands in for the call id standalone calls lack).
    if let Ok(id) = CallId::parse(stream) {
        deps.call.actions_due.answered(&id);
    }
    Ok(warp::reply::with_header(body, "content-type", twiml::CONTENT_TYPE).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decision() {
        assert_eq!(next(Some(Ended::Failed), 1, true), Next::Fallback);
        assert_eq!(next(Some(Ended::Finished), 1, true), Next::Hangup);
        assert_eq!(
            next(Some(Ended::Transferred("+1555".into())), 2, true),
            Next::Dial("+1555".into())
        );
        // No note: a fresh stream, up to the bound.
        assert_eq!(next(None, 1, true), Next::Stream { leg: 2 });
        assert_eq!(
            next(None, MAX_LEGS - 1, true),
            Next::Stream { leg: MAX_LEGS }
        );
        assert_eq!(next(None, MAX_LEGS, true), Next::Fallback);
        // With the breaker open a fresh stream would not be dialled anyway.
        assert_eq!(next(None, 1, false), Next::Fallback);
        // A noted failure gets the fallback whatever the breaker says.
        assert_eq!(next(Some(Ended::Finished), 1, false), Next::Hangup);
    }

    #[test]
    fn the_leg_refusal_names_the_bound() {
        assert!(LEG_INVALID.contains(&format!("from 1 to {MAX_LEGS}")));
    }
}
