//! Money in integer minor units with a currency: never floating point, never negative.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An ISO 4217 currency code (three upper-case letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// Parses `"EUR"`, `"GBP"`, ...
    pub fn parse(code: &str) -> Result<Self, MoneyError> {
        match code.as_bytes() {
            [a, b, c] if [a, b, c].iter().all(|x| x.is_ascii_uppercase()) => Ok(Self([*a, *b, *c])),
            _ => Err(MoneyError::InvalidCurrency(code.to_owned())),
        }
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // The bytes were checked to be ASCII upper-case letters at construction.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl TryFrom<String> for Currency {
    type Error = MoneyError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Currency> for String {
    fn from(value: Currency) -> Self {
        value.as_str().to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an amount of money could not be formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("`{0}` is not an ISO 4217 currency code (three upper-case letters such as EUR)")]
    InvalidCurrency(String),
    #[error("an amount of money cannot be negative (got {0} minor units)")]
    Negative(i64),
    #[error("cannot combine {0} with {1}: currencies differ")]
    CurrencyMismatch(Currency, Currency),
    #[error("amount out of range")]
    Overflow,
}

/// A non-negative amount in minor units (cents, pence) of one currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawMoney", into = "RawMoney")]
pub struct Money {
    minor: i64,
    currency: Currency,
}

#[derive(Serialize, Deserialize)]
struct RawMoney {
    minor: i64,
    currency: Currency,
}

impl TryFrom<RawMoney> for Money {
    type Error = MoneyError;
    fn try_from(raw: RawMoney) -> Result<Self, Self::Error> {
        Self::new(raw.minor, raw.currency)
    }
}

impl From<Money> for RawMoney {
    fn from(m: Money) -> Self {
        Self {
            minor: m.minor,
            currency: m.currency,
        }
    }
}

impl Money {
    /// An amount; refuses negative values.
    pub fn new(minor: i64, currency: Currency) -> Result<Self, MoneyError> {
        if minor < 0 {
            return Err(MoneyError::Negative(minor));
        }
        Ok(Self { minor, currency })
    }

    /// Nothing, in `currency`.
    pub const fn zero(currency: Currency) -> Self {
        Self { minor: 0, currency }
    }

    pub const fn minor(&self) -> i64 {
        self.minor
    }

    pub const fn currency(&self) -> Currency {
        self.currency
    }

    /// The sum; refuses mixed currencies and overflow.
    pub fn checked_add(self, other: Self) -> Result<Self, MoneyError> {
        self.same_currency(other)?;
        let minor = self
            .minor
            .checked_add(other.minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Self { minor, ..self })
    }

    /// The difference, floored at zero (a discount never makes a price negative).
    pub fn saturating_sub(self, other: Self) -> Result<Self, MoneyError> {
        self.same_currency(other)?;
        Ok(Self {
            minor: (self.minor - other.minor).max(0),
            ..self
        })
    }

    /// `self * quantity`.
    pub fn times(self, quantity: u32) -> Result<Self, MoneyError> {
        let minor = self
            .minor
            .checked_mul(i64::from(quantity))
            .ok_or(MoneyError::Overflow)?;
        Ok(Self { minor, ..self })
    }

    /// `self * basis_points / 10 000`, rounded half up (tax, rates).
    pub fn apply_basis_points(self, basis_points: u32) -> Result<Self, MoneyError> {
        let scaled = i128::from(self.minor) * i128::from(basis_points);
        let rounded = (scaled + 5_000) / 10_000;
        let minor = i64::try_from(rounded).map_err(|_| MoneyError::Overflow)?;
        Ok(Self { minor, ..self })
    }

    fn same_currency(&self, other: Self) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch(self.currency, other.currency))
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:02} {}",
            self.minor / 100,
            self.minor % 100,
            self.currency
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eur() -> Currency {
        Currency::parse("EUR").expect("EUR is a currency")
    }

    #[test]
    fn negative_amounts_and_bad_currencies_are_refused() {
        assert_eq!(Money::new(-1, eur()), Err(MoneyError::Negative(-1)));
        assert!(Currency::parse("eur").is_err());
        assert!(Currency::parse("EURO").is_err());
        let json = r#"{"minor":-5,"currency":"EUR"}"#;
        assert!(serde_json::from_str::<Money>(json).is_err());
    }

    #[test]
    fn mixed_currencies_do_not_add() {
        let gbp = Currency::parse("GBP").expect("GBP is a currency");
        let sum = Money::zero(eur()).checked_add(Money::zero(gbp));
        assert!(matches!(sum, Err(MoneyError::CurrencyMismatch(..))));
    }

    #[test]
    fn basis_points_round_half_up() {
        let m = Money::new(1_005, eur()).expect("valid");
        assert_eq!(m.apply_basis_points(1_000).expect("fits").minor(), 101);
        assert_eq!(m.apply_basis_points(0).expect("fits").minor(), 0);
    }

    proptest! {
        #[test]
        fn money_is_never_negative(a in 0i64..1_000_000_000, b in 0i64..1_000_000_000, q in 0u32..1000, bp in 0u32..100_000) {
            let a = Money::new(a, eur()).expect("non-negative");
            let b = Money::new(b, eur()).expect("non-negative");
            prop_assert!(a.checked_add(b).expect("fits").minor() >= 0);
            prop_assert!(a.saturating_sub(b).expect("same currency").minor() >= 0);
            prop_assert!(a.times(q).expect("fits").minor() >= 0);
            prop_assert!(a.apply_basis_points(bp).expect("fits").minor() >= 0);
        }
    }
}
