//! Browser sessions. (On this branch only DBSC; the session layer — OIDC
//! login, records, logout — lands from the `browser` work, which owns this file.)

pub mod dbsc;
