//! What several Ambit binaries share.
//!
//! - [`netns`]: run code inside another network namespace without disturbing the caller
//!   (namespace switches happen on dedicated threads only).
//! - [`cidr`]: IP prefixes;
//! - [`enroll`]: the node agent's local enrollment API (the one a CNI plugin calls): its
//!   messages and a blocking client.
pub mod cidr;
pub mod enroll;
pub mod netns;
