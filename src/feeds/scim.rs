//! SCIM 2.0 service provider (RFC 7643 / 7644) under `/scim/v2`.

use http::{Request, StatusCode};
use hyper::body::Incoming;

use super::{AdminResponse, FeedContext};

/// Handles `/scim/v2/…`.
pub async fn handle(ctx: &FeedContext, req: Request<Incoming>) -> AdminResponse {
    let _ = (ctx, req);
    super::error(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "SCIM is being built",
    )
}
