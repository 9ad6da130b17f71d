#!/usr/bin/env python3
"""EXAMPLE kiln exec provider: an Alibaba Cloud ESS scaling group behind an SLB VServer group.

EXAMPLE ONLY, NOT TESTED by kiln's test suite: read it, adapt it, try it on a test account.
Protocol: docs/exec-provider.md. Needs the `aliyun` CLI (configured with a profile or
ALIBABA_CLOUD_* credentials allowed through --hook-env) and python3 (stdlib only).

Settings (kiln.yaml `rollout.exec.env`, seen here as KILN_PROVIDER_<NAME>; declared in
settings.yaml beside this file, which `kiln validate` checks manifests against):
  scaling_group_id   ESS scaling group id                            (required)
  vserver_group_id   SLB VServer group id the fleet serves behind    (required)
  launch_template_id ECS launch template for new instances           (required)
  port               port the app listens on                          (default 80)
  region             region id, e.g. cn-hangzhou                      (required)

Idempotent launch: the launch key (hashed) is the ECS ClientToken and is recorded as the tag
kiln:launch-key. Draining: the backend's weight is set to 0 first (no new connections), then
it is removed after kiln's drain time.
"""
import hashlib, json, os, subprocess, sys, time

OP = sys.argv[1] if len(sys.argv) > 1 else ""
TRANSIENT = ("Throttling", "ServiceUnavailable", "InternalError", "timeout", "connection")


def setting(name, default=None):
    value = os.environ.get("KILN_PROVIDER_" + name.upper(), default)
    if value is None:
        fail("setting `%s` is required" % name, 1)
    return value


def fail(message, code):
    print("aliyun-ess %s: %s" % (OP, message), file=sys.stderr)
    sys.exit(code)


def aliyun(product, action, **params):
    cmd = ["aliyun", product, action, "--RegionId", setting("region")]
    for key, value in params.items():
        cmd += ["--" + key, value]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip()
        fail("aliyun %s %s: %s" % (product, action, err), 75 if any(t in err for t in TRANSIENT) else 1)
    return json.loads(res.stdout) if res.stdout.strip() else {}


def group_instance_ids():
    out = aliyun("ess", "DescribeScalingInstances", ScalingGroupId=setting("scaling_group_id"), PageSize="50")
    return [i["InstanceId"] for i in out.get("ScalingInstances", {}).get("ScalingInstance", [])]


def describe(ids):
    if not ids:
        return []
    out = aliyun("ecs", "DescribeInstances", InstanceIds=json.dumps(ids), PageSize="100")
    return out.get("Instances", {}).get("Instance", [])


def backends():
    out = aliyun("slb", "DescribeVServerGroupAttribute", VServerGroupId=setting("vserver_group_id"))
    servers = out.get("BackendServers", {}).get("BackendServer", [])
    return {s["ServerId"]: int(s.get("Weight", 0)) for s in servers}


def view(i, attached):
    tags = {t["TagKey"]: t["TagValue"] for t in i.get("Tags", {}).get("Tag", [])}
    ips = i.get("VpcAttributes", {}).get("PrivateIpAddress", {}).get("IpAddress", [])
    return {
        "id": i["InstanceId"],
        "image": i["ImageId"],
        "address": "%s:%s" % (ips[0], setting("port", "80")) if ips else None,
        "running": i["Status"] == "Running",
        "attached": attached.get(i["InstanceId"], 0) > 0,
        "launch_key": tags.get("kiln:launch-key"),
    }


def main():
    req = json.load(sys.stdin)  # the same JSON is in the file $KILN_REQUEST names
    if OP == "list":
        attached = backends()
        print(json.dumps({"instances": [view(i, attached) for i in describe(group_instance_ids())]}))
    elif OP == "launch":
        token = hashlib.sha256(("%s/%s" % (req["fleet"], req["key"])).encode()).hexdigest()[:64]
        out = aliyun("ecs", "RunInstances", LaunchTemplateId=setting("launch_template_id"),
                     ImageId=req["image"], Amount="1", ClientToken=token,
                     **{"Tag.1.Key": "kiln:launch-key", "Tag.1.Value": req["key"],
                        "Tag.2.Key": "kiln:fleet", "Tag.2.Value": req["fleet"]})
        instance_id = out["InstanceIdSets"]["InstanceIdSet"][0]
        for _ in range(60):  # ESS only accepts running instances
            if describe([instance_id])[0]["Status"] == "Running":
                break
            time.sleep(5)
        if instance_id not in group_instance_ids():
            aliyun("ess", "AttachInstances", ScalingGroupId=setting("scaling_group_id"),
                   **{"InstanceId.1": instance_id})
        print(json.dumps(view(describe([instance_id])[0], backends())))
    elif OP == "attach":
        servers = [{"ServerId": req["id"], "Port": setting("port", "80"), "Weight": "100"}]
        if req["id"] in backends():
            aliyun("slb", "SetVServerGroupAttribute", VServerGroupId=setting("vserver_group_id"),
                   BackendServers=json.dumps(servers))
        else:
            aliyun("slb", "AddVServerGroupBackendServers", VServerGroupId=setting("vserver_group_id"),
                   BackendServers=json.dumps(servers))
    elif OP == "detach":
        if req["id"] not in backends():
            return
        server = {"ServerId": req["id"], "Port": setting("port", "80")}
        # Weight 0: SLB sends no new connections; those open finish during the drain time.
        aliyun("slb", "SetVServerGroupAttribute", VServerGroupId=setting("vserver_group_id"),
               BackendServers=json.dumps([dict(server, Weight="0")]))
        time.sleep(req.get("drain_ms", 0) / 1000)
        aliyun("slb", "RemoveVServerGroupBackendServers", VServerGroupId=setting("vserver_group_id"),
               BackendServers=json.dumps([server]))
    elif OP == "terminate":
        if req["id"] in backends():
            aliyun("slb", "RemoveVServerGroupBackendServers", VServerGroupId=setting("vserver_group_id"),
                   BackendServers=json.dumps([{"ServerId": req["id"], "Port": setting("port", "80")}]))
        if req["id"] in group_instance_ids():
            # Check the flags against your CLI version: this removes the instance from the
            # group, lowers the desired capacity and releases the instance.
            aliyun("ess", "RemoveInstances", ScalingGroupId=setting("scaling_group_id"),
                   RemovePolicy="release", DecreaseDesiredCapacity="true", **{"InstanceId.1": req["id"]})
        elif describe([req["id"]]):
            aliyun("ecs", "DeleteInstance", InstanceId=req["id"], Force="true")
    elif OP == "health":
        print(json.dumps({"health": None}))  # let kiln probe healthCheck.http on the address
    else:
        fail("unknown operation %r" % OP, 2)


if __name__ == "__main__":
    main()
