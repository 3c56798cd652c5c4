//! Instance runtime (being written).
