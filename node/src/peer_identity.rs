//! Knowing whom an address reaches.
//!
//! An address is not a node: a peer's old address may now belong to another machine,
//! and another node's loopback is this node's own. So before a connection carries
//! anything for a peer, and on every probe of a path to it, the other end proves its
//! node id: it signs a fresh nonce of the caller's with its identity key (see
//! [`hearth_proto::probe`]), and the caller checks the signature against the node id it
//! meant to reach. An answer from anyone else is "not this peer", whatever the address.
//!
//! This holds with or without a cluster key: the key's handshake proves membership of
//! the cluster, this proves which member.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Mutex;

use hearth_mesh::identity::Identity;
use hearth_proto::probe::{identity_transcript, IdentityProof, NONCE_LEN, SIGNATURE_LEN};
use libp2p_identity::PublicKey;
use rand::Rng as _;

/// Why an answer does not come from the node meant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotThePeer {
    #[error("it gave no proof of identity (not a Hearth node, or one too old to give one)")]
    NoProof,
    #[error("its public key is not a valid identity key")]
    MalformedKey,
    #[error("node {answered} answered instead")]
    OtherNode { answered: String },
    #[error("its signature does not cover this probe's nonce (replayed or forged)")]
    BadSignature,
}

/// A fresh nonce to challenge the other end with.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0; NONCE_LEN];
    rand::rng().fill(&mut nonce);
    nonce
}

/// This node's answer to a challenge: `None` only if signing failed, which an Ed25519
/// key never does.
pub fn prove(identity: &Identity, nonce: &[u8; NONCE_LEN]) -> Option<IdentityProof> {
    let signature = identity.keypair().sign(&identity_transcript(nonce)).ok()?;
    let signature: [u8; SIGNATURE_LEN] = signature.try_into().ok()?;
    Some(IdentityProof { public_key: identity.keypair().public().encode_protobuf().into(), signature })
}

/// Whether `proof` shows that the node with id `expected` answered the challenge `nonce`.
pub fn check(expected: &str, nonce: &[u8; NONCE_LEN], proof: Option<&IdentityProof>) -> Result<(), NotThePeer> {
    let proof = proof.ok_or(NotThePeer::NoProof)?;
    let key = PublicKey::try_decode_protobuf(&proof.public_key).map_err(|_| NotThePeer::MalformedKey)?;
    let answered = key.to_peer_id().to_base58();
    if answered != expected {
        return Err(NotThePeer::OtherNode { answered });
    }
    if !key.verify(&identity_transcript(nonce), &proof.signature) {
        return Err(NotThePeer::BadSignature);
    }
    Ok(())
}

/// Distinct refusals remembered for [`warn_once`]; past this, refusals log again.
const MAX_REMEMBERED_REFUSALS: usize = 1024;

/// Logs, once per address and answer, that `addr` does not reach `expected`: a path is
/// probed several times a second, and one warning says it all.
pub fn warn_once(addr: SocketAddr, expected: &str, why: &NotThePeer) {
    static WARNED: Mutex<Option<HashSet<(SocketAddr, String, String)>>> = Mutex::new(None);
    let mut warned = WARNED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let warned = warned.get_or_insert_with(HashSet::new);
    if warned.len() >= MAX_REMEMBERED_REFUSALS {
        warned.clear();
    }
    if warned.insert((addr, expected.to_string(), why.to_string())) {
        tracing::warn!("the node at {addr} is not {expected}: {why}; this address is not used as a path to it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_right_node_is_accepted() {
        let node = Identity::generate();
        let nonce = nonce();
        let proof = prove(&node, &nonce);
        assert_eq!(check(&node.node_id().to_string(), &nonce, proof.as_ref()), Ok(()));
    }

    #[test]
    fn another_node_is_refused_and_named() {
        let (meant, impostor) = (Identity::generate(), Identity::generate());
        let nonce = nonce();
        let proof = prove(&impostor, &nonce);
        assert_eq!(
            check(&meant.node_id().to_string(), &nonce, proof.as_ref()),
            Err(NotThePeer::OtherNode { answered: impostor.node_id().to_string() })
        );
    }

    #[test]
    fn a_proof_for_another_nonce_is_refused() {
        let node = Identity::generate();
        let id = node.node_id().to_string();
        let (first, second) = (nonce(), nonce());
        assert_ne!(first, second);
        // Replayed: a proof recorded for an earlier challenge.
        let recorded = prove(&node, &first);
        assert_eq!(check(&id, &second, recorded.as_ref()), Err(NotThePeer::BadSignature));
    }

    #[test]
    fn forged_and_missing_proofs_are_refused() {
        let node = Identity::generate();
        let id = node.node_id().to_string();
        let nonce = nonce();
        let genuine = prove(&node, &nonce).expect("an Ed25519 key signs");
        // The meant node's key with any other signature: flipped bits, or all zeros.
        for byte in [0, 31, 63] {
            let mut forged = genuine.clone();
            forged.signature[byte] ^= 0x01;
            assert_eq!(check(&id, &nonce, Some(&forged)), Err(NotThePeer::BadSignature));
        }
        let zeros = IdentityProof { signature: [0; SIGNATURE_LEN], ..genuine.clone() };
        assert_eq!(check(&id, &nonce, Some(&zeros)), Err(NotThePeer::BadSignature));
        // The impostor's signature under the meant node's key.
        let impostor = prove(&Identity::generate(), &nonce).expect("signs");
        let borrowed = IdentityProof { public_key: genuine.public_key.clone(), signature: impostor.signature };
        assert_eq!(check(&id, &nonce, Some(&borrowed)), Err(NotThePeer::BadSignature));
        // No proof, or a key that is no key.
        assert_eq!(check(&id, &nonce, None), Err(NotThePeer::NoProof));
        let garbage = IdentityProof { public_key: vec![1; 36].into(), signature: genuine.signature };
        assert_eq!(check(&id, &nonce, Some(&garbage)), Err(NotThePeer::MalformedKey));
    }
}
