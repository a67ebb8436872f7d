//! # commands: the write side
//!
//! Runs domain commands through `cqrs-es` against the PostgreSQL event store of `postgres-es`.
//! [`CommandBus`] wraps one `CqrsFramework` per aggregate type and adds what the framework leaves
//! to the application: metadata on every event (correlation id, causation id, actor, command id,
//! occurred-at; the event id is a column of the store), bounded retries with jitter when two
//! writers race for the same aggregate, and the committed position returned to the caller.
//!
//! Place in the flow: `api` parses a request into a command and calls a [`CommandBus`]; the
//! events and their outbox rows commit in one transaction ([`store`]); the relay in `streams`
//! takes them to Kafka. Customers' personal strings are sealed per customer before a command
//! runs and can be erased by deleting the key ([`pii`]).

pub mod bus;
pub mod catalogue;
pub mod log;
pub mod pii;
pub mod promotions;
mod repeat;
pub mod snapshots;
pub mod store;
pub mod stuck;
pub mod trace;

pub use bus::{CommandBus, CommandContext, CommandError, Committed, RetryPolicy};
pub use catalogue::{CatalogueError, CatalogueStore};
pub use pii::{PiiError, PiiVault};
pub use store::{EventStoreConfig, EventStoreDb, StoreError};
pub use trace::TraceParent;
