//! Spans of the local day, `HH:MM-HH:MM`, for settings that depend on the time of day: the uplink
//! budget's schedule ([`crate::budget`]) and the maintenance windows releases go live in
//! ([`crate::switch::Gate`]). Pure: the caller passes the minute of the local day.

/// Minutes in a day.
pub const DAY: u16 = 24 * 60;

/// From `start` to `end`, minutes of the day; past midnight when `end < start` (`22:00-02:00`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: u16,
    pub end: u16,
}

fn minute(s: &str) -> Option<u16> {
    let s = s.trim();
    let (h, m) = s.split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

impl Span {
    /// Parses `HH:MM-HH:MM`; an empty span (start equal to end) is not one.
    pub fn parse(s: &str) -> Option<Span> {
        let (a, b) = s.split_once('-')?;
        let (start, end) = (minute(a)?, minute(b)?);
        (start != end).then_some(Span { start, end })
    }

    /// Whether `minute` of the day falls in the span (its end excluded).
    pub fn covers(&self, minute: u16) -> bool {
        let minute = minute % DAY;
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }

    /// Minutes from `minute` of the day until the span next starts (0 when it starts at `minute`).
    pub fn starts_in(&self, minute: u16) -> u16 {
        (self.start + DAY - minute % DAY) % DAY
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

/// Seconds in a duration written as a whole number with a unit, `s`, `m` or `h` (`90s`, `5m`,
/// `1h`), for settings and release policies; `None` when it is not one.
pub fn seconds(s: &str) -> Option<u64> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().ok()?;
    match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        _ => None,
    }
}

/// `secs` written the way [`seconds`] reads it, in the largest unit that divides it.
pub fn write_seconds(secs: u64) -> String {
    match secs {
        0 => "0s".into(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_cover_wrap_midnight_and_say_when_they_start() {
        let night = Span::parse("02:00-06:00").unwrap();
        assert_eq!(night.to_string(), "02:00-06:00");
        assert!(night.covers(120) && night.covers(359));
        assert!(!night.covers(360) && !night.covers(119));
        assert_eq!(night.starts_in(60), 60);
        assert_eq!(night.starts_in(120), 0);
        assert_eq!(night.starts_in(121), DAY - 1);
        let late = Span::parse("22:30-01:00").unwrap();
        assert!(
            late.covers(23 * 60) && late.covers(30) && !late.covers(60) && !late.covers(22 * 60)
        );
        assert_eq!(late.starts_in(22 * 60), 30);
        for bad in [
            "",
            "02:00",
            "2:00-06:00",
            "02:00-06:60",
            "24:00-01:00",
            "03:00-03:00",
            "a-b",
        ] {
            assert_eq!(Span::parse(bad), None, "{bad}");
        }
    }
}
