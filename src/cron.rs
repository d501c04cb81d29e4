//! Cron schedules: the five-field expressions of crontab(5), and the next time one fires.
//!
//! Used by `log_rotate_interval` (and meant for `cron_restart`). A [`Schedule`] is parsed once
//! at the config edge; [`Schedule::next_after`] answers "when, after this instant, does it fire
//! next?" in any [`chrono::TimeZone`] (corral passes [`chrono::Local`], or [`chrono::Utc`] with
//! `log_utc`). It owns no timer: callers sleep until the instant it returns.
//!
//! # Syntax
//!
//! `minute hour day-of-month month day-of-week`, separated by blanks. Each field is `*` or a
//! comma-separated list of items; an item is a value, a range `a-b`, or either followed by a
//! step: `*/15`, `8-18/2`, and `5/20` (from 5 to the field's maximum, as cronie reads it).
//! Months may be named `jan`..`dec` and weekdays `sun`..`sat` (any case); weekdays are 0..7,
//! where both 0 and 7 are Sunday. `@hourly`, `@daily` (`@midnight`), `@weekly`, `@monthly` and
//! `@yearly` (`@annually`) stand for their usual expressions.
//!
//! Days: as in Vixie cron and cronie, when both day fields are restricted a day matches if
//! *either* does (`0 0 1 * mon`: the 1st of each month and every Monday); when one of them
//! starts with `*` (`*`, `*/2`), a day must match both. A schedule that can never fire
//! (`0 0 30 feb *`) is refused when it is parsed.
//!
//! # Daylight saving time
//!
//! Schedules are wall-clock times of the zone, evaluated minute by minute:
//!
//! - A wall-clock time that does not exist (clocks go forward: 02:30 on the spring-forward night
//!   in Europe) fires at the first instant after the gap, when the clocks jump; several such
//!   times in one gap fire once.
//! - A wall-clock time that occurs twice (clocks go back) fires at its first occurrence only, so
//!   nothing runs twice; the repeated hour's minutes are skipped on the second pass.
//!
//! So a daily job runs exactly once on each calendar day, whatever the transitions, and a job
//! every N minutes never fires twice within N real minutes.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike};

/// How far ahead [`Schedule::next_naive_after`] looks: enough for any valid schedule to fire
/// (February 29th on a Monday comes back within 28 years).
const HORIZON_YEARS: i32 = 30;

/// A parsed cron expression.
#[derive(Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Bit n: minute n (0..=59).
    minutes: u64,
    /// Bit n: hour n (0..=23).
    hours: u32,
    /// Bit n: day of month n (1..=31).
    days: u32,
    /// Bit n: month n (1..=12).
    months: u16,
    /// Bit n: weekday n (0 = Sunday ..= 6).
    weekdays: u8,
    /// The day-of-month field starts with `*` (see the module docs on days).
    days_star: bool,
    /// The day-of-week field starts with `*`.
    weekdays_star: bool,
    /// The text as written, for messages.
    text: String,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Schedule, String> {
        Schedule::parse(text)
    }
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// One field's range and names.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    /// Names of `min`, `min + 1`, ...
    names: &'static [&'static str],
}

impl Schedule {
    /// Parses a five-field expression or an `@` shorthand; the error says which field is
    /// wrong and why.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let trimmed = text.trim();
        let expanded = match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other if other.starts_with('@') => {
                return Err(format!(
                    "{trimmed:?} is not a cron shorthand (@hourly, @daily, @weekly, @monthly, @yearly)"
                ))
            }
            _ => trimmed,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "{trimmed:?} has {} field{}; a cron expression has 5: minute hour day-of-month month day-of-week",
                fields.len(),
                if fields.len() == 1 { "" } else { "s" }
            ));
        }
        let bits = |index: usize, field: &Field| parse_field(fields[index], field);
        let minutes = bits(
            0,
            &Field {
                name: "minute",
                min: 0,
                max: 59,
                names: &[],
            },
        )?;
        let hours = bits(
            1,
            &Field {
                name: "hour",
                min: 0,
                max: 23,
                names: &[],
            },
        )?;
        let days = bits(
            2,
            &Field {
                name: "day of month",
                min: 1,
                max: 31,
                names: &[],
            },
        )?;
        let months = bits(
            3,
            &Field {
                name: "month",
                min: 1,
                max: 12,
                names: &MONTHS,
            },
        )?;
        let weekdays = bits(
            4,
            &Field {
                name: "day of week",
                min: 0,
                max: 7,
                names: &WEEKDAYS,
            },
        )?;
        // 7 is Sunday too.
        let weekdays = (weekdays | (weekdays >> 7)) & 0x7f;
        let schedule = Schedule {
            minutes,
            hours: hours as u32,
            days: days as u32,
            months: months as u16,
            weekdays: weekdays as u8,
            days_star: fields[2].starts_with('*'),
            weekdays_star: fields[4].starts_with('*'),
            text: trimmed.to_owned(),
        };
        let start = NaiveDate::from_ymd_opt(2000, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("UNWRAP: a valid date");
        if schedule.next_naive_after(start).is_none() {
            return Err(format!("{trimmed:?} never fires (no month has that day)"));
        }
        Ok(schedule)
    }

    /// True if the wall-clock minute of `local` matches (seconds are ignored).
    pub fn matches(&self, local: &NaiveDateTime) -> bool {
        self.minutes & (1 << local.minute()) != 0
            && self.hours & (1 << local.hour()) != 0
            && self.months & (1 << local.month()) != 0
            && self.day_matches(local.date())
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        let day = self.days & (1 << date.day()) != 0;
        let weekday = self.weekdays & (1 << date.weekday().num_days_from_sunday()) != 0;
        if self.days_star || self.weekdays_star {
            day && weekday
        } else {
            day || weekday
        }
    }

    /// The first wall-clock minute strictly after `after` that matches, ignoring time zones;
    /// `None` if there is none within [`HORIZON_YEARS`].
    pub fn next_naive_after(&self, after: NaiveDateTime) -> Option<NaiveDateTime> {
        let minute = after.date().and_hms_opt(after.hour(), after.minute(), 0)?;
        let mut t = minute + Duration::minutes(1);
        let last_year = after.year() + HORIZON_YEARS;
        while t.year() <= last_year {
            if self.months & (1 << t.month()) == 0 {
                let (year, month) = if t.month() == 12 {
                    (t.year() + 1, 1)
                } else {
                    (t.year(), t.month() + 1)
                };
                t = NaiveDate::from_ymd_opt(year, month, 1)?.and_hms_opt(0, 0, 0)?;
            } else if !self.day_matches(t.date()) {
                t = t.date().succ_opt()?.and_hms_opt(0, 0, 0)?;
            } else if self.hours & (1 << t.hour()) == 0 {
                t = t.date().and_hms_opt(t.hour(), 0, 0)? + Duration::hours(1);
            } else if self.minutes & (1 << t.minute()) == 0 {
                t += Duration::minutes(1);
            } else {
                return Some(t);
            }
        }
        None
    }

    /// The first instant strictly after `after` at which the schedule fires, in `after`'s
    /// zone, with the daylight-saving rules of the module docs. `None` only if it would not
    /// fire within 30 years (a parsed schedule always does).
    pub fn next_after<Tz: TimeZone>(&self, after: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        let zone = after.timezone();
        let mut wall = after.naive_local();
        loop {
            let candidate = self.next_naive_after(wall)?;
            match zone.from_local_datetime(&candidate) {
                LocalResult::Single(at) if at > *after => return Some(at),
                // Clocks went back: only the first of the two instants fires.
                LocalResult::Ambiguous(first, _) if first > *after => return Some(first),
                LocalResult::Single(_) | LocalResult::Ambiguous(..) => {}
                // Clocks went forward over it: fire when they jump, at the first minute that
                // exists after the gap.
                LocalResult::None => {
                    if let Some(at) = first_after_gap(&zone, candidate) {
                        if at > *after {
                            return Some(at);
                        }
                    }
                }
            }
            wall = candidate;
        }
    }
}

/// The first instant whose wall-clock minute follows the non-existent `wall` (at most a day on).
fn first_after_gap<Tz: TimeZone>(zone: &Tz, wall: NaiveDateTime) -> Option<DateTime<Tz>> {
    let mut t = wall;
    for _ in 0..24 * 60 {
        t += Duration::minutes(1);
        match zone.from_local_datetime(&t) {
            LocalResult::Single(at) | LocalResult::Ambiguous(at, _) => return Some(at),
            LocalResult::None => {}
        }
    }
    None
}

/// One field's set of values as bits (bit n: value n).
fn parse_field(text: &str, field: &Field) -> Result<u64, String> {
    let name = field.name;
    let mut bits = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .map_err(|_| format!("{name} field {text:?}: step {step:?} is not a number"))?;
                if step == 0 {
                    return Err(format!("{name} field {text:?}: a step must be at least 1"));
                }
                (range, Some(step))
            }
            None => (item, None),
        };
        let (low, high) = if range == "*" {
            (field.min, field.max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a, field, text)?, value(b, field, text)?);
            if a > b {
                return Err(format!("{name} field {text:?}: the range {range:?} runs backwards"));
            }
            (a, b)
        } else {
            let a = value(range, field, text)?;
            // `5/20`: from 5 to the end, stepped.
            (a, if step.is_some() { field.max } else { a })
        };
        let step = step.unwrap_or(1);
        let mut v = low;
        while v <= high {
            bits |= 1 << v;
            // A step past the field's end (`59/4294967295`) ends the list, never wraps.
            match v.checked_add(step) {
                Some(next) => v = next,
                None => break,
            }
        }
    }
    Ok(bits)
}

fn value(text: &str, field: &Field, whole: &str) -> Result<u32, String> {
    let lower = text.to_ascii_lowercase();
    let named = field
        .names
        .iter()
        .position(|n| *n == lower)
        .map(|i| field.min + i as u32);
    let number = match named {
        Some(n) => n,
        None => text.parse::<u32>().map_err(|_| {
            format!(
                "{} field {whole:?}: {text:?} is not a number{}",
                field.name,
                if field.names.is_empty() { "" } else { " or a name" }
            )
        })?,
    };
    if number < field.min || number > field.max {
        return Err(format!(
            "{} field {whole:?}: {number} is out of range ({}-{})",
            field.name, field.min, field.max
        ));
    }
    Ok(number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, MappedLocalTime, NaiveDate, Utc};

    fn at(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M").expect("a test date")
    }

    fn next(schedule: &str, after: &str) -> String {
        let schedule = Schedule::parse(schedule).expect("a valid schedule");
        let next = schedule.next_naive_after(at(after)).expect("it fires");
        next.format("%Y-%m-%d %H:%M %a").to_string()
    }

    #[test]
    fn fields_lists_ranges_steps_and_names() {
        assert_eq!(next("* * * * *", "2026-01-01 10:00"), "2026-01-01 10:01 Thu");
        assert_eq!(next("*/15 * * * *", "2026-01-01 10:00"), "2026-01-01 10:15 Thu");
        assert_eq!(next("*/15 * * * *", "2026-01-01 10:59"), "2026-01-01 11:00 Thu");
        assert_eq!(next("5,35 9-17/4 * * *", "2026-01-01 10:00"), "2026-01-01 13:05 Thu");
        assert_eq!(next("5,35 9-17/4 * * *", "2026-01-01 17:35"), "2026-01-02 09:05 Fri");
        assert_eq!(next("10/20 * * * *", "2026-01-01 10:31"), "2026-01-01 10:50 Thu");
        // A step past the field's end is one value, not a wrap-around to every minute.
        assert_eq!(
            next("59/4294967295 * * * *", "2026-01-01 10:00"),
            "2026-01-01 10:59 Thu"
        );
        assert_eq!(
            next("59/4294967295 * * * *", "2026-01-01 10:59"),
            "2026-01-01 11:59 Thu"
        );
        assert_eq!(next("0 0 * * *", "2026-12-31 23:59"), "2027-01-01 00:00 Fri");
        assert_eq!(next("0 12 * jun-AUG *", "2026-01-01 10:00"), "2026-06-01 12:00 Mon");
        assert_eq!(next("0 12 * * sat,SUN", "2026-01-01 10:00"), "2026-01-03 12:00 Sat");
        assert_eq!(next("0 12 * * 7", "2026-01-01 10:00"), "2026-01-04 12:00 Sun");
        assert_eq!(next("0 12 * * 5-7", "2026-01-03 13:00"), "2026-01-04 12:00 Sun");
        assert_eq!(next("0 0 29 2 *", "2026-01-01 00:00"), "2028-02-29 00:00 Tue");
        assert_eq!(next("@hourly", "2026-01-01 10:30"), "2026-01-01 11:00 Thu");
        assert_eq!(next("@daily", "2026-01-01 10:30"), "2026-01-02 00:00 Fri");
        assert_eq!(next("@weekly", "2026-01-01 10:30"), "2026-01-04 00:00 Sun");
        assert_eq!(next("@monthly", "2026-01-01 10:30"), "2026-02-01 00:00 Sun");
        assert_eq!(next("@yearly", "2026-01-01 10:30"), "2027-01-01 00:00 Fri");
        // Seconds of `after` do not matter: strictly the next minute.
        let schedule = Schedule::parse("* * * * *").expect("valid");
        let after = NaiveDate::from_ymd_opt(2026, 1, 1)
            .and_then(|d| d.and_hms_milli_opt(10, 0, 59, 999))
            .expect("date");
        assert_eq!(schedule.next_naive_after(after), Some(at("2026-01-01 10:01")));
        assert!(schedule.matches(&after));
    }

    #[test]
    fn both_day_fields_restricted_means_either() {
        // The 13th, or a Friday.
        assert_eq!(next("0 0 13 * fri", "2026-01-01 00:00"), "2026-01-02 00:00 Fri");
        assert_eq!(next("0 0 13 * fri", "2026-01-10 00:00"), "2026-01-13 00:00 Tue");
        // One of them starting with `*` means both must match (Vixie cron): odd days that are
        // Fridays.
        assert_eq!(next("0 0 */2 * fri", "2026-01-01 00:00"), "2026-01-09 00:00 Fri");
        assert_eq!(next("0 0 1 * *", "2026-01-01 00:00"), "2026-02-01 00:00 Sun");
        assert_eq!(next("0 0 * * mon", "2026-01-01 00:00"), "2026-01-05 00:00 Mon");
    }

    #[test]
    fn bad_expressions_name_the_field() {
        for (text, wanted) in [
            ("* * * *", "has 4 fields"),
            ("* * * * * *", "has 6 fields"),
            ("60 * * * *", "minute field \"60\": 60 is out of range (0-59)"),
            ("* 24 * * *", "hour field"),
            ("* * 0 * *", "day of month field \"0\": 0 is out of range (1-31)"),
            ("* * * 13 *", "month field"),
            ("* * * * 8", "day of week field"),
            ("* * * foo *", "\"foo\" is not a number or a name"),
            ("*/0 * * * *", "a step must be at least 1"),
            ("*/x * * * *", "step \"x\" is not a number"),
            ("5-1 * * * *", "runs backwards"),
            ("1,,2 * * * *", "\"\" is not a number"),
            ("0 0 30 feb *", "never fires"),
            ("0 0 31 apr,jun *", "never fires"),
            ("@often", "not a cron shorthand"),
        ] {
            let error = Schedule::parse(text).expect_err(text);
            assert!(error.contains(wanted), "{text}: {error}");
        }
        // A restricted weekday rescues an impossible day (either may match).
        assert!(Schedule::parse("0 0 30 feb mon").is_ok());
    }

    #[test]
    fn fixed_offsets_and_utc() {
        let schedule = Schedule::parse("0 0 * * *").expect("valid");
        let kolkata = FixedOffset::east_opt(5 * 3600 + 1800).expect("offset");
        // 20:00 UTC is 01:30 in Kolkata: local midnight is 18:30 UTC the same UTC day.
        let after = Utc
            .with_ymd_and_hms(2026, 1, 1, 20, 0, 0)
            .unwrap()
            .with_timezone(&kolkata);
        let next = schedule.next_after(&after).expect("fires");
        assert_eq!(next.to_rfc3339(), "2026-01-03T00:00:00+05:30");
        assert_eq!(next.with_timezone(&Utc).to_rfc3339(), "2026-01-02T18:30:00+00:00");
        let utc = schedule
            .next_after(&Utc.with_ymd_and_hms(2026, 1, 1, 20, 0, 0).unwrap())
            .expect("fires");
        assert_eq!(utc.to_rfc3339(), "2026-01-02T00:00:00+00:00");
    }

    /// A zone like Central Europe in 2026: +01:00, and +02:00 from 2026-03-29 01:00 UTC (local
    /// 02:00 becomes 03:00) to 2026-10-25 01:00 UTC (local 03:00 becomes 02:00 again).
    #[derive(Debug, Clone, Copy)]
    struct Europe;

    impl Europe {
        fn summer(utc: &NaiveDateTime) -> bool {
            *utc >= at("2026-03-29 01:00") && *utc < at("2026-10-25 01:00")
        }
        fn offset(summer: bool) -> FixedOffset {
            FixedOffset::east_opt(if summer { 7200 } else { 3600 }).expect("offset")
        }
    }

    impl TimeZone for Europe {
        type Offset = FixedOffset;

        fn from_offset(_: &FixedOffset) -> Europe {
            Europe
        }

        fn offset_from_local_date(&self, local: &NaiveDate) -> MappedLocalTime<FixedOffset> {
            self.offset_from_local_datetime(&local.and_hms_opt(12, 0, 0).expect("noon"))
        }

        fn offset_from_local_datetime(&self, local: &NaiveDateTime) -> MappedLocalTime<FixedOffset> {
            // Each offset is possible if converting with it lands in its season.
            let summer = Europe::summer(&(*local - Duration::hours(2)));
            let winter = !Europe::summer(&(*local - Duration::hours(1)));
            match (summer, winter) {
                (true, true) => MappedLocalTime::Ambiguous(Europe::offset(true), Europe::offset(false)),
                (true, false) => MappedLocalTime::Single(Europe::offset(true)),
                (false, true) => MappedLocalTime::Single(Europe::offset(false)),
                (false, false) => MappedLocalTime::None,
            }
        }

        fn offset_from_utc_date(&self, utc: &NaiveDate) -> FixedOffset {
            self.offset_from_utc_datetime(&utc.and_hms_opt(0, 0, 0).expect("midnight"))
        }

        fn offset_from_utc_datetime(&self, utc: &NaiveDateTime) -> FixedOffset {
            Europe::offset(Europe::summer(utc))
        }
    }

    /// Every firing from `from` (UTC) while it is before `until` (UTC), as local RFC 3339.
    fn firings(schedule: &str, from: &str, until: &str) -> Vec<String> {
        let schedule = Schedule::parse(schedule).expect("valid");
        let mut t = Europe.from_utc_datetime(&at(from));
        let until = Europe.from_utc_datetime(&at(until));
        let mut out = Vec::new();
        loop {
            t = schedule.next_after(&t).expect("fires");
            if t >= until {
                return out;
            }
            out.push(t.to_rfc3339());
        }
    }

    #[test]
    fn a_time_in_the_spring_gap_fires_when_the_clocks_jump() {
        // 02:30 does not exist on 2026-03-29: it fires at 03:00 (+02:00), once.
        assert_eq!(
            firings("30 2 * * *", "2026-03-27 12:00", "2026-03-30 12:00"),
            [
                "2026-03-28T02:30:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-30T02:30:00+02:00"
            ]
        );
        // Every 20 minutes: 01:40 (+01:00), then the gap's 02:00, 02:20, 02:40 all fire as one
        // at 03:00, then 03:20.
        assert_eq!(
            firings("*/20 * * * *", "2026-03-29 00:30", "2026-03-29 01:30"),
            [
                "2026-03-29T01:40:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-29T03:20:00+02:00"
            ]
        );
        // Daily at midnight is untouched by a transition at 02:00.
        assert_eq!(
            firings("@daily", "2026-03-28 12:00", "2026-03-30 12:00"),
            ["2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00"]
        );
    }

    #[test]
    fn a_repeated_time_in_the_autumn_fires_once() {
        // 02:30 happens twice on 2026-10-25 (at 00:30 and 01:30 UTC): only the first fires.
        assert_eq!(
            firings("30 2 * * *", "2026-10-24 12:00", "2026-10-26 12:00"),
            ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
        );
        // Hourly: 02:00 (+02:00), then the repeated 02:00 (+01:00) is skipped, then 03:00.
        assert_eq!(
            firings("0 * * * *", "2026-10-24 22:30", "2026-10-25 03:30"),
            [
                "2026-10-25T01:00:00+02:00",
                "2026-10-25T02:00:00+02:00",
                "2026-10-25T03:00:00+01:00",
                "2026-10-25T04:00:00+01:00"
            ]
        );
        // Starting inside the repeated hour (second pass, 02:10 +01:00): nothing fires again
        // before 03:00.
        let schedule = Schedule::parse("*/30 * * * *").expect("valid");
        let second_pass = Europe.from_utc_datetime(&at("2026-10-25 01:10"));
        assert_eq!(second_pass.to_rfc3339(), "2026-10-25T02:10:00+01:00");
        assert_eq!(
            schedule.next_after(&second_pass).map(|t| t.to_rfc3339()),
            Some("2026-10-25T03:00:00+01:00".to_owned())
        );
    }

    #[test]
    fn next_after_is_strictly_later_and_matches() {
        // A property over many starting points: the answer is later, matches, and no matching
        // minute lies between the start and it (in a zone without DST).
        let schedules = ["*/7 3-5 * * *", "0 0 13 * fri", "15 10 * 2,8 1-3", "0 */6 1,15 * *"];
        for text in schedules {
            let schedule = Schedule::parse(text).expect("valid");
            let mut t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
            for _ in 0..50 {
                let next = schedule.next_after(&t).expect("fires");
                assert!(next > t, "{text}");
                assert_eq!(next.second(), 0, "{text}");
                assert!(schedule.matches(&next.naive_local()), "{text} {next}");
                let mut m = t.naive_local() + Duration::minutes(1);
                while m < next.naive_local() {
                    assert!(!schedule.matches(&m), "{text}: {m} skipped");
                    m += Duration::minutes(1);
                }
                t = next;
            }
        }
    }
}
