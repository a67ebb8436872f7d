//! The payment aggregate (being written).
