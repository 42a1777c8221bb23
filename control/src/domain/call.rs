//! Call lifecycle rules, independent of gRPC and Redis: status order, what an event
//! changes, transcripts, what happens after a stream, usage sums.

use std::collections::HashMap;

use callbridge_proto::pb;
use pb::call_event::Kind;

use super::ids::{CallSid, RelayId, StreamCredentialId, StreamSid, or_empty};
use super::record::{self, CallRecord, EndedEffect, EventEffects, StartedEffect, UsageCounters};
use crate::error::Error;

/// Position of a status in the one-way order; all final statuses share the top rank.
pub fn status_rank(status: pb::CallStatus) -> i32 {
    match status {
        pb::CallStatus::Created => 1,
        pb::CallStatus::Ringing => 2,
        pb::CallStatus::InProgress => 3,
        pb::CallStatus::Completed
        | pb::CallStatus::Failed
        | pb::CallStatus::NoAnswer
        | pb::CallStatus::Canceled
        | pb::CallStatus::Busy => 4,
        pb::CallStatus::Unspecified => 0,
    }
}

/// Whether a status is final.
pub fn is_final(status: pb::CallStatus) -> bool {
    status_rank(status) >= 4
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What storing `event` changes on its call. Refuses events without a kind, and ids in a
/// `started` event that are not ids.
pub fn event_effects(event: &pb::CallEvent) -> Result<EventEffects, Error> {
    let kind = event
        .kind
        .as_ref()
        .ok_or_else(|| Error::invalid("event.kind", "an event needs a kind"))?;
    let mut effects = EventEffects {
        at_ms: if event.at_ms > 0 {
            event.at_ms
        } else {
            now_ms()
        },
        ..EventEffects::default()
    };
    match kind {
        Kind::Started(started) => {
            effects.new_status = Some(pb::CallStatus::InProgress);
            effects.started = Some(StartedEffect {
                twilio_call_sid: CallSid::parse_optional(
                    "event.started.twilio_call_sid",
                    started.twilio_call_sid.as_str(),
                )?,
                stream_sid: StreamSid::parse_optional(
                    "event.started.stream_sid",
                    started.stream_sid.as_str(),
                )?,
                relay_id: RelayId::parse_optional(
                    "event.started.relay_id",
                    started.relay_id.as_str(),
                )?,
            });
        }
        Kind::Ended(ended) => {
            let reason = record::end_reason(ended.reason).unwrap_or(pb::EndReason::Unspecified);
            if reason == pb::EndReason::Handoff {
                effects.handoff = true;
            } else {
                let status = match reason {
                    pb::EndReason::InternalError
                    | pb::EndReason::RelayLost
                    | pb::EndReason::DialFailed => pb::CallStatus::Failed,
                    pb::EndReason::DialBusy => pb::CallStatus::Busy,
                    pb::EndReason::DialNoAnswer => pb::CallStatus::NoAnswer,
                    pb::EndReason::DialCanceled => pb::CallStatus::Canceled,
                    _ => pb::CallStatus::Completed,
                };
                // The relay's word goes into a `<Dial>` and the record: only a number.
                if !ended.transfer_to.is_empty() {
                    crate::validate::e164("event.ended.transfer_to", &ended.transfer_to)?;
                }
                effects.new_status = Some(status);
                effects.ended = Some(EndedEffect {
                    reason,
                    detail: ended.detail.clone(),
                    transfer_to: ended.transfer_to.clone(),
                });
            }
        }
        Kind::Usage(usage) => effects.usage = Some(usage_counters(usage)),
        _ => {}
    }
    Ok(effects)
}

/// Whether an event ends the call for good (an `ended` that is not a hand-off).
pub fn is_final_event(event: &pb::CallEvent) -> bool {
    matches!(&event.kind, Some(Kind::Ended(e)) if e.reason != pb::EndReason::Handoff as i32)
}

/// The stored counters for one usage event (one response).
pub fn usage_counters(u: &pb::Usage) -> UsageCounters {
    [
        u.input_tokens,
        u.output_tokens,
        u.total_tokens,
        u.input_text_tokens,
        u.input_audio_tokens,
        u.cached_tokens,
        u.output_text_tokens,
        u.output_audio_tokens,
        1,
    ]
}

/// Usage of one call as the API shows it.
pub fn usage_of(call: &CallRecord) -> pb::Usage {
    let c = call.usage;
    pb::Usage {
        input_tokens: c[0],
        output_tokens: c[1],
        total_tokens: c[2],
        input_text_tokens: c[3],
        input_audio_tokens: c[4],
        cached_tokens: c[5],
        output_text_tokens: c[6],
        output_audio_tokens: c[7],
        responses: c[8],
        calls: 1,
    }
}

/// Adds `b` into `a`.
pub fn add_usage(a: &mut pb::Usage, b: &pb::Usage) {
    a.input_tokens += b.input_tokens;
    a.output_tokens += b.output_tokens;
    a.total_tokens += b.total_tokens;
    a.input_text_tokens += b.input_text_tokens;
    a.input_audio_tokens += b.input_audio_tokens;
    a.cached_tokens += b.cached_tokens;
    a.output_text_tokens += b.output_text_tokens;
    a.output_audio_tokens += b.output_audio_tokens;
    a.responses += b.responses;
    a.calls += b.calls;
}

/// The API view of a stored call: where the typed ids become proto strings again
/// (none as "").
pub fn call_to_pb(call: &CallRecord) -> pb::Call {
    pb::Call {
        call_id: call.call_id.to_string(),
        agent_id: call.agent_id.to_string(),
        direction: call.direction as i32,
        status: call.status as i32,
        from: call.from.clone(),
        to: call.to.clone(),
        campaign_id: or_empty(call.campaign_id.as_ref()).to_owned(),
        twilio_call_sid: or_empty(call.twilio_call_sid.as_ref()).to_owned(),
        stream_sid: or_empty(call.stream_sid.as_ref()).to_owned(),
        relay_id: or_empty(call.relay_id.as_ref()).to_owned(),
        created_at_ms: call.created_at_ms,
        started_at_ms: call.started_at_ms,
        ended_at_ms: call.ended_at_ms,
        end_reason: call.end_reason.map_or(0, |r| r as i32),
        end_detail: call.end_detail.clone().unwrap_or_default(),
        metadata: call.metadata.clone().into_iter().collect(),
        usage: Some(usage_of(call)),
        last_seq: call.last_seq,
        transfer_to: call.transfer_to.clone().unwrap_or_default(),
        dialed: call.dialed,
        twilio_status: call
            .twilio_status
            .map_or_else(String::new, |s| s.as_str().to_owned()),
        twilio_error_code: call.twilio_error_code,
        twilio_error_message: call.twilio_error_message.clone(),
        answered_by: call.answered_by.clone().unwrap_or_default(),
    }
}

/// Ordered turns from stored events: speech of both sides (assistant turns carry
/// their interruption), tool calls and results, DTMF.
pub fn transcript(events: &[pb::CallEvent]) -> Vec<pb::Turn> {
    use pb::turn::Kind as T;
    let mut turns: Vec<pb::Turn> = Vec::new();
    // Interruptions may arrive before or after the assistant's transcript of the item.
    let mut assistant_at: HashMap<String, usize> = HashMap::new();
    let mut early_interruptions: HashMap<String, u32> = HashMap::new();
    for event in events {
        let kind = match &event.kind {
            Some(Kind::Caller(c)) => T::Caller(c.clone()),
            Some(Kind::Assistant(a)) => {
                let mut a = a.clone();
                if let Some(heard) = early_interruptions.remove(&a.item_id) {
                    a.interrupted = true;
                    a.heard_ms = heard;
                }
                if !a.item_id.is_empty() {
                    assistant_at.insert(a.item_id.clone(), turns.len());
                }
                T::Assistant(a)
            }
            Some(Kind::Interruption(i)) => {
                match assistant_at
                    .get(&i.item_id)
                    .and_then(|&at| turns.get_mut(at))
                {
                    Some(pb::Turn {
                        kind: Some(T::Assistant(a)),
                        ..
                    }) => {
                        a.interrupted = true;
                        a.heard_ms = i.heard_ms;
                    }
                    _ => {
                        early_interruptions.insert(i.item_id.clone(), i.heard_ms);
                    }
                }
                continue;
            }
            Some(Kind::ToolCall(t)) => T::ToolCall(t.clone()),
            Some(Kind::ToolResult(t)) => T::ToolResult(t.clone()),
            Some(Kind::Dtmf(d)) => T::Dtmf(d.clone()),
            _ => continue,
        };
        turns.push(pb::Turn {
            seq: event.seq,
            at_ms: event.at_ms,
            kind: Some(kind),
        });
    }
    turns
}

/// A default apology when an agent has no fallback.
fn default_fallback() -> pb::Fallback {
    pb::Fallback {
        action: Some(pb::fallback::Action::Say(pb::Say {
            text:
                "We are sorry, the assistant is not available right now. Please call again later."
                    .to_owned(),
            voice: String::new(),
            language: String::new(),
        })),
        preamble: String::new(),
    }
}

/// Which stream an action request (`<Connect action>`) speaks for: the action URL's
/// `stream` and `after` query parameters, as the relay that minted the TwiML wrote them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterAsk {
    /// A URL written by a relay older than the rule (no `stream` parameter): answered as
    /// before, for rolling upgrades.
    Unnamed,
    /// The TwiML's own stream, and the stream that one was minted to follow (none for a
    /// call's first stream).
    Stream {
        /// The credential id of the stream whose action this is.
        stream: StreamCredentialId,
        /// The stream it followed.
        after: Option<StreamCredentialId>,
    },
}

impl AfterAsk {
    /// Whether the request speaks for the call's current stream: the one holding (or last
    /// holding) its lease, or — when Twilio's new stream never attached — the stream that
    /// one was to follow.
    pub fn names_current_stream(&self, call: &CallRecord) -> bool {
        match self {
            AfterAsk::Unnamed => true,
            AfterAsk::Stream { stream, after } => {
                call.lease_stream.as_ref() == Some(stream)
                    || after.as_ref() == call.lease_stream.as_ref()
            }
        }
    }
}

/// Whether a stream's end leads to a new stream for the same call (`resume`).
///
/// The rule (docs/resilience.md, "The rule"): a call that has not reported an end is
/// resumed, always — whatever its lease says — when the action request speaks for the
/// call's current stream. The lease cannot tell a dead relay from a live one in time: a
/// relay killed a millisecond ago still holds it until control sees its attach stream
/// break, a frozen or partitioned one until the lease lapses, and Twilio only asks the
/// action URL once the stream is over anyway. Two exceptions get the hang-up: a call that
/// never had a stream attached (it is not in the lease index, so nothing would ever end a
/// loop of refused streams), and an action request of an earlier stream — a replay, since
/// Twilio asks each action URL once, when its stream is over and before the next stream
/// exists; answering it `resume` would hand its holder a way into the live call.
pub fn resumes(call: &CallRecord, ask: &AfterAsk) -> bool {
    !is_final(call.status)
        && (call.attached_once() || call.end_reason == Some(pb::EndReason::Handoff))
        && ask.names_current_stream(call)
}

/// What the caller gets at `<Connect action>` time (see docs/contract-notes.md).
pub fn after(
    call: &CallRecord,
    agent: Option<&pb::Agent>,
    ask: &AfterAsk,
) -> pb::after_response::Next {
    use pb::after_response::Next;
    let reason = call.end_reason.unwrap_or(pb::EndReason::Unspecified);
    if is_final(call.status) {
        return match reason {
            pb::EndReason::Transferred if call.transfer_to.is_some() => {
                Next::DialNumber(call.transfer_to.clone().unwrap_or_default())
            }
            // A voicemail Twilio says or plays (a spoken one was left on the stream).
            pb::EndReason::VoicemailLeft => agent
                .and_then(|a| a.settings.as_ref())
                .and_then(|s| s.voicemail.clone())
                .filter(|v| {
                    matches!(
                        v.message,
                        Some(pb::voicemail::Message::Say(_) | pb::voicemail::Message::PlayUrl(_))
                    )
                })
                .map_or(Next::Hangup(pb::HangupNext {}), Next::Voicemail),
            // DRAIN: a relay shut down before it found a quiet moment to hand the call
            // off; the caller is better off with the agent's fallback than a hang-up.
            pb::EndReason::ModelUnavailable
            | pb::EndReason::InternalError
            | pb::EndReason::Drain => Next::Fallback(
                agent
                    .and_then(|a| a.settings.as_ref())
                    .and_then(|s| s.fallback.clone())
                    .filter(|f| f.action.is_some())
                    .unwrap_or_else(default_fallback),
            ),
            _ => Next::Hangup(pb::HangupNext {}),
        };
    }
    if resumes(call, ask) {
        Next::Resume(pb::ResumeNext {
            takes_over_stream_id: call
                .lease_stream
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
        })
    } else {
        Next::Hangup(pb::HangupNext {})
    }
}

/// Where an attaching stream's credential came from (`AttachOpen.stream_origin`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StreamOrigin {
    /// No origin claimed: a reconnect (no credential), or a relay older than the rule.
    #[default]
    Unspecified,
    /// The voice webhook's TwiML: the call's first stream.
    First,
    /// An action answer (Resume), minted to follow `takes_over` (none: the call's record
    /// named no stream then).
    Resume {
        /// The stream it replaces.
        takes_over: Option<StreamCredentialId>,
    },
}

/// How an attach may take a live call's lease ([`lease_claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseClaim {
    /// Nobody holds it (released, lapsed, or never taken).
    Free,
    /// The holder's own relay re-attaching its stream (`reconnect`).
    Reconnect,
    /// A new stream, proven by a fresh stream credential minted to follow the holder's
    /// stream, takes the call from the holder.
    TakeOver,
    /// Someone else holds it: refused.
    Held,
    /// The stream was minted for a call state that is gone — a first stream of a call
    /// that has had one, or a stream following another than the call's current one (a
    /// replayed voice webhook or action request): refused, whoever holds the lease.
    Superseded,
}

/// Whether an attach of `relay_id` may take `call`'s lease at `now_ms` (the lease rule of
/// every store; the Redis script mirrors it, the conformance suite holds both to it).
///
/// Twilio carries one stream per call, and a stream credential is minted for one
/// `<Stream>` and consumed once. A resumed stream's credential names the stream it
/// follows, the one control named when it answered the action request: if that is still
/// the call's lease stream, Twilio opened the new stream because the old one is over,
/// whether or not control has seen its relay die, so the attach takes the call over and
/// the old holder is fenced (its renewals, releases and event writes are refused from
/// then on). A credential that follows any other stream, or a first stream's credential
/// once the call has had a stream, comes from a replayed request and is refused. A
/// reconnect carries no credential, so it proves nothing about the Twilio stream and is
/// refused while another relay holds the lease.
pub fn lease_claim(
    call: &CallRecord,
    relay_id: &RelayId,
    reconnect: bool,
    fresh_credential: bool,
    origin: &StreamOrigin,
    now_ms: i64,
) -> LeaseClaim {
    if !reconnect {
        let superseded = match origin {
            StreamOrigin::Unspecified => false,
            StreamOrigin::First => call.attached_once(),
            StreamOrigin::Resume { takes_over } => takes_over != &call.lease_stream,
        };
        if superseded {
            return LeaseClaim::Superseded;
        }
    }
    if !call.lease_held(now_ms) {
        LeaseClaim::Free
    } else if reconnect && call.lease_relay.as_ref() == Some(relay_id) {
        LeaseClaim::Reconnect
    } else if fresh_credential && !reconnect && *origin != StreamOrigin::First {
        LeaseClaim::TakeOver
    } else {
        LeaseClaim::Held
    }
}

/// Whether an attach whose credential is already consumed is its own stream's retry: the
/// attach that consumed it committed (the credential names the call's lease stream) but
/// its answer was lost, and the relay tries again with the same attempt id. Only the
/// relay that admitted the stream knows that id, so a replay of the credential — on any
/// relay, this one included — draws another and stays `credential_used`.
pub fn retries_committed_attach(
    call: &CallRecord,
    credential: &StreamCredentialId,
    recorded_attempt: &str,
    attempt: Option<&StreamCredentialId>,
) -> bool {
    !recorded_attempt.is_empty()
        && attempt.is_some_and(|a| a.as_str() == recorded_attempt)
        && call.lease_stream.as_ref() == Some(credential)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::{AgentId, CallId, LeaseHolder};

    fn ev(seq: u64, kind: Kind) -> pb::CallEvent {
        pb::CallEvent {
            call_id: "c".into(),
            seq,
            at_ms: 1000 + seq as i64,
            kind: Some(kind),
        }
    }

    #[test]
    fn status_order_is_one_way() {
        use pb::CallStatus::*;
        assert!(status_rank(Created) < status_rank(Ringing));
        assert!(status_rank(Ringing) < status_rank(InProgress));
        for s in [Completed, Failed, NoAnswer, Canceled] {
            assert!(status_rank(InProgress) < status_rank(s));
            assert!(is_final(s));
        }
        assert_eq!(status_rank(Completed), status_rank(Canceled));
    }

    #[test]
    fn ended_events_pick_the_final_status() {
        let end = |reason: pb::EndReason| {
            event_effects(&ev(
                1,
                Kind::Ended(pb::Ended {
                    reason: reason as i32,
                    ..Default::default()
                }),
            ))
            .expect("valid")
        };
        assert_eq!(
            end(pb::EndReason::CallerHangup).new_status,
            Some(pb::CallStatus::Completed)
        );
        assert_eq!(
            end(pb::EndReason::InternalError).new_status,
            Some(pb::CallStatus::Failed)
        );
        let handoff = end(pb::EndReason::Handoff);
        assert_eq!(handoff.new_status, None);
        assert!(handoff.handoff && handoff.ended.is_none());
        let err = event_effects(&pb::CallEvent::default()).expect_err("no kind");
        assert!(err.to_string().contains("event.kind"));
    }

    #[test]
    fn ended_events_carry_only_e164_transfer_targets() {
        let transferred = |to: &str| {
            event_effects(&ev(
                1,
                Kind::Ended(pb::Ended {
                    reason: pb::EndReason::Transferred as i32,
                    detail: String::new(),
                    transfer_to: to.into(),
                }),
            ))
        };
        let effects = transferred("+15550001111").expect("valid");
        assert_eq!(effects.ended.expect("ended").transfer_to, "+15550001111");
        for bad in [
            "sip:evil@example.com",
            "+1555<Dial>",
            "15550001111",
            "+0123",
        ] {
            let err = transferred(bad).expect_err(bad);
            assert!(
                err.to_string().contains("event.ended.transfer_to"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn started_events_carry_checked_ids() {
        let started = |sid: &str, stream: &str| {
            event_effects(&ev(
                1,
                Kind::Started(pb::Started {
                    twilio_call_sid: sid.into(),
                    stream_sid: stream.into(),
                    relay_id: "relay-1".into(),
                    resumed: false,
                }),
            ))
        };
        let sid = "CA0123456789abcdef0123456789abcdef";
        let effects = started(sid, "MZ1").expect("valid");
        assert_eq!(effects.new_status, Some(pb::CallStatus::InProgress));
        let got = effects.started.expect("a started effect");
        assert_eq!(
            got.twilio_call_sid.map(CallSid::into_string).as_deref(),
            Some(sid)
        );
        assert_eq!(
            got.stream_sid.map(StreamSid::into_string).as_deref(),
            Some("MZ1")
        );
        let none = started("", "").expect("absent ids are none").started;
        assert_eq!(
            none.map(|s| (s.twilio_call_sid, s.stream_sid)),
            Some((None, None))
        );
        let err = started("CA1", "MZ1").expect_err("not a sid");
        assert!(
            err.to_string()
                .starts_with("event.started.twilio_call_sid:"),
            "{err}"
        );
        let err = started(sid, "MZ 1").expect_err("not an id");
        assert!(
            err.to_string().starts_with("event.started.stream_sid:"),
            "{err}"
        );
    }

    #[test]
    fn transcript_marks_interrupted_assistant_turns_either_order() {
        let events = vec![
            ev(
                1,
                Kind::Caller(pb::CallerSpeech {
                    item_id: "u1".into(),
                    text: "hi".into(),
                }),
            ),
            ev(
                2,
                Kind::Interruption(pb::Interruption {
                    item_id: "a1".into(),
                    heard_ms: 420,
                    audio_ms: 900,
                }),
            ),
            ev(
                3,
                Kind::Assistant(pb::AssistantSpeech {
                    item_id: "a1".into(),
                    text: "hello there".into(),
                    ..Default::default()
                }),
            ),
            ev(
                4,
                Kind::Assistant(pb::AssistantSpeech {
                    item_id: "a2".into(),
                    text: "how".into(),
                    heard_ms: 50,
                    ..Default::default()
                }),
            ),
            ev(
                5,
                Kind::Interruption(pb::Interruption {
                    item_id: "a2".into(),
                    heard_ms: 30,
                    audio_ms: 50,
                }),
            ),
            ev(6, Kind::Dtmf(pb::Dtmf { digit: "5".into() })),
            ev(7, Kind::Usage(pb::Usage::default())),
        ];
        let turns = transcript(&events);
        let seqs: Vec<u64> = turns.iter().map(|t| t.seq).collect();
        assert_eq!(seqs, vec![1, 3, 4, 6]);
        match &turns[1].kind {
            Some(pb::turn::Kind::Assistant(a)) => assert!(a.interrupted && a.heard_ms == 420),
            other => panic!("expected assistant, got {other:?}"),
        }
        match &turns[2].kind {
            Some(pb::turn::Kind::Assistant(a)) => assert!(a.interrupted && a.heard_ms == 30),
            other => panic!("expected assistant, got {other:?}"),
        }
    }

    fn sid(n: u8) -> StreamCredentialId {
        StreamCredentialId::parse("stream", format!("{n:032x}")).expect("valid")
    }

    fn ask(stream: u8, after: Option<u8>) -> AfterAsk {
        AfterAsk::Stream {
            stream: sid(stream),
            after: after.map(sid),
        }
    }

    #[test]
    fn after_follows_the_contract_notes() {
        use pb::after_response::Next;
        let blank = || {
            CallRecord::new(
                CallId::parse("call_id", "c").expect("valid"),
                AgentId::parse("agent_id", "a").expect("valid"),
                pb::Direction::Inbound,
                pb::CallStatus::Created,
                0,
            )
        };
        let current = ask(1, None);
        let mut call = CallRecord {
            status: pb::CallStatus::Completed,
            end_reason: Some(pb::EndReason::Transferred),
            transfer_to: Some("+15550001111".into()),
            ..blank()
        };
        assert_eq!(
            after(&call, None, &current),
            Next::DialNumber("+15550001111".into())
        );
        call.end_reason = Some(pb::EndReason::ModelUnavailable);
        assert!(matches!(after(&call, None, &current), Next::Fallback(f) if f.action.is_some()));
        call.end_reason = Some(pb::EndReason::Drain);
        assert!(matches!(after(&call, None, &current), Next::Fallback(f) if f.action.is_some()));
        call.end_reason = Some(pb::EndReason::CallerHangup);
        assert!(matches!(after(&call, None, &current), Next::Hangup(_)));
        // A voicemail for Twilio to say or play comes after the stream; a spoken one (or
        // none) was on it.
        call.end_reason = Some(pb::EndReason::VoicemailLeft);
        let agent_with = |message| pb::Agent {
            settings: Some(pb::AgentSettings {
                voicemail: Some(pb::Voicemail {
                    message: Some(message),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        use pb::voicemail::Message;
        let play = agent_with(Message::PlayUrl("https://a.test/vm.mp3".into()));
        assert!(matches!(
            after(&call, Some(&play), &current),
            Next::Voicemail(pb::Voicemail { message: Some(Message::PlayUrl(u)) }) if u == "https://a.test/vm.mp3"
        ));
        let spoken = agent_with(Message::SpokenText("Call us back.".into()));
        assert!(matches!(
            after(&call, Some(&spoken), &current),
            Next::Hangup(_)
        ));
        assert!(matches!(after(&call, None, &current), Next::Hangup(_)));
        // A live call resumes whatever its lease says: released, held by a relay that may
        // be dead, lapsed, or never released; the new stream is to take over stream 1.
        let released = CallRecord {
            status: pb::CallStatus::InProgress,
            lease_until_ms: 10,
            lease_stream: Some(sid(1)),
            ..blank()
        };
        let resume_after_1 = Next::Resume(pb::ResumeNext {
            takes_over_stream_id: sid(1).as_str().to_owned(),
        });
        assert_eq!(after(&released, None, &current), resume_after_1);
        let still_held = CallRecord {
            lease_holder: Some(LeaseHolder::new("r", "1")),
            lease_until_ms: i64::MAX,
            ..released.clone()
        };
        assert_eq!(after(&still_held, None, &current), resume_after_1);
        let lapsed_unreleased = CallRecord {
            lease_holder: Some(LeaseHolder::new("r", "1")),
            lease_until_ms: 1,
            ..released.clone()
        };
        assert_eq!(after(&lapsed_unreleased, None, &current), resume_after_1);
        let handed_off = CallRecord {
            end_reason: Some(pb::EndReason::Handoff),
            ..released.clone()
        };
        assert_eq!(after(&handed_off, None, &current), resume_after_1);
        // Twilio's stream 2, minted to follow 1, never attached: its action resumes after 1.
        assert_eq!(after(&still_held, None, &ask(2, Some(1))), resume_after_1);
        // A URL from a relay older than the rule names no stream: resumed as before.
        assert_eq!(after(&still_held, None, &AfterAsk::Unnamed), resume_after_1);
        // An earlier stream's action request (a replay): stream 3 holds the call now.
        let moved_on = CallRecord {
            lease_stream: Some(sid(3)),
            ..still_held.clone()
        };
        for replayed in [ask(1, None), ask(2, Some(1)), ask(1, Some(0))] {
            assert!(
                matches!(after(&moved_on, None, &replayed), Next::Hangup(_)),
                "{replayed:?}"
            );
        }
        // Never attached: nothing would end a loop of refused streams.
        let never_attached = CallRecord {
            status: pb::CallStatus::Ringing,
            ..blank()
        };
        assert!(matches!(
            after(&never_attached, None, &current),
            Next::Hangup(_)
        ));
        // An end reported by anyone (relay, app hang-up, Twilio's final status) is final.
        for reason in [
            pb::EndReason::CallerHangup,
            pb::EndReason::RelayLost,
            pb::EndReason::DialCompleted,
        ] {
            let ended = CallRecord {
                status: pb::CallStatus::Completed,
                end_reason: Some(reason),
                ..still_held.clone()
            };
            assert!(
                matches!(after(&ended, None, &current), Next::Hangup(_)),
                "{reason:?}"
            );
        }
    }

    #[test]
    fn only_a_credential_minted_to_follow_the_lease_stream_takes_the_lease_over() {
        let relay = |r: &str| RelayId::parse("relay_id", r).expect("valid");
        let call = |holder: bool, until: i64| CallRecord {
            lease_holder: holder.then(|| LeaseHolder::new("c", "1")),
            lease_relay: Some(relay("r1")),
            lease_until_ms: until,
            lease_stream: Some(sid(1)),
            ..CallRecord::new(
                CallId::parse("call_id", "c").expect("valid"),
                AgentId::parse("agent_id", "a").expect("valid"),
                pb::Direction::Inbound,
                pb::CallStatus::InProgress,
                0,
            )
        };
        let after_1 = StreamOrigin::Resume {
            takes_over: Some(sid(1)),
        };
        let after_2 = StreamOrigin::Resume {
            takes_over: Some(sid(2)),
        };
        let held = call(true, 1000);
        let claim = |c: &CallRecord, r: &str, reconnect, fresh, origin: &StreamOrigin| {
            lease_claim(c, &relay(r), reconnect, fresh, origin, 100)
        };
        assert_eq!(
            claim(&held, "r2", false, true, &after_1),
            LeaseClaim::TakeOver
        );
        assert_eq!(
            claim(&held, "r1", false, true, &after_1),
            LeaseClaim::TakeOver
        );
        assert_eq!(
            claim(&held, "r1", true, false, &StreamOrigin::Unspecified),
            LeaseClaim::Reconnect
        );
        assert_eq!(
            claim(&held, "r2", true, false, &StreamOrigin::Unspecified),
            LeaseClaim::Held
        );
        assert_eq!(
            claim(&held, "r2", false, false, &StreamOrigin::Unspecified),
            LeaseClaim::Held
        );
        // A reconnect proves nothing about Twilio's stream, credential or not.
        assert_eq!(claim(&held, "r2", true, true, &after_1), LeaseClaim::Held);
        // A relay older than the rule: a fresh credential takes over, as before.
        assert_eq!(
            claim(&held, "r2", false, true, &StreamOrigin::Unspecified),
            LeaseClaim::TakeOver
        );
        // Replays: a first stream once the call has had one, a stream following another.
        for free_or_held in [held.clone(), call(false, 1000), call(true, 50)] {
            assert_eq!(
                claim(&free_or_held, "r2", false, true, &StreamOrigin::First),
                LeaseClaim::Superseded
            );
            assert_eq!(
                claim(&free_or_held, "r2", false, true, &after_2),
                LeaseClaim::Superseded
            );
        }
        for free in [call(false, 1000), call(true, 50)] {
            assert_eq!(claim(&free, "r2", false, true, &after_1), LeaseClaim::Free);
            assert_eq!(
                claim(&free, "r2", false, false, &StreamOrigin::Unspecified),
                LeaseClaim::Free
            );
            assert_eq!(
                claim(&free, "r2", true, false, &StreamOrigin::Unspecified),
                LeaseClaim::Free
            );
        }
        // A call's first stream attaches to a call that never had one.
        let fresh_call = CallRecord {
            lease_relay: None,
            lease_until_ms: 0,
            lease_stream: None,
            ..held.clone()
        };
        assert_eq!(
            claim(&fresh_call, "r2", false, true, &StreamOrigin::First),
            LeaseClaim::Free
        );
        // A call whose record predates the rule names no stream: a resume minted to follow
        // none matches it.
        let unnamed = CallRecord {
            lease_stream: None,
            ..held
        };
        assert_eq!(
            claim(
                &unnamed,
                "r2",
                false,
                true,
                &StreamOrigin::Resume { takes_over: None }
            ),
            LeaseClaim::TakeOver
        );
    }
}
