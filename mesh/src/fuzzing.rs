//! Entry points for the fuzz targets in `fuzz/`, and for the stable tests that replay
//! their corpus (`tests/fuzz_corpus.rs`).
//!
//! Each function takes whatever bytes a stranger on the link could send, runs them
//! through the same parsing and checks a node does, and panics only if those broke one
//! of their promises: a panic here is a bug, whatever the input. Not part of the crate's
//! API.

use std::net::{IpAddr, Ipv4Addr};

use libp2p::PeerId;
use libp2p::identity::Keypair;

use crate::control::wire;
use crate::discovery::PeerAdvert;

/// The address the fuzzed adverts arrive from.
const ADVERT_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

/// The signer of every fuzzed gossip message: a fixed key, so that the corpus can hold
/// messages that speak for their sender and so reach the deepest checks.
pub fn gossip_author() -> PeerId {
    // A 32-byte secret is always a valid Ed25519 key.
    let secret = [7u8; 32];
    match Keypair::ed25519_from_bytes(secret) {
        Ok(keypair) => keypair.public().to_peer_id(),
        Err(error) => panic!("a fixed 32-byte Ed25519 secret was refused: {error}"),
    }
}

/// An mDNS TXT record's data as it arrives: strings of one length byte and that many
/// bytes, each `key=value` or a bare `key` (RFC 6763 §6).
pub fn txt_record(data: &[u8]) {
    let props = txt_strings(data).map(|string| match string.iter().position(|&b| b == b'=') {
        Some(eq) => (String::from_utf8_lossy(&string[..eq]), &string[eq + 1..]),
        None => (String::from_utf8_lossy(string), &[][..]),
    });
    let Ok(advert) = PeerAdvert::from_txt(props, vec![ADVERT_ADDRESS]) else { return };
    // An accepted advert is one this node could have published, word for word.
    let txt = advert.to_txt();
    assert!(txt.iter().all(|(key, value)| key.len() + 1 + value.len() <= 255));
    let again = PeerAdvert::from_txt(txt.iter().map(|(k, v)| (k, v.as_bytes())), vec![ADVERT_ADDRESS]);
    assert_eq!(again, Ok(advert), "an accepted advert did not survive its own TXT record");
}

/// The strings of TXT record data; a last string cut short ends them.
fn txt_strings(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (&len, rest) = data.split_first()?;
        let string = rest.get(..usize::from(len))?;
        data = &rest[usize::from(len)..];
        Some(string)
    })
}

/// A gossip message signed by [`gossip_author`].
pub fn gossip(data: &[u8]) {
    let author = gossip_author();
    let Ok((from, body)) = wire::decode(Some(&author), data) else { return };
    assert_eq!(from, author);
    // What a node accepts, it would also send, and its peers would accept that.
    let encoded = match wire::encode(&body) {
        Ok(encoded) => encoded,
        Err(error) => panic!("an accepted message cannot be encoded again: {error}"),
    };
    assert!(encoded.len() <= wire::MAX_MESSAGE_BYTES);
    match wire::decode(Some(&author), &encoded) {
        Ok((_, again)) => assert_eq!(again, body, "an accepted message changed on its way through the wire"),
        Err(error) => panic!("an accepted message was refused once encoded again: {error}"),
    }
}
