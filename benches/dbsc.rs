//! A DBSC refresh as the refresh endpoint runs it: verify the proof JWT
//! (parse, `typ`/`alg`, the registered key, the signature, the challenge:
//! this session's, fresh, used once) and mint the rotated bound cookie and
//! the next challenge. Proofs are signed in the untimed setup, one fresh
//! challenge each (a challenge is accepted once).
//!
//! Run: `cargo bench --bench dbsc`. Target: ≤ 100 µs CPU per refresh.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use portcullis::demo::pki::SigningKey;
use portcullis::session::dbsc::{Dbsc, Step};
use serde_json::json;

const SESSION: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn bench(c: &mut Criterion) {
    let d = Dbsc::new(b"a bench secret of enough length!", 300, 600);
    let now = portcullis::util::now_unix();
    for key in [
        SigningKey::es256("k").unwrap(),
        SigningKey::rs256("k").unwrap(),
    ] {
        let reg = d.challenge(Step::Register, SESSION, now);
        let p = key
            .sign_jws(
                &json!({"typ": "dbsc+jwt", "alg": key.alg, "jwk": key.public_jwk()}),
                &json!({"jti": reg}),
            )
            .unwrap();
        let binding = d.verify_registration(&p, SESSION, now).unwrap();
        let header = json!({"typ": "dbsc+jwt", "alg": key.alg});
        c.bench_function(&format!("dbsc/refresh/{}", key.alg), |b| {
            b.iter_batched(
                || {
                    let ch = d.challenge(Step::Refresh, SESSION, now);
                    key.sign_jws(&header, &json!({"jti": ch})).unwrap()
                },
                |proof| {
                    d.verify_refresh(black_box(&proof), &binding, SESSION, now)
                        .unwrap();
                    black_box((
                        d.set_bound_cookie(SESSION, now * 1000),
                        d.challenge_header(&binding.session_identifier, SESSION, now),
                    ))
                },
                BatchSize::SmallInput,
            )
        });
    }
    // The per-request half: the bound-cookie check alone.
    let cookie = d.bound_cookie(SESSION, now * 1000);
    c.bench_function("dbsc/check_bound_cookie", |b| {
        b.iter(|| {
            d.check_bound_cookie(Some(black_box(&cookie)), SESSION, 1, now * 1000)
                .unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
