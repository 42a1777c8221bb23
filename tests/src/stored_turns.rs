//! Which of the turns a caller spoke a call's store lacks, stream by stream.
//!
//! The fake model transcribes by its script, not by the audio: a session names the
//! caller's next turn after the last caller line of the history it was given, and a
//! resumed stream's session is given the stored transcript. A turn lost whole with a
//! SIGKILLed relay (its caller line never stored) therefore shifts the names on the next
//! stream: the caller's turn N + 1 is stored as "Caller line N", and so on, so that
//! compared with the script by name the line that reads as missing is the call's last,
//! although every turn spoken after the failover is stored. Here each stream's lines are
//! matched with its own turns, named as its session names them, so what is reported
//! missing is the turn that really was lost (the one in flight on the killed relay).

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};

/// A greeting and `turns` numbered turns ("Caller line N", "Agent line N", 300 ms each):
/// the script of the failover tests and benches, whose lines this module matches.
pub fn numbered_script(turns: usize) -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says("Hello there", 300)),
        turns: (0..turns)
            .map(|n| {
                Turn::new(
                    format!("Caller line {n}"),
                    300,
                    AgentReply::says(format!("Agent line {n}"), 300),
                )
            })
            .collect(),
    }
}

/// A line the store lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingLine {
    /// The stream (index into the call's legs).
    pub leg: usize,
    /// The caller's turn (index into the script) as the caller spoke it; `None` for the
    /// greeting.
    pub turn: Option<usize>,
    /// `caller` or `assistant`.
    pub who: &'static str,
    /// The line as the stream's session would have stored it.
    pub text: String,
}

/// The stored events split at each `started` (one group per stream), as (who, text) lines.
fn lines_per_stream(events: &[pb::CallEvent]) -> Vec<Vec<(&'static str, &str)>> {
    let mut streams: Vec<Vec<(&'static str, &str)>> = Vec::new();
    for event in events {
        let line = match &event.kind {
            Some(pb::call_event::Kind::Started(_)) => {
                streams.push(Vec::new());
                continue;
            }
            Some(pb::call_event::Kind::Caller(c)) => ("caller", c.text.as_str()),
            Some(pb::call_event::Kind::Assistant(a)) => ("assistant", a.text.as_str()),
            _ => continue,
        };
        if let Some(current) = streams.last_mut() {
            current.push(line);
        }
    }
    streams
}

/// The lines of the turns in `legs` (each stream's turns spoken, in order) that `events`
/// (a call's stored events, in seq order) lack, counted as a multiset per stream: a line
/// stored twice does not make up for one missing. `Err` when the events do not hold one
/// `started` per stream.
pub fn missing_lines(
    events: &[pb::CallEvent],
    legs: &[Vec<usize>],
    script: &Conversation,
) -> Result<Vec<MissingLine>, String> {
    let streams = lines_per_stream(events);
    if streams.len() != legs.len() {
        return Err(format!(
            "{} started events for {} streams",
            streams.len(),
            legs.len()
        ));
    }
    let mut missing = Vec::new();
    // Where the next session starts in the script: after the last caller line stored so far.
    let mut next = 0;
    for (leg, (stored, spoken)) in streams.iter().zip(legs).enumerate() {
        let mut expected: Vec<(Option<usize>, &'static str, String)> = Vec::new();
        if leg == 0
            && let Some(g) = &script.greeting
        {
            expected.push((None, "assistant", g.text.clone()));
        }
        for (i, &turn) in spoken.iter().enumerate() {
            if let Some(t) = script.turns.get(next + i) {
                expected.push((Some(turn), "caller", t.caller.text.clone()));
                expected.push((Some(turn), "assistant", t.agent.text.clone()));
            }
        }
        let mut left: Vec<Option<(&str, &str)>> = stored.iter().copied().map(Some).collect();
        for (turn, who, text) in expected {
            match left.iter_mut().find(|l| **l == Some((who, text.as_str()))) {
                Some(line) => *line = None,
                None => missing.push(MissingLine {
                    leg,
                    turn,
                    who,
                    text,
                }),
            }
        }
        if let Some(last) = stored
            .iter()
            .rev()
            .find(|(who, _)| *who == "caller")
            .and_then(|(_, text)| script.turns.iter().rposition(|t| t.caller.text == *text))
        {
            next = last + 1;
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(turns: usize) -> Conversation {
        numbered_script(turns)
    }

    /// Events of `started` and lines: `S` starts a stream, `C n` / `A n` a caller or
    /// agent line of script turn n, `G` the greeting.
    fn events(spec: &str) -> Vec<pb::CallEvent> {
        use pb::call_event::Kind;
        let mut out = Vec::new();
        let mut words = spec.split_whitespace();
        while let Some(w) = words.next() {
            let kind = match w {
                "S" => Kind::Started(pb::Started::default()),
                "G" => Kind::Assistant(pb::AssistantSpeech {
                    text: "Hello there".to_owned(),
                    ..Default::default()
                }),
                "C" | "A" => {
                    let n = words.next().expect("a turn number");
                    if w == "C" {
                        Kind::Caller(pb::CallerSpeech {
                            text: format!("Caller line {n}"),
                            ..Default::default()
                        })
                    } else {
                        Kind::Assistant(pb::AssistantSpeech {
                            text: format!("Agent line {n}"),
                            ..Default::default()
                        })
                    }
                }
                other => panic!("spec word {other}"),
            };
            out.push(pb::CallEvent {
                seq: out.len() as u64 + 1,
                kind: Some(kind),
                ..Default::default()
            });
        }
        out
    }

    fn line(leg: usize, turn: usize, who: &'static str, text: &str) -> MissingLine {
        MissingLine {
            leg,
            turn: Some(turn),
            who,
            text: text.to_owned(),
        }
    }

    #[test]
    fn a_turn_lost_whole_at_a_kill_is_named_not_the_calls_last() {
        // Turn 2 was spoken on the killed stream and none of it stored; the next
        // session, told lines 0 and 1, names the caller's turns 3..=5 lines 2..=4.
        let stored = events("S G C 0 A 0 C 1 A 1 S C 2 A 2 C 3 A 3 C 4 A 4");
        let missing =
            missing_lines(&stored, &[vec![0, 1, 2], vec![3, 4, 5]], &script(6)).expect("legs");
        assert_eq!(
            missing,
            [
                line(0, 2, "caller", "Caller line 2"),
                line(0, 2, "assistant", "Agent line 2")
            ]
        );
    }

    #[test]
    fn an_answer_lost_at_a_kill_is_named_and_the_names_go_on() {
        let stored = events("S G C 0 A 0 C 1 S C 2 A 2 C 3 A 3");
        let missing = missing_lines(&stored, &[vec![0, 1], vec![2, 3]], &script(4)).expect("legs");
        assert_eq!(missing, [line(0, 1, "assistant", "Agent line 1")]);
    }

    #[test]
    fn a_turn_lost_after_the_failover_is_found() {
        // Everything of the killed stream stored, the resumed stream's last turn not.
        let stored = events("S G C 0 A 0 C 1 A 1 S C 2 A 2");
        let missing = missing_lines(&stored, &[vec![0, 1], vec![2, 3]], &script(4)).expect("legs");
        assert_eq!(
            missing,
            [
                line(1, 3, "caller", "Caller line 3"),
                line(1, 3, "assistant", "Agent line 3")
            ]
        );
    }

    #[test]
    fn a_line_stored_twice_does_not_make_up_for_one_missing() {
        let stored = events("S G C 0 A 0 A 0");
        let missing = missing_lines(&stored, &[vec![0, 1]], &script(2)).expect("legs");
        assert_eq!(
            missing,
            [
                line(0, 1, "caller", "Caller line 1"),
                line(0, 1, "assistant", "Agent line 1")
            ]
        );
    }

    #[test]
    fn streams_without_their_started_are_an_error() {
        let stored = events("S G C 0 A 0");
        assert!(missing_lines(&stored, &[vec![0], vec![1]], &script(2)).is_err());
    }
}
