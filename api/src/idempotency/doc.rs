//! How the OpenAPI document describes `Idempotency-Key` on every mutating operation.

use super::*;

/// Documents the `Idempotency-Key` header on every POST, PUT, PATCH and DELETE operation, with
/// the answers it can bring (400, 409, 422) where the operation does not document them yet.
#[derive(Debug)]
pub struct IdempotencyDoc;

impl utoipa::Modify for IdempotencyDoc {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                document(operation);
            }
        }
    }
}

pub(super) fn document(operation: &mut Operation) {
    let parameter = ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "Names one logical operation, so that the request can be retried safely: the same \
             key with the same request returns the first response (header \
             `Idempotent-Replayed: true`) and changes nothing; with a different request it is \
             refused (422). 1 to 255 printable ASCII characters, e.g. a UUID.",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_KEY_LENGTH))
                .pattern(Some(KEY_PATTERN)),
        ))
        .build();
    operation
        .parameters
        .get_or_insert_with(Vec::new)
        .push(parameter);
    for (status, description) in [
        (
            "400",
            "Malformed request (including an invalid Idempotency-Key)",
        ),
        (
            "409",
            "A request with the same Idempotency-Key is still in progress; retry",
        ),
        (
            "422",
            "The Idempotency-Key was used with a different request",
        ),
    ] {
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| {
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/problem+json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("Problem")))
                            .build(),
                    )
                    .build()
                    .into()
            });
    }
}
