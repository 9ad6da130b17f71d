#!/usr/bin/env python3
"""kiln exec provider `local-test`: a real, working provider for one machine (python3 stdlib).

Instances are processes started from a directory image (`<image>/run`, with PORT,
KILN_INSTANCE_ID and KILN_IMAGE set) in their own session. State lives in the directory
named by the setting `state` (env KILN_PROVIDER_STATE). Load balancer membership goes
through kiln's own load balancer when the setting `lb_admin` (KILN_PROVIDER_LB_ADMIN,
e.g. http://127.0.0.1:4567) names its admin endpoint; otherwise it is only recorded. The
admin endpoint wants the bearer token kept in the file the setting `lb_token_file`
(KILN_PROVIDER_LB_TOKEN_FILE) names (`<fleet dir>/lb/admin-token`).

Test knobs: KILN_PROVIDER_JUNK=<operation> makes that operation print junk;
KILN_PROVIDER_FAIL=<operation>:<code> makes it exit with <code>.

Protocol: see docs/exec-provider.md. Usage: provider.py <operation>.
"""
import fcntl, json, os, signal, socket, subprocess, sys, time, urllib.error, urllib.request
from datetime import datetime, timezone

OP = sys.argv[1] if len(sys.argv) > 1 else ""


def die(message, code=1):
    print("local-test %s: %s" % (OP, message), file=sys.stderr)
    sys.exit(code)


def start_ticks(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 1:].split()
    if not fields or fields[0] == "Z":
        return None
    return int(fields[19])


def alive(record):
    pid = record.get("pid")
    return bool(pid) and start_ticks(pid) == record.get("start_ticks")


def write_atomic(path, value):
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def lb(method, path, body=None):
    """Calls kiln's LB admin endpoint; exit 75 (transient) when it is unreachable."""
    admin = os.environ.get("KILN_PROVIDER_LB_ADMIN")
    if not admin:
        return
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(admin + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    token_file = os.environ.get("KILN_PROVIDER_LB_TOKEN_FILE")
    if token_file:
        try:
            with open(token_file) as f:
                req.add_header("Authorization", "Bearer " + f.read().strip())
        except OSError as e:
            die("cannot read the load balancer token: %s" % e)
    try:
        with urllib.request.urlopen(req, timeout=600) as reply:
            reply.read()
    except urllib.error.HTTPError as e:
        die("load balancer answered %d: %s" % (e.code, e.read().decode(errors="replace")))
    except OSError as e:
        die("load balancer unreachable: %s" % e, 75)


def main():
    state = os.environ.get("KILN_PROVIDER_STATE")
    if not state:
        die("setting `state` (KILN_PROVIDER_STATE) is required")
    # The request arrives as JSON on stdin; the same JSON is in the file $KILN_REQUEST names.
    try:
        request = json.load(sys.stdin)
    except ValueError as e:
        die(f"stdin is not a JSON request: {e}")
    request_path = os.environ.get("KILN_REQUEST")
    if not request_path:
        die("KILN_REQUEST is not set")
    with open(request_path) as f:
        if json.load(f) != request:
            die("the request on stdin differs from $KILN_REQUEST")

    fail = os.environ.get("KILN_PROVIDER_FAIL", "")
    if fail.startswith(OP + ":"):
        die("failing on purpose", int(fail.split(":", 1)[1]))
    if os.environ.get("KILN_PROVIDER_JUNK") == OP:
        print("this is not json {")
        return

    instances = os.path.join(state, "instances")
    os.makedirs(instances, exist_ok=True)
    lock = open(os.path.join(state, "lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)

    def path_of(id):
        if not id or "/" in id or id.startswith("."):
            die("bad instance id %r" % id)
        return os.path.join(instances, id, "instance.json")

    def load(id):
        try:
            with open(path_of(id)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def records():
        out = []
        for id in sorted(os.listdir(instances)):
            r = load(id)
            if r is not None:
                out.append(r)
        return out

    def view(r):
        return {
            "id": r["id"],
            "image": r["image"],
            "address": "127.0.0.1:%d" % r["port"],
            "running": alive(r),
            "attached": r.get("attached", False),
            "launched_at": r["launched_at"],
            "launch_key": r["key"],
        }

    if OP == "list":
        print(json.dumps({"instances": [view(r) for r in records() if r["state"] != "terminated"]}))
    elif OP == "launch":
        image, key = request["image"], request["key"]
        for r in records():
            if r["key"] == key:
                print(json.dumps(view(r)))
                return
        run = os.path.join(image, "run")
        if not os.access(run, os.X_OK):
            die("image %s has no executable run" % image)
        id = "%s-%s" % (request["fleet"], os.urandom(4).hex())
        home = os.path.join(instances, id)
        os.makedirs(os.path.join(home, "work"))
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        record = {"id": id, "image": image, "key": key, "port": port, "state": "launching",
                  "attached": False, "pid": None, "start_ticks": None,
                  "launched_at": datetime.now(timezone.utc).isoformat()}
        write_atomic(path_of(id), record)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
               "LANG": os.environ.get("LANG", "C.UTF-8"), "PORT": str(port),
               "KILN_INSTANCE_ID": id, "KILN_IMAGE": image}
        with open(os.path.join(home, "log"), "ab") as log:
            child = subprocess.Popen([run], env=env, cwd=os.path.join(home, "work"),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True)
        record.update(pid=child.pid, start_ticks=start_ticks(child.pid), state="running")
        write_atomic(path_of(id), record)
        print(json.dumps(view(record)))
    elif OP == "attach":
        r = load(request["id"])
        if r is None or r["state"] == "terminated":
            die("no instance %s" % request["id"])
        lb("PUT", "/backends/" + r["id"], {"address": "127.0.0.1:%d" % r["port"]})
        r["attached"] = True
        write_atomic(path_of(r["id"]), r)
    elif OP == "detach":
        r = load(request["id"])
        lb("DELETE", "/backends/%s?drain_ms=%d" % (request["id"], request.get("drain_ms", 0)))
        if r is not None:
            r["attached"] = False
            write_atomic(path_of(r["id"]), r)
    elif OP == "terminate":
        r = load(request["id"])
        if r is None or r["state"] == "terminated":
            return
        lb("DELETE", "/backends/%s?drain_ms=0" % r["id"])
        if alive(r):
            os.killpg(r["pid"], signal.SIGTERM)
            deadline = time.time() + 5
            while alive(r) and time.time() < deadline:
                time.sleep(0.02)
            if alive(r):
                os.killpg(r["pid"], signal.SIGKILL)
        elif r.get("pid") and start_ticks(r["pid"]) is None:
            try:  # the leader died; its group may have survivors
                os.killpg(r["pid"], signal.SIGKILL)
            except OSError:
                pass
        r.update(state="terminated", attached=False)
        write_atomic(path_of(r["id"]), r)
    elif OP == "health":
        r = load(request["id"])
        if r is None or not alive(r):
            print(json.dumps({"health": "unhealthy"}))
            return
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % r["port"], timeout=5) as reply:
                ok = reply.status == 200
        except OSError:
            ok = False
        print(json.dumps({"health": "healthy" if ok else "unhealthy"}))
    else:
        die("unknown operation %r" % OP, 2)


if __name__ == "__main__":
    main()
