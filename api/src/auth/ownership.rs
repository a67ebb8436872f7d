//! Whom an order belongs to, and the check of an action on it against the caller.

use super::*;

/// Whom an order belongs to: its customer, its store and the courier of its delivery. `None`
/// when there is no such order.
pub async fn order_owner(state: &AppState, order_id: &str) -> Result<Option<Owner>, ApiError> {
    owner_of_order(state, order_id, true).await
}

/// [`order_owner`], reading the delivery (another aggregate replayed) only `with_courier`.
pub(super) async fn owner_of_order(
    state: &AppState,
    order_id: &str,
    with_courier: bool,
) -> Result<Option<Owner>, ApiError> {
    let (customer, store) = state
        .orders
        .state(order_id, |order| {
            (
                order.customer_id.map(|c| c.as_uuid()),
                order.store_id.map(|s| s.as_uuid()),
            )
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if customer.is_none() {
        return Ok(None);
    }
    if !with_courier {
        return Ok(Some(Owner {
            customer,
            store,
            courier: None,
        }));
    }
    let courier = state
        .deliveries
        .state(order_id, |delivery| {
            delivery.courier_id.map(|c| c.as_uuid())
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Some(Owner {
        customer,
        store,
        courier,
    }))
}

/// Authorizes `action` on an order: 404 when there is no such order and the caller could only
/// act on their own ones (nothing is said about orders of others that do not exist).
pub async fn authorize_order(
    state: &AppState,
    principal: &Principal,
    action: Action,
    order_id: &str,
) -> Result<(), ApiError> {
    if principal.sees_all(action) {
        return Ok(());
    }
    // Only a courier's claim needs the delivery's courier: the others own the order through
    // its customer or store, and an owner without a courier grants a courier nothing.
    let with_courier = principal.role == Role::Courier;
    match owner_of_order(state, order_id, with_courier).await? {
        Some(owner) => principal.authorize(action, &owner),
        None if access(action, principal.role) == Access::Own => {
            Err(ApiError::NotFound(format!("no order `{order_id}`")))
        }
        None => principal.authorize_any(action),
    }
}
