//! Control links that carry gossip one way only, and when to make them anew.
//!
//! Gossipsub tells a peer which topics a node is subscribed to once per peer, on the
//! first connection between them, and publishes only to peers it knows are subscribed.
//! When a node's address moves, its old connections die and it dials again from the new
//! address; if the other side still counts a dead connection when the new one arrives,
//! it takes the new one for a second connection and says nothing on it, while the mover,
//! whose old connections are gone, saw a first connection and forgot the other's
//! subscription. From then on the mover hears the other node but never publishes to it,
//! for as long as the connection lasts: the cluster splits in two while every link is up.
//!
//! The node that hears a peer it does not know to be subscribed is the one that cannot be
//! heard, so it is the one to notice. Over a single connection a subscription comes before
//! any message, so one message is proof; over several, a subscription sent on another may
//! arrive late, so it waits a grace period. Then it drops every connection to the peer and
//! dials it again, and a connection made with none left on either side exchanges
//! subscriptions.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How long a peer with several connections may be heard without its subscription
/// before its links are made anew: room for a subscription sent on another connection
/// to arrive late. Announcements come every 500 ms, so this is about a second.
pub(super) const GRACE: Duration = Duration::from_millis(700);

/// Peers heard while gossipsub does not list them as subscribed, and those whose
/// connections are being closed to start afresh. Time is passed in.
#[derive(Debug)]
pub(super) struct OneWayLinks<P> {
    heard_unsubscribed_since: HashMap<P, Instant>,
    resetting: HashSet<P>,
}

impl<P: Copy + Eq + Hash> OneWayLinks<P> {
    pub(super) fn new() -> Self {
        Self {
            heard_unsubscribed_since: HashMap::new(),
            resetting: HashSet::new(),
        }
    }

    /// A message came from `peer`, which gossipsub lists as `subscribed` or not, over
    /// one of its `connections`. Returns whether to drop the peer's connections and dial
    /// it again now. (Should the peer still count a dead connection when it is dialled,
    /// the new one is again not a first one for it; its pings close the dead one within
    /// about a second, and the next reset works.)
    pub(super) fn heard(
        &mut self,
        peer: P,
        subscribed: bool,
        connections: usize,
        now: Instant,
    ) -> bool {
        if subscribed {
            self.heard_unsubscribed_since.remove(&peer);
            return false;
        }
        if self.resetting.contains(&peer) {
            return false;
        }
        let since = *self.heard_unsubscribed_since.entry(peer).or_insert(now);
        if connections > 1 && now.saturating_duration_since(since) < GRACE {
            return false;
        }
        self.heard_unsubscribed_since.remove(&peer);
        self.resetting.insert(peer);
        true
    }

    /// The peer's subscription arrived.
    pub(super) fn subscribed(&mut self, peer: P) {
        self.heard_unsubscribed_since.remove(&peer);
    }

    /// The last connection to `peer` closed. Returns whether it was being made anew,
    /// in which case it is to be dialled now.
    pub(super) fn disconnected(&mut self, peer: P) -> bool {
        self.heard_unsubscribed_since.remove(&peer);
        self.resetting.remove(&peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_heard_without_its_subscription_is_reset_after_the_grace_period_once() {
        let start = Instant::now();
        let mut links = OneWayLinks::new();
        assert!(!links.heard(1, false, 2, start));
        assert!(!links.heard(1, false, 2, start + GRACE / 2));
        assert!(links.heard(1, false, 2, start + GRACE));
        // While its connections close, more of its messages change nothing.
        assert!(!links.heard(1, false, 2, start + GRACE * 3));
        assert!(links.disconnected(1));
        // A later disconnection was not asked for.
        assert!(!links.disconnected(1));
    }

    #[test]
    fn a_subscription_that_arrives_within_the_grace_period_cancels_the_reset() {
        let start = Instant::now();
        let mut links = OneWayLinks::new();
        assert!(!links.heard(1, false, 2, start));
        links.subscribed(1);
        // Heard again without one much later: the grace period starts over.
        assert!(!links.heard(1, false, 2, start + GRACE * 2));
        assert!(!links.heard(1, true, 2, start + GRACE * 3));
        assert!(!links.heard(1, false, 2, start + GRACE * 4));
        assert!(links.heard(1, false, 2, start + GRACE * 5));
    }

    #[test]
    fn peers_are_judged_apart_and_a_subscribed_peer_never_resets() {
        let start = Instant::now();
        let mut links = OneWayLinks::new();
        for step in 0..10 {
            assert!(!links.heard(2, true, 2, start + GRACE * step));
        }
        assert!(!links.heard(1, false, 2, start));
        assert!(links.heard(1, false, 2, start + GRACE));
        assert!(!links.disconnected(2));
    }

    #[test]
    fn over_a_single_connection_one_message_without_the_subscription_is_proof() {
        let start = Instant::now();
        let mut links = OneWayLinks::new();
        assert!(!links.heard(1, true, 1, start));
        assert!(links.heard(1, false, 1, start));
        assert!(!links.heard(1, false, 1, start));
        assert!(links.disconnected(1));
    }

    #[test]
    fn a_peer_that_left_starts_over() {
        let start = Instant::now();
        let mut links = OneWayLinks::new();
        assert!(!links.heard(1, false, 2, start));
        assert!(!links.disconnected(1));
        assert!(!links.heard(1, false, 2, start + GRACE));
    }
}
