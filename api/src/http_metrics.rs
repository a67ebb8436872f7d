//! Request metrics of the API: `http_requests_total{method, route, status}` and
//! `http_request_duration_seconds{method, route}` (until the response head; an event stream
//! counts once, when it opens). `route` is the route's template (`/orders/{id}/tracking`), or
//! `unmatched` for a path no route serves, so the label set stays bounded whatever is requested.
//! The error-rate alerts and the dashboard read these (`deploy/monitoring/`).

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

/// The outermost layer: sees every answer, refusals and timeouts included.
pub async fn layer(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("http_requests_total", "method" => method, "route" => route, "status" => status)
        .increment(1);
    response
}

/// The method, or `other` for one the API serves no route for (bounded label values).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
