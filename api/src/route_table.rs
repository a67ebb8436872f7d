//! The API's operations: the route table (each route with the access it needs, see
//! [`crate::routes`]) and the OpenAPI document that describes them.

use utoipa::OpenApi;

use crate::idempotency::IdempotencyDoc;
use crate::openapi::Shared as SharedResponses;
use crate::routes::Routes;
use crate::{
    admin, ads, analytics, audit, auth, console, deliveries, error, health, notifications, orders,
    payments, privacy, prometheus, ratings, read_models, rewards, stuck_flows, tracking,
};

/// The OpenAPI document.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Order backbone API",
        description = "Commands and read models of the event-sourced order backbone."
    ),
    paths(
        orders::place_order,
        orders::act_on_order,
        tracking::list,
        tracking::tracking,
        tracking::stream,
        deliveries::act_on_delivery,
        rewards::act_on_rewards,
        rewards::balance,
        ads::record_exposure,
        ads::profile,
        ads::promotion,
        ads::results,
        payments::receive_webhook,
        admin::put_region,
        admin::put_item,
        admin::put_store,
        admin::put_promotion,
        admin::put_experiment,
        admin::catalogue,
        ratings::ratings,
        analytics::summary,
        analytics::cancellations,
        analytics::top_items,
        analytics::rewards,
        notifications::list,
        notifications::stream,
        notifications::webhook_failures,
        read_models::list,
        read_models::show,
        read_models::dead_letters,
        read_models::redrive,
        read_models::redrive_all,
        audit::events,
        privacy::erase_customer,
        stuck_flows::list,
        stuck_flows::retry,
        stuck_flows::resolve,
        health::live,
        health::ready,
        metrics_endpoint,
        openapi
    ),
    components(schemas(error::Problem)),
    modifiers(&IdempotencyDoc, &SharedResponses)
)]
pub struct ApiDoc;

/// Prometheus metrics, in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "health", responses(
    (status = 200, description = "The metrics of this process", body = String, content_type = "text/plain"),
))]
async fn metrics_endpoint() -> String {
    prometheus().render()
}

/// This document (OpenAPI 3.1).
#[utoipa::path(get, path = "/openapi.json", tag = "health", responses(
    (status = 200, description = "The OpenAPI document of this API", body = Object),
))]
async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

/// Every operation of the API with who may call it (see [`crate::routes`]), by area.
pub fn routes() -> Routes {
    [orders, customers, reads, operations, admin, service]
        .into_iter()
        .fold(Routes::new(), |routes, area| area(routes))
}

/// Orders through their lifecycle: placement, the steps of each party, the delivery, the
/// payment provider's webhooks, and the tracking view.
fn orders(routes: Routes) -> Routes {
    use crate::routes::Gate::{Needs, Public};
    use auth::Action as A;
    routes
        .post("/orders", Needs(&[A::PlaceOrder]), orders::place_order)
        .get("/orders", Needs(&[A::ListOrders]), tracking::list)
        .post(
            "/orders/{order_id}/actions",
            Needs(&[
                A::CustomerOrderStep,
                A::StoreOrderStep,
                A::CourierOrderStep,
                A::SystemOrderStep,
            ]),
            orders::act_on_order,
        )
        .get(
            "/orders/{order_id}/tracking",
            Needs(&[A::ViewOrder]),
            tracking::tracking,
        )
        .get(
            "/orders/{order_id}/tracking/stream",
            Needs(&[A::ViewOrder]),
            tracking::stream,
        )
        .post(
            "/deliveries/{order_id}/actions",
            Needs(&[
                A::CourierDeliveryStep,
                A::DispatchDeliveryStep,
                A::RateCourier,
            ]),
            deliveries::act_on_delivery,
        )
        .post(
            "/payments/{order_id}/webhooks",
            Public,
            payments::receive_webhook,
        )
}

/// A customer's own resources: rewards, ad profile, notifications.
fn customers(routes: Routes) -> Routes {
    use crate::routes::Gate::Needs;
    use auth::Action as A;
    routes
        .post(
            "/customers/{customer_id}/rewards/actions",
            Needs(&[A::CustomerRewardsAction, A::OperatorRewardsAction]),
            rewards::act_on_rewards,
        )
        .get(
            "/customers/{customer_id}/rewards",
            Needs(&[A::ViewRewards]),
            rewards::balance,
        )
        .post(
            "/customers/{customer_id}/ads/exposures",
            Needs(&[A::RecordAdExposure]),
            ads::record_exposure,
        )
        .get(
            "/customers/{customer_id}/ads/profile",
            Needs(&[A::ViewAdProfile]),
            ads::profile,
        )
        .get(
            "/customers/{customer_id}/ads/promotion",
            Needs(&[A::ViewAdProfile]),
            ads::promotion,
        )
        .get(
            "/customers/{customer_id}/notifications",
            Needs(&[A::ViewNotifications]),
            notifications::list,
        )
        .get(
            "/customers/{customer_id}/notifications/stream",
            Needs(&[A::ViewNotifications]),
            notifications::stream,
        )
}

/// Read models for dashboards and apps: the catalogue, ratings, analytics, experiments.
fn reads(routes: Routes) -> Routes {
    use crate::routes::Gate::Needs;
    use auth::Action as A;
    routes
        .get(
            "/ads/experiments/{experiment_id}/results",
            Needs(&[A::ViewAnalytics]),
            ads::results,
        )
        .get("/catalogue", Needs(&[A::ViewCatalogue]), admin::catalogue)
        .get(
            "/ratings/{kind}",
            Needs(&[A::ViewRatings]),
            ratings::ratings,
        )
        .get(
            "/analytics/summary",
            Needs(&[A::ViewAnalytics]),
            analytics::summary,
        )
        .get(
            "/analytics/cancellations",
            Needs(&[A::ViewAnalytics]),
            analytics::cancellations,
        )
        .get(
            "/analytics/top-items",
            Needs(&[A::ViewAnalytics]),
            analytics::top_items,
        )
        .get(
            "/analytics/rewards",
            Needs(&[A::ViewAnalytics]),
            analytics::rewards,
        )
}

/// What operators watch and repair: read models and their dead letters, webhook failures,
/// stuck flows, and the auditors' history.
fn operations(routes: Routes) -> Routes {
    use crate::routes::Gate::Needs;
    use auth::Action as A;
    routes
        .get(
            "/admin/notifications/webhook-failures",
            Needs(&[A::ViewOperations]),
            notifications::webhook_failures,
        )
        .get(
            "/projections",
            Needs(&[A::ViewOperations]),
            read_models::list,
        )
        .get(
            "/projections/{name}",
            Needs(&[A::ViewOperations]),
            read_models::show,
        )
        .get(
            "/projections/{name}/dead-letters",
            Needs(&[A::ViewOperations]),
            read_models::dead_letters,
        )
        .post(
            "/projections/{name}/dead-letters/redrive",
            Needs(&[A::RedriveDeadLetters]),
            read_models::redrive_all,
        )
        .post(
            "/projections/{name}/dead-letters/{id}/redrive",
            Needs(&[A::RedriveDeadLetters]),
            read_models::redrive,
        )
        .get(
            "/admin/stuck-flows",
            Needs(&[A::ViewStuckFlows]),
            stuck_flows::list,
        )
        .post(
            "/admin/stuck-flows/{id}/retry",
            Needs(&[A::ManageStuckFlows]),
            stuck_flows::retry,
        )
        .post(
            "/admin/stuck-flows/{id}/resolve",
            Needs(&[A::ManageStuckFlows]),
            stuck_flows::resolve,
        )
        .get(
            "/audit/{aggregate_type}/{aggregate_id}/events",
            Needs(&[A::ReadAudit]),
            audit::events,
        )
}

/// The catalogue's administration and a customer's erasure.
fn admin(routes: Routes) -> Routes {
    use crate::routes::Gate::Needs;
    use auth::Action as A;
    routes
        .put(
            "/admin/regions/{code}",
            Needs(&[A::ManageCatalogue]),
            admin::put_region,
        )
        .put(
            "/admin/menu/items/{item_id}",
            Needs(&[A::ManageCatalogue]),
            admin::put_item,
        )
        .put(
            "/admin/stores/{store_id}",
            Needs(&[A::ManageCatalogue]),
            admin::put_store,
        )
        .put(
            "/admin/promotions/{code}",
            Needs(&[A::ManageCatalogue]),
            admin::put_promotion,
        )
        .put(
            "/admin/experiments/{experiment_id}",
            Needs(&[A::ManageCatalogue]),
            admin::put_experiment,
        )
        .post(
            "/admin/customers/{customer_id}/erasure",
            Needs(&[A::EraseCustomer]),
            privacy::erase_customer,
        )
}

/// The service itself: its description, metrics, probes, and the operations console's files.
fn service(routes: Routes) -> Routes {
    use crate::routes::Gate::Public;
    routes
        .get("/openapi.json", Public, openapi)
        .get("/metrics", Public, metrics_endpoint)
        .get("/health/live", Public, health::live)
        .get("/health/ready", Public, health::ready)
        .assets("/console", console::redirect)
        .assets("/console/", console::file)
        .assets("/console/{*path}", console::file)
}
