//! The built-in demo payment provider.

/// The payment provider the flow authorizes with. Development and tests use the built-in demo
/// provider, which approves every authorization but those of its test customers
/// ([`DEMO_DECLINED_CUSTOMER_PREFIX`]); a real provider adapter goes here.
pub const DEMO_PROVIDER: &str = "demo";

/// The demo provider's test customers: it declines every authorization for a customer whose id
/// starts with this, as card networks' test cards decline, so the decline path can be driven in
/// development and tests (`dec1ded0-0000-4000-8000-000000000001`). Real ids are random v4 UUIDs:
/// about one in four billion starts so, which only a deployment on the demo provider can meet.
pub const DEMO_DECLINED_CUSTOMER_PREFIX: &str = "dec1ded0-";

/// Why the demo provider declines an authorization for `customer_id`, if it does.
pub(super) fn demo_decline(customer_id: &str) -> Option<&'static str> {
    customer_id
        .starts_with(DEMO_DECLINED_CUSTOMER_PREFIX)
        .then_some("card_declined (the demo provider's test customer)")
}
