//! What the proxy tells other systems: each committed posture event maps to
//! zero or more outgoing signals (CAEP / RISC event type, subject, event
//! object). Pure: no clock, no I/O, so the same event log always yields the
//! same signals (and, with the stream id, the same `jti`).
//!
//! | learned from | signal |
//! |---|---|
//! | identity set `suspended` / `terminated` (SCIM leaver, RISC account-disabled, …) | RISC `account-disabled` |
//! | identity `terminated` by a delete (SCIM DELETE, RISC account-purged) | RISC `account-purged` |
//! | any revocation (admin revoke, policy `revoke`, CAEP session-revoked, leaver, lost device) | CAEP `session-revoked` |
//! | device compliance, lost / wiped / wipe pending / deleted, compromised | CAEP `device-compliance-change` |
//! | identity assurance level set | CAEP `assurance-level-change` |
//! | CAEP credential-change in, device certificates replaced | CAEP `credential-change` |

use serde_json::{Value, json};

use crate::feeds::ssf::{CAEP, RISC, SSF};
use crate::posture::event::{Change, PostureEvent};
use crate::posture::model::{Compliance, IdentityStatus, Lifecycle, RevocationTarget};

/// CAEP session-revoked.
pub fn session_revoked() -> String {
    format!("{CAEP}session-revoked")
}
/// CAEP credential-change.
pub fn credential_change() -> String {
    format!("{CAEP}credential-change")
}
/// CAEP device-compliance-change.
pub fn device_compliance_change() -> String {
    format!("{CAEP}device-compliance-change")
}
/// CAEP assurance-level-change.
pub fn assurance_level_change() -> String {
    format!("{CAEP}assurance-level-change")
}
/// RISC account-disabled.
pub fn account_disabled() -> String {
    format!("{RISC}account-disabled")
}
/// RISC account-purged.
pub fn account_purged() -> String {
    format!("{RISC}account-purged")
}
/// SSF verification.
pub fn verification() -> String {
    format!("{SSF}verification")
}
/// SSF stream-updated.
pub fn stream_updated() -> String {
    format!("{SSF}stream-updated")
}

/// Every event type a stream can receive (`events_supported`).
pub fn supported() -> Vec<String> {
    vec![
        session_revoked(),
        credential_change(),
        device_compliance_change(),
        assurance_level_change(),
        account_disabled(),
        account_purged(),
        verification(),
        stream_updated(),
    ]
}

/// One outgoing signal.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    /// Event type URI.
    pub event_type: String,
    /// `sub_id`.
    pub sub_id: Value,
    /// The event object.
    pub event: Value,
    /// The subject's record key, to tell sibling signals of one event apart (jti).
    pub key: String,
}

/// How subjects are named in `sub_id`.
#[derive(Debug, Clone, Default)]
pub struct Naming {
    /// The subjects' issuer: `iss_sub` when set.
    pub subject_issuer: Option<String>,
}

impl Naming {
    /// A user subject identifier.
    pub fn user(&self, subject: &str) -> Value {
        match &self.subject_issuer {
            Some(iss) => json!({"format": "iss_sub", "iss": iss, "sub": subject}),
            None if subject.contains('@') && !subject.contains(char::is_whitespace) => {
                json!({"format": "email", "email": subject})
            }
            None => json!({"format": "opaque", "id": subject}),
        }
    }

    /// A device subject identifier.
    pub fn device(id: &str) -> Value {
        json!({"format": "opaque", "id": id})
    }
}

/// The issuer an SSF event came from (its id is `ssf:<iss>:<jti>`).
pub fn source_issuer(ev: &PostureEvent) -> Option<&str> {
    let rest = ev.id.strip_prefix("ssf:")?;
    // The jti never holds `:` in practice; the issuer (a URL) does, so split at the last.
    rest.rsplit_once(':').map(|(iss, _)| iss)
}

fn reason(ev: &PostureEvent) -> Value {
    json!({"en": format!("portcullis: {} ({})", ev.kind, ev.feed.as_str())})
}

fn initiating(ev: &PostureEvent) -> &'static str {
    use crate::posture::model::Feed;
    match ev.feed {
        Feed::Admin => "admin",
        Feed::Policy => "policy",
        Feed::Session => "user",
        _ => "system",
    }
}

/// The signals one committed event implies.
pub fn signals(ev: &PostureEvent, naming: &Naming) -> Vec<Signal> {
    let ts = ev.origin_ms / 1000;
    let mut out = Vec::new();
    let common = |mut obj: Value| {
        if let Some(o) = obj.as_object_mut() {
            o.insert("event_timestamp".into(), json!(ts));
            o.insert("initiating_entity".into(), json!(initiating(ev)));
            o.insert("reason_admin".into(), reason(ev));
        }
        obj
    };
    let purge = ev.kind == "scim.delete" || ev.kind == "risc.account-purged";
    for c in &ev.changes {
        match c {
            Change::Identity { subject, patch } => {
                match patch.status {
                    Some(IdentityStatus::Terminated) if purge => out.push(Signal {
                        event_type: account_purged(),
                        sub_id: naming.user(subject),
                        event: json!({}),
                        key: c.record_key(),
                    }),
                    Some(IdentityStatus::Terminated | IdentityStatus::Suspended) => {
                        out.push(Signal {
                            event_type: account_disabled(),
                            sub_id: naming.user(subject),
                            event: json!({}),
                            key: c.record_key(),
                        })
                    }
                    _ => {}
                }
                if let Some(level) = &patch.assurance {
                    let namespace = if level.to_ascii_lowercase().starts_with("aal") {
                        "NIST-AAL"
                    } else {
                        "RFC8176"
                    };
                    out.push(Signal {
                        event_type: assurance_level_change(),
                        sub_id: naming.user(subject),
                        event: common(json!({"namespace": namespace, "current_level": level})),
                        key: c.record_key(),
                    });
                }
                if ev.kind == "caep.credential-change" {
                    out.push(Signal {
                        event_type: credential_change(),
                        sub_id: naming.user(subject),
                        event: common(
                            json!({"credential_type": "unknown", "change_type": "update"}),
                        ),
                        key: c.record_key(),
                    });
                }
            }
            Change::Device { id, patch } => {
                let lost = patch.lifecycle.is_some_and(|l| {
                    matches!(
                        l,
                        Lifecycle::Lost | Lifecycle::Wiped | Lifecycle::WipePending
                    ) || l.is_dead()
                });
                let verdict = match patch.compliance {
                    Some(Compliance::NonCompliant) => Some(false),
                    Some(Compliance::Compliant) if !lost && patch.compromised != Some(true) => {
                        Some(true)
                    }
                    _ if lost || patch.compromised == Some(true) => Some(false),
                    _ => None,
                };
                if let Some(now_ok) = verdict {
                    let (prev, cur) = if now_ok {
                        ("not-compliant", "compliant")
                    } else {
                        ("compliant", "not-compliant")
                    };
                    out.push(Signal {
                        event_type: device_compliance_change(),
                        sub_id: json!({"format": "complex", "device": Naming::device(id)}),
                        event: common(json!({"previous_status": prev, "current_status": cur})),
                        key: c.record_key(),
                    });
                }
                if patch.cert_thumbprints.is_some() {
                    out.push(Signal {
                        event_type: credential_change(),
                        sub_id: json!({"format": "complex", "device": Naming::device(id)}),
                        event: common(json!({"credential_type": "x509", "change_type": "update"})),
                        key: format!("{}#x509", c.record_key()),
                    });
                }
            }
            Change::Revoke { target, key } => {
                let sub_id = match target {
                    RevocationTarget::Subject => {
                        json!({"format": "complex", "user": naming.user(key)})
                    }
                    RevocationTarget::Device => {
                        json!({"format": "complex", "device": Naming::device(key)})
                    }
                    RevocationTarget::Session => match key.split_once('|') {
                        Some((u, d)) => json!({"format": "complex",
                            "user": naming.user(u), "device": Naming::device(d)}),
                        None => json!({"format": "complex",
                            "session": {"format": "opaque", "id": key}}),
                    },
                };
                out.push(Signal {
                    event_type: session_revoked(),
                    sub_id,
                    event: common(json!({})),
                    key: c.record_key(),
                });
            }
            // Session records and DBSC keys are local state, not signals.
            Change::Group { .. } | Change::Session { .. } | Change::SessionDbsc { .. } => {}
        }
    }
    // RISC events carry no CAEP claims; CAEP ones have them (added above).
    out
}

/// Whether a stream subject filter entry matches a SET subject (SSF §8.1.3:
/// complex subjects match when every member is missing on one side or equal).
pub fn subject_matches(filter: &Value, sub: &Value) -> bool {
    let complex = |v: &Value| v.get("format").and_then(Value::as_str) == Some("complex");
    match (complex(filter), complex(sub)) {
        (true, true) => {
            let (Some(a), Some(b)) = (filter.as_object(), sub.as_object()) else {
                return false;
            };
            a.iter()
                .all(|(k, v)| k == "format" || b.get(k).is_none_or(|w| w == v))
        }
        (false, true) => sub
            .as_object()
            .is_some_and(|o| o.iter().any(|(k, v)| k != "format" && v == filter)),
        (true, false) => filter
            .as_object()
            .is_some_and(|o| o.iter().any(|(k, v)| k != "format" && v == sub)),
        (false, false) => filter == sub,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::posture::event::{DevicePatch, IdentityPatch};
    use crate::posture::model::Feed;

    fn ev(kind: &str, feed: Feed, changes: Vec<Change>) -> PostureEvent {
        PostureEvent {
            id: "ssf:https://idp.test/ssf:abc".into(),
            feed,
            kind: kind.into(),
            origin_ms: 1_767_229_198_000,
            changes,
        }
    }

    #[test]
    fn leaver_purge_lost_and_revoke_map_to_their_types() {
        let n = Naming::default();
        let leaver = ev(
            "scim.leaver",
            Feed::Scim,
            vec![
                Change::Identity {
                    subject: "alice@x.test".into(),
                    patch: IdentityPatch {
                        status: Some(IdentityStatus::Terminated),
                        ..Default::default()
                    },
                },
                Change::Revoke {
                    target: RevocationTarget::Subject,
                    key: "alice@x.test".into(),
                },
            ],
        );
        let s = signals(&leaver, &n);
        assert_eq!(s[0].event_type, account_disabled());
        assert_eq!(s[0].sub_id["format"], "email");
        assert_eq!(s[1].event_type, session_revoked());
        assert_eq!(s[1].event["event_timestamp"], 1_767_229_198u64);
        assert!(s[1].event["reason_admin"]["en"].as_str().is_some());
        let mut purge = leaver.clone();
        purge.kind = "scim.delete".into();
        assert_eq!(signals(&purge, &n)[0].event_type, account_purged());
        let lost = ev(
            "mdm.device-lost-or-wiped",
            Feed::Mdm,
            vec![Change::Device {
                id: "mac-1".into(),
                patch: DevicePatch {
                    lifecycle: Some(Lifecycle::Lost),
                    ..Default::default()
                },
            }],
        );
        let s = signals(&lost, &n);
        assert_eq!(s[0].event_type, device_compliance_change());
        assert_eq!(s[0].event["current_status"], "not-compliant");
        assert_eq!(source_issuer(&lost), Some("https://idp.test/ssf"));
    }

    #[test]
    fn complex_subjects_match_with_missing_members_as_wildcards() {
        let u = json!({"format": "email", "email": "a@x"});
        let d = json!({"format": "opaque", "id": "d1"});
        let both = json!({"format": "complex", "user": u, "device": d});
        let only_user = json!({"format": "complex", "user": u});
        assert!(subject_matches(&only_user, &both));
        assert!(subject_matches(&u, &both));
        assert!(!subject_matches(
            &json!({"format": "complex", "user": {"format": "email", "email": "b@x"}}),
            &both
        ));
        assert!(subject_matches(&u, &u));
        assert!(!subject_matches(&u, &d));
    }
}
