//! The path probe, and the proof of identity it can carry.
//!
//! A probe measures a path; with a fresh nonce it also says *whom* the path reaches. The
//! answering node signs [`identity_transcript`] of the nonce with its Ed25519 identity
//! key and sends the signature with its public key ([`IdentityProof`]); the prober
//! checks that the key is the node id it meant to reach and that the signature is good.
//! This crate only carries and bounds the proof; checking it takes the node's keys.

use bytes::Bytes;

use crate::error::check_len_range;
use crate::{pb, FrameError};

/// The length of a probe's nonce.
pub const NONCE_LEN: usize = 32;

/// The length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// The longest public key accepted: an Ed25519 key in libp2p's protobuf encoding takes
/// 36 bytes.
pub const MAX_PUBLIC_KEY_BYTES: usize = 64;

/// Separates these signatures from anything else a node signs with its identity key.
const IDENTITY_LABEL: &[u8] = b"hearth.v1 identity";

/// Whether a received probe asks for a proof of identity: its nonce, if it carries one.
/// Refuses a nonce of any length but 0 or [`NONCE_LEN`].
pub fn challenge_from_wire(request: &pb::ProbeRequest) -> Result<Option<[u8; NONCE_LEN]>, FrameError> {
    if request.nonce.is_empty() {
        return Ok(None);
    }
    fixed("nonce", &request.nonce).map(Some)
}

/// What the answering node proves itself with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityProof {
    /// Its public key, in libp2p's protobuf encoding; 1 to [`MAX_PUBLIC_KEY_BYTES`] bytes.
    pub public_key: Bytes,
    /// Its signature over [`identity_transcript`] of the probe's nonce.
    pub signature: [u8; SIGNATURE_LEN],
}

/// A validated probe reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeAnswer {
    pub received_bytes: u64,
    /// `None` when the reply carries no proof (the probe asked for none, or the node
    /// cannot give one).
    pub proof: Option<IdentityProof>,
}

impl ProbeAnswer {
    /// Checks a received reply: no proof at all (both fields empty), or a public key of
    /// 1 to [`MAX_PUBLIC_KEY_BYTES`] bytes with a [`SIGNATURE_LEN`]-byte signature.
    pub fn from_wire(reply: pb::ProbeReply) -> Result<Self, FrameError> {
        let pb::ProbeReply { received_bytes, public_key, signature } = reply;
        if public_key.is_empty() && signature.is_empty() {
            return Ok(Self { received_bytes, proof: None });
        }
        check_len_range("public key", public_key.len(), 1, MAX_PUBLIC_KEY_BYTES)?;
        let signature = fixed("signature", &signature)?;
        Ok(Self { received_bytes, proof: Some(IdentityProof { public_key, signature }) })
    }

    pub fn into_wire(self) -> pb::ProbeReply {
        let (public_key, signature) = match self.proof {
            Some(proof) => (proof.public_key, Bytes::copy_from_slice(&proof.signature)),
            None => (Bytes::new(), Bytes::new()),
        };
        pb::ProbeReply { received_bytes: self.received_bytes, public_key, signature }
    }
}

/// The bytes an [`IdentityProof`] signs: the label `hearth.v1 identity`, then the nonce.
///
/// The address the node was reached at is left out on purpose: behind a NAT or a port
/// forward it cannot know that address, and the question is only whether the path leads
/// to it. The fresh nonce makes each proof good for one probe only.
pub fn identity_transcript(nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(IDENTITY_LABEL.len() + NONCE_LEN);
    bytes.extend_from_slice(IDENTITY_LABEL);
    bytes.extend_from_slice(nonce);
    bytes
}

/// Copies a fixed-length field, refusing any other length.
fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N], FrameError> {
    bytes.try_into().map_err(|_| FrameError::WrongLength { field, got: bytes.len(), expected: N })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_asks_for_a_proof_with_a_full_nonce_only() {
        let probe = |nonce: &'static [u8]| pb::ProbeRequest { payload: Bytes::new(), nonce: Bytes::from_static(nonce) };
        assert_eq!(challenge_from_wire(&probe(&[])), Ok(None));
        assert_eq!(challenge_from_wire(&probe(&[7; NONCE_LEN])), Ok(Some([7; NONCE_LEN])));
        assert_eq!(
            challenge_from_wire(&probe(&[7; 31])),
            Err(FrameError::WrongLength { field: "nonce", got: 31, expected: NONCE_LEN })
        );
    }

    #[test]
    fn answers_round_trip_and_malformed_proofs_are_refused() {
        let proof = IdentityProof { public_key: Bytes::from_static(&[1; 36]), signature: [2; SIGNATURE_LEN] };
        for answer in [
            ProbeAnswer { received_bytes: 9, proof: None },
            ProbeAnswer { received_bytes: 0, proof: Some(proof) },
        ] {
            assert_eq!(ProbeAnswer::from_wire(answer.clone().into_wire()), Ok(answer));
        }
        let reply = |public_key: &'static [u8], signature: &'static [u8]| pb::ProbeReply {
            received_bytes: 0,
            public_key: Bytes::from_static(public_key),
            signature: Bytes::from_static(signature),
        };
        assert_eq!(
            ProbeAnswer::from_wire(reply(&[], &[0; SIGNATURE_LEN])),
            Err(FrameError::LengthOutOfRange { field: "public key", got: 0, min: 1, max: MAX_PUBLIC_KEY_BYTES })
        );
        assert_eq!(
            ProbeAnswer::from_wire(reply(&[1; 65], &[0; SIGNATURE_LEN])),
            Err(FrameError::LengthOutOfRange { field: "public key", got: 65, min: 1, max: MAX_PUBLIC_KEY_BYTES })
        );
        assert_eq!(
            ProbeAnswer::from_wire(reply(&[1; 36], &[0; 63])),
            Err(FrameError::WrongLength { field: "signature", got: 63, expected: SIGNATURE_LEN })
        );
    }

    #[test]
    fn the_transcript_is_the_label_then_the_nonce() {
        let mut expected = b"hearth.v1 identity".to_vec();
        expected.extend_from_slice(&[3; NONCE_LEN]);
        assert_eq!(identity_transcript(&[3; NONCE_LEN]), expected);
        assert_ne!(identity_transcript(&[3; NONCE_LEN]), identity_transcript(&[4; NONCE_LEN]));
    }
}
