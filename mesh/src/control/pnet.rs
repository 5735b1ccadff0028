//! The control plane's transport: TCP, then (with a cluster key) libp2p's private
//! network layer, then Noise and yamux.
//!
//! The private network layer encrypts every byte after the first 24 (each side's nonce)
//! with XSalsa20 under a key derived from the cluster key. A peer without the key
//! sends, and reads, noise: the Noise handshake that follows fails, so the connection
//! closes before the peer is authenticated, let alone heard. The cluster key itself is
//! never used as the stream key: it is derived with [`PNET_LABEL`].

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{upgrade::Version, Boxed};
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{identity, noise, tcp, yamux, PeerId, Transport as _};

use crate::cluster_key::{ClusterKey, PNET_LABEL};

/// The private network key a cluster key stands for.
pub(crate) fn pre_shared_key(key: &ClusterKey) -> PreSharedKey {
    PreSharedKey::new(key.derive(PNET_LABEL))
}

/// TCP, the private network layer when `key` is given, Noise, yamux.
pub(crate) fn transport(
    keypair: &identity::Keypair,
    key: Option<&ClusterKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let noise = noise::Config::new(keypair)?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default());
    let transport = match key {
        Some(key) => {
            let pnet = PnetConfig::new(pre_shared_key(key));
            tcp.and_then(move |socket, _| pnet.handshake(socket))
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
                .boxed()
        }
        None => tcp
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    };
    Ok(transport)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_key_is_derived_not_the_cluster_key() {
        let key = ClusterKey::from_bytes([3; 32]);
        let psk = pre_shared_key(&key);
        assert_ne!(psk.fingerprint().to_string(), PreSharedKey::new([3; 32]).fingerprint().to_string());
        assert_eq!(
            psk.fingerprint().to_string(),
            PreSharedKey::new(key.derive(b"hearth-pnet-v1")).fingerprint().to_string()
        );
    }
}
