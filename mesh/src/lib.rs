//! Discovery, membership, placement and coordination of a Hearth cluster.
//!
//! [`place`] decides which node runs which layers of the model; [`parse_size`] and
//! [`format_bytes`] read and print the byte sizes that decision is made of.
//! [`cluster_key`] is the secret that keeps strangers out of a cluster.
//! [`identity`] gives each node its key pair and node id; [`discovery`] finds the other
//! nodes of its cluster on the local network.
//! [`control`] connects the nodes, tracks who is live and carries the plan;
//! [`coordinator`] decides who plans and what the plan is.

pub mod cluster_key;
pub mod control;
pub mod coordinator;
pub mod discovery;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
#[cfg(unix)]
#[doc(hidden)]
pub mod netns_testing;
mod placement;
mod size;

pub use placement::{
    place, ModelProfile, NodeCapacity, NodeId, Placement, PlacementError, StageAssignment,
};
pub use size::{format_bytes, parse_size, ParseSizeError};
