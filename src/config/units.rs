//! Human units used in `proxy.toml`: durations (`"500ms"`, `"10s"`, `"2m"`, or an integer number
//! of milliseconds, as in PM2) and sizes (`"200M"`, `"1G"`, PM2's suffixes, or a plain number of
//! bytes). Parsed once, at the config edge; the rest of corral sees `Duration` and `u64` bytes.

use std::time::Duration;

/// What a duration looks like, for error messages.
pub const DURATION_HINT: &str = r#"a duration such as "500ms", "10s", "2m", "1h" or an integer number of milliseconds"#;
/// What a size looks like, for error messages.
pub const SIZE_HINT: &str = r#"a size such as "512K", "200M", "1G" or an integer number of bytes"#;

/// Parses `"250ms"`, `"10s"`, `"1.5s"`, `"2m"`, `"1h"`; a bare number is milliseconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let millis_per_unit = match unit.trim() {
        "" | "ms" => 1.0,
        "s" => 1_000.0,
        "m" | "min" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    let millis = value * millis_per_unit;
    // Anything beyond a year is a typo, not a timeout.
    if !millis.is_finite() || millis > 365.0 * 24.0 * 3_600_000.0 {
        return None;
    }
    Some(Duration::from_micros((millis * 1_000.0).round() as u64))
}

/// Parses `"512K"`, `"200M"`, `"1G"` (also `KB`/`MB`/`GB`, case-insensitive, powers of 1024 as
/// in PM2); a bare number is bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let multiplier: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" => 1 << 10,
        "M" | "MB" => 1 << 20,
        "G" | "GB" => 1 << 30,
        _ => return None,
    };
    let bytes = value * multiplier as f64;
    (bytes.is_finite() && bytes < u64::MAX as f64).then(|| bytes.round() as u64)
}

/// Formats a duration the way the config accepts it back (for `check` and `status`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) && ms > 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Formats a byte count with a binary suffix, one decimal (for `status`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "K", "M", "G"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases = [
            ("500ms", Some(500)),
            ("10s", Some(10_000)),
            ("1.5s", Some(1_500)),
            ("2m", Some(120_000)),
            ("1h", Some(3_600_000)),
            ("1500", Some(1_500)),
            (" 3s ", Some(3_000)),
            ("0", Some(0)),
            ("10x", None),
            ("s", None),
            ("", None),
            ("-1s", None),
            ("1.s", None),
            ("1e9h", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text).map(|d| d.as_millis() as u64), want, "{text:?}");
        }
    }

    #[test]
    fn sizes() {
        let cases = [
            ("200M", Some(200 << 20)),
            ("1G", Some(1 << 30)),
            ("512k", Some(512 << 10)),
            ("64KB", Some(64 << 10)),
            ("1000", Some(1000)),
            ("1.5M", Some(3 << 19)),
            ("10T", None),
            ("M", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text), want, "{text:?}");
        }
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["500ms", "10s", "2m", "1h"] {
            let d = parse_duration(text).expect("valid");
            assert_eq!(format_duration(d), text);
        }
        assert_eq!(format_size(1536), "1.5K");
        assert_eq!(format_size(200 << 20), "200.0M");
        assert_eq!(format_size(12), "12B");
    }
}
