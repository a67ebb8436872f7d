//! The rewards aggregate (being written).
