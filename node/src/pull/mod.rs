//! Image pulling (being written).
