//! Sizes as people write them: `256Mi`, `1Gi`, `512M`, `100k`, `1048576`.

const UNITS: [(&str, u64); 8] = [
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("k", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
];

/// Bytes in `text`: a whole number with an optional unit (`Ki`, `Mi`, `Gi`,
/// `Ti`, or decimal `k`, `M`, `G`, `T`). `None` when it is not one, or is 0.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let factor = match unit {
        "" => 1,
        u => UNITS.iter().find(|(name, _)| *name == u)?.1,
    };
    n.checked_mul(factor).filter(|&b| b > 0)
}

/// `23.5Gi`: an approximate size for people (capacities, free memory),
/// to one decimal in the largest binary unit that fits; exact sizes stay
/// in [`format_size`].
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// `bytes` in the largest binary unit that divides it (`268435456` → `256Mi`).
pub fn format_size(bytes: u64) -> String {
    for (name, factor) in UNITS[..4].iter().rev() {
        if bytes >= *factor && bytes.is_multiple_of(*factor) {
            return format!("{}{name}", bytes / factor);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_format_back() {
        assert_eq!(parse_size("256Mi"), Some(256 << 20));
        assert_eq!(parse_size("1Gi"), Some(1 << 30));
        assert_eq!(parse_size("512M"), Some(512_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        for bad in [
            "lots",
            "",
            "0",
            "1.5Gi",
            "-1Mi",
            "12 Mi",
            "3Xi",
            "99999999999999999999Ti",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert_eq!(format_size(256 << 20), "256Mi");
        assert_eq!(human_size(512), "512");
        assert_eq!(human_size(64 << 20), "64Mi");
        assert_eq!(human_size(25_274_793_984), "23.5Gi");
        assert_eq!(format_size(1 << 30), "1Gi");
        assert_eq!(format_size(1000), "1000");
    }
}
