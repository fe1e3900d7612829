//! Weekly schedules in a named time zone (grants' `schedule`, policies' `quiet_hours`):
//! checking their fields and deciding whether an instant falls inside.
//!
//! Time zones come from the IANA database bundled into the binary (jiff), so a hub decides the
//! same way whatever its system's tzdata, and daylight-saving changes are handled by the zone
//! rules rather than by fixed offsets.

use thiserror::Error;

use super::statement::Schedule;

/// Why a schedule is unusable.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ScheduleError {
    /// The time zone is not in the IANA database.
    #[error("unknown time zone {0:?}")]
    TimeZone(String),
    /// A day is not one of mon … sun, or is repeated.
    #[error("days: each of mon, tue, wed, thu, fri, sat, sun at most once")]
    Days,
    /// A time is not `HH:MM`.
    #[error("times: HH:MM, 00:00 to 23:59")]
    Time,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn minutes(hhmm: &str) -> Result<u16, ScheduleError> {
    let b = hhmm.as_bytes();
    if b.len() != 5 || b[2] != b':' || !b.iter().enumerate().all(|(i, c)| i == 2 || c.is_ascii_digit()) {
        return Err(ScheduleError::Time);
    }
    let h = u16::from(b[0] - b'0') * 10 + u16::from(b[1] - b'0');
    let m = u16::from(b[3] - b'0') * 10 + u16::from(b[4] - b'0');
    if h > 23 || m > 59 {
        return Err(ScheduleError::Time);
    }
    Ok(h * 60 + m)
}

impl Schedule {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        jiff::tz::TimeZone::get(&self.tz).map_err(|_| ScheduleError::TimeZone(self.tz.chars().take(64).collect()))?;
        let mut seen = [false; 7];
        for day in &self.days {
            let i = DAYS.iter().position(|d| d == day).ok_or(ScheduleError::Days)?;
            if std::mem::replace(&mut seen[i], true) {
                return Err(ScheduleError::Days);
            }
        }
        minutes(&self.from)?;
        minutes(&self.to)?;
        Ok(())
    }

    /// Whether the instant `unix_secs` is inside the schedule: on one of its days (local time),
    /// between `from` (inclusive) and `to` (exclusive). A window whose `to` is not after
    /// `from` spans midnight, and belongs to the day it starts on.
    pub fn covers(&self, unix_secs: i64) -> Result<bool, ScheduleError> {
        self.validate()?;
        let tz = jiff::tz::TimeZone::get(&self.tz).map_err(|_| ScheduleError::TimeZone(self.tz.clone()))?;
        let ts = jiff::Timestamp::from_second(unix_secs).map_err(|_| ScheduleError::Time)?;
        let local = ts.to_zoned(tz);
        let now = u16::from(local.hour() as u8) * 60 + u16::from(local.minute() as u8);
        let (from, to) = (minutes(&self.from)?, minutes(&self.to)?);
        let day_index = |z: &jiff::Zoned| z.weekday().to_monday_zero_offset() as usize;
        let on = |i: usize| self.days.iter().any(|d| d == DAYS[i]);
        let today = day_index(&local);
        Ok(if from < to {
            on(today) && (from..to).contains(&now)
        } else {
            // Spans midnight: the evening part is today's window, the morning part yesterday's.
            (now >= from && on(today)) || (now < to && on((today + 6) % 7))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(tz: &str, days: &[&str], from: &str, to: &str) -> Schedule {
        Schedule { tz: tz.into(), days: days.iter().map(|d| d.to_string()).collect(), from: from.into(), to: to.into() }
    }

    // 2026-11-30 is a Monday. 09:00 UTC = 10:00 in Berlin (CET, UTC+1).
    const MON_0900_UTC: i64 = 1_796_029_200;

    #[test]
    fn local_time_in_the_named_zone_decides() {
        let office = schedule("Europe/Berlin", &["mon", "tue"], "08:00", "18:00");
        assert!(office.covers(MON_0900_UTC).unwrap());
        assert!(!office.covers(MON_0900_UTC - 3 * 3600).unwrap(), "06:00 UTC is 07:00 in Berlin");
        let tokyo = schedule("Asia/Tokyo", &["mon"], "08:00", "18:00");
        assert!(!tokyo.covers(MON_0900_UTC).unwrap(), "18:00 in Tokyo: the window has closed");
        assert!(!office.covers(MON_0900_UTC + 3 * 86_400).unwrap(), "Thursday");
    }

    #[test]
    fn windows_across_midnight_belong_to_the_day_they_start() {
        let night = schedule("UTC", &["sun"], "22:00", "06:00");
        // Monday 01:00 UTC: inside Sunday's night window.
        assert!(night.covers(MON_0900_UTC - 8 * 3600).unwrap());
        // Monday 23:00: Monday has no window.
        assert!(!night.covers(MON_0900_UTC + 14 * 3600).unwrap());
    }

    #[test]
    fn daylight_saving_follows_the_zone_rules() {
        // 2026-07-06 (a Monday) 07:30 UTC is 09:30 in Berlin (CEST, UTC+2), inside 09:00-10:00.
        let s = schedule("Europe/Berlin", &["mon"], "09:00", "10:00");
        assert!(s.covers(1_783_323_000).unwrap());
    }

    #[test]
    fn bad_fields_are_refused() {
        assert!(matches!(
            schedule("Mars/Olympus", &["mon"], "08:00", "09:00").validate(),
            Err(ScheduleError::TimeZone(_))
        ));
        assert_eq!(schedule("UTC", &["mon", "mon"], "08:00", "09:00").validate(), Err(ScheduleError::Days));
        assert_eq!(schedule("UTC", &["monday"], "08:00", "09:00").validate(), Err(ScheduleError::Days));
        for t in ["8:00", "24:00", "12:60", "12-00", "ab:cd"] {
            assert_eq!(schedule("UTC", &["mon"], t, "09:00").validate(), Err(ScheduleError::Time), "{t}");
        }
    }
}
