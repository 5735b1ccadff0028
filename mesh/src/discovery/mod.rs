//! Finding the other nodes of the cluster on the local network.
//!
//! Every node advertises a `_hearth._tcp` mDNS service whose TXT record is its
//! [`PeerAdvert`], and browses for everyone else's. [`Discovery::start`] does both
//! and hands back a channel of [`DiscoveryEvent`]s; peers given by hand
//! ([`ManualPeer`]) join the same stream through [`Discovery::add_peer`], so the rest
//! of the node never asks where a peer came from.
//!
//! How fast mDNS is, measured between two network namespaces on a bridge: a new node
//! sees the existing ones in about 80 ms, they see it within a second, and a clean
//! [`Discovery::shutdown`] is seen within a second. A node that dies without saying
//! goodbye stays listed until its address records expire, 120 s later. So mDNS is not
//! a liveness signal: the control plane's pings are, and when they declare a peer
//! dead the node calls [`Discovery::verify`] to clear it from mDNS too.

mod advert;
mod interfaces;
mod manual;
mod table;

use std::cell::OnceCell;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use mdns_sd::{
    DaemonEvent, RecvTimeoutError, ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent,
    ServiceInfo,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

pub use advert::{AdvertError, Backend, ClusterHash, PeerAdvert, TXT_VERSION};
pub use interfaces::{interface_towards, local_addresses, primary_address, usable_interface, InterfacePolicy};
pub use manual::{ManualPeer, ManualPeerError, PeerHost};

use crate::NodeId;
use table::{PeerTable, Source};

/// The mDNS service type every Hearth node registers and browses.
pub const SERVICE_TYPE: &str = "_hearth._tcp.local.";

/// What a peer's advert may list; more is a forged or broken advert.
const MAX_ADDRESSES: usize = 16;

/// How often the event pump retries delivery while the node is not reading.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// How long the event pump waits for mDNS news before checking on the daemon.
const IDLE_INTERVAL: Duration = Duration::from_millis(500);

/// mDNS repeats a goodbye 120 ms after the first, for peers that missed it; shutdown
/// waits this long so the repeat goes out before the daemon stops.
const GOODBYE_REPEAT: Duration = Duration::from_millis(200);

/// How long shutdown waits for the mDNS daemon to acknowledge each step.
const DAEMON_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// News about the other nodes of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A node appeared, or its advert changed (memory, addresses): either way, the
    /// advert is now current. Repeats for a node carry the latest advert.
    Found(PeerAdvert),
    /// A node said goodbye, or was verified gone. May follow no `Found` if the two were
    /// coalesced while the node was not reading.
    Lost(NodeId),
    /// Another machine advertises this node's own id, from these addresses. Two live
    /// nodes with one id break the mesh; see
    /// [`duplicate_id_error`](crate::identity::duplicate_id_error) for what to tell
    /// the user.
    DuplicateId { addresses: Vec<IpAddr> },
}

impl DiscoveryEvent {
    /// The node this event is about; `None` for [`DiscoveryEvent::DuplicateId`],
    /// which is about this node.
    pub fn node_id(&self) -> Option<&NodeId> {
        match self {
            Self::Found(advert) => Some(&advert.node_id),
            Self::Lost(node_id) => Some(node_id),
            Self::DuplicateId { .. } => None,
        }
    }
}

/// How discovery runs.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    pub interfaces: InterfacePolicy,
    /// The mDNS UDP port: 5353 on a real network. Nodes only find each other on the
    /// same port, so a test can use another to keep to itself.
    pub mdns_port: u16,
    /// How long a peer [`Discovery::verify`] asks about may stay silent before mDNS
    /// forgets it. RFC 6762 §10.4 says ten seconds.
    pub verify_timeout: Duration,
    /// Undelivered events beyond this are coalesced (see [`DiscoveryEvent`]), never
    /// dropped and never blocking mDNS.
    pub event_capacity: usize,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            interfaces: InterfacePolicy::Auto,
            mdns_port: mdns_sd::MDNS_PORT,
            verify_timeout: mdns_sd::VERIFY_TIMEOUT_DEFAULT,
            event_capacity: 64,
        }
    }
}

/// Why discovery could not start or carry out a request.
///
/// Each message already includes its cause, so none is repeated as `source()`.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("this node's own advert is invalid: {0}")]
    InvalidAdvert(AdvertError),

    #[error("the node id {0} is too long for an mDNS instance name (63 bytes at most)")]
    NodeIdTooLong(NodeId),

    #[error("an advert update may not change the node id or cluster")]
    IdentityChanged,

    #[error("no network interface named {name:?} has an address (interfaces: {available})")]
    NoSuchInterface { name: String, available: String },

    #[error("mDNS: could not {action}: {error}")]
    Mdns {
        action: &'static str,
        error: mdns_sd::Error,
    },

    #[error("could not start the discovery thread: {0}")]
    Thread(std::io::Error),
}

fn mdns(action: &'static str) -> impl FnOnce(mdns_sd::Error) -> DiscoveryError {
    move |error| DiscoveryError::Mdns { action, error }
}

/// A running discovery: this node's advertisement plus the browse for its peers.
///
/// Stop it with [`shutdown`](Self::shutdown), which says goodbye so peers drop this
/// node at once; merely dropping the handle does the same, but without waiting for
/// the goodbye to go out.
pub struct Discovery {
    daemon: ServiceDaemon,
    shared: Arc<Shared>,
    own: Mutex<PeerAdvert>,
    /// Our mDNS instance's full name, which `unregister` needs.
    fullname: String,
    verify_timeout: Duration,
    pump: Option<JoinHandle<()>>,
}

impl Discovery {
    /// Advertises `advert` and starts looking for peers of the same cluster.
    ///
    /// `advert.addresses` is ignored here: mDNS publishes the addresses of the
    /// interfaces `config.interfaces` selects, and follows them as they change.
    pub fn start(
        advert: PeerAdvert,
        config: DiscoveryConfig,
    ) -> Result<(Self, mpsc::Receiver<DiscoveryEvent>), DiscoveryError> {
        let info = service_info(&advert)?;
        let fullname = info.get_fullname().to_owned();
        check_interfaces(&config.interfaces)?;

        let daemon = ServiceDaemon::new_with_port(config.mdns_port)
            .map_err(mdns("start the mDNS daemon"))?;
        let subscribed = (|| {
            daemon
                .disable_interface(config.interfaces.disabled_interfaces())
                .map_err(mdns("select interfaces"))?;
            let monitor = daemon.monitor().map_err(mdns("monitor the daemon"))?;
            let browse = daemon.browse(SERVICE_TYPE).map_err(mdns("browse"))?;
            daemon.register(info).map_err(mdns("register this node"))?;
            Ok((browse, monitor))
        })();
        let (browse, monitor) = match subscribed {
            Ok(receivers) => receivers,
            Err(e) => {
                let _ = daemon.shutdown();
                return Err(e);
            }
        };

        let (events, receiver) = mpsc::channel(config.event_capacity.max(1));
        let shared = Arc::new(Shared {
            table: Mutex::new(PeerTable::new(advert.node_id.clone(), advert.cluster_hash)),
            events,
        });
        let pump = thread::Builder::new()
            .name("hearth-discovery".to_owned())
            .spawn({
                let shared = Arc::clone(&shared);
                move || shared.pump(&browse, &monitor)
            })
            .map_err(|e| {
                let _ = daemon.shutdown();
                DiscoveryError::Thread(e)
            })?;

        tracing::info!(node_id = %advert.node_id, cluster = %advert.cluster_hash, interfaces = ?config.interfaces, "mDNS discovery started");
        let discovery = Self {
            daemon,
            shared,
            own: Mutex::new(advert),
            fullname,
            verify_timeout: config.verify_timeout,
            pump: Some(pump),
        };
        Ok((discovery, receiver))
    }

    /// This node's advert as currently published.
    pub fn advert(&self) -> PeerAdvert {
        lock(&self.own).clone()
    }

    /// Publishes a changed advert, such as new usable memory. The node id and cluster
    /// are fixed for the life of a discovery.
    pub fn update(&self, advert: PeerAdvert) -> Result<(), DiscoveryError> {
        let mut own = lock(&self.own);
        if advert.node_id != own.node_id || advert.cluster_hash != own.cluster_hash {
            return Err(DiscoveryError::IdentityChanged);
        }
        // Registering the same instance again replaces its records and announces them.
        self.daemon
            .register(service_info(&advert)?)
            .map_err(mdns("update this node's advert"))?;
        *own = advert;
        Ok(())
    }

    /// Reports a peer found some other way than mDNS — a `--peer` the control plane
    /// reached — through the same filters and the same event stream.
    pub fn add_peer(&self, advert: PeerAdvert) {
        let local = LocalAddresses::default();
        lock(&self.shared.table).upsert(
            Source::Manual(advert.node_id.clone()),
            advert,
            &mut |ip| local.contains(ip),
        );
        self.shared.flush();
    }

    /// The control plane believes `node_id` is dead.
    ///
    /// mDNS alone would keep a peer that died without a goodbye for two minutes. For a
    /// peer mDNS knows, this asks the network to confirm it; if it stays silent for
    /// the verify timeout, a [`DiscoveryEvent::Lost`] follows. A manually added peer
    /// has nothing else vouching for it and is dropped at once.
    pub fn verify(&self, node_id: &NodeId) -> Result<(), DiscoveryError> {
        let names = {
            let mut table = lock(&self.shared.table);
            table.remove(&Source::Manual(node_id.clone()));
            table.mdns_names(node_id)
        };
        self.shared.flush();
        for name in names {
            tracing::debug!(%node_id, instance = %name, "asking mDNS to verify a peer");
            self.daemon
                .verify(name, self.verify_timeout)
                .map_err(mdns("verify a peer"))?;
        }
        Ok(())
    }

    /// Says goodbye on the network, so peers drop this node now rather than in two
    /// minutes, and stops the mDNS daemon. The event channel closes once drained.
    ///
    /// Must run inside a Tokio runtime: the waits for the daemon happen on its
    /// blocking pool. Everything else in this type works with or without one.
    pub async fn shutdown(mut self) -> Result<(), DiscoveryError> {
        let daemon = self.daemon.clone();
        let fullname = self.fullname.clone();
        let pump = self.pump.take();
        let stopped = tokio::task::spawn_blocking(move || {
            match daemon.unregister(&fullname) {
                Ok(status) => match status.recv_timeout(DAEMON_REPLY_TIMEOUT) {
                    Ok(status) => tracing::debug!(?status, "mDNS goodbye sent"),
                    Err(e) => tracing::warn!("mDNS did not confirm the goodbye: {e}"),
                },
                Err(e) => tracing::warn!("mDNS goodbye failed: {e}"),
            }
            thread::sleep(GOODBYE_REPEAT);
            let status = daemon.shutdown().map_err(mdns("stop the mDNS daemon"))?;
            if let Err(e) = status.recv_timeout(DAEMON_REPLY_TIMEOUT) {
                tracing::warn!("mDNS daemon did not confirm its shutdown: {e}");
            }
            // The daemon's exit closes the browse channel, which ends the pump.
            if let Some(pump) = pump {
                if pump.join().is_err() {
                    tracing::error!("the discovery thread panicked");
                }
            }
            Ok(())
        })
        .await;
        match stopped {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down; the daemon stops with the process.
            Err(_) => Ok(()),
        }
    }
}

/// Without a [`Discovery::shutdown`], still say goodbye: the mDNS daemon sends one for
/// everything it registered as it exits. Nothing waits for it to go out.
impl Drop for Discovery {
    fn drop(&mut self) {
        if self.pump.is_some() {
            let _ = self.daemon.shutdown();
        }
    }
}

/// State shared between the handle and the event pump thread.
struct Shared {
    table: Mutex<PeerTable>,
    events: mpsc::Sender<DiscoveryEvent>,
}

impl Shared {
    /// Turns mDNS events into discovery events until the daemon stops.
    ///
    /// mdns-sd ends a browse for good, silently, once 1000 of its events go unread; so
    /// this thread must never wait on the node. It delivers with `try_send` and keeps
    /// what does not fit in the table's coalescing queue, retrying every
    /// [`RETRY_INTERVAL`].
    fn pump(
        &self,
        browse: &mdns_sd::Receiver<ServiceEvent>,
        monitor: &mdns_sd::Receiver<DaemonEvent>,
    ) {
        loop {
            let wait = if lock(&self.table).pending().is_empty() {
                IDLE_INTERVAL
            } else {
                RETRY_INTERVAL
            };
            match browse.recv_timeout(wait) {
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while let Ok(event) = monitor.try_recv() {
                log_daemon_event(event);
            }
            self.flush();
        }
        tracing::debug!("mDNS discovery stopped");
    }

    fn handle(&self, event: ServiceEvent) {
        match event {
            ServiceEvent::ServiceResolved(service) => self.resolved(&service),
            ServiceEvent::ServiceRemoved(_, fullname) => {
                tracing::debug!(instance = %fullname, "mDNS instance removed");
                lock(&self.table).remove(&Source::Mdns(fullname));
            }
            other => tracing::trace!(event = ?other, "mDNS"),
        }
    }

    fn resolved(&self, service: &ResolvedService) {
        let source = Source::Mdns(service.fullname.clone());
        let addresses = usable_addresses(service.addresses.iter().map(ScopedIp::to_ip_addr));
        let props = service
            .txt_properties
            .iter()
            .map(|prop| (prop.key(), prop.val().unwrap_or_default()));
        let mut table = lock(&self.table);
        match PeerAdvert::from_txt(props, addresses) {
            Ok(advert) if advert.addresses.is_empty() => {
                tracing::debug!(instance = %service.fullname, "ignoring an advert without a usable address");
                table.remove(&source);
            }
            Ok(advert) => {
                let local = LocalAddresses::default();
                table.upsert(source, advert, &mut |ip| local.contains(ip));
            }
            Err(error) => {
                tracing::debug!(instance = %service.fullname, %error, "ignoring a malformed advert");
                table.remove(&source);
            }
        }
    }

    /// Delivers what the node has room for.
    fn flush(&self) {
        let mut table = lock(&self.table);
        while let Some(event) = table.pending().pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    table.pending().push_front(event);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // Nobody listens any more; don't hoard events for no one.
                    table.pending().clear();
                    break;
                }
            }
        }
    }
}

/// The mDNS instance for `advert`: named by the node id, so peers browsing by hand
/// (`avahi-browse _hearth._tcp`) see which node is which.
fn service_info(advert: &PeerAdvert) -> Result<ServiceInfo, DiscoveryError> {
    // Publishing only what a peer would accept keeps a bad field from going out.
    let txt = advert.to_txt();
    PeerAdvert::from_txt(txt.iter().map(|(k, v)| (k, v.as_bytes())), Vec::new())
        .map_err(DiscoveryError::InvalidAdvert)?;
    let instance = &advert.node_id.0;
    if instance.len() > 63 {
        return Err(DiscoveryError::NodeIdTooLong(advert.node_id.clone()));
    }
    // The host name only has to be unique per node and a valid DNS label; a hash of
    // the id is both, whatever case the base58 id is in.
    let host = format!(
        "hearth-{}.local.",
        &hex::encode(Sha256::digest(instance.as_bytes()))[..16]
    );
    let info = ServiceInfo::new(
        SERVICE_TYPE,
        instance,
        &host,
        (),
        advert.control_port,
        &txt[..],
    )
    .map_err(mdns("describe this node"))?;
    Ok(info.enable_addr_auto())
}

/// The addresses worth dialling, in a stable order. IPv6 link-local addresses go: an
/// `IpAddr` cannot carry the scope they need.
fn usable_addresses(addresses: impl Iterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut usable: Vec<IpAddr> = addresses
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast() && !ip.is_loopback())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_broadcast(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    usable.sort_unstable();
    usable.dedup();
    usable.truncate(MAX_ADDRESSES);
    usable
}

/// This machine's addresses, read once and only if asked: only adverts carrying our
/// own id need them.
#[derive(Default)]
struct LocalAddresses(OnceCell<Option<HashSet<IpAddr>>>);

impl LocalAddresses {
    /// If the interfaces cannot be read, every address counts as ours: better to miss
    /// a duplicate (the control plane's handshake sees it too) than to cry wolf.
    fn contains(&self, ip: &IpAddr) -> bool {
        self.0
            .get_or_init(|| {
                if_addrs::get_if_addrs()
                    .map_err(|e| tracing::debug!("cannot list this machine's addresses: {e}"))
                    .ok()
                    .map(|interfaces| interfaces.iter().map(|intf| intf.ip()).collect())
            })
            .as_ref()
            .is_none_or(|local| local.contains(ip))
    }
}

/// An `--interface` must exist; the automatic choice may legitimately find nothing
/// yet (a laptop before its Wi-Fi joins), which only deserves a warning.
fn check_interfaces(policy: &InterfacePolicy) -> Result<(), DiscoveryError> {
    let interfaces = match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces,
        Err(e) => {
            tracing::debug!("cannot list network interfaces: {e}");
            return Ok(());
        }
    };
    if interfaces
        .iter()
        .any(|intf| policy.allows(&intf.name, intf.is_loopback()))
    {
        return Ok(());
    }
    let mut names: Vec<&str> = interfaces.iter().map(|intf| intf.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let available = names.join(", ");
    match policy {
        InterfacePolicy::Only(name) => Err(DiscoveryError::NoSuchInterface {
            name: name.clone(),
            available,
        }),
        InterfacePolicy::Auto => {
            tracing::warn!(interfaces = %available, "no network interface fit for mDNS yet; pick one with --interface, or name peers with --peer");
            Ok(())
        }
    }
}

fn log_daemon_event(event: DaemonEvent) {
    match event {
        DaemonEvent::Error(e) => tracing::warn!("mDNS daemon: {e}"),
        // A name conflict on our instance or host name means another host claims it:
        // most likely a node sharing our id, which discovery reports by address too.
        DaemonEvent::NameChange(change) => tracing::warn!(
            original = %change.original,
            new_name = %change.new_name,
            "mDNS name conflict: another host on the network claims this node's name"
        ),
        DaemonEvent::IpAdd(ip) => tracing::debug!(%ip, "mDNS: address added"),
        DaemonEvent::IpDel(ip) => tracing::debug!(%ip, "mDNS: address removed"),
        other => tracing::trace!(event = ?other, "mDNS daemon"),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent, so a panic elsewhere
    // doesn't make it unusable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_addresses_are_dropped_and_the_rest_ordered() {
        let addrs = [
            "192.0.2.9",
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.251",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "fd00::2",
            "192.0.2.3",
            "192.0.2.9",
        ];
        let usable = usable_addresses(addrs.iter().map(|a| a.parse().unwrap()));
        let expected: Vec<IpAddr> = ["192.0.2.3", "192.0.2.9", "fd00::2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(usable, expected);
    }

    #[test]
    fn addresses_are_capped() {
        let many = (0..100u8).map(|i| IpAddr::from([192, 0, 2, i]));
        assert_eq!(usable_addresses(many).len(), MAX_ADDRESSES);
    }
}

/// Needs real multicast, which it gets inside a network namespace of its own, as in
/// `tests/mdns.rs` (see there for the rest, and for why the namespace is set up so).
#[cfg(test)]
mod mdns_tests {
    use std::time::Instant;

    use super::*;
    use crate::identity::Identity;
    use crate::netns_testing::in_private_netns;

    #[test]
    fn the_handle_can_be_shared_across_tasks() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Discovery>();
        shareable::<DiscoveryEvent>();
    }

    /// Whether an event matching `wanted` arrives within 5 s; a `Found` matches by
    /// node id alone.
    async fn arrives(rx: &mut mpsc::Receiver<DiscoveryEvent>, wanted: DiscoveryEvent) -> bool {
        let matches = |event: &DiscoveryEvent| match (event, &wanted) {
            (DiscoveryEvent::Found(x), DiscoveryEvent::Found(y)) => x.node_id == y.node_id,
            _ => *event == wanted,
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(event) = rx.recv().await {
                if matches(&event) {
                    return;
                }
            }
            std::future::pending::<()>().await
        })
        .await
        .is_ok()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verify_clears_a_peer_that_went_silent() {
        if !in_private_netns("discovery::mdns_tests::verify_clears_a_peer_that_went_silent") {
            return;
        }
        let cluster = ClusterHash::of(&Identity::generate().node_id().0);
        let advert = |port| PeerAdvert {
            node_id: Identity::generate().node_id(),
            addresses: vec![],
            control_port: port,
            data_port: port + 1,
            api_port: port + 2,
            usable_memory_bytes: 1 << 30,
            backend: Backend::Cpu,
            cluster_hash: cluster,
        };
        // At opposite ends of the namespace's veth pair.
        let config = |interface: &str| DiscoveryConfig {
            interfaces: InterfacePolicy::Only(interface.to_owned()),
            mdns_port: 5398,
            verify_timeout: Duration::from_secs(2),
            ..DiscoveryConfig::default()
        };
        let (a, b) = (advert(7700), advert(7800));
        let (silent, _silent_rx) = Discovery::start(a.clone(), config("hm0")).unwrap();
        let (watcher, mut rx) = Discovery::start(b, config("hm1")).unwrap();
        assert!(
            arrives(&mut rx, DiscoveryEvent::Found(a.clone())).await,
            "never found A"
        );

        // A live peer survives verification.
        watcher.verify(&a.node_id).unwrap();
        assert!(
            !arrives(&mut rx, DiscoveryEvent::Lost(a.node_id.clone())).await,
            "a live peer was dropped"
        );

        // Cut A off the network without a goodbye, as a crash would.
        silent
            .daemon
            .disable_interface(mdns_sd::IfKind::All)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let asked = Instant::now();
        watcher.verify(&a.node_id).unwrap();
        assert!(
            arrives(&mut rx, DiscoveryEvent::Lost(a.node_id.clone())).await,
            "a silent peer was kept"
        );
        eprintln!("silent peer dropped {:?} after verify", asked.elapsed());
        watcher.shutdown().await.unwrap();
        silent.shutdown().await.unwrap();
    }
}
