//! Human sizes for `--memory` and `--size`: `512M`, `4G`, `1.5GiB`, or bytes.

/// Why a size was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size {0:?} is not a number with an optional unit (B, K, M, G, T; e.g. 512M, 4G)")]
    Malformed(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a size in bytes. Units are binary (K = 1024), as docker and ignite read them.
/// How full a thin pool is (as its storage reads it, as the host check reports it).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolUsage {
    pub data_percent: f64,
    pub metadata_percent: f64,
    pub data_bytes: u64,
    /// `rw`, `ro` or `out_of_data_space`.
    pub mode: String,
    pub needs_check: bool,
}

pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(SizeError::Malformed(s.to_owned())),
    };
    if num.is_empty() || num.matches('.').count() > 1 {
        return Err(SizeError::Malformed(s.to_owned()));
    }
    let value: f64 = num.parse().map_err(|_| SizeError::Malformed(s.to_owned()))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 / 2.0 {
        return Err(SizeError::Overflow(s.to_owned()));
    }
    Ok(bytes as u64)
}

/// A size as people read it: `512 B`, `1.5 GiB`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `n` bytes as a `--size` value that holds them, in whole MiB (`46M`).
pub fn size_flag(n: u64) -> String {
    format!("{}M", n.div_ceil(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_for_people_and_flags() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(size_flag((45 << 20) + 1), "46M");
        assert_eq!(parse_size(&size_flag(12345)).expect("parses back"), 1 << 20);
    }

    #[test]
    fn units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn junk() {
        for bad in ["", "M", "12X", "1..2G", "-1G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
