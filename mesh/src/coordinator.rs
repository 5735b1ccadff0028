//! Who coordinates the cluster, what plan it publishes, and when a plan can serve.
//!
//! Everything here is a pure function of the membership every node sees, so every
//! node computes the same answers from the same membership.
//!
//! **The coordinator rule:** the coordinator is the live member with the smallest node
//! id, comparing the ids as strings (byte-wise). Node ids are canonical base58
//! `PeerId`s, so no two nodes compare equal, and the rule needs no election traffic:
//! when the coordinator goes, the next smallest id takes over as soon as the
//! membership shows it gone.

use std::cmp::Reverse;
use std::ops::Range;

use crate::control::{NodeInfo, Plan, PlanStage, MAX_EPOCH};
use crate::placement::{place, ModelProfile, NodeCapacity, NodeId, PlacementError};

/// The coordinator among `members`: the one with the smallest node id. `None` only if
/// there are no members.
pub fn coordinator(members: &[NodeInfo]) -> Option<&NodeInfo> {
    members.iter().min_by(|a, b| a.node_id.cmp(&b.node_id))
}

/// The plan node `me` should publish, if any.
///
/// `members` is the live membership (normally the last
/// [`ControlEvent::Members`](crate::control::ControlEvent::Members)) and `current` the
/// plan in force. Members serving a model other than `me`'s are left out (and
/// logged). Returns a new plan when `me` is the coordinator and either there is no
/// plan, the plan in force is another coordinator's or another model's, or the
/// placement of the members differs from it (a node came or went, or its memory or
/// data address changed). Otherwise, including when `me` is not a member, `None`.
///
/// While the plan in force has all its nodes, a plan that takes newcomers in waits until
/// they have loaded their layers ([`NodeInfo::prepared`]), so the plan in force serves
/// meanwhile. A plan that lost a node is replaced at once, over the nodes that served it
/// when they can hold the model, so that recovery never waits for a newcomer's loading.
///
/// The new epoch is in the round after the newest epoch the cluster has seen (the plan
/// in force or any member's `ready_epoch` or `following_epoch`), tagged with the
/// coordinator ([`EPOCH_TAG_BITS`]). A coordinator that restarted
/// and lost its plan thus still publishes a plan the others take. For the same
/// reason a plan in force that some member has already moved past is replaced.
///
/// # Errors
///
/// When the members cannot hold the model; see [`place`].
pub fn next_plan(
    me: &str,
    members: &[NodeInfo],
    profile: &ModelProfile,
    current: Option<&Plan>,
) -> Result<Option<Plan>, PlacementError> {
    let Some(mine) = members.iter().find(|member| member.node_id == me) else {
        return Ok(None);
    };
    let model_id = &mine.model_id;
    let eligible = eligible(members, model_id);
    let is_coordinator = eligible
        .iter()
        .map(|member| member.node_id.as_str())
        .min()
        .is_some_and(|smallest| smallest == me);
    if !is_coordinator {
        return Ok(None);
    }

    let stages = match current {
        Some(current) if !intact(current, model_id, &eligible) => replacement(current, &eligible, profile)?,
        _ => stages_for(&eligible, profile)?,
    };
    // Members ignore plans below the one they follow, loaded or still loading.
    let newest_followed = eligible
        .iter()
        .flat_map(|member| [member.ready_epoch, member.following_epoch])
        .flatten()
        .max();
    if let Some(current) = current {
        // A member on a newer epoch than the plan in force follows a plan of its own (the
        // other half of a healed partition, or the plan it made while alone): it will not
        // prepare for this one, so waiting for it would wait for ever. It is replaced at
        // once instead.
        let behind = newest_followed.is_some_and(|epoch| epoch > current.epoch);
        if !behind && waits_for_newcomers(current, model_id, &eligible, &stages) {
            return Ok(None);
        }
    }

    if let Some(current) = current {
        let unchanged = current.coordinator == me
            && current.model_id == *model_id
            && current.stages == stages
            && newest_followed.is_none_or(|epoch| epoch <= current.epoch);
        if unchanged {
            return Ok(None);
        }
    }
    let newest_seen = current
        .map(|plan| plan.epoch)
        .into_iter()
        .chain(newest_followed)
        .max()
        .unwrap_or(0);
    Ok(Some(Plan {
        epoch: next_epoch(newest_seen, me),
        coordinator: me.to_owned(),
        model_id: model_id.clone(),
        stages,
    }))
}

/// Bits at the bottom of every epoch that tag the coordinator that published it.
pub const EPOCH_TAG_BITS: u32 = 16;

/// The epoch after `newest_seen`, for a plan `coordinator` publishes: the next round, in
/// the high bits, and a tag of the coordinator in the low ones. The halves of a partitioned
/// cluster each plan on their own from the same newest epoch; their coordinators differ, so
/// their epochs do too (but for a 1 in 65536 clash of tags), and a stage never takes a frame
/// sent under the other half's plan for one of its own when the halves meet again.
fn next_epoch(newest_seen: u64, coordinator: &str) -> u64 {
    // FNV-1a: any spread of ids will do, as long as every build agrees.
    let hash = coordinator.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let round = (newest_seen >> EPOCH_TAG_BITS) + 1;
    let tag = hash & ((1 << EPOCH_TAG_BITS) - 1);
    // Epochs read from the wire are at most MAX_EPOCH, far from overflowing.
    ((round << EPOCH_TAG_BITS) | tag).min(MAX_EPOCH)
}

/// The layers node `me` would get if the coordinator planned over `members` now, while
/// `me` is outside the plan in force: what a newcomer loads ahead of the plan that takes
/// it in (see [`NodeInfo::prepared`]). `None` when `me` is in the plan, there is no plan
/// (the first plan waits for nobody), or the members cannot hold the model.
pub fn prospective_layers(
    me: &str,
    members: &[NodeInfo],
    profile: &ModelProfile,
    current: Option<&Plan>,
) -> Option<Range<usize>> {
    let current = current?;
    if current.stages.iter().any(|stage| stage.node_id == me) {
        return None;
    }
    let mine = members.iter().find(|member| member.node_id == me)?;
    let stages = stages_for(&eligible(members, &mine.model_id), profile).ok()?;
    stages.into_iter().find(|stage| stage.node_id == me).map(|stage| stage.layers)
}

/// The members serving `model_id`; others are left out of plans (and logged).
fn eligible<'a>(members: &'a [NodeInfo], model_id: &str) -> Vec<&'a NodeInfo> {
    members
        .iter()
        .filter(|member| {
            let same = member.model_id == model_id;
            if !same {
                tracing::debug!(
                    node = %member.node_id,
                    theirs = %member.model_id,
                    ours = %model_id,
                    "leaving a node that serves another model out of the plan"
                );
            }
            same
        })
        .collect()
}

/// The placement of `eligible` as plan stages.
fn stages_for(eligible: &[&NodeInfo], profile: &ModelProfile) -> Result<Vec<PlanStage>, PlacementError> {
    let capacities: Vec<NodeCapacity> = eligible
        .iter()
        .map(|member| NodeCapacity {
            id: NodeId(member.node_id.clone()),
            usable_memory_bytes: member.usable_memory_bytes,
        })
        .collect();
    let placement = place(profile, &capacities)?;
    Ok(placement
        .stages
        .into_iter()
        .filter_map(|stage| {
            // Every stage's node came from `eligible`, so the lookup always succeeds.
            let member = eligible
                .iter()
                .find(|member| member.node_id == stage.node.0)?;
            Some(PlanStage {
                node_id: stage.node.0,
                data_addr: member.data_addr,
                layers: stage.layers,
            })
        })
        .collect())
}

/// Whether the plan in force still has all its nodes (and serves this model).
fn intact(current: &Plan, model_id: &str, eligible: &[&NodeInfo]) -> bool {
    current.model_id == model_id
        && current
            .stages
            .iter()
            .all(|stage| eligible.iter().any(|member| member.node_id == stage.node_id))
}

/// The stages that replace a plan that lost a node: over the nodes that served it, if
/// they can hold the model. Their layers are loaded or at hand, while a newcomer may
/// still be fetching its own for minutes, so recovery does not wait for it; newcomers
/// come in afterwards, in two phases ([`waits_for_newcomers`]). Over every member when
/// the survivors cannot hold the model.
fn replacement(current: &Plan, eligible: &[&NodeInfo], profile: &ModelProfile) -> Result<Vec<PlanStage>, PlacementError> {
    let survivors: Vec<&NodeInfo> = eligible
        .iter()
        .filter(|member| current.stages.iter().any(|stage| stage.node_id == member.node_id))
        .copied()
        .collect();
    if survivors.len() < eligible.len() {
        if let Ok(stages) = stages_for(&survivors, profile) {
            return Ok(stages);
        }
    }
    stages_for(eligible, profile)
}

/// Whether the coordinator holds `stages` back: the plan in force still has all its
/// nodes (so it serves), and a node the new plan takes in has not yet loaded the layers
/// the new plan gives it. A plan that lost a node is replaced at once.
fn waits_for_newcomers(current: &Plan, model_id: &str, eligible: &[&NodeInfo], stages: &[PlanStage]) -> bool {
    intact(current, model_id, eligible)
        && stages.iter().any(|stage| {
            let newcomer = !current.stages.iter().any(|old| old.node_id == stage.node_id);
            newcomer
                && eligible
                    .iter()
                    .find(|member| member.node_id == stage.node_id)
                    .is_some_and(|member| member.prepared.as_ref() != Some(&stage.layers))
        })
}

/// Whether `plan` can serve requests: every stage's node is a live member that has
/// loaded the plan's layers (`ready_epoch` at least the plan's epoch).
pub fn plan_is_ready(plan: &Plan, members: &[NodeInfo]) -> bool {
    !plan.stages.is_empty()
        && plan.stages.iter().all(|stage| {
            members.iter().any(|member| {
                member.node_id == stage.node_id
                    && member.ready_epoch.is_some_and(|ready| ready >= plan.epoch)
            })
        })
}

/// Whether `new` replaces `old`: a higher epoch, or on equal epochs a smaller
/// coordinator id, so that two coordinators that briefly both believed themselves
/// coordinator (while their memberships differed) end on the same plan everywhere.
pub(crate) fn supersedes(new: &Plan, old: &Plan) -> bool {
    (new.epoch, Reverse(&new.coordinator)) > (old.epoch, Reverse(&old.coordinator))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn member(id: &str, memory: u64) -> NodeInfo {
        NodeInfo {
            node_id: id.into(),
            data_addr: format!("127.0.0.1:{}", 7000 + u16::from(id.as_bytes()[0]))
                .parse()
                .unwrap(),
            api_addr: "127.0.0.1:8000".parse().unwrap(),
            usable_memory_bytes: memory,
            backend: "cpu".into(),
            model_id: "org/model".into(),
            ready_epoch: None,
            following_epoch: None,
            data_paths: Vec::new(),
            hops: Vec::new(),
            prepared: None,
        }
    }

    /// 24 layers of 10 MiB, with the embedding and head small enough that the split
    /// follows memory.
    fn profile() -> ModelProfile {
        ModelProfile {
            num_layers: 24,
            layer_bytes: vec![10 << 20; 24],
            embedding_bytes: 1 << 20,
            head_bytes: 1 << 20,
            kv_bytes_per_token_per_layer: 0,
            context_tokens: 0,
        }
    }

    fn round(epoch: u64) -> u64 {
        epoch >> EPOCH_TAG_BITS
    }

    #[test]
    fn when_the_halves_of_a_partition_meet_the_coordinator_replans_at_once() {
        let whole = [member("a", GIB), member("b", GIB), member("c", GIB)];
        let first = next_plan("a", &whole, &profile(), None).unwrap().unwrap();
        // a and b plan without c, and c alone; c's tag happens to be the larger.
        let ours = next_plan("a", &whole[..2], &profile(), Some(&first)).unwrap().unwrap();
        let theirs = ours.epoch + 1;
        // They meet again: c, unprepared, is ready on its own newer plan. a does not wait
        // for it to prepare (it never will): it plans the next round over all three.
        let mut met = whole.clone();
        met[2].ready_epoch = Some(theirs);
        let merged = next_plan("a", &met, &profile(), Some(&ours)).unwrap().unwrap();
        assert_eq!(merged.stages.len(), 3);
        assert!(merged.epoch > theirs, "the merged plan must supersede both halves'");
    }

    #[test]
    fn a_member_still_loading_a_newer_plan_of_its_own_is_planned_above_at_once() {
        // a and b each planned alone in the same round; b's tag is the larger, so b ignores
        // a's plan, and b is still loading its own, so it is not ready on any epoch.
        let pair = [member("a", GIB), member("b", GIB)];
        let alone = next_plan("a", &pair[..1], &profile(), None).unwrap().unwrap();
        let mut met = pair.clone();
        met[0].ready_epoch = Some(alone.epoch);
        met[1].following_epoch = Some(alone.epoch + 1);
        let merged = next_plan("a", &met, &profile(), Some(&alone)).unwrap().unwrap();
        assert_eq!(merged.stages.len(), 2, "b is taken in without waiting for it to prepare");
        assert!(merged.epoch > alone.epoch + 1, "b would ignore a plan below the one it follows");
        // Once b follows the merged plan, nothing changes.
        met[1].following_epoch = Some(merged.epoch);
        assert_eq!(next_plan("a", &met, &profile(), Some(&merged)).unwrap(), None);
    }

    #[test]
    fn the_halves_of_a_partition_plan_different_epochs() {
        // Both halves saw the same plan; each half's coordinator plans for its half.
        let whole = [member("a", GIB), member("b", GIB), member("c", GIB), member("d", GIB)];
        let first = next_plan("a", &whole, &profile(), None).unwrap().unwrap();
        let left = next_plan("a", &whole[..2], &profile(), Some(&first)).unwrap().unwrap();
        let right = next_plan("c", &whole[2..], &profile(), Some(&first)).unwrap().unwrap();
        assert_eq!(round(left.epoch), round(right.epoch));
        assert_ne!(left.epoch, right.epoch, "one epoch for two plans");
        assert!(left.epoch > first.epoch && right.epoch > first.epoch);
        // The same coordinator tags its epochs the same way every time.
        let again = next_plan("a", &whole[..1], &profile(), Some(&left)).unwrap().unwrap();
        assert_eq!(again.epoch - left.epoch, 1 << EPOCH_TAG_BITS);
    }

    fn layers(plan: &Plan) -> Vec<(&str, std::ops::Range<usize>)> {
        plan.stages
            .iter()
            .map(|stage| (stage.node_id.as_str(), stage.layers.clone()))
            .collect()
    }

    #[test]
    fn coordinator_is_the_smallest_id() {
        let members = [member("b", GIB), member("a", GIB), member("c", GIB)];
        assert_eq!(coordinator(&members).map(|m| m.node_id.as_str()), Some("a"));
        assert!(coordinator(&[]).is_none());
    }

    #[test]
    fn layers_follow_memory() {
        let members = [member("a", GIB), member("b", 2 * GIB), member("c", 3 * GIB)];
        let plan = next_plan("a", &members, &profile(), None).unwrap().unwrap();
        assert_eq!(round(plan.epoch), 1);
        assert_eq!(plan.coordinator, "a");
        assert_eq!(plan.model_id, "org/model");
        // Largest memory first: 3:2:1 of 24 layers.
        assert_eq!(layers(&plan), [("c", 0..12), ("b", 12..20), ("a", 20..24)]);
        assert_eq!(plan.stages[0].data_addr, members[2].data_addr);
    }

    #[test]
    fn only_the_coordinator_plans() {
        let members = [member("a", GIB), member("b", GIB)];
        assert_eq!(next_plan("b", &members, &profile(), None).unwrap(), None);
        assert_eq!(
            next_plan("x", &members, &profile(), None).unwrap(),
            None,
            "not a member"
        );
    }

    #[test]
    fn no_new_plan_while_nothing_changes() {
        let members = [member("a", GIB), member("b", 2 * GIB)];
        let first = next_plan("a", &members, &profile(), None).unwrap().unwrap();
        assert_eq!(
            next_plan("a", &members, &profile(), Some(&first)).unwrap(),
            None
        );

        // Readiness catching up to the plan is no change either.
        let ready: Vec<NodeInfo> = members
            .iter()
            .map(|m| NodeInfo {
                ready_epoch: Some(first.epoch),
                ..m.clone()
            })
            .collect();
        assert_eq!(
            next_plan("a", &ready, &profile(), Some(&first)).unwrap(),
            None
        );
        // Nor is a change of memory too small to move a layer.
        let mut grown = members.clone();
        grown[1].usable_memory_bytes += 1 << 20;
        assert_eq!(
            next_plan("a", &grown, &profile(), Some(&first)).unwrap(),
            None
        );
    }

    #[test]
    fn membership_changes_make_a_new_epoch() {
        let two = [member("a", GIB), member("b", GIB)];
        let first = next_plan("a", &two, &profile(), None).unwrap().unwrap();
        let mut three = [member("a", GIB), member("b", GIB), member("c", GIB)];
        // The newcomer is planned in once it has loaded the layers it will get.
        assert_eq!(next_plan("a", &three, &profile(), Some(&first)).unwrap(), None);
        three[2].prepared = prospective_layers("c", &three, &profile(), Some(&first));
        let second = next_plan("a", &three, &profile(), Some(&first))
            .unwrap()
            .unwrap();
        assert_eq!(round(second.epoch), 2);
        assert_eq!(second.stages.len(), 3);
        let third = next_plan("a", &two, &profile(), Some(&second))
            .unwrap()
            .unwrap();
        assert_eq!(round(third.epoch), 3);
        assert_eq!(layers(&third), layers(&first));

        // A node whose data plane moved needs a plan that says so.
        let mut moved = two.clone();
        moved[1].data_addr = "127.0.0.1:9999".parse().unwrap();
        let fourth = next_plan("a", &moved, &profile(), Some(&third))
            .unwrap()
            .unwrap();
        assert_eq!(round(fourth.epoch), 4);
    }

    #[test]
    fn a_plan_in_force_serves_until_newcomers_are_prepared() {
        let two = [member("b", GIB), member("c", GIB)];
        let first = next_plan("b", &two, &profile(), None).unwrap().unwrap();
        // "a" joins: it has the smallest id, so it coordinates, but it is not prepared.
        let mut three = [member("a", GIB), member("b", GIB), member("c", GIB)];
        for me in ["a", "b"] {
            assert_eq!(next_plan(me, &three, &profile(), Some(&first)).unwrap(), None);
        }
        // Members of the plan in force have nothing to prepare.
        assert_eq!(prospective_layers("b", &three, &profile(), Some(&first)), None);
        // Layers prepared for another placement do not count.
        three[0].prepared = Some(0..1);
        assert_eq!(next_plan("a", &three, &profile(), Some(&first)).unwrap(), None);
        let prepared = prospective_layers("a", &three, &profile(), Some(&first)).unwrap();
        three[0].prepared = Some(prepared.clone());
        let second = next_plan("a", &three, &profile(), Some(&first)).unwrap().unwrap();
        assert_eq!(second.stages[0].node_id, "a");
        assert_eq!(second.stages[0].layers, prepared);

        // No plan yet: the first plan waits for nobody, and there is nothing to prepare.
        assert_eq!(prospective_layers("a", &three, &profile(), None), None);
        assert!(next_plan("a", &three, &profile(), None).unwrap().is_some());
    }

    #[test]
    fn a_plan_that_lost_a_node_is_replaced_over_its_survivors_at_once() {
        let two = [member("b", GIB), member("c", GIB)];
        let first = next_plan("b", &two, &profile(), None).unwrap().unwrap();
        // c drops while newcomer a (the coordinator by id) is still loading: the survivor
        // serves at once, without waiting for a.
        let mut lost = [member("a", GIB), member("b", GIB)];
        let replan = next_plan("a", &lost, &profile(), Some(&first)).unwrap().unwrap();
        assert_eq!(layers(&replan), [("b", 0..24)]);
        // Then a comes in the usual way, once prepared, while b's plan serves.
        assert_eq!(next_plan("a", &lost, &profile(), Some(&replan)).unwrap(), None);
        lost[0].prepared = prospective_layers("a", &lost, &profile(), Some(&replan));
        let joined = next_plan("a", &lost, &profile(), Some(&replan)).unwrap().unwrap();
        assert_eq!(joined.stages.len(), 2);

        // Survivors that cannot hold the model get the newcomer at once: there is no
        // plan to serve from meanwhile.
        let small = [member("a", GIB), member("b", 200 << 20)];
        let replan = next_plan("a", &small, &profile(), Some(&first)).unwrap().unwrap();
        assert_eq!(replan.stages.len(), 2);
    }

    #[test]
    fn a_new_coordinator_reissues_the_plan() {
        let members = [member("a", GIB), member("b", GIB)];
        let by_a = next_plan("a", &members, &profile(), None).unwrap().unwrap();
        // a leaves and b takes over. Even where b's layers stay the same, the plan in
        // force is a's, and only the coordinator's plan is taken.
        let only_b = [member("b", GIB)];
        let by_b = next_plan("b", &only_b, &profile(), Some(&by_a))
            .unwrap()
            .unwrap();
        assert_eq!((round(by_b.epoch), by_b.coordinator.as_str()), (2, "b"));
    }

    #[test]
    fn epochs_continue_past_what_members_have_loaded() {
        let members = [
            member("a", GIB),
            NodeInfo {
                ready_epoch: Some(7 << EPOCH_TAG_BITS | 3),
                ..member("b", GIB)
            },
        ];
        // A coordinator that restarted has no plan but must not go back to round 1.
        let plan = next_plan("a", &members, &profile(), None).unwrap().unwrap();
        assert_eq!(round(plan.epoch), 8);
        // And a plan in force that a member has moved past is replaced.
        let stale = Plan { epoch: 5 << EPOCH_TAG_BITS, ..plan };
        let next = next_plan("a", &members, &profile(), Some(&stale))
            .unwrap()
            .unwrap();
        assert_eq!(round(next.epoch), 8);
    }

    #[test]
    fn members_of_other_models_are_left_out() {
        let other = NodeInfo {
            model_id: "org/other".into(),
            ..member("0", 100 * GIB)
        };
        let members = [other, member("a", GIB), member("b", GIB)];
        // "0" would be the coordinator, and would take every layer, if it counted.
        let plan = next_plan("a", &members, &profile(), None).unwrap().unwrap();
        assert_eq!(layers(&plan), [("a", 0..12), ("b", 12..24)]);
    }

    #[test]
    fn placement_errors_are_reported() {
        let members = [member("a", 1 << 20)];
        assert!(matches!(
            next_plan("a", &members, &profile(), None),
            Err(PlacementError::InsufficientMemory { .. })
        ));
    }

    #[test]
    fn ready_once_every_stage_has_loaded_the_epoch() {
        let members = [member("a", GIB), member("b", GIB), member("c", GIB)];
        let plan = next_plan("a", &members[..2], &profile(), None)
            .unwrap()
            .unwrap();
        let with_ready = |epochs: [Option<u64>; 3]| -> Vec<NodeInfo> {
            members
                .iter()
                .zip(epochs)
                .map(|(m, ready_epoch)| NodeInfo {
                    ready_epoch,
                    ..m.clone()
                })
                .collect()
        };
        let e = plan.epoch;
        assert!(!plan_is_ready(&plan, &with_ready([None, None, None])));
        assert!(!plan_is_ready(&plan, &with_ready([Some(e), Some(e - 1), None])));
        // "c" is no stage, so its readiness does not matter.
        assert!(plan_is_ready(&plan, &with_ready([Some(e), Some(e), None])));
        assert!(plan_is_ready(&plan, &with_ready([Some(e + 1), Some(e), None])));
        // A stage whose node is gone.
        assert!(!plan_is_ready(
            &plan,
            &with_ready([Some(e), Some(e), None])[..1]
        ));
    }

    #[test]
    fn supersedes_by_epoch_then_smaller_coordinator() {
        let plan = |epoch, coordinator: &str| Plan {
            epoch,
            coordinator: coordinator.into(),
            model_id: "m".into(),
            stages: vec![],
        };
        assert!(supersedes(&plan(2, "z"), &plan(1, "a")));
        assert!(supersedes(&plan(2, "a"), &plan(2, "b")));
        assert!(!supersedes(&plan(2, "b"), &plan(2, "a")));
        assert!(!supersedes(&plan(2, "a"), &plan(2, "a")));
        assert!(!supersedes(&plan(1, "a"), &plan(2, "z")));
    }
}
