//! Byte quantities written the Kubernetes way: `10Gi`, `512Mi`, `1G`, `4096`.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes, written as a string with an optional unit suffix.
///
/// Binary suffixes `Ki Mi Gi Ti Pi Ei` (powers of 1024) and decimal suffixes
/// `k K M G T P E` (powers of 1000) are accepted, as are plain integers. It is
/// printed with the largest binary unit that divides it exactly.
///
/// ```
/// use hci_core::model::ByteSize;
/// let s: ByteSize = "10Gi".parse().unwrap();
/// assert_eq!(s.bytes(), 10 << 30);
/// assert_eq!(s.to_string(), "10Gi");
/// assert_eq!(ByteSize(1536).to_string(), "1536");
/// assert_eq!(ByteSize(3 << 20).to_string(), "3Mi");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` KiB.
    pub const fn kib(n: u64) -> Self {
        ByteSize(n << 10)
    }
    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        ByteSize(n << 20)
    }
    /// `n` GiB.
    pub const fn gib(n: u64) -> Self {
        ByteSize(n << 30)
    }
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

const UNITS: &[(&str, u64)] = &[
    ("Ei", 1 << 60),
    ("Pi", 1 << 50),
    ("Ti", 1 << 40),
    ("Gi", 1 << 30),
    ("Mi", 1 << 20),
    ("Ki", 1 << 10),
    ("E", 1_000_000_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("T", 1_000_000_000_000),
    ("G", 1_000_000_000),
    ("M", 1_000_000),
    ("K", 1_000),
    ("k", 1_000),
];

/// Why a quantity failed to parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason}")]
pub struct ParseByteSizeError {
    input: String,
    reason: &'static str,
}

impl FromStr for ByteSize {
    type Err = ParseByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseByteSizeError {
            input: s.to_string(),
            reason,
        };
        let t = s.trim();
        let t = t
            .strip_suffix('B')
            .filter(|r| r.ends_with('i'))
            .unwrap_or(t);
        let (digits, mult) = UNITS
            .iter()
            .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|d| (d, *m)))
            .unwrap_or((t, 1));
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(
                "expected a whole number with an optional unit such as Ki, Mi, Gi, Ti",
            ));
        }
        let n: u64 = digits.parse().map_err(|_| err("number too large"))?;
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| err("too large for 64 bits"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 != 0 {
            for (suffix, m) in UNITS.iter().take(6) {
                if self.0.is_multiple_of(*m) {
                    return write!(f, "{}{suffix}", self.0 / m);
                }
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"10Gi\", \"512Mi\" or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (s, n) in [
            ("0", 0),
            ("4096", 4096),
            ("1Ki", 1024),
            ("10Gi", 10 << 30),
            ("10GiB", 10 << 30),
            ("1G", 1_000_000_000),
            ("2k", 2000),
            ("1Ei", 1 << 60),
        ] {
            assert_eq!(s.parse::<ByteSize>().expect(s).0, n, "{s}");
        }
        for bad in [
            "",
            "Gi",
            "1.5Gi",
            "-1",
            "10 Gi",
            "10Xi",
            "16Ei",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
        assert_eq!(ByteSize::gib(1).to_string(), "1Gi");
        assert_eq!(ByteSize(1_000_000_000).to_string(), "1000000000");
        assert_eq!(ByteSize(0).to_string(), "0");
    }

    #[test]
    fn serde_accepts_numbers_and_strings() {
        let a: ByteSize = serde_json::from_str("\"2Mi\"").expect("string");
        let b: ByteSize = serde_json::from_str("2097152").expect("number");
        assert_eq!(a, b);
        assert_eq!(serde_json::to_string(&a).expect("ser"), "\"2Mi\"");
        assert!(serde_json::from_str::<ByteSize>("-5").is_err());
    }
}
