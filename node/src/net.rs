//! Instance networking (being written).
