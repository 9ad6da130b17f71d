//! How many instances a rollout converges to, as a pure function.
//!
//! The manifest's `capacity` is a number or `{min, max}`; a provider that owns the fleet's
//! desired count (an autoscaling group whose scaling rules move it) reports it with its listing.
//! [`target`] combines them, and `step` calls it at every step against what it observes then,
//! so a scale-out in the middle of a rollout raises the target (the new instances are rolled
//! too) and a rollout never shrinks a fleet an autoscaler grew.
//!
//! | manifest          | provider desired | target                                   |
//! |-------------------|------------------|------------------------------------------|
//! | `N`               | none             | `N`                                      |
//! | `N`               | `D`              | `D`                                      |
//! | `{min, max}`      | none             | the fleet's current count, into `[min, max]` |
//! | `{min, max}`      | `D`              | `D`, into `[min, max]`                   |

use crate::manifest::Capacity;
use crate::model::InstanceId;
use crate::provider::Instance;
use crate::rollout::state::Rolling;

/// The number of instances a rollout converges to. `desired` is the provider's desired count,
/// `current` the fleet's count as the rollout sees it now (see [`fleet_count`]).
pub fn target(capacity: Capacity, desired: Option<u32>, current: u32) -> u32 {
    match (capacity, desired) {
        (Capacity::Fixed(_), Some(desired)) => desired,
        (Capacity::Fixed(n), None) => n,
        (Capacity::Range(range), _) => {
            let n = desired.unwrap_or(current);
            // `max(min)` keeps an unvalidated `min > max` from panicking in `clamp`.
            n.max(range.min).min(range.max.max(range.min))
        }
    }
}

/// The fleet's count as the rollout sees it, net of its own work: the instances that ran when
/// rolling began (`Rolling::seen`, raised to `floor`, the manifest's minimum, which the rollout
/// fills), plus those someone else added since (an autoscaler's scale-out; counted also after the
/// rollout replaced them), minus those someone else removed (a scale-in: gone from the listing
/// without the rollout retiring them). The rollout's own launches and the old instances it
/// retired do not move it, so a surge in flight never raises the count and a replacement never
/// lowers it.
pub fn fleet_count(instances: &[Instance], rolling: &Rolling, floor: u32) -> u32 {
    let own = |id: &InstanceId| rolling.launched.contains(id) || rolling.attached.contains(id);
    let seen = |id: &InstanceId| rolling.seen.contains(id);
    let running = |id: &InstanceId| instances.iter().any(|i| i.running && &i.id == id);
    let added = instances
        .iter()
        .filter(|i| i.running && !own(&i.id) && !seen(&i.id))
        .map(|i| &i.id)
        .chain(rolling.done.iter().filter(|id| !seen(id) && !running(id)))
        .count();
    let removed =
        rolling.seen.iter().filter(|id| !running(id) && !rolling.done.contains(id)).count();
    let base = u64::try_from(rolling.seen.len()).unwrap_or(u64::MAX).max(u64::from(floor));
    let added = u64::try_from(added).unwrap_or(u64::MAX);
    let removed = u64::try_from(removed).unwrap_or(u64::MAX);
    u32::try_from(base.saturating_add(added).saturating_sub(removed)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::CapacityRange;

    fn range(min: u32, max: u32) -> Capacity {
        Capacity::Range(CapacityRange { min, max })
    }

    #[test]
    fn target_rules() {
        let cases = [
            // A number is the number, whatever runs.
            (Capacity::Fixed(3), None, 0, 3),
            (Capacity::Fixed(3), None, 7, 3),
            // The provider's desired count wins over a number, up or down.
            (Capacity::Fixed(3), Some(5), 3, 5),
            (Capacity::Fixed(3), Some(2), 3, 2),
            (Capacity::Fixed(3), Some(0), 3, 0),
            // A range keeps what runs, clamped.
            (range(2, 6), None, 4, 4),
            (range(2, 6), None, 1, 2),
            (range(2, 6), None, 0, 2),
            (range(2, 6), None, 9, 6),
            // The provider's desired count wins over what runs, clamped into the range.
            (range(2, 6), Some(5), 3, 5),
            (range(2, 6), Some(8), 3, 6),
            (range(2, 6), Some(1), 5, 2),
            (range(3, 3), None, 10, 3),
            // An unvalidated range never panics.
            (range(5, 2), None, 3, 5),
            (range(5, 2), Some(9), 3, 5),
        ];
        for (capacity, desired, current, want) in cases {
            assert_eq!(
                target(capacity, desired, current),
                want,
                "{capacity} {desired:?} {current}"
            );
        }
    }

    fn running(id: &str) -> Instance {
        Instance {
            id: id.into(),
            image: "img".into(),
            address: None,
            running: true,
            attached: true,
            launched_at: None,
            launch_key: None,
        }
    }

    fn ids(ids: &[&str]) -> Vec<InstanceId> {
        ids.iter().map(|&i| InstanceId::from(i)).collect()
    }

    #[test]
    fn the_rollouts_own_work_does_not_move_the_count_others_do() {
        let fleet = |names: &[&str]| names.iter().map(|n| running(n)).collect::<Vec<_>>();
        let mut rolling = Rolling { seen: ids(&["o1", "o2", "o3", "o4"]), ..Rolling::default() };
        assert_eq!(fleet_count(&fleet(&["o1", "o2", "o3", "o4"]), &rolling, 1), 4);
        // A surge instance launched, then attached: still 4.
        rolling.launched = ids(&["n1"]);
        assert_eq!(fleet_count(&fleet(&["o1", "o2", "o3", "o4", "n1"]), &rolling, 1), 4);
        rolling.launched.clear();
        rolling.attached = ids(&["n1"]);
        assert_eq!(fleet_count(&fleet(&["o1", "o2", "o3", "o4", "n1"]), &rolling, 1), 4);
        // The old one retired: still 4, also while the provider still lists it.
        rolling.done = ids(&["o1"]);
        assert_eq!(fleet_count(&fleet(&["o2", "o3", "o4", "n1"]), &rolling, 1), 4);
        assert_eq!(fleet_count(&fleet(&["o1", "o2", "o3", "o4", "n1"]), &rolling, 1), 4);
        // Someone else added two (an autoscaler): 6, also once the rollout replaced one of them.
        assert_eq!(fleet_count(&fleet(&["o2", "o3", "o4", "n1", "x1", "x2"]), &rolling, 1), 6);
        rolling.done.push("x1".into());
        assert_eq!(fleet_count(&fleet(&["o2", "o3", "o4", "n1", "x2"]), &rolling, 1), 6);
        // Someone removed one: 5. A dead one counts as removed until the rollout retires it.
        assert_eq!(fleet_count(&fleet(&["o2", "o4", "n1", "x2"]), &rolling, 1), 5);
        let mut dead = fleet(&["o2", "o3", "o4", "n1", "x2"]);
        dead[0].running = false;
        assert_eq!(fleet_count(&dead, &rolling, 1), 5);
        rolling.done.push("o2".into());
        assert_eq!(fleet_count(&fleet(&["o3", "o4", "n1", "x2"]), &rolling, 1), 6);
        // The rollout's own launches filling an empty fleet up to the minimum do not count
        // twice, and an instance added on top of them does.
        let mut empty = Rolling { attached: ids(&["n1", "n2"]), ..Rolling::default() };
        assert_eq!(fleet_count(&fleet(&["n1", "n2"]), &empty, 2), 2);
        assert_eq!(fleet_count(&fleet(&["n1", "n2", "x1"]), &empty, 2), 3);
        empty.seen = ids(&["a", "b", "c"]);
        assert_eq!(fleet_count(&fleet(&["a", "b", "c"]), &empty, 2), 3);
    }
}
