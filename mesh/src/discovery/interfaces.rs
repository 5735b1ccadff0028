//! Which network interfaces discovery speaks mDNS on.
//!
//! Container and VM bridges lead to other containers on this same machine, never to
//! another Hearth machine, and advertising their addresses sends peers to dial
//! addresses that go nowhere. So by default they are skipped, and `--interface`
//! picks one explicitly when the guess is wrong.

use std::net::IpAddr;

use mdns_sd::{IfKind, IfPredicate};

/// Name prefixes of interfaces that are virtual plumbing on this machine.
///
/// `br-` is Docker's user-defined networks; a plain `br0` is left alone, since it is
/// often the bridge that carries a server's real LAN.
const VIRTUAL_PREFIXES: &[&str] = &[
    "docker", "br-", "veth", "virbr", "cni", "flannel", "cali", "weave", "podman", "lxc", "lxd",
    "vmnet", "utun", // macOS VPN tunnels
    "awdl", "llw", // Apple wireless direct links: peer-to-peer, not the LAN
];

/// Whether an interface named `name` can plausibly reach other Hearth machines: not
/// loopback, not a container, VM or VPN bridge.
///
/// Interfaces without an IPv4 or IPv6 address never reach this test: mDNS lists
/// interfaces by address, so they are never candidates.
pub fn usable_interface(name: &str) -> bool {
    !name.is_empty()
        && !is_loopback_name(name)
        && !VIRTUAL_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// `lo` on Linux, `lo0` on the BSDs and macOS.
fn is_loopback_name(name: &str) -> bool {
    name.strip_prefix("lo")
        .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit()))
}

/// Which interfaces to advertise and browse on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum InterfacePolicy {
    /// Every interface that [`usable_interface`] accepts.
    #[default]
    Auto,
    /// Exactly this one (`--interface NAME`), whatever its kind: naming loopback is a
    /// legitimate way to keep a test on one machine.
    Only(String),
}

impl InterfacePolicy {
    /// Whether the policy admits the interface `name`, which is loopback if
    /// `is_loopback` (the name alone does not always tell).
    pub fn allows(&self, name: &str, is_loopback: bool) -> bool {
        match self {
            Self::Auto => !is_loopback && usable_interface(name),
            Self::Only(only) => name == only,
        }
    }

    /// The selection to hand to `ServiceDaemon::disable_interface`.
    ///
    /// One predicate rather than a series of enable/disable calls: mdns-sd evaluates
    /// it again whenever interfaces come and go, so a Wi-Fi that joins later is
    /// picked up, and a Docker bridge created later stays out.
    pub(crate) fn disabled_interfaces(&self) -> IfKind {
        let policy = self.clone();
        IfKind::Predicate(IfPredicate::new(move |intf| {
            !policy.allows(&intf.name, intf.is_loopback())
        }))
    }
}

/// The address this node gives its peers: the first IPv4 address of an interface the
/// policy admits, else such an IPv6 address that is not link-local (a bare `IpAddr`
/// cannot carry a link-local scope), else `None`.
pub fn primary_address(policy: &InterfacePolicy) -> Option<IpAddr> {
    let interfaces = if_addrs::get_if_addrs().ok()?;
    let admitted: Vec<IpAddr> = interfaces
        .iter()
        .filter(|interface| policy.allows(&interface.name, interface.is_loopback()))
        .map(|interface| interface.ip())
        .collect();
    let global_v6 = |ip: &&IpAddr| matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) != 0xfe80);
    admitted.iter().find(|ip| ip.is_ipv4()).or_else(|| admitted.iter().find(global_v6)).copied()
}

/// Every address of the interfaces the policy admits, with the interface's name:
/// IPv4, and IPv6 that is not link-local. A node on several links (Wi-Fi, Ethernet, a
/// Thunderbolt bridge) is reachable on each, and peers measure them all.
pub fn local_addresses(policy: &InterfacePolicy) -> Vec<(String, IpAddr)> {
    let Ok(interfaces) = if_addrs::get_if_addrs() else { return Vec::new() };
    interfaces
        .into_iter()
        .filter(|interface| policy.allows(&interface.name, interface.is_loopback()))
        .filter(|interface| match interface.ip() {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .map(|interface| {
            let ip = interface.ip();
            (interface.name, ip)
        })
        .collect()
}

/// The name of the local interface on whose subnet `peer` lies, if any: the link a
/// connection to `peer` leaves by (a routed address has none).
pub fn interface_towards(peer: IpAddr) -> Option<String> {
    let interfaces = if_addrs::get_if_addrs().ok()?;
    interfaces.into_iter().find_map(|interface| {
        let on_link = match (&interface.addr, peer) {
            (if_addrs::IfAddr::V4(local), IpAddr::V4(peer)) => {
                let mask = u32::from(local.netmask);
                mask != 0 && u32::from(local.ip) & mask == u32::from(peer) & mask
            }
            (if_addrs::IfAddr::V6(local), IpAddr::V6(peer)) => {
                let mask = u128::from(local.netmask);
                mask != 0 && u128::from(local.ip) & mask == u128::from(peer) & mask
            }
            _ => false,
        };
        on_link.then_some(interface.name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_interfaces_are_usable() {
        for name in [
            "eth0",
            "enp3s0",
            "eno1",
            "wlan0",
            "wlp2s0",
            "en0",
            "en7",
            "br0",
            "bond0",
            "local0",
            "lo_not_loopback",
        ] {
            assert!(usable_interface(name), "{name}");
        }
    }

    #[test]
    fn loopback_and_virtual_interfaces_are_not() {
        for name in [
            "",
            "lo",
            "lo0",
            "docker0",
            "br-1a2b3c4d5e6f",
            "veth12ab",
            "virbr0",
            "cni0",
            "flannel.1",
            "cali123",
            "podman0",
            "lxcbr0",
            "lxdbr0",
            "vmnet8",
            "utun3",
            "awdl0",
            "llw0",
        ] {
            assert!(!usable_interface(name), "{name}");
        }
    }

    #[test]
    fn policy_auto_also_trusts_the_loopback_flag() {
        assert!(InterfacePolicy::Auto.allows("eth0", false));
        assert!(!InterfacePolicy::Auto.allows("weird-lo", true));
        assert!(!InterfacePolicy::Auto.allows("docker0", false));
    }

    #[test]
    fn policy_only_admits_exactly_its_interface() {
        let only = InterfacePolicy::Only("docker0".to_owned());
        assert!(only.allows("docker0", false));
        assert!(!only.allows("eth0", false));
        assert!(InterfacePolicy::Only("lo".to_owned()).allows("lo", true));
    }
}
