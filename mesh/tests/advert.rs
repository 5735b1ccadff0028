//! The TXT advert is read from anyone on the link: it must round-trip, reject every
//! malformed field, and never panic.

use std::collections::HashMap;
use std::net::IpAddr;

use hearth_mesh::discovery::{
    AdvertError, Backend, ClusterHash, ManualPeer, ManualPeerError, PeerAdvert, PeerHost,
};
use hearth_mesh::identity::Identity;
use proptest::prelude::*;

fn sample() -> PeerAdvert {
    PeerAdvert {
        node_id: Identity::generate().node_id(),
        addresses: vec!["192.0.2.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        control_port: 7700,
        data_port: 7701,
        api_port: 8080,
        usable_memory_bytes: 24 << 30,
        backend: Backend::Metal,
        cluster_hash: ClusterHash::of("home"),
    }
}

/// The sample's TXT pairs with `key` replaced by `value` (or removed if `None`).
fn with(key: &str, value: Option<&[u8]>) -> Vec<(String, Vec<u8>)> {
    let mut props: Vec<(String, Vec<u8>)> = sample()
        .to_txt()
        .into_iter()
        .filter(|(k, _)| *k != key)
        .map(|(k, v)| (k.to_owned(), v.into_bytes()))
        .collect();
    if let Some(value) = value {
        props.push((key.to_owned(), value.to_vec()));
    }
    props
}

fn parse(props: Vec<(String, Vec<u8>)>) -> Result<PeerAdvert, AdvertError> {
    PeerAdvert::from_txt(props, vec![])
}

#[test]
fn round_trip() {
    let advert = sample();
    let txt = advert.to_txt();
    let back = PeerAdvert::from_txt(txt.iter().map(|(k, v)| (k, v)), advert.addresses.clone());
    assert_eq!(back, Ok(advert));
}

#[test]
fn every_key_fits_one_txt_string_and_the_record_is_small() {
    let advert = PeerAdvert {
        usable_memory_bytes: u64::MAX,
        control_port: u16::MAX,
        ..sample()
    };
    let txt = advert.to_txt();
    assert!(txt.iter().all(|(k, v)| k.len() + 1 + v.len() <= 255));
    assert!(
        txt.iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>()
            < 200
    );
    assert_eq!(txt[0], ("v", "1".to_owned()), "the version leads");
}

#[test]
fn the_cluster_name_never_goes_on_the_wire() {
    let advert = PeerAdvert {
        cluster_hash: ClusterHash::of("my-secret-cluster"),
        ..sample()
    };
    assert!(advert
        .to_txt()
        .iter()
        .all(|(_, v)| !v.contains("my-secret-cluster")));
}

#[test]
fn keys_are_case_insensitive_first_wins_and_unknown_ignored() {
    let mut props = with("mem", None);
    props.insert(0, ("MEM".to_owned(), b"5".to_vec()));
    props.push(("mem".to_owned(), b"6".to_vec()));
    props.push(("future-key".to_owned(), b"whatever \xff".to_vec()));
    props.push(("".to_owned(), b"".to_vec()));
    assert_eq!(parse(props).unwrap().usable_memory_bytes, 5);
}

#[test]
fn missing_keys_are_rejected() {
    for key in [
        "v", "id", "control", "data", "api", "mem", "backend", "cluster",
    ] {
        assert_eq!(
            parse(with(key, None)),
            Err(AdvertError::Missing(key)),
            "{key}"
        );
    }
}

#[test]
fn other_versions_are_rejected() {
    assert_eq!(
        parse(with("v", Some(b"2"))),
        Err(AdvertError::UnsupportedVersion("2".to_owned()))
    );
    for bad in [&b""[..], b"01", b"1.0", b" 1", b"123456789", b"\xff"] {
        assert!(parse(with("v", Some(bad))).is_err(), "{bad:?}");
    }
}

#[test]
fn malformed_numbers_are_rejected() {
    let long = "9".repeat(300);
    let bad_numbers: [&[u8]; 13] = [
        b"",
        b"-1",
        b"+1",
        b"1.5",
        b"abc",
        b"0x10",
        b" 1",
        b"1 ",
        b"07",
        b"18446744073709551616",
        long.as_bytes(),
        b"\xff\xfe",
        b"1\x00",
    ];
    for key in ["control", "data", "api", "mem"] {
        for bad in bad_numbers {
            assert!(
                matches!(
                    parse(with(key, Some(bad))),
                    Err(AdvertError::Invalid { .. })
                ),
                "{key}={bad:?}"
            );
        }
    }
    for key in ["control", "data", "api"] {
        for bad in [&b"0"[..], b"65536", b"4294967296"] {
            assert!(parse(with(key, Some(bad))).is_err(), "{key}={bad:?}");
        }
    }
    assert_eq!(
        parse(with("mem", Some(b"0"))).unwrap().usable_memory_bytes,
        0
    );
    assert_eq!(
        parse(with("mem", Some(b"18446744073709551615")))
            .unwrap()
            .usable_memory_bytes,
        u64::MAX
    );
}

#[test]
fn malformed_ids_backends_and_clusters_are_rejected() {
    let id = sample().node_id.0;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("id", b"".to_vec()),
        ("id", b"node-a".to_vec()),
        ("id", id.as_bytes()[..id.len() - 1].to_vec()),
        ("id", format!("{id}{id}").into_bytes()),
        ("id", "1".repeat(1000).into_bytes()),
        ("id", b"\xff\xff".to_vec()),
        ("backend", b"".to_vec()),
        ("backend", b"rocm".to_vec()),
        ("backend", b"CPU".to_vec()),
        ("backend", "cpu".repeat(100).into_bytes()),
        ("cluster", b"".to_vec()),
        ("cluster", b"home".to_vec()),
        ("cluster", b"0123456789ABCDEF".to_vec()),
        ("cluster", b"0123456789abcdefff".to_vec()),
        ("cluster", b"0123456789abcdeg".to_vec()),
    ];
    for (key, value) in cases {
        assert!(parse(with(key, Some(&value))).is_err(), "{key}={value:?}");
    }
}

#[test]
fn a_different_cluster_has_a_different_hash() {
    let home = parse(with(
        "cluster",
        Some(ClusterHash::of("home").to_string().as_bytes()),
    ));
    let work = parse(with(
        "cluster",
        Some(ClusterHash::of("work").to_string().as_bytes()),
    ));
    assert_ne!(home.unwrap().cluster_hash, work.unwrap().cluster_hash);
}

#[test]
fn errors_do_not_echo_long_input() {
    let long = "x".repeat(10_000);
    for key in ["v", "id", "mem", "backend", "cluster"] {
        let err = parse(with(key, Some(long.as_bytes()))).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }
}

proptest! {
    #[test]
    fn arbitrary_maps_never_panic(
        props in prop::collection::hash_map(".{0,12}", prop::collection::vec(any::<u8>(), 0..300), 0..20)
    ) {
        let _ = PeerAdvert::from_txt(props, vec![]);
    }

    #[test]
    fn arbitrary_values_for_known_keys_never_panic(
        values in prop::collection::vec(
            (prop::sample::select(vec!["v", "id", "control", "data", "api", "mem", "backend", "cluster", "ID", "Mem"]),
             prop_oneof![
                 prop::collection::vec(any::<u8>(), 0..80),
                 "[0-9+-]{0,25}".prop_map(String::into_bytes),
             ]),
            0..30),
    ) {
        // Start from a valid advert so each field's own checks are reached.
        let mut props: Vec<(String, Vec<u8>)> = values
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        props.extend(with("unused", None));
        let _ = parse(props);
    }

    #[test]
    fn valid_adverts_round_trip(
        control_port in 1u16.., data_port in 1u16.., api_port in 1u16..,
        usable_memory_bytes in any::<u64>(),
        backend in prop::sample::select(vec![Backend::Cpu, Backend::Metal, Backend::Cuda]),
        cluster in ".{0,40}",
    ) {
        let advert = PeerAdvert {
            control_port, data_port, api_port, usable_memory_bytes, backend,
            cluster_hash: ClusterHash::of(&cluster),
            ..sample()
        };
        let txt = advert.to_txt();
        let back = PeerAdvert::from_txt(txt.iter().map(|(k, v)| (k, v)), advert.addresses.clone());
        prop_assert_eq!(back, Ok(advert));
    }

    #[test]
    fn arbitrary_peer_addresses_never_panic(input in ".{0,300}") {
        let _ = input.parse::<ManualPeer>();
    }
}

#[test]
fn manual_peers_parse_ip_ipv6_and_host_names() {
    let peer: ManualPeer = "192.0.2.7:7700".parse().unwrap();
    assert_eq!(peer.host(), &PeerHost::Ip("192.0.2.7".parse().unwrap()));
    assert_eq!(peer.port(), 7700);
    assert_eq!(peer.to_string(), "192.0.2.7:7700");

    let peer: ManualPeer = "[fd00::2]:7700".parse().unwrap();
    assert_eq!(peer.host(), &PeerHost::Ip("fd00::2".parse().unwrap()));
    assert_eq!(peer.to_string(), "[fd00::2]:7700");

    for name in ["studio.local", "mac-mini", "node1.lan.", "a.b-c.d"] {
        let peer: ManualPeer = format!("{name}:1").parse().unwrap();
        assert_eq!(peer.host(), &PeerHost::Name(name.to_owned()));
        assert_eq!(peer.to_string(), format!("{name}:1"));
    }
}

#[test]
fn manual_peers_reject_bad_input_with_a_useful_error() {
    // Inputs by the kind of error they must give.
    type Kind = fn(String) -> ManualPeerError;
    let cases: [(Kind, &[&str]); 4] = [
        (
            ManualPeerError::MissingPort,
            &["192.0.2.7", "", "[fd00::2]"],
        ),
        (
            ManualPeerError::UnbracketedIpv6,
            &["fd00::2:7700", "fd00::2"],
        ),
        (
            ManualPeerError::InvalidPort,
            &[
                "192.0.2.7:",
                "192.0.2.7:0",
                "192.0.2.7:65536",
                "192.0.2.7:+80",
                "192.0.2.7:-1",
                "192.0.2.7:80 ",
                "192.0.2.7:99999999999999999999",
            ],
        ),
        (
            ManualPeerError::InvalidHost,
            &[
                ":7700",
                "[192.0.2.7]:7700",
                "[fd00::zz]:7700",
                "999.1.1.1:7700",
                "bad_host:7700",
                "-lead:7700",
                "a..b:7700",
                " host:7700",
                "http://host:7700",
            ],
        ),
    ];
    for (kind, inputs) in cases {
        for input in inputs {
            let err = input.parse::<ManualPeer>().unwrap_err();
            assert_eq!(err, kind(input.to_string()), "{input:?}");
            assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
        }
    }
    let long = format!("{}:7700", "a.".repeat(200));
    assert!(long.parse::<ManualPeer>().is_err());
}

#[tokio::test]
async fn a_manual_peer_resolves_and_yields_the_same_advert() {
    let peer: ManualPeer = "127.0.0.1:7700".parse().unwrap();
    assert_eq!(
        peer.resolve().await.unwrap(),
        vec!["127.0.0.1:7700".parse().unwrap()]
    );

    let theirs = sample();
    let address: IpAddr = "192.0.2.7".parse().unwrap();
    let txt: HashMap<&str, String> = theirs.to_txt().into_iter().collect();
    let advert = peer.advert(&txt, address).unwrap();
    assert_eq!(
        advert,
        PeerAdvert {
            addresses: vec![address],
            ..theirs.clone()
        }
    );

    let elsewhere: ManualPeer = "192.0.2.7:7800".parse().unwrap();
    assert_eq!(
        elsewhere.advert(&txt, address),
        Err(AdvertError::ControlPortMismatch {
            dialled: 7800,
            advertised: 7700
        })
    );
}
