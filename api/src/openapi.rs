//! What every operation of the OpenAPI document shares, added in one place rather than on each
//! handler: the bearer-token security scheme, the `x-correlation-id` header every operation
//! takes and every answer echoes, the `Backbone-Signature` of the payment webhooks, and the
//! answers any protected endpoint can give (401, 403, 429), any endpoint (400 for a malformed
//! header or parameter, 408) and any endpoint with a body (413, 415, 422). Clients and fuzzers
//! read the document, so it must list every status the API can answer; a test validates it
//! with openapi-spec-validator.

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Required, ResponseBuilder};
use utoipa::Modify;

use crate::correlation::{CORRELATION_HEADER, MAX_LEN};

/// The name of the bearer scheme in the document.
pub const BEARER: &str = "bearer";

/// Paths that take no token: probes, and webhooks authenticated by their signature.
fn public(path: &str) -> bool {
    path.starts_with("/health/") || path.starts_with("/payments/")
}

/// The `x-correlation-id` schema: 1 to 128 visible ASCII characters.
fn correlation_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_LEN))
        .pattern(Some("^[!-~]+$"))
        .examples([serde_json::json!("checkout-42")])
}

fn correlation_parameter() -> Parameter {
    ParameterBuilder::new()
        .name(CORRELATION_HEADER)
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "Names the business transaction this request belongs to: any id of 1 to 128 visible \
             ASCII characters (a UUID, a trace id, `checkout-42`). Carried into the metadata of \
             the events the request causes and echoed on the response; without it a new order \
             starts a transaction of its own and a step on an order continues the order's. A \
             malformed value is answered 400.",
        ))
        .schema(Some(correlation_schema()))
        .build()
}

/// `Backbone-Signature` of a payment provider's webhook.
fn signature_parameter() -> Parameter {
    ParameterBuilder::new()
        .name(crate::payments::SIGNATURE_HEADER)
        .parameter_in(ParameterIn::Header)
        .required(Required::True)
        .description(Some(
            "`t=<unix seconds>,v1=<hex HMAC-SHA256(secret, \"<t>.<raw body>\")>`, signed with \
             the secret shared with the provider (`PAYMENTS_WEBHOOK_SECRET`); a missing, wrong \
             or stale signature (older than `PAYMENTS_WEBHOOK_TOLERANCE_SECONDS`) is answered \
             401.",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^t=[0-9]+,v1=[0-9a-f]{64}$"))
                .examples([serde_json::json!(
                    "t=1767225600,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd"
                )]),
        ))
        .build()
}

/// Adds the parameter unless the operation already has one of that name.
fn add_parameter(operation: &mut Operation, parameter: Parameter) {
    let parameters = operation.parameters.get_or_insert_with(Vec::new);
    if !parameters
        .iter()
        .any(|p| p.name.eq_ignore_ascii_case(&parameter.name))
    {
        parameters.push(parameter);
    }
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
                document_operation(operation, path, protected, limited);
            }
        }
    }
}

/// What every operation shares: its bearer security, the problems any request may meet, the
/// correlation id in and out, and the signature header of the payment webhooks.
fn document_operation(operation: &mut Operation, path: &str, protected: bool, limited: bool) {
    if protected {
        operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
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
    if operation.request_body.is_some() {
        add(operation, "400", "Malformed request");
        add(operation, "413", "Body too large");
        add(operation, "415", "Body is not JSON");
        add(operation, "422", "Invalid values");
    }
    if path.starts_with("/payments/") {
        add_parameter(operation, signature_parameter());
    }
    // Every operation takes the caller's correlation id (a malformed one is a 400)
    // and every answer echoes it.
    add_parameter(operation, correlation_parameter());
    add(
        operation,
        "400",
        "A header, path or query parameter is not valid",
    );
    for response in operation.responses.responses.values_mut() {
        if let RefOr::T(response) = response {
            response.headers.insert(
                CORRELATION_HEADER.to_owned(),
                HeaderBuilder::new()
                    .schema(correlation_schema())
                    .description(Some("The request's `x-correlation-id`, when it sent one"))
                    .build(),
            );
        }
    }
}
