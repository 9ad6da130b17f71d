#!/usr/bin/env python3
"""`kiln lb` side by side with haproxy and nginx, on the same two backends, measured with wrk.

    cargo build --release --bin kiln
    python3 benches/lb_compare.py [--kiln target/release/kiln] [--secs 5] [--conns 1,8,64,256]

Needs `haproxy`, `nginx` and `wrk` (Debian packages of those names). Everything listens on
127.0.0.1 and stops when the script ends.

The backends are one nginx process (one worker) serving two ports with a fixed 23-byte body.
Each proxy gets two threads or processes (haproxy `nbthread 2`, nginx `worker_processes 2`,
`kiln lb` on its default tokio runtime of one worker per core) and balances round robin over the
two backends, keeping backend connections alive (nginx `keepalive 128`). For every connection
count, keep-alive and not (`Connection: close`: a new client connection per request), each proxy
is measured in turn with `wrk --latency`: requests per second, requests per CPU-second of the
proxy's processes (utime + stime from /proc, children included) and the p99 latency wrk reports.
The box is shared (wrk, the backends and the proxy run on the same cores), so compare columns of
one run, not runs on different machines.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BODY = "hello from the backend\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def tree(pid):
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else []:
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return out


def cpu_seconds(pid):
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / ticks


def start(args, log):
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def nginx_backends(dir, ports):
    servers = "\n".join(
        f'  server {{ listen 127.0.0.1:{p}; location / {{ return 200 "{BODY.strip()}\\n"; }} }}'
        for p in ports
    )
    conf = f"""worker_processes 1;
pid {dir}/backends.pid;
error_log {dir}/backends.err;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  keepalive_requests 1000000;
{servers}
}}
"""
    path = os.path.join(dir, "backends.conf")
    with open(path, "w") as f:
        f.write(conf)
    return ["nginx", "-c", path, "-p", dir]


def nginx_proxy(dir, port, backends):
    servers = " ".join(f"server 127.0.0.1:{p};" for p in backends)
    conf = f"""worker_processes 2;
pid {dir}/proxy.pid;
error_log {dir}/proxy.err;
daemon off;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  keepalive_requests 1000000;
  upstream b {{ {servers} keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://b;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""
    path = os.path.join(dir, "proxy.conf")
    with open(path, "w") as f:
        f.write(conf)
    return ["nginx", "-c", path, "-p", dir]


def haproxy(dir, port, backends):
    servers = "\n".join(f"  server s{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
    conf = f"""global
  nbthread 2
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  balance roundrobin
  http-reuse always
{servers}
"""
    path = os.path.join(dir, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(conf)
    return ["haproxy", "-db", "-f", path]


def kiln_lb(kiln, dir, port, backends):
    state = os.path.join(dir, "kiln-lb")
    os.makedirs(state, exist_ok=True)
    log = open(os.path.join(dir, "kiln-lb.log"), "w")
    proc = start([kiln, "lb", "--state-dir", state, "--port", str(port),
                  "--max-connections", "4096"], log)
    deadline = time.time() + 10
    while not os.path.exists(os.path.join(state, "lb.json")):
        if time.time() > deadline or proc.poll() is not None:
            raise SystemExit("kiln lb did not start; see " + log.name)
        time.sleep(0.05)
    import json
    with open(os.path.join(state, "lb.json")) as f:
        admin = json.load(f)["admin_port"]
    with open(os.path.join(state, "admin-token")) as f:
        token = f.read().strip()
    for i, p in enumerate(backends):
        body = json.dumps({"address": f"127.0.0.1:{p}"}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{admin}/backends/bench-{i + 1:08x}", data=body, method="PUT",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request).read()
    return proc


def parse_duration(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def wrk(port, conns, secs, close):
    args = ["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{secs}s", "--latency"]
    if close:
        args += ["-H", "Connection: close"]
    args.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(args, capture_output=True, text=True, timeout=secs + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"\s99%\s+(\S+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = int(errors.group(1)) if errors else 0
    if sock:
        bad += sum(int(g) for g in sock.groups())
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": int(total.group(1)) if total else 0,
        "p99_ms": parse_duration(p99.group(1)) if p99 else float("nan"),
        "errors": bad,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kiln", default="target/release/kiln")
    parser.add_argument("--secs", type=int, default=5)
    parser.add_argument("--conns", default="1,8,64,256")
    parser.add_argument("--only", default="kiln,haproxy,nginx")
    opts = parser.parse_args()
    for tool in ["haproxy", "nginx", "wrk"]:
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            raise SystemExit(f"{tool} is missing (apt-get install haproxy nginx wrk)")
    dir = tempfile.mkdtemp(prefix="kiln-lb-bench-")
    procs = []
    try:
        backends = [free_port(), free_port()]
        log = open(os.path.join(dir, "backends.log"), "w")
        procs.append(start(nginx_backends(dir, backends), log))
        for p in backends:
            wait_port(p)
        proxies = {}
        names = opts.only.split(",")
        for name in names:
            port = free_port()
            if name == "kiln":
                proc = kiln_lb(opts.kiln, dir, port, backends)
            else:
                make = haproxy if name == "haproxy" else nginx_proxy
                proc = start(make(dir, port, backends), open(os.path.join(dir, name + ".log"), "w"))
            procs.append(proc)
            wait_port(port)
            proxies[name] = (proc, port)
        print(f"{opts.secs}s per run; wrk -t min(2,c) -c c; 2 backends (nginx, 1 worker); "
              f"{os.cpu_count()} CPUs shared by wrk, backends and proxy")
        head = f"{'conns':>5} {'mode':>10} " + " ".join(
            f"{n + ' req/s':>14} {'req/cpu-s':>9} {'p99 ms':>7}" for n in names)
        if "kiln" in names and "haproxy" in names:
            head += f" {'kiln/hap rps':>12} {'cpu':>5} {'p99':>5}"
        print(head)
        for conns in [int(c) for c in opts.conns.split(",")]:
            for close in [False, True]:
                row = {}
                for name in names:
                    proc, port = proxies[name]
                    before = cpu_seconds(proc.pid)
                    figures = wrk(port, conns, opts.secs, close)
                    used = cpu_seconds(proc.pid) - before
                    figures["per_cpu"] = figures["requests"] / used if used > 0 else float("nan")
                    row[name] = figures
                    time.sleep(0.5)
                line = f"{conns:>5} {'close' if close else 'keep-alive':>10} " + " ".join(
                    f"{row[n]['rps']:>14.0f} {row[n]['per_cpu']:>9.0f} {row[n]['p99_ms']:>7.2f}"
                    for n in names)
                if "kiln" in row and "haproxy" in row:
                    k, h = row["kiln"], row["haproxy"]
                    line += (f" {k['rps'] / h['rps'] if h['rps'] else 0:>12.2f}"
                             f" {k['per_cpu'] / h['per_cpu'] if h['per_cpu'] else 0:>5.2f}"
                             f" {k['p99_ms'] / h['p99_ms'] if h['p99_ms'] else 0:>5.2f}")
                errors = {n: row[n]["errors"] for n in names if row[n]["errors"]}
                if errors:
                    line += f"  errors: {errors}"
                print(line, flush=True)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        # `kiln lb` and its standby also stop once their state dir is gone.
        shutil.rmtree(dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
