//! Small shared helpers: hashing, clocks, request ids.

pub mod front;
pub mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A random key for a keyed 128-bit hash (SipHash-1-3): the cache keys a
/// caller cannot predict, so cannot collide on purpose.
#[derive(Debug, Clone, Copy)]
pub struct HashKey(u64, u64);

impl HashKey {
    /// A fresh key from the OS-seeded std hasher keys.
    pub fn random() -> Self {
        use std::hash::BuildHasher;
        let s = std::collections::hash_map::RandomState::new();
        Self(s.hash_one(1u8), s.hash_one(2u8))
    }

    /// The 128-bit hash of `value` under this key, in one pass.
    pub fn hash128<T: std::hash::Hash + ?Sized>(&self, value: &T) -> u128 {
        let mut h = Gathered {
            buf: [0; GATHER_BYTES],
            len: 0,
            sip: siphasher::sip128::SipHasher13::new_with_keys(self.0, self.1),
        };
        value.hash(&mut h);
        h.flush();
        siphasher::sip128::Hasher128::finish128(&h.sip).as_u128()
    }
}

/// Bytes gathered before SipHash sees them.
const GATHER_BYTES: usize = 256;

/// Gathers the many small writes a derived `Hash` makes (a tag, a length,
/// a few bytes each) into one buffer, so SipHash takes them in a few large
/// writes: a small write costs it about as much as a block. The byte
/// stream, and so the hash, is the one the writes describe.
struct Gathered {
    buf: [u8; GATHER_BYTES],
    len: usize,
    sip: siphasher::sip128::SipHasher13,
}

impl Gathered {
    fn flush(&mut self) {
        std::hash::Hasher::write(&mut self.sip, self.buf.get(..self.len).unwrap_or_default());
        self.len = 0;
    }
}

impl std::hash::Hasher for Gathered {
    fn write(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > GATHER_BYTES {
            self.flush();
        }
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(room) => {
                room.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            // Longer than the buffer: straight through (after what was gathered).
            None => std::hash::Hasher::write(&mut self.sip, bytes),
        }
    }

    fn finish(&self) -> u64 {
        // Only `hash128`'s `finish128` is used.
        0
    }
}

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

/// Compares secrets in constant time: both sides are hashed first, so
/// neither a differing byte nor a differing length shows in the timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (sha256(a), sha256(b));
    aws_lc_rs::constant_time::verify_slices_are_equal(&ha, &hb).is_ok()
}

/// Issues request ids: a random per-process prefix and a counter, so ids are
/// unique across restarts without a syscall per request.
///
/// Each thread takes the counter's values in blocks of [`ID_BLOCK`] and
/// numbers its requests from its block: the shared counter is written once
/// per block, not on every request by every worker (a write passes its
/// cache line from core to core). Ids stay unique; across threads they are
/// no longer in arrival order (nothing orders by them).
#[derive(Debug)]
pub struct RequestIds {
    prefix: String,
    next: AtomicU64,
    /// This issuer among all (a thread's block belongs to one issuer).
    id: u64,
}

/// Counter values a thread takes at once.
const ID_BLOCK: u64 = 1024;

thread_local! {
    /// This thread's block: (issuer, next value, end of the block).
    static ID_RANGE: std::cell::Cell<(u64, u64, u64)> = const { std::cell::Cell::new((0, 0, 0)) };
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut seed = [0u8; 6];
        // A failed RNG only makes ids less unique across restarts; it is not a
        // security property, so fall back to the clock.
        if aws_lc_rs::rand::fill(&mut seed).is_err() {
            seed.copy_from_slice(&now_unix().to_be_bytes()[2..]);
        }
        static ISSUERS: AtomicU64 = AtomicU64::new(1);
        Self {
            prefix: hex::encode(seed),
            next: AtomicU64::new(1),
            id: ISSUERS.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl RequestIds {
    /// The next id, such as `3f9a0c11e2b4-000000000000002a`.
    pub fn next_id(&self) -> String {
        // Hex digits, the prefix's too, and `-`: always valid UTF-8.
        String::from_utf8(self.next_bytes()).unwrap_or_default()
    }

    /// The next id as a request's [`RequestId`]: every request takes one, so
    /// its bytes are written once into one exact-size buffer that the header
    /// value then owns (no formatting machinery, no second copy).
    pub fn next_request_id(&self) -> RequestId {
        // The id is hex and `-`: always a valid header value.
        RequestId(
            http::HeaderValue::from_maybe_shared(bytes::Bytes::from(self.next_bytes()))
                .unwrap_or_else(|_| http::HeaderValue::from_static("")),
        )
    }

    /// The next counter value for this thread: from its block, or the
    /// first of a new block.
    fn next_number(&self) -> u64 {
        ID_RANGE.with(|r| {
            let (issuer, next, end) = r.get();
            if issuer == self.id && next < end {
                r.set((issuer, next + 1, end));
                return next;
            }
            let start = self.next.fetch_add(ID_BLOCK, Ordering::Relaxed);
            r.set((self.id, start.wrapping_add(1), start.wrapping_add(ID_BLOCK)));
            start
        })
    }

    /// The next id's bytes: prefix, `-`, the counter as 16 hex digits.
    fn next_bytes(&self) -> Vec<u8> {
        let n = self.next_number();
        let mut digits = [0u8; 16];
        // 8 bytes make exactly 16 digits: this cannot fail.
        let _ = hex::encode_to_slice(n.to_be_bytes(), &mut digits);
        let mut b = Vec::with_capacity(self.prefix.len() + 17);
        b.extend_from_slice(self.prefix.as_bytes());
        b.push(b'-');
        b.extend_from_slice(&digits);
        b
    }
}

/// A request's id. Its text is also the `X-Request-Id` header value sent
/// upstream and to the client, and what a live connection keeps: one
/// buffer shared by all of them, not a copy each.
#[derive(Debug, Clone)]
pub struct RequestId(http::HeaderValue);

impl RequestId {
    /// The id as a header value (a shared reference, no copy).
    pub fn header(&self) -> http::HeaderValue {
        self.0.clone()
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;

    fn deref(&self) -> &str {
        self.0.to_str().unwrap_or("")
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

/// Formats ms since epoch as RFC 3339 UTC: `YYYY-MM-DDTHH:MM:SSZ`, or with
/// `.mmm` when `millis` (that form sorts as text). Times past the year 9999
/// are shown as its last second.
pub fn rfc3339(ms: u64, millis: bool) -> String {
    use time::macros::format_description;
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::PrimitiveDateTime::MAX.assume_utc());
    let f = if millis {
        t.format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        ))
    } else {
        t.format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
        ))
    };
    f.unwrap_or_default()
}

/// Parses an RFC 3339 timestamp (`2026-01-01T08:41:12Z`, offsets and
/// fractions allowed) to ms since epoch; `None` for anything else or a time
/// before 1970.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Decodes `%XX` escapes; `None` when an escape is malformed or the result is
/// not UTF-8 (strict: a lone `%` is an error, not a literal).
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let well_formed = b.iter().enumerate().all(|(i, c)| {
        *c != b'%'
            || b.get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// Splits a PKCS#1 RSAPublicKey DER (SEQUENCE { n INTEGER, e INTEGER }) into
/// big-endian `n` and `e` without leading zero bytes (for an RSA JWK: the
/// demo issuer's keys and the SET signer's).
pub fn rsa_components(der: &[u8]) -> Option<(&[u8], &[u8])> {
    fn read_len(b: &[u8]) -> Option<(usize, &[u8])> {
        let (&first, rest) = b.split_first()?;
        if first < 0x80 {
            return Some((first as usize, rest));
        }
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        Some((len, &rest[n..]))
    }
    fn read_tlv(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&t, rest) = b.split_first()?;
        if t != tag {
            return None;
        }
        let (len, rest) = read_len(rest)?;
        if rest.len() < len {
            return None;
        }
        Some(rest.split_at(len))
    }
    let (seq, _) = read_tlv(der, 0x30)?;
    let (n, rest) = read_tlv(seq, 0x02)?;
    let (e, _) = read_tlv(rest, 0x02)?;
    let strip = |x: &'_ [u8]| -> usize { x.iter().take_while(|b| **b == 0).count() };
    Some((&n[strip(n)..], &e[strip(e)..]))
}

/// Reads the signing-key files a config section names
/// (`{section}.keys[i].private_key_file`) as `(kid, PEM)`: the identity
/// assertion's keys and the SET signer's.
pub fn read_key_files<'a>(
    cfg: &crate::config::Config,
    section: &str,
    keys: impl IntoIterator<Item = (&'a str, &'a std::path::Path)>,
) -> Result<Vec<(String, Vec<u8>)>, crate::config::ConfigError> {
    keys.into_iter()
        .enumerate()
        .map(|(i, (kid, path))| {
            std::fs::read(path)
                .map(|pem| (kid.to_owned(), pem))
                .map_err(|e| crate::config::ConfigError::Invalid {
                    file: cfg.source.clone(),
                    key: format!("{section}.keys[{i}].private_key_file"),
                    message: format!("`{}`: {e}", path.display()),
                })
        })
        .collect()
}

/// The PKCS#8 DER of a `BEGIN PRIVATE KEY` PEM; the error says what it was instead.
pub fn pkcs8_der(pem: &[u8]) -> Result<rustls_pki_types::PrivatePkcs8KeyDer<'static>, String> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(PrivateKeyDer::Pkcs8(der)) => Ok(der),
        Ok(_) => Err("not a PKCS#8 key (`BEGIN PRIVATE KEY`)".into()),
        Err(e) => Err(format!("not a PEM private key: {e}")),
    }
}

/// The public JWK (ES256, `use: sig`) of a P-256 signing key.
pub fn p256_jwk(
    kid: &str,
    pair: &aws_lc_rs::signature::EcdsaKeyPair,
) -> Result<serde_json::Value, String> {
    use aws_lc_rs::signature::KeyPair;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let point = pair.public_key().as_ref();
    // INVARIANT: an uncompressed P-256 point is 0x04 || x(32) || y(32).
    if point.len() != 65 || point[0] != 4 {
        return Err("unexpected P-256 public key encoding".into());
    }
    Ok(serde_json::json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
    }))
}

/// Random byte edits for property tests that check a parser refuses what
/// it should: a strategy for a list of edits and their application.
#[cfg(test)]
pub mod edits {
    use proptest::prelude::*;
    use proptest::sample::{Index, select};

    /// Which edit (replace, remove, insert, cut the rest), where, and the
    /// byte it writes.
    pub type Edit = (u8, Index, u8);

    /// `count` edits writing bytes from `alphabet`.
    pub fn edits(
        alphabet: &[u8],
        count: impl Into<proptest::collection::SizeRange>,
    ) -> impl Strategy<Value = Vec<Edit>> {
        proptest::collection::vec((0u8..4, any::<Index>(), select(alphabet.to_vec())), count)
    }

    /// Applies `edits` in order; stops once nothing is left.
    pub fn apply(bytes: &mut Vec<u8>, edits: &[Edit]) {
        for (kind, at, byte) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] = *byte,
                1 => {
                    bytes.remove(i);
                }
                2 => bytes.insert(i, *byte),
                _ => bytes.truncate(i),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash128_is_siphash_of_the_written_stream() {
        // Gathering changes how the bytes reach SipHash, not which bytes:
        // the result is SipHash-1-3 of the same stream, short or long.
        let key = HashKey::random();
        let direct = |v: &dyn Fn(&mut dyn std::hash::Hasher)| {
            let mut h = siphasher::sip128::SipHasher13::new_with_keys(key.0, key.1);
            v(&mut h);
            siphasher::sip128::Hasher128::finish128(&h).as_u128()
        };
        let long = "d".repeat(700);
        for (a, b, n) in [
            ("ab", "c", 7u64),
            ("a", "bc", 7),
            ("dev", long.as_str(), u64::MAX),
        ] {
            let v = (a, Some(b), n, [1u8, 2, 3]);
            let want = direct(&|h| {
                use std::hash::Hash;
                let mut w = HasherRef(h);
                v.hash(&mut w);
            });
            assert_eq!(key.hash128(&v), want);
            assert_eq!(key.hash128(&v), key.hash128(&v));
        }
        // A string's end is part of the stream: a moved boundary is another key.
        assert_ne!(key.hash128(&("ab", "c")), key.hash128(&("a", "bc")));
    }

    /// A `&mut dyn Hasher` as a `Hasher` (the default method bodies, as `Gathered` uses).
    struct HasherRef<'a>(&'a mut dyn std::hash::Hasher);

    impl std::hash::Hasher for HasherRef<'_> {
        fn write(&mut self, bytes: &[u8]) {
            self.0.write(bytes);
        }
        fn finish(&self) -> u64 {
            self.0.finish()
        }
    }

    #[test]
    fn rfc3339_formats_and_parses() {
        assert_eq!(rfc3339(0, true), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_767_225_600_123, true), "2026-01-01T00:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000, true), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_767_256_872_999, false), "2026-01-01T08:41:12Z");
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-01-01T08:41:12Z"),
            Some(1_767_256_872_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-01-01T09:41:12.5+01:00"),
            Some(1_767_256_872_500)
        );
        assert_eq!(parse_rfc3339_ms("2026-13-01T08:41:12Z"), None);
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
        assert_eq!(parse_rfc3339_ms("2026-01-01T08:41:12"), None);
        for ms in [0, 1, 999, 1_767_256_872_123, 4_102_444_800_000] {
            assert_eq!(parse_rfc3339_ms(&rfc3339(ms, true)), Some(ms), "{ms}");
        }
    }

    #[test]
    fn percent_decoding_is_strict() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(percent_decode("100%"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
    }

    #[test]
    fn request_ids_are_unique_across_threads_and_issuers() {
        let ids = std::sync::Arc::new(RequestIds::default());
        let other = RequestIds::default();
        // Two issuers used in turn on one thread: each numbers its own, and
        // a thread's block belongs to one issuer, so each turn starts a new
        // block of that issuer (ids skipped, never repeated).
        let (a1, o1, a2, o2) = (
            ids.next_id(),
            other.next_id(),
            ids.next_id(),
            other.next_id(),
        );
        let second = format!("-{:016x}", ID_BLOCK + 1);
        assert!(a1.ends_with("-0000000000000001") && a2.ends_with(&second));
        assert!(o1.ends_with("-0000000000000001") && o2.ends_with(&second));
        // Four threads, each past several blocks: no id twice.
        let all: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..3 * ID_BLOCK).map(|_| ids.next_id()).collect::<Vec<_>>()))
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let n = all.len();
        assert_eq!(n, 4 * 3 * ID_BLOCK as usize);
        let distinct: std::collections::HashSet<String> = all.into_iter().chain([a1, a2]).collect();
        assert_eq!(distinct.len(), n + 2);
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn request_ids_are_prefix_dash_sixteen_hex_digits_in_order() {
        let ids = RequestIds::default();
        let a = ids.next_id();
        let b = ids.next_id();
        let (prefix, n) = a.split_once('-').unwrap();
        assert_eq!(prefix.len(), 12);
        assert_eq!(n, "0000000000000001");
        assert_eq!(b, format!("{prefix}-0000000000000002"));
        // The rest of this thread's block, then a new block where the
        // counter stands.
        for n in 3..=ID_BLOCK {
            assert_eq!(ids.next_id(), format!("{prefix}-{n:016x}"));
        }
        ids.next
            .store(0xfedc_ba98_7654_3210, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(ids.next_id(), format!("{prefix}-fedcba9876543210"));
        let id = ids.next_request_id();
        assert_eq!(&*id, format!("{prefix}-fedcba9876543211"));
        assert_eq!(id.to_string(), &*id);
        assert_eq!(id.header(), &*id);
    }
}
