//! Splitting a model's layers into pipeline stages, one per node.
//!
//! [`place`] is a pure function: it gives each node a contiguous range of layers in
//! proportion to its usable memory, then moves layers between neighbours until every
//! stage fits its node, weights and KV cache included.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::size::format_bytes;

/// The stable identity of a node in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(id: &str) -> Self {
        Self(id.to_owned())
    }
}

impl From<String> for NodeId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

/// The memory a model needs, part by part.
///
/// Activations and scratch buffers are not modelled: they are small and per stage, so
/// they belong in the reserve the caller takes off each node's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelProfile {
    /// Decoder layers, each placed whole on one node.
    pub num_layers: usize,
    /// Weight bytes of each layer; must have `num_layers` entries.
    pub layer_bytes: Vec<u64>,
    /// Token embedding, held by the first stage.
    pub embedding_bytes: u64,
    /// Final norm and LM head, held by the last stage (even when tied to the embedding).
    pub head_bytes: u64,
    /// Keys and values one token takes in one layer's KV cache.
    pub kv_bytes_per_token_per_layer: u64,
    /// Every layer's KV cache is sized for this many tokens.
    pub context_tokens: u64,
}

/// A node and the memory it can give to the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCapacity {
    pub id: NodeId,
    /// Memory left for the model once the OS reserve is taken off.
    pub usable_memory_bytes: u64,
}

/// The pipeline: which node runs which layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Stages in pipeline order; together their ranges cover every layer once, in order.
    pub stages: Vec<StageAssignment>,
}

/// One node's part of the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageAssignment {
    pub node: NodeId,
    /// Never empty.
    pub layers: Range<usize>,
    /// Weights and KV cache of these layers, plus the embedding on the first stage and
    /// the head on the last; at most the node's usable memory.
    pub bytes_needed: u64,
}

/// Why a model could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum PlacementError {
    #[error("there are no nodes to place the model on")]
    NoNodes,

    #[error("invalid model profile: {0}")]
    InvalidProfile(String),

    #[error("node {0} is listed more than once")]
    DuplicateNode(NodeId),

    /// `needed_bytes` is the whole model (weights, full KV cache, embedding and head);
    /// `available_bytes` the usable memory of all nodes together. It can exceed
    /// `needed_bytes` when the model does not split into whole layers that fit.
    #[error("{}", shortfall(*needed_bytes, *available_bytes))]
    InsufficientMemory {
        needed_bytes: u64,
        available_bytes: u64,
    },
}

fn shortfall(needed_bytes: u64, available_bytes: u64) -> String {
    let (needed, available) = (format_bytes(needed_bytes), format_bytes(available_bytes));
    let advice = "add a node or lower the context";
    if needed_bytes <= available_bytes {
        format!(
            "the model needs {needed} and the nodes offer {available}, but it does not split \
             into whole layers that fit each node; {advice}"
        )
    } else {
        format!(
            "the model needs {needed} across the cluster but the nodes offer {available}; {advice}"
        )
    }
}

/// Splits the model into one stage per node, in proportion to usable memory.
///
/// Pipeline order is by usable memory, largest first, then by id, so the result does
/// not depend on the order of `nodes`. Each node's share of the layers is its
/// proportional share rounded by largest remainder; when a share does not fit, the
/// neighbours take the difference. Nodes that cannot hold a single layer are left out
/// before the shares are computed, and nodes left with no layers are not in the result.
///
/// # Errors
///
/// [`PlacementError::InsufficientMemory`] if no split fits, [`PlacementError::NoNodes`],
/// [`PlacementError::DuplicateNode`], or [`PlacementError::InvalidProfile`] if the profile
/// is inconsistent or its total size overflows `u64`.
pub fn place(profile: &ModelProfile, nodes: &[NodeCapacity]) -> Result<Placement, PlacementError> {
    let costs = RangeCosts::new(profile)?;
    if nodes.is_empty() {
        return Err(PlacementError::NoNodes);
    }
    let mut seen = BTreeSet::new();
    if let Some(node) = nodes.iter().find(|node| !seen.insert(&node.id)) {
        return Err(PlacementError::DuplicateNode(node.id.clone()));
    }

    let cheapest_layer = costs.cheapest_layer();
    let mut candidates: Vec<&NodeCapacity> = nodes
        .iter()
        .filter(|node| node.usable_memory_bytes >= cheapest_layer)
        .collect();
    candidates.sort_by_key(|node| (Reverse(node.usable_memory_bytes), &node.id));
    let capacities: Vec<u64> = candidates
        .iter()
        .map(|node| node.usable_memory_bytes)
        .collect();

    let shares = apportion(costs.num_layers(), &capacities);
    let ranges = fit_ranges(&costs, &capacities, &shares).ok_or_else(|| {
        PlacementError::InsufficientMemory {
            needed_bytes: costs.of(0..costs.num_layers()),
            available_bytes: nodes.iter().fold(0u64, |sum, node| {
                sum.saturating_add(node.usable_memory_bytes)
            }),
        }
    })?;

    let stages = candidates
        .into_iter()
        .zip(ranges)
        .filter(|(_, layers)| !layers.is_empty())
        .map(|(node, layers)| StageAssignment {
            node: node.id.clone(),
            bytes_needed: costs.of(layers.clone()),
            layers,
        })
        .collect();
    Ok(Placement { stages })
}

/// The memory cost of any contiguous range of layers. The whole model's cost is checked
/// for overflow once, so no cost of a part of it can overflow.
struct RangeCosts {
    /// `prefix[i]` is the weights and KV cache of layers `0..i`.
    prefix: Vec<u64>,
    embedding: u64,
    head: u64,
}

impl RangeCosts {
    fn new(profile: &ModelProfile) -> Result<Self, PlacementError> {
        let invalid = |why: &str| PlacementError::InvalidProfile(why.to_owned());
        if profile.num_layers == 0 {
            return Err(invalid("the model has no layers"));
        }
        if profile.layer_bytes.len() != profile.num_layers {
            return Err(PlacementError::InvalidProfile(format!(
                "{} layer sizes for {} layers",
                profile.layer_bytes.len(),
                profile.num_layers
            )));
        }
        let overflow = || invalid("the model's size does not fit in 64 bits");
        let kv_per_layer = profile
            .kv_bytes_per_token_per_layer
            .checked_mul(profile.context_tokens)
            .ok_or_else(overflow)?;
        let mut prefix = Vec::with_capacity(profile.num_layers + 1);
        let mut total = 0u64;
        prefix.push(total);
        for &weights in &profile.layer_bytes {
            total = total
                .checked_add(weights)
                .and_then(|total| total.checked_add(kv_per_layer))
                .ok_or_else(overflow)?;
            prefix.push(total);
        }
        total
            .checked_add(profile.embedding_bytes)
            .and_then(|total| total.checked_add(profile.head_bytes))
            .ok_or_else(overflow)?;
        Ok(Self {
            prefix,
            embedding: profile.embedding_bytes,
            head: profile.head_bytes,
        })
    }

    fn num_layers(&self) -> usize {
        self.prefix.len() - 1
    }

    /// Memory for a stage holding `layers`; the first stage also holds the embedding and
    /// the last the head. An empty range needs nothing.
    fn of(&self, layers: Range<usize>) -> u64 {
        if layers.is_empty() {
            return 0;
        }
        let mut bytes = self.prefix[layers.end] - self.prefix[layers.start];
        if layers.start == 0 {
            bytes += self.embedding;
        }
        if layers.end == self.num_layers() {
            bytes += self.head;
        }
        bytes
    }

    fn cheapest_layer(&self) -> u64 {
        self.prefix
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .min()
            .unwrap_or(0)
    }

    /// The furthest `end` such that `start..end` fits in `capacity`.
    fn furthest_end(&self, start: usize, capacity: u64) -> usize {
        (start..=self.num_layers())
            .take_while(|&end| self.of(start..end) <= capacity)
            .last()
            .unwrap_or(start)
    }

    /// The earliest `start` such that `start..end` fits in `capacity`.
    fn earliest_start(&self, end: usize, capacity: u64) -> usize {
        (0..=end)
            .rev()
            .take_while(|&start| self.of(start..end) <= capacity)
            .last()
            .unwrap_or(end)
    }
}

/// Splits `seats` in proportion to `weights` by largest remainder (Hamilton's method):
/// each gets the floor of its exact share, and the seats left over go to the largest
/// remainders, ties to the earlier weight. If every weight is zero, no one gets a seat.
fn apportion(seats: usize, weights: &[u64]) -> Vec<usize> {
    let total: u128 = weights.iter().map(|&weight| u128::from(weight)).sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    // A share is `scaled / total`; u128 holds the product of any usize and u64.
    let scaled = |weight: u64| u128::from(weight) * seats as u128;
    let mut shares: Vec<usize> = weights
        .iter()
        .map(|&w| (scaled(w) / total) as usize)
        .collect();
    let left_over = seats - shares.iter().sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_by_key(|&i| (Reverse(scaled(weights[i]) % total), i));
    for &i in &by_remainder[..left_over] {
        shares[i] += 1;
    }
    shares
}

/// Turns target layer counts into contiguous ranges that fit, one per node in order, or
/// `None` if no split in this order fits.
///
/// Each node ends its range as close to its target boundary as it can, between the
/// furthest its memory reaches and the earliest that leaves a remainder the nodes after
/// it can still hold. Taking as much as fits is optimal for the remainder, so these
/// bounds only cross when the model cannot fit at all, which shows at the first node.
fn fit_ranges(
    costs: &RangeCosts,
    capacities: &[u64],
    targets: &[usize],
) -> Option<Vec<Range<usize>>> {
    let layers = costs.num_layers();
    // earliest_end[i]: the first layer the nodes after `i` can take over from.
    let mut earliest_end = vec![layers; capacities.len()];
    for i in (1..capacities.len()).rev() {
        earliest_end[i - 1] = costs.earliest_start(earliest_end[i], capacities[i]);
    }

    let mut ranges = Vec::with_capacity(capacities.len());
    let (mut start, mut target_end) = (0, 0);
    for ((&capacity, &target), earliest_end) in capacities.iter().zip(targets).zip(earliest_end) {
        target_end += target;
        let earliest = earliest_end.max(start);
        let furthest = costs.furthest_end(start, capacity);
        if earliest > furthest {
            return None;
        }
        let end = target_end.clamp(earliest, furthest);
        ranges.push(start..end);
        start = end;
    }
    (start == layers).then_some(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(layer_bytes: Vec<u64>, embedding_bytes: u64, head_bytes: u64) -> ModelProfile {
        ModelProfile {
            num_layers: layer_bytes.len(),
            layer_bytes,
            embedding_bytes,
            head_bytes,
            kv_bytes_per_token_per_layer: 0,
            context_tokens: 0,
        }
    }

    fn node(id: &str, usable_memory_bytes: u64) -> NodeCapacity {
        NodeCapacity {
            id: id.into(),
            usable_memory_bytes,
        }
    }

    /// The stages as `(node, layers)`, for compact assertions.
    fn split(placement: &Placement) -> Vec<(&str, Range<usize>)> {
        placement
            .stages
            .iter()
            .map(|stage| (stage.node.0.as_str(), stage.layers.clone()))
            .collect()
    }

    #[test]
    fn shares_follow_memory_when_memory_is_ample() {
        let model = profile(vec![10; 30], 0, 0);
        let nodes = [node("a", 1_000), node("b", 2_000), node("c", 3_000)];
        let placement = place(&model, &nodes).unwrap();
        assert_eq!(
            split(&placement),
            [("c", 0..15), ("b", 15..25), ("a", 25..30)]
        );
    }

    #[test]
    fn a_single_node_holds_everything() {
        let model = ModelProfile {
            kv_bytes_per_token_per_layer: 2,
            context_tokens: 100,
            ..profile(vec![100; 4], 50, 70)
        };
        let placement = place(&model, &[node("solo", 1_320)]).unwrap();
        assert_eq!(split(&placement), [("solo", 0..4)]);
        assert_eq!(placement.stages[0].bytes_needed, 4 * (100 + 200) + 50 + 70);
    }

    #[test]
    fn a_node_too_small_for_a_layer_is_left_out_and_the_rest_replanned() {
        // Counted in, "tiny" would win the left-over layer and "b" would have to take it.
        let model = profile(vec![100; 3], 0, 0);
        let nodes = [node("tiny", 99), node("a", 200), node("b", 200)];
        let placement = place(&model, &nodes).unwrap();
        assert_eq!(split(&placement), [("a", 0..2), ("b", 2..3)]);
    }

    #[test]
    fn the_head_pushes_layers_to_the_previous_stage() {
        // A 6/4 split would put 900 bytes on "b", which has 800.
        let model = profile(vec![100; 10], 500, 500);
        let placement = place(&model, &[node("a", 1_200), node("b", 800)]).unwrap();
        assert_eq!(split(&placement), [("a", 0..7), ("b", 7..10)]);
        assert_eq!(placement.stages[1].bytes_needed, 800);
    }

    #[test]
    fn the_embedding_pushes_layers_to_the_next_stage() {
        let model = profile(vec![100; 10], 1_200, 0);
        let placement = place(&model, &[node("a", 1_500), node("b", 1_400)]).unwrap();
        assert_eq!(split(&placement), [("a", 0..3), ("b", 3..10)]);
    }

    #[test]
    fn a_cluster_too_small_says_what_it_needs_and_has() {
        let model = ModelProfile {
            kv_bytes_per_token_per_layer: 1 << 10,
            context_tokens: 4_096,
            ..profile(vec![96 << 20; 32], 1 << 30, 1 << 30)
        };
        let nodes = [node("a", 2 << 30), node("b", 1 << 30)];
        let error = place(&model, &nodes).unwrap_err();
        let needed = 32 * ((96 << 20) + (4 << 20)) + (2 << 30);
        assert_eq!(
            error,
            PlacementError::InsufficientMemory {
                needed_bytes: needed,
                available_bytes: 3 << 30
            }
        );
        assert_eq!(
            error.to_string(),
            "the model needs 5.1 GiB across the cluster but the nodes offer 3.0 GiB; add a node or lower the context"
        );
    }

    #[test]
    fn enough_memory_in_pieces_too_small_is_still_an_error() {
        // 1 KiB in all, but no node holds two 300-byte layers.
        let model = profile(vec![300; 3], 0, 0);
        let error = place(&model, &[node("a", 500), node("b", 524)]).unwrap_err();
        assert_eq!(
            error,
            PlacementError::InsufficientMemory {
                needed_bytes: 900,
                available_bytes: 1024
            }
        );
        assert_eq!(
            error.to_string(),
            "the model needs 900 B and the nodes offer 1.0 KiB, but it does not split into \
             whole layers that fit each node; add a node or lower the context"
        );
    }

    #[test]
    fn rejects_bad_input() {
        let model = profile(vec![100; 3], 0, 0);
        assert_eq!(place(&model, &[]), Err(PlacementError::NoNodes));
        assert_eq!(
            place(&model, &[node("a", 500), node("a", 600)]),
            Err(PlacementError::DuplicateNode("a".into()))
        );
        let no_layers = profile(vec![], 0, 0);
        assert!(matches!(
            place(&no_layers, &[node("a", 500)]),
            Err(PlacementError::InvalidProfile(_))
        ));
        let mismatched = ModelProfile {
            num_layers: 4,
            ..model.clone()
        };
        assert!(matches!(
            place(&mismatched, &[node("a", 500)]),
            Err(PlacementError::InvalidProfile(_))
        ));
        let huge = ModelProfile {
            kv_bytes_per_token_per_layer: u64::MAX,
            context_tokens: 2,
            ..model
        };
        assert!(matches!(
            place(&huge, &[node("a", 500)]),
            Err(PlacementError::InvalidProfile(_))
        ));
    }

    #[test]
    fn apportion_rounds_by_largest_remainder() {
        assert_eq!(apportion(30, &[3, 2, 1]), [15, 10, 5]);
        assert_eq!(apportion(10, &[1, 1, 1]), [4, 3, 3]);
        assert_eq!(apportion(7, &[5, 3, 2]), [4, 2, 1]); // 3.5, 2.1, 1.4
        assert_eq!(apportion(3, &[u64::MAX, u64::MAX]), [2, 1]);
    }
}
