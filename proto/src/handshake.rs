//! The messages of the `Auth.Handshake` exchange, and the transcript its proofs cover.
//!
//! Both nodes send a [`Hello`] with a fresh nonce; each then proves it holds the
//! cluster key with a [`Proof`]: HMAC-SHA256, keyed by the cluster key, of
//! [`transcript`] for its [`Role`]. The transcript covers both ids and both nonces, so a
//! proof is good for this one exchange only, and names the role, so a node's proof can
//! never be sent back to it as the other side's. The server then issues a [`Session`].
//! Compare MACs in constant time.

use bytes::Bytes;

use crate::error::check_len_range;
use crate::pb;
use crate::pb::handshake_message::Kind;
use crate::FrameError;

/// The version of the protocol this crate speaks, sent in every [`Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The length of a [`Hello`] nonce.
pub const NONCE_LEN: usize = 32;

/// The length of a [`Proof`] MAC: an HMAC-SHA256.
pub const MAC_LEN: usize = 32;

/// The gRPC metadata entry that carries a session ticket on every `Pipeline` call.
/// Binary (the `-bin` suffix): tonic base64-encodes it on the wire.
pub const SESSION_METADATA_KEY: &str = "hearth-session-bin";

/// The longest node id, in bytes.
pub const MAX_NODE_ID_BYTES: usize = 128;

/// The shortest session ticket: long enough to be unguessable.
const MIN_TICKET_BYTES: usize = 16;

/// The longest session ticket.
const MAX_TICKET_BYTES: usize = 256;

/// Separates these MACs from any other use of the cluster key.
const TRANSCRIPT_LABEL: &[u8] = b"hearth.v1 handshake";

/// A node's opening message; see [`pb::Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub node_id: String,
    /// Fresh from a cryptographically secure generator for every handshake.
    pub nonce: [u8; NONCE_LEN],
}

/// A node's proof that it holds the cluster key; see [`pb::Proof`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proof {
    pub mac: [u8; MAC_LEN],
}

/// What a server grants a client that proved itself; see [`pb::Session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Sent back under [`SESSION_METADATA_KEY`].
    pub ticket: Bytes,
    pub ttl_seconds: u32,
}

/// One validated message of a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeStep {
    Hello(Hello),
    Proof(Proof),
    Session(Session),
}

impl HandshakeStep {
    /// Checks a received message: a known kind; for a hello, this protocol version, an
    /// id of 1 to [`MAX_NODE_ID_BYTES`] bytes and a [`NONCE_LEN`]-byte nonce; for a
    /// proof, a [`MAC_LEN`]-byte MAC; for a session, a ticket of 16 to 256 bytes.
    pub fn from_wire(message: pb::HandshakeMessage) -> Result<Self, FrameError> {
        Ok(match message.kind.ok_or(FrameError::Empty)? {
            Kind::Hello(pb::Hello { protocol_version, node_id, nonce }) => {
                if protocol_version != PROTOCOL_VERSION {
                    return Err(FrameError::UnsupportedVersion {
                        got: protocol_version,
                        supported: PROTOCOL_VERSION,
                    });
                }
                check_len_range("node id", node_id.len(), 1, MAX_NODE_ID_BYTES)?;
                Self::Hello(Hello { node_id, nonce: fixed("nonce", &nonce)? })
            }
            Kind::Proof(pb::Proof { mac }) => Self::Proof(Proof { mac: fixed("MAC", &mac)? }),
            Kind::Session(pb::Session { ticket, ttl_seconds }) => {
                check_len_range(
                    "session ticket",
                    ticket.len(),
                    MIN_TICKET_BYTES,
                    MAX_TICKET_BYTES,
                )?;
                Self::Session(Session { ticket, ttl_seconds })
            }
        })
    }

    pub fn into_wire(self) -> pb::HandshakeMessage {
        let kind = match self {
            Self::Hello(Hello { node_id, nonce }) => Kind::Hello(pb::Hello {
                protocol_version: PROTOCOL_VERSION,
                node_id,
                nonce: Bytes::copy_from_slice(&nonce),
            }),
            Self::Proof(Proof { mac }) => {
                Kind::Proof(pb::Proof { mac: Bytes::copy_from_slice(&mac) })
            }
            Self::Session(Session { ticket, ttl_seconds }) => {
                Kind::Session(pb::Session { ticket, ttl_seconds })
            }
        };
        pb::HandshakeMessage { kind: Some(kind) }
    }
}

/// Which side of the handshake a proof comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The node that called `Handshake`.
    Client,
    /// The node that answered.
    Server,
}

/// The bytes a [`Proof`] from `role` MACs: the label `hearth.v1 handshake`, the role
/// (`client` or `server`), then each side's id (as a 4-byte big-endian length and
/// the UTF-8 bytes) and nonce, the client's first.
pub fn transcript(role: Role, client: &Hello, server: &Hello) -> Vec<u8> {
    let role: &[u8] = match role {
        Role::Client => b"client",
        Role::Server => b"server",
    };
    let mut bytes = Vec::with_capacity(
        TRANSCRIPT_LABEL.len()
            + role.len()
            + 2 * (4 + NONCE_LEN)
            + client.node_id.len()
            + server.node_id.len(),
    );
    bytes.extend_from_slice(TRANSCRIPT_LABEL);
    bytes.extend_from_slice(role);
    for hello in [client, server] {
        // Validated ids are at most 128 bytes; saturating keeps an oversized one (built
        // locally, never received) from wrapping into a shorter, ambiguous prefix.
        let len = u32::try_from(hello.node_id.len()).unwrap_or(u32::MAX);
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(hello.node_id.as_bytes());
        bytes.extend_from_slice(&hello.nonce);
    }
    bytes
}

/// Copies a fixed-length field, refusing any other length.
fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N], FrameError> {
    bytes.try_into().map_err(|_| FrameError::WrongLength { field, got: bytes.len(), expected: N })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(node_id: &str, nonce: u8) -> Hello {
        Hello { node_id: node_id.into(), nonce: [nonce; NONCE_LEN] }
    }

    #[test]
    fn steps_round_trip() {
        let steps = [
            HandshakeStep::Hello(hello("node-a", 7)),
            HandshakeStep::Proof(Proof { mac: [9; MAC_LEN] }),
            HandshakeStep::Session(Session { ticket: Bytes::from(vec![1; 16]), ttl_seconds: 600 }),
        ];
        for step in steps {
            assert_eq!(HandshakeStep::from_wire(step.clone().into_wire()), Ok(step));
        }
    }

    #[test]
    fn refuses_malformed_steps() {
        let wire = |kind| pb::HandshakeMessage { kind: Some(kind) };
        let good = pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: "a".into(),
            nonce: Bytes::from(vec![0; NONCE_LEN]),
        };
        let cases = [
            (pb::HandshakeMessage::default(), FrameError::Empty),
            (
                wire(Kind::Hello(pb::Hello { protocol_version: 2, ..good.clone() })),
                FrameError::UnsupportedVersion { got: 2, supported: 1 },
            ),
            (
                wire(Kind::Hello(pb::Hello { node_id: String::new(), ..good.clone() })),
                FrameError::LengthOutOfRange { field: "node id", got: 0, min: 1, max: 128 },
            ),
            (
                wire(Kind::Hello(pb::Hello { node_id: "x".repeat(129), ..good.clone() })),
                FrameError::LengthOutOfRange { field: "node id", got: 129, min: 1, max: 128 },
            ),
            (
                wire(Kind::Hello(pb::Hello { nonce: Bytes::from_static(&[0; 31]), ..good })),
                FrameError::WrongLength { field: "nonce", got: 31, expected: 32 },
            ),
            (
                wire(Kind::Proof(pb::Proof { mac: Bytes::from_static(&[0; 33]) })),
                FrameError::WrongLength { field: "MAC", got: 33, expected: 32 },
            ),
            (
                wire(Kind::Session(pb::Session {
                    ticket: Bytes::from_static(&[0; 15]),
                    ttl_seconds: 1,
                })),
                FrameError::LengthOutOfRange {
                    field: "session ticket",
                    got: 15,
                    min: 16,
                    max: 256,
                },
            ),
        ];
        for (message, error) in cases {
            assert_eq!(HandshakeStep::from_wire(message), Err(error));
        }
    }

    #[test]
    fn transcript_binds_roles_ids_and_nonces() {
        let (client, server) = (hello("ab", 1), hello("c", 2));
        let for_client = transcript(Role::Client, &client, &server);
        let mut expected = b"hearth.v1 handshakeclient".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 2]);
        expected.extend_from_slice(b"ab");
        expected.extend_from_slice(&[1; NONCE_LEN]);
        expected.extend_from_slice(&[0, 0, 0, 1]);
        expected.extend_from_slice(b"c");
        expected.extend_from_slice(&[2; NONCE_LEN]);
        assert_eq!(for_client, expected);

        assert_ne!(transcript(Role::Server, &client, &server), for_client);
        // Moving a byte from one id to the other changes the transcript: the lengths
        // keep the fields apart.
        assert_ne!(transcript(Role::Client, &hello("a", 1), &hello("bc", 2)), for_client);
    }
}
