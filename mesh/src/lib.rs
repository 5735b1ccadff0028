//! Discovery, membership, placement and coordination of a Hearth cluster.
//!
//! [`place`] decides which node runs which layers of the model; [`parse_size`] and
//! [`format_bytes`] read and print the byte sizes that decision is made of.

mod placement;
mod size;

pub use placement::{
    place, ModelProfile, NodeCapacity, NodeId, Placement, PlacementError, StageAssignment,
};
pub use size::{format_bytes, parse_size, ParseSizeError};
