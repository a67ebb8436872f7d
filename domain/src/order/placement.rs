//! Placing and modifying an order: the lines are checked, the drop-off must be reachable from
//! the store, the store's region decides the prices, and the catalogue prices the order.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};

use super::{
    Contact, DeliveryAddress, Order, OrderError, OrderEvent, OrderStatus, MAX_LINES, MAX_QUANTITY,
};
use crate::delivery::{GeoPoint, MAX_DELIVERY_DISTANCE_KM};
use crate::services::{OrderServices, PricingError, Quote, RequestedLine};
use crate::{CustomerId, Money, RegionCode, StoreId};

/// The longest promotion code, in characters.
const MAX_PROMOTION_CODE_CHARS: usize = 32;

impl Order {
    /// Placing: once per order id; valid lines, a named contact, a drop-off the store can
    /// reach, a promotion code of sensible length, and the store's own region (a different
    /// region named by the client is refused). The store's region prices the order; a
    /// subscriber pays no delivery fee.
    // One parameter per field of `PlaceOrder`, each bound by name at the one call in `decide`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn place_order(
        &self,
        now: DateTime<Utc>,
        services: &OrderServices,
        customer_id: CustomerId,
        store_id: StoreId,
        region: Option<RegionCode>,
        lines: Vec<RequestedLine>,
        delivery_address: DeliveryAddress,
        contact: Option<Contact>,
        redeem_points: u64,
        promotion_code: Option<String>,
        free_delivery: bool,
    ) -> Result<OrderEvent, OrderError> {
        if self.status != OrderStatus::New {
            return Err(OrderError::AlreadyPlaced);
        }
        validate_lines(&lines)?;
        // Only presence: the text may be a sealed envelope, never read here.
        if contact.as_ref().is_some_and(|c| c.name.trim().is_empty()) {
            return Err(OrderError::ContactWithoutName);
        }
        check_reachable(services, &store_id, &delivery_address)?;
        if promotion_code
            .as_ref()
            .is_some_and(|c| c.chars().count() > MAX_PROMOTION_CODE_CHARS)
        {
            return Err(OrderError::TooLong {
                field: "promotion_code",
                max: MAX_PROMOTION_CODE_CHARS,
            });
        }
        let store_region = services.pricing.store_region(&store_id)?;
        if let Some(named) = region.filter(|named| *named != store_region) {
            return Err(PricingError::NotTheStoresRegion {
                named,
                store: store_id,
                store_region,
            }
            .into());
        }
        let region = store_region;
        let quote = waive_fee(
            services
                .pricing
                .quote(&region, &lines, redeem_points, promotion_code.as_deref())?,
            free_delivery,
        )?;
        Ok(OrderEvent::OrderPlaced {
            customer_id,
            store_id,
            region,
            lines: quote.lines,
            subtotal: quote.subtotal,
            discount: quote.discount,
            tax: quote.tax,
            delivery_fee: quote.delivery_fee,
            total: quote.total,
            delivery_address,
            accept_by: now + Duration::minutes(i64::from(quote.accept_within_minutes)),
            rating_window_days: quote.rating_window_days,
            points_redeemed: quote.points_redeemed,
            promotion_code,
            free_delivery,
            contact,
            placed_at: now,
        })
    }

    /// Modifying: only before the store accepts, with valid lines, priced again in the order's
    /// region with the points, promotion and free delivery it was placed with; once the payment
    /// is confirmed the new total may not exceed the confirmed one.
    pub(super) fn modify_order(
        &self,
        now: DateTime<Utc>,
        services: &OrderServices,
        lines: Vec<RequestedLine>,
    ) -> Result<OrderEvent, OrderError> {
        use OrderStatus as S;
        self.require(&[S::Placed, S::Confirmed], "modify")?;
        validate_lines(&lines)?;
        let region = self.region.clone().ok_or(OrderError::NotFound)?;
        let quote = waive_fee(
            services.pricing.quote(
                &region,
                &lines,
                self.points_redeemed,
                self.promotion_code.as_deref(),
            )?,
            self.free_delivery,
        )?;
        if let (S::Confirmed, Some(confirmed)) = (self.status, self.total) {
            if quote.total.minor() > confirmed.minor() {
                return Err(OrderError::ExceedsConfirmedTotal {
                    requested: quote.total,
                    confirmed,
                });
            }
        }
        Ok(OrderEvent::OrderModified {
            lines: quote.lines,
            subtotal: quote.subtotal,
            discount: quote.discount,
            tax: quote.tax,
            delivery_fee: quote.delivery_fee,
            total: quote.total,
            modified_at: now,
        })
    }
}

/// A drop-off no courier could reach would strand the order once accepted: refused when the
/// catalogue knows where the store is and the address is invalid or too far from it.
fn check_reachable(
    services: &OrderServices,
    store_id: &StoreId,
    delivery_address: &DeliveryAddress,
) -> Result<(), OrderError> {
    let Some(store) = services.pricing.store_location(store_id) else {
        return Ok(());
    };
    let dropoff = GeoPoint {
        latitude: delivery_address.latitude,
        longitude: delivery_address.longitude,
    };
    let meters = store.distance_meters(&dropoff);
    let max_km = MAX_DELIVERY_DISTANCE_KM;
    if !dropoff.is_valid() || meters > f64::from(max_km) * 1_000.0 {
        // At most half the Earth's circumference: fits a u32 easily.
        let km = if meters.is_finite() {
            (meters / 1_000.0).round() as u32
        } else {
            u32::MAX
        };
        return Err(OrderError::TooFarForDelivery { km, max_km });
    }
    Ok(())
}

/// A subscriber's order: no delivery fee.
fn waive_fee(mut quote: Quote, free_delivery: bool) -> Result<Quote, OrderError> {
    if free_delivery {
        quote.total = quote
            .total
            .saturating_sub(quote.delivery_fee)
            .map_err(PricingError::from)?;
        quote.delivery_fee = Money::zero(quote.delivery_fee.currency());
    }
    Ok(quote)
}

/// 1 to [`MAX_LINES`] lines, each of 1 to [`MAX_QUANTITY`], no option repeated within a line.
fn validate_lines(lines: &[RequestedLine]) -> Result<(), OrderError> {
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(OrderError::InvalidLineCount);
    }
    if lines
        .iter()
        .any(|l| l.quantity == 0 || l.quantity > MAX_QUANTITY)
    {
        return Err(OrderError::InvalidQuantity);
    }
    // An option is a choice (size, topping), charged once per unit: listing it again would
    // charge it again, and on a discounted order let a customer inflate a line at will.
    for line in lines {
        let mut seen = BTreeSet::new();
        if let Some(repeated) = line.options.iter().find(|o| !seen.insert(o.as_str())) {
            return Err(OrderError::RepeatedOption {
                item: line.item_id.clone(),
                option: repeated.clone(),
            });
        }
    }
    Ok(())
}
