//! Where the mesh model comes from. Each source produces a [`crate::model::MeshSpec`] and
//! lets [`crate::model::Model::build`] validate it; [`guard`] stands between a source and
//! the xDS server so that an accidental "almost nothing" is not believed at first sight.

pub mod file;
pub mod guard;
pub mod kubernetes;
