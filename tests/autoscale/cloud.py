#!/usr/bin/env python3
"""A fake cloud for tests/autoscale.rs: an autoscaling group over the `local-test` provider.

Instances are the shipped `hooks/provider/local-test` provider's (real processes, real HTTP).
On top, the group keeps `<state>/group.json`: `{"desired": N or null, "template": IMAGE}`.
`list` adds `"desired"` to the reply when the group owns it (not null), as an AWS ASG or an
Alibaba ESS group does; every other kiln operation goes to the provider unchanged.

`cloud.py scale N` is the group's scaling activity, run by the test behind kiln's back: it
launches N instances on the image its launch template names and puts them in service (attach),
then raises `desired` by N. It holds the group lock throughout, and `list` takes it too, so
kiln sees the group before or after the activity, never half of it.
"""
import fcntl, json, os, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDER = os.path.join(HERE, "..", "provider", "local-test", "provider.py")
STATE = os.environ.get("KILN_PROVIDER_STATE") or sys.exit("KILN_PROVIDER_STATE is not set")
GROUP = os.path.join(STATE, "group.json")
OP = sys.argv[1] if len(sys.argv) > 1 else ""


def group():
    with open(GROUP) as f:
        return json.load(f)


def write_group(value):
    tmp = GROUP + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.rename(tmp, GROUP)


def provider(op, request):
    path = os.path.join(STATE, "cloud-request-%d.json" % os.getpid())
    with open(path, "w") as f:
        json.dump(request, f)
    env = dict(os.environ, KILN_REQUEST=path)
    out = subprocess.run([sys.executable, PROVIDER, op], input=json.dumps(request).encode(),
                         env=env, capture_output=True)
    os.remove(path)
    if out.returncode != 0:
        sys.stderr.write(out.stderr.decode(errors="replace"))
        sys.exit(out.returncode)
    return out.stdout.decode()


def locked():
    lock = open(os.path.join(STATE, "group.lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def list_in_process():
    """The provider's `list`, run in this process (one interpreter start less per call)."""
    import contextlib, importlib.util, io
    request = json.dumps({"operation": "list", "fleet": "web"})
    path = os.path.join(STATE, "cloud-request-%d.json" % os.getpid())
    with open(path, "w") as f:
        f.write(request)
    os.environ["KILN_REQUEST"] = path
    sys.argv = [PROVIDER, "list"]
    sys.stdin = io.StringIO(request)
    spec = importlib.util.spec_from_file_location("local_test_provider", PROVIDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main()
    os.remove(path)
    return out.getvalue()


if OP == "list":
    lock = locked()
    reply = json.loads(list_in_process())
    desired = group().get("desired")
    if desired is not None:
        reply["desired"] = desired
    print(json.dumps(reply))
elif OP == "scale":
    n = int(sys.argv[2])
    lock = locked()
    g = group()
    if not g.get("template"):
        sys.exit("the launch template names no image yet")
    launched = []
    for i in range(n):
        key = "asg-%s" % os.urandom(4).hex()
        request = {"operation": "launch", "fleet": "web", "image": g["template"], "key": key}
        instance = json.loads(provider("launch", request))
        provider("attach", {"operation": "attach", "fleet": "web", "id": instance["id"]})
        launched.append(instance["id"])
    if g.get("desired") is not None:
        g["desired"] += n
        write_group(g)
    print(json.dumps(launched))
else:
    os.execv(sys.executable, [sys.executable, PROVIDER, OP])
