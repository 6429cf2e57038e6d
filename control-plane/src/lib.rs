//! Ambit's control plane.
//!
//! - [`model`]: the one internal model of the mesh, validated and derived;
//! - [`source`]: where the model comes from (a YAML file today);
//! - [`translate`]: the model as xDS resources, and each node's view of them.
pub mod model;
pub mod source;
pub mod translate;
