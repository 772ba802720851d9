//! Exact money: costs travel as decimal text and live as integer nano-units.
//!
//! Floating point never touches a cost. A JSON number keeps its source text
//! (serde_json's `arbitrary_precision`), and a MessagePack float is turned into
//! its shortest round-trip decimal before parsing, so `0.1` stays `0.1`.

/// Nano-units per unit of currency: costs have at most 9 fractional digits.
pub const NANOS_PER_UNIT: i64 = 1_000_000_000;

/// Parses a non-negative decimal (`"0.0023"`, `"12"`, `"1.5e-3"`) into nano-units.
///
/// The error text is meant to be shown to the sender as it is.
pub fn parse_nanos(text: &str) -> Result<i64, String> {
    let s = text.trim();
    let (negative, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa_part, exponent) = match body.find(['e', 'E']) {
        Some(pos) => {
            let exp: i32 = body[pos + 1..]
                .parse()
                .map_err(|_| format!("`{text}` is not a decimal number"))?;
            (&body[..pos], exp)
        }
        None => (body, 0),
    };
    let (int_digits, frac_digits) = match mantissa_part.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa_part, ""),
    };
    let all_digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if (int_digits.is_empty() && frac_digits.is_empty())
        || !all_digits(int_digits)
        || !all_digits(frac_digits)
    {
        return Err(format!("`{text}` is not a decimal number"));
    }
    // value = digits × 10^scale, with trailing zeros dropped so that "0.1000000000"
    // (exactly representable) is accepted while "0.0000000001" is not.
    let mut digits: String = format!("{int_digits}{frac_digits}")
        .trim_start_matches('0')
        .to_string();
    let mut scale: i64 = i64::from(exponent) - frac_digits.len() as i64;
    while digits.ends_with('0') {
        digits.pop();
        scale += 1;
    }
    if digits.is_empty() {
        return Ok(0);
    }
    if negative {
        return Err(format!("`{text}` is negative; cost must be ≥ 0"));
    }
    if scale < -9 {
        return Err(format!(
            "`{text}` has {} fractional digits; at most 9 are allowed (costs are stored in nano-units)",
            -scale
        ));
    }
    let too_large = || {
        format!(
            "`{text}` is too large; the maximum cost of one event is {}",
            format_nanos(i64::MAX)
        )
    };
    let shift = scale + 9;
    if digits.len() as i64 + shift > 19 {
        return Err(too_large());
    }
    let mantissa: u128 = digits.parse().map_err(|_| too_large())?;
    let nanos = mantissa
        .checked_mul(10u128.pow(shift as u32))
        .ok_or_else(too_large)?;
    i64::try_from(nanos).map_err(|_| too_large())
}

/// Formats nano-units as a decimal string with exactly 9 fractional digits.
pub fn format_nanos(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let abs = nanos.unsigned_abs();
    let unit = NANOS_PER_UNIT as u64;
    format!("{sign}{}.{:09}", abs / unit, abs % unit)
}

/// Formats nano-units as the shortest exact decimal (`"0.0023"`), for the wire format.
pub fn format_nanos_short(nanos: i64) -> String {
    let full = format_nanos(nanos);
    let trimmed = full.trim_end_matches('0');
    trimmed.strip_suffix('.').unwrap_or(trimmed).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(parse_nanos("0"), Ok(0));
        assert_eq!(parse_nanos("0.0023"), Ok(2_300_000));
        assert_eq!(parse_nanos("12"), Ok(12_000_000_000));
        assert_eq!(parse_nanos("0.000000001"), Ok(1));
        assert_eq!(parse_nanos("1.5e-3"), Ok(1_500_000));
        assert_eq!(parse_nanos("2E2"), Ok(200_000_000_000));
        assert_eq!(parse_nanos("0.1000000000"), Ok(100_000_000));
        assert_eq!(parse_nanos(".5"), Ok(500_000_000));
        assert_eq!(parse_nanos("-0"), Ok(0));
        assert_eq!(parse_nanos("9223372036.854775807"), Ok(i64::MAX));
    }

    #[test]
    fn rejects_what_cannot_be_exact() {
        assert!(parse_nanos("0.0000000001")
            .expect_err("must fail")
            .contains("10 fractional digits"));
        assert!(parse_nanos("-0.5")
            .expect_err("must fail")
            .contains("negative"));
        assert!(parse_nanos("9223372036.854775808")
            .expect_err("must fail")
            .contains("too large"));
        assert!(parse_nanos("1e400")
            .expect_err("must fail")
            .contains("too large"));
        for bad in ["", ".", "abc", "1.2.3", "1e", "0x10", "1,5", "NaN"] {
            assert!(parse_nanos(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn formats_round_trip() {
        assert_eq!(format_nanos(0), "0.000000000");
        assert_eq!(format_nanos(2_300_000), "0.002300000");
        assert_eq!(format_nanos_short(2_300_000), "0.0023");
        assert_eq!(format_nanos_short(12_000_000_000), "12");
        for n in [0, 1, 999_999_999, 1_000_000_000, 123_456_789_012, i64::MAX] {
            assert_eq!(parse_nanos(&format_nanos(n)), Ok(n));
            assert_eq!(parse_nanos(&format_nanos_short(n)), Ok(n));
        }
    }
}
