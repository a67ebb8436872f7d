//! `x-correlation-id`: a caller names the business transaction its requests belong to. Any
//! printable id is accepted (1 to [`MAX_LEN`] visible ASCII characters: a UUID, a ULID, a trace
//! id, `checkout-42`), carried into the metadata of every event the request causes (and on
//! into the commands that process managers issue for them), and echoed on the response,
//! whatever its status. A value that is not such an id is refused with 400 rather than
//! silently replaced.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The header's name.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// The longest accepted id.
pub const MAX_LEN: usize = 128;

/// Whether `value` is an id this API accepts: 1 to [`MAX_LEN`] visible ASCII characters (no
/// spaces or control characters).
pub fn is_valid(value: &str) -> bool {
    (1..=MAX_LEN).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic())
}

/// The outermost layer: refuses a malformed id, echoes a good one on the response.
pub async fn layer(request: Request, next: Next) -> Response {
    let sent: Option<HeaderValue> = request.headers().get(CORRELATION_HEADER).cloned();
    let Some(sent) = sent else {
        return next.run(request).await;
    };
    if !sent.to_str().is_ok_and(is_valid) {
        return ApiError::BadRequest(format!(
            "{CORRELATION_HEADER} must be 1 to {MAX_LEN} printable ASCII characters without \
             spaces (for example a UUID)"
        ))
        .into_response();
    }
    let mut response = next.run(request).await;
    response.headers_mut().insert(CORRELATION_HEADER, sent);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_ids_of_bounded_length_are_valid_and_others_are_not() {
        for good in [
            "checkout-42",
            "01HZX3J5K2Q8",
            "6b9e0a1c-8f55-4a40-9c39-3f3f8d9f2b10",
            "a",
            "trace:abc/def_1.2",
        ] {
            assert!(is_valid(good), "{good}");
        }
        let long = "x".repeat(MAX_LEN + 1);
        for bad in ["", "has space", "tab\there", "é", long.as_str()] {
            assert!(!is_valid(bad), "{bad}");
        }
        assert!(is_valid(&"x".repeat(MAX_LEN)));
    }
}
