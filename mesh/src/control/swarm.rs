//! The task that runs the libp2p swarm: it turns connections, pings and gossip into
//! [`Membership`] updates, and those into [`ControlEvent`]s.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libp2p::futures::StreamExt;
use libp2p::gossipsub::{self, MessageAcceptance, PublishError, TopicHash};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{identity, ping, Multiaddr, PeerId, Swarm, SwarmBuilder};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tracing::Instrument;

use super::one_way::OneWayLinks;
use super::wire::{self, Body};
use super::{Command, ControlConfig, ControlError, ControlEvent, Membership, NodeInfo, Plan};

/// How often a node announces itself when nothing changes; members heard only
/// through others expire after three missed announcements.
const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(500);

/// How often silent members and connections are looked for; bounds how late an
/// expiry is noticed.
const EXPIRE_INTERVAL: Duration = Duration::from_millis(100);

/// Every connection is pinged this often; a LAN round trip takes a millisecond.
const PING_INTERVAL: Duration = Duration::from_millis(200);
const PING_TIMEOUT: Duration = Duration::from_millis(600);

/// A connection with no ping answered for this long is closed, and its peer dropped.
///
/// Not left to libp2p's ping failures: its handler keeps a connection's first failure
/// to itself and then opens a new stream, which over a dead link fails only after the
/// 10 s stream negotiation timeout. Answers come every 200 ms, so this is four or five
/// missed pings, room for a loaded machine while a silent peer still goes within
/// about a second.
const SILENCE_LIMIT: Duration = Duration::from_secs(1);

/// Gossipsub's own default (1 s, first after 5 s) would leave a node that is reachable
/// only through others unheard for seconds after it connects: messages are relayed
/// only along the mesh that heartbeats build.
const GOSSIP_HEARTBEAT: Duration = Duration::from_millis(500);
const GOSSIP_FIRST_HEARTBEAT: Duration = Duration::from_millis(100);

/// Gossipsub keeps only its mesh connections alive; every member connection must
/// stay, and ping, not idleness, decides when one is dead.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// How long binding the listener may take.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Gossipsub hands messages to connections asynchronously and does not flush them
/// when a connection closes, so a leaving node runs this long after its goodbye.
const GOODBYE_FLUSH: Duration = Duration::from_millis(200);

/// How long a leaving node waits for its connections to close gracefully.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);

/// A member heard through others is connected to directly, but not more often than
/// this, so a peer that cannot be reached is not dialled on every announcement.
const REDIAL_BACKOFF: Duration = Duration::from_secs(10);

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub:
        gossipsub::Behaviour<gossipsub::IdentityTransform, gossipsub::WhitelistSubscriptionFilter>,
    ping: ping::Behaviour,
}

/// Converts the node's key to the `libp2p-identity` version libp2p itself uses; the
/// two are distinct types when the versions differ.
pub(super) fn convert_keypair(
    keypair: &libp2p_identity::Keypair,
) -> Result<identity::Keypair, ControlError> {
    let encoded = keypair
        .to_protobuf_encoding()
        .map_err(|e| ControlError::Key(e.to_string()))?;
    identity::Keypair::from_protobuf_encoding(&encoded)
        .map_err(|e| ControlError::Key(e.to_string()))
}

/// Builds the swarm, binds the listener, and spawns the task. Returns the address
/// listened on.
pub(super) async fn spawn(
    keypair: identity::Keypair,
    config: &ControlConfig,
    me: NodeInfo,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::Sender<ControlEvent>,
) -> Result<SocketAddr, ControlError> {
    let topic = gossipsub::IdentTopic::new(format!("/hearth/control/1/{}", config.cluster_hash));
    let mut swarm = build_swarm(keypair, topic.hash(), config.cluster_key.as_ref())?;
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| ControlError::Setup(Box::new(e)))?;

    let listen_error = |reason: String| ControlError::Listen {
        addr: config.listen,
        reason,
    };
    swarm
        .listen_on(to_multiaddr(config.listen))
        .map_err(|e| listen_error(e.to_string()))?;
    // The listener is bound on the swarm's first poll; wait for it to learn the port.
    let bound = tokio::time::timeout(LISTEN_TIMEOUT, async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => {
                    if let Some(addr) = to_socket_addr(&address) {
                        return Ok(addr);
                    }
                }
                SwarmEvent::ListenerClosed { reason, .. } => {
                    return Err(match reason {
                        Ok(()) => "the listener closed".to_owned(),
                        Err(e) => e.to_string(),
                    });
                }
                SwarmEvent::ListenerError { error, .. } => return Err(error.to_string()),
                _ => {}
            }
        }
    })
    .await
    .map_err(|_| listen_error("timed out".to_owned()))?
    .map_err(listen_error)?;

    let span = tracing::info_span!("control", node = %short_id(&me.node_id));
    let mut task = Task {
        swarm,
        topic: topic.hash(),
        membership: Membership::new(me),
        listen: vec![bound],
        links: HashMap::new(),
        outbound: HashMap::new(),
        redialed: HashMap::new(),
        one_way: OneWayLinks::new(),
        listen_of: HashMap::new(),
        events_open: true,
        outbox: Outbox::default(),
        private: config.cluster_key.is_some(),
    };
    task.members_changed();
    tracing::info!(parent: &span, %bound, "control plane listening");
    tokio::spawn(task.run(commands, events).instrument(span));
    Ok(SocketAddr::new(config.listen.ip(), bound.port()))
}

fn build_swarm(
    keypair: identity::Keypair,
    topic: TopicHash,
    cluster_key: Option<&crate::cluster_key::ClusterKey>,
) -> Result<Swarm<Behaviour>, ControlError> {
    let setup = |e: Box<dyn std::error::Error + Send + Sync>| ControlError::Setup(e);
    let gossip_config = gossipsub::ConfigBuilder::default()
        .max_transmit_size(wire::MAX_MESSAGE_BYTES)
        // Strict: every message signed by its author, sequence-numbered, and checked;
        // the membership relies on a message's source being authentic.
        .validation_mode(gossipsub::ValidationMode::Strict)
        // Hold messages until they are checked, so invalid ones are not relayed.
        .validate_messages()
        .heartbeat_interval(GOSSIP_HEARTBEAT)
        .heartbeat_initial_delay(GOSSIP_FIRST_HEARTBEAT)
        .build()
        .map_err(|e| setup(Box::new(e)))?;
    let ping_config = ping::Config::new()
        .with_interval(PING_INTERVAL)
        .with_timeout(PING_TIMEOUT);

    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| super::pnet::transport(key, cluster_key))
        .map_err(|e| setup(Box::new(e)))?
        .with_behaviour(|key| {
            let gossipsub = gossipsub::Behaviour::new_with_subscription_filter(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
                // Peers' subscriptions to any other topic are not even recorded.
                gossipsub::WhitelistSubscriptionFilter(HashSet::from([topic])),
            )?;
            Ok(Behaviour {
                gossipsub,
                ping: ping::Behaviour::new(ping_config),
            })
        })
        .map_err(|e| setup(Box::new(e)))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    Ok(swarm)
}

/// Events not yet taken by the receiver. Both kinds are snapshots, so a newer one
/// replaces an older one instead of queueing behind it: a slow receiver costs no
/// memory and never stalls the swarm.
#[derive(Default)]
struct Outbox {
    members: Option<Vec<NodeInfo>>,
    plan: Option<Plan>,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.members.is_none() && self.plan.is_none()
    }

    fn pop(&mut self) -> Option<ControlEvent> {
        self.members
            .take()
            .map(ControlEvent::Members)
            .or_else(|| self.plan.take().map(ControlEvent::Plan))
    }
}

struct Task {
    swarm: Swarm<Behaviour>,
    topic: TopicHash,
    membership: Membership,
    /// Where this node accepts control connections, as announced.
    listen: Vec<SocketAddr>,
    /// Each peer's connections that are up, and when each last answered a ping (or
    /// opened).
    links: HashMap<PeerId, HashMap<ConnectionId, Instant>>,
    /// Connections dialled by address, pending or up, so a repeated dial is skipped.
    outbound: HashMap<ConnectionId, Multiaddr>,
    /// When each member heard through others was last dialled directly.
    redialed: HashMap<PeerId, Instant>,
    /// Peers heard over links that carry gossip one way only (see [`super::one_way`]).
    one_way: OneWayLinks<PeerId>,
    /// Where each connected peer accepts control connections, as it announced.
    listen_of: HashMap<PeerId, Vec<SocketAddr>>,
    /// False once the receiver is dropped: nobody listens, and events are not kept.
    events_open: bool,
    outbox: Outbox,
    /// The control plane is a private network (it has a cluster key).
    private: bool,
}

impl Task {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        events: mpsc::Sender<ControlEvent>,
    ) {
        let mut announce = tokio::time::interval(ANNOUNCE_INTERVAL);
        announce.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut expire = tokio::time::interval(EXPIRE_INTERVAL);
        expire.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = commands.recv() => match command {
                    Some(Command::Shutdown(done)) => {
                        // Other handles fail from now on, rather than queue commands
                        // nobody will run.
                        commands.close();
                        self.leave().await;
                        // The caller may have stopped waiting; nothing is lost then.
                        let _ = done.send(());
                        return;
                    }
                    Some(command) => self.on_command(command),
                    None => {
                        tracing::info!("every handle was dropped; stopping without a goodbye");
                        return;
                    }
                },
                _ = announce.tick() => self.on_announce_tick(),
                _ = expire.tick() => self.on_expire_tick(),
                permit = events.reserve(), if self.events_open && !self.outbox.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            if let Some(event) = self.outbox.pop() {
                                permit.send(event);
                            }
                        }
                        Err(_) => {
                            tracing::debug!("the event receiver was dropped");
                            self.events_open = false;
                            self.outbox = Outbox::default();
                        }
                    }
                }
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Dial(addr) => self.dial(addr),
            Command::UpdateMe(me) => {
                if self.membership.update_me(me) {
                    self.members_changed();
                    self.announce();
                }
            }
            Command::PublishPlan(plan) => {
                let epoch = plan.epoch;
                let me = self.swarm.local_peer_id().to_base58();
                if self.membership.plan() == Some(&plan) {
                    tracing::debug!(epoch, "the plan is already in force");
                } else if self.membership.offer_plan(&me, plan) {
                    self.outbox.plan = self.membership.plan().cloned();
                    self.publish_plan();
                } else {
                    tracing::warn!(
                        epoch,
                        coordinator = %self.membership.coordinator(),
                        "not publishing a plan: this node is not the coordinator, or the plan \
                         is not newer than the one in force"
                    );
                }
            }
            // Handled by the loop, which must stop after it.
            Command::Shutdown(_) => {}
        }
    }

    fn dial(&mut self, addr: SocketAddr) {
        let address = to_multiaddr(addr);
        if self.outbound.values().any(|dialled| *dialled == address) {
            tracing::trace!(%addr, "already connected or dialling");
            return;
        }
        let opts = DialOpts::unknown_peer_id().address(address.clone()).build();
        let connection = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.outbound.insert(connection, address);
            }
            Err(e) => tracing::debug!(%addr, "could not dial: {e}"),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => self.on_gossip_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result,
            })) => match result {
                Ok(rtt) => {
                    tracing::trace!(%peer, ?rtt, "ping");
                    if let Some(answered) = self
                        .links
                        .get_mut(&peer)
                        .and_then(|connections| connections.get_mut(&connection))
                    {
                        *answered = Instant::now();
                    }
                }
                Err(failure) => {
                    tracing::info!(%peer, "closing a connection: {failure}");
                    self.close(peer, connection);
                }
            },
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                let links = self.links.entry(peer_id).or_default();
                links.insert(connection_id, Instant::now());
                if links.len() == 1 {
                    self.membership.link_up(&peer_id.to_base58());
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                self.outbound.remove(&connection_id);
                match cause {
                    Some(cause) => tracing::debug!(peer = %peer_id, "connection closed: {cause}"),
                    None => tracing::debug!(peer = %peer_id, "connection closed"),
                }
                self.connection_gone(peer_id, connection_id);
                if num_established == 0 {
                    self.disconnected(peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                self.outbound.remove(&connection_id);
                tracing::debug!(peer = ?peer_id, "could not connect: {error}");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                if self.private {
                    // Behind the private network layer, a handshake that fails is most
                    // often a peer without the cluster key.
                    tracing::warn!(
                        from = %send_back_addr,
                        "refused a control connection (a peer without the cluster key, or a broken link): {error}"
                    );
                } else {
                    tracing::debug!(from = %send_back_addr, "incoming connection failed: {error}");
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                if let Some(addr) = to_socket_addr(&address) {
                    // Peers reject an announcement listing more; the first suffice.
                    if !self.listen.contains(&addr) && self.listen.len() < wire::MAX_LISTEN_ADDRS {
                        self.listen.push(addr);
                        self.announce();
                    }
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                if let Some(addr) = to_socket_addr(&address) {
                    self.listen.retain(|listening| *listening != addr);
                }
            }
            SwarmEvent::ListenerClosed { reason, .. } => {
                tracing::warn!(?reason, "the control plane stopped listening");
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!("control plane listener error: {error}");
            }
            _ => {}
        }
    }

    fn on_gossip_event(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let acceptance = match wire::decode(message.source.as_ref(), &message.data) {
                    Ok((source, body)) => {
                        self.check_heard_both_ways(propagation_source);
                        self.on_message(source, body);
                        MessageAcceptance::Accept
                    }
                    Err(invalid) => {
                        tracing::debug!(
                            from = %propagation_source,
                            source = ?message.source,
                            "dropping a control message: {invalid}"
                        );
                        MessageAcceptance::Reject
                    }
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            gossipsub::Event::Subscribed { peer_id, topic } if topic == self.topic => {
                // A new peer can hear us now: tell it who we are (and the plan, if
                // ours) without waiting for the next tick.
                tracing::debug!(peer = %peer_id, "peer joined the control topic");
                self.one_way.subscribed(peer_id);
                self.on_announce_tick();
            }
            gossipsub::Event::GossipsubNotSupported { peer_id } => {
                tracing::debug!(peer = %peer_id, "disconnecting a peer that does not speak gossipsub");
                // Err only means it is already gone.
                let _ = self.swarm.disconnect_peer_id(peer_id);
            }
            _ => {}
        }
    }

    fn on_message(&mut self, source: PeerId, body: Body) {
        let now = Instant::now();
        match body {
            Body::Announce { info, listen } => {
                if self.links.contains_key(&source) {
                    self.listen_of.insert(source, listen.clone());
                }
                if self.membership.heard(info, now) {
                    self.members_changed();
                }
                self.connect_directly(source, &listen, now);
            }
            Body::Plan(plan) => {
                if self.membership.offer_plan(&source.to_base58(), plan) {
                    self.outbox.plan = self.membership.plan().cloned();
                }
            }
            Body::Goodbye => {
                if self.membership.goodbye(&source.to_base58(), now) {
                    self.members_changed();
                }
            }
        }
    }

    /// A message came over a link from `peer`: if gossipsub does not know `peer` to be
    /// subscribed, nothing this node publishes reaches it, and after a grace period its
    /// connections are closed, to be made anew (see [`super::one_way`]).
    fn check_heard_both_ways(&mut self, peer: PeerId) {
        let subscribed = self
            .swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .any(|(p, topics)| *p == peer && topics.contains(&&self.topic));
        let connections = self.links.get(&peer).map_or(0, HashMap::len);
        if self.one_way.heard(peer, subscribed, connections, Instant::now()) {
            tracing::info!(
                %peer,
                "the control link to this peer carries gossip one way only (it never told its \
                 subscription on this connection): connecting to it afresh"
            );
            // Err only means it is already gone.
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// The last connection to `peer` closed: one closed to be made anew is dialled again
    /// at once, at the addresses it announced.
    fn disconnected(&mut self, peer: PeerId) {
        let listen = self.listen_of.remove(&peer).unwrap_or_default();
        if !self.one_way.disconnected(peer) || listen.is_empty() {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(listen.into_iter().map(to_multiaddr).collect())
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, "could not dial again: {e}");
        }
    }

    /// Connects to a member heard only through others. With every member connected
    /// directly, ping and connection state see every drop within a second; a member
    /// heard only through relays would take [`super::membership::RELAYED_TTL`].
    fn connect_directly(&mut self, peer: PeerId, listen: &[SocketAddr], now: Instant) {
        if listen.is_empty()
            || self.links.contains_key(&peer)
            || !self.membership.contains(&peer.to_base58())
        {
            return;
        }
        self.redialed
            .retain(|_, at| now.saturating_duration_since(*at) < REDIAL_BACKOFF);
        if self.redialed.contains_key(&peer) {
            return;
        }
        self.redialed.insert(peer, now);
        tracing::debug!(%peer, "connecting directly to a member heard through others");
        let opts = DialOpts::peer_id(peer)
            .addresses(listen.iter().copied().map(to_multiaddr).collect())
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, "could not dial: {e}");
        }
    }

    fn on_expire_tick(&mut self) {
        let now = Instant::now();
        let silent: Vec<(PeerId, ConnectionId)> = self
            .links
            .iter()
            .flat_map(|(peer, connections)| {
                connections
                    .iter()
                    .filter(|(_, answered)| {
                        now.saturating_duration_since(**answered) > SILENCE_LIMIT
                    })
                    .map(|(connection, _)| (*peer, *connection))
            })
            .collect();
        for (peer, connection) in silent {
            tracing::info!(%peer, "closing a connection: no ping answered for {SILENCE_LIMIT:?}");
            self.close(peer, connection);
        }
        if self.membership.expire(now) {
            self.members_changed();
        }
    }

    /// Closes a connection that stopped answering. Its peer is dead to the membership
    /// at once, however long the close takes over a dead link.
    fn close(&mut self, peer: PeerId, connection: ConnectionId) {
        self.swarm.close_connection(connection);
        self.connection_gone(peer, connection);
    }

    /// One of `peer`'s connections closed or stopped answering.
    fn connection_gone(&mut self, peer: PeerId, connection: ConnectionId) {
        let Some(links) = self.links.get_mut(&peer) else {
            return;
        };
        if links.remove(&connection).is_none() || !links.is_empty() {
            return;
        }
        self.links.remove(&peer);
        if self.membership.link_down(&peer.to_base58()) {
            self.members_changed();
        }
    }

    /// Announces this node and, while it coordinates, repeats its plan for nodes that
    /// joined since or missed it.
    fn on_announce_tick(&mut self) {
        self.announce();
        let me = self.swarm.local_peer_id().to_base58();
        // The author of the plan in force repeats it, even after a newcomer with a smaller
        // id took over coordinating: that newcomer must learn the plan in force to join
        // it without stopping it (see `Membership::offer_plan`).
        let authored = self.membership.plan().is_some_and(|plan| plan.coordinator == me);
        if authored {
            self.publish_plan();
        }
    }

    fn announce(&mut self) {
        let body = Body::Announce {
            info: self.membership.me().clone(),
            listen: self.listen.clone(),
        };
        self.publish(&body);
    }

    fn publish_plan(&mut self) {
        if let Some(plan) = self.membership.plan() {
            let body = Body::Plan(plan.clone());
            self.publish(&body);
        }
    }

    fn publish(&mut self, body: &Body) {
        let data = match wire::encode(body) {
            Ok(data) => data,
            Err(e) => {
                tracing::warn!("could not encode a control message: {e}");
                return;
            }
        };
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), data)
        {
            Ok(_) => {}
            // Alone, or peers not subscribed yet: the next tick will reach them.
            Err(PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => tracing::debug!("could not publish a control message: {e}"),
        }
    }

    fn members_changed(&mut self) {
        if self.events_open {
            self.outbox.members = Some(self.membership.members());
        }
    }

    /// Says goodbye and closes every connection, within a bounded time.
    async fn leave(&mut self) {
        tracing::info!("leaving the cluster");
        self.publish(&Body::Goodbye);
        let flushed = tokio::time::sleep(GOODBYE_FLUSH);
        tokio::pin!(flushed);
        loop {
            tokio::select! {
                _ = &mut flushed => break,
                _ = self.swarm.select_next_some() => {}
            }
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            // Err only means it is already gone.
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let closed = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while self.swarm.connected_peers().next().is_some() {
                self.swarm.select_next_some().await;
            }
        });
        if closed.await.is_err() {
            tracing::debug!("connections still closing; dropping them");
        }
    }
}

/// The first characters of a node id: enough to tell a cluster's nodes apart in logs.
fn short_id(node_id: &str) -> &str {
    // Peer ids are ASCII, but do not slice through a character regardless.
    let end = node_id
        .char_indices()
        .nth(12)
        .map_or(node_id.len(), |(at, _)| at);
    &node_id[..end]
}

fn to_multiaddr(addr: SocketAddr) -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::from(addr.ip()))
        .with(Protocol::Tcp(addr.port()))
}

/// The TCP address in `addr`, if it starts with one.
fn to_socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut protocols = addr.iter();
    let ip = match protocols.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    match protocols.next()? {
        Protocol::Tcp(port) => Some(SocketAddr::new(ip, port)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addrs_convert_both_ways() {
        for addr in ["127.0.0.1:4001", "[::1]:4001", "0.0.0.0:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(to_socket_addr(&to_multiaddr(addr)), Some(addr));
        }
        let udp: Multiaddr = "/ip4/127.0.0.1/udp/4001".parse().unwrap();
        assert_eq!(to_socket_addr(&udp), None);
    }

    #[test]
    fn keys_convert_to_libp2p_keys() {
        let key = libp2p_identity::Keypair::generate_ed25519();
        let converted = convert_keypair(&key).unwrap();
        assert_eq!(
            converted.public().to_peer_id().to_base58(),
            key.public().to_peer_id().to_base58()
        );
    }

    #[test]
    fn short_ids() {
        assert_eq!(short_id("12D3KooWAbcdefghijkl"), "12D3KooWAbcd");
        assert_eq!(short_id("abc"), "abc");
    }
}
