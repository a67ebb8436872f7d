//! The analytics read model fed by real orders through the pipeline (HTTP → event store →
//! relay → topics → projector → API): every figure equals what the test computes from the
//! orders it placed and the steps it took, with prices from the catalogue and step times from
//! the event store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use backbone_tests::{act, eventually, order_request, place_request, TestEnv};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use commands::{CommandBus, CommandContext};
use domain::order::OrderEvent;
use domain::rewards::{RewardsCommand, RewardsLedger, RewardsServices};
use domain::services::{Catalogue, SystemClock};
use domain::{MenuItemId, OrderId, RegionCode};
use projections::AnalyticsProjection;
use serde_json::{json, Value};
use uuid::Uuid;

type Lines = Vec<(&'static str, u32, Vec<&'static str>)>;

#[derive(Debug, Clone)]
enum Outcome {
    Completed,
    Cancelled {
        by: &'static str,
        reason: &'static str,
        after_accept: bool,
    },
    Rejected(&'static str),
}

/// An order the test places and what it does with it.
#[derive(Debug, Clone)]
struct Plan {
    region: &'static str,
    store: Uuid,
    lines: Lines,
    /// New lines before the store accepts (the order is priced again).
    modify_to: Option<Lines>,
    redeem_points: u64,
    /// Pause before the store accepts, to spread the acceptance times.
    accept_after_ms: u64,
    outcome: Outcome,
}

/// What the test knows of an order once it is done: the plan, its id and customer, and the
/// event times recorded by the store.
#[derive(Debug, Clone)]
struct Done {
    plan: Plan,
    id: String,
    customer: Uuid,
    placed_at: DateTime<Utc>,
    accepted_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
}

fn region(code: &str) -> RegionCode {
    RegionCode::parse(code).expect("a region code")
}

/// A line's total: (item price in the region + option surcharges) × quantity.
fn line_total(catalogue: &Catalogue, region_code: &str, line: &(&str, u32, Vec<&str>)) -> i64 {
    let item = &catalogue.items[&MenuItemId::parse(line.0).expect("an item id")];
    let unit = item.prices[&region(region_code)]
        + line
            .2
            .iter()
            .map(|o| item.options[*o].surcharge_minor)
            .sum::<i64>();
    unit * i64::from(line.1)
}

/// The order total: subtotal less the redeemed points' worth, plus tax (basis points, rounded
/// half up) on that, plus the delivery fee.
fn order_total(catalogue: &Catalogue, region_code: &str, lines: &Lines, points: u64) -> i64 {
    let settings = &catalogue.regions[&region(region_code)];
    let subtotal: i64 = lines
        .iter()
        .map(|l| line_total(catalogue, region_code, l))
        .sum();
    let discount = i64::try_from(points).expect("points")
        * i64::from(settings.redeem_minor_per_100_points)
        / 100;
    let taxable = subtotal - discount;
    let tax = (taxable * i64::from(settings.tax_basis_points) + 5_000) / 10_000;
    taxable + tax + settings.delivery_fee_minor
}

fn currency(catalogue: &Catalogue, region_code: &str) -> String {
    catalogue.regions[&region(region_code)]
        .currency
        .as_str()
        .to_owned()
}

fn lines_json(lines: &Lines) -> Value {
    json!(lines
        .iter()
        .map(|(item, quantity, options)| json!({
            "item_id": item, "quantity": quantity, "options": options
        }))
        .collect::<Vec<_>>())
}

/// `percentile_cont` as PostgreSQL defines it: linear interpolation between the two nearest
/// ranks of the sorted values.
fn percentile_cont(sorted: &[f64], fraction: f64) -> f64 {
    let position = fraction * (sorted.len() - 1) as f64;
    let (lower, upper) = (position.floor(), position.ceil());
    let low = sorted[lower as usize];
    let high = sorted[upper as usize];
    low + (position - lower) * (high - low)
}

fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    // The topics carry microseconds (Avro timestamp-micros).
    (to.timestamp_micros() - from.timestamp_micros()) as f64 / 1e6
}

/// The figures the summary should show for one group.
#[derive(Debug, Default)]
struct Expected {
    orders: i64,
    completed: i64,
    cancelled: i64,
    rejected: i64,
    revenue: i64,
    acceptance: Vec<f64>,
    delivery: Vec<f64>,
}

fn expected_groups(
    catalogue: &Catalogue,
    done: &[Done],
    key: impl Fn(&Done) -> String,
) -> BTreeMap<(String, String), Expected> {
    let mut groups: BTreeMap<(String, String), Expected> = BTreeMap::new();
    for order in done {
        let p = &order.plan;
        let group = groups
            .entry((key(order), currency(catalogue, p.region)))
            .or_default();
        group.orders += 1;
        match &p.outcome {
            Outcome::Completed => {
                group.completed += 1;
                let lines = p.modify_to.as_ref().unwrap_or(&p.lines);
                group.revenue += order_total(catalogue, p.region, lines, p.redeem_points);
            }
            Outcome::Cancelled { .. } => group.cancelled += 1,
            Outcome::Rejected(_) => {
                group.cancelled += 1;
                group.rejected += 1;
            }
        }
        if let Some(accepted) = order.accepted_at {
            group.acceptance.push(seconds(order.placed_at, accepted));
        }
        if let Some(delivered) = order.delivered_at {
            group.delivery.push(seconds(order.placed_at, delivered));
        }
    }
    groups
}

fn assert_percentiles(actual: &Value, mut values: Vec<f64>, what: &str) {
    if values.is_empty() {
        assert!(actual.is_null(), "{what}: no durations, so null: {actual}");
        return;
    }
    values.sort_by(f64::total_cmp);
    let mut previous = f64::NEG_INFINITY;
    for (name, fraction) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
        let got = actual[name].as_f64().expect("a percentile");
        let want = percentile_cont(&values, fraction);
        assert!(
            (got - want).abs() < 1e-6,
            "{what} {name}: {got} vs {want} from {values:?}"
        );
        assert!(
            got >= values[0] - 1e-9 && got <= values[values.len() - 1] + 1e-9,
            "{what} {name} within the observed range"
        );
        assert!(got >= previous, "{what}: percentiles are monotone");
        previous = got;
    }
}

/// Compares the summary rows with the expected groups (`key_field` names the key in a row).
fn assert_summary(
    rows: &[Value],
    expected: &BTreeMap<(String, String), Expected>,
    key_field: Option<&str>,
) {
    let keys: Vec<(String, String)> = rows
        .iter()
        .map(|row| {
            let key = key_field.map_or(String::new(), |field| match &row[field] {
                Value::String(s) => s.clone(),
                other => panic!("{field} should be a string: {other}"),
            });
            (key, row["currency"].as_str().expect("currency").to_owned())
        })
        .collect();
    let wanted: Vec<(String, String)> = expected.keys().cloned().collect();
    assert_eq!(keys, wanted, "groups, in key order: {rows:?}");
    for (row, (key, group)) in rows.iter().zip(expected) {
        let what = format!("{key:?}");
        assert_eq!(row["orders"], group.orders, "{what} orders");
        assert_eq!(row["completed"], group.completed, "{what} completed");
        assert_eq!(row["cancelled"], group.cancelled, "{what} cancelled");
        assert_eq!(row["rejected"], group.rejected, "{what} rejected");
        assert_eq!(row["revenue_minor"], group.revenue, "{what} revenue");
        let aov = (group.completed > 0)
            .then(|| (2 * group.revenue + group.completed) / (2 * group.completed));
        assert_eq!(row["aov_minor"], json!(aov), "{what} aov");
        assert_percentiles(
            &row["acceptance_seconds"],
            group.acceptance.clone(),
            &format!("{what} acceptance"),
        );
        assert_percentiles(
            &row["delivery_seconds"],
            group.delivery.clone(),
            &format!("{what} delivery"),
        );
    }
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client.get(url).send().await.expect("request sent");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

async fn get_ok(client: &reqwest::Client, url: &str) -> Value {
    let (status, body) = get(client, url).await;
    assert_eq!(status, 200, "{url}: {body}");
    body
}

/// Confirms the payment, waits `delay_ms`, and has the store accept.
async fn accept(client: &reqwest::Client, api: &str, id: &str, delay_ms: u64) {
    act(
        client,
        api,
        id,
        json!({"action": "confirm_payment", "payment_reference": "p"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    act(
        client,
        api,
        id,
        json!({"action": "accept", "estimated_preparation_minutes": 10}),
    )
    .await;
}

/// Places the order and takes its steps over HTTP; returns its id and customer.
async fn run(client: &reqwest::Client, api: &str, plan: &Plan) -> (String, Uuid) {
    let customer = Uuid::new_v4();
    let mut request = order_request(customer);
    request["store_id"] = json!(plan.store);
    request["delivery_address"] = backbone_tests::address_in(plan.region);
    request["region"] = json!(plan.region);
    request["items"] = lines_json(&plan.lines);
    request["redeem_points"] = json!(plan.redeem_points);
    let id = place_request(client, api, &request).await;
    if let Some(lines) = &plan.modify_to {
        act(
            client,
            api,
            &id,
            json!({"action": "modify", "items": lines_json(lines)}),
        )
        .await;
    }
    match &plan.outcome {
        Outcome::Completed => {
            accept(client, api, &id, plan.accept_after_ms).await;
            for action in [
                json!({"action": "start_preparation"}),
                json!({"action": "mark_ready"}),
                json!({"action": "hand_to_courier"}),
                json!({"action": "mark_delivered"}),
                json!({"action": "complete"}),
            ] {
                act(client, api, &id, action).await;
            }
        }
        Outcome::Cancelled {
            by,
            reason,
            after_accept,
        } => {
            if *after_accept {
                accept(client, api, &id, plan.accept_after_ms).await;
            }
            act(
                client,
                api,
                &id,
                json!({"action": "cancel", "by": by, "reason": reason}),
            )
            .await;
        }
        Outcome::Rejected(reason) => {
            act(
                client,
                api,
                &id,
                json!({"action": "confirm_payment", "payment_reference": "p"}),
            )
            .await;
            act(
                client,
                api,
                &id,
                json!({"action": "reject", "reason": reason}),
            )
            .await;
        }
    }
    (id, customer)
}

/// The order's events as stored (the source of truth the read model is built from).
async fn stored_times(
    env: &TestEnv,
    id: &str,
) -> (DateTime<Utc>, Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let payloads: Vec<Value> = sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_type = 'order' AND aggregate_id = $1 \
         ORDER BY sequence",
    )
    .bind(id)
    .fetch_all(env.pool())
    .await
    .expect("events read");
    let (mut placed, mut accepted, mut delivered) = (None, None, None);
    for payload in payloads {
        match serde_json::from_value::<OrderEvent>(payload).expect("an order event") {
            OrderEvent::OrderPlaced { placed_at, .. } => placed = Some(placed_at),
            OrderEvent::OrderAccepted { accepted_at, .. } => accepted = Some(accepted_at),
            OrderEvent::OrderDelivered { delivered_at } => delivered = Some(delivered_at),
            _ => {}
        }
    }
    (placed.expect("placed"), accepted, delivered)
}

async fn rewards_action(
    client: &reqwest::Client,
    api: &str,
    customer: Uuid,
    action: Value,
) -> Value {
    let response = client
        .post(format!("{api}/customers/{customer}/rewards/actions"))
        .json(&action)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 200, "{action}");
    response.json().await.expect("json")
}

/// Walks every page of `url` (which must take `cursor`), returning the rows under `field`.
async fn walk(client: &reqwest::Client, url: &str, field: &str) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let page_url = match &cursor {
            Some(c) => format!("{url}&cursor={c}"),
            None => url.to_owned(),
        };
        let page = get_ok(client, &page_url).await;
        let page_rows = page[field].as_array().expect("rows").clone();
        assert!(page_rows.len() <= 1, "limit=1 pages: {page}");
        rows.extend(page_rows);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return rows,
        }
    }
    panic!("pagination did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn analytics_figures_match_the_orders_placed_and_the_points_moved() {
    let env = TestEnv::start("analytics").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(AnalyticsProjection)).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let catalogue = TestEnv::catalogue();

    // Stores of the demo catalogue: an order's region is its store's.
    let (islington, angel, mitte) = (
        Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0100),
        backbone_tests::store_in("uk"),
        backbone_tests::store_in("de-berlin"),
    );
    let plans = vec![
        Plan {
            region: "uk",
            store: islington,
            lines: vec![("margherita", 2, vec!["extra-cheese"]), ("cola", 1, vec![])],
            modify_to: None,
            redeem_points: 0,
            accept_after_ms: 0,
            outcome: Outcome::Completed,
        },
        Plan {
            region: "uk",
            store: islington,
            lines: vec![("pepperoni", 1, vec![])],
            modify_to: Some(vec![("pepperoni", 1, vec![]), ("garlic-bread", 2, vec![])]),
            redeem_points: 0,
            accept_after_ms: 250,
            outcome: Outcome::Completed,
        },
        Plan {
            region: "uk",
            store: angel,
            lines: vec![("margherita", 1, vec!["large"])],
            modify_to: None,
            redeem_points: 100,
            accept_after_ms: 120,
            outcome: Outcome::Completed,
        },
        Plan {
            region: "uk",
            store: angel,
            lines: vec![("cola", 3, vec![])],
            modify_to: None,
            redeem_points: 0,
            accept_after_ms: 0,
            outcome: Outcome::Cancelled {
                by: "Customer",
                reason: "changed my mind",
                after_accept: false,
            },
        },
        Plan {
            region: "uk",
            store: islington,
            lines: vec![("pepperoni", 2, vec![])],
            modify_to: None,
            redeem_points: 0,
            accept_after_ms: 0,
            outcome: Outcome::Rejected("Busy"),
        },
        Plan {
            region: "de-berlin",
            store: mitte,
            lines: vec![("margherita", 3, vec![])],
            modify_to: None,
            redeem_points: 0,
            accept_after_ms: 60,
            outcome: Outcome::Completed,
        },
        Plan {
            region: "de-berlin",
            store: mitte,
            lines: vec![("pepperoni", 1, vec![]), ("cola", 2, vec![])],
            modify_to: None,
            redeem_points: 0,
            accept_after_ms: 180,
            outcome: Outcome::Cancelled {
                by: "Store",
                reason: "out of dough",
                after_accept: true,
            },
        },
        Plan {
            region: "de-berlin",
            store: mitte,
            lines: vec![("garlic-bread", 1, vec![])],
            modify_to: None,
            redeem_points: 50,
            accept_after_ms: 0,
            outcome: Outcome::Cancelled {
                by: "Customer",
                reason: "changed my mind",
                after_accept: false,
            },
        },
        Plan {
            region: "de-berlin",
            store: mitte,
            lines: vec![("margherita", 1, vec![]), ("cola", 1, vec![])],
            modify_to: None,
            redeem_points: 0,
            accept_after_ms: 300,
            outcome: Outcome::Completed,
        },
    ];

    let mut done = Vec::new();
    for plan in plans {
        let (id, customer) = run(&client, &api, &plan).await;
        let (placed_at, accepted_at, delivered_at) = stored_times(&env, &id).await;
        done.push(Done {
            plan,
            id,
            customer,
            placed_at,
            accepted_at,
            delivered_at,
        });
    }

    // Points: the order flow debits redeemed points and gives them back on cancellation; the
    // test does what it would, through the same command bus.
    let ledgers: CommandBus<RewardsLedger> = CommandBus::new(
        env.store.clone(),
        RewardsServices::new(Arc::new(SystemClock)),
    );
    let flow = CommandContext::new("test:order-flow");
    let mut redeemed = Vec::new();
    for order in done.iter().filter(|o| o.plan.redeem_points > 0) {
        rewards_action(
            &client,
            &api,
            order.customer,
            json!({"action": "adjust", "points": 1000, "reason": "welcome", "idempotency_key": "welcome"}),
        )
        .await;
        let order_id: OrderId = order.id.parse().expect("an order id");
        ledgers
            .execute(
                &order.customer.to_string(),
                RewardsCommand::RedeemPoints {
                    order_id,
                    points: order.plan.redeem_points,
                    idempotency_key: format!("redeem-{}", order.id),
                },
                &flow,
            )
            .await
            .expect("redeemed");
        let restored = matches!(order.plan.outcome, Outcome::Cancelled { .. });
        if restored {
            ledgers
                .execute(
                    &order.customer.to_string(),
                    RewardsCommand::RestoreRedemption {
                        order_id,
                        idempotency_key: format!("restore-{}", order.id),
                    },
                    &flow,
                )
                .await
                .expect("restored");
        }
        redeemed.push((order.plan.region, order.plan.redeem_points, restored));
    }
    // Donations over HTTP, by one donor.
    let donor = Uuid::new_v4();
    rewards_action(
        &client,
        &api,
        donor,
        json!({"action": "adjust", "points": 2000, "reason": "gift", "idempotency_key": "gift"}),
    )
    .await;
    let donations: [(&str, u64, &str); 3] = [
        ("food-bank-uk", 300, "uk"),
        ("food-bank-uk", 200, "uk"),
        ("tafel-berlin", 250, "de-berlin"),
    ];
    let mut last_donation = Value::Null;
    for (n, (charity, points, region_code)) in donations.iter().enumerate() {
        last_donation = rewards_action(
            &client,
            &api,
            donor,
            json!({"action": "donate", "charity": charity, "points": points,
                   "region": region_code, "idempotency_key": format!("donation-{n}")}),
        )
        .await;
    }

    // --- Summary per region, store, hour and overall, once every order is projected.
    let placed = done.len() as i64;
    let by_region = expected_groups(&catalogue, &done, |o| o.plan.region.to_owned());
    let regions = eventually(Duration::from_secs(60), "every order projected", || async {
        let body = get_ok(&client, &format!("{api}/analytics/summary?group_by=region")).await;
        let rows = body["rows"].as_array()?.clone();
        let orders: i64 = rows.iter().filter_map(|r| r["orders"].as_i64()).sum();
        let settled: i64 = rows
            .iter()
            .filter_map(|r| Some(r["completed"].as_i64()? + r["cancelled"].as_i64()?))
            .sum();
        (orders == placed && settled == placed).then_some(body)
    })
    .await;
    assert_eq!(regions["group_by"], "region");
    assert!(regions["next_cursor"].is_null());
    assert_summary(
        regions["rows"].as_array().expect("rows"),
        &by_region,
        Some("region"),
    );

    let by_store = expected_groups(&catalogue, &done, |o| o.plan.store.to_string());
    let stores = get_ok(&client, &format!("{api}/analytics/summary?group_by=store")).await;
    assert_summary(
        stores["rows"].as_array().expect("rows"),
        &by_store,
        Some("store_id"),
    );
    // Angel has one delivered order: its percentiles are that order's durations exactly.
    let angel_delivered: Vec<&Done> = done
        .iter()
        .filter(|o| o.plan.store == angel && o.delivered_at.is_some())
        .collect();
    assert_eq!(angel_delivered.len(), 1);
    let angel_row = stores["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["store_id"] == angel.to_string())
        .expect("angel's row");
    let only = angel_delivered[0];
    let delivery = seconds(only.placed_at, only.delivered_at.expect("delivered"));
    for p in ["p50", "p90", "p99"] {
        let got = angel_row["delivery_seconds"][p].as_f64().expect("p");
        assert!((got - delivery).abs() < 1e-6, "{p}: {got} vs {delivery}");
    }

    let overall = expected_groups(&catalogue, &done, |_| String::new());
    let none = get_ok(&client, &format!("{api}/analytics/summary")).await;
    assert_eq!(none["group_by"], "none");
    assert_summary(none["rows"].as_array().expect("rows"), &overall, None);

    let hour_of = |t: DateTime<Utc>| {
        t.duration_trunc(TimeDelta::hours(1))
            .expect("an hour")
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let by_hour = expected_groups(&catalogue, &done, |o| hour_of(o.placed_at));
    let hours = get_ok(&client, &format!("{api}/analytics/summary?group_by=hour")).await;
    assert_summary(
        hours["rows"].as_array().expect("rows"),
        &by_hour,
        Some("hour"),
    );

    // Filters: one region, one currency, and a range of whole hours.
    let uk_only = expected_groups(
        &catalogue,
        &done
            .iter()
            .filter(|o| o.plan.region == "uk")
            .cloned()
            .collect::<Vec<_>>(),
        |o| o.plan.store.to_string(),
    );
    let uk = get_ok(
        &client,
        &format!("{api}/analytics/summary?group_by=store&region=uk"),
    )
    .await;
    assert_summary(
        uk["rows"].as_array().expect("rows"),
        &uk_only,
        Some("store_id"),
    );
    let eur = get_ok(&client, &format!("{api}/analytics/summary?currency=EUR")).await;
    let eur_rows = eur["rows"].as_array().expect("rows");
    assert_eq!(eur_rows.len(), 1);
    assert_eq!(eur_rows[0]["currency"], "EUR");
    let first_hour = done
        .iter()
        .map(|o| o.placed_at)
        .min()
        .expect("orders")
        .duration_trunc(TimeDelta::hours(1))
        .expect("an hour");
    let hour_param = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:00:00Z").to_string();
    let ranged = get_ok(
        &client,
        &format!(
            "{api}/analytics/summary?from={}&to={}",
            hour_param(first_hour),
            hour_param(first_hour + TimeDelta::hours(3))
        ),
    )
    .await;
    assert_summary(ranged["rows"].as_array().expect("rows"), &overall, None);
    let before = get_ok(
        &client,
        &format!(
            "{api}/analytics/summary?from={}&to={}",
            hour_param(first_hour - TimeDelta::hours(2)),
            hour_param(first_hour)
        ),
    )
    .await;
    assert_eq!(
        before["rows"],
        json!([]),
        "nothing placed before the first hour"
    );

    // Pagination walks every group exactly once, in order.
    for (group_by, field) in [("store", "store_id"), ("region", "region")] {
        let all = get_ok(
            &client,
            &format!("{api}/analytics/summary?group_by={group_by}"),
        )
        .await;
        let walked = walk(
            &client,
            &format!("{api}/analytics/summary?group_by={group_by}&limit=1"),
            "rows",
        )
        .await;
        assert_eq!(&json!(walked), &all["rows"], "{group_by} pages");
        let distinct: BTreeSet<String> = walked.iter().map(|r| r[field].to_string()).collect();
        assert_eq!(distinct.len(), walked.len(), "{group_by}: each group once");
    }

    // --- Cancellations, computed from the plans.
    let mut by_party: BTreeMap<&str, i64> = BTreeMap::new();
    let mut reasons: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    let mut rejections: BTreeMap<&str, i64> = BTreeMap::new();
    for order in &done {
        match &order.plan.outcome {
            Outcome::Cancelled { by, reason, .. } => {
                *by_party.entry(by).or_default() += 1;
                *reasons.entry((by, reason)).or_default() += 1;
            }
            Outcome::Rejected(reason) => *rejections.entry(reason).or_default() += 1,
            Outcome::Completed => {}
        }
    }
    let mut reason_rows: Vec<((&str, &str), i64)> = reasons.into_iter().collect();
    reason_rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let cancellations = get_ok(&client, &format!("{api}/analytics/cancellations")).await;
    let rejected: i64 = rejections.values().sum();
    assert_eq!(
        cancellations,
        json!({
            "cancelled": by_party.values().sum::<i64>() + rejected,
            "rejected": rejected,
            "by_party": by_party.iter().map(|(by, n)| json!({"cancelled_by": by, "count": n})).collect::<Vec<_>>(),
            "reasons": reason_rows.iter().map(|((by, reason), n)| json!({"cancelled_by": by, "reason": reason, "count": n})).collect::<Vec<_>>(),
            "rejections": rejections.iter().map(|(reason, n)| json!({"reason": reason, "count": n})).collect::<Vec<_>>(),
        })
    );
    let berlin = get_ok(
        &client,
        &format!("{api}/analytics/cancellations?region=de-berlin&limit=1"),
    )
    .await;
    let berlin_cancelled = done
        .iter()
        .filter(|o| o.plan.region == "de-berlin" && !matches!(o.plan.outcome, Outcome::Completed))
        .count();
    assert_eq!(berlin["cancelled"], berlin_cancelled);
    assert_eq!(berlin["rejected"], 0);
    assert_eq!(berlin["reasons"].as_array().expect("reasons").len(), 1);

    // --- Top items of the completed orders (as last modified), per item and currency.
    let mut items: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for order in done
        .iter()
        .filter(|o| matches!(o.plan.outcome, Outcome::Completed))
    {
        let p = &order.plan;
        for line in p.modify_to.as_ref().unwrap_or(&p.lines) {
            let entry = items
                .entry((line.0.to_owned(), currency(&catalogue, p.region)))
                .or_default();
            entry.0 += i64::from(line.1);
            entry.1 += line_total(&catalogue, p.region, line);
        }
    }
    let ranked = |by_revenue: bool| {
        let mut rows: Vec<_> = items.iter().collect();
        rows.sort_by(|a, b| {
            let (qa, ra, qb, rb) = (a.1 .0, a.1 .1, b.1 .0, b.1 .1);
            let primary = if by_revenue {
                rb.cmp(&ra).then(qb.cmp(&qa))
            } else {
                qb.cmp(&qa).then(rb.cmp(&ra))
            };
            primary.then(a.0.cmp(b.0))
        });
        rows.iter()
            .map(|((item, cur), (quantity, revenue))| {
                let menu = &catalogue.items[&MenuItemId::parse(item.as_str()).expect("id")];
                json!({"item_id": item, "name": menu.name, "category": menu.category,
                       "quantity": quantity, "revenue_minor": revenue, "currency": cur})
            })
            .collect::<Vec<_>>()
    };
    for (by, by_revenue) in [("quantity", false), ("revenue", true)] {
        let top = get_ok(&client, &format!("{api}/analytics/top-items?by={by}")).await;
        assert_eq!(
            top,
            json!({"by": by, "items": ranked(by_revenue)}),
            "by {by}"
        );
    }
    let top_two = get_ok(
        &client,
        &format!("{api}/analytics/top-items?by=revenue&limit=2"),
    )
    .await;
    assert_eq!(top_two["items"], json!(ranked(true)[..2]));
    let gbp = get_ok(&client, &format!("{api}/analytics/top-items?region=uk")).await;
    assert!(gbp["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|i| i["currency"] == "GBP"));

    // --- Rewards: redemptions net of restorations, donations per charity.
    let donor_token = last_donation["position"]["token"]
        .as_str()
        .expect("a position token")
        .to_owned();
    // The donor's last event carries read-your-writes: every donation is there at once.
    let rewards = get_ok(
        &client,
        &format!("{api}/analytics/rewards?position={donor_token}"),
    )
    .await;
    let mut per_charity: BTreeMap<(String, String), (i64, i64, i64)> = BTreeMap::new();
    for (charity, points, region_code) in donations {
        let settings = &catalogue.regions[&region(region_code)];
        let points = i64::try_from(points).expect("points");
        let entry = per_charity
            .entry((charity.to_owned(), currency(&catalogue, region_code)))
            .or_default();
        entry.0 += 1;
        entry.1 += points;
        entry.2 += points * i64::from(settings.donation_minor_per_100_points) / 100;
    }
    let expected_donations: Vec<Value> = per_charity
        .iter()
        .map(|((charity, cur), (count, points, amount))| {
            json!({"charity": charity, "currency": cur, "count": count, "points": points, "amount_minor": amount})
        })
        .collect();
    assert_eq!(rewards["donations"], json!(expected_donations));
    let mut totals: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    for ((_, cur), (count, points, amount)) in &per_charity {
        let t = totals.entry(cur.as_str()).or_default();
        t.0 += count;
        t.1 += points;
        t.2 += amount;
    }
    assert_eq!(
        rewards["donation_totals"],
        json!(totals
            .iter()
            .map(|(cur, (count, points, amount))| json!({"currency": cur, "count": count, "points": points, "amount_minor": amount}))
            .collect::<Vec<_>>())
    );
    let walked = walk(
        &client,
        &format!("{api}/analytics/rewards?limit=1"),
        "donations",
    )
    .await;
    assert_eq!(json!(walked), json!(expected_donations), "donation pages");

    let points_of = |only: Option<&str>| {
        let chosen: Vec<&(&str, u64, bool)> = redeemed
            .iter()
            .filter(|(r, _, _)| only.is_none_or(|o| o == *r))
            .collect();
        let sum = |restored_only: bool| {
            let picked: Vec<_> = chosen
                .iter()
                .filter(|(_, _, restored)| !restored_only || *restored)
                .collect();
            (
                picked.len() as i64,
                picked.iter().map(|(_, p, _)| *p as i64).sum::<i64>(),
            )
        };
        let (redeemed_count, redeemed_points) = sum(false);
        let (restored_count, restored_points) = sum(true);
        json!({
            "earned": {"count": 0, "points": 0},
            "redeemed": {"count": redeemed_count, "points": redeemed_points},
            "restored": {"count": restored_count, "points": restored_points},
            "net_redemptions": redeemed_count - restored_count,
            "net_redeemed_points": redeemed_points - restored_points,
        })
    };
    let all_points = points_of(None);
    eventually(Duration::from_secs(30), "the redemptions", || async {
        let body = get_ok(&client, &format!("{api}/analytics/rewards")).await;
        (body["points"] == all_points).then_some(())
    })
    .await;
    for region_code in ["uk", "de-berlin"] {
        let body = get_ok(
            &client,
            &format!("{api}/analytics/rewards?region={region_code}"),
        )
        .await;
        assert_eq!(
            body["points"],
            points_of(Some(region_code)),
            "{region_code}"
        );
        // The donor never ordered: a donation counts in the region of the donor's latest order
        // before it, so this donor's are in no region.
        assert_eq!(
            body["donations"],
            json!([]),
            "a donor who never ordered belongs to no region"
        );
    }

    // --- Read-your-writes: a new order in a third region shows as soon as its position does.
    let mut request = order_request(Uuid::new_v4());
    request["region"] = json!("us-nyc");
    request["store_id"] = json!(backbone_tests::store_in("us-nyc"));
    request["delivery_address"] = backbone_tests::address_in("us-nyc");
    request["items"] = json!([{"item_id": "cola", "quantity": 1}]);
    let placed_now: Value = client
        .post(format!("{api}/orders"))
        .json(&request)
        .send()
        .await
        .expect("placed")
        .json()
        .await
        .expect("json");
    let token = placed_now["position"]["token"].as_str().expect("a token");
    let nyc = get_ok(
        &client,
        &format!("{api}/analytics/summary?group_by=region&region=us-nyc&position={token}"),
    )
    .await;
    assert_eq!(nyc["rows"][0]["orders"], 1, "{nyc}");
    assert_eq!(nyc["rows"][0]["currency"], currency(&catalogue, "us-nyc"));

    // --- Bad parameters: 400 problem documents that name the parameter.
    let cursor_of_regions = walk_first_cursor(&client, &api).await;
    for (query, names) in [
        (
            "summary?from=2024-05-02T00:00:00Z&to=2024-05-01T00:00:00Z",
            "from",
        ),
        (
            "summary?from=2024-05-01T00:00:00Z&to=2024-05-01T00:00:00Z",
            "from",
        ),
        ("summary?from=yesterday", "from"),
        ("summary?from=2024-05-01T10:30:00Z", "whole UTC hour"),
        ("summary?group_by=planet", "group_by"),
        ("summary?limit=0", "limit"),
        ("summary?limit=501", "limit"),
        ("summary?limit=ten", "limit"),
        ("summary?cursor=not-a-cursor", "cursor"),
        ("summary?region=not%20a%20region", "region"),
        ("summary?store_id=42", "store_id"),
        ("summary?currency=euro", "currency"),
        ("summary?colour=blue", "colour"),
        ("summary?position=order:x", "position"),
        ("cancellations?limit=0", "limit"),
        (
            "cancellations?to=2024-05-01T00:00:00Z&from=2024-06-01T00:00:00Z",
            "from",
        ),
        ("top-items?by=price", "by"),
        ("top-items?limit=0", "limit"),
        ("top-items?sort=asc", "sort"),
        ("rewards?cursor=00", "cursor"),
        ("rewards?unknown=1", "unknown"),
    ] {
        let response = client
            .get(format!("{api}/analytics/{query}"))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status().as_u16(), 400, "{query}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{query}"
        );
        let problem: Value = response.json().await.expect("a problem document");
        assert_eq!(problem["status"], 400);
        let detail = problem["detail"].as_str().expect("detail");
        assert!(detail.contains(names), "{query}: {detail}");
    }
    // A cursor of one list is refused by another.
    let (status, _) = get(
        &client,
        &format!("{api}/analytics/summary?group_by=store&cursor={cursor_of_regions}"),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = get(
        &client,
        &format!("{api}/analytics/rewards?cursor={cursor_of_regions}"),
    )
    .await;
    assert_eq!(status, 400);

    // Every endpoint is in the OpenAPI document.
    let doc = get_ok(&client, &format!("{api}/openapi.json")).await;
    for path in [
        "/analytics/summary",
        "/analytics/cancellations",
        "/analytics/top-items",
        "/analytics/rewards",
    ] {
        let params = doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{path} is documented"));
        for name in ["from", "to", "region", "store_id", "currency", "position"] {
            assert!(
                params.iter().any(|p| p["name"] == name),
                "{path} documents {name}"
            );
        }
    }

    server.stop().await.expect("api stops");
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

/// The first page's cursor of the per-region summary (there are three regions by now).
async fn walk_first_cursor(client: &reqwest::Client, api: &str) -> String {
    let page = get_ok(
        client,
        &format!("{api}/analytics/summary?group_by=region&limit=1"),
    )
    .await;
    page["next_cursor"]
        .as_str()
        .expect("more than one region")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_filtered_by_region_or_store_count_the_donations_of_that_regions_customers() {
    let env = TestEnv::start("donations").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(AnalyticsProjection)).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();

    // A customer of the London store, one of a New York store, and one who never ordered.
    let (london, new_york, stranger) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let london_store = Uuid::from_u128(42);
    place_request(&client, &api, &order_request(london)).await;
    let mut request = order_request(new_york);
    request["region"] = json!("us-nyc");
    request["store_id"] = json!(backbone_tests::store_in("us-nyc"));
    request["delivery_address"] = backbone_tests::address_in("us-nyc");
    request["items"] = json!([{"item_id": "cola", "quantity": 1}]);
    place_request(&client, &api, &request).await;
    for (donor, charity, region, points) in [
        (london, "food-bank-uk", "uk", 300),
        (new_york, "city-harvest", "us-nyc", 400),
        (stranger, "food-bank-uk", "uk", 500),
    ] {
        rewards_action(
            &client,
            &api,
            donor,
            json!({"action": "adjust", "points": 1000, "reason": "gift", "idempotency_key": "gift"}),
        )
        .await;
        rewards_action(
            &client,
            &api,
            donor,
            json!({"action": "donate", "charity": charity, "points": points, "region": region,
                   "idempotency_key": "donation"}),
        )
        .await;
    }
    let points = |body: &Value| -> i64 {
        body["donation_totals"]
            .as_array()
            .map(|totals| totals.iter().filter_map(|t| t["points"].as_i64()).sum())
            .unwrap_or_default()
    };
    eventually(
        Duration::from_secs(60),
        "every donation projected",
        || async {
            let body = get_ok(&client, &format!("{api}/analytics/rewards")).await;
            (points(&body) == 1200).then_some(())
        },
    )
    .await;

    for (filter, expected) in [
        ("region=uk".to_owned(), 300),
        ("region=us-nyc".to_owned(), 400),
        (format!("store_id={london_store}"), 300),
        (
            format!("store_id={}", backbone_tests::store_in("us-nyc")),
            400,
        ),
        ("region=de-berlin".to_owned(), 0),
    ] {
        let body = get_ok(&client, &format!("{api}/analytics/rewards?{filter}")).await;
        assert_eq!(points(&body), expected, "{filter}: {body}");
        let listed: i64 = body["donations"]
            .as_array()
            .expect("donations")
            .iter()
            .filter_map(|d| d["points"].as_i64())
            .sum();
        assert_eq!(listed, expected, "{filter}: {body}");
    }

    server.stop().await.expect("api stops");
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
