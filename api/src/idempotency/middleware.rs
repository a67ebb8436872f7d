//! The middleware: a mutating request with a key is claimed, run once, and its final response stored and replayed to every retry.

use super::*;

/// Sends a stored response again.
pub(super) fn replay(existing: Existing) -> Response {
    let status = existing
        .status
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = Response::new(Body::from(existing.body.unwrap_or_default()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Some(serde_json::Value::Object(stored)) = existing.headers {
        for (name, value) in stored {
            let (Ok(name), Some(Ok(value))) = (
                HeaderName::try_from(name.as_str()),
                value.as_str().map(HeaderValue::from_str),
            ) else {
                continue;
            };
            headers.insert(name, value);
        }
    }
    headers.insert(
        HeaderName::from_static(REPLAYED_HEADER),
        HeaderValue::from_static("true"),
    );
    response
}

/// A request body read into memory, unless it is larger than the bound.
pub(super) enum Buffered {
    Complete(Bytes),
    /// Larger than the bound: the body as it came (what was read, then the rest).
    TooLarge(Body),
}

pub(super) async fn buffer(
    body: Body,
    headers: &HeaderMap,
    bound: usize,
) -> Result<Buffered, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > bound as u64) {
        return Ok(Buffered::TooLarge(body));
    }
    let mut stream = body.into_data_stream();
    let mut read = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            ApiError::BadRequest(format!("the body could not be read: {error}"))
        })?;
        read.extend_from_slice(&chunk);
        if read.len() > bound {
            let head = futures::stream::once(async move { Ok(Bytes::from(read)) });
            return Ok(Buffered::TooLarge(Body::from_stream(head.chain(stream))));
        }
    }
    Ok(Buffered::Complete(Bytes::from(read)))
}

pub(super) fn is_mutating(method: &Method) -> bool {
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(method)
}

pub(super) fn counted(outcome: &'static str) {
    metrics::counter!("idempotent_requests_total", "outcome" => outcome).increment(1);
}

/// The request's `Idempotency-Key`, if it sent one (and only one, well formed).
fn the_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut keys = headers.get_all(KEY_HEADER).iter();
    match (keys.next(), keys.next()) {
        (None, _) => Ok(None),
        (Some(value), None) => parse_key(value).map(|key| Some(key.to_owned())),
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "send one Idempotency-Key header, not several".to_owned(),
        )),
    }
}

/// The middleware: acts on POST, PUT, PATCH and DELETE requests with an `Idempotency-Key`
/// (see the module documentation); every other request passes through untouched.
pub async fn middleware(
    State(store): State<Idempotency>,
    request: Request,
    next: Next,
) -> Response {
    if !is_mutating(request.method()) {
        return next.run(request).await;
    }
    let key = match the_key(request.headers()) {
        Ok(Some(key)) => key,
        Ok(None) => return next.run(request).await,
        Err(problem) => return problem.into_response(),
    };
    let scope = request
        .extensions()
        .get::<CallerScope>()
        .map_or(CallerScope::ANONYMOUS, |scope| scope.0.as_str())
        .to_owned();
    // Bounded like the `Body` extractor: a body it would refuse anyway passes on, without
    // idempotency, so that the handler answers 413.
    let limit = request
        .extensions()
        .get::<BodyLimit>()
        .map_or(BodyLimit::DEFAULT, |limit| limit.0);
    let (parts, body) = request.into_parts();
    let body = match buffer(body, &parts.headers, limit.saturating_mul(16)).await {
        Ok(Buffered::Complete(body)) => body,
        Ok(Buffered::TooLarge(body)) => return next.run(Request::from_parts(parts, body)).await,
        Err(problem) => return problem.into_response(),
    };
    let claim = Claim {
        fingerprint: fingerprint(
            &parts.method,
            parts.uri.path(),
            parts.uri.query().unwrap_or_default(),
            &body,
        ),
        scope,
        key,
    };
    // A duplicate waits for the first request's response, but answers before the request
    // timeout would.
    let deadline = tokio::time::Instant::now() + store.request_timeout.mul_f64(0.8);
    loop {
        match store.claim(&claim).await {
            Ok(Some(claimed_at)) => {
                counted("executed");
                let request = Request::from_parts(parts, Body::from(body));
                return store.run_as_owner(claim, claimed_at, request, next).await;
            }
            Ok(None) => {}
            Err(error) => return ApiError::failed(&error).into_response(),
        }
        match store.existing(&claim).await {
            Err(error) => return ApiError::failed(&error).into_response(),
            // Released or expired since: claim it again at once.
            Ok(None) => continue,
            Ok(Some(existing)) if existing.expired && existing.state == "done" => continue,
            Ok(Some(existing)) if existing.fingerprint[..] != claim.fingerprint[..] => {
                counted("refused");
                return ApiError::Unprocessable(
                    "this Idempotency-Key was used with a different request; use a new key for \
                     a new request"
                        .to_owned(),
                )
                .into_response();
            }
            Ok(Some(existing)) if existing.state == "done" => {
                counted("replayed");
                return replay(existing);
            }
            Ok(Some(_in_flight)) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            counted("in_progress");
            return ApiError::Conflict(
                "a request with this key is still in progress; retry".to_owned(),
            )
            .into_response();
        }
        let pause = Duration::from_millis(rand::rng().random_range(25..=50));
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause)).await;
    }
}
