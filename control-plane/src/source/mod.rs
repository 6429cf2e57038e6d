//! Where the mesh model comes from. Each source produces a [`crate::model::MeshSpec`] and
//! lets [`crate::model::Model::build`] validate it.

pub mod file;
