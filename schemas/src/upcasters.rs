//! Upcasters: old JSON shapes in the event store read as the current ones.
//!
//! The event store is append-only, so an event written in an older shape stays in that shape.
//! Every reader of the store (the command side loading aggregates, the outbox relay, replays)
//! runs the stored payload through these before deserializing it.

use cqrs_es::persist::{EventUpcaster, SemanticVersionEventUpcaster};
use serde_json::Value;

/// Every upcaster, oldest first.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    vec![Box::new(SemanticVersionEventUpcaster::new(
        "OrderCancelled",
        "2.0",
        Box::new(order_cancelled_v1_to_v2),
    ))]
}

/// `OrderCancelled` 1.0 did not record who cancelled; every 1.0 cancellation was issued by the
/// platform itself, so it becomes `System`.
fn order_cancelled_v1_to_v2(mut payload: Value) -> Value {
    if let Some(body) = payload
        .get_mut("OrderCancelled")
        .and_then(Value::as_object_mut)
    {
        body.entry("cancelled_by")
            .or_insert_with(|| Value::String("System".to_owned()));
    }
    payload
}

/// Applies the upcasters to one stored event, as `cqrs-es` does when it loads an aggregate.
pub fn upcast(event_type: &str, event_version: &str, payload: Value) -> (String, Value) {
    static UPCASTERS: std::sync::OnceLock<Vec<Box<dyn EventUpcaster>>> = std::sync::OnceLock::new();
    let mut version = event_version.to_owned();
    let mut payload = payload;
    for upcaster in UPCASTERS.get_or_init(upcasters) {
        if upcaster.can_upcast(event_type, &version) {
            let serialized = cqrs_es::persist::SerializedEvent::new(
                String::new(),
                0,
                String::new(),
                event_type.to_owned(),
                version.clone(),
                payload,
                Value::Null,
            );
            let upcast = upcaster.upcast(serialized);
            version = upcast.event_version;
            payload = upcast.payload;
        }
    }
    (version, payload)
}
