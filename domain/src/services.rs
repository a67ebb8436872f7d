//! What aggregates need from the world, as traits: the adapters provide the real thing, tests a
//! fixed one. Also the catalogue (menu and region settings) that prices an order.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};

use crate::{Currency, MenuItemId, Money, MoneyError, RegionCode};

/// The current time. Aggregates never call `Utc::now()` themselves, so tests can fix it.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock, at microsecond precision: the precision of the Avro `timestamp-micros`
/// contracts, so an event read back from a topic equals the one that was stored.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now().trunc_subsecs(6)
    }
}

/// A clock that always says the same instant (tests).
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub DateTime<Utc>);

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }
}

/// Settings of one market.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSettings {
    pub currency: Currency,
    /// Sales tax in basis points of the discounted subtotal (2000 = 20 %).
    pub tax_basis_points: u32,
    /// Delivery fee in minor units of `currency`.
    pub delivery_fee_minor: i64,
    /// Minutes a store has to accept an order before it is cancelled.
    pub accept_within_minutes: u32,
    /// Days after delivery during which an order can be rated.
    pub rating_window_days: u32,
    /// Rewards points earned per 100 minor units of a completed order's total (default 1).
    #[serde(default = "default_points_rate")]
    pub points_per_100_minor: u32,
    /// Days until earned points expire (default 365).
    #[serde(default = "default_points_expiry")]
    pub points_expire_in_days: u32,
    /// Average courier speed for delivery estimates, km/h (default 15).
    #[serde(default = "default_courier_speed")]
    pub courier_speed_kmh: u32,
    /// Discount, in minor units, that 100 redeemed points are worth (default 100: a point is
    /// worth one minor unit).
    #[serde(default = "default_redeem_rate")]
    pub redeem_minor_per_100_points: u32,
    /// Minor units a charity receives for 100 donated points (default 50).
    #[serde(default = "default_donation_rate")]
    pub donation_minor_per_100_points: u32,
}

/// A catalogue value that would make a later step of the order flow impossible, named by its
/// field (the admin API answers 422 with it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidSetting {
    pub field: &'static str,
    pub reason: String,
}

fn within(
    field: &'static str,
    value: u32,
    range: std::ops::RangeInclusive<u32>,
    what: &str,
) -> Result<(), InvalidSetting> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(InvalidSetting {
            field,
            reason: format!(
                "must be between {} and {} ({what}); got {value}",
                range.start(),
                range.end()
            ),
        })
    }
}

impl RegionSettings {
    /// Refuses values that the aggregates would refuse later, in the background: an order
    /// accepted under them could never earn its points, get its delivery or be paid for. The
    /// bounds are the aggregates' own.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        use crate::rewards::{MAX_DONATION_RATE, MAX_EARN_RATE, MAX_EXPIRY_DAYS};
        if self.delivery_fee_minor < 0 {
            return Err(InvalidSetting {
                field: "delivery_fee_minor",
                reason: "cannot be negative".to_owned(),
            });
        }
        within(
            "tax_basis_points",
            self.tax_basis_points,
            0..=10_000,
            "100 % at most",
        )?;
        within(
            "accept_within_minutes",
            self.accept_within_minutes,
            1..=24 * 60,
            "a store needs time to accept",
        )?;
        within(
            "rating_window_days",
            self.rating_window_days,
            1..=365,
            "a customer needs time to rate",
        )?;
        within(
            "points_per_100_minor",
            self.points_per_100_minor,
            1..=MAX_EARN_RATE,
            "completed orders could not earn points",
        )?;
        within(
            "points_expire_in_days",
            self.points_expire_in_days,
            1..=MAX_EXPIRY_DAYS,
            "completed orders could not earn points",
        )?;
        within(
            "courier_speed_kmh",
            self.courier_speed_kmh,
            1..=crate::delivery::MAX_AVERAGE_SPEED_KMH,
            "accepted orders could not get a delivery",
        )?;
        within(
            "redeem_minor_per_100_points",
            self.redeem_minor_per_100_points,
            1..=MAX_DONATION_RATE,
            "points could not be redeemed",
        )?;
        within(
            "donation_minor_per_100_points",
            self.donation_minor_per_100_points,
            1..=MAX_DONATION_RATE,
            "points could not be donated",
        )
    }
}

impl StoreSettings {
    /// Refuses a store no delivery could be requested from: coordinates out of range, or a
    /// region the catalogue does not serve (the order flow reads the courier speed there).
    pub fn check(&self, catalogue: &Catalogue) -> Result<(), InvalidSetting> {
        let location = crate::delivery::GeoPoint {
            latitude: self.latitude,
            longitude: self.longitude,
        };
        if !location.is_valid() {
            return Err(InvalidSetting {
                field: "latitude",
                reason: "latitude must be within -90..=90 and longitude within -180..=180"
                    .to_owned(),
            });
        }
        if !catalogue.regions.contains_key(&self.region) {
            return Err(InvalidSetting {
                field: "region",
                reason: format!(
                    "region `{}` is not in the catalogue; deliveries from the store could not \
                     be requested",
                    self.region
                ),
            });
        }
        Ok(())
    }
}

const fn default_donation_rate() -> u32 {
    50
}

const fn default_redeem_rate() -> u32 {
    100
}

const fn default_courier_speed() -> u32 {
    15
}

const fn default_points_rate() -> u32 {
    1
}

const fn default_points_expiry() -> u32 {
    365
}

/// One option of a menu item (size, extra topping) with its surcharge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MenuOption {
    pub name: String,
    /// Surcharge in minor units, in every region's currency.
    pub surcharge_minor: i64,
}

/// One item of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MenuItem {
    pub name: String,
    pub category: String,
    /// Price in minor units per region; an item without a price in a region is not sold there.
    pub prices: BTreeMap<RegionCode, i64>,
    pub options: BTreeMap<String, MenuOption>,
    pub available: bool,
}

/// A store: where couriers pick its orders up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    pub name: String,
    pub region: RegionCode,
    /// WGS84 degrees.
    pub latitude: f64,
    pub longitude: f64,
}

/// Items, regions and stores: what can be ordered where, at what price, and picked up where.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    pub regions: BTreeMap<RegionCode, RegionSettings>,
    pub items: BTreeMap<MenuItemId, MenuItem>,
    #[serde(default)]
    pub stores: BTreeMap<crate::StoreId, StoreSettings>,
    /// Promotion codes customers can enter at placement.
    #[serde(default)]
    pub promotions: BTreeMap<String, Promotion>,
    /// Ad experiments: layer, traffic share, variants (with the promotion each shows),
    /// attribution window, audience (see [`crate::ads`]).
    #[serde(default)]
    pub experiments: BTreeMap<crate::ads::ExperimentId, crate::ads::Experiment>,
}

/// A promotion code: a share off the subtotal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promotion {
    /// Share of the subtotal taken off, in basis points (1000 = 10 %).
    pub percent_off_bp: u32,
    /// Smallest subtotal, in minor units, the code applies to.
    #[serde(default)]
    pub min_subtotal_minor: i64,
    /// Regions where it applies; empty means everywhere.
    #[serde(default)]
    pub regions: Vec<RegionCode>,
    /// Whether the code can be used now.
    pub active: bool,
    /// Whether each customer may use it on one order only (the first placed; a cancelled order
    /// used it too). Enforced by the command side's promotion claims, not by the order
    /// aggregate, which sees one order at a time.
    #[serde(default)]
    pub once_per_customer: bool,
}

impl Catalogue {
    /// One line at the region's price: an item on sale there, each option's surcharge added
    /// to the unit price, times the quantity.
    fn price_line(
        &self,
        region: &RegionCode,
        currency: Currency,
        line: &RequestedLine,
    ) -> Result<PricedLine, PricingError> {
        let item = self
            .items
            .get(&line.item_id)
            .ok_or_else(|| PricingError::UnknownItem(line.item_id.clone()))?;
        if !item.available {
            return Err(PricingError::Unavailable(line.item_id.clone()));
        }
        let base = *item
            .prices
            .get(region)
            .ok_or_else(|| PricingError::NotSoldInRegion(line.item_id.clone(), region.clone()))?;
        let mut unit = Money::new(base, currency)?;
        for option in &line.options {
            let opt = item
                .options
                .get(option)
                .ok_or_else(|| PricingError::UnknownOption {
                    item: line.item_id.clone(),
                    option: option.clone(),
                })?;
            unit = unit.checked_add(Money::new(opt.surcharge_minor, currency)?)?;
        }
        Ok(PricedLine {
            item_id: line.item_id.clone(),
            name: item.name.clone(),
            category: item.category.clone(),
            quantity: line.quantity,
            options: line.options.clone(),
            unit_price: unit,
            line_total: unit.times(line.quantity)?,
        })
    }

    fn promotion_discount(
        &self,
        code: &str,
        region: &RegionCode,
        subtotal: Money,
    ) -> Result<Money, PricingError> {
        let promotion = self
            .promotions
            .get(code)
            .ok_or_else(|| PricingError::UnknownPromotion(code.to_owned()))?;
        let refuse = |reason: String| PricingError::PromotionNotApplicable {
            code: code.to_owned(),
            reason,
        };
        if !promotion.active {
            return Err(refuse("it has ended".to_owned()));
        }
        if !promotion.regions.is_empty() && !promotion.regions.contains(region) {
            return Err(refuse(format!("it is not offered in region `{region}`")));
        }
        if subtotal.minor() < promotion.min_subtotal_minor {
            return Err(refuse(format!(
                "the items must come to at least {} minor units",
                promotion.min_subtotal_minor
            )));
        }
        Ok(subtotal.apply_basis_points(promotion.percent_off_bp.min(10_000))?)
    }

    /// Parses a catalogue from its JSON form (the shape of `domain/catalogue/demo.json`).
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The demo catalogue: three regions and a small pizza menu, for development and tests.
    pub fn demo() -> Result<Self, serde_json::Error> {
        Self::from_json(include_str!("../catalogue/demo.json"))
    }
}

/// A line as the customer asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestedLine {
    pub item_id: MenuItemId,
    pub quantity: u32,
    pub options: Vec<String>,
}

/// A priced line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricedLine {
    pub item_id: MenuItemId,
    pub name: String,
    pub category: String,
    pub quantity: u32,
    pub options: Vec<String>,
    pub unit_price: Money,
    pub line_total: Money,
}

/// The full price of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    pub lines: Vec<PricedLine>,
    /// Rewards points redeemed as the discount.
    pub points_redeemed: u64,
    pub subtotal: Money,
    pub discount: Money,
    pub tax: Money,
    pub delivery_fee: Money,
    pub total: Money,
    pub accept_within_minutes: u32,
    pub rating_window_days: u32,
}

/// Why an order could not be priced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("region `{0}` is not served")]
    UnknownRegion(RegionCode),
    #[error("menu item `{0}` does not exist")]
    UnknownItem(MenuItemId),
    #[error("menu item `{0}` is not sold in region `{1}`")]
    NotSoldInRegion(MenuItemId, RegionCode),
    #[error("menu item `{0}` is currently unavailable")]
    Unavailable(MenuItemId),
    #[error("menu item `{item}` has no option `{option}`")]
    UnknownOption { item: MenuItemId, option: String },
    #[error("{requested} points are worth more than the items; redeem at most {max} points on this order")]
    RedemptionTooLarge { requested: u64, max: u64 },
    #[error("promotion code `{0}` does not exist; check the spelling")]
    UnknownPromotion(String),
    #[error("promotion code `{code}` does not apply: {reason}")]
    PromotionNotApplicable { code: String, reason: String },
    #[error("store_id `{0}` is not a store of the catalogue; see GET /catalogue for the stores")]
    UnknownStore(crate::StoreId),
    #[error("region `{named}` is not the region of store `{store}` (`{store_region}`): the store's region decides prices, currency, tax, fees, points and promotions; send `{store_region}` or leave region out")]
    NotTheStoresRegion {
        named: RegionCode,
        store: crate::StoreId,
        store_region: RegionCode,
    },
    #[error(transparent)]
    Money(#[from] MoneyError),
}

/// Prices an order. The catalogue is the real implementation; the trait lets an adapter cache it.
pub trait Pricing: Send + Sync {
    /// The region of a store: the one market whose prices, currency, tax, fees, points rates and
    /// promotions apply to its orders (never the client's choice).
    fn store_region(&self, store: &crate::StoreId) -> Result<RegionCode, PricingError>;

    /// Prices `lines` in `region`, with an optional promotion code and `redeem_points` rewards
    /// points taken off as discounts (the promotion first, then the points).
    fn quote(
        &self,
        region: &RegionCode,
        lines: &[RequestedLine],
        redeem_points: u64,
        promotion: Option<&str>,
    ) -> Result<Quote, PricingError>;

    /// Where a store picks its orders up, if the catalogue knows the store (placement refuses
    /// a drop-off no courier could reach from there).
    fn store_location(&self, _store: &crate::StoreId) -> Option<crate::delivery::GeoPoint> {
        None
    }
}

impl Pricing for Catalogue {
    fn store_region(&self, store: &crate::StoreId) -> Result<RegionCode, PricingError> {
        self.stores
            .get(store)
            .map(|settings| settings.region.clone())
            .ok_or(PricingError::UnknownStore(*store))
    }

    fn quote(
        &self,
        region: &RegionCode,
        lines: &[RequestedLine],
        redeem_points: u64,
        promotion: Option<&str>,
    ) -> Result<Quote, PricingError> {
        let settings = self
            .regions
            .get(region)
            .ok_or_else(|| PricingError::UnknownRegion(region.clone()))?;
        let currency = settings.currency;
        let mut priced = Vec::with_capacity(lines.len());
        let mut subtotal = Money::zero(currency);
        for line in lines {
            let line = self.price_line(region, currency, line)?;
            subtotal = subtotal.checked_add(line.line_total)?;
            priced.push(line);
        }
        let promotion_off = match promotion {
            Some(code) => self.promotion_discount(code, region, subtotal)?,
            None => Money::zero(currency),
        };
        let left = subtotal.saturating_sub(promotion_off)?;
        let rate = u64::from(settings.redeem_minor_per_100_points.max(1));
        let worth = u128::from(redeem_points) * u128::from(rate) / 100;
        if worth > u128::try_from(left.minor()).unwrap_or(0) {
            let max = u64::try_from(left.minor()).unwrap_or(0).saturating_mul(100) / rate;
            return Err(PricingError::RedemptionTooLarge {
                requested: redeem_points,
                max,
            });
        }
        let points_off = Money::new(
            i64::try_from(worth).map_err(|_| MoneyError::Overflow)?,
            currency,
        )?;
        let discount = promotion_off.checked_add(points_off)?;
        let taxable = subtotal.saturating_sub(discount)?;
        let tax = taxable.apply_basis_points(settings.tax_basis_points)?;
        let delivery_fee = Money::new(settings.delivery_fee_minor, currency)?;
        let total = taxable.checked_add(tax)?.checked_add(delivery_fee)?;
        Ok(Quote {
            lines: priced,
            points_redeemed: redeem_points,
            subtotal,
            discount,
            tax,
            delivery_fee,
            total,
            accept_within_minutes: settings.accept_within_minutes,
            rating_window_days: settings.rating_window_days,
        })
    }

    fn store_location(&self, store: &crate::StoreId) -> Option<crate::delivery::GeoPoint> {
        self.stores.get(store).map(|s| crate::delivery::GeoPoint {
            latitude: s.latitude,
            longitude: s.longitude,
        })
    }
}

/// What the order aggregate needs from outside.
#[derive(Clone)]
pub struct OrderServices {
    pub pricing: Arc<dyn Pricing>,
    pub clock: Arc<dyn Clock>,
}

impl OrderServices {
    pub fn new(pricing: Arc<dyn Pricing>, clock: Arc<dyn Clock>) -> Self {
        Self { pricing, clock }
    }
}

impl fmt::Debug for OrderServices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrderServices").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uk() -> RegionSettings {
        RegionSettings {
            currency: Currency::parse("GBP").expect("GBP"),
            tax_basis_points: 2_000,
            delivery_fee_minor: 299,
            accept_within_minutes: 11,
            rating_window_days: 7,
            points_per_100_minor: 5,
            points_expire_in_days: 365,
            courier_speed_kmh: 15,
            redeem_minor_per_100_points: 100,
            donation_minor_per_100_points: 50,
        }
    }

    #[test]
    fn region_values_that_would_strand_a_later_step_are_refused_naming_the_field() {
        assert_eq!(uk().check(), Ok(()));
        type Spoil = fn(&mut RegionSettings);
        let cases: [(&str, Spoil); 5] = [
            ("points_expire_in_days", |r| r.points_expire_in_days = 0),
            ("points_per_100_minor", |r| r.points_per_100_minor = 0),
            ("courier_speed_kmh", |r| r.courier_speed_kmh = 0),
            ("accept_within_minutes", |r| r.accept_within_minutes = 0),
            ("donation_minor_per_100_points", |r| {
                r.donation_minor_per_100_points = 0;
            }),
        ];
        for (field, spoil) in cases {
            let mut settings = uk();
            spoil(&mut settings);
            assert_eq!(settings.check().map_err(|e| e.field), Err(field));
        }
    }

    #[test]
    fn a_store_in_a_region_the_catalogue_does_not_serve_is_refused() {
        let mut catalogue = Catalogue::default();
        let store = StoreSettings {
            name: "Far away".to_owned(),
            region: RegionCode::parse("uk").expect("uk"),
            latitude: 51.5,
            longitude: -0.1,
        };
        assert_eq!(store.check(&catalogue).map_err(|e| e.field), Err("region"));
        catalogue
            .regions
            .insert(RegionCode::parse("uk").expect("uk"), uk());
        assert_eq!(store.check(&catalogue), Ok(()));
        let nowhere = StoreSettings {
            latitude: 91.0,
            ..store
        };
        assert_eq!(
            nowhere.check(&catalogue).map_err(|e| e.field),
            Err("latitude")
        );
    }
}
