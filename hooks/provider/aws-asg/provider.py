#!/usr/bin/env python3
"""EXAMPLE kiln exec provider: an EC2 Auto Scaling group behind an ELBv2 target group.

EXAMPLE ONLY, NOT TESTED by kiln's test suite: read it, adapt it, try it on a test account.
Protocol: docs/exec-provider.md. Needs the `aws` CLI v2 and python3 (stdlib only).

Settings (kiln.yaml `rollout.exec.env`, seen here as KILN_PROVIDER_<NAME>; declared in
settings.yaml beside this file, which `kiln validate` checks manifests against):
  asg               Auto Scaling group name                      (required)
  target_group_arn  ELBv2 target group ARN                       (required)
  launch_template   launch template name used for new instances (required)
  port              port the app listens on                      (default 80)
  region            AWS region                                   (default: the CLI's)
Credentials come from the daemon's environment (allow AWS_* with --hook-env) or an
instance profile, never from kiln.yaml.

Idempotent launch: the launch key is sent as the EC2 ClientToken (EC2 itself refuses to
start a second instance for one token) and recorded as the tag kiln:launch-key.
"""
import hashlib, json, os, subprocess, sys, time

OP = sys.argv[1] if len(sys.argv) > 1 else ""
TRANSIENT = ("Throttling", "RequestLimitExceeded", "ServiceUnavailable", "Could not connect",
             "Read timeout", "InternalError")


def setting(name, default=None):
    value = os.environ.get("KILN_PROVIDER_" + name.upper(), default)
    if value is None:
        fail("setting `%s` is required" % name, 1)
    return value


def fail(message, code):
    print("aws-asg %s: %s" % (OP, message), file=sys.stderr)
    sys.exit(code)


def aws_cmd():
    cmd = ["aws", "--output", "json"]
    if os.environ.get("KILN_PROVIDER_REGION"):
        cmd += ["--region", os.environ["KILN_PROVIDER_REGION"]]
    return cmd


def aws(*args):
    res = subprocess.run(aws_cmd() + list(args), capture_output=True, text=True)
    if res.returncode != 0:
        err = res.stderr.strip()
        # 75 tells kiln to retry later; anything else stops the rollout step.
        fail("aws %s: %s" % (" ".join(args[:2]), err), 75 if any(t in err for t in TRANSIENT) else 1)
    return json.loads(res.stdout) if res.stdout.strip() else {}


def describe(ids):
    if not ids:
        return []
    out = aws("ec2", "describe-instances", "--instance-ids", *ids)
    return [i for r in out.get("Reservations", []) for i in r["Instances"]]


def targets():
    out = aws("elbv2", "describe-target-health", "--target-group-arn", setting("target_group_arn"))
    return {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in out.get("TargetHealthDescriptions", [])}


def view(i, attached):
    tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
    state = i["State"]["Name"]
    return {
        "id": i["InstanceId"],
        "image": i["ImageId"],
        "address": "%s:%s" % (i["PrivateIpAddress"], setting("port", "80")) if i.get("PrivateIpAddress") else None,
        "running": state == "running",
        "attached": attached.get(i["InstanceId"]) in ("initial", "healthy", "unhealthy"),
        "launched_at": i.get("LaunchTime"),
        "launch_key": tags.get("kiln:launch-key"),
    }


def asg_instance_ids():
    out = aws("autoscaling", "describe-auto-scaling-groups", "--auto-scaling-group-names", setting("asg"))
    groups = out.get("AutoScalingGroups", [])
    if not groups:
        fail("no Auto Scaling group %s" % setting("asg"), 1)
    return [i["InstanceId"] for i in groups[0]["Instances"]]


def main():
    req = json.load(sys.stdin)  # the same JSON is in the file $KILN_REQUEST names
    if OP == "list":
        attached = targets()
        instances = [view(i, attached) for i in describe(asg_instance_ids())
                     if i["State"]["Name"] not in ("shutting-down", "terminated")]
        print(json.dumps({"instances": instances}))
    elif OP == "launch":
        token = hashlib.sha256(("%s/%s" % (req["fleet"], req["key"])).encode()).hexdigest()[:64]
        tags = "ResourceType=instance,Tags=[{Key=kiln:launch-key,Value=%s},{Key=kiln:fleet,Value=%s}]" % (
            req["key"], req["fleet"])
        out = aws("ec2", "run-instances", "--launch-template",
                  "LaunchTemplateName=%s,Version=$Default" % setting("launch_template"),
                  "--image-id", req["image"], "--count", "1", "--client-token", token,
                  "--tag-specifications", tags)
        instance = out["Instances"][0]
        aws("ec2", "wait", "instance-running", "--instance-ids", instance["InstanceId"])
        if instance["InstanceId"] not in asg_instance_ids():
            # Joining the group raises its desired capacity by one; kiln shrinks it on terminate.
            aws("autoscaling", "attach-instances", "--auto-scaling-group-name", setting("asg"),
                "--instance-ids", instance["InstanceId"])
        print(json.dumps(view(describe([instance["InstanceId"]])[0], targets())))
    elif OP == "attach":
        aws("elbv2", "register-targets", "--target-group-arn", setting("target_group_arn"),
            "--targets", "Id=%s,Port=%s" % (req["id"], setting("port", "80")))
    elif OP == "detach":
        # ELBv2 drains by itself (the target group's deregistration delay); wait for it, but
        # no longer than kiln's drain time.
        aws("elbv2", "deregister-targets", "--target-group-arn", setting("target_group_arn"),
            "--targets", "Id=%s,Port=%s" % (req["id"], setting("port", "80")))
        deadline = time.time() + req.get("drain_ms", 0) / 1000
        while req["id"] in targets() and time.time() < deadline:
            time.sleep(2)
    elif OP == "terminate":
        if req["id"] in asg_instance_ids():
            aws("autoscaling", "terminate-instance-in-auto-scaling-group", "--instance-id", req["id"],
                "--should-decrement-desired-capacity")
        elif describe_if_exists(req["id"]):
            aws("ec2", "terminate-instances", "--instance-ids", req["id"])
    elif OP == "health":
        state = targets().get(req["id"])
        health = {"healthy": "healthy", "unhealthy": "unhealthy"}.get(state)
        print(json.dumps({"health": health}))
    else:
        fail("unknown operation %r" % OP, 2)


def describe_if_exists(instance_id):
    res = subprocess.run(aws_cmd() + ["ec2", "describe-instances", "--instance-ids", instance_id],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return False  # InvalidInstanceID.NotFound: already gone, which is success for terminate
    reservations = json.loads(res.stdout).get("Reservations", [])
    return any(i["State"]["Name"] != "terminated" for r in reservations for i in r["Instances"])


if __name__ == "__main__":
    main()
