//! Properties of `place` over random models and clusters, checked against a direct
//! reading of the spec rather than against the implementation's own helpers.

use std::ops::Range;

use hearth_mesh::{place, ModelProfile, NodeCapacity, Placement, PlacementError};
use proptest::prelude::*;

prop_compose! {
    fn profiles()(
        layer_bytes in prop::collection::vec(0u64..=1_000, 1..=128),
        embedding_bytes in 0u64..=5_000,
        head_bytes in 0u64..=5_000,
        kv_bytes_per_token_per_layer in 0u64..=4,
        context_tokens in 0u64..=64,
    ) -> ModelProfile {
        ModelProfile {
            num_layers: layer_bytes.len(),
            layer_bytes,
            embedding_bytes,
            head_bytes,
            kv_bytes_per_token_per_layer,
            context_tokens,
        }
    }
}

/// Nodes sized in percent of the whole model, from far too small to ample; a fixed 50%
/// makes ties in memory common, so the tie-break by id is exercised.
fn cluster(model_bytes: u64, percents: Vec<u64>) -> Vec<NodeCapacity> {
    percents
        .into_iter()
        .enumerate()
        .map(|(i, percent)| NodeCapacity {
            id: format!("node-{i}").into(),
            usable_memory_bytes: model_bytes * percent / 100,
        })
        .collect()
}

prop_compose! {
    fn models_and_clusters()(
        model in profiles(),
        percents in prop::collection::vec(prop_oneof![0u64..=150, Just(50)], 1..=8),
    ) -> (ModelProfile, Vec<NodeCapacity>) {
        let nodes = cluster(whole_model_bytes(&model), percents);
        (model, nodes)
    }
}

/// The spec's cost of a stage holding `layers`.
fn stage_bytes(model: &ModelProfile, layers: Range<usize>) -> u64 {
    let kv_per_layer = model.kv_bytes_per_token_per_layer * model.context_tokens;
    let mut bytes: u64 = model.layer_bytes[layers.clone()]
        .iter()
        .map(|&w| w + kv_per_layer)
        .sum();
    if layers.start == 0 {
        bytes += model.embedding_bytes;
    }
    if layers.end == model.num_layers {
        bytes += model.head_bytes;
    }
    bytes
}

fn whole_model_bytes(model: &ModelProfile) -> u64 {
    stage_bytes(model, 0..model.num_layers)
}

/// Nodes in the documented pipeline order: most memory first, then by id.
fn pipeline_order(nodes: &[NodeCapacity]) -> Vec<NodeCapacity> {
    let mut ordered = nodes.to_vec();
    ordered.sort_by(|a, b| {
        b.usable_memory_bytes
            .cmp(&a.usable_memory_bytes)
            .then(a.id.cmp(&b.id))
    });
    ordered
}

/// Whether any split fits in pipeline order: each node taking all the layers it can
/// never leaves the rest harder to place, so this greedy split fits if any does.
fn some_split_fits(model: &ModelProfile, nodes: &[NodeCapacity]) -> bool {
    let mut start = 0;
    for node in pipeline_order(nodes) {
        start = (start..=model.num_layers)
            .take_while(|&end| {
                end == start || stage_bytes(model, start..end) <= node.usable_memory_bytes
            })
            .last()
            .unwrap_or(start);
    }
    start == model.num_layers
}

fn assert_valid(model: &ModelProfile, nodes: &[NodeCapacity], placement: &Placement) {
    let order = pipeline_order(nodes);
    let mut next_layer = 0;
    let mut previous_position = None;
    for stage in &placement.stages {
        assert_eq!(
            stage.layers.start, next_layer,
            "ranges must be contiguous and in order"
        );
        assert!(!stage.layers.is_empty(), "empty stage on {}", stage.node);
        next_layer = stage.layers.end;

        let position = order
            .iter()
            .position(|node| node.id == stage.node)
            .expect("a stage on an unknown node");
        assert!(
            previous_position < Some(position),
            "stages out of pipeline order"
        );
        previous_position = Some(position);

        assert_eq!(stage.bytes_needed, stage_bytes(model, stage.layers.clone()));
        assert!(
            stage.bytes_needed <= order[position].usable_memory_bytes,
            "stage on {} does not fit",
            stage.node
        );
    }
    assert_eq!(next_layer, model.num_layers, "every layer must be placed");

    let total: u64 = placement
        .stages
        .iter()
        .map(|stage| stage.bytes_needed)
        .sum();
    assert_eq!(total, whole_model_bytes(model));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn placements_cover_every_layer_once_and_fit((model, nodes) in models_and_clusters()) {
        if let Ok(placement) = place(&model, &nodes) {
            assert_valid(&model, &nodes, &placement);
        }
    }

    #[test]
    fn fails_exactly_when_no_split_fits((model, nodes) in models_and_clusters()) {
        let needed = whole_model_bytes(&model);
        let available: u64 = nodes.iter().map(|node| node.usable_memory_bytes).sum();
        match place(&model, &nodes) {
            Ok(_) => prop_assert!(some_split_fits(&model, &nodes)),
            Err(error) => {
                prop_assert!(!some_split_fits(&model, &nodes));
                let expected = PlacementError::InsufficientMemory {
                    needed_bytes: needed,
                    available_bytes: available,
                };
                prop_assert_eq!(error, expected);
            }
        }
        if available < needed {
            prop_assert!(place(&model, &nodes).is_err());
        }
    }

    #[test]
    fn the_order_nodes_were_discovered_in_does_not_matter(
        (model, nodes, shuffled) in models_and_clusters().prop_flat_map(|(model, nodes)| {
            let shuffled = Just(nodes.clone()).prop_shuffle();
            (Just(model), Just(nodes), shuffled)
        })
    ) {
        prop_assert_eq!(place(&model, &nodes), place(&model, &shuffled));
    }

    #[test]
    fn ample_memory_gives_each_node_its_proportional_share(
        model in profiles(),
        percents in prop::collection::vec(100u64..=400, 1..=8),
    ) {
        let model_bytes = whole_model_bytes(&model);
        prop_assume!(model_bytes > 0);
        let nodes = cluster(model_bytes, percents);
        let placement = place(&model, &nodes).expect("every node could hold the whole model");
        assert_valid(&model, &nodes, &placement);

        let total_memory: u128 = nodes.iter().map(|node| u128::from(node.usable_memory_bytes)).sum();
        for node in &nodes {
            let layers = placement
                .stages
                .iter()
                .find(|stage| stage.node == node.id)
                .map_or(0, |stage| stage.layers.len());
            // |layers - num_layers * memory / total_memory| < 1, scaled by total_memory.
            let exact_share = model.num_layers as u128 * u128::from(node.usable_memory_bytes);
            prop_assert!(
                (layers as u128 * total_memory).abs_diff(exact_share) < total_memory,
                "{} got {} layers for {}/{} of the memory",
                node.id, layers, node.usable_memory_bytes, total_memory
            );
        }
    }
}
