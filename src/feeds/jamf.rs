//! Jamf Pro webhooks (`POST /mdm/jamf`).

use http::{Request, StatusCode};
use hyper::body::Incoming;

use super::{AdminResponse, FeedContext};

/// Handles `POST /mdm/jamf`.
pub async fn webhook(ctx: &FeedContext, req: Request<Incoming>) -> AdminResponse {
    let _ = (ctx, req);
    super::error(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "Jamf is being built",
    )
}
