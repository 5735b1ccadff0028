//! The Hearth node: the stage server, the request holder, the OpenAI-compatible API and the
//! pieces the `hearth` command line puts together.

pub mod api;
pub mod auth;
pub mod bench;
pub mod cluster;
pub mod data_plane;
pub mod device;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod holder;
pub mod model_store;
pub mod paths;
pub mod peer_identity;
pub mod status;
pub mod system;
pub mod weights;
