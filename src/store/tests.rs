use super::*;
use crate::model::{ImageRef, Revision, now};
use crate::rollout::state::{Origin, Plan, Rollout, RolloutState};

fn rollout(fleet: &str, revision: &str, state: RolloutState) -> Rollout {
    Rollout {
        id: RolloutId(0),
        fleet: Some(fleet.into()),
        revision: Revision(revision.into()),
        summary: "s".into(),
        trigger: "poll".into(),
        origin: Origin::Commit,
        state,
        paused_from: None,
        plan: Plan::default(),
        image: None,
        stage_images: Default::default(),
        previous_image: None,
        outputs: Default::default(),
        reason: None,
        created_at: now(),
        started_at: None,
        finished_at: None,
        not_before: None,
        attempt: 0,
        rolling: None,
    }
}

fn commit(revision: &str, kind: CommitKind) -> CommitRecord {
    CommitRecord {
        revision: Revision(revision.into()),
        parents: vec![],
        summary: "msg".into(),
        author: "a <a@b>".into(),
        committed_at: now(),
        seen_at: now(),
        kind,
        trigger: "poll".into(),
        tip: true,
    }
}

#[test]
fn rollouts_survive_reopen_and_list_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<RolloutId> = {
        let store = Store::open(dir.path(), 0).unwrap();
        (0..3)
            .map(|i| {
                store
                    .create_rollout(rollout("web", &format!("{i:040}"), RolloutState::Succeeded))
                    .unwrap()
                    .id
            })
            .collect()
    };
    let store = Store::open(dir.path(), 0).unwrap();
    let listed = store.rollouts(&RolloutFilter::default()).unwrap();
    assert_eq!(
        listed.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids.iter().rev().copied().collect::<Vec<_>>()
    );
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids are monotonic: {ids:?}");
}

#[test]
fn filters_and_paging() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let a = store.create_rollout(rollout("web", "aaaa", RolloutState::Succeeded)).unwrap();
    let b = store.create_rollout(rollout("api", "bbbb", RolloutState::Failed)).unwrap();
    let c = store.create_rollout(rollout("web", "cccc", RolloutState::Rolling)).unwrap();
    let web =
        store.rollouts(&RolloutFilter { fleet: Some("web".into()), ..Default::default() }).unwrap();
    assert_eq!(web.iter().map(|r| r.id).collect::<Vec<_>>(), [c.id, a.id]);
    let failed = store
        .rollouts(&RolloutFilter { state: Some(RolloutState::Failed), ..Default::default() })
        .unwrap();
    assert_eq!(failed.iter().map(|r| r.id).collect::<Vec<_>>(), [b.id]);
    let by_commit =
        store.rollouts(&RolloutFilter { commit: Some("cc".into()), ..Default::default() }).unwrap();
    assert_eq!(by_commit.len(), 1);
    let page = store
        .rollouts(&RolloutFilter { before: Some(c.id), limit: Some(1), ..Default::default() })
        .unwrap();
    assert_eq!(page.iter().map(|r| r.id).collect::<Vec<_>>(), [b.id]);
    assert_eq!(store.active_rollouts().unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), [c.id]);
}

#[test]
fn events_are_ordered_per_rollout_and_published() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let one = store.create_rollout(rollout("web", "aaaa", RolloutState::Pending)).unwrap().id;
    let two = store.create_rollout(rollout("web", "bbbb", RolloutState::Pending)).unwrap().id;
    let mut feed = store.subscribe();
    let first = store.append_event(one, Level::Info, "state", "pending → baking", None).unwrap();
    store.append_event(two, Level::Info, "state", "other", None).unwrap();
    store
        .append_event(one, Level::Error, "hook.stderr", "token https://u:secret@h/x", None)
        .unwrap();
    let events = store.events(one, 0).unwrap();
    assert_eq!(events.len(), 2);
    assert!(events[0].seq < events[1].seq);
    assert_eq!(
        events[1].message, "token https://***@h/x",
        "messages are redacted before they are stored"
    );
    assert_eq!(store.events(one, first.seq).unwrap().len(), 1);
    assert_eq!(feed.try_recv().unwrap().seq, first.seq);
}

#[test]
fn commits_are_deduplicated_and_deletions_recorded_separately() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    assert!(store.record_commit(&commit("abc", CommitKind::Push)).unwrap());
    assert!(!store.record_commit(&commit("abc", CommitKind::Push)).unwrap());
    assert!(store.record_commit(&commit("abc", CommitKind::BranchDeleted)).unwrap());
    assert_eq!(store.commits(10).unwrap().len(), 2);
    assert_eq!(store.commit(&Revision("abc".into())).unwrap().unwrap().kind, CommitKind::Push);
}

#[test]
fn retention_prunes_old_terminal_rollouts_and_their_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 2).unwrap();
    let active = store.create_rollout(rollout("web", "0", RolloutState::Rolling)).unwrap().id;
    let old = store.create_rollout(rollout("web", "1", RolloutState::Succeeded)).unwrap().id;
    store.append_event(old, Level::Info, "state", "x", None).unwrap();
    store.create_rollout(rollout("web", "2", RolloutState::Succeeded)).unwrap();
    let ids: Vec<_> =
        store.rollouts(&RolloutFilter::default()).unwrap().iter().map(|r| r.id).collect();
    assert!(ids.contains(&active), "a rollout in motion is never pruned");
    assert!(!ids.contains(&old));
    assert!(store.events(old, 0).unwrap().is_empty());
}

#[test]
fn newer_schema_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), 0).unwrap();
        store.set_meta("schema_version", &(SCHEMA_VERSION + 1)).unwrap();
    }
    let error = Store::open(dir.path(), 0).unwrap_err();
    assert!(matches!(error, StoreError::NewerSchema { found } if found == SCHEMA_VERSION + 1));
    assert!(error.to_string().contains("upgrade kiln"), "{error}");
}

#[test]
fn second_open_of_a_live_store_fails_instead_of_corrupting() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path(), 0).unwrap();
    // sled takes an exclusive file lock; a second process gets an error. Within one process
    // sled's lock also refuses a second open of the same path.
    assert!(Store::open(dir.path(), 0).is_err());
}

#[test]
fn bakes_and_deployed_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let record = BakeRecord {
        key: "k1".into(),
        fleet: "web".into(),
        stage: "app".into(),
        image: ImageRef("img-1".into()),
        revision: Revision("abc".into()),
        rollout: RolloutId(1),
        baked_at: now(),
        outputs: Default::default(),
    };
    store.put_bake(&record).unwrap();
    assert_eq!(store.bake("k1").unwrap(), Some(record));
    assert_eq!(store.bake("k2").unwrap(), None);
    assert!(store.deployed("web").unwrap().is_none());
}

#[test]
fn envelope_format_is_stable() {
    // The on-disk shape is a contract with older and newer kilns: pin it.
    let bytes = Store::encode("meta", &serde_json::json!({"a": 1})).unwrap();
    assert_eq!(String::from_utf8(bytes).unwrap(), r#"{"v":1,"r":{"a":1}}"#);
}
