//! The fuzz corpus of `fuzz/` replayed on stable: every input the fuzzer kept for the
//! mesh targets still parses without a panic.

#[path = "../../fuzz/replay.rs"]
mod replay;

use hearth_mesh::control::{HopReport, NodeInfo, Plan, PlanStage};
use hearth_mesh::discovery::{Backend, ClusterHash, PeerAdvert};
use hearth_mesh::fuzzing;
use hearth_mesh::NodeId;
use serde_json::json;

#[test]
fn txt_record_corpus() {
    replay::replay("txt_record", fuzzing::txt_record);
}

#[test]
fn gossip_corpus() {
    replay::replay("gossip", fuzzing::gossip);
}

/// TXT record data: each string prefixed by its length.
fn txt_data(pairs: &[(&str, String)]) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, value) in pairs {
        let string = format!("{key}={value}");
        data.push(u8::try_from(string.len()).unwrap());
        data.extend_from_slice(string.as_bytes());
    }
    data
}

/// Valid adverts and gossip, for the fuzzer to start from:
/// `cargo test -p hearth-mesh --test fuzz_corpus -- --ignored`.
#[test]
#[ignore = "writes the seed corpus"]
fn write_seed_corpus() {
    let author = fuzzing::gossip_author().to_base58();
    let advert = PeerAdvert {
        node_id: NodeId(author.clone()),
        addresses: Vec::new(),
        control_port: 5282,
        data_port: 5281,
        api_port: 5280,
        usable_memory_bytes: 8 << 30,
        backend: Backend::Cpu,
        cluster_hash: ClusterHash::of("hearth"),
    };
    let mut txt = advert.to_txt();
    let valid = txt_data(&txt);
    txt.push(("future", "1".into()));
    txt.reverse();
    replay::write_seeds("txt_record", &[valid, txt_data(&txt)]);

    let info = NodeInfo {
        node_id: author.clone(),
        data_addr: "192.168.1.20:5281".parse().unwrap(),
        api_addr: "127.0.0.1:5280".parse().unwrap(),
        usable_memory_bytes: 8 << 30,
        backend: "cpu".into(),
        model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        ready_epoch: Some(3),
        following_epoch: Some(3),
        data_paths: vec!["192.168.1.20:5281".parse().unwrap(), "[fd00::20]:5281".parse().unwrap()],
        hops: vec![HopReport {
            to: author.clone(),
            addr: "10.1.0.2:5281".parse().unwrap(),
            interface: "eth1".into(),
            rtt_us: 60,
            bytes_per_second: 1 << 30,
        }],
        prepared: Some(0..12),
    };
    let plan = Plan {
        epoch: 3,
        coordinator: author.clone(),
        model_id: info.model_id.clone(),
        stages: vec![PlanStage { node_id: author, data_addr: info.data_addr, layers: 0..30 }],
    };
    let messages = [
        json!({ "v": 1, "body": { "announce": { "info": info, "listen": ["192.168.1.20:5282"] } } }),
        json!({ "v": 1, "body": { "plan": plan } }),
        json!({ "v": 1, "body": "goodbye" }),
    ];
    let encoded: Vec<Vec<u8>> = messages.iter().map(|message| serde_json::to_vec(message).unwrap()).collect();
    for message in &encoded {
        // Seeds that fail the checks would start the fuzzer off in the shallows.
        assert!(std::panic::catch_unwind(|| fuzzing::gossip(message)).is_ok());
    }
    replay::write_seeds("gossip", &encoded);
}
