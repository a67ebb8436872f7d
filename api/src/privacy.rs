//! Customers' personal data at the API: sealed before it is recorded, erasable on request.
//!
//! The personal strings of an order placement (the delivery address text and the contact) are
//! checked here and replaced by `pii:v1` envelopes of the customer's data key before the command
//! runs ([`seal_placement`]), so the event store, the topics and every copy hold ciphertext
//! only (see `commands::pii`). `POST /admin/customers/{customer_id}/erasure` deletes the
//! customer's key: their data then reads as `[erased]` everywhere (audit history, exports,
//! replays), no event changes (the hash chain stays valid), and new orders with personal data
//! for them are refused with 409.

use axum::extract::State;
use chrono::{DateTime, Utc};
use commands::pii::{PiiError, PiiVault};
use domain::order::{Contact, OrderCommand};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{Action, Principal};
use crate::error::{ApiError, Problem};
use crate::extract::{Body, PathParams};
use crate::AppState;

/// Whom the store and the courier contact about an order (personal data: sealed before it is
/// recorded, erasable).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactRequest {
    /// 1 to 100 characters.
    #[schema(min_length = 1, max_length = 100, example = "Ada Lovelace")]
    pub name: String,
    /// Digits, spaces and `+-()`, at most 32 characters.
    #[serde(default)]
    #[schema(max_length = 32, example = "+44 20 7946 0000")]
    pub phone: Option<String>,
    /// At most 254 characters, with one `@`.
    #[serde(default)]
    #[schema(max_length = 254, example = "ada@example.com")]
    pub email: Option<String>,
}

fn invalid(message: &str) -> ApiError {
    ApiError::Unprocessable(message.to_owned())
}

impl TryFrom<ContactRequest> for Contact {
    type Error = ApiError;

    /// Light checks only; the messages never repeat the values (personal data).
    fn try_from(r: ContactRequest) -> Result<Self, ApiError> {
        let name = r.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(invalid("contact.name must hold 1 to 100 characters"));
        }
        let phone = r
            .phone
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty());
        if let Some(phone) = &phone {
            let allowed = |c: char| c.is_ascii_digit() || " +-()".contains(c);
            if phone.chars().count() > 32
                || !phone.chars().all(allowed)
                || !phone.chars().any(|c| c.is_ascii_digit())
            {
                return Err(invalid(
                    "contact.phone must be at most 32 characters of digits, spaces and + - ( )",
                ));
            }
        }
        let email = r
            .email
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty());
        if let Some(email) = &email {
            let one_at = email.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty() && !domain.is_empty() && !domain.contains('@')
            });
            let well_formed =
                one_at && email.chars().count() <= 254 && !email.chars().any(char::is_whitespace);
            if !well_formed {
                return Err(invalid(
                    "contact.email must be an address with one @, at most 254 characters",
                ));
            }
        }
        Ok(Self { name, phone, email })
    }
}

impl From<PiiError> for ApiError {
    fn from(error: PiiError) -> Self {
        match error {
            PiiError::Erased(_) => Self::Conflict(error.to_string()),
            other => Self::internal(other),
        }
    }
}

/// Seals the personal strings of an order placement (address text, contact) with the
/// customer's key, in place; other commands are left as they are. Refused (409) for an erased
/// customer.
pub async fn seal_placement(vault: &PiiVault, command: &mut OrderCommand) -> Result<(), ApiError> {
    let OrderCommand::PlaceOrder {
        customer_id,
        delivery_address: address,
        contact,
        ..
    } = command
    else {
        return Ok(());
    };
    let key = vault.key_for(customer_id.as_uuid()).await?;
    let seal = |text: &mut String| -> Result<(), PiiError> {
        *text = key.seal(text)?;
        Ok(())
    };
    seal(&mut address.line1)?;
    address.line2.as_mut().map(seal).transpose()?;
    seal(&mut address.city)?;
    seal(&mut address.postcode)?;
    if let Some(contact) = contact {
        seal(&mut contact.name)?;
        contact.phone.as_mut().map(seal).transpose()?;
        contact.email.as_mut().map(seal).transpose()?;
    }
    Ok(())
}

/// Why a customer's personal data is erased.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErasureRequest {
    /// Why, for the record (e.g. the ticket of the customer's request); 1 to 500 characters.
    #[schema(
        min_length = 1,
        max_length = 500,
        example = "GDPR art. 17 request #4711"
    )]
    pub reason: String,
}

/// The customer's personal data is erased.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErasureDone {
    pub customer_id: Uuid,
    /// When it was erased (the first time, for a repeated request).
    pub erased_at: DateTime<Utc>,
    /// The customer had been erased before; this request changed nothing.
    pub already_erased: bool,
}

/// Erase a customer's personal data (crypto-shredding): their data key is deleted, so the
/// delivery address text and contact of all their orders read as `[erased]` in the audit
/// history, exports and replays, while the events themselves, their hash chain and the
/// non-personal figures stay. Irreversible; repeating it answers `already_erased: true`. Orders
/// with personal data for this customer are refused afterwards (409).
#[utoipa::path(
    post, path = "/admin/customers/{customer_id}/erasure", tag = "privacy",
    params(("customer_id" = Uuid, Path, description = "The customer")),
    request_body = ErasureRequest,
    responses(
        (status = 200, description = "Erased now, or already before (`already_erased`)", body = ErasureDone),
        (status = 400, description = "Malformed customer id or JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Missing, empty or too long reason, or unknown fields", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn erase_customer(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(raw_id): PathParams<String>,
    Body(request): Body<ErasureRequest>,
) -> Result<axum::Json<ErasureDone>, ApiError> {
    principal.authorize_any(Action::EraseCustomer)?;
    let customer = Uuid::parse_str(&raw_id)
        .map_err(|_| ApiError::BadRequest(format!("`{raw_id}` is not a customer id (a UUID)")))?;
    let reason = request.reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 {
        return Err(invalid("reason must hold 1 to 500 characters"));
    }
    let erasure = state
        .pii
        .erase(customer, &principal.actor(), reason)
        .await?;
    Ok(axum::Json(ErasureDone {
        customer_id: erasure.customer_id,
        erased_at: erasure.erased_at,
        already_erased: erasure.already_erased,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact(name: &str, phone: Option<&str>, email: Option<&str>) -> ContactRequest {
        ContactRequest {
            name: name.to_owned(),
            phone: phone.map(str::to_owned),
            email: email.map(str::to_owned),
        }
    }

    #[test]
    fn a_contact_is_checked_lightly_and_trimmed() {
        let ok = Contact::try_from(contact(
            " Ada Lovelace ",
            Some("+44 (20) 7946-0000"),
            Some("ada@example.com"),
        ))
        .expect("valid");
        assert_eq!(ok.name, "Ada Lovelace");
        assert!(Contact::try_from(contact("Ada", Some(" "), None))
            .expect("a blank phone is no phone")
            .phone
            .is_none());
        for bad in [
            contact("", None, None),
            contact(&"a".repeat(101), None, None),
            contact("Ada", Some("call me maybe"), None),
            contact("Ada", Some(&"1".repeat(33)), None),
            contact("Ada", None, Some("ada.example.com")),
            contact("Ada", None, Some("a@b@c")),
            contact("Ada", None, Some("@example.com")),
            contact(
                "Ada",
                None,
                Some(&format!("{}@example.com", "a".repeat(250))),
            ),
        ] {
            let err = Contact::try_from(bad).expect_err("refused");
            assert!(matches!(err, ApiError::Unprocessable(_)), "{err}");
        }
    }
}
