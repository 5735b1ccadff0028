//! The peers discovery currently knows, and the events still owed to the node.
//!
//! Pure state, no I/O: everything that decides which adverts become which events
//! (cluster filtering, our own echo, duplicate ids, coalescing) lives here so it can be
//! tested without a network.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use super::advert::{ClusterHash, PeerAdvert};
use super::DiscoveryEvent;
use crate::NodeId;

/// Bounds the memory a flood of forged adverts can make us spend. Far beyond any
/// home or lab cluster.
const MAX_PEERS: usize = 1024;

/// Where an advert came from; one node may be known through several.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Source {
    /// An mDNS service instance, by its full name.
    Mdns(String),
    /// A peer the control plane reached through `--peer`.
    Manual(NodeId),
}

#[derive(Debug)]
pub(super) struct PeerTable {
    own_id: NodeId,
    cluster: ClusterHash,
    peers: HashMap<Source, PeerAdvert>,
    /// Foreign addresses last reported for adverts carrying our own id, so a
    /// re-announcement does not raise the alarm again.
    duplicates: HashMap<Source, Vec<IpAddr>>,
    /// Events not yet delivered. Coalesced per node, so however long the node stops
    /// reading, this holds at most one event per known peer.
    pending: VecDeque<DiscoveryEvent>,
}

impl PeerTable {
    pub(super) fn new(own_id: NodeId, cluster: ClusterHash) -> Self {
        Self {
            own_id,
            cluster,
            peers: HashMap::new(),
            duplicates: HashMap::new(),
            pending: VecDeque::new(),
        }
    }

    /// Records what `source` now advertises. `is_local` tells whether an address
    /// belongs to this machine; it is asked only about adverts carrying our own id.
    pub(super) fn upsert(
        &mut self,
        source: Source,
        advert: PeerAdvert,
        is_local: &mut dyn FnMut(&IpAddr) -> bool,
    ) {
        if advert.cluster_hash != self.cluster {
            tracing::debug!(node_id = %advert.node_id, cluster = %advert.cluster_hash, "ignoring a node of another cluster");
            self.remove(&source);
            return;
        }

        if advert.node_id == self.own_id {
            // Whatever the source said before, it now speaks with our id.
            self.forget_peer(&source);
            let foreign: Vec<IpAddr> = advert
                .addresses
                .iter()
                .copied()
                .filter(|ip| !is_local(ip))
                .collect();
            if foreign.is_empty() {
                // Our own advert, heard back through multicast loopback.
                return;
            }
            if self.duplicates.get(&source) != Some(&foreign) {
                tracing::warn!(node_id = %advert.node_id, addresses = ?foreign, "another machine advertises this node's id");
                self.duplicates.insert(source, foreign.clone());
                self.push(DiscoveryEvent::DuplicateId { addresses: foreign });
            }
            return;
        }

        self.duplicates.remove(&source);
        if self.peers.len() >= MAX_PEERS && !self.peers.contains_key(&source) {
            tracing::warn!(node_id = %advert.node_id, "ignoring a node: already tracking {MAX_PEERS}");
            return;
        }
        let previous = self.peers.insert(source, advert.clone());
        if previous.as_ref() == Some(&advert) {
            // mDNS re-resolves on every refresh; only changes are news.
            return;
        }
        if let Some(previous) = previous {
            if previous.node_id != advert.node_id {
                self.lost_if_gone(previous.node_id);
            }
        }
        self.push(DiscoveryEvent::Found(advert));
    }

    /// `source` no longer advertises anything.
    pub(super) fn remove(&mut self, source: &Source) {
        self.duplicates.remove(source);
        self.forget_peer(source);
    }

    fn forget_peer(&mut self, source: &Source) {
        if let Some(gone) = self.peers.remove(source) {
            self.lost_if_gone(gone.node_id);
        }
    }

    /// The mDNS instances through which `node_id` is known.
    pub(super) fn mdns_names(&self, node_id: &NodeId) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(_, advert)| advert.node_id == *node_id)
            .filter_map(|(source, _)| match source {
                Source::Mdns(name) => Some(name.clone()),
                Source::Manual(_) => None,
            })
            .collect()
    }

    pub(super) fn pending(&mut self) -> &mut VecDeque<DiscoveryEvent> {
        &mut self.pending
    }

    /// A node is lost only when no source vouches for it any more.
    fn lost_if_gone(&mut self, node_id: NodeId) {
        if !self.peers.values().any(|advert| advert.node_id == node_id) {
            self.push(DiscoveryEvent::Lost(node_id));
        }
    }

    /// Queues `event`, replacing any undelivered event about the same node: only
    /// the latest state matters, and this keeps the queue bounded.
    fn push(&mut self, event: DiscoveryEvent) {
        self.pending.retain(|queued| !supersedes(&event, queued));
        self.pending.push_back(event);
    }
}

fn supersedes(new: &DiscoveryEvent, old: &DiscoveryEvent) -> bool {
    use DiscoveryEvent::*;
    match (new, old) {
        (DuplicateId { .. }, DuplicateId { .. }) => true,
        (Found(_) | Lost(_), Found(_) | Lost(_)) => new.node_id() == old.node_id(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Backend;
    use libp2p_identity::PeerId;

    fn node() -> NodeId {
        NodeId(PeerId::random().to_base58())
    }

    fn advert(node_id: &NodeId, cluster: &str, ip: &str) -> PeerAdvert {
        PeerAdvert {
            node_id: node_id.clone(),
            addresses: vec![ip.parse().unwrap()],
            control_port: 7700,
            data_port: 7701,
            api_port: 8080,
            usable_memory_bytes: 1 << 30,
            backend: Backend::Cpu,
            cluster_hash: ClusterHash::of(cluster),
        }
    }

    fn mdns(name: &str) -> Source {
        Source::Mdns(name.to_owned())
    }

    fn drain(table: &mut PeerTable) -> Vec<DiscoveryEvent> {
        table.pending().drain(..).collect()
    }

    const LOCAL: &str = "192.0.2.2";

    fn is_local(ip: &IpAddr) -> bool {
        *ip == LOCAL.parse::<IpAddr>().unwrap()
    }

    #[test]
    fn found_once_then_only_on_change_then_lost() {
        let (me, peer) = (node(), node());
        let mut table = PeerTable::new(me, ClusterHash::of("home"));
        let a = advert(&peer, "home", "192.0.2.7");

        table.upsert(mdns("a"), a.clone(), &mut is_local);
        table.upsert(mdns("a"), a.clone(), &mut is_local);
        assert_eq!(drain(&mut table), vec![DiscoveryEvent::Found(a.clone())]);

        let more = PeerAdvert {
            usable_memory_bytes: 2 << 30,
            ..a
        };
        table.upsert(mdns("a"), more.clone(), &mut is_local);
        assert_eq!(drain(&mut table), vec![DiscoveryEvent::Found(more)]);

        table.remove(&mdns("a"));
        table.remove(&mdns("a"));
        assert_eq!(drain(&mut table), vec![DiscoveryEvent::Lost(peer)]);
    }

    #[test]
    fn other_clusters_are_filtered() {
        let mut table = PeerTable::new(node(), ClusterHash::of("home"));
        table.upsert(
            mdns("a"),
            advert(&node(), "work", "192.0.2.7"),
            &mut is_local,
        );
        assert_eq!(drain(&mut table), vec![]);
    }

    #[test]
    fn our_own_echo_is_silent_but_our_id_elsewhere_is_a_duplicate() {
        let me = node();
        let mut table = PeerTable::new(me.clone(), ClusterHash::of("home"));
        table.upsert(mdns("me"), advert(&me, "home", LOCAL), &mut is_local);
        assert_eq!(drain(&mut table), vec![]);

        let copy = advert(&me, "home", "192.0.2.9");
        table.upsert(mdns("me (2)"), copy.clone(), &mut is_local);
        assert_eq!(
            drain(&mut table),
            vec![DiscoveryEvent::DuplicateId {
                addresses: vec!["192.0.2.9".parse().unwrap()]
            }]
        );
        // Re-announcements of the same duplicate don't raise the alarm again...
        table.upsert(mdns("me (2)"), copy.clone(), &mut is_local);
        assert_eq!(drain(&mut table), vec![]);
        // ...but the duplicate coming back after leaving does.
        table.remove(&mdns("me (2)"));
        table.upsert(mdns("me (2)"), copy, &mut is_local);
        assert_eq!(drain(&mut table).len(), 1);
    }

    #[test]
    fn a_node_known_twice_is_lost_only_when_both_sources_go() {
        let peer = node();
        let mut table = PeerTable::new(node(), ClusterHash::of("home"));
        let a = advert(&peer, "home", "192.0.2.7");
        table.upsert(mdns("a"), a.clone(), &mut is_local);
        table.upsert(Source::Manual(peer.clone()), a, &mut is_local);
        drain(&mut table);

        table.remove(&mdns("a"));
        assert_eq!(drain(&mut table), vec![]);
        table.remove(&Source::Manual(peer.clone()));
        assert_eq!(drain(&mut table), vec![DiscoveryEvent::Lost(peer)]);
    }

    #[test]
    fn a_source_that_turns_malformed_or_foreign_loses_its_node() {
        let peer = node();
        let mut table = PeerTable::new(node(), ClusterHash::of("home"));
        table.upsert(mdns("a"), advert(&peer, "home", "192.0.2.7"), &mut is_local);
        table.upsert(mdns("a"), advert(&peer, "work", "192.0.2.7"), &mut is_local);
        assert_eq!(drain(&mut table).last(), Some(&DiscoveryEvent::Lost(peer)));
    }

    #[test]
    fn undelivered_events_coalesce_per_node() {
        let (p, q) = (node(), node());
        let mut table = PeerTable::new(node(), ClusterHash::of("home"));
        for round in 0..100u64 {
            let a = PeerAdvert {
                usable_memory_bytes: round,
                ..advert(&p, "home", "192.0.2.7")
            };
            table.upsert(mdns("p"), a, &mut is_local);
            table.upsert(mdns("q"), advert(&q, "home", "192.0.2.8"), &mut is_local);
            table.remove(&mdns("q"));
        }
        let events = drain(&mut table);
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(&events[0], DiscoveryEvent::Found(a) if a.usable_memory_bytes == 99));
        assert_eq!(events[1], DiscoveryEvent::Lost(q));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut table = PeerTable::new(node(), ClusterHash::of("home"));
        for i in 0..MAX_PEERS + 10 {
            table.upsert(
                mdns(&i.to_string()),
                advert(&node(), "home", "192.0.2.7"),
                &mut is_local,
            );
        }
        assert_eq!(table.peers.len(), MAX_PEERS);
        assert_eq!(table.pending().len(), MAX_PEERS);
    }
}
