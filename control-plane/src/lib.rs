//! Ambit's control plane.
//!
//! - [`model`]: the one internal model of the mesh, validated and derived;
//! - [`source`]: where the model comes from (a YAML file today).
pub mod model;
pub mod source;
