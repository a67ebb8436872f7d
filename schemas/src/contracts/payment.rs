//! Contracts of the payment aggregate (topic `payments`).

use super::Source;

pub(super) const SOURCES: &[Source] = sources!("payment":
    "PaymentAuthorized" @ "1.0",
    "PaymentCaptured" @ "1.0",
    "PaymentVoided" @ "1.0",
    "PaymentRefunded" @ "1.0",
    "PaymentFailed" @ "1.0",
    "ProviderWebhookRecorded" @ "1.0",
);
