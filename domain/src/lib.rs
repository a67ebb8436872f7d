//! # domain: the business of the order backbone, and nothing else
//!
//! Aggregates decide (`handle`) and remember (`apply`); they never touch a database, a broker, a
//! clock or the network. Everything they need from the outside world (prices, the current time)
//! arrives through the services traits in [`services`], so every rule here is testable with the
//! `cqrs-es` given/when/then framework and with property tests.
//!
//! Place in the flow: `api` parses requests into the commands of this crate, `commands` runs them
//! through `cqrs-es` against the PostgreSQL event store, and the events defined here travel to
//! Kafka (in the Avro form that `schemas` defines) and into the read models of `projections`.

pub mod ads;
pub mod delivery;
pub mod ids;
pub mod money;
pub mod order;
pub mod payment;
pub mod rewards;
pub mod services;

pub use ids::{CharityCode, CourierId, CustomerId, MenuItemId, OrderId, RegionCode, StoreId};
pub use money::{Currency, Money, MoneyError};
