//! Identifier newtypes: an order id is never confused with a customer id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a string could not become an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("`{0}` is not a UUID")]
    NotAUuid(String),
    #[error("`{value}` is not a valid {what}: {rule}")]
    Invalid {
        what: &'static str,
        value: String,
        rule: &'static str,
    },
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh random identifier.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            /// Wraps an existing UUID.
            pub const fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            /// The UUID inside.
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self(Uuid::nil())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| IdError::NotAUuid(s.to_owned()))
            }
        }
    };
}

uuid_id!(
    /// Identifies one order (the aggregate id of [`crate::order::Order`]).
    OrderId
);
uuid_id!(
    /// Identifies one customer.
    CustomerId
);
uuid_id!(
    /// Identifies one store (restaurant) that prepares orders.
    StoreId
);
uuid_id!(
    /// Identifies one courier.
    CourierId
);

macro_rules! code_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses a code: 1 to
            #[doc = stringify!($max)]
            /// characters of ASCII letters, digits, `-` and `_`.
            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                let valid = !value.is_empty()
                    && value.len() <= $max
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if valid {
                    Ok(Self(value))
                } else {
                    Err(IdError::Invalid {
                        what: $what,
                        value,
                        rule: concat!(
                            "1 to ",
                            stringify!($max),
                            " ASCII letters, digits, '-' or '_'"
                        ),
                    })
                }
            }

            /// The code as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

code_id!(
    /// A market such as `uk` or `de-berlin`: it fixes currency, tax and fees.
    RegionCode,
    "region code",
    32
);
code_id!(
    /// A menu item's stable code, such as `margherita-30`.
    MenuItemId,
    "menu item id",
    64
);
code_id!(
    /// A charity that points can be donated to, such as `food-bank-uk`.
    CharityCode,
    "charity code",
    64
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_accept_slugs_and_refuse_everything_else() {
        assert!(RegionCode::parse("uk-london_1").is_ok());
        assert!(RegionCode::parse("").is_err());
        assert!(RegionCode::parse("has space").is_err());
        assert!(RegionCode::parse("x".repeat(33)).is_err());
        assert!(MenuItemId::parse("ü").is_err());
    }

    #[test]
    fn uuid_ids_round_trip_through_text() {
        let id = OrderId::new();
        assert_eq!(id.to_string().parse::<OrderId>(), Ok(id));
        assert!("nope".parse::<OrderId>().is_err());
    }
}
