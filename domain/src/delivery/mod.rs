//! The delivery aggregate (being written).
