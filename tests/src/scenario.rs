//! Scenario helpers: an end-to-end test written as the call it describes.
//!
//! ```no_run
//! # async fn f() {
//! use callbridge_testkit::fake_realtime::FakeRealtime;
//! use callbridge_tests::{World, agent_settings, scenario::Scenario};
//!
//! let call = Scenario::inbound()
//!     .agent_greets("Hello, how can I help?", 800)
//!     .caller_says("What are your opening hours?", 600)
//!     .agent_replies("Nine to five.", 1000)
//!     .caller_hangs_up();
//! // The fake model plays the agent's side of the same script.
//! let world = World::builder(FakeRealtime::builder().script(call.script())).start().await;
//! world.default_agent(agent_settings("hours", Some("Hello, how can I help?"))).await;
//! let placed = call.place(&world).await;
//! placed.heard_every_reply();
//! let (stored, transcript) = placed.stored(&world).await;
//! # }
//! ```
//!
//! The scenario only builds the script both fakes follow (a
//! [`Conversation`]) and runs the simulated caller; every assertion stays in the test.

use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::sim_caller::{CallReport, LegReport, SimCaller};

use crate::{World, expected_transcript, with_timeout};

/// Longest a scripted call may take, webhook to hang-up.
pub const CALL: Duration = Duration::from_secs(60);
/// Longest control may take to store a call's end after the caller hung up.
pub const STORED: Duration = Duration::from_secs(10);
/// Speech length of a caller line when the test does not care.
const DEFAULT_SPEECH_MS: u32 = 600;

/// A phone call, line by line.
#[derive(Debug, Clone)]
pub struct Scenario {
    script: Conversation,
    /// A key the caller presses before the next line.
    dtmf: Option<String>,
    hang_up: bool,
}

impl Scenario {
    /// A call coming in to the default agent's number.
    pub fn inbound() -> Self {
        Self {
            script: Conversation::default(),
            dtmf: None,
            hang_up: true,
        }
    }

    /// The agent speaks first: `text`, `audio_ms` long.
    pub fn agent_greets(mut self, text: &str, audio_ms: u32) -> Self {
        self.script.greeting = Some(AgentReply::says(text, audio_ms));
        self
    }

    /// The caller says `text`, speaking for `speech_ms`.
    pub fn caller_says(mut self, text: &str, speech_ms: u32) -> Self {
        let mut turn = Turn::new(text, speech_ms, AgentReply::default());
        turn.dtmf_before = self.dtmf.take();
        self.script.turns.push(turn);
        self
    }

    /// The caller says `text` (its length does not matter to the test).
    pub fn caller_says_briefly(self, text: &str) -> Self {
        self.caller_says(text, DEFAULT_SPEECH_MS)
    }

    /// The caller presses `digits` before saying the next line.
    pub fn caller_presses(mut self, digits: &str) -> Self {
        self.dtmf = Some(digits.to_owned());
        self
    }

    /// The agent answers the caller's last line with `text`, `audio_ms` long.
    ///
    /// # Panics
    /// When the caller has said nothing yet (use [`Scenario::agent_greets`]).
    pub fn agent_replies(mut self, text: &str, audio_ms: u32) -> Self {
        let turn = self
            .script
            .turns
            .last_mut()
            .expect("agent_replies answers a caller line: call caller_says first");
        turn.agent = AgentReply::says(text, audio_ms);
        self
    }

    /// The caller talks over the agent's last reply after hearing `heard_ms` of it: the
    /// next `caller_says` line is the barge-in.
    ///
    /// # Panics
    /// When there is no reply to talk over yet.
    pub fn caller_interrupts_after(mut self, heard_ms: u32) -> Self {
        let turn = self
            .script
            .turns
            .last_mut()
            .expect("caller_interrupts_after needs a reply to talk over");
        turn.barge_in_after_ms = Some(heard_ms);
        self
    }

    /// After the last reply the caller hangs up (`stop`, then closes the stream).
    pub fn caller_hangs_up(mut self) -> Self {
        self.hang_up = true;
        self
    }

    /// After the last reply the caller stays on the line until the relay ends the stream.
    pub fn caller_stays_on_the_line(mut self) -> Self {
        self.hang_up = false;
        self
    }

    /// The script both fakes follow: give it to the fake model's builder.
    pub fn script(&self) -> Conversation {
        self.script.clone()
    }

    /// The transcript control should store for this call, in order.
    pub fn expected_transcript(&self) -> Vec<(String, String)> {
        expected_transcript(&self.script)
    }

    /// The caller's lines, as the model should have transcribed them.
    pub fn caller_lines(&self) -> Vec<String> {
        self.script
            .turns
            .iter()
            .map(|t| t.caller.text.clone())
            .collect()
    }

    /// Audio of every agent reply, greeting included (ms).
    pub fn agent_audio_ms(&self) -> u64 {
        let greeting = self.script.greeting.iter();
        greeting
            .chain(self.script.turns.iter().map(|t| &t.agent))
            .map(|r| u64::from(r.total_audio_ms()))
            .sum()
    }

    /// Places the call through `world`'s relays and waits (bounded by [`CALL`]) until it
    /// is over. Panics when the webhook is not answered with TwiML naming the call.
    pub async fn place(&self, world: &World) -> PlacedCall {
        let mut caller = world.caller(self.script.clone());
        caller.hang_up_at_end = self.hang_up;
        let call_sid = caller.call_sid.clone();
        let report = with_timeout(CALL, "the call", SimCaller::new(caller).run())
            .await
            .expect("the call runs");
        assert_eq!(
            report.webhook.response.status, 200,
            "{}",
            report.webhook.response.body
        );
        let call_id = report
            .webhook
            .twiml
            .as_ref()
            .expect("webhook answered TwiML")
            .parameters
            .iter()
            .find(|(k, _)| k == "callId")
            .map(|(_, v)| v.clone())
            .expect("callId parameter");
        PlacedCall {
            report,
            call_id,
            call_sid,
            turns: self.script.turns.len(),
        }
    }
}

/// A call that took place: what the simulated caller saw.
#[derive(Debug)]
pub struct PlacedCall {
    /// Everything the caller saw: webhook, stream legs, `<Connect action>` answers.
    pub report: CallReport,
    /// Control's call id (from the TwiML's `callId` parameter).
    pub call_id: String,
    /// Twilio's call SID the caller used.
    pub call_sid: String,
    turns: usize,
}

impl PlacedCall {
    /// The first stream leg; panics when the relay never upgraded one.
    pub fn leg(&self) -> &LegReport {
        self.report.leg().expect("a stream leg")
    }

    /// Asserts the caller spoke every line, heard every reply in time and saw no
    /// protocol error.
    pub fn heard_every_reply(&self) {
        let leg = self.leg();
        assert!(leg.protocol_errors.is_empty(), "{:?}", leg.protocol_errors);
        assert_eq!(leg.turns_spoken, (0..self.turns).collect::<Vec<_>>());
        assert!(
            leg.answer_timeouts.is_empty(),
            "answers missing: {:?}",
            leg.answer_timeouts
        );
    }

    /// The call as control stored it once ended (bounded by [`STORED`]), and its
    /// transcript.
    pub async fn stored(&self, world: &World) -> (pb::Call, pb::Transcript) {
        let call = world.wait_ended(&self.call_id, STORED).await;
        let transcript = world.transcript(&self.call_id).await;
        (call, transcript)
    }
}
