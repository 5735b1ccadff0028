//! Which of a peer's addresses the data plane uses.
//!
//! Machines in a home cluster often see each other on several links at once (Wi-Fi,
//! Ethernet, a Thunderbolt bridge), and whichever address happens to be dialled first is
//! not the one to carry activations. So every address a peer is reachable on is measured
//! — the round trip of a small probe, and the throughput of an activation-sized burst —
//! and the data plane uses the one that moves an activation soonest. Probes go on in the
//! background: a path that becomes clearly better is switched to between two frames, and
//! when the path in use stops answering while another to the same peer still answers,
//! the pair fails over to the best remaining one. When every path to a peer is silent,
//! the peer is gone, and that is the membership's to decide, not this module's.
//!
//! Probes are answered by the peer's data plane thread, which may be busy with a long
//! prefill: so a path counts as failed only if another path to the same peer answered
//! after it stopped answering.
//!
//! Every round-trip probe also asks the other end to prove the peer's node id
//! ([`crate::peer_identity`]): an address that now leads to another node (a machine that
//! took over the peer's old address) answers, but as someone else, and is never alive.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hearth_mesh::control::HopReport;
use hearth_mesh::discovery::{interface_towards, InterfacePolicy};
use hearth_proto::Limits;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::{AuthError, AuthedChannel, Credentials};

/// How often each path is probed for its round trip, when the peer has several. Failing
/// over within a second takes a few probes a second.
const PROBE_INTERVAL: Duration = Duration::from_millis(150);

/// How often the one path to a peer reachable no other way is probed: there is nothing
/// to fail over to, and the figures are only shown.
const LONE_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A probe not answered within this is a miss.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Consecutive misses after which the path in use is failed over, if another answers.
const MISSES_TO_FAIL: u32 = 2;

/// Consecutive misses after which a path's connection is dropped and made anew.
const RECONNECT_AFTER_MISSES: u32 = 3;

/// How often each path's throughput is measured again.
const BURST_INTERVAL: Duration = Duration::from_secs(5);

/// A burst that takes longer than this (a very slow or dead path) is a miss.
const BURST_TIMEOUT: Duration = Duration::from_secs(3);

/// The burst's size: a prefill's activations for a few dozen positions of a small model,
/// large enough that a slow link shows its rate, small enough to cost nothing on a fast
/// one.
const BURST_BYTES: usize = 64 * 1024;

/// The recent round trips kept; a path's round trip is the best of them, since a probe
/// is only ever slowed down (by a busy peer), never sped up.
const RTT_SAMPLES: usize = 8;

/// A path is switched to only if it moves an activation in this fraction of the time of
/// the path in use: measurements are noisy, and flapping between two equal paths would
/// gain nothing.
const SWITCH_RATIO: f64 = 0.7;

/// Connecting (and shaking hands) on a path that leads nowhere gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The path to one peer the data plane should use now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub addr: SocketAddr,
    /// How many times the pair has failed over. Frames sent on a failed path may be lost,
    /// so a change here means the sequences in flight must be replayed.
    pub failovers: u64,
}

/// One path as measured, for `/v1/cluster`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PathView {
    pub to: String,
    pub addr: SocketAddr,
    pub interface: String,
    pub in_use: bool,
    pub alive: bool,
    /// The best recent round trip, in microseconds.
    pub rtt_us: Option<u64>,
    /// Bytes per second of the latest burst.
    pub bytes_per_second: Option<u64>,
    /// Why the latest answer on this address was refused as not coming from the peer
    /// (another node answered, say), if it was.
    pub not_the_peer: Option<String>,
}

/// The paths to every peer: measures them in the background and publishes each peer's
/// best one. Cheap to clone.
#[derive(Clone)]
pub struct Paths {
    shared: Arc<Shared>,
}

struct Shared {
    credentials: Option<Arc<Credentials>>,
    limits: Limits,
    policy: InterfacePolicy,
    peers: Mutex<HashMap<String, Peer>>,
    /// Bumped whenever any peer's choice changes.
    changes: watch::Sender<u64>,
}

struct Peer {
    paths: HashMap<SocketAddr, Path>,
    choice: watch::Sender<Choice>,
    /// The peer has more than one path: probe them often.
    several: Arc<AtomicBool>,
}

struct Path {
    stats: Arc<Mutex<Stats>>,
    interface: String,
    prober: JoinHandle<()>,
}

impl Drop for Path {
    fn drop(&mut self) {
        self.prober.abort();
    }
}

/// What the probes of one path found.
#[derive(Debug)]
struct Stats {
    added: Instant,
    rtts: Vec<Duration>,
    bytes_per_second: Option<f64>,
    last_answer: Option<Instant>,
    /// Probes missed in a row.
    misses: u32,
    /// When the first probe of the current run of misses was sent.
    missing_since: Option<Instant>,
    /// Why the latest answer was not the peer's, if it was not.
    not_the_peer: Option<String>,
}

impl Stats {
    fn new() -> Self {
        Self {
            added: Instant::now(),
            rtts: Vec::with_capacity(RTT_SAMPLES),
            bytes_per_second: None,
            last_answer: None,
            misses: 0,
            missing_since: None,
            not_the_peer: None,
        }
    }

    fn rtt(&self) -> Option<Duration> {
        self.rtts.iter().min().copied()
    }

    fn answered(&mut self, rtt: Duration) {
        if self.rtts.len() == RTT_SAMPLES {
            self.rtts.remove(0);
        }
        self.rtts.push(rtt);
        self.last_answer = Some(Instant::now());
        self.misses = 0;
        self.missing_since = None;
        self.not_the_peer = None;
    }

    fn missed(&mut self, sent: Instant) {
        self.misses += 1;
        self.missing_since.get_or_insert(sent);
    }

    fn alive(&self) -> bool {
        self.last_answer.is_some() && self.misses < MISSES_TO_FAIL
    }

    /// The estimated time to move a burst-sized activation: what paths are ranked by.
    fn cost(&self) -> Option<f64> {
        let rtt = self.rtt()?.as_secs_f64();
        let rate = self.bytes_per_second?;
        Some(rtt + BURST_BYTES as f64 / rate.max(1.0))
    }

    /// The path in use stopped answering: a run of misses that began before another
    /// path's latest answer.
    fn failed_while(&self, other: &Stats) -> bool {
        let silent_since = match (self.misses >= MISSES_TO_FAIL, self.missing_since, self.last_answer) {
            (true, Some(since), _) => since,
            // Never answered at all, for long enough that it should have.
            (_, None, None) if self.added.elapsed() > CONNECT_TIMEOUT + PROBE_TIMEOUT => self.added,
            _ => return false,
        };
        other.alive() && other.last_answer.is_some_and(|answer| answer > silent_since)
    }
}

impl Paths {
    /// Starts the evaluator; peers are added with [`Self::set_peer`]. Must be called
    /// within a tokio runtime, which runs the probes.
    pub fn start(credentials: Option<Arc<Credentials>>, limits: Limits, policy: InterfacePolicy) -> Self {
        let shared = Arc::new(Shared {
            credentials,
            limits,
            policy,
            peers: Mutex::new(HashMap::new()),
            changes: watch::channel(0).0,
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_INTERVAL / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                shared.evaluate();
            }
        });
        Self { shared }
    }

    /// Sets the addresses `node_id` can be reached on; `primary` is used until the
    /// others are measured. Paths no longer listed stop being probed.
    pub fn set_peer(&self, node_id: &str, primary: SocketAddr, addresses: &[SocketAddr]) {
        let mut wanted: Vec<SocketAddr> = Vec::with_capacity(addresses.len() + 1);
        for addr in std::iter::once(&primary).chain(addresses) {
            if !wanted.contains(addr) && self.shared.admits(*addr) {
                wanted.push(*addr);
            }
        }
        if wanted.is_empty() {
            // Whatever the policy says, the plan's address must stay usable.
            wanted.push(primary);
        }
        let mut peers = self.shared.lock();
        let peer = peers.entry(node_id.to_string()).or_insert_with(|| Peer {
            paths: HashMap::new(),
            choice: watch::channel(Choice { addr: primary, failovers: 0 }).0,
            several: Arc::new(AtomicBool::new(false)),
        });
        peer.several.store(wanted.len() > 1, Ordering::Relaxed);
        peer.paths.retain(|addr, _| wanted.contains(addr));
        for addr in wanted {
            let several = peer.several.clone();
            peer.paths.entry(addr).or_insert_with(|| self.shared.probe(node_id, addr, several));
        }
    }

    /// Forgets every peer not in `node_ids`.
    pub fn retain(&self, node_ids: &[&str]) {
        self.shared.lock().retain(|id, _| node_ids.contains(&id.as_str()));
    }

    /// The path to use for `node_id`, and its changes. A peer not yet known is reached
    /// at `primary` until it is.
    pub fn watch(&self, node_id: &str, primary: SocketAddr) -> watch::Receiver<Choice> {
        let known = self.shared.lock().get(node_id).map(|peer| peer.choice.subscribe());
        if let Some(choice) = known {
            return choice;
        }
        // `set_peer` always adds the peer, with `primary` as its first choice.
        self.set_peer(node_id, primary, &[]);
        let peers = self.shared.lock();
        let peer = peers.get(node_id).expect("set_peer adds the peer");
        peer.choice.subscribe()
    }

    /// The path in use for `node_id`, if it is known.
    pub fn current(&self, node_id: &str) -> Option<Choice> {
        self.shared.lock().get(node_id).map(|peer| *peer.choice.borrow())
    }

    /// Ticks whenever a peer's path changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Every path to every peer, as measured now.
    pub fn view(&self) -> Vec<PathView> {
        let peers = self.shared.lock();
        let mut views: Vec<PathView> = peers
            .iter()
            .flat_map(|(id, peer)| {
                let in_use = peer.choice.borrow().addr;
                peer.paths.iter().map(move |(addr, path)| {
                    let stats = lock(&path.stats);
                    PathView {
                        to: id.clone(),
                        addr: *addr,
                        interface: path.interface.clone(),
                        in_use: *addr == in_use,
                        alive: stats.alive(),
                        rtt_us: stats.rtt().map(|rtt| rtt.as_micros() as u64),
                        bytes_per_second: stats.bytes_per_second.map(|rate| rate as u64),
                        not_the_peer: stats.not_the_peer.clone(),
                    }
                })
            })
            .collect();
        views.sort_by(|a, b| (&a.to, a.addr).cmp(&(&b.to, b.addr)));
        views
    }

    /// The path in use to each peer, as this node gossips it.
    pub fn hops(&self) -> Vec<HopReport> {
        self.view()
            .into_iter()
            .filter(|view| view.in_use)
            .map(|view| HopReport {
                to: view.to,
                addr: view.addr,
                interface: view.interface,
                rtt_us: view.rtt_us.unwrap_or(0),
                bytes_per_second: view.bytes_per_second.unwrap_or(0),
            })
            .collect()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Peer>> {
        // A panic while holding the lock leaves plain measurements behind: still usable.
        self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `--interface` lets the data plane use `addr`: with an interface pinned,
    /// only addresses on its link (or routed ones, which name no link); otherwise any
    /// address but loopback. (A peer's announced address is used whatever this says.)
    fn admits(&self, addr: SocketAddr) -> bool {
        match (&self.policy, interface_towards(addr.ip())) {
            (InterfacePolicy::Only(only), Some(interface)) => &interface == only,
            // Another node's loopback is this node's own: only a cluster pinned to
            // loopback (every node on one machine) may use it.
            (InterfacePolicy::Auto, _) => !addr.ip().is_loopback(),
            _ => true,
        }
    }

    fn probe(&self, node_id: &str, addr: SocketAddr, several: Arc<AtomicBool>) -> Path {
        let stats = Arc::new(Mutex::new(Stats::new()));
        let interface = interface_towards(addr.ip()).unwrap_or_default();
        tracing::debug!(node = node_id, %addr, interface, "probing a path");
        let peer = node_id.to_string();
        let prober = tokio::spawn(probe_path(peer, addr, self.credentials.clone(), self.limits, stats.clone(), several));
        Path { stats, interface, prober }
    }

    /// Moves each peer to its best path where that is called for.
    fn evaluate(&self) {
        let peers = self.lock();
        let mut changed = false;
        for (id, peer) in peers.iter() {
            let current = *peer.choice.borrow();
            let guards: Vec<(SocketAddr, MutexGuard<'_, Stats>)> =
                peer.paths.iter().map(|(addr, path)| (*addr, lock(&path.stats))).collect();
            let stats: Vec<(SocketAddr, &Stats)> = guards.iter().map(|(addr, stats)| (*addr, &**stats)).collect();
            let decision = decide(current, &stats);
            drop(guards);
            if let Some(next) = decision {
                tracing::info!(
                    node = %id,
                    from = %current.addr,
                    to = %next.addr,
                    failover = next.failovers != current.failovers,
                    "data plane path changed"
                );
                peer.choice.send_replace(next);
                changed = true;
            }
        }
        drop(peers);
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
    }
}

/// The choice to make instead of `current`, given every path's measurements, if any.
fn decide(current: Choice, stats: &[(SocketAddr, &Stats)]) -> Option<Choice> {
    let best = stats
        .iter()
        .filter(|(_, s)| s.alive())
        .filter_map(|(addr, s)| s.cost().map(|cost| (*addr, cost)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    let Some(in_use) = stats.iter().find(|(addr, _)| *addr == current.addr).map(|(_, s)| s) else {
        // The path in use is no longer listed: take the best, as a failover, since
        // frames may have been lost on the way out.
        return best.map(|(addr, _)| Choice { addr, failovers: current.failovers + 1 });
    };
    let failed = stats.iter().any(|(addr, other)| *addr != current.addr && in_use.failed_while(other));
    if failed {
        let alternative = stats
            .iter()
            .filter(|(addr, s)| *addr != current.addr && s.alive())
            .min_by(|a, b| {
                let cost = |s: &Stats| s.cost().unwrap_or(f64::INFINITY);
                cost(a.1).total_cmp(&cost(b.1))
            });
        return alternative.map(|(addr, _)| Choice { addr: *addr, failovers: current.failovers + 1 });
    }
    let (best_addr, best_cost) = best?;
    if best_addr == current.addr {
        return None;
    }
    match in_use.cost() {
        Some(cost) if best_cost >= cost * SWITCH_RATIO => None,
        // Clearly better, or the path in use is not measured yet while another is.
        _ => Some(Choice { addr: best_addr, failovers: current.failovers }),
    }
}

fn lock(stats: &Mutex<Stats>) -> MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Probes one path to the node `peer` for as long as it is listed (the task is aborted
/// when it is not).
async fn probe_path(
    peer: String,
    addr: SocketAddr,
    credentials: Option<Arc<Credentials>>,
    limits: Limits,
    stats: Arc<Mutex<Stats>>,
    several: Arc<AtomicBool>,
) {
    let burst = bytes::Bytes::from(vec![0u8; BURST_BYTES]);
    let mut next_burst = Instant::now();
    let mut channel: Option<AuthedChannel> = None;
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            let pause = if several.load(Ordering::Relaxed) { PROBE_INTERVAL } else { LONE_PROBE_INTERVAL };
            tokio::time::sleep(pause).await;
        }
        let sent = Instant::now();
        if channel.is_none() {
            let connect = AuthedChannel::connect(addr, peer.as_str(), credentials.clone());
            match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(connected)) => channel = Some(connected),
                Ok(Err(error)) => {
                    tracing::trace!(%addr, "path probe cannot connect: {error:#}");
                    let mut stats = lock(&stats);
                    stats.missed(sent);
                    if let Some(AuthError::NotThePeer { why, .. }) = error.downcast_ref::<AuthError>() {
                        stats.not_the_peer = Some(why.to_string());
                    }
                }
                Err(_) => lock(&stats).missed(sent),
            }
        }
        let Some(authed) = &channel else { continue };
        // Each round trip is also proved to come from the peer: the connection under the
        // channel may have been made anew, to whoever holds the address now.
        match probe_once(authed, &limits, bytes::Bytes::new(), PROBE_TIMEOUT, true).await {
            Ok(rtt) => lock(&stats).answered(rtt),
            Err(error) => {
                tracing::trace!(%addr, "path probe missed: {error}");
                let mut stats = lock(&stats);
                stats.missed(sent);
                if let AuthError::NotThePeer { why, .. } = &error {
                    stats.not_the_peer = Some(why.to_string());
                    // Whoever answers here is not the peer: start again from a new
                    // connection, confirmed before it is used.
                    channel = None;
                    continue;
                }
                if stats.misses >= RECONNECT_AFTER_MISSES {
                    // A connection over a link that went down waits out TCP's growing
                    // retransmission timer once the link is back; a new one is up at once.
                    channel = None;
                    next_burst = Instant::now();
                }
                continue;
            }
        }
        if Instant::now() >= next_burst {
            next_burst = Instant::now() + BURST_INTERVAL;
            match probe_once(authed, &limits, burst.clone(), BURST_TIMEOUT, false).await {
                Ok(elapsed) => {
                    // Round trip included: what moving an activation this size really costs
                    // (subtracting a noisy round trip from a fast burst would leave noise).
                    let elapsed = elapsed.max(Duration::from_micros(1));
                    lock(&stats).bytes_per_second = Some(BURST_BYTES as f64 / elapsed.as_secs_f64());
                }
                Err(error) => {
                    tracing::debug!(%addr, "path burst failed: {error}");
                    lock(&stats).missed(Instant::now());
                }
            }
        }
    }
}

/// One probe with `payload` (with `prove`, one the peer must prove it answered): the
/// time until its reply.
async fn probe_once(
    channel: &AuthedChannel,
    limits: &Limits,
    payload: bytes::Bytes,
    timeout: Duration,
    prove: bool,
) -> Result<Duration, AuthError> {
    match tokio::time::timeout(timeout, channel.probe(limits, payload, prove)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(AuthError::NoAnswer { addr: channel.addr(), timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOW: &str = "10.213.1.2:5282";
    const FAST: &str = "10.214.1.2:5282";

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("a test address")
    }

    /// A path that just answered with this round trip, at this rate.
    fn measured(rtt_us: u64, bytes_per_second: f64) -> Stats {
        let mut stats = Stats::new();
        stats.answered(Duration::from_micros(rtt_us));
        stats.bytes_per_second = Some(bytes_per_second);
        stats
    }

    fn choice(text: &str, failovers: u64) -> Choice {
        Choice { addr: addr(text), failovers }
    }

    #[test]
    fn a_clearly_faster_path_is_taken_without_a_failover() {
        let slow = measured(300, 1.25e6);
        let fast = measured(60, 1.0e9);
        let decision = decide(choice(SLOW, 0), &[(addr(SLOW), &slow), (addr(FAST), &fast)]);
        assert_eq!(decision, Some(choice(FAST, 0)));
        // Once there, it stays.
        assert_eq!(decide(choice(FAST, 0), &[(addr(SLOW), &slow), (addr(FAST), &fast)]), None);
    }

    #[test]
    fn paths_of_about_the_same_speed_do_not_flap() {
        let a = measured(100, 1.0e9);
        let b = measured(80, 1.1e9);
        assert_eq!(decide(choice(SLOW, 0), &[(addr(SLOW), &a), (addr(FAST), &b)]), None);
    }

    #[test]
    fn an_unmeasured_path_in_use_gives_way_to_a_measured_one() {
        let unmeasured = Stats::new();
        let fast = measured(60, 1.0e9);
        assert_eq!(decide(choice(SLOW, 0), &[(addr(SLOW), &unmeasured), (addr(FAST), &fast)]), Some(choice(FAST, 0)));
    }

    #[test]
    fn a_silent_path_fails_over_only_when_another_answered_since() {
        let mut fast = measured(60, 1.0e9);
        let mut slow = measured(300, 1.25e6);
        // The fast path goes quiet: two probes missed.
        let silent_from = Instant::now();
        fast.missed(silent_from);
        fast.missed(silent_from + PROBE_INTERVAL);
        // The slow one answered before the silence began: the peer may just be busy.
        assert_eq!(decide(choice(FAST, 3), &[(addr(SLOW), &slow), (addr(FAST), &fast)]), None);
        // It answers after: the fast path is down, not the peer.
        std::thread::sleep(Duration::from_millis(2));
        slow.answered(Duration::from_micros(300));
        assert_eq!(decide(choice(FAST, 3), &[(addr(SLOW), &slow), (addr(FAST), &fast)]), Some(choice(SLOW, 4)));
    }

    #[test]
    fn one_missed_probe_is_not_a_failure() {
        let mut fast = measured(60, 1.0e9);
        fast.missed(Instant::now());
        std::thread::sleep(Duration::from_millis(2));
        let slow = measured(300, 1.25e6);
        assert_eq!(decide(choice(FAST, 0), &[(addr(SLOW), &slow), (addr(FAST), &fast)]), None);
    }

    #[test]
    fn a_path_no_longer_listed_is_left_as_a_failover() {
        let slow = measured(300, 1.25e6);
        assert_eq!(decide(choice(FAST, 1), &[(addr(SLOW), &slow)]), Some(choice(SLOW, 2)));
    }

    #[test]
    fn with_every_path_silent_nothing_moves() {
        let mut fast = measured(60, 1.0e9);
        let mut slow = measured(300, 1.25e6);
        let now = Instant::now();
        for stats in [&mut fast, &mut slow] {
            stats.missed(now);
            stats.missed(now);
        }
        assert_eq!(decide(choice(FAST, 0), &[(addr(SLOW), &slow), (addr(FAST), &fast)]), None);
    }
}
