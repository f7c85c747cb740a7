//! portcullis: an identity-aware reverse proxy that makes device posture and
//! identity lifecycle count at request time.
//!
//! Rooms follow the request path (see `proxy` for the phase chart):
//! `tls` → `route` → `authn` → `binding` → `posture` → `policy` → `proxy`
//! (forward) → `telemetry`; `server`
//! owns listeners and lifecycle, `admin` the admin listener, `cli` and
//! `demo` the outside view.

pub mod access;
pub mod admin;
pub mod authn;
pub mod binding;
pub mod claims;
pub mod cli;
pub mod config;
pub mod demo;
pub mod feeds;
pub mod policy;
pub mod posture;
pub mod proxy;
pub mod route;
pub mod server;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod transmit;
pub mod util;
