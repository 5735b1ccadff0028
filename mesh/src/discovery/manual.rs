//! Peers named by hand (`--peer ADDR`), for links where multicast does not get
//! through: a firewall, a Wi-Fi that isolates clients, a system mDNS daemon that
//! holds the port.
//!
//! A manual peer is only an address until the control plane reaches it and learns the
//! same key/value advert mDNS would have carried; [`ManualPeer::advert`] turns that
//! into a [`PeerAdvert`], and [`Discovery::add_peer`](super::Discovery::add_peer)
//! reports it as any other [`DiscoveryEvent::Found`](super::DiscoveryEvent::Found).

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use super::advert::{AdvertError, PeerAdvert};

/// Longest DNS name (RFC 1035).
const MAX_HOSTNAME_LEN: usize = 253;

/// A peer's control plane address as given on the command line: `ip:port`,
/// `[ipv6]:port` or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ManualPeer {
    host: PeerHost,
    port: u16,
}

/// The host part of a [`ManualPeer`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerHost {
    Ip(IpAddr),
    /// A DNS name, checked for shape but not resolved until it is dialled.
    Name(String),
}

/// Why a `--peer` value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManualPeerError {
    #[error("peer address {0:?} has no port; write it as host:port, e.g. 192.168.1.20:7700")]
    MissingPort(String),

    #[error("peer address {0:?} has an invalid port; use a number from 1 to 65535")]
    InvalidPort(String),

    #[error("peer address {0:?}: write an IPv6 address in brackets, e.g. [fd00::2]:7700")]
    UnbracketedIpv6(String),

    #[error("peer address {0:?} has an invalid host; use an IP address or a host name")]
    InvalidHost(String),
}

impl ManualPeer {
    pub fn host(&self) -> &PeerHost {
        &self.host
    }

    /// The peer's control plane port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket addresses to dial: the address itself, or what the name resolves
    /// to.
    pub async fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        match &self.host {
            PeerHost::Ip(ip) => Ok(vec![SocketAddr::new(*ip, self.port)]),
            PeerHost::Name(name) => Ok(tokio::net::lookup_host((name.as_str(), self.port))
                .await?
                .collect()),
        }
    }

    /// The advert of this peer, from the key/value pairs it sent over the control
    /// plane (the same pairs as its mDNS TXT record) once dialled at `address`.
    ///
    /// The peer must advertise the control port it was dialled at: anything else means
    /// the address leads somewhere other than where the peer believes it listens.
    pub fn advert<K, V>(
        &self,
        props: impl IntoIterator<Item = (K, V)>,
        address: IpAddr,
    ) -> Result<PeerAdvert, AdvertError>
    where
        K: AsRef<str>,
        V: AsRef<[u8]>,
    {
        let advert = PeerAdvert::from_txt(props, vec![address])?;
        if advert.control_port != self.port {
            return Err(AdvertError::ControlPortMismatch {
                dialled: self.port,
                advertised: advert.control_port,
            });
        }
        Ok(advert)
    }
}

impl FromStr for ManualPeer {
    type Err = ManualPeerError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let owned = || input.to_owned();
        let (host, port) = if let Some(rest) = input.strip_prefix('[') {
            let (ip, port) = rest
                .split_once("]:")
                .ok_or_else(|| ManualPeerError::MissingPort(owned()))?;
            let ip = ip
                .parse()
                .ok()
                .filter(IpAddr::is_ipv6)
                .ok_or_else(|| ManualPeerError::InvalidHost(owned()))?;
            (PeerHost::Ip(ip), port)
        } else {
            let (host, port) = input
                .rsplit_once(':')
                .ok_or_else(|| ManualPeerError::MissingPort(owned()))?;
            if host.contains(':') {
                // `fd00::2:7700` and `fd00::2` are both whole IPv6 addresses: brackets
                // are the only way to tell the port apart.
                let ipv6 = input.parse::<Ipv6Addr>().is_ok() || host.parse::<Ipv6Addr>().is_ok();
                return Err(if ipv6 {
                    ManualPeerError::UnbracketedIpv6(owned())
                } else {
                    ManualPeerError::InvalidHost(owned())
                });
            }
            let host = match host.parse::<IpAddr>() {
                Ok(ip) => PeerHost::Ip(ip),
                Err(_) if is_hostname(host) => PeerHost::Name(host.to_owned()),
                Err(_) => return Err(ManualPeerError::InvalidHost(owned())),
            };
            (host, port)
        };
        let port = parse_port(port).ok_or_else(|| ManualPeerError::InvalidPort(owned()))?;
        Ok(Self { host, port })
    }
}

impl fmt::Display for ManualPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            PeerHost::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            PeerHost::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

fn parse_port(port: &str) -> Option<u16> {
    // `u16::from_str` also takes a leading `+`.
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok().filter(|&port| port != 0)
}

/// RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
/// A single trailing dot (the fully qualified form) is allowed.
fn is_hostname(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= MAX_HOSTNAME_LEN
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        // All digits would be a malformed IPv4 address, not a name.
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}
