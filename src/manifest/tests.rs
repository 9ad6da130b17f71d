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
    assert_eq!(fleet.rollout.capacity, Capacity::Fixed(3));
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

/// Files whose `link*` paths (and anything under `linked/`) are symlinks.
struct WithLinks;

impl RepoFiles for WithLinks {
    fn file(&self, path: &str) -> Option<bool> {
        HOOKS.file(path)
    }
    fn symlink(&self, path: &str) -> bool {
        path.starts_with("link") || path.starts_with("linked/")
    }
}

/// The line and column of the problem mentioning `needle`, which must be located (non-zero).
fn located(found: &[String], needle: &str) -> (usize, usize) {
    let problem = found
        .iter()
        .find(|p| p.contains(needle))
        .unwrap_or_else(|| panic!("no problem mentions {needle:?}: {found:?}"));
    let parts: Vec<&str> = problem.splitn(4, ':').collect();
    assert_eq!(parts[0], "kiln.yaml", "{problem}");
    let line: usize = parts[1].parse().unwrap_or(0);
    let column: usize = parts[2].parse().unwrap_or(0);
    assert!(line > 0 && column > 0, "located: {problem}");
    (line, column)
}

#[test]
fn names_that_would_become_paths_are_refused_with_their_location() {
    let text = GOOD.replace("name: base,", "name: \"/../../fleets\",");
    let found = problems(&text);
    assert_eq!(located(&found, "stage name `/../../fleets`"), (6, 20), "{found:?}");
    assert!(found.iter().any(|p| p.contains("lowercase letters, digits and `-`")), "{found:?}");

    let text = GOOD.replace("- name: web", "- name: ../../victim");
    let found = problems(&text);
    assert_eq!(located(&found, "fleet name `../../victim`"), (2, 11), "{found:?}");

    for bad in ["Web", "-web", "web_1", "web.prod", "a/b", ".", ""] {
        assert!(!is_safe_name(bad), "{bad:?}");
    }
    assert!(!is_safe_name(&"a".repeat(64)));
    for good in ["web", "a", "0", "web-1", "a-b-c", &"a".repeat(63)] {
        assert!(is_safe_name(good), "{good:?}");
    }
}

#[test]
fn paths_that_leave_the_repo_are_refused_with_their_location() {
    let text = GOOD
        .replace("path: image/base,", "path: ../../../etc,")
        .replace("infra: { path: infra/,", "infra: { path: /etc,");
    let found = problems(&text);
    assert_eq!(located(&found, "path `../../../etc`"), (6, 31), "{found:?}");
    assert_eq!(located(&found, "path `/etc`"), (9, 20), "{found:?}");

    // `paths:` entries, flow and block style.
    let text = GOOD.replace("paths: [image/, infra/]", "paths: [image/, /var/lib]");
    let found = problems(&text);
    assert_eq!(located(&found, "paths `/var/lib`"), (3, 21), "{found:?}");
    let text = GOOD.replace("paths: [image/, infra/]", "paths:\n      - image/\n      - a/../..");
    let found = problems(&text);
    assert_eq!(located(&found, "paths `a/../..`"), (5, 9), "{found:?}");

    // Hooks: absolute and `..` paths.
    let text = GOOD.replace("reconcile: hooks/reconcile", "reconcile: /bin/sh");
    let found = problems(&text);
    assert_eq!(located(&found, "reconcile hook `/bin/sh` must be a relative path"), (9, 39));
}

#[test]
fn symlinked_hooks_are_refused() {
    let text = GOOD.replace("bake: hooks/bake-app", "bake: linked/bake-app");
    let found = match load(&text, "kiln.yaml", &WithLinks) {
        Ok(_) => vec![],
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    };
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(located(&found, "bake hook `linked/bake-app` is a symbolic link"), (7, 61));
}

#[test]
fn an_oversized_manifest_is_refused_naming_the_limit() {
    let limit = usize::try_from(MAX_MANIFEST_BYTES).unwrap();
    let text = format!("{GOOD}#{}\n", "x".repeat(limit));
    let error = parse(&text, "kiln.yaml").unwrap_err();
    let message = error.to_string();
    assert!(message.starts_with("kiln.yaml:0:0: kiln.yaml is "), "{message}");
    assert!(
        message.contains(&format!("over the limit of {MAX_MANIFEST_BYTES} bytes")),
        "{message}"
    );
}

/// `paths: [*s, *s, …]` where `s` is a 64 KiB string: 2,000 aliases expand a 200 KB file to
/// 128 MiB of strings, well under serde_yaml's own repetition limit.
fn scalar_alias_bomb() -> String {
    let big = "x".repeat(64 * 1024);
    let aliases = vec!["*s"; 2000].join(", ");
    GOOD.replace("paths: [image/, infra/]", &format!("paths: [&s {big}, {aliases}]"))
}

/// Three levels of 100 aliases: 1,000,000 values from a 3 KB file.
fn nested_alias_bomb() -> String {
    let level = |name: &str, of: &str| format!("{name}: &{name} [{}]\n", vec![of; 100].join(", "));
    format!("{}{}{}{GOOD}", level("a", "x"), level("b", "*a"), level("c", "*b"))
}

#[test]
fn alias_bombs_are_refused_before_they_expand() {
    let error = parse(&scalar_alias_bomb(), "kiln.yaml").unwrap_err();
    let message = error.to_string();
    assert!(message.starts_with("kiln.yaml:3:"), "{message}");
    assert!(message.contains(&format!("more than {MAX_SCALAR_BYTES} bytes of text")), "{message}");

    // Located where the expansion ran over: inside the innermost anchor, on line 1.
    let error = parse(&nested_alias_bomb(), "kiln.yaml").unwrap_err();
    let message = error.to_string();
    assert!(message.starts_with("kiln.yaml:1:"), "{message}");
    assert!(message.contains(&format!("more than {MAX_NODES} YAML values")), "{message}");

    // A few aliases for a shared setting stay legal.
    let shared =
        GOOD.replace("timeout: 30m", "timeout: &t 30m").replace("timeout: 15m", "timeout: *t");
    let manifest = load(&shared, "kiln.yaml", &HOOKS).unwrap();
    assert_eq!(manifest.fleets[0].infra.as_ref().unwrap().timeout, Duration::from_secs(1800));
}

#[test]
fn long_lists_are_refused_naming_the_limit() {
    let paths: Vec<String> = (0..=MAX_PATHS).map(|i| format!("p{i}/")).collect();
    let text = GOOD.replace("[image/, infra/]", &format!("[{}]", paths.join(", ")));
    let found = problems(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(located(&found, &format!("over the limit of {MAX_PATHS} (MAX_PATHS)")), (3, 5));

    let stages: String = (0..=MAX_STAGES)
        .map(|i| format!("        - {{ name: s{i}, path: image/base, bake: hooks/bake-base }}\n"))
        .collect();
    let text = GOOD
        .replace("        - { name: base, path: image/base, bake: hooks/bake-base }\n", &stages);
    let found = problems(&text);
    assert_eq!(located(&found, &format!("over the limit of {MAX_STAGES} (MAX_STAGES)")), (5, 7));

    // Compact, so MAX_FLEETS + 1 of them fit under MAX_MANIFEST_BYTES.
    let fleet =
        "  - { name: a, image: { stages: [{ name: s, path: p, bake: hooks/bake-base }] } }\n";
    let text = format!("fleets:\n{}", fleet.repeat(MAX_FLEETS + 1));
    let found = problems(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(located(&found, &format!("over the limit of {MAX_FLEETS} (MAX_FLEETS)")), (1, 1));
}

#[test]
fn problems_past_the_bound_are_counted_not_located() {
    let paths: Vec<String> = (0..MAX_PATHS).map(|i| format!("/abs{i}")).collect();
    let text = GOOD.replace("[image/, infra/]", &format!("[{}]", paths.join(", ")));
    let found = problems(&text);
    assert_eq!(found.len(), MAX_PROBLEMS + 1, "{found:?}");
    assert!(
        found[MAX_PROBLEMS]
            .contains(&format!("{} more problems not shown", MAX_PATHS - MAX_PROBLEMS))
    );
}

#[test]
fn capacity_is_a_number_or_a_range() {
    let range = GOOD.replace("capacity: 3", "capacity: { min: 2, max: 6 }");
    let manifest = load(&range, "kiln.yaml", &HOOKS).expect("a range parses");
    let capacity = manifest.fleets[0].rollout.capacity;
    assert_eq!(capacity, Capacity::Range(CapacityRange { min: 2, max: 6 }));
    assert_eq!((capacity.min(), capacity.max(), capacity.to_string()), (2, 6, "2..6".into()));
    let block = GOOD.replace("capacity: 3", "capacity:\n        min: 1\n        max: 4");
    let manifest = load(&block, "kiln.yaml", &HOOKS).expect("a block range parses");
    assert_eq!(manifest.fleets[0].rollout.capacity.max(), 4);
    // Both forms round-trip through serde as the manifest writes them.
    for capacity in [Capacity::Fixed(3), Capacity::Range(CapacityRange { min: 2, max: 6 })] {
        let text = serde_yaml::to_string(&capacity).expect("serializes");
        assert_eq!(serde_yaml::from_str::<Capacity>(&text).expect("parses back"), capacity);
    }
}

#[test]
fn bad_capacities_name_line_and_column() {
    // (replacement, message, line:col). Type errors come from serde with their location; the
    // rest from validation, located at the value.
    let cases = [
        ("capacity: three", "expected a count of instances or `{min: N, max: M}`", "12:17"),
        ("capacity: -2", "capacity -2 is negative", "12:17"),
        ("capacity: 99999999999", "capacity 99999999999 is over the limit of 10000", "12:17"),
        ("capacity: [2, 6]", "expected a count of instances", "12:17"),
        ("capacity: { min: 2, maks: 6 }", "unknown field `maks`", "12:27"),
        ("capacity: { min: 2 }", "missing field `max`", "12:17"),
        ("capacity: 10001", "capacity 10001 is over the limit of 10000", "12:17"),
        ("capacity: { min: 5, max: 2 }", "capacity.min 5 is more than capacity.max 2", "12:7"),
        ("capacity: { min: 0, max: 2 }", "capacity.min must be at least 1", "12:24"),
        ("capacity: { min: 1, max: 20000 }", "capacity.max 20000 is over the limit", "12:32"),
    ];
    for (replacement, message, at) in cases {
        let found = problems(&GOOD.replace("capacity: 3", replacement));
        assert!(
            found
                .iter()
                .any(|p| p.starts_with(&format!("kiln.yaml:{at}: ")) && p.contains(message)),
            "{replacement}: {found:?}"
        );
    }
    // A canary must fit in the smallest fleet the range allows.
    let text = GOOD
        .replace("capacity: 3", "capacity: { min: 1, max: 6 }")
        .replace("canary: { count: 1,", "canary: { count: 2,");
    let found = problems(&text);
    assert!(found.iter().any(|p| p.contains("canary.count 2 must be between 1 and capacity 1")));
}

#[test]
fn the_schema_shows_both_capacity_forms() {
    let schema = serde_json::to_string(&json_schema()).expect("schema serializes");
    assert!(schema.contains("CapacityRange"), "{schema}");
    let value: serde_json::Value = serde_json::from_str(&schema).expect("json");
    let defs = value.get("definitions").or_else(|| value.get("$defs")).expect("definitions");
    let capacity = defs.get("Capacity").expect("Capacity is defined").to_string();
    assert!(capacity.contains("anyOf") && capacity.contains("integer"), "{capacity}");
    let range = defs.get("CapacityRange").expect("CapacityRange").to_string();
    assert!(range.contains("\"min\"") && range.contains("\"max\""), "{range}");
}

#[test]
fn drift_defaults_to_report_every_five_minutes_and_is_validated() {
    let manifest = load(GOOD, "kiln.yaml", &HOOKS).unwrap();
    let drift = &manifest.fleets[0].drift;
    assert_eq!(drift.interval, Duration::from_secs(300));
    assert_eq!(drift.mode, DriftMode::Report);

    let repair = format!("{GOOD}    drift: {{ interval: 30s, mode: repair }}\n");
    let manifest = load(&repair, "kiln.yaml", &HOOKS).unwrap();
    assert_eq!(manifest.fleets[0].drift.interval, Duration::from_secs(30));
    assert_eq!(manifest.fleets[0].drift.mode, DriftMode::Repair);

    let too_short = format!("{GOOD}    drift: {{ interval: 10ms }}\n");
    let found = problems(&too_short);
    assert_eq!(found.len(), 1, "{found:?}");
    let line = too_short.lines().count();
    assert!(found[0].starts_with(&format!("kiln.yaml:{line}:")), "{found:?}");
    assert!(found[0].contains("drift.interval 10ms is under the minimum of 1s"), "{found:?}");

    let bad_mode = format!("{GOOD}    drift: {{ mode: fix }}\n");
    let found = problems(&bad_mode);
    assert!(found.iter().any(|p| p.contains("fix") && p.contains("report")), "{found:?}");
}

/// A repo with an exec provider in `hooks/provider/p/`, declaring its settings.
struct ExecRepo(&'static str);

impl RepoFiles for ExecRepo {
    fn file(&self, path: &str) -> Option<bool> {
        if path.starts_with("hooks/provider/p/") {
            return Some(true);
        }
        HOOKS.file(path)
    }
    fn read(&self, path: &str, _max: u64) -> Result<Option<String>, String> {
        let declared = path == "hooks/provider/p/settings.yaml" && !self.0.is_empty();
        Ok(declared.then(|| self.0.to_owned()))
    }
}

const SETTINGS: &str = "\
settings:
  asg: { required: true, description: the Auto Scaling group }
  region: { description: the AWS region }
";

fn exec_manifest(env: &str) -> String {
    GOOD.replace(
        "      provider: local\n",
        &format!(
            "      provider: exec
      exec:
        list: hooks/provider/p/list
        launch: hooks/provider/p/launch
        attach: hooks/provider/p/attach
        detach: hooks/provider/p/detach
        terminate: hooks/provider/p/terminate
        env:
{env}"
        ),
    )
}

fn exec_problems(text: &str, settings: &'static str) -> Vec<String> {
    match load(text, "kiln.yaml", &ExecRepo(settings)) {
        Ok(_) => vec![],
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn exec_settings_are_checked_against_the_providers_declaration() {
    let good = exec_manifest("          ASG: web-asg\n          region: eu-west-1\n");
    assert_eq!(exec_problems(&good, SETTINGS), Vec::<String>::new());
    let manifest = load(&good, "kiln.yaml", &ExecRepo(SETTINGS)).unwrap();
    let exec = manifest.fleets[0].rollout.provider.exec().unwrap();
    assert_eq!(exec.env["ASG"], "web-asg");

    // A setting the scripts do not read, and the required one missing: both located.
    let wrong = exec_manifest("          ASG_NAME: web-asg\n          REGION: eu-west-1\n");
    let found = exec_problems(&wrong, SETTINGS);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(located(&found, "setting `ASG_NAME` is not read"), (19, 11), "{found:?}");
    assert!(found.iter().any(|p| p.contains("settings.yaml declares: asg, region")), "{found:?}");
    assert_eq!(
        located(&found, "lacks setting `asg`, which hooks/provider/p/settings.yaml requires"),
        (18, 9),
        "{found:?}"
    );

    // A provider that declares nothing is not checked.
    let found = match load(&wrong, "kiln.yaml", &HOOKS_AND_SCRIPTS) {
        Ok(_) => vec![],
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    };
    assert_eq!(found, Vec::<String>::new());
}

/// The provider scripts without a `settings.yaml`.
const HOOKS_AND_SCRIPTS: ExecRepo = ExecRepo("");

#[test]
fn a_broken_settings_declaration_is_located_in_its_own_file() {
    let text = exec_manifest("          ASG: web-asg\n");
    let found = exec_problems(&text, "settings:\n  asg: { requird: true }\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("hooks/provider/p/settings.yaml:2:"), "{found:?}");
    assert!(found[0].contains("unknown field `requird`"), "{found:?}");
}

#[test]
fn a_providers_section_under_another_provider_is_located() {
    // loadBalancer is the local provider's.
    let text = exec_manifest("          ASG: a\n").replace(
        "onFailure: rollback\n",
        "onFailure: rollback\n      loadBalancer: { port: 9000 }\n",
    );
    let found = exec_problems(&text, SETTINGS);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(located(&found, "`loadBalancer` is a setting of the local provider"), (29, 7));
    assert!(found[0].contains("this fleet's provider is `exec`"), "{found:?}");

    // exec: under the local provider.
    let text = GOOD.replace(
        "      provider: local\n",
        "      provider: local\n      exec: { list: a, launch: a, attach: a, detach: a, terminate: a }\n",
    );
    let found = problems(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(located(&found, "`exec` is a setting of the exec provider"), (12, 7), "{found:?}");

    // provider: exec without its section.
    let text = GOOD.replace("provider: local", "provider: exec");
    let found = problems(&text);
    assert_eq!(located(&found, "`provider` is `exec`, which needs an `exec:` section"), (11, 7));
}

#[test]
fn each_fleet_is_located_at_its_own_name() {
    // `web` after `web-2`: each fleet's problem is on its own lines, not the first match of a
    // prefix of its name.
    let fleet = |name: &str, port: u16| {
        GOOD.trim_start_matches("fleets:\n")
            .replace("- name: web", &format!("- name: {name}"))
            .replace("capacity: 3", &format!("capacity: 0\n      loadBalancer: {{ port: {port} }}"))
            .replace("      canary: { count: 1, pause: 30s }\n", "")
    };
    let text = format!("fleets:\n{}{}", fleet("web-2", 9001), fleet("web", 9002));
    let found = problems(&text);
    let at: Vec<&str> =
        found.iter().filter_map(|p| p.strip_suffix(": capacity must be at least 1")).collect();
    assert_eq!(at, ["kiln.yaml:12:17", "kiln.yaml:31:17"], "{found:?}");
}

#[test]
fn verify_needs_a_trust_file_inside_the_repo_and_says_where() {
    const TRUST: Files = Files(&[
        ("hooks/bake-base", true),
        ("hooks/bake-app", true),
        ("hooks/reconcile", true),
        (".kiln/allowed_signers", false),
    ]);
    let load_with = |verify: &str| {
        let text = format!("verify:\n{verify}{GOOD}");
        match load(&text, "kiln.yaml", &TRUST) {
            Ok(manifest) => Ok(manifest),
            Err(e) => Err(e.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>()),
        }
    };
    let manifest = load_with("  sshAllowedSigners: .kiln/allowed_signers\n").unwrap();
    let verify = manifest.verify.unwrap();
    assert_eq!(verify.mode, VerifyMode::Range, "range is the default");
    assert!(verify.trust_files_changed_by.is_empty());

    let found = load_with("  mode: head\n").unwrap_err();
    assert!(found[0].starts_with("kiln.yaml:1:1: verify: names no trusted keys"), "{found:?}");
    let found = load_with("  gpgKeyring: ../keys.asc\n").unwrap_err();
    assert!(
        found[0].starts_with(
            "kiln.yaml:2:15: verify.gpgKeyring `../keys.asc` must be a relative path inside the repo"
        ),
        "{found:?}"
    );
    let found = load_with("  sshAllowedSigners: .kiln/missing\n").unwrap_err();
    assert!(
        found[0].contains("verify.sshAllowedSigners `.kiln/missing` is not a file"),
        "{found:?}"
    );
    let found = load_with("  mode: always\n  gpgKeyring: k\n").unwrap_err();
    assert!(found[0].starts_with("kiln.yaml:2:"), "{found:?}");
    assert!(found[0].contains("unknown variant `always`"), "{found:?}");
}

#[test]
fn canary_weight_and_gray_port_are_checked_where_written() {
    let good = GOOD
        .replace("canary: { count: 1, pause: 30s }", "canary: { weight: 10%, manual: true }")
        .replace(
            "onFailure: rollback",
            "onFailure: rollback\n      loadBalancer: { port: 8080, grayPort: 8081 }",
        );
    let manifest = load(&good, "kiln.yaml", &HOOKS).expect("weight and grayPort parse");
    let policy = &manifest.fleets[0].rollout;
    let canary = policy.canary.as_ref().expect("canary");
    assert_eq!((canary.count, canary.weight), (1, Some(10)), "count defaults to 1");
    assert_eq!(policy.provider.load_balancer().and_then(|lb| lb.gray_port), Some(8081));
    let cases = [
        (
            good.replace("weight: 10%", "weight: 100%"),
            "canary.weight 100% must be between 1% and 99%",
            "18:25",
        ),
        (good.replace("weight: 10%", "weight: ten"), "is not a percentage", "18:"),
        (
            good.replace("grayPort: 8081", "grayPort: 8080"),
            "loadBalancer.grayPort 8080 must be a port of its own",
            "21:",
        ),
    ];
    for (text, message, at) in cases {
        let found = problems(&text);
        assert!(
            found.iter().any(|p| p.starts_with(&format!("kiln.yaml:{at}")) && p.contains(message)),
            "{message}: {found:?}"
        );
    }
}
