//! What one outgoing Security Event Token costs the transmitter (issue 11
//! §4): the committed event mapped to its signals, the SET claims built
//! (deterministic `jti`, `txn`), serialised and signed — the work the
//! outbox worker does per (stream, signal) before the SQLite insert.
//!
//! - `transmit/set_rs256`: one session-revoked SET, RS256 (RSA 2048), the
//!   CAEP interoperability profile's algorithm.
//! - `transmit/set_es256`: the same with an ES256 (P-256) key.
//! - `transmit/leaver_event_rs256`: a SCIM leaver (account-disabled plus
//!   session-revoked): mapping and both SETs.
//!
//! Run: `cargo bench --bench transmit` (`-- --quick` for a short run).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis::demo::pki::SigningKey;
use portcullis::posture::event::{Change, IdentityPatch, PostureEvent};
use portcullis::posture::model::{Feed, IdentityStatus, RevocationTarget};
use portcullis::transmit::keys::SetSigner;
use portcullis::transmit::signals::{Naming, signals};
use portcullis::transmit::{SetInput, jti_for, set_claims};

const ISS: &str = "https://portcullis.bench/ssf";
const AUD: &str = "https://siem.bench/ssf";

fn signer(key: SigningKey) -> SetSigner {
    SetSigner::new(None, &[(key.kid.clone(), key.private_pem.into_bytes())]).unwrap()
}

fn emit(signer: &SetSigner, naming: &Naming, ev: &PostureEvent, iat: u64) -> usize {
    let mut n = 0;
    for sig in signals(ev, naming) {
        let jti = jti_for("stream:bench", &ev.id, &sig.event_type, &sig.key);
        let claims = set_claims(&SetInput {
            iss: ISS,
            aud: AUD,
            jti: &jti,
            iat,
            txn: Some(&ev.id),
            sub_id: &sig.sub_id,
            event_type: &sig.event_type,
            event: &sig.event,
        });
        n += black_box(signer.sign(&claims).unwrap()).len();
    }
    n
}

fn bench(c: &mut Criterion) {
    let rsa = signer(SigningKey::rs256("tx-rsa").unwrap());
    let ec = signer(SigningKey::es256("tx-ec").unwrap());
    let naming = Naming {
        subject_issuer: Some("https://idp.bench".into()),
    };
    let now = portcullis::util::now_unix();
    let revoke = PostureEvent {
        id: "admin:req-000042".into(),
        feed: Feed::Admin,
        kind: "admin.revoke".into(),
        origin_ms: now * 1000,
        changes: vec![Change::Revoke {
            target: RevocationTarget::Subject,
            key: "alice@corp.example".into(),
        }],
    };
    let leaver = PostureEvent {
        id: "scim:leaver-7".into(),
        feed: Feed::Scim,
        kind: "scim.leaver".into(),
        origin_ms: now * 1000,
        changes: vec![
            Change::Identity {
                subject: "bob@corp.example".into(),
                patch: IdentityPatch {
                    status: Some(IdentityStatus::Terminated),
                    ..Default::default()
                },
            },
            Change::Revoke {
                target: RevocationTarget::Subject,
                key: "bob@corp.example".into(),
            },
        ],
    };
    let mut g = c.benchmark_group("transmit");
    g.throughput(Throughput::Elements(1));
    g.bench_function("set_rs256", |b| {
        b.iter(|| emit(&rsa, &naming, black_box(&revoke), now))
    });
    g.bench_function("set_es256", |b| {
        b.iter(|| emit(&ec, &naming, black_box(&revoke), now))
    });
    g.throughput(Throughput::Elements(2));
    g.bench_function("leaver_event_rs256", |b| {
        b.iter(|| emit(&rsa, &naming, black_box(&leaver), now))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
