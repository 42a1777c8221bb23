//! A campaign's daily calling window, read in each number's own time zone.
//!
//! Zones are IANA names resolved against the tz database bundled into the binary (jiff's
//! `tzdb-bundle-always`), so every replica and image answers alike and daylight saving
//! follows the real rules: the window is in local wall-clock time.

use std::collections::{HashMap, HashSet};

use callbridge_proto::pb;
use jiff::tz::TimeZone;
use jiff::{Timestamp, civil::DateTime};

use super::campaign::{NumberState, Phase};
use crate::error::Error;

const DAY_SECS: u32 = 86_400;
/// Every ISO weekday (bit `d - 1` for day `d`).
const ALL_DAYS: u8 = 0x7f;

/// A checked window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Opens at this second of the local day.
    start: u32,
    /// Closes at this second (excluded); below `start`: the next day.
    end: u32,
    /// ISO weekdays it opens on, as bits.
    days: u8,
    /// The zone of numbers without their own.
    zone: String,
}

/// Resolves an IANA zone name, naming `field` when it is not one.
pub fn zone(field: &str, name: &str) -> Result<TimeZone, Error> {
    if name.is_empty() {
        return Err(Error::invalid(field, "required: an IANA time zone name"));
    }
    TimeZone::get(name).map_err(|_| {
        Error::invalid(
            field,
            format!("'{name}' is not an IANA time zone (e.g. America/New_York)"),
        )
    })
}

/// Seconds since midnight of "HH:MM" or "HH:MM:SS"; "24:00" only where `end_of_day`.
fn time_of_day(field: &str, text: &str, end_of_day: bool) -> Result<u32, Error> {
    let bad = || {
        Error::invalid(
            field,
            format!("'{text}' is not a time of day as HH:MM or HH:MM:SS"),
        )
    };
    if end_of_day && (text == "24:00" || text == "24:00:00") {
        return Ok(DAY_SECS);
    }
    let parts: Vec<&str> = text.split(':').collect();
    if !(2..=3).contains(&parts.len())
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    let num = |i: usize| parts.get(i).map_or(Ok(0), |p| p.parse::<u32>());
    let (h, m, s) = match (num(0), num(1), num(2)) {
        (Ok(h), Ok(m), Ok(s)) => (h, m, s),
        _ => return Err(bad()),
    };
    if h > 23 || m > 59 || s > 59 {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60 + s)
}

impl Window {
    /// The campaign's window, checked (fields named under `settings.calling_window`);
    /// `None` when it has none.
    pub fn from_settings(settings: &pb::CampaignSettings) -> Result<Option<Self>, Error> {
        let Some(w) = &settings.calling_window else {
            return Ok(None);
        };
        const F: &str = "settings.calling_window.";
        let start = time_of_day(&format!("{F}start"), &w.start, false)?;
        let end = time_of_day(&format!("{F}end"), &w.end, true)?;
        if start == end {
            return Err(Error::invalid(
                format!("{F}end"),
                "equals start: the window would be empty",
            ));
        }
        let mut days = 0u8;
        for (i, d) in w.days.iter().enumerate() {
            let bit = match d {
                1..=7 => 1u8 << (d - 1),
                _ => {
                    return Err(Error::invalid(
                        format!("{F}days[{i}]"),
                        format!("{d} is not an ISO weekday (1 = Monday … 7 = Sunday)"),
                    ));
                }
            };
            if days & bit != 0 {
                return Err(Error::invalid(
                    format!("{F}days[{i}]"),
                    format!("day {d} is listed twice"),
                ));
            }
            days |= bit;
        }
        zone(&format!("{F}time_zone"), &w.time_zone)?;
        Ok(Some(Window {
            start,
            end,
            days: if days == 0 { ALL_DAYS } else { days },
            zone: w.time_zone.clone(),
        }))
    }

    /// Whether the window is open at the local date and time `local`.
    fn open_at(&self, local: DateTime) -> bool {
        let t = u32::try_from(
            i32::from(local.hour()) * 3600
                + i32::from(local.minute()) * 60
                + i32::from(local.second()),
        )
        .unwrap_or(0);
        // ISO weekday 1..=7 as bit index 0..=6; yesterday's for the overnight part.
        let today = u32::try_from(local.weekday().to_monday_zero_offset()).unwrap_or(0);
        let yesterday = (today + 6) % 7;
        let on = |day: u32| self.days & (1u8 << day) != 0;
        if self.start < self.end {
            on(today) && (self.start..self.end).contains(&t)
        } else {
            (on(today) && t >= self.start) || (on(yesterday) && t < self.end)
        }
    }
}

/// Answers "is this number's window open now?" for one campaign, resolving each zone once
/// and answering each zone once per instant (the dialer asks for every due number of
/// every tick).
#[derive(Debug)]
pub struct WindowClock {
    window: Result<Option<Window>, ()>,
    zones: HashMap<String, Option<TimeZone>>,
    answered_at_ms: i64,
    answers: HashMap<String, bool>,
}

impl WindowClock {
    /// The clock of a campaign's stored settings. A stored window that no longer checks
    /// (it was checked when the campaign was created) keeps every number waiting rather
    /// than dial at an hour nobody asked for.
    pub fn new(settings: &pb::CampaignSettings) -> Self {
        let window = Window::from_settings(settings).map_err(|err| {
            tracing::error!(error = %err, "Stored calling window unusable; nothing is dialled.");
        });
        WindowClock {
            window,
            zones: HashMap::new(),
            answered_at_ms: i64::MIN,
            answers: HashMap::new(),
        }
    }

    /// Whether the campaign has a window at all.
    pub fn has_window(&self) -> bool {
        !matches!(self.window, Ok(None))
    }

    /// Whether a number in `zone` ("" for the window's default) may be dialled at `now_ms`.
    pub fn is_open(&mut self, zone: &str, now_ms: i64) -> bool {
        let window = match &self.window {
            Ok(None) => return true,
            Ok(Some(w)) => w,
            Err(()) => return false,
        };
        let name = if zone.is_empty() { &window.zone } else { zone };
        if self.answered_at_ms != now_ms {
            self.answered_at_ms = now_ms;
            self.answers.clear();
        }
        if let Some(open) = self.answers.get(name) {
            return *open;
        }
        let tz = self
            .zones
            .entry(name.to_owned())
            .or_insert_with(|| match TimeZone::get(name) {
                Ok(tz) => Some(tz),
                Err(err) => {
                    // Checked when added; a tz database without it keeps it waiting.
                    tracing::warn!(zone = name, error = %err, "Time zone unknown; its numbers wait.");
                    None
                }
            });
        let open = match (tz, Timestamp::from_millisecond(now_ms)) {
            (Some(tz), Ok(now)) => window.open_at(tz.to_datetime(now)),
            _ => false,
        };
        self.answers.insert(name.to_owned(), open);
        open
    }

    /// Numbers waiting for their window at `now_ms`: no outcome yet, not in flight, and
    /// their window closed.
    pub fn waiting<'a>(
        &mut self,
        numbers: impl IntoIterator<Item = &'a NumberState>,
        now_ms: i64,
    ) -> u32 {
        if !self.has_window() {
            return 0;
        }
        let mut waiting = 0;
        for n in numbers {
            if matches!(n.phase, Phase::Pending { .. }) && !self.is_open(&n.time_zone, now_ms) {
                waiting += 1;
            }
        }
        waiting
    }
}

/// Checks the time zones of numbers to add (`numbers[i].time_zone`), each name once.
pub fn check_number_zones(numbers: &[pb::CampaignNumber]) -> Result<(), Error> {
    let mut known: HashSet<&str> = HashSet::new();
    for (i, n) in numbers.iter().enumerate() {
        if n.time_zone.is_empty() || known.contains(n.time_zone.as_str()) {
            continue;
        }
        zone(&format!("numbers[{i}].time_zone"), &n.time_zone)?;
        known.insert(&n.time_zone);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn window(start: &str, end: &str, days: &[u32], zone: &str) -> pb::CampaignSettings {
        pb::CampaignSettings {
            calling_window: Some(pb::CallingWindow {
                start: start.into(),
                end: end.into(),
                days: days.to_vec(),
                time_zone: zone.into(),
            }),
            ..Default::default()
        }
    }

    fn ms(zone: &str, dt: DateTime) -> i64 {
        TimeZone::get(zone)
            .expect("zone")
            .to_timestamp(dt)
            .expect("in range")
            .as_millisecond()
    }

    #[test]
    fn bad_windows_name_their_field() {
        for (settings, field) in [
            (window("9:00", "17:00", &[], "UTC"), "start"),
            (window("09:00", "25:00", &[], "UTC"), "end"),
            (window("09:00", "09:00", &[], "UTC"), "end"),
            (window("24:00", "09:00", &[], "UTC"), "start"),
            (window("09:00", "17:00", &[0], "UTC"), "days[0]"),
            (window("09:00", "17:00", &[1, 1], "UTC"), "days[1]"),
            (window("09:00", "17:00", &[], "Mars/Olympus"), "time_zone"),
            (window("09:00", "17:00", &[], ""), "time_zone"),
        ] {
            let err = Window::from_settings(&settings).expect_err("refused");
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("settings.calling_window.{field}:")),
                "{text}"
            );
        }
        assert!(
            Window::from_settings(&window("08:30:15", "24:00", &[1, 7], "Europe/Paris"))
                .expect("valid")
                .is_some()
        );
        assert!(matches!(
            Window::from_settings(&pb::CampaignSettings::default()),
            Ok(None)
        ));
        let numbers = vec![
            pb::CampaignNumber {
                number: "+14155550001".into(),
                time_zone: "Asia/Tokyo".into(),
                ..Default::default()
            },
            pb::CampaignNumber {
                number: "+14155550002".into(),
                time_zone: "Nowhere/Land".into(),
                ..Default::default()
            },
        ];
        let err = check_number_zones(&numbers).expect_err("refused");
        assert!(
            err.to_string().starts_with("numbers[1].time_zone:"),
            "{err}"
        );
    }

    #[test]
    fn the_window_is_read_in_each_zone_with_its_daylight_saving() {
        let mut clock = WindowClock::new(&window("09:00", "20:00", &[], "America/New_York"));
        // 2026-07-01 (a Wednesday) 08:59:59 and 09:00 in New York (EDT, UTC-4).
        let before = ms("America/New_York", date(2026, 7, 1).at(8, 59, 59, 0));
        let at = ms("America/New_York", date(2026, 7, 1).at(9, 0, 0, 0));
        assert!(!clock.is_open("", before));
        assert!(clock.is_open("", at));
        // The same instant is 06:00 in Los Angeles and 22:00 in Tokyo: closed in both.
        assert!(!clock.is_open("America/Los_Angeles", at));
        assert!(!clock.is_open("Asia/Tokyo", at));
        // In winter New York is UTC-5: 14:00 UTC is 09:00 there.
        let winter = ms("UTC", date(2026, 1, 15).at(14, 0, 0, 0));
        assert!(clock.is_open("", winter));
        assert!(!clock.is_open("", winter - 1000));
        // The end is excluded.
        let end = ms("America/New_York", date(2026, 7, 1).at(20, 0, 0, 0));
        assert!(clock.is_open("", end - 1000));
        assert!(!clock.is_open("", end));
    }

    #[test]
    fn days_and_overnight_windows() {
        // Weekdays only, 09:00-17:00 UTC: 2026-07-04 is a Saturday.
        let mut weekdays = WindowClock::new(&window("09:00", "17:00", &[1, 2, 3, 4, 5], "UTC"));
        assert!(weekdays.is_open("", ms("UTC", date(2026, 7, 3).at(12, 0, 0, 0))));
        assert!(!weekdays.is_open("", ms("UTC", date(2026, 7, 4).at(12, 0, 0, 0))));
        // 20:00-02:00 opening on Fridays only: Friday 23:00 and Saturday 01:00 are in,
        // Saturday 23:00 and Friday 01:00 (Thursday's night) are not.
        let mut night = WindowClock::new(&window("20:00", "02:00", &[5], "UTC"));
        assert!(night.is_open("", ms("UTC", date(2026, 7, 3).at(23, 0, 0, 0))));
        assert!(night.is_open("", ms("UTC", date(2026, 7, 4).at(1, 0, 0, 0))));
        assert!(!night.is_open("", ms("UTC", date(2026, 7, 4).at(23, 0, 0, 0))));
        assert!(!night.is_open("", ms("UTC", date(2026, 7, 3).at(1, 0, 0, 0))));
        assert!(!night.is_open("", ms("UTC", date(2026, 7, 4).at(2, 0, 0, 0))));
    }

    #[test]
    fn waiting_counts_pending_numbers_whose_window_is_closed() {
        let now = ms("UTC", date(2026, 7, 1).at(12, 0, 0, 0));
        let mut clock = WindowClock::new(&window("09:00", "17:00", &[], "UTC"));
        let mut numbers = vec![
            NumberState::new("+14155550001".into(), Default::default()),
            NumberState::new("+14155550002".into(), Default::default()),
            NumberState::new("+14155550003".into(), Default::default()),
        ];
        // 12:00 UTC is 21:00 in Tokyo and 05:00 in Los Angeles.
        numbers[1].time_zone = "Asia/Tokyo".into();
        numbers[2].time_zone = "America/Los_Angeles".into();
        assert_eq!(clock.waiting(&numbers, now), 2);
        numbers[2].phase = Phase::Placed {
            call_id: "c".into(),
            claimed_at_ms: now,
        };
        assert_eq!(clock.waiting(&numbers, now), 1);
        let mut none = WindowClock::new(&pb::CampaignSettings::default());
        assert_eq!(none.waiting(&numbers, now), 0);
        assert!(none.is_open("Asia/Tokyo", now));
    }
}
