use super::*;

struct Files(&'static [(&'static str, bool)]);

impl RepoFiles for Files {
    fn file(&self, path: &str) -> Option<bool> {
        self.0.iter().find(|(p, _)| *p == path).map(|(_, x)| *x)
    }
}

const HOOKS: Files = Files(&[
    ("hooks/bake-base", true),
    ("hooks/bake-app", true),
    ("hooks/reconcile", true),
    ("hooks/not-exec", false),
]);

const GOOD: &str = "\
fleets:
  - name: web
    paths: [image/, infra/]
    image:
      stages:
        - { name: base, path: image/base, bake: hooks/bake-base }
        - { name: app,  path: image/app,  from: base, bake: hooks/bake-app }
      timeout: 30m
    infra: { path: infra/, reconcile: hooks/reconcile, timeout: 15m }
    rollout:
      provider: local
      capacity: 3
      maxSurge: 1
      maxUnavailable: 0
      healthCheck: { http: /healthz, interval: 1s, healthyThreshold: 2, timeout: 60s }
      minHealthy: 5s
      drain: 5s
      canary: { count: 1, pause: 30s }
      schedule: { delay: 1m }
      onFailure: rollback
";

fn problems(text: &str) -> Vec<String> {
    match load(text, "kiln.yaml", &HOOKS) {
        Ok(_) => vec![],
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn the_design_example_parses() {
    let manifest = load(GOOD, "kiln.yaml", &HOOKS).unwrap();
    let fleet = &manifest.fleets[0];
    assert_eq!(fleet.rollout.capacity, 3);
    assert_eq!(fleet.rollout.surge(), 1);
    assert_eq!(fleet.rollout.min_healthy, Duration::from_secs(5));
    assert_eq!(fleet.rollout.schedule.as_ref().unwrap().delay, Some(Duration::from_secs(60)));
    assert_eq!(fleet.final_stage().unwrap().name, "app");
    assert_eq!(
        fleet.stages_in_order().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["base", "app"]
    );
}

#[test]
fn unknown_field_names_line_and_column() {
    let text = GOOD.replace("      minHealthy: 5s", "      minHealty: 5s");
    let found = problems(&text);
    assert_eq!(found.len(), 1);
    assert!(found[0].starts_with("kiln.yaml:16:7: "), "{found:?}");
    assert!(found[0].contains("unknown field `minHealty`"), "{found:?}");
}

#[test]
fn bad_duration_names_line() {
    let text = GOOD.replace("drain: 5s", "drain: 5 parsecs");
    let found = problems(&text);
    assert!(found[0].starts_with("kiln.yaml:17:14: "), "{found:?}");
    assert!(found[0].contains("invalid duration `5 parsecs`"), "{found:?}");
}

#[test]
fn missing_parent_stage_and_missing_hook_are_located() {
    let text =
        GOOD.replace("from: base", "from: bsae").replace("hooks/reconcile,", "hooks/reconcil,");
    let found = problems(&text);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].starts_with("kiln.yaml:7:") && found[0].contains("`bsae`, which is not a stage"),
        "{found:?}"
    );
    assert!(
        found[1].starts_with("kiln.yaml:9:") && found[1].contains("does not exist in the commit"),
        "{found:?}"
    );
}

#[test]
fn hook_must_be_executable_and_inside_the_repo() {
    let text = GOOD
        .replace("bake: hooks/bake-base", "bake: hooks/not-exec")
        .replace("bake: hooks/bake-app", "bake: ../../etc/evil");
    let found = problems(&text);
    assert!(found.iter().any(|p| p.contains("is not executable")), "{found:?}");
    assert!(
        found.iter().any(|p| p.contains("must be a relative path inside the repo")),
        "{found:?}"
    );
}

#[test]
fn cycles_and_bad_policy_values_are_reported() {
    let text = GOOD
        .replace(
            "- { name: base, path: image/base, bake: hooks/bake-base }",
            "- { name: base, path: image/base, from: app, bake: hooks/bake-base }",
        )
        .replace("capacity: 3", "capacity: 0")
        .replace("maxSurge: 1", "maxSurge: \"150%\"");
    let found = problems(&text);
    assert!(found.iter().any(|p| p.contains("form a cycle")), "{found:?}");
    assert!(found.iter().any(|p| p.contains("capacity must be at least 1")), "{found:?}");
    assert!(found.iter().any(|p| p.contains("maxSurge 150% is over 100%")), "{found:?}");
}

#[test]
fn not_yaml_is_an_error_not_a_panic() {
    for junk in
        ["", "fleets: [", "\u{0}\u{1}", "fleets: 3", "- a\n- b", "fleets:\n  - name: [1, 2]"]
    {
        let error = parse(junk, "kiln.yaml").map(|_| ()).unwrap_err();
        assert!(!error.problems.is_empty(), "{junk:?}");
    }
}

#[test]
fn percentages_resolve_like_kubernetes() {
    assert_eq!(IntOrPercent::Percent(25).resolve(4, true), 1);
    assert_eq!(IntOrPercent::Percent(25).resolve(5, true), 2);
    assert_eq!(IntOrPercent::Percent(25).resolve(5, false), 1);
    assert_eq!(IntOrPercent::Count(2).resolve(5, false), 2);
    let policy: RolloutPolicy =
        serde_yaml::from_str("capacity: 4\nmaxSurge: 0\nmaxUnavailable: 0").unwrap();
    assert_eq!(
        policy.surge(),
        1,
        "a rollout with no surge and no unavailability could never progress"
    );
}

#[test]
fn durations_round_trip() {
    for (text, secs) in [("30s", 30), ("1m", 60), ("1h30m", 5400), ("7d", 604800)] {
        assert_eq!(parse_duration(text).unwrap(), Duration::from_secs(secs));
        assert_eq!(format_duration(Duration::from_secs(secs)), text);
    }
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert!(parse_duration("5").unwrap_err().contains("missing unit"));
    assert!(parse_duration("5y").unwrap_err().contains("unknown unit `y`"));
}

#[test]
fn windows_parse() {
    let w = Window { start: "22:30".into(), end: "02:00".into() };
    assert_eq!(w.bounds(), Some((22 * 60 + 30, 120)));
    assert_eq!(Window { start: "25:00".into(), end: "02:00".into() }.bounds(), None);
}

#[test]
fn json_schema_describes_the_manifest() {
    let schema = json_schema();
    let text = schema.to_string();
    assert_eq!(schema["title"], "kiln.yaml");
    for field in [
        "fleets",
        "stages",
        "maxSurge",
        "healthCheck",
        "healthyThreshold",
        "onFailure",
        "loadBalancer",
        "canary",
        "window",
    ] {
        assert!(text.contains(&format!("\"{field}\"")), "schema names `{field}`");
    }
    // deny_unknown_fields shows up as additionalProperties: false, so editors flag typos too.
    assert!(text.contains("\"additionalProperties\":false"), "{text}");
    // Durations are strings like "30s", not serde's {secs, nanos}.
    assert!(!text.contains("nanos"), "{text}");
}
