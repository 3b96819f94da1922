//! The shop's uplink budget: the most all agents together take from the origin, as a rate, optionally by
//! time of day (one rate in opening hours, another at night). Parsing and the lookup are pure; the agent
//! passes the local minute of the day. The agents fetching share the budget equally
//! ([`crate::fetch::Event::Budget`]): each counts the same group from the same announcements.

use crate::daily::Span;

/// Why a rate or a schedule entry does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "rate {0:?} is not a number followed by a unit: bit, kbit, Mbit, Gbit (per second) or B, KB, MB, GB (bytes per second)"
    )]
    Rate(String),
    #[error("rate {0:?} is zero: leave the budget unset for no limit")]
    Zero(String),
    #[error("schedule entry {0:?} is not HH:MM-HH:MM=RATE (for example 08:00-20:00=10Mbit)")]
    Entry(String),
    #[error("schedule entries {0:?} and {1:?} overlap")]
    Overlap(String, String),
}

/// Parses a rate into bytes per second: `30Mbit`, `500kbit`, `4MB`, `1.5Gbit`. Units are decimal
/// (1 Mbit = 1,000,000 bits), as line speeds are sold.
pub fn parse_rate(s: &str) -> Result<u64, BudgetError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| BudgetError::Rate(s.to_owned()))?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| BudgetError::Rate(s.to_owned()))?;
    let bytes_per_unit = match unit.trim() {
        "bit" | "bps" => 1.0 / 8.0,
        "kbit" | "Kbit" | "kbps" => 1e3 / 8.0,
        "Mbit" | "mbit" | "Mbps" => 1e6 / 8.0,
        "Gbit" | "gbit" | "Gbps" => 1e9 / 8.0,
        "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return Err(BudgetError::Rate(s.to_owned())),
    };
    let v = (n * bytes_per_unit).round();
    if !v.is_finite() || v > u64::MAX as f64 {
        return Err(BudgetError::Rate(s.to_owned()));
    }
    if v < 1.0 {
        return Err(BudgetError::Zero(s.to_owned()));
    }
    Ok(v as u64)
}

/// One entry of a schedule: `span` of the day (wrapping past midnight when its end is before its start),
/// `rate` bytes per second.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub span: Span,
    pub rate: u64,
    text: String,
}

impl Window {
    fn covers(&self, minute: u16) -> bool {
        self.span.covers(minute)
    }
}

/// Parses `HH:MM-HH:MM=RATE`.
pub fn parse_window(s: &str) -> Result<Window, BudgetError> {
    let bad = || BudgetError::Entry(s.to_owned());
    let (span, rate) = s.split_once('=').ok_or_else(bad)?;
    Ok(Window {
        span: Span::parse(span).ok_or_else(bad)?,
        rate: parse_rate(rate)?,
        text: s.to_owned(),
    })
}

/// The budget: a default rate (or none) and windows of the day that override it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    pub default: Option<u64>,
    pub windows: Vec<Window>,
}

impl Budget {
    /// From the settings: `uplink_budget` (a rate) and `uplink_schedule` entries. Overlapping windows
    /// are refused, so the rate at any minute is never ambiguous.
    pub fn parse(default: Option<&str>, schedule: &[String]) -> Result<Self, BudgetError> {
        let default = default.map(parse_rate).transpose()?;
        let windows: Vec<Window> = schedule
            .iter()
            .map(|s| parse_window(s))
            .collect::<Result<_, _>>()?;
        Budget::new(default, windows)
    }

    /// From parsed parts, refusing overlapping windows.
    pub fn new(default: Option<u64>, windows: Vec<Window>) -> Result<Self, BudgetError> {
        for (i, a) in windows.iter().enumerate() {
            for b in &windows[i + 1..] {
                if (0..24 * 60).any(|m| a.covers(m) && b.covers(m)) {
                    return Err(BudgetError::Overlap(a.text.clone(), b.text.clone()));
                }
            }
        }
        Ok(Budget { default, windows })
    }

    /// The shop's budget, bytes per second, at `minute` of the local day (`None`: no limit).
    pub fn at(&self, minute: u16) -> Option<u64> {
        self.windows
            .iter()
            .find(|w| w.covers(minute % (24 * 60)))
            .map(|w| w.rate)
            .or(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_line_units_and_nonsense_is_named() {
        assert_eq!(parse_rate("30Mbit"), Ok(3_750_000));
        assert_eq!(parse_rate("500kbit"), Ok(62_500));
        assert_eq!(parse_rate("1.5Gbit"), Ok(187_500_000));
        assert_eq!(parse_rate("4MB"), Ok(4_000_000));
        assert_eq!(parse_rate(" 8 bit"), Ok(1));
        assert!(matches!(parse_rate("30"), Err(BudgetError::Rate(_))));
        assert!(matches!(parse_rate("fast"), Err(BudgetError::Rate(_))));
        assert!(matches!(parse_rate("30Mbyte"), Err(BudgetError::Rate(_))));
        assert!(matches!(parse_rate("0Mbit"), Err(BudgetError::Zero(_))));
    }

    #[test]
    fn a_schedule_picks_the_window_of_the_minute_wrapping_past_midnight() {
        let b = Budget::parse(
            Some("30Mbit"),
            &["08:00-20:00=10Mbit".into(), "22:00-06:00=100Mbit".into()],
        )
        .unwrap();
        assert_eq!(b.at(7 * 60 + 59), Some(3_750_000));
        assert_eq!(b.at(8 * 60), Some(1_250_000));
        assert_eq!(b.at(19 * 60 + 59), Some(1_250_000));
        assert_eq!(b.at(20 * 60), Some(3_750_000));
        assert_eq!(b.at(23 * 60), Some(12_500_000));
        assert_eq!(b.at(3 * 60), Some(12_500_000));
        assert_eq!(b.at(6 * 60), Some(3_750_000));
        assert_eq!(Budget::parse(None, &[]).unwrap().at(600), None);
        assert!(matches!(
            Budget::parse(
                None,
                &["08:00-20:00=10Mbit".into(), "19:00-21:00=1Mbit".into()]
            ),
            Err(BudgetError::Overlap(..))
        ));
        for bad in [
            "8-20=1Mbit",
            "08:00-08:00=1Mbit",
            "08:00-25:00=1Mbit",
            "08:00=1Mbit",
        ] {
            assert!(
                matches!(
                    Budget::parse(None, &[bad.into()]),
                    Err(BudgetError::Entry(_))
                ),
                "{bad}"
            );
        }
    }
}
