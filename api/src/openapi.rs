//! What every operation of the OpenAPI document shares, added in one place rather than on each
//! handler: the bearer-token security scheme and the answers any protected endpoint can give
//! (401, 403, 429), those of any endpoint with parameters (400) and with a body (400, 413,
//! 415, 422). Clients and
//! fuzzers read the document, so it must list every status the API can answer.

use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::Modify;

/// The name of the bearer scheme in the document.
pub const BEARER: &str = "bearer";

/// Paths that take no token: probes, and webhooks authenticated by their signature.
fn public(path: &str) -> bool {
    path.starts_with("/health/") || path.starts_with("/payments/")
}

/// Adds the security scheme and the shared responses.
#[derive(Debug)]
pub struct Shared;

fn problem(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build(),
    )
}

fn add(operation: &mut Operation, status: &str, description: &str) {
    operation
        .responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| problem(description));
}

impl Modify for Shared {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A JWT with `sub` (the caller's id) and `role` (customer, store, courier, \
                         admin, analyst, auditor), signed with the API's key",
                    ))
                    .build(),
            ),
        );
        for (path, item) in &mut openapi.paths.paths {
            let protected = !public(path);
            let limited = !path.starts_with("/health/");
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                if protected {
                    operation.security =
                        Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
                    add(
                        operation,
                        "401",
                        "Missing, malformed, expired or wrongly signed token",
                    );
                    add(
                        operation,
                        "403",
                        "The caller's role may not do this, or not on this resource",
                    );
                }
                add(
                    operation,
                    "408",
                    "The request did not finish in time (its effect is unknown)",
                );
                if limited {
                    add(
                        operation,
                        "429",
                        "Too many requests from this client; retry after Retry-After seconds",
                    );
                }
                if operation.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
                    add(operation, "400", "A path or query parameter is not valid");
                }
                if operation.request_body.is_some() {
                    add(operation, "400", "Malformed request");
                    add(operation, "413", "Body too large");
                    add(operation, "415", "Body is not JSON");
                    add(operation, "422", "Invalid values");
                }
            }
        }
    }
}
