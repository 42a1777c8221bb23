//! `POST /api/twilio/fallback`: the phone number's fallback URL. Twilio asks it when the
//! voice webhook fails (an error status, a timeout, a refused connection); it answers from
//! the relay's own configuration only — the agent-independent apology, then a `<Dial>` to
//! `RELAY_FALLBACK_DIAL` when set, else a hang-up — so it works with control down and
//! while the relay drains. Signed like every webhook.

use std::convert::Infallible;

use callbridge_proto::{paths, pb};
use http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::http::{Deps, signed, text, twilio_path, with_query};
use crate::twiml;

/// Largest body accepted (Twilio's voice parameters plus `ErrorCode` and `ErrorUrl`).
const MAX_FORM_BYTES: u64 = 64 * 1024;

/// Said before the fallback dial.
pub const CONNECTING: &str =
    "Sorry, our assistant is not available right now. Please hold while we connect you.";

/// The route.
pub fn route(deps: Deps) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    twilio_path(paths::FALLBACK)
        .and(warp::path::end())
        .and(warp::post())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::optional::<String>("x-twilio-signature"))
        .and(warp::body::content_length_limit(MAX_FORM_BYTES))
        .and(warp::body::form::<Vec<(String, String)>>())
        .and(warp::any().map(move || deps.clone()))
        .and_then(fallback)
}

async fn fallback(
    raw_query: String,
    sig: Option<String>,
    form: Vec<(String, String)>,
    deps: Deps,
) -> Result<Response, Infallible> {
    let config = &deps.call.config;
    let url = with_query(paths::fallback(&config.public_url), &raw_query);
    if !signed(&deps, "fallback", &url, &form, sig.as_deref()) {
        return Ok(text(StatusCode::FORBIDDEN, "invalid X-Twilio-Signature\n"));
    }
    tracing::warn!(
        call_sid = crate::http::param(&form, "CallSid"),
        error_code = crate::http::param(&form, "ErrorCode"),
        "Twilio asked the fallback URL: the voice webhook failed."
    );
    Ok(xml(answer(config.fallback_dial.as_deref())))
}

/// The TwiML of the fallback route.
pub fn answer(dial: Option<&str>) -> String {
    match dial {
        Some(number) => twiml::fallback(Some(&pb::Fallback {
            preamble: CONNECTING.to_owned(),
            action: Some(pb::fallback::Action::DialNumber(number.to_owned())),
        })),
        None => twiml::fallback(None),
    }
}

fn xml(body: String) -> Response {
    warp::reply::with_header(body, "content-type", twiml::CONTENT_TYPE).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_apology_then_a_dial_or_a_hang_up() {
        assert!(
            answer(None).ends_with(&format!(
                "<Response><Say>{}</Say><Hangup/></Response>",
                twiml::DEFAULT_APOLOGY
            )),
            "{}",
            answer(None)
        );
        assert!(
            answer(Some("+14155550111")).ends_with(&format!(
                "<Response><Say>{CONNECTING}</Say><Dial>+14155550111</Dial></Response>"
            )),
            "{}",
            answer(Some("+14155550111"))
        );
    }
}
