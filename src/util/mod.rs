//! Small shared helpers: hashing, clocks, request ids.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// SHA-256 of `data`, through aws-lc-rs.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
    s
}

/// Issues request ids: a random per-process prefix and a counter, so ids are
/// unique across restarts without a syscall per request.
#[derive(Debug)]
pub struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut seed = [0u8; 6];
        // A failed RNG only makes ids less unique across restarts; it is not a
        // security property, so fall back to the clock.
        if aws_lc_rs::rand::fill(&mut seed).is_err() {
            seed.copy_from_slice(&now_unix().to_be_bytes()[2..]);
        }
        Self {
            prefix: hex(&seed),
            next: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    /// The next id, such as `3f9a0c11e2b4-000000000000002a`.
    pub fn next_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // One exact-size allocation, no formatting machinery: every request
        // takes one.
        let mut s = String::with_capacity(self.prefix.len() + 17);
        s.push_str(&self.prefix);
        s.push('-');
        for shift in (0..16).rev() {
            s.push(HEX[((n >> (shift * 4)) & 0xf) as usize] as char);
        }
        s
    }
}

/// Formats ms since epoch as RFC 3339 UTC: `YYYY-MM-DDTHH:MM:SSZ`, or with
/// `.mmm` when `millis` (that form sorts as text).
pub fn rfc3339(ms: u64, millis: bool) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, se) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if millis {
        format!(
            "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{se:02}.{:03}Z",
            ms % 1000
        )
    } else {
        format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{se:02}Z")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::RequestIds;

    #[test]
    fn request_ids_are_prefix_dash_sixteen_hex_digits_in_order() {
        let ids = RequestIds::default();
        let a = ids.next_id();
        let b = ids.next_id();
        let (prefix, n) = a.split_once('-').unwrap();
        assert_eq!(prefix.len(), 12);
        assert_eq!(n, "0000000000000001");
        assert_eq!(b, format!("{prefix}-0000000000000002"));
        ids.next
            .store(0xfedc_ba98_7654_3210, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(ids.next_id(), format!("{prefix}-fedcba9876543210"));
    }
}
