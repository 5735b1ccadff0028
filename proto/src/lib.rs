//! The wire format between Hearth nodes: gRPC services, and validated views of their
//! messages.
//!
//! The protocol is defined, and documented message by message, in
//! `proto/hearth/v1/pipeline.proto`. Two services:
//!
//! - `Auth.Handshake`: two nodes prove to each other that they hold the cluster key, and
//!   the caller gets a session ticket ([`handshake`]).
//! - `Pipeline.Stream`: the long-lived link from one stage to the next, carrying hidden
//!   states, prompts, sampled tokens and resets ([`frame`]); and `Pipeline.FetchWeights`,
//!   which gives a joining node its weights ([`weights`]); and `Pipeline.Probe`, which
//!   measures a path and proves which node it reaches ([`probe`]).
//!
//! [`pb`] holds the generated messages, clients and servers. Nodes do not act on those
//! messages directly: every received one goes through the `from_wire` of its typed view
//! ([`frame::StageFrame`], [`handshake::HandshakeStep`], [`weights::WeightChunk`], ...),
//! which refuses anything malformed or over the [`Limits`] with a [`FrameError`] (never
//! a panic), and without allocating. Each view's `into_wire` builds the message to send.
//!
//! ```
//! use hearth_proto::frame::{Activation, DType, Expect, HiddenStates, StageFrame};
//! use hearth_proto::Limits;
//!
//! let limits = Limits::default();
//! let expect = Expect { epoch: 7, hidden_size: 4, vocab_size: 32_000 };
//!
//! // Sending: build the typed frame, then its message.
//! let hidden = HiddenStates::from_f32(2, 4, &[0.5; 8], DType::BF16)?;
//! let sent = Activation { epoch: 7, sequence_id: 9, start_position: 5, hidden, generation: None, steps: false };
//! let message = StageFrame::from(sent.clone()).into_wire();
//!
//! // Receiving: nothing is acted on before it is validated.
//! let received = StageFrame::from_wire(message, &limits, &expect)?;
//! assert_eq!(received, StageFrame::Activation(sent));
//! # Ok::<(), hearth_proto::FrameError>(())
//! ```

mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
mod limits;
pub mod probe;
pub mod weights;

pub use error::FrameError;
pub use limits::{
    Limits, DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_POSITIONS,
    MAX_HANDSHAKE_MESSAGE_BYTES,
};

/// The code generated from `pipeline.proto`: messages, and the `Auth` and `Pipeline`
/// clients and servers. Apply the size limits with `with_limits` (`Pipeline`) and
/// `with_handshake_limits` (`Auth`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("hearth.v1");
}
