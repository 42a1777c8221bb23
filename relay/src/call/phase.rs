//! The call's pure state: lifecycle (which end, reported once) and playback bookkeeping for
//! barge-in (`docs/protocols.md`, "Barge-in"). No IO, no clocks: the call loop feeds it facts and
//! executes the [`Out`]s it returns, in order.
//!
//! Playback model: model audio forwarded to Twilio is followed, about every
//! [`MARK_EVERY_MS`] of an item's audio and at the item's end, by a mark named
//! `g{generation}:{cumulative ms of the item}:{item id}`. Twilio echoes a mark when the
//! audio queued before it has played, so the largest echoed ms of an item is what the
//! caller had heard by then; between echoes the [`Playhead`] follows playback by the
//! clock. A mark per delta would cost a message out and an echo in for every 20 ms of
//! audio: a third of the relay's wake-ups (docs/performance.md). A Twilio `clear` flushes
//! every pending mark back at once; those echoes do not prove anything was heard, so a
//! barge-in bumps the generation and echoes of older generations are ignored.
//!
//! The call loop passes `now` in; nothing here reads a clock.

use std::collections::VecDeque;

use callbridge_proto::pb::EndReason;
use tokio::time::Instant;

use super::playhead::Playhead;

/// Items kept per call while their playback or transcript is pending.
const MAX_ITEMS: usize = 32;
/// Discarded (interrupted) response ids remembered to drop their late deltas.
const MAX_DISCARDED: usize = 8;
/// Audio of an item between two marks, ms: the echoes anchor the playback clock this
/// often, and an item's last mark follows its last delta whatever its length.
pub const MARK_EVERY_MS: u32 = 100;

/// Something the call loop must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// Send Twilio `clear` (stops queued assistant audio).
    ClearTwilio,
    /// Send `conversation.item.truncate`.
    Truncate {
        /// Assistant item.
        item_id: String,
        /// What the caller heard, never more than was sent.
        audio_end_ms: u32,
    },
    /// Report an interruption event.
    Interrupted {
        /// The item being played when the caller barged in.
        item_id: String,
        /// Heard of it.
        heard_ms: u32,
        /// Sent of it.
        audio_ms: u32,
    },
    /// Send Twilio a mark with this name (an item's last audio is in).
    MarkTwilio {
        /// Mark name.
        name: String,
    },
    /// Report the assistant's speech for an item, now that its heard portion is known.
    AssistantSpeech {
        /// Item.
        item_id: String,
        /// Transcript of the item.
        text: String,
        /// Cut off by the caller.
        interrupted: bool,
        /// Heard ms.
        heard_ms: u32,
        /// Sent ms.
        audio_ms: u32,
    },
}

/// A mark to send: its generation and the item's cumulative ms; with the item id, its
/// name is `g{generation}:{ms}:{item id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkAt {
    /// Mark generation.
    pub generation: u32,
    /// The item's audio up to the mark, ms.
    pub ms: u32,
}

impl MarkAt {
    /// Writes the mark's name for `item_id` into `out` (after what is there).
    pub fn write_name(self, item_id: &str, out: &mut String) {
        use std::fmt::Write as _;
        // Writing into a String cannot fail.
        let _ = write!(out, "g{}:{}:{item_id}", self.generation, self.ms);
    }
}

/// What to do with one model audio delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// Forward it, then send a mark there if there is one.
    Forward {
        /// The mark.
        mark: Option<MarkAt>,
    },
    /// It belongs to an interrupted response: drop it.
    Drop,
}

#[derive(Debug)]
struct Item {
    item_id: String,
    response_id: String,
    sent_bytes: u64,
    heard_ms: u32,
    /// Where the item's audio starts on the [`Playhead`].
    start_pos: u32,
    /// The item's audio up to its last mark, ms.
    marked_ms: u32,
    audio_done: bool,
    interrupted: bool,
    transcript: Option<String>,
}

impl Item {
    fn sent_ms(&self) -> u32 {
        u32::try_from(self.sent_bytes / 8).unwrap_or(u32::MAX)
    }
    fn fully_heard(&self) -> bool {
        self.audio_done && self.heard_ms >= self.sent_ms()
    }
    fn resolved(&self) -> bool {
        self.interrupted || self.fully_heard()
    }
    /// Heard of this item when the playhead is at `pos`: by echoes, or by the clock.
    fn heard_at(&self, pos: u32) -> u32 {
        self.heard_ms
            .max(pos.saturating_sub(self.start_pos))
            .min(self.sent_ms())
    }
    /// The item's closing mark, when audio followed its last mark.
    fn final_mark(&mut self, generation: u32, playhead: &mut Playhead) -> Option<Out> {
        let sent = self.sent_ms();
        if self.interrupted || self.sent_bytes == 0 || self.marked_ms >= sent {
            return None;
        }
        self.marked_ms = sent;
        playhead.marked();
        Some(Out::MarkTwilio {
            name: mark_name(generation, sent, &self.item_id),
        })
    }
}

fn mark_name(generation: u32, ms: u32, item_id: &str) -> String {
    let mut name = String::new();
    MarkAt { generation, ms }.write_name(item_id, &mut name);
    name
}

/// Barge-in and playback bookkeeping of one call.
#[derive(Debug, Default)]
pub struct Playback {
    generation: u32,
    outstanding_marks: u32,
    items: VecDeque<Item>,
    active_response: Option<String>,
    discarded: VecDeque<String>,
    barge_in_enabled: bool,
    playhead: Playhead,
}

impl Playback {
    /// New bookkeeping; `barge_in_enabled` false disables interruption handling (the agent
    /// set `interrupt_response: false`).
    pub fn new(barge_in_enabled: bool) -> Self {
        Self {
            barge_in_enabled,
            ..Self::default()
        }
    }

    /// Current mark generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Marks sent in this generation not yet echoed.
    pub fn outstanding_marks(&self) -> u32 {
        self.outstanding_marks
    }

    /// Whether audio of this item was forwarded and is still tracked.
    pub fn has_item(&self, item_id: &str) -> bool {
        self.items.iter().any(|i| i.item_id == item_id)
    }

    /// A response is running (created, not done): the model owes its events.
    pub fn responding(&self) -> bool {
        self.active_response.is_some()
    }

    /// True when no assistant audio is queued at Twilio and no response is running.
    pub fn idle(&self) -> bool {
        self.outstanding_marks == 0 && self.active_response.is_none()
    }

    fn is_discarded(&self, response_id: &str) -> bool {
        self.discarded.iter().any(|r| r == response_id)
    }

    fn discard(&mut self, response_id: &str) {
        if response_id.is_empty() || self.is_discarded(response_id) {
            return;
        }
        if self.discarded.len() == MAX_DISCARDED {
            self.discarded.pop_front();
        }
        self.discarded.push_back(response_id.to_owned());
    }

    /// `response.created`.
    pub fn response_created(&mut self, response_id: &str) {
        self.active_response = Some(response_id.to_owned());
    }

    /// `response.done`: the response is no longer active; its items have all their audio.
    pub fn response_done(&mut self, response_id: &str) -> Vec<Out> {
        if self.active_response.as_deref() == Some(response_id) {
            self.active_response = None;
        }
        let mut out = Vec::new();
        for it in self
            .items
            .iter_mut()
            .filter(|i| i.response_id == response_id)
        {
            it.audio_done = true;
            out.extend(it.final_mark(self.generation, &mut self.playhead));
        }
        self.outstanding_marks += out.len() as u32;
        out.extend(self.drain_resolved());
        out
    }

    /// Whether a delta of this response would be dropped.
    pub fn drops(&self, response_id: &str) -> bool {
        self.is_discarded(response_id)
    }

    /// `response.output_audio.delta` of `bytes` decoded bytes, sent at `now`. Call only when
    /// the delta and a mark can both be queued to Twilio.
    pub fn audio_delta(
        &mut self,
        response_id: &str,
        item_id: &str,
        bytes: usize,
        now: Instant,
    ) -> Delta {
        if self.is_discarded(response_id) {
            return Delta::Drop;
        }
        // A new item id starts fresh per-item state (`docs/protocols.md`, "Pitfalls" 1).
        let idx = match self.items.iter().rposition(|i| i.item_id == item_id) {
            Some(i) => i,
            None => {
                if self.items.len() == MAX_ITEMS {
                    self.items.pop_front();
                }
                self.items.push_back(Item {
                    item_id: item_id.to_owned(),
                    response_id: response_id.to_owned(),
                    sent_bytes: 0,
                    heard_ms: 0,
                    start_pos: self.playhead.sent_ms(),
                    marked_ms: 0,
                    audio_done: false,
                    interrupted: false,
                    transcript: None,
                });
                self.items.len() - 1
            }
        };
        let item = &mut self.items[idx];
        let before = item.sent_ms();
        item.sent_bytes += bytes as u64;
        let sent = item.sent_ms();
        self.playhead.sent(sent - before, now);
        if sent - item.marked_ms < MARK_EVERY_MS {
            return Delta::Forward { mark: None };
        }
        item.marked_ms = sent;
        self.playhead.marked();
        self.outstanding_marks += 1;
        Delta::Forward {
            mark: Some(MarkAt {
                generation: self.generation,
                ms: sent,
            }),
        }
    }

    /// `response.output_audio.done` for an item.
    pub fn audio_done(&mut self, item_id: &str) -> Vec<Out> {
        let mut out = Vec::new();
        if let Some(it) = self.items.iter_mut().rev().find(|i| i.item_id == item_id) {
            it.audio_done = true;
            out.extend(it.final_mark(self.generation, &mut self.playhead));
        }
        self.outstanding_marks += out.len() as u32;
        out.extend(self.drain_resolved());
        out
    }

    /// A Twilio `mark` echo at `now`. Returns `None` for a name this relay did not produce.
    pub fn mark_echoed(&mut self, name: &str, now: Instant) -> Option<Vec<Out>> {
        let (generation, ms, item_id) = parse_mark(name)?;
        if generation != self.generation {
            // Flushed by a `clear`: proves nothing about what was heard.
            return Some(Vec::new());
        }
        self.outstanding_marks = self.outstanding_marks.saturating_sub(1);
        if let Some(it) = self.items.iter_mut().rev().find(|i| i.item_id == item_id) {
            let ms = ms.min(it.sent_ms());
            it.heard_ms = it.heard_ms.max(ms);
            self.playhead.echoed(it.start_pos.saturating_add(ms), now);
        }
        Some(self.drain_resolved())
    }

    /// `response.output_audio_transcript.done` for an item.
    pub fn transcript_done(&mut self, item_id: &str, text: &str) -> Vec<Out> {
        match self.items.iter_mut().rev().find(|i| i.item_id == item_id) {
            Some(it) => {
                it.transcript = Some(text.to_owned());
                self.drain_resolved()
            }
            // No audio of this item was ever played (all of it dropped or none produced).
            None => vec![Out::AssistantSpeech {
                item_id: item_id.to_owned(),
                text: text.to_owned(),
                interrupted: false,
                heard_ms: 0,
                audio_ms: 0,
            }],
        }
    }

    /// `input_audio_buffer.speech_started` at `now`: the barge-in, if the assistant is
    /// talking.
    pub fn speech_started(&mut self, now: Instant) -> Vec<Out> {
        let pos = self.playhead.heard(now);
        let playing = self.outstanding_marks > 0 || pos < self.playhead.sent_ms();
        let talking = playing || self.active_response.is_some();
        if !self.barge_in_enabled || !talking {
            return Vec::new();
        }
        let mut out = Vec::new();
        if playing {
            // Clear first: it stops the sound fastest.
            out.push(Out::ClearTwilio);
        }
        let mut first = true;
        let mut discard = Vec::new();
        for it in self.items.iter_mut() {
            if it.interrupted || it.fully_heard() {
                continue;
            }
            it.interrupted = true;
            discard.push(it.response_id.clone());
            let sent = it.sent_ms();
            if it.sent_bytes == 0 {
                continue; // truncating an item without audio is an error (pitfall 3)
            }
            // Items queued behind the one playing were not heard at all: heard_ms is 0.
            let heard = it.heard_at(pos);
            it.heard_ms = heard;
            out.push(Out::Truncate {
                item_id: it.item_id.clone(),
                audio_end_ms: heard,
            });
            if first {
                out.push(Out::Interrupted {
                    item_id: it.item_id.clone(),
                    heard_ms: heard,
                    audio_ms: sent,
                });
                first = false;
            }
        }
        if let Some(active) = self.active_response.take() {
            discard.push(active);
        }
        for r in discard {
            self.discard(&r);
        }
        self.generation = self.generation.wrapping_add(1);
        self.outstanding_marks = 0;
        if playing {
            self.playhead.clear();
        } else {
            self.playhead.forget_marks();
        }
        out.extend(self.drain_resolved());
        out
    }

    /// The model session is gone (a new one takes over): its responses will never finish.
    /// Audio already queued at Twilio plays on, but nothing of the old session is waited
    /// for: its marks belong to an old generation from now on. Reports each item whose
    /// transcript is known with what was heard so far; the rest is forgotten.
    pub fn model_lost(&mut self, now: Instant) -> Vec<Out> {
        let out = self.flush(now);
        self.active_response = None;
        self.outstanding_marks = 0;
        self.playhead.forget_marks();
        self.generation = self.generation.wrapping_add(1);
        out
    }

    /// Reports every item still waiting (call end): what was heard so far at `now`.
    pub fn flush(&mut self, now: Instant) -> Vec<Out> {
        let pos = self.playhead.heard(now);
        let mut out = Vec::new();
        while let Some(it) = self.items.pop_front() {
            // An interrupted item's heard portion was settled at the barge-in.
            let heard_ms = if it.interrupted {
                it.heard_ms
            } else {
                it.heard_at(pos)
            };
            if let Some(text) = it.transcript {
                let audio_ms = u32::try_from(it.sent_bytes / 8).unwrap_or(u32::MAX);
                out.push(Out::AssistantSpeech {
                    item_id: it.item_id,
                    text,
                    interrupted: it.interrupted || heard_ms < audio_ms,
                    heard_ms,
                    audio_ms,
                });
            }
        }
        out
    }

    /// Emits speech for items whose heard portion is final and whose transcript is known,
    /// in playback order, and forgets them.
    fn drain_resolved(&mut self) -> Vec<Out> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.items.len() {
            let it = &self.items[i];
            if it.resolved() && it.transcript.is_some() {
                let Some(it) = self.items.remove(i) else {
                    break;
                };
                out.push(Out::AssistantSpeech {
                    audio_ms: it.sent_ms(),
                    item_id: it.item_id,
                    text: it.transcript.unwrap_or_default(),
                    interrupted: it.interrupted,
                    heard_ms: it.heard_ms,
                });
            } else {
                i += 1;
            }
        }
        out
    }
}

/// Parses `g{generation}:{ms}:{item id}`.
pub fn parse_mark(name: &str) -> Option<(u32, u32, &str)> {
    let rest = name.strip_prefix('g')?;
    let mut parts = rest.splitn(3, ':');
    let generation = parts.next()?.parse().ok()?;
    let ms = parts.next()?.parse().ok()?;
    let item = parts.next()?;
    Some((generation, ms, item))
}

/// How a call ends: the first reason wins and is reported once.
#[derive(Debug, Default)]
pub struct Lifecycle {
    started: bool,
    end: Option<Ending>,
    pending: Option<Ending>,
}

/// A decided end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// Why.
    pub reason: EndReason,
    /// Free text.
    pub detail: String,
    /// For transfers.
    pub transfer_to: String,
}

impl Ending {
    /// An end with a reason and detail.
    pub fn new(reason: EndReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            transfer_to: String::new(),
        }
    }
}

impl Lifecycle {
    /// Twilio `start` arrived. Returns false for a second `start` (a bad message).
    pub fn start(&mut self) -> bool {
        !std::mem::replace(&mut self.started, true)
    }

    /// Whether `start` arrived.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Ends the call now; returns true only for the first end.
    pub fn end(&mut self, ending: Ending) -> bool {
        if self.end.is_some() {
            return false;
        }
        self.end = Some(ending);
        true
    }

    /// Ends the call once the assistant's queued audio has played (end_call, transfer).
    /// Returns false if an end is already decided or pending.
    pub fn end_after_playback(&mut self, ending: Ending) -> bool {
        if self.end.is_some() || self.pending.is_some() {
            return false;
        }
        self.pending = Some(ending);
        true
    }

    /// Whether an end is waiting for playback.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some() && self.end.is_none()
    }

    /// Playback is idle: a pending end becomes the end. Returns true if it did.
    pub fn playback_idle(&mut self) -> bool {
        match self.pending.take() {
            Some(p) => self.end(p),
            None => false,
        }
    }

    /// The decided end.
    pub fn ending(&self) -> Option<&Ending> {
        self.end.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::time::Duration;

    use super::*;

    /// One instant for a test: the clock never moves unless a test says so, so `heard`
    /// comes from echoes alone.
    fn t0() -> Instant {
        static T0: OnceLock<Instant> = OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    /// 100 ms of pcmu: one delta per mark.
    const D100: usize = 800;

    /// Sends `n` deltas of `bytes` each for an item at `t0` and returns the marks they
    /// brought.
    fn send(p: &mut Playback, resp: &str, item: &str, n: usize, bytes: usize) -> Vec<String> {
        (0..n)
            .filter_map(|_| match p.audio_delta(resp, item, bytes, t0()) {
                Delta::Forward { mark } => mark.map(|m| mark_name(m.generation, m.ms, item)),
                Delta::Drop => panic!("unexpected drop"),
            })
            .collect()
    }

    fn echo(p: &mut Playback, name: &str) -> Vec<Out> {
        p.mark_echoed(name, t0()).expect("our mark")
    }

    fn marks(out: &[Out]) -> Vec<String> {
        out.iter()
            .filter_map(|o| match o {
                Out::MarkTwilio { name } => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    fn speech(out: &[Out]) -> Vec<(String, bool, u32, u32)> {
        out.iter()
            .filter_map(|o| match o {
                Out::AssistantSpeech {
                    item_id,
                    interrupted,
                    heard_ms,
                    audio_ms,
                    ..
                } => Some((item_id.clone(), *interrupted, *heard_ms, *audio_ms)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn mark_names_encode_generation_cumulative_ms_and_item() {
        let mut p = Playback::new(true);
        p.response_created("r1");
        let marks = send(&mut p, "r1", "item_a", 3, D100);
        assert_eq!(marks, ["g0:100:item_a", "g0:200:item_a", "g0:300:item_a"]);
        assert_eq!(parse_mark("g0:300:item_a"), Some((0, 300, "item_a")));
        assert_eq!(parse_mark("g1:5:it:em"), Some((1, 5, "it:em")));
        assert_eq!(parse_mark("responsePart"), None);
        assert_eq!(parse_mark("gx:1:a"), None);
        assert_eq!(p.outstanding_marks(), 3);
    }

    #[test]
    fn marks_go_out_every_100_ms_of_audio_and_at_the_item_end() {
        let mut p = Playback::new(true);
        p.response_created("r1");
        // 20 ms deltas: a mark with every fifth.
        assert_eq!(
            send(&mut p, "r1", "item_a", 12, 160),
            ["g0:100:item_a", "g0:200:item_a"]
        );
        // The item's last 40 ms get their own mark when its audio is done, once.
        let out = p.audio_done("item_a");
        assert_eq!(marks(&out), ["g0:240:item_a"]);
        assert!(marks(&p.response_done("r1")).is_empty());
        assert_eq!(p.outstanding_marks(), 3);
        // An item whose audio ends on a mark needs no other.
        p.response_created("r2");
        send(&mut p, "r2", "item_b", 5, 160);
        assert!(marks(&p.response_done("r2")).is_empty());
    }

    #[test]
    fn between_echoes_the_clock_says_what_was_heard() {
        let mut p = Playback::new(true);
        p.response_created("r1");
        // 400 ms sent at once, marks at 100..400.
        let m = send(&mut p, "r1", "item_a", 20, 160);
        p.mark_echoed(&m[0], t0() + Duration::from_millis(100));
        // 30 ms after the echo of 100 ms: 130 ms heard (not 100), within a frame.
        let out = p.speech_started(t0() + Duration::from_millis(130));
        assert!(
            out.contains(&Out::Truncate {
                item_id: "item_a".into(),
                audio_end_ms: 130
            }),
            "{out:?}"
        );
    }

    #[test]
    fn barge_in_truncates_at_heard_from_echoed_marks() {
        let mut p = Playback::new(true);
        p.response_created("r1");
        let marks = send(&mut p, "r1", "item_a", 5, D100); // 500 ms sent
        echo(&mut p, &marks[0]);
        echo(&mut p, &marks[1]); // 200 ms heard
        let out = p.speech_started(t0());
        assert_eq!(
            out,
            vec![
                Out::ClearTwilio,
                Out::Truncate {
                    item_id: "item_a".into(),
                    audio_end_ms: 200
                },
                Out::Interrupted {
                    item_id: "item_a".into(),
                    heard_ms: 200,
                    audio_ms: 500
                },
            ]
        );
        assert_eq!(p.generation(), 1);
        assert_eq!(p.outstanding_marks(), 0);
        // Marks flushed by the clear come back with the old generation: ignored.
        for m in &marks[2..] {
            assert_eq!(echo(&mut p, m), vec![]);
        }
        // Late deltas of the interrupted response are dropped.
        assert_eq!(p.audio_delta("r1", "item_a", 160, t0()), Delta::Drop);
        assert!(p.drops("r1"));
        // Its transcript then reports the heard portion, interrupted.
        let out = p.transcript_done("item_a", "Hello there, how");
        assert_eq!(speech(&out), vec![("item_a".into(), true, 200, 500)]);
    }

    #[test]
    fn truncate_never_exceeds_sent_audio() {
        let mut p = Playback::new(true);
        p.response_created("r1");
        send(&mut p, "r1", "item_a", 2, 100); // 200 bytes = 25 ms
        // A forged echo claiming more than was sent is capped.
        echo(&mut p, "g0:9999:item_a");
        let out = p.speech_started(t0() + Duration::from_secs(5));
        assert!(out.contains(&Out::Truncate {
            item_id: "item_a".into(),
            audio_end_ms: 25
        }));
    }

    #[test]
    fn no_barge_in_when_nothing_plays() {
        let mut p = Playback::new(true);
        assert!(p.speech_started(t0()).is_empty());
        // A finished, fully played turn: no clear, no truncate (the "already shorter" bug).
        p.response_created("r1");
        let mut marks = send(&mut p, "r1", "item_a", 3, 160);
        marks.extend(super::tests::marks(&p.audio_done("item_a")));
        p.response_done("r1");
        assert_eq!(marks, ["g0:60:item_a"]);
        for m in &marks {
            echo(&mut p, m);
        }
        assert!(p.idle());
        assert!(p.speech_started(t0()).is_empty());
        assert_eq!(p.generation(), 0);
    }

    #[test]
    fn barge_in_disabled_by_agent() {
        let mut p = Playback::new(false);
        p.response_created("r1");
        send(&mut p, "r1", "item_a", 2, D100);
        assert!(p.speech_started(t0()).is_empty());
        assert_eq!(
            p.audio_delta("r1", "item_a", D100, t0()),
            Delta::Forward {
                mark: Some(MarkAt {
                    generation: 0,
                    ms: 300
                })
            }
        );
    }

    #[test]
    fn response_active_without_audio_discards_it_without_truncate() {
        let mut p = Playback::new(true);
        p.response_created("r1");
        let out = p.speech_started(t0());
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(p.generation(), 1);
        assert_eq!(p.audio_delta("r1", "item_a", 160, t0()), Delta::Drop);
        // The next response plays normally with the new generation.
        p.response_created("r2");
        assert_eq!(send(&mut p, "r2", "item_b", 1, D100), ["g1:100:item_b"]);
    }

    #[test]
    fn new_item_resets_per_item_state() {
        let mut p = Playback::new(true);
        p.response_created("r1");
        let a = send(&mut p, "r1", "item_a", 3, D100);
        p.audio_done("item_a");
        p.response_done("r1");
        for m in &a {
            echo(&mut p, m);
        }
        p.response_created("r2");
        let b = send(&mut p, "r2", "item_b", 2, D100);
        assert_eq!(b, ["g0:100:item_b", "g0:200:item_b"]);
        echo(&mut p, &b[0]);
        let out = p.speech_started(t0());
        assert!(out.contains(&Out::Truncate {
            item_id: "item_b".into(),
            audio_end_ms: 100
        }));
        assert!(
            !out.iter()
                .any(|o| matches!(o, Out::Truncate { item_id, .. } if item_id == "item_a"))
        );
    }

    #[test]
    fn later_queued_items_truncate_at_zero() {
        let mut p = Playback::new(true);
        p.response_created("r1");
        let a = send(&mut p, "r1", "item_a", 2, D100);
        send(&mut p, "r1", "item_b", 2, D100);
        echo(&mut p, &a[0]);
        let out = p.speech_started(t0());
        assert_eq!(
            out[1..],
            [
                Out::Truncate {
                    item_id: "item_a".into(),
                    audio_end_ms: 100
                },
                Out::Interrupted {
                    item_id: "item_a".into(),
                    heard_ms: 100,
                    audio_ms: 200
                },
                Out::Truncate {
                    item_id: "item_b".into(),
                    audio_end_ms: 0
                },
            ]
        );
    }

    #[test]
    fn speech_reported_after_playback_completes() {
        let mut p = Playback::new(true);
        p.response_created("r1");
        let m = send(&mut p, "r1", "item_a", 2, D100);
        p.audio_done("item_a");
        // Transcript arrives before playback finished: held back.
        assert!(p.transcript_done("item_a", "Hi!").is_empty());
        assert!(p.response_done("r1").is_empty());
        assert!(echo(&mut p, &m[0]).is_empty());
        assert!(!p.idle());
        let out = echo(&mut p, &m[1]);
        assert_eq!(speech(&out), vec![("item_a".into(), false, 200, 200)]);
        assert!(p.idle());
    }

    #[test]
    fn transcript_without_audio_reports_zero() {
        let mut p = Playback::new(true);
        let out = p.transcript_done("item_x", "text");
        assert_eq!(speech(&out), vec![("item_x".into(), false, 0, 0)]);
    }

    #[test]
    fn flush_reports_pending_items_at_call_end() {
        let mut p = Playback::new(true);
        p.response_created("r1");
        let m = send(&mut p, "r1", "item_a", 3, D100);
        p.transcript_done("item_a", "partial");
        echo(&mut p, &m[0]);
        assert_eq!(
            speech(&p.flush(t0())),
            vec![("item_a".into(), true, 100, 300)]
        );
        assert!(p.flush(t0()).is_empty());
        // By the clock: 50 ms after the echo of 100 ms, 150 ms were heard.
        p.response_created("r2");
        let m = send(&mut p, "r2", "item_b", 3, D100);
        p.transcript_done("item_b", "partial");
        p.mark_echoed(&m[0], t0() + Duration::from_millis(400))
            .expect("ours");
        assert_eq!(
            speech(&p.flush(t0() + Duration::from_millis(450))),
            vec![("item_b".into(), true, 150, 300)]
        );
    }

    #[test]
    fn a_lost_model_session_leaves_playback_idle_and_ignores_its_marks() {
        let mut p = Playback::new(true);
        p.response_created("r1");
        let m = send(&mut p, "r1", "item_a", 3, D100);
        assert!(p.has_item("item_a"));
        p.transcript_done("item_a", "partial");
        echo(&mut p, &m[0]);
        assert!(!p.idle());
        assert_eq!(
            speech(&p.model_lost(t0())),
            vec![("item_a".into(), true, 100, 300)]
        );
        assert!(p.idle(), "nothing of the old session is waited for");
        assert!(!p.has_item("item_a"), "its items are settled");
        // Echoes of the old session's audio prove nothing now.
        assert_eq!(echo(&mut p, &m[1]), vec![]);
        assert_eq!(p.outstanding_marks(), 0);
        // The new session's audio is tracked as usual.
        p.response_created("r2");
        let m2 = send(&mut p, "r2", "item_b", 1, D100);
        assert!(m2[0].starts_with("g1:"), "{m2:?}");
    }

    #[test]
    fn unknown_marks_are_reported_as_foreign() {
        let mut p = Playback::new(true);
        assert_eq!(p.mark_echoed("whatever", t0()), None);
        // A valid-looking mark never sent does not underflow.
        assert_eq!(echo(&mut p, "g0:20:item_z"), vec![]);
        assert_eq!(p.outstanding_marks(), 0);
    }

    #[test]
    fn second_barge_in_uses_new_generation() {
        let mut p = Playback::new(true);
        p.response_created("r1");
        send(&mut p, "r1", "item_a", 2, D100);
        p.speech_started(t0());
        p.response_done("r1");
        p.response_created("r2");
        let m = send(&mut p, "r2", "item_b", 3, D100);
        assert!(m[0].starts_with("g1:"));
        echo(&mut p, &m[0]);
        echo(&mut p, &m[1]);
        let out = p.speech_started(t0());
        assert!(out.contains(&Out::Truncate {
            item_id: "item_b".into(),
            audio_end_ms: 200
        }));
        assert_eq!(p.generation(), 2);
    }

    /// Random interleavings of deltas, echoes (in order, some flushed), transcripts,
    /// response ends and barge-ins: every truncate is within what was sent for its item,
    /// no truncate targets an item without audio, and marks of old generations never move
    /// `heard`.
    #[test]
    fn truncate_invariants_hold_for_random_interleavings() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..500 {
            let mut p = Playback::new(true);
            let mut sent: std::collections::HashMap<String, u64> = Default::default();
            let mut queue: VecDeque<String> = VecDeque::new();
            let mut resp = 0u32;
            let mut item = 0u32;
            p.response_created("r0");
            for _ in 0..60 {
                match rnd(6) {
                    0 | 1 => {
                        if rnd(4) == 0 {
                            item += 1;
                        }
                        let (r, i) = (format!("r{resp}"), format!("i{item}"));
                        let bytes = 1 + rnd(400) as usize;
                        if let Delta::Forward { mark } = p.audio_delta(&r, &i, bytes, t0()) {
                            queue.extend(mark.map(|m| mark_name(m.generation, m.ms, &i)));
                            *sent.entry(i).or_default() += bytes as u64;
                        }
                    }
                    2 => {
                        if let Some(m) = queue.pop_front() {
                            echo(&mut p, &m);
                        }
                    }
                    3 => {
                        let generation = p.generation();
                        let at = t0() + Duration::from_millis(rnd(2_000));
                        for out in p.speech_started(at) {
                            if let Out::Truncate {
                                item_id,
                                audio_end_ms,
                            } = out
                            {
                                let s = sent.get(&item_id).copied().unwrap_or(0);
                                assert!(s > 0, "truncate of an item without audio");
                                assert!(u64::from(audio_end_ms) <= s / 8, "truncate past sent");
                            }
                        }
                        if p.generation() != generation {
                            // Everything still queued is flushed back, old generation.
                            for m in queue.drain(..) {
                                assert_eq!(echo(&mut p, &m), vec![]);
                            }
                        }
                    }
                    4 => {
                        queue.extend(marks(&p.response_done(&format!("r{resp}"))));
                        resp += 1;
                        p.response_created(&format!("r{resp}"));
                    }
                    _ => {
                        for out in p.transcript_done(&format!("i{}", rnd(u64::from(item) + 1)), "t")
                        {
                            if let Out::AssistantSpeech {
                                heard_ms, audio_ms, ..
                            } = out
                            {
                                assert!(heard_ms <= audio_ms);
                            }
                        }
                    }
                }
                assert!(p.outstanding_marks() as usize <= queue.len());
            }
        }
    }

    #[test]
    fn lifecycle_reports_one_end_and_pending_ends_wait_for_playback() {
        let mut l = Lifecycle::default();
        assert!(l.start());
        assert!(!l.start(), "second start is refused");
        assert!(l.end_after_playback(Ending::new(EndReason::AgentHangup, "")));
        assert!(l.has_pending());
        assert!(!l.end_after_playback(Ending::new(EndReason::Transferred, "")));
        assert!(l.ending().is_none());
        assert!(l.playback_idle());
        assert_eq!(l.ending().unwrap().reason, EndReason::AgentHangup);
        assert!(!l.end(Ending::new(EndReason::CallerHangup, "")));
        assert_eq!(l.ending().unwrap().reason, EndReason::AgentHangup);
        assert!(!l.playback_idle());

        let mut l = Lifecycle::default();
        assert!(l.end_after_playback(Ending::new(EndReason::AgentHangup, "")));
        assert!(l.end(Ending::new(EndReason::CallerHangup, "")));
        assert!(!l.has_pending());
        assert!(!l.playback_idle());
        assert_eq!(l.ending().unwrap().reason, EndReason::CallerHangup);
    }
}
