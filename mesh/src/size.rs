//! Human-readable byte sizes: parsing `--memory-limit 1.5GiB`, printing `3.2 GiB`.

/// Why [`parse_size`] rejected its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSizeError {
    #[error("empty size; expected a number of bytes such as 512MiB or 2GB")]
    Empty,

    #[error("size {0:?} is negative")]
    Negative(String),

    #[error(
        "{0:?} is not a size; expected a number with an optional unit, such as 512MiB or 1.5GB"
    )]
    Invalid(String),

    #[error(
        "unknown unit {unit:?} in {input:?}; use B, KB, MB, GB, TB (powers of 1000) \
         or KiB, MiB, GiB, TiB (powers of 1024)"
    )]
    UnknownUnit { input: String, unit: String },

    #[error("size {0:?} is too large (the limit is 16 EiB)")]
    TooLarge(String),
}

/// Accepted units, matched case-insensitively. Bare `K`, `M`, `G` are deliberately absent:
/// people mean 1000 or 1024 by them about equally often.
const UNITS: [(&str, u64); 9] = [
    ("B", 1),
    ("KB", 1_000),
    ("KiB", 1 << 10),
    ("MB", 1_000_000),
    ("MiB", 1 << 20),
    ("GB", 1_000_000_000),
    ("GiB", 1 << 30),
    ("TB", 1_000_000_000_000),
    ("TiB", 1 << 40),
];

/// Fraction digits beyond this many are worth less than a byte even in TiB.
const MAX_FRACTION_DIGITS: usize = 18;

/// Parses a byte size such as `1024`, `300MiB`, `2 GiB` or `1.5GB`.
///
/// Units are case-insensitive and may be separated from the number by spaces; without a
/// unit the number is in bytes. `KB`, `MB`, ... are powers of 1000 and `KiB`, `MiB`, ...
/// powers of 1024. Decimals are exact, and a fraction of a byte is rounded down.
///
/// # Errors
///
/// A [`ParseSizeError`] saying why, if the input is empty, negative, malformed, has an
/// unknown unit, or exceeds `u64::MAX` bytes.
pub fn parse_size(input: &str) -> Result<u64, ParseSizeError> {
    let text = input.trim();
    if text.is_empty() {
        return Err(ParseSizeError::Empty);
    }
    if text.starts_with('-') {
        return Err(ParseSizeError::Negative(input.to_owned()));
    }
    let invalid = || ParseSizeError::Invalid(input.to_owned());
    let too_large = || ParseSizeError::TooLarge(input.to_owned());

    let number_len = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let well_formed = !whole.is_empty()
        && !fraction.contains('.')
        && (!fraction.is_empty() || !number.contains('.'));
    if !well_formed {
        return Err(invalid());
    }

    let unit = unit.trim_start();
    let multiplier = if unit.is_empty() {
        1
    } else {
        UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit))
            .map(|&(_, multiplier)| u128::from(multiplier))
            .ok_or_else(|| ParseSizeError::UnknownUnit {
                input: input.to_owned(),
                unit: unit.to_owned(),
            })?
    };

    // Whole and fraction are all ASCII digits here, so parsing can only fail by overflow.
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let fraction = &fraction[..fraction.len().min(MAX_FRACTION_DIGITS)];
    let fraction_bytes = match fraction.parse::<u128>() {
        Ok(numerator) => numerator * multiplier / 10u128.pow(fraction.len() as u32),
        Err(_) => 0, // no fraction
    };
    let bytes = whole
        .checked_mul(multiplier)
        .and_then(|bytes| bytes.checked_add(fraction_bytes))
        .ok_or_else(too_large)?;
    u64::try_from(bytes).map_err(|_| too_large())
}

/// Formats a byte count in binary units with one decimal, e.g. `512 B`, `1.5 KiB`, `3.2 GiB`.
///
/// The output is accepted by [`parse_size`].
#[must_use]
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    // From 1023.95 on, a value would print as "1024.0": show it in the next unit instead.
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_bytes_and_every_unit() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size("2KB"), Ok(2_000));
        assert_eq!(parse_size("2KiB"), Ok(2_048));
        assert_eq!(parse_size("300MiB"), Ok(300 << 20));
        assert_eq!(parse_size("300MB"), Ok(300_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1TB"), Ok(1_000_000_000_000));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
    }

    #[test]
    fn is_lenient_about_case_and_spaces() {
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("2 GIB"), Ok(2 << 30));
        assert_eq!(parse_size("  512  mib "), Ok(512 << 20));
    }

    #[test]
    fn decimals_are_exact_and_round_down() {
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("0.1KiB"), Ok(102));
        assert_eq!(parse_size("2.5"), Ok(2));
        assert_eq!(parse_size("1.000000000000000000000001TiB"), Ok(1 << 40));
    }

    #[test]
    fn rejects_bad_input_with_the_reason() {
        assert_eq!(parse_size(""), Err(ParseSizeError::Empty));
        assert_eq!(parse_size("   "), Err(ParseSizeError::Empty));
        assert!(matches!(
            parse_size("-1GB"),
            Err(ParseSizeError::Negative(_))
        ));
        for garbage in ["GB", "abc", "1.", ".5GB", "1.2.3", "+1", "1,5GB"] {
            assert!(
                matches!(
                    parse_size(garbage),
                    Err(ParseSizeError::Invalid(_) | ParseSizeError::UnknownUnit { .. })
                ),
                "{garbage:?} was accepted"
            );
        }
        let unknown = parse_size("8G").unwrap_err();
        assert_eq!(
            unknown,
            ParseSizeError::UnknownUnit {
                input: "8G".into(),
                unit: "G".into()
            }
        );
        assert!(unknown.to_string().contains("GiB"));
    }

    #[test]
    fn rejects_sizes_beyond_64_bits() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(matches!(
            parse_size("18446744073709551616"),
            Err(ParseSizeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_size("16777216TiB"),
            Err(ParseSizeError::TooLarge(_))
        ));
        let digits = "9".repeat(60);
        assert!(matches!(
            parse_size(&digits),
            Err(ParseSizeError::TooLarge(_))
        ));
    }

    #[test]
    fn formats_in_binary_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.0 KiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes((1 << 20) - 1), "1.0 MiB");
        assert_eq!(format_bytes(3_435_973_837), "3.2 GiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn formatted_sizes_parse_back_to_nearly_the_same_value() {
        for bytes in [0, 1000, 1 << 20, 3_435_973_837, 5 << 40] {
            let parsed = parse_size(&format_bytes(bytes)).unwrap();
            assert!(parsed.abs_diff(bytes) <= bytes / 20, "{bytes} -> {parsed}");
        }
    }
}
