//! Who is in the cluster, and which plan is in force, by rules kept apart from the
//! network so that they can be tested without one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{NodeInfo, Plan};
use crate::coordinator::supersedes;

/// How long a peer heard only through other nodes stays a member without announcing
/// itself: three missed announcements. Peers connected directly are watched by ping
/// and their connection instead.
pub(crate) const RELAYED_TTL: Duration = Duration::from_millis(1500);

/// How long a directly connected peer stays a member without announcing itself. Ping
/// answers for a peer that is alive; this catches one whose gossip broke while its
/// connection did not.
pub(crate) const LINKED_TTL: Duration = Duration::from_secs(5);

/// After a goodbye, announcements the peer sent before it left may still arrive
/// through other nodes; they are ignored for this long unless the peer connects
/// again, as a restarted node does.
const DEPARTED_QUARANTINE: Duration = Duration::from_secs(3);

/// Keys cost nothing to make, so the number of peers kept is bounded.
const MAX_PEERS: usize = 1024;

/// The live members of a cluster as one node sees them, and the plan in force.
///
/// The rules:
/// - A peer becomes a member with its first announcement, if it serves this node's
///   model; peers serving another model are never members (logged once).
/// - It stops being one when it says goodbye, when its last direct connection closes
///   (or stops answering pings), or when it has not announced itself for 1.5 s while
///   not directly connected (5 s while connected).
/// - The coordinator is the member with the smallest node id (this node included).
/// - A plan is taken only from the coordinator (or, by a node with no plan yet, from
///   the plan's own author, so a newcomer that coordinates by its id learns the plan
///   in force), and only if it supersedes the plan in force (a higher epoch; on equal epochs the smaller coordinator id wins, so two
///   coordinators that briefly disagreed converge on the same plan).
///
/// Time is passed in, never read, so tests control it.
#[derive(Debug, Clone)]
pub struct Membership {
    me: NodeInfo,
    peers: BTreeMap<String, Peer>,
    /// Peers with at least one live direct connection, member or not yet.
    linked: BTreeSet<String>,
    /// Peers that said goodbye, and when.
    departed: BTreeMap<String, Instant>,
    /// Peers serving another model that were already logged.
    other_models: BTreeSet<String>,
    plan: Option<Plan>,
}

#[derive(Debug, Clone)]
struct Peer {
    info: NodeInfo,
    last_heard: Instant,
}

impl Membership {
    /// A membership of this node alone.
    pub fn new(me: NodeInfo) -> Self {
        Self {
            me,
            peers: BTreeMap::new(),
            linked: BTreeSet::new(),
            departed: BTreeMap::new(),
            other_models: BTreeSet::new(),
            plan: None,
        }
    }

    /// What this node announces about itself.
    pub fn me(&self) -> &NodeInfo {
        &self.me
    }

    /// Replaces this node's own info. Returns whether the members changed.
    ///
    /// A change of model leaves the peers serving the old one, and the plan for it.
    pub fn update_me(&mut self, me: NodeInfo) -> bool {
        if me == self.me {
            return false;
        }
        if me.model_id != self.me.model_id {
            self.peers
                .retain(|_, peer| peer.info.model_id == me.model_id);
            self.other_models.clear();
            self.plan = None;
        }
        self.me = me;
        true
    }

    /// Takes in a peer's announcement, received at `now`. Returns whether the members
    /// changed: the peer joined or its info changed.
    pub fn heard(&mut self, info: NodeInfo, now: Instant) -> bool {
        let id = info.node_id.clone();
        if id == self.me.node_id {
            return false;
        }
        if info.model_id != self.me.model_id {
            if self.other_models.len() < MAX_PEERS && self.other_models.insert(id.clone()) {
                tracing::warn!(
                    node = %id,
                    theirs = %info.model_id,
                    ours = %self.me.model_id,
                    "ignoring a node that serves another model; nodes only cluster for the same model"
                );
            }
            // A member that switched models leaves.
            return self.peers.remove(&id).is_some();
        }
        if self.departed.contains_key(&id) {
            tracing::debug!(node = %id, "ignoring an announcement sent before the node's goodbye");
            return false;
        }
        let full = self.peers.len() >= MAX_PEERS;
        match self.peers.get_mut(&id) {
            Some(peer) => {
                peer.last_heard = now;
                if peer.info == info {
                    false
                } else {
                    peer.info = info;
                    true
                }
            }
            None if full => {
                tracing::debug!(node = %id, "ignoring a node: the membership is full");
                false
            }
            None => {
                tracing::info!(node = %id, "node joined");
                self.peers.insert(
                    id,
                    Peer {
                        info,
                        last_heard: now,
                    },
                );
                true
            }
        }
    }

    /// A first direct connection to `node_id` is up. Announcements of a peer that left
    /// count again: it has come back.
    pub fn link_up(&mut self, node_id: &str) {
        self.linked.insert(node_id.to_owned());
        self.departed.remove(node_id);
    }

    /// The last direct connection to `node_id` closed or stopped answering pings.
    /// Returns whether the members changed.
    ///
    /// The peer is dropped at once even if other nodes still relay its announcements:
    /// a dead peer must be gone within a second, and a live one is back with its next
    /// relayed announcement.
    pub fn link_down(&mut self, node_id: &str) -> bool {
        self.linked.remove(node_id);
        let removed = self.peers.remove(node_id).is_some();
        if removed {
            tracing::info!(node = %node_id, "node left: connection lost");
        }
        removed
    }

    /// `node_id` said goodbye at `now`. Returns whether the members changed.
    pub fn goodbye(&mut self, node_id: &str, now: Instant) -> bool {
        if node_id == self.me.node_id {
            return false;
        }
        if self.departed.len() < MAX_PEERS {
            self.departed.insert(node_id.to_owned(), now);
        }
        let removed = self.peers.remove(node_id).is_some();
        if removed {
            tracing::info!(node = %node_id, "node left: goodbye");
        }
        removed
    }

    /// Drops the peers that have been silent too long at `now`. Returns whether the
    /// members changed.
    pub fn expire(&mut self, now: Instant) -> bool {
        self.departed
            .retain(|_, left| now.saturating_duration_since(*left) < DEPARTED_QUARANTINE);
        let before = self.peers.len();
        let linked = &self.linked;
        self.peers.retain(|id, peer| {
            let ttl = if linked.contains(id) {
                LINKED_TTL
            } else {
                RELAYED_TTL
            };
            let alive = now.saturating_duration_since(peer.last_heard) <= ttl;
            if !alive {
                tracing::info!(node = %id, "node left: silent for {ttl:?}");
            }
            alive
        });
        self.peers.len() != before
    }

    /// The live members, this node included, sorted by node id.
    pub fn members(&self) -> Vec<NodeInfo> {
        let mut members: Vec<NodeInfo> =
            self.peers.values().map(|peer| peer.info.clone()).collect();
        let at = members.partition_point(|info| info.node_id < self.me.node_id);
        members.insert(at, self.me.clone());
        members
    }

    /// Whether `node_id` is a live member (this node included).
    pub fn contains(&self, node_id: &str) -> bool {
        node_id == self.me.node_id || self.peers.contains_key(node_id)
    }

    /// The coordinator's node id: the smallest of the members'. Never empty, since this
    /// node is always a member.
    pub fn coordinator(&self) -> &str {
        match self.peers.keys().next() {
            Some(smallest) if *smallest < self.me.node_id => smallest,
            _ => &self.me.node_id,
        }
    }

    /// The plan in force: the newest taken.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// Offers a plan published by `source` (this node's own included). Returns whether
    /// it became the plan in force.
    pub fn offer_plan(&mut self, source: &str, plan: Plan) -> bool {
        // A node with no plan yet also takes the plan in force from its author, who may
        // no longer coordinate: a newcomer with the smallest id needs the plan in force
        // to take its place without stopping it.
        let from_author_to_planless =
            self.plan.is_none() && plan.coordinator == source && source != self.me.node_id;
        if plan.coordinator != source || (source != self.coordinator() && !from_author_to_planless) {
            tracing::debug!(
                from = %source,
                coordinator = %self.coordinator(),
                epoch = plan.epoch,
                "ignoring a plan from a node that is not the coordinator"
            );
            return false;
        }
        if plan.model_id != self.me.model_id {
            tracing::debug!(from = %source, model = %plan.model_id, "ignoring a plan for another model");
            return false;
        }
        if let Some(current) = &self.plan {
            if !supersedes(&plan, current) {
                // Mostly the coordinator repeating its plan; also older plans arriving late.
                tracing::trace!(from = %source, epoch = plan.epoch, "ignoring a plan that is not newer");
                return false;
            }
        }
        tracing::info!(coordinator = %source, epoch = plan.epoch, stages = plan.stages.len(), "new plan");
        self.plan = Some(plan);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::PlanStage;

    fn info(id: &str) -> NodeInfo {
        NodeInfo {
            node_id: id.into(),
            data_addr: "127.0.0.1:7001".parse().unwrap(),
            api_addr: "127.0.0.1:8001".parse().unwrap(),
            usable_memory_bytes: 1 << 30,
            backend: "cpu".into(),
            model_id: "org/model".into(),
            ready_epoch: None,
            following_epoch: None,
            data_paths: Vec::new(),
            hops: Vec::new(),
            prepared: None,
        }
    }

    fn ids(membership: &Membership) -> Vec<String> {
        membership
            .members()
            .into_iter()
            .map(|m| m.node_id)
            .collect()
    }

    fn plan(epoch: u64, coordinator: &str) -> Plan {
        Plan {
            epoch,
            coordinator: coordinator.into(),
            model_id: "org/model".into(),
            stages: vec![PlanStage {
                node_id: coordinator.into(),
                data_addr: "127.0.0.1:7001".parse().unwrap(),
                layers: 0..4,
            }],
        }
    }

    #[test]
    fn join_update_and_order() {
        let now = Instant::now();
        let mut m = Membership::new(info("m"));
        assert_eq!(ids(&m), ["m"]);
        assert!(m.heard(info("z"), now));
        assert!(m.heard(info("a"), now));
        assert_eq!(ids(&m), ["a", "m", "z"]);

        assert!(
            !m.heard(info("a"), now),
            "a repeated announcement changes nothing"
        );
        let ready = NodeInfo {
            ready_epoch: Some(3),
            ..info("a")
        };
        assert!(m.heard(ready, now));
        assert_eq!(m.members()[0].ready_epoch, Some(3));

        assert!(!m.heard(info("m"), now), "no peer speaks for this node");
    }

    #[test]
    fn coordinator_is_the_smallest_live_id() {
        let now = Instant::now();
        let mut m = Membership::new(info("m"));
        assert_eq!(m.coordinator(), "m");
        m.heard(info("z"), now);
        assert_eq!(m.coordinator(), "m");
        m.heard(info("c"), now);
        assert_eq!(m.coordinator(), "c");
        m.link_up("c");
        assert!(m.link_down("c"));
        assert_eq!(m.coordinator(), "m");
    }

    #[test]
    fn direct_peers_drop_with_their_link() {
        let now = Instant::now();
        let mut m = Membership::new(info("m"));
        m.link_up("a");
        assert!(
            !m.contains("a"),
            "a connection alone does not make a member"
        );
        m.heard(info("a"), now);
        assert!(m.link_down("a"));
        assert_eq!(ids(&m), ["m"]);
        assert!(!m.link_down("a"));
        assert!(
            m.heard(info("a"), now),
            "a live peer comes back through relays"
        );
    }

    #[test]
    fn silent_peers_expire() {
        let start = Instant::now();
        let mut m = Membership::new(info("m"));
        m.heard(info("relayed"), start);
        m.heard(info("linked"), start);
        m.link_up("linked");

        assert!(!m.expire(start + RELAYED_TTL));
        assert!(m.expire(start + RELAYED_TTL + Duration::from_millis(1)));
        assert_eq!(ids(&m), ["linked", "m"]);

        m.heard(info("linked"), start + Duration::from_secs(1));
        assert!(!m.expire(start + LINKED_TTL));
        assert!(m.expire(start + Duration::from_secs(1) + LINKED_TTL + Duration::from_millis(1)));
        assert_eq!(ids(&m), ["m"]);
    }

    #[test]
    fn goodbye_drops_at_once_and_stale_announcements_are_ignored() {
        let now = Instant::now();
        let mut m = Membership::new(info("m"));
        m.heard(info("a"), now);
        assert!(m.goodbye("a", now));
        assert!(
            !m.heard(info("a"), now),
            "a relayed announcement from before the goodbye"
        );

        m.expire(now + DEPARTED_QUARANTINE);
        assert!(m.heard(info("a"), now + DEPARTED_QUARANTINE));

        m.goodbye("a", now);
        m.link_up("a");
        assert!(
            m.heard(info("a"), now),
            "a restarted node that connects again is back at once"
        );
    }

    #[test]
    fn other_models_are_not_members() {
        let now = Instant::now();
        let mut m = Membership::new(info("m"));
        let other = NodeInfo {
            model_id: "org/other".into(),
            ..info("a")
        };
        assert!(!m.heard(other.clone(), now));
        assert_eq!(ids(&m), ["m"]);
        assert_eq!(m.coordinator(), "m", "nor can they coordinate");

        m.heard(info("a"), now);
        assert!(m.heard(other, now), "a member that switches models leaves");
        assert_eq!(ids(&m), ["m"]);
    }

    #[test]
    fn plans_come_only_from_the_coordinator_and_only_forward() {
        let now = Instant::now();
        let mut m = Membership::new(info("m"));
        m.heard(info("a"), now);

        assert!(
            !m.offer_plan("m", plan(1, "m")),
            "this node is not the coordinator"
        );
        assert!(!m.offer_plan("a", plan(1, "m")), "sent by someone else");
        // A node with no plan takes the plan in force from its author even when the
        // author no longer coordinates; once it has a plan, only from the coordinator.
        let mut planless = Membership::new(info("c"));
        planless.heard(info("b"), now);
        planless.heard(info("a"), now);
        assert!(planless.offer_plan("b", plan(2, "b")), "the author of the plan in force");
        assert!(!planless.offer_plan("b", plan(3, "b")), "not the coordinator, and a plan is in force");
        assert!(m.offer_plan("a", plan(2, "a")));
        assert!(
            !m.offer_plan("a", plan(2, "a")),
            "a repeated plan is not news"
        );
        assert!(!m.offer_plan("a", plan(1, "a")), "older");
        assert!(m.offer_plan("a", plan(3, "a")));
        assert_eq!(m.plan().map(|p| p.epoch), Some(3));

        // The coordinator leaves; this node takes over with a newer epoch.
        m.link_up("a");
        m.link_down("a");
        assert!(
            !m.offer_plan("m", plan(3, "m")),
            "the same epoch by a larger id"
        );
        assert!(m.offer_plan("m", plan(4, "m")));
    }

    #[test]
    fn equal_epochs_go_to_the_smaller_coordinator() {
        let now = Instant::now();
        let mut m = Membership::new(info("m"));
        m.heard(info("b"), now);
        assert!(m.offer_plan("b", plan(5, "b")));
        // "a" joins, becomes coordinator, and publishes the same epoch it computed
        // without having seen b's plan.
        m.heard(info("a"), now);
        assert!(m.offer_plan("a", plan(5, "a")));
        assert_eq!(m.plan().map(|p| p.coordinator.as_str()), Some("a"));
    }

    #[test]
    fn plans_for_another_model_are_ignored() {
        let mut m = Membership::new(info("a"));
        let other = Plan {
            model_id: "org/other".into(),
            ..plan(1, "a")
        };
        assert!(!m.offer_plan("a", other));
    }

    #[test]
    fn changing_model_leaves_the_old_cluster() {
        let now = Instant::now();
        let mut m = Membership::new(info("b"));
        m.heard(info("a"), now);
        assert!(m.offer_plan("a", plan(1, "a")));
        let switched = NodeInfo {
            model_id: "org/other".into(),
            ..info("b")
        };
        assert!(m.update_me(switched));
        assert_eq!(ids(&m), ["b"]);
        assert!(m.plan().is_none());
        assert!(!m.update_me(m.me().clone()));
    }
}
