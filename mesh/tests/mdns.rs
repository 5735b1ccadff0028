//! Discovery over real mDNS multicast, between `Discovery` instances in this process.
//!
//! Tests that start an mDNS daemon never run on this machine's network: each one runs
//! again, as a child process, inside a network namespace of its own (see
//! `hearth_mesh::netns_testing`), where a veth pair joins `hm0` and `hm1`. A node on `hm0`
//! hears a node on `hm1` only through the pair, so the multicast is real, and none of
//! it can leave the namespace. The port is a private one besides (not 5353).

use std::time::{Duration, Instant};

use hearth_mesh::discovery::{
    Backend, ClusterHash, Discovery, DiscoveryConfig, DiscoveryEvent, InterfacePolicy, PeerAdvert,
};
use hearth_mesh::identity::Identity;
use hearth_mesh::netns_testing::in_private_netns;
use tokio::sync::mpsc::Receiver;

const TEST_MDNS_PORT: u16 = 5399;
const PATIENCE: Duration = Duration::from_secs(5);

/// mDNS on just `interface`: `hm0` or `hm1`, the two ends of the namespace's veth pair.
fn config(interface: &str) -> DiscoveryConfig {
    DiscoveryConfig {
        interfaces: InterfacePolicy::Only(interface.to_owned()),
        mdns_port: TEST_MDNS_PORT,
        ..DiscoveryConfig::default()
    }
}

fn advert(cluster: &str, base_port: u16) -> PeerAdvert {
    PeerAdvert {
        node_id: Identity::generate().node_id(),
        addresses: vec![],
        control_port: base_port,
        data_port: base_port + 1,
        api_port: base_port + 2,
        usable_memory_bytes: 8 << 30,
        backend: Backend::Cpu,
        cluster_hash: ClusterHash::of(cluster),
    }
}

/// A cluster name no other test run shares.
fn unique_cluster(tag: &str) -> String {
    format!("{tag}-{}", Identity::generate().node_id())
}

/// Waits for the first event `wanted` accepts, keeping every event seen on the way.
async fn wait_for(
    rx: &mut Receiver<DiscoveryEvent>,
    seen: &mut Vec<DiscoveryEvent>,
    what: &str,
    wanted: impl Fn(&DiscoveryEvent) -> bool,
) -> Duration {
    let start = Instant::now();
    let found = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = rx.recv().await {
            let done = wanted(&event);
            seen.push(event);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "timed out waiting for {what}; saw {seen:#?}"
    );
    start.elapsed()
}

fn found(advert: &PeerAdvert) -> impl Fn(&DiscoveryEvent) -> bool + '_ {
    move |event| matches!(event, DiscoveryEvent::Found(a) if a.node_id == advert.node_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_find_each_other_update_and_say_goodbye() {
    if !in_private_netns("two_nodes_find_each_other_update_and_say_goodbye") {
        return;
    }
    let cluster = unique_cluster("home");
    let (a_advert, b_advert) = (advert(&cluster, 7700), advert(&cluster, 7800));
    let stranger = advert(&unique_cluster("work"), 7900);

    // A and B at opposite ends of the pair; the stranger is on B's.
    let (c, _c_rx) = Discovery::start(stranger.clone(), config("hm1")).unwrap();
    let (a, mut a_rx) = Discovery::start(a_advert.clone(), config("hm0")).unwrap();
    let started = Instant::now();
    let (b, mut b_rx) = Discovery::start(b_advert.clone(), config("hm1")).unwrap();
    let (mut a_seen, mut b_seen) = (Vec::new(), Vec::new());

    let b_saw_a = wait_for(&mut b_rx, &mut b_seen, "B to find A", found(&a_advert)).await;
    wait_for(&mut a_rx, &mut a_seen, "A to find B", found(&b_advert)).await;
    eprintln!(
        "newcomer B found A after {b_saw_a:?}; A found B {:?} after B started",
        started.elapsed()
    );

    let Some(DiscoveryEvent::Found(a_as_seen)) = b_seen.last().cloned() else {
        unreachable!()
    };
    assert_eq!(
        PeerAdvert {
            addresses: vec![],
            ..a_as_seen.clone()
        },
        a_advert,
        "B sees A's advert as A published it"
    );
    assert!(!a_as_seen.addresses.is_empty(), "{a_as_seen:?}");
    let ours = if_addrs::get_if_addrs().unwrap();
    for ip in &a_as_seen.addresses {
        assert!(
            ours.iter().any(|intf| intf.ip() == *ip),
            "{ip} is not this machine's"
        );
    }

    // A memory change reaches the peer as a fresh Found.
    let grown = PeerAdvert {
        usable_memory_bytes: 12 << 30,
        ..a_advert.clone()
    };
    a.update(grown.clone()).unwrap();
    assert_eq!(a.advert(), grown);
    let took = wait_for(&mut b_rx, &mut b_seen, "B to see A's new memory", |event| {
        matches!(event, DiscoveryEvent::Found(seen) if seen.usable_memory_bytes == 12 << 30)
    })
    .await;
    eprintln!("advert update seen after {took:?}");
    assert!(
        a.update(advert(&cluster, 7700)).is_err(),
        "the node id is fixed"
    );

    // A clean shutdown is a goodbye the peer sees at once, not after the 120 s TTL.
    b.shutdown().await.unwrap();
    let b_id = b_advert.node_id.clone();
    let took = wait_for(&mut a_rx, &mut a_seen, "A to see B leave", |event| {
        *event == DiscoveryEvent::Lost(b_id.clone())
    })
    .await;
    eprintln!("goodbye seen after {took:?}");

    // Nothing from the other cluster, and no node ever reports itself.
    for event in a_seen.iter().chain(&b_seen) {
        let id = event.node_id();
        assert_ne!(id, Some(&stranger.node_id), "{event:?}");
        assert!(
            !matches!(event, DiscoveryEvent::DuplicateId { .. }),
            "{event:?}"
        );
    }
    assert!(!a_seen
        .iter()
        .any(|e| e.node_id() == Some(&a_advert.node_id)));

    a.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
    // With the daemon gone, the stream ends.
    assert_eq!(tokio::time::timeout(PATIENCE, a_rx.recv()).await, Ok(None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_peers_join_the_same_stream() {
    // The mDNS daemon joins its multicast group on every interface as it starts.
    if !in_private_netns("manual_peers_join_the_same_stream") {
        return;
    }
    let cluster = unique_cluster("manual");
    let me = advert(&cluster, 7700);
    // This test needs no multicast, but the daemon still starts and announces.
    let (discovery, mut rx) = Discovery::start(me.clone(), config("hm0")).unwrap();
    let mut seen = Vec::new();

    let peer = PeerAdvert {
        addresses: vec!["192.0.2.50".parse().unwrap()],
        ..advert(&cluster, 7700)
    };
    discovery.add_peer(peer.clone());
    // Another cluster's peer is filtered exactly as an mDNS one would be.
    discovery.add_peer(PeerAdvert {
        addresses: vec!["192.0.2.51".parse().unwrap()],
        ..advert("elsewhere", 7700)
    });
    wait_for(&mut rx, &mut seen, "the manual peer", found(&peer)).await;

    // Our own id from an address that is not ours: someone copied our data folder.
    discovery.add_peer(PeerAdvert {
        addresses: vec!["192.0.2.99".parse().unwrap()],
        ..me.clone()
    });
    wait_for(&mut rx, &mut seen, "the duplicate", |event| {
        *event
            == DiscoveryEvent::DuplicateId {
                addresses: vec!["192.0.2.99".parse().unwrap()],
            }
    })
    .await;

    // Nothing but the control plane vouches for a manual peer, so verify drops it.
    discovery.verify(&peer.node_id).unwrap();
    let id = peer.node_id.clone();
    wait_for(&mut rx, &mut seen, "the manual peer's loss", |event| {
        *event == DiscoveryEvent::Lost(id.clone())
    })
    .await;
    assert_eq!(seen.len(), 3, "{seen:#?}");
    discovery.shutdown().await.unwrap();
}

// These two are refused before any mDNS daemon starts, so they run right here.

#[test]
fn a_missing_interface_is_refused_by_name() {
    let err = Discovery::start(advert("x", 7700), config("no-such-if0"))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(msg.contains("no-such-if0"), "{msg}");
}

#[test]
fn an_invalid_own_advert_is_refused() {
    let bad = PeerAdvert {
        control_port: 0,
        ..advert("x", 7700)
    };
    assert!(Discovery::start(bad, config("no-such-if0")).is_err());
}
