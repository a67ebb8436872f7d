//! Points on the Earth and the great-circle distance between them.
//!
//! The distance is the haversine formula on a sphere of the Earth's mean radius: within 0.5 % of
//! the ellipsoidal distance, far better than the error of any courier's route estimate, and a
//! pure function that needs no geographic service.

use serde::{Deserialize, Serialize};

/// The Earth's mean radius (IUGG), in metres.
pub const EARTH_MEAN_RADIUS_METERS: f64 = 6_371_008.8;

/// A WGS84 position in degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoPoint {
    /// Degrees north of the equator, -90 to 90.
    pub latitude: f64,
    /// Degrees east of Greenwich, -180 to 180.
    pub longitude: f64,
}

/// Coordinates outside the WGS84 ranges (or not numbers at all).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error(
    "latitude must be within -90..=90 and longitude within -180..=180 degrees \
     (got {latitude}, {longitude})"
)]
pub struct InvalidCoordinates {
    pub latitude: f64,
    pub longitude: f64,
}

impl GeoPoint {
    /// A point, if both coordinates are in range.
    pub fn new(latitude: f64, longitude: f64) -> Result<Self, InvalidCoordinates> {
        let point = Self {
            latitude,
            longitude,
        };
        if point.is_valid() {
            Ok(point)
        } else {
            Err(InvalidCoordinates {
                latitude,
                longitude,
            })
        }
    }

    /// Whether both coordinates are in range (`NaN` is not).
    pub fn is_valid(&self) -> bool {
        (-90.0..=90.0).contains(&self.latitude) && (-180.0..=180.0).contains(&self.longitude)
    }

    /// Great-circle distance to `other`, in metres.
    pub fn distance_meters(&self, other: &Self) -> f64 {
        haversine_meters(*self, *other)
    }
}

/// Great-circle distance between two points, in metres (haversine formula).
pub fn haversine_meters(a: GeoPoint, b: GeoPoint) -> f64 {
    let lat_a = a.latitude.to_radians();
    let lat_b = b.latitude.to_radians();
    let half_dlat = (lat_b - lat_a) / 2.0;
    let half_dlon = (b.longitude - a.longitude).to_radians() / 2.0;
    let h = half_dlat.sin().powi(2) + lat_a.cos() * lat_b.cos() * half_dlon.sin().powi(2);
    // Rounding can push `h` a hair above 1 for antipodal points; asin would then be NaN.
    2.0 * EARTH_MEAN_RADIUS_METERS * h.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn point(latitude: f64, longitude: f64) -> GeoPoint {
        GeoPoint::new(latitude, longitude).expect("valid coordinates")
    }

    fn assert_km(actual_meters: f64, expected_km: f64, tolerance_km: f64) {
        let km = actual_meters / 1_000.0;
        assert!(
            (km - expected_km).abs() <= tolerance_km,
            "expected {expected_km} km ± {tolerance_km}, got {km} km"
        );
    }

    #[test]
    fn london_to_paris_is_about_344_km() {
        let london = point(51.5074, -0.1278);
        let paris = point(48.8566, 2.3522);
        assert_km(haversine_meters(london, paris), 343.6, 1.0);
    }

    #[test]
    fn new_york_to_los_angeles_is_about_3936_km() {
        let new_york = point(40.7128, -74.0060);
        let los_angeles = point(34.0522, -118.2437);
        assert_km(haversine_meters(new_york, los_angeles), 3_936.0, 5.0);
    }

    #[test]
    fn a_quarter_meridian_and_half_the_equator_have_their_textbook_lengths() {
        let quarter = std::f64::consts::FRAC_PI_2 * EARTH_MEAN_RADIUS_METERS;
        let half = std::f64::consts::PI * EARTH_MEAN_RADIUS_METERS;
        assert!((haversine_meters(point(0.0, 0.0), point(90.0, 0.0)) - quarter).abs() < 1e-6);
        assert!((haversine_meters(point(0.0, 0.0), point(0.0, 180.0)) - half).abs() < 1e-6);
    }

    #[test]
    fn one_degree_of_longitude_across_the_antimeridian_is_short() {
        assert_km(
            haversine_meters(point(0.0, 179.5), point(0.0, -179.5)),
            111.2,
            0.1,
        );
    }

    #[test]
    fn a_point_is_at_zero_distance_from_itself() {
        let store = point(52.517, 13.389);
        assert!(store.distance_meters(&store).abs() < f64::EPSILON);
    }

    #[test]
    fn coordinates_out_of_range_or_not_numbers_are_refused() {
        assert!(GeoPoint::new(90.0, 180.0).is_ok());
        assert!(GeoPoint::new(-90.0, -180.0).is_ok());
        assert!(GeoPoint::new(90.1, 0.0).is_err());
        assert!(GeoPoint::new(0.0, -180.5).is_err());
        assert!(GeoPoint::new(f64::NAN, 0.0).is_err());
        assert!(GeoPoint::new(0.0, f64::INFINITY).is_err());
        assert_eq!(
            GeoPoint::new(91.0, 0.0)
                .expect_err("out of range")
                .to_string(),
            "latitude must be within -90..=90 and longitude within -180..=180 degrees (got 91, 0)"
        );
    }

    fn any_point() -> impl Strategy<Value = GeoPoint> {
        (-90.0..=90.0f64, -180.0..=180.0f64).prop_map(|(lat, lon)| point(lat, lon))
    }

    proptest! {
        #[test]
        fn distance_is_symmetric_non_negative_and_at_most_half_the_circumference(
            a in any_point(),
            b in any_point(),
        ) {
            let ab = haversine_meters(a, b);
            let ba = haversine_meters(b, a);
            prop_assert!(ab >= 0.0);
            prop_assert!((ab - ba).abs() < 1e-6);
            prop_assert!(ab <= std::f64::consts::PI * EARTH_MEAN_RADIUS_METERS + 1e-6);
        }
    }
}
