//! Test support: a fake cloud behind the exec provider. One python script serves every
//! operation: instances are JSON records in `<STATE>/<fleet>.json` (`$KILN_PROVIDER_STATE`) (no processes), the `health`
//! operation answers healthy, and every call first sleeps `DELAY` seconds (the `env:` setting, `$KILN_PROVIDER_DELAY`) while a marker file
//! `$STATE/<fleet>.busy.<pid>` exists, so a test can see that a slow call is in flight.

/// The script (commit it as an executable, e.g. `hooks/cloud`).
pub const CLOUD: &str = r#"#!/usr/bin/env python3
import json, os, sys, time
req = json.load(sys.stdin)
op, fleet = req["operation"], req["fleet"]
state_dir = os.environ["KILN_PROVIDER_STATE"]
delay = float(os.environ.get("KILN_PROVIDER_DELAY", "0"))
if delay > 0:
    marker = os.path.join(state_dir, "%s.busy.%d" % (fleet, os.getpid()))
    open(marker, "w").close()
    time.sleep(delay)
    os.unlink(marker)
path = os.path.join(state_dir, fleet + ".json")
try:
    with open(path) as f:
        state = json.load(f)
except OSError:
    state = {"next": 1, "instances": {}}
def save():
    tmp = path + ".tmp.%d" % os.getpid()
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)
inst = state["instances"]
if op == "list":
    print(json.dumps({"instances": list(inst.values())}))
elif op == "launch":
    for i in inst.values():
        if i.get("launch_key") == req["key"]:
            print(json.dumps(i)); sys.exit(0)
    iid = "i-%s-%d" % (fleet, state["next"])
    state["next"] += 1
    inst[iid] = {"id": iid, "image": req["image"], "running": True, "attached": False,
                 "launch_key": req["key"]}
    save()
    print(json.dumps(inst[iid]))
elif op in ("attach", "detach"):
    if req["id"] in inst:
        inst[req["id"]]["attached"] = op == "attach"
        save()
elif op == "terminate":
    inst.pop(req["id"], None)
    save()
elif op == "health":
    print(json.dumps({"health": "healthy"}))
"#;

/// A bake hook that names the image after the stage's tree id (no files baked).
pub const BAKE: &str = "#!/bin/sh\necho \"image=img-$KILN_TREE_ID\" >> \"$KILN_OUTPUT\"\n";

/// A fleet on the fake cloud, as a `kiln.yaml` list item: watches `<name>/`, `capacity`
/// instances, every provider call taking `delay` seconds, state in `state`.
pub fn fleet_yaml(name: &str, capacity: u32, delay: f64, state: &str) -> String {
    format!(
        r#"  - name: {name}
    paths: [{name}/]
    image:
      stages:
        - {{ name: app, path: {name}/, bake: hooks/bake }}
    rollout:
      provider: exec
      exec:
        list: hooks/cloud
        launch: hooks/cloud
        attach: hooks/cloud
        detach: hooks/cloud
        terminate: hooks/cloud
        health: hooks/cloud
        timeout: 10m
        env: {{ DELAY: "{delay}", STATE: "{state}" }}
      capacity: {capacity}
      maxSurge: 1
      healthCheck: {{ interval: 100ms, healthyThreshold: 1, timeout: 30m }}
      drain: 0s
      progressDeadline: 2h
"#
    )
}

/// Whether a call of `fleet` is sleeping in the cloud right now.
pub fn call_in_flight(state: &std::path::Path, fleet: &str) -> bool {
    let prefix = format!("{fleet}.busy.");
    std::fs::read_dir(state).is_ok_and(|entries| {
        entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    })
}

/// The same cloud in POSIX sh, for benchmarks with many fleets: a python start costs tens of
/// milliseconds, a shell a few. One file per instance under `<STATE>/<fleet>/`; no delay.
pub const CLOUD_SH: &str = r#"#!/bin/sh
set -eu
dir="$KILN_PROVIDER_STATE/$KILN_FLEET"
mkdir -p "$dir"
req=$(cat)
field() { printf '%s' "$req" | sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p"; }
case "$KILN_OPERATION" in
list)
  printf '{"instances":['
  sep=''
  for f in "$dir"/*.json; do
    [ -e "$f" ] || continue
    printf '%s' "$sep"; cat "$f"; sep=','
  done
  printf ']}\n' ;;
launch)
  key=$(field key); image=$(field image)
  if [ -e "$dir/key-$key" ]; then cat "$dir/$(cat "$dir/key-$key").json"; exit 0; fi
  id="i-$KILN_FLEET-$(date +%s%N)"
  printf '{"id":"%s","image":"%s","running":true,"attached":false,"launch_key":"%s"}' \
    "$id" "$image" "$key" > "$dir/$id.json"
  echo "$id" > "$dir/key-$key"
  cat "$dir/$id.json" ;;
attach|detach)
  id=$(field id); f="$dir/$id.json"
  [ -e "$f" ] || exit 0
  if [ "$KILN_OPERATION" = attach ]; then a=true; else a=false; fi
  sed "s/\"attached\":[a-z]*/\"attached\":$a/" "$f" > "$f.tmp" && mv "$f.tmp" "$f" ;;
terminate)
  id=$(field id); rm -f "$dir/$id.json" ;;
health)
  echo '{"health":"healthy"}' ;;
esac
"#;
