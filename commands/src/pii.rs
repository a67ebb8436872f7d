//! Crypto-shredding: customers' personal data in an append-only log that can still be erased.
//!
//! Events are never changed (the hash chain of `replay-tools verify` hashes every stored
//! payload), and copies of them live on the topics and in analysts' exports. So personal strings
//! (the delivery address text and the order contact) never enter an event in clear: the API
//! replaces each one, before the command runs, with an envelope
//!
//! ```text
//! pii:v1:<customer uuid>:<base64url-no-pad(nonce (12 bytes) || ciphertext || tag)>
//! ```
//!
//! sealed with AES-256-GCM under the customer's own data key (table `pii_keys`), a random nonce
//! and the associated data `pii:v1:<customer uuid>` (an envelope moved to another customer does
//! not open). Erasing a customer ([`PiiVault::erase`]) deletes the key and records the erasure
//! (`pii_erasures`) in one transaction: every copy of their envelopes, wherever it is, can no
//! longer be opened, while the events, their order, their hashes and all non-personal fields
//! (analytics) stay as they were.
//!
//! Readers for people (audit history, exports, replays) put stored values through
//! [`PiiVault::reveal_all`]: envelopes become their plaintext while the key exists,
//! [`ERASED`] once it is gone, and [`UNREADABLE`] when an envelope is damaged or tampered with
//! (never confused with an erasure). Keys of all the customers found are loaded with one query.
//!
//! Neither plaintext nor keys are ever logged: [`CustomerKey`] and [`PiiVault`] print no secret
//! in `Debug`, and errors name customers, never their data.
//!
//! Limits, by design of this first version: the data keys are stored as they are in
//! PostgreSQL (a production deployment wraps them with a key-encryption key held in a KMS, and
//! keeps database backups no longer than the erasure promise); the coordinates of the delivery
//! address stay plain (the delivery flow computes with them).

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value as Json;
use sqlx::PgPool;
use uuid::Uuid;

/// The start of every envelope of this version.
pub const PREFIX: &str = "pii:v1:";
/// What a reader sees instead of the data of an erased customer.
pub const ERASED: &str = "[erased]";
/// What a reader sees instead of an envelope that does not open with its customer's key
/// (damaged, tampered with, or moved from another customer).
pub const UNREADABLE: &str = "[unreadable]";

const KEY_LEN: usize = 32;

/// Why personal data could not be sealed, revealed or erased.
#[derive(Debug, thiserror::Error)]
pub enum PiiError {
    /// The customer was erased: nothing personal is recorded for them again.
    #[error(
        "the personal data of customer {0} was erased; no new personal data is recorded for \
         this customer"
    )]
    Erased(Uuid),
    #[error("the system's secure random generator failed")]
    Randomness,
    #[error("the stored data key of customer {0} is not an AES-256 key")]
    InvalidKey(Uuid),
    #[error("a value is too long to seal")]
    TooLong,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The associated data of a customer's envelopes (and their prefix).
fn aad(customer: Uuid) -> String {
    format!("{PREFIX}{customer}")
}

/// `N` bytes from the system's secure random generator.
fn random<const N: usize>() -> Result<[u8; N], PiiError> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PiiError::Randomness)?;
    Ok(bytes)
}

/// One customer's data key, ready to seal and open. Its `Debug` shows the customer only.
pub struct CustomerKey {
    customer: Uuid,
    key: LessSafeKey,
}

impl fmt::Debug for CustomerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomerKey")
            .field("customer", &self.customer)
            .finish_non_exhaustive()
    }
}

impl CustomerKey {
    /// The key of `customer` from its stored bytes.
    pub fn new(customer: Uuid, bytes: &[u8]) -> Result<Self, PiiError> {
        let unbound =
            UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| PiiError::InvalidKey(customer))?;
        Ok(Self {
            customer,
            key: LessSafeKey::new(unbound),
        })
    }

    pub const fn customer(&self) -> Uuid {
        self.customer
    }

    /// `plaintext` as an envelope of this customer (a new random nonce each time, so equal
    /// values give different envelopes).
    pub fn seal(&self, plaintext: &str) -> Result<String, PiiError> {
        let nonce = random::<NONCE_LEN>()?;
        let aad = aad(self.customer);
        let mut sealed = Vec::with_capacity(NONCE_LEN + plaintext.len() + 16);
        sealed.extend_from_slice(&nonce);
        let mut in_out = plaintext.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut in_out,
            )
            .map_err(|_| PiiError::TooLong)?;
        sealed.extend_from_slice(&in_out);
        Ok(format!("{aad}:{}", URL_SAFE_NO_PAD.encode(sealed)))
    }

    /// The plaintext of the body of one of this customer's envelopes, or `None` if it does not
    /// open (damaged, tampered with, not this customer's).
    fn open(&self, body: &str) -> Option<String> {
        let mut sealed = URL_SAFE_NO_PAD.decode(body).ok()?;
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let mut in_out = sealed.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&sealed).ok()?;
        let aad = aad(self.customer);
        let plaintext = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut in_out)
            .ok()?;
        String::from_utf8(plaintext.to_vec()).ok()
    }
}

/// A string that is an envelope: its customer (if the id parses) and its body.
fn envelope(text: &str) -> Option<(Option<Uuid>, &str)> {
    let rest = text.strip_prefix(PREFIX)?;
    let (customer, body) = rest.split_once(':').unwrap_or((rest, ""));
    Some((Uuid::parse_str(customer).ok(), body))
}

/// Whether `text` is an envelope (sealed personal data).
pub fn is_sealed(text: &str) -> bool {
    text.starts_with(PREFIX)
}

/// The customers whose envelopes appear anywhere in `values`.
pub fn customers_in<'a>(values: impl IntoIterator<Item = &'a Json>) -> BTreeSet<Uuid> {
    fn walk(value: &Json, found: &mut BTreeSet<Uuid>) {
        match value {
            Json::String(s) => {
                if let Some((Some(customer), _)) = envelope(s) {
                    found.insert(customer);
                }
            }
            Json::Array(items) => items.iter().for_each(|v| walk(v, found)),
            Json::Object(map) => map.values().for_each(|v| walk(v, found)),
            Json::Null | Json::Bool(_) | Json::Number(_) => {}
        }
    }
    let mut found = BTreeSet::new();
    for value in values {
        walk(value, &mut found);
    }
    found
}

/// The data keys a reader holds: those of the customers it looked up that are not erased.
#[derive(Debug, Default)]
pub struct Keyring(HashMap<Uuid, CustomerKey>);

impl Keyring {
    pub fn new(keys: impl IntoIterator<Item = CustomerKey>) -> Self {
        Self(keys.into_iter().map(|k| (k.customer, k)).collect())
    }

    /// What a reader sees for one string: itself if it is no envelope, else its plaintext,
    /// [`ERASED`] when its customer's key is gone, [`UNREADABLE`] when it does not open.
    pub fn reveal_text(&self, text: &str) -> Option<String> {
        let (customer, body) = envelope(text)?;
        let Some(customer) = customer else {
            return Some(UNREADABLE.to_owned());
        };
        Some(match self.0.get(&customer) {
            None => ERASED.to_owned(),
            Some(key) => key.open(body).unwrap_or_else(|| UNREADABLE.to_owned()),
        })
    }

    /// Replaces every envelope among the strings of `value` (pure: no I/O).
    pub fn reveal(&self, value: &mut Json) {
        match value {
            Json::String(s) => {
                if let Some(revealed) = self.reveal_text(s) {
                    *s = revealed;
                }
            }
            Json::Array(items) => items.iter_mut().for_each(|v| self.reveal(v)),
            Json::Object(map) => map.values_mut().for_each(|v| self.reveal(v)),
            Json::Null | Json::Bool(_) | Json::Number(_) => {}
        }
    }
}

/// When a customer was erased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    pub customer_id: Uuid,
    pub erased_at: DateTime<Utc>,
    /// The customer had been erased before; this request changed nothing.
    pub already_erased: bool,
}

/// The customers' data keys in PostgreSQL (`pii_keys`, `pii_erasures`).
#[derive(Clone)]
pub struct PiiVault {
    pool: PgPool,
}

impl fmt::Debug for PiiVault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PiiVault").finish_non_exhaustive()
    }
}

/// Gets the customer's key or creates it, in one statement; no row when the customer is erased
/// (an erased customer's key, even one a racing request created, is never handed out).
const KEY_FOR: &str = "\
WITH erased AS (SELECT 1 FROM pii_erasures WHERE customer_id = $1), \
existing AS ( \
    SELECT data_key FROM pii_keys \
    WHERE customer_id = $1 AND NOT EXISTS (SELECT 1 FROM erased)), \
created AS ( \
    INSERT INTO pii_keys (customer_id, data_key) \
    SELECT $1, $2 \
    WHERE NOT EXISTS (SELECT 1 FROM existing) AND NOT EXISTS (SELECT 1 FROM erased) \
    ON CONFLICT (customer_id) DO UPDATE SET data_key = pii_keys.data_key \
    RETURNING data_key) \
SELECT data_key FROM existing UNION ALL SELECT data_key FROM created";

impl PiiVault {
    /// The vault over the event store's database (its tables come with the event store
    /// migrations).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The customer's data key, created at their first personal value; [`PiiError::Erased`]
    /// once they were erased.
    pub async fn key_for(&self, customer: Uuid) -> Result<CustomerKey, PiiError> {
        // Used only if the customer has no key yet.
        let fresh = random::<KEY_LEN>()?;
        let stored: Option<Vec<u8>> = sqlx::query_scalar(KEY_FOR)
            .bind(customer)
            .bind(fresh.as_slice())
            .fetch_optional(&self.pool)
            .await?;
        match stored {
            Some(bytes) => CustomerKey::new(customer, &bytes),
            None => Err(PiiError::Erased(customer)),
        }
    }

    /// One personal value of `customer` as an envelope.
    pub async fn seal(&self, customer: Uuid, plaintext: &str) -> Result<String, PiiError> {
        self.key_for(customer).await?.seal(plaintext)
    }

    /// The keys of `customers` that exist and are not erased, in one query.
    pub async fn keyring(
        &self,
        customers: impl IntoIterator<Item = Uuid>,
    ) -> Result<Keyring, PiiError> {
        let customers: Vec<Uuid> = customers.into_iter().collect();
        if customers.is_empty() {
            return Ok(Keyring::default());
        }
        let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
            "SELECT k.customer_id, k.data_key FROM pii_keys k \
             WHERE k.customer_id = ANY($1) \
               AND NOT EXISTS (SELECT 1 FROM pii_erasures e WHERE e.customer_id = k.customer_id)",
        )
        .bind(&customers)
        .fetch_all(&self.pool)
        .await?;
        let keys = rows
            .into_iter()
            .map(|(customer, bytes)| CustomerKey::new(customer, &bytes))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Keyring::new(keys))
    }

    /// Reveals every envelope in `values` (see [`Keyring::reveal`]), loading the keys of all the
    /// customers found with one query.
    pub async fn reveal_all<'a>(
        &self,
        values: impl IntoIterator<Item = &'a mut Json>,
    ) -> Result<(), PiiError> {
        let mut values: Vec<&mut Json> = values.into_iter().collect();
        let customers = customers_in(values.iter().map(|v| &**v));
        if customers.is_empty() {
            return Ok(());
        }
        let keyring = self.keyring(customers).await?;
        for value in &mut values {
            keyring.reveal(value);
        }
        Ok(())
    }

    /// Reveals every envelope in one value.
    pub async fn reveal(&self, value: &mut Json) -> Result<(), PiiError> {
        self.reveal_all(std::iter::once(value)).await
    }

    /// Erases `customer`'s personal data: deletes their key and records who erased them, when
    /// and why, in one transaction. Idempotent: erasing again changes nothing and says so
    /// (and deletes any key a request racing the first erasure created).
    pub async fn erase(&self, customer: Uuid, by: &str, reason: &str) -> Result<Erasure, PiiError> {
        let mut tx = self.pool.begin().await?;
        let recorded: Option<DateTime<Utc>> = sqlx::query_scalar(
            "INSERT INTO pii_erasures (customer_id, erased_by, reason) VALUES ($1, $2, $3) \
             ON CONFLICT (customer_id) DO NOTHING RETURNING erased_at",
        )
        .bind(customer)
        .bind(by)
        .bind(reason)
        .fetch_optional(&mut *tx)
        .await?;
        let (erased_at, already_erased) = match recorded {
            Some(at) => (at, false),
            None => (
                sqlx::query_scalar("SELECT erased_at FROM pii_erasures WHERE customer_id = $1")
                    .bind(customer)
                    .fetch_one(&mut *tx)
                    .await?,
                true,
            ),
        };
        sqlx::query("DELETE FROM pii_keys WHERE customer_id = $1")
            .bind(customer)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(%customer, already_erased, "customer personal data erased");
        Ok(Erasure {
            customer_id: customer,
            erased_at,
            already_erased,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key(customer: Uuid) -> CustomerKey {
        CustomerKey::new(customer, &random::<KEY_LEN>().expect("random")).expect("a key")
    }

    #[test]
    fn a_sealed_value_reveals_as_its_plaintext_and_never_shows_it_in_the_envelope() {
        let customer = Uuid::new_v4();
        let key = key(customer);
        let sealed = key.seal("221B Baker Street").expect("sealed");
        assert!(
            sealed.starts_with(&format!("pii:v1:{customer}:")),
            "{sealed}"
        );
        assert!(!sealed.contains("Baker"));
        assert_ne!(sealed, key.seal("221B Baker Street").expect("sealed"));
        let keyring = Keyring::new([key]);
        assert_eq!(
            keyring.reveal_text(&sealed).as_deref(),
            Some("221B Baker Street")
        );
        assert_eq!(keyring.reveal_text("plain text"), None);
    }

    #[test]
    fn reveal_walks_every_string_and_shows_an_erased_customer_as_erased() {
        let (kept, erased) = (Uuid::new_v4(), Uuid::new_v4());
        let (kept_key, erased_key) = (key(kept), key(erased));
        let mut value = json!({
            "customer_id": kept,
            "delivery_address": {"line1": kept_key.seal("1 High St").expect("sealed"),
                                 "latitude": 51.5},
            "contacts": [erased_key.seal("Ada").expect("sealed"), null, 3],
        });
        assert_eq!(customers_in([&value]), BTreeSet::from([kept, erased]));
        Keyring::new([kept_key]).reveal(&mut value);
        assert_eq!(
            value,
            json!({
                "customer_id": kept,
                "delivery_address": {"line1": "1 High St", "latitude": 51.5},
                "contacts": [ERASED, null, 3],
            })
        );
    }

    #[test]
    fn a_tampered_or_moved_envelope_is_unreadable_not_erased() {
        let (customer, other) = (Uuid::new_v4(), Uuid::new_v4());
        let key = key(customer);
        let sealed = key.seal("secret").expect("sealed");
        let keyring = Keyring::new([key, self::key(other)]);
        // One byte of the ciphertext changed.
        let (head, body) = sealed.rsplit_once(':').expect("an envelope");
        let mut bytes = URL_SAFE_NO_PAD.decode(body).expect("base64");
        bytes[NONCE_LEN] ^= 1;
        let tampered = format!("{head}:{}", URL_SAFE_NO_PAD.encode(bytes));
        assert_eq!(keyring.reveal_text(&tampered).as_deref(), Some(UNREADABLE));
        // The same body under another customer's id (the associated data differs).
        let moved = format!("{PREFIX}{other}:{body}");
        assert_eq!(keyring.reveal_text(&moved).as_deref(), Some(UNREADABLE));
        // Truncated, not base64, no customer.
        for broken in [
            format!("{head}:{}", &body[..8]),
            format!("{head}:!!!"),
            "pii:v1:not-a-uuid:abc".to_owned(),
        ] {
            assert_eq!(keyring.reveal_text(&broken).as_deref(), Some(UNREADABLE));
        }
    }

    #[test]
    fn debug_output_shows_no_key_material() {
        let customer = Uuid::new_v4();
        let bytes = random::<KEY_LEN>().expect("random");
        let key = CustomerKey::new(customer, &bytes).expect("a key");
        let shown = format!("{key:?}");
        let shown = format!("{shown} {:?}", Keyring::new([key]));
        assert!(shown.contains(&customer.to_string()));
        assert!(!shown.contains(&format!("{:?}", &bytes[..4])), "{shown}");
    }
}
