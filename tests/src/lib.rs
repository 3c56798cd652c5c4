//! placeholder
pub mod registry;
