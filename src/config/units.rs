//! Human-friendly durations (`"250ms"`, `"30s"`, `"5m"`) and sizes (`"64KiB"`, `"16MiB"`).

use std::time::Duration;

/// The longest duration any setting takes. Deadlines are computed as "now + duration" on
/// tokio's clock; a bound far below where that overflows keeps every such sum safe, and
/// no timeout in a gateway needs more than a month.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Parses a duration such as `250ms`, `30s`, `5m` or `1h`, at most 30 days.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() || !trimmed.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!(
            "`{text}` is not a duration; write a number with a unit, like \"250ms\", \"30s\" or \"5m\""
        ));
    }
    let duration = humantime::parse_duration(trimmed).map_err(|e| {
        format!("`{text}` is not a duration ({e}); write a number with a unit, like \"250ms\", \"30s\" or \"5m\"")
    })?;
    if duration > MAX_DURATION {
        return Err(format!(
            "`{text}` is longer than the longest duration wsgate takes, 30 days (\"30d\")"
        ));
    }
    Ok(duration)
}

/// Parses a size such as `1024`, `512B`, `64KiB`, `16MiB` or `1GiB` into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let bad = || {
        format!(
            "`{text}` is not a size; write bytes or a binary unit, like \"65536\", \"64KiB\" or \"16MiB\""
        )
    };
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    number.checked_mul(multiplier).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_duration("30d"), Ok(MAX_DURATION));
        let too_long = parse_duration("300000000000y").unwrap_err();
        assert!(too_long.contains("30 days"), "{too_long}");
        assert!(parse_duration("31d").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("16MB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}
