//! The value types every section uses: secrets (resolved from `env:`/`file:`, always printed
//! redacted), durations and byte sizes.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret as written (`literal`, `env:NAME` or `file:PATH`) plus its resolved value.
/// It serializes as `"<redacted>"` and debug-prints the same, so it cannot leak through
/// `check-config` or a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
}

pub const REDACTED: &str = "<redacted>";

/// The largest file a `file:` secret is read from.
const MAX_SECRET_FILE: u64 = 64 * 1024;

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self {
            value: value.into(),
        }
    }

    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Resolves a reference as written in the config.
    pub fn resolve(written: &str) -> Result<Self, String> {
        // One line ending is dropped from either source: a Kubernetes Secret made with `echo`
        // ends in one, which no header value or token may carry.
        let line = |s: String| Self::new(s.strip_suffix('\n').unwrap_or(&s).trim_end_matches('\r'));
        if let Some(name) = written.strip_prefix("env:") {
            return std::env::var(name)
                .map(line)
                .map_err(|_| format!("environment variable {name} is not set"));
        }
        if let Some(path) = written.strip_prefix("file:") {
            // Read no further than any secret could go: `file:/dev/zero` must not take the
            // process's memory.
            use std::io::Read;
            let mut bytes = Vec::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_SECRET_FILE + 1).read_to_end(&mut bytes))
                .map_err(|e| format!("cannot read secret file {path}: {e}"))?;
            if bytes.len() as u64 > MAX_SECRET_FILE {
                return Err(format!(
                    "secret file {path} is larger than {} KiB: not a secret",
                    MAX_SECRET_FILE / 1024
                ));
            }
            return String::from_utf8(bytes)
                .map(line)
                .map_err(|_| format!("cannot read secret file {path}: not UTF-8 text"));
        }
        Ok(Self::new(written))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// Deserializing resolves the reference; a failure becomes a serde error at this key, so the
/// message names the key like every other config problem.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let written = String::deserialize(d)?;
        Secret::resolve(&written).map_err(serde::de::Error::custom)
    }
}

/// A duration written as `"500ms"`, `"30s"`, `"5m"`, `"10h"`, `"7d"` (or a combination).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl fmt::Debug for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Dur {
    /// The largest unit that divides the value exactly, so `7d` prints as `7d`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

/// The longest duration any setting takes: every one ends up added to a clock (a lease, a
/// retention's cut-off, a timer), and ten years keeps that inside what Postgres and Tokio hold.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            format!("invalid duration {s:?} ({e}); write e.g. \"500ms\", \"30s\", \"10h\", \"7d\"")
        })?;
        if d > MAX_DURATION {
            return Err(format!("duration {s:?} is longer than 3650d"));
        }
        Ok(Dur(d))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A byte size written as `"1MiB"`, `"512KiB"`, `"1MB"` or a plain number of bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n % size == 0 {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad =
            || format!("invalid size {s:?}; write e.g. \"1MiB\", \"512KiB\" or a number of bytes");
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "kib" | "k" => 1 << 10,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            _ => return Err(bad()),
        };
        n.checked_mul(mult)
            .ok_or_else(bad)
            .and_then(ByteSize::bounded)
    }
}

impl ByteSize {
    /// The largest size any setting takes (1 TiB): sizes are counted in signed 64-bit integers
    /// further on, and no budget of a sidecar comes near it.
    pub const MAX: u64 = 1 << 40;

    fn bounded(n: u64) -> Result<Self, String> {
        if n > Self::MAX {
            return Err(format!("size {n} bytes is more than 1TiB"));
        }
        Ok(ByteSize(n))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        let raw = Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a size: a whole number of bytes, or text like \"1MiB\" or \"512KiB\"",
            )
        })?;
        match raw {
            Raw::Num(n) => ByteSize::bounded(n).map_err(serde::de::Error::custom),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

pub(super) fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `postgres://user:secret@host/db` -> `postgres://user:<redacted>@host/db`; key=value strings
/// get `password=<redacted>`.
pub fn mask_url_password(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        // The driver reads the credentials to the first `@`, wherever it is (a password with `/`
        // or `?` in it is still a password); a raw `@` in a password (the URL then fails) is
        // hidden too: up to the last `@` before the path that follows the first.
        let at = rest.find('@').map(|first| {
            let path = rest[first..]
                .find(['/', '?'])
                .map_or(rest.len(), |p| first + p);
            rest[..path].rfind('@').unwrap_or(first)
        });
        let mut masked = match at {
            Some(at) => match rest[..at].find(':') {
                Some(colon) => format!(
                    "{}{}:{REDACTED}{}",
                    &url[..scheme_end + 3],
                    &rest[..colon],
                    &rest[at..]
                ),
                None => url.to_string(),
            },
            None => url.to_string(),
        };
        // libpq also takes the password as a query parameter.
        if let Some(q) = masked.find('?') {
            let query = masked[q + 1..]
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => {
                        format!("{k}={REDACTED}")
                    }
                    _ => pair.to_string(),
                })
                .collect::<Vec<_>>()
                .join("&");
            masked.truncate(q + 1);
            masked.push_str(&query);
        }
        return masked;
    }
    mask_key_value_password(url)
}

/// `host=h password = 'a b\' c' user=u` -> `host=h password = <redacted> user=u`: libpq's
/// key-value form, spaces around `=` and quoted values (with `\'` and `\\` escapes) included.
fn mask_key_value_password(conninfo: &str) -> String {
    let b = conninfo.as_bytes();
    let mut out = String::with_capacity(conninfo.len());
    let mut i = 0;
    while i < b.len() {
        // A keyword starts at the beginning or after whitespace.
        let at_word = i == 0 || b[i - 1].is_ascii_whitespace();
        let rest = &conninfo[i..];
        if at_word && rest.len() >= 8 && rest.as_bytes()[..8].eq_ignore_ascii_case(b"password") {
            let mut j = i + 8;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            if j < b.len() && b[j] == b'=' {
                j += 1;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                out.push_str(&conninfo[i..j]);
                // Skip the value: quoted (escapes honoured) or up to whitespace.
                if j < b.len() && b[j] == b'\'' {
                    j += 1;
                    while j < b.len() && b[j] != b'\'' {
                        j += if b[j] == b'\\' { 2 } else { 1 };
                    }
                    j = (j + 1).min(b.len());
                } else {
                    while j < b.len() && !b[j].is_ascii_whitespace() {
                        j += 1;
                    }
                }
                out.push_str(REDACTED);
                i = j;
                continue;
            }
        }
        let ch = rest.chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}
