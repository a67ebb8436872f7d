//! The span of each request: a server span named after its route, continuing the caller's W3C
//! `traceparent` when it sends one (an invalid one is ignored, as W3C Trace Context says).
//! Commands run inside it, so their spans, and the events they append, belong to its trace
//! (see [`commands::trace`]).

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use commands::trace::TRACEPARENT;
use commands::TraceParent;
use tracing::Instrument;

/// The caller's `traceparent`, if it sent a valid one.
pub fn sent(headers: &HeaderMap) -> Option<TraceParent> {
    headers
        .get(TRACEPARENT)
        .and_then(|value| value.to_str().ok())
        .and_then(TraceParent::parse)
}

/// The trace a command of this request continues: the request span's (tracing on), or else the
/// caller's `traceparent` passed on unchanged.
pub fn of_request(headers: &HeaderMap) -> Option<TraceParent> {
    TraceParent::of(&tracing::Span::current()).or_else(|| sent(headers))
}

/// The outermost layer: runs the request in its span.
pub async fn layer(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = request.method().clone();
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    if let Some(parent) = sent(request.headers()) {
        parent.adopt(&span);
    }
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}
