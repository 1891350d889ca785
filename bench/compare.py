#!/usr/bin/env python3
"""healthgate vs HAProxy, side by side on one machine (driven by bench/compare.sh).

Every number is measured in the same run for both proxies, runs interleaved
(A B A B ...) so that load from other processes hits both alike:

* wrk (keep-alive, 32 and 256 connections): requests/s, p50/p99/p99.9;
* CPU µs per request of the proxy process: utime+stime from /proc/PID/stat
  over the run divided by the requests wrk completed;
* peak RSS (VmHWM) after the load, idle RSS before it, and RSS with 10k idle
  keep-alive client connections (fresh processes);
* callgrind instructions per request (a fixed request count from a simple
  client; repeatable even on a busy machine);
* healthgate with a 200-route table vs none (issue 10).

The proxied path has every dependency up (the machine's MariaDB, Redis and
RabbitMQ, never reconfigured); the short-circuit path points both proxies'
MySQL check at a port with nothing listening, so both answer 503 themselves.

Environment: QUICK=1 (one repeat, short runs), REPEATS, DURATION (s),
CONNS (e.g. "32,256"), IDLE_CONNS, CG_REQUESTS, HG_BIN, SKIP_CALLGRIND=1,
PHASES (subset of load,routes,idle,callgrind,syscalls; a partial run writes
results/partial.* instead of latest.*).
"""

import datetime
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
QUICK = os.environ.get("QUICK") == "1"
REPEATS = int(os.environ.get("REPEATS", "1" if QUICK else "3"))
DURATION = int(os.environ.get("DURATION", "3" if QUICK else "5"))
CONNS = [int(c) for c in os.environ.get("CONNS", "32,256").split(",")]
# HAProxy needs 2 fds per connection under its limit; 10k idle clients when the
# hard limit allows, else as many as HAProxy accepts.
MAXCONN = min(12000, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 100) // 2)
IDLE_CONNS = int(os.environ.get("IDLE_CONNS", str(min(10000, MAXCONN - 50))))
CG_REQUESTS = int(os.environ.get("CG_REQUESTS", "2000" if QUICK else "5000"))
ALL_PHASES = {"load", "routes", "idle", "callgrind", "syscalls"}
PHASES = set(os.environ.get("PHASES", ",".join(sorted(ALL_PHASES))).split(","))
if os.environ.get("SKIP_CALLGRIND") == "1":
    PHASES.discard("callgrind")
HG_BIN = os.environ.get("HG_BIN", os.path.join(ROOT, "target", "release", "healthgate"))
MYSQL = "127.0.0.1:3306"
ROUTES_PATH = "/r150/item"  # matched by route 150 of the 200-route table
APP_BODY = "hello from the app\n"

TMP = tempfile.mkdtemp(prefix="hg-bench-")
PROCS = []
RUNS = []  # raw runs, one JSON line each


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def dead_port():
    """A port with nothing listening (bound then closed; connects are refused)."""
    return free_port()


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def spawn(argv, name, **kw):
    out = open(os.path.join(TMP, name + ".log"), "ab")
    p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=raise_nofile, **kw)
    PROCS.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    if p in PROCS:
        PROCS.remove(p)


def cpu_ticks(pid):
    """(utime, stime) in clock ticks: fields 14 and 15 of /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


TICK = os.sysconf("SC_CLK_TCK")


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def http_get(port, path="/", timeout=2.0):
    """One GET on a new connection: (status, body) or (None, error)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        status = int(data.split(b" ", 2)[1])
        return status, data.split(b"\r\n\r\n", 1)[1]
    except (OSError, ValueError, IndexError) as e:
        return None, str(e)


def wait_status(port, want, path="/", timeout=60.0):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = http_get(port, path)
        if last[0] == want:
            return
        time.sleep(0.2)
    raise RuntimeError(f"port {port} never answered {want} on {path}: last {last}")


# === the app ===


def start_app():
    port = free_port()
    prefix = os.path.join(TMP, "nginx")
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 20000;
user root;
error_log {prefix}/logs/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port} reuseport;
        default_type text/plain;
        location / {{ return 200 "{APP_BODY.strip()}\\n"; }}
    }}
}}
""")
    p = spawn(["nginx", "-p", prefix, "-c", conf], "nginx")
    wait_status(port, 200, timeout=10)
    return p, port


# === the proxies ===


def fill(template_path, out_name, **values):
    with open(template_path) as f:
        text = string.Template(f.read()).substitute(**values)
    path = os.path.join(TMP, out_name)
    with open(path, "w") as f:
        f.write(text)
    return path


def routes_yaml(n):
    if n == 0:
        return ""
    lines = ["    routes:"]
    for i in range(n):
        lines += [f"      - name: r{i}", f"        match: {{ path_prefix: /r{i} }}", "        needs: [db]"]
    return "\n".join(lines)


class Proxy:
    """One proxy process: kind 'haproxy' or 'healthgate'."""

    def __init__(self, kind, app_port, mysql, tag, routes=0, valgrind=None):
        self.kind, self.tag = kind, tag
        self.port = free_port()
        name = f"{kind}-{tag}-{self.port}"
        if kind == "haproxy":
            cfg = fill(os.path.join(HERE, "haproxy.cfg"), name + ".cfg", LISTEN=self.port, APP=app_port, MYSQL=mysql,
                       MAXCONN=MAXCONN)
            argv = ["haproxy", "-db", "-f", cfg]
        else:
            cfg = fill(
                os.path.join(HERE, "healthgate.yaml"),
                name + ".yaml",
                LISTEN=self.port,
                ADMIN=free_port(),
                APP=app_port,
                MYSQL=mysql,
                ROUTES=routes_yaml(routes),
            )
            argv = [HG_BIN, "run", "--config", cfg]
        env = dict(os.environ, RUST_LOG="warn")
        if valgrind:
            self.cg_out = os.path.join(TMP, f"cg-{name}.out")
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.cg_out}"] + valgrind + argv
        self.proc = spawn(argv, name, env=env)
        self.pid = self.proc.pid

    def wait(self, want, path="/", timeout=60.0):
        wait_status(self.port, want, path, timeout)

    def stop(self):
        stop(self.proc)


# === load ===


def wrk(port, conns, duration, path="/"):
    argv = [
        "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "5s",
        "-s", os.path.join(HERE, "wrk-report.lua"), f"http://127.0.0.1:{port}{path}",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, preexec_fn=raise_nofile, check=True).stdout
    m = re.search(r"WRKJSON (\{.*\})", out)
    if not m:
        raise RuntimeError("wrk printed no report:\n" + out)
    return json.loads(m.group(1))


def measured_run(proxy, scenario, conns, rep, path="/"):
    (u0, s0) = cpu_ticks(proxy.pid)
    r = wrk(proxy.port, conns, DURATION, path)
    (u1, s1) = cpu_ticks(proxy.pid)
    cpu_s = (u1 - u0 + s1 - s0) / TICK
    r.update(
        kind="load",
        proxy=proxy.kind,
        variant=proxy.tag,
        scenario=scenario,
        conns=conns,
        rep=rep,
        rps=r["requests"] / (r["duration_us"] / 1e6),
        cpu_s=cpu_s,
        cpu_us_per_req=cpu_s * 1e6 / max(r["requests"], 1),
        sys_share=(s1 - s0) / max(u1 - u0 + s1 - s0, 1),
        errors=r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"],
        non_2xx=r["err_status"],
    )
    RUNS.append(r)
    log(
        f"  {scenario:8} c={conns:<4} #{rep} {proxy.kind:10} {proxy.tag:8} {r['rps']:9.0f} req/s"
        f"  p99 {r['p99_us']:6} µs  cpu {r['cpu_us_per_req']:6.2f} µs/req  non-2xx {r['non_2xx']}  errors {r['errors']}"
    )
    return r


def load_phase(pairs, scenario, conns_list, path="/"):
    """pairs: [A, B] proxies serving the same scenario; runs A B A B ..."""
    for proxy in pairs:
        wrk(proxy.port, 32, 1, path)  # warm up (connections, pools, caches)
    for conns in conns_list:
        for rep in range(REPEATS):
            order = pairs if rep % 2 == 0 else list(reversed(pairs))
            for proxy in order:
                measured_run(proxy, scenario, conns, rep, path)


# === 10k idle keep-alive connections ===


def idle_connections(port, n):
    """Opens n connections, sends one request on each, reads the response,
    and keeps them open. Returns (sockets, completed responses)."""
    sel = selectors.DefaultSelector()
    socks, done = [], 0
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    pending = {}
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
        sel.register(s, selectors.EVENT_WRITE)
        pending[s] = b""
        # Keep the accept backlog from overflowing.
        if i % 500 == 499:
            done += pump(sel, pending, req, 0.05)
    deadline = time.time() + 60
    while pending and time.time() < deadline:
        done += pump(sel, pending, req, 0.5)
    sel.close()
    return socks, done


def pump(sel, pending, req, timeout):
    done = 0
    for key, ev in sel.select(timeout):
        s = key.fileobj
        if ev & selectors.EVENT_WRITE:
            try:
                s.send(req)
            except OSError:
                sel.unregister(s)
                pending.pop(s, None)
                continue
            sel.modify(s, selectors.EVENT_READ)
        else:
            try:
                chunk = s.recv(4096)
            except OSError:
                chunk = b""
            buf = pending[s] + chunk
            pending[s] = buf
            if not chunk or (b"\r\n\r\n" in buf and buf.endswith(APP_BODY.encode())):
                sel.unregister(s)
                del pending[s]
                done += 1 if chunk else 0
    return done


def idle_phase(app_port):
    out = {}
    for kind in ("haproxy", "healthgate"):
        p = Proxy(kind, app_port, MYSQL, "idle")
        p.wait(200)
        time.sleep(1)
        idle = status_kib(p.pid, "VmRSS")
        socks, ok = idle_connections(p.port, IDLE_CONNS)
        time.sleep(2)  # let per-connection state settle (healthgate parks idle connections after 100 ms)
        rss = status_kib(p.pid, "VmRSS")
        hwm = status_kib(p.pid, "VmHWM")
        for s in socks:
            s.close()
        p.stop()
        r = dict(kind="idle", proxy=kind, idle_rss_kib=idle, conns=IDLE_CONNS, answered=ok, rss_kib=rss, hwm_kib=hwm)
        RUNS.append(r)
        out[kind] = r
        log(f"  idle {kind:10} idle RSS {idle / 1024:.1f} MiB; {ok}/{IDLE_CONNS} answered, RSS {rss / 1024:.1f} MiB (peak {hwm / 1024:.1f})")
    return out


# === callgrind ===


def keepalive_requests(port, n, path="/"):
    """n sequential requests on one keep-alive connection."""
    req = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        buf = b""
        for _ in range(n):
            s.sendall(req)
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0:
                    m = re.search(rb"(?i)content-length:\s*(\d+)", buf[:head_end])
                    total = head_end + 4 + (int(m.group(1)) if m else 0)
                    if len(buf) >= total:
                        buf = buf[total:]
                        break
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("connection closed mid-run")
                buf += chunk


def callgrind(kind, app_port, mysql, scenario, want, routes=0, path="/"):
    tag = f"{scenario}{routes or ''}"
    p = Proxy(kind, app_port, mysql, "cg-" + tag, routes=routes, valgrind=["--dump-instr=no"])
    try:
        p.wait(want, path, timeout=180)
        keepalive_requests(p.port, 200, path)  # warm up
        subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True, capture_output=True)
        keepalive_requests(p.port, CG_REQUESTS, path)
        subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True)
        dumps = sorted(f for f in os.listdir(TMP) if f.startswith(os.path.basename(p.cg_out) + "."))
        if not dumps:
            raise RuntimeError("callgrind wrote no dump")
        dump = os.path.join(TMP, dumps[-1])
        with open(dump) as f:
            totals = [line for line in f if line.startswith(("summary:", "totals:"))]
        ir = int(totals[-1].split()[1])
        keep = os.path.join(TMP, f"callgrind-{kind}-{tag}.out")
        shutil.copy(dump, keep)
    finally:
        p.stop()
    r = dict(kind="callgrind", proxy=kind, scenario=scenario, routes=routes, requests=CG_REQUESTS, instructions=ir,
             instr_per_req=ir / CG_REQUESTS, dump=keep)
    RUNS.append(r)
    log(f"  callgrind {kind:10} {tag:10} {ir / CG_REQUESTS:9.0f} instructions/request")
    return r


# === syscalls ===


def syscalls(kind, app_port, mysql, scenario, want):
    """Syscalls per request under wrk -c32, counted by strace -c (which slows
    the proxy down; the counts, not the time, are the point)."""
    p = Proxy(kind, app_port, mysql, "strace-" + scenario)
    out = os.path.join(TMP, f"strace-{kind}-{scenario}.txt")
    try:
        p.wait(want)
        wrk(p.port, 32, 1)
        st = subprocess.Popen(["strace", "-c", "-f", "-p", str(p.pid), "-o", out], stderr=subprocess.DEVNULL)
        time.sleep(1)
        n = wrk(p.port, 32, 3)["requests"]
        st.send_signal(signal.SIGINT)
        st.wait()
    finally:
        p.stop()
    calls = {}
    with open(out) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
                calls[parts[-1]] = int(parts[3]) / max(n, 1)
    r = dict(kind="syscalls", proxy=kind, scenario=scenario, requests=n, per_req=calls, total_per_req=sum(calls.values()))
    RUNS.append(r)
    top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v >= 0.01)
    log(f"  syscalls {kind:10} {scenario:8} {r['total_per_req']:.2f}/request ({top})")
    return r


# === report ===


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ver = lambda argv: subprocess.run(argv, capture_output=True, text=True).stdout + subprocess.run(argv, capture_output=True, text=True).stderr
    hap = ver(["haproxy", "-v"]).splitlines()[0]
    ngx = ver(["nginx", "-v"]).strip()
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = open("/proc/loadavg").read().split()[:3]
    return {
        "cpu": f"{model}, {os.cpu_count()} CPUs",
        "kernel": platform.release(),
        "haproxy": hap,
        "nginx": ngx,
        "healthgate": f"git {rev}",
        "loadavg_at_start": " ".join(load),
    }


def ratio(a, b):
    return a / b if b else float("nan")


def memory_table(idle):
    return [
        "",
        "| memory | healthgate | HAProxy |",
        "|---|---|---|",
        f"| idle RSS MiB | {idle['healthgate']['idle_rss_kib'] / 1024:.1f} | {idle['haproxy']['idle_rss_kib'] / 1024:.1f} |",
        f"| RSS with {IDLE_CONNS} idle keep-alive clients, MiB | {idle['healthgate']['rss_kib'] / 1024:.1f} | {idle['haproxy']['rss_kib'] / 1024:.1f} |",
        f"| clients answered | {idle['healthgate']['answered']} | {idle['haproxy']['answered']} |",
    ]


def report(started, info, idle, cmd):
    load = [r for r in RUNS if r["kind"] == "load"]
    rows = []
    ratios = []
    for scenario, a_tag, b_kind, b_tag in (
        ("proxied", "main", "haproxy", "main"),
        ("503", "main", "haproxy", "main"),
    ):
        if not any(r["scenario"] == scenario for r in load):
            continue
        for conns in CONNS:
            def agg(kind, tag):
                rs = [r for r in load if r["scenario"] == scenario and r["conns"] == conns and r["proxy"] == kind and r["variant"] == tag]
                return {k: med([r[k] for r in rs]) for k in ("rps", "p50_us", "p99_us", "p999_us", "cpu_us_per_req", "sys_share")} | {
                    "cpu_all": [round(r["cpu_us_per_req"], 2) for r in rs],
                    "hwm": max((r.get("hwm_kib", 0) for r in rs), default=0),
                }
            hg, ha = agg("healthgate", a_tag), agg(b_kind, b_tag)
            rows.append((scenario, conns, hg, ha))
            ratios.append((f"{scenario} c={conns} CPU/req", ratio(hg["cpu_us_per_req"], ha["cpu_us_per_req"])))
            ratios.append((f"{scenario} c={conns} p99", ratio(hg["p99_us"], ha["p99_us"])))
            ratios.append((f"{scenario} c={conns} req/s", ratio(hg["rps"], ha["rps"])))
    cg = {(r["proxy"], r["scenario"], r["routes"]): r["instr_per_req"] for r in RUNS if r["kind"] == "callgrind"}
    for sc in ("proxied", "503"):
        if ("healthgate", sc, 0) in cg and ("haproxy", sc, 0) in cg:
            ratios.append((f"{sc} callgrind instr/req", ratio(cg[("healthgate", sc, 0)], cg[("haproxy", sc, 0)])))
    if idle:
        ratios.append(("idle RSS", ratio(idle["healthgate"]["idle_rss_kib"], idle["haproxy"]["idle_rss_kib"])))
        ratios.append((f"RSS with {IDLE_CONNS} idle conns", ratio(idle["healthgate"]["rss_kib"], idle["haproxy"]["rss_kib"])))

    peak = {r["proxy"] + r["scenario"]: r["hwm_kib"] for r in RUNS if r["kind"] == "peak"}
    md = []
    md.append("# healthgate vs HAProxy\n")
    md.append(f"- date: {started} UTC")
    for k, v in info.items():
        md.append(f"- {k}: {v}")
    md.append(f"- command: `{cmd}`")
    md.append(f"- load: wrk -t1, keep-alive, {DURATION} s per run, {REPEATS} runs per cell, interleaved; medians shown "
              "(CPU µs/req of every run in brackets)\n")
    md.append("| path | conns | proxy | req/s | p50 µs | p99 µs | p99.9 µs | CPU µs/req | kernel share of CPU | peak RSS MiB |")
    md.append("|---|---|---|---|---|---|---|---|---|---|")
    for scenario, conns, hg, ha in rows:
        for name, a in (("healthgate", hg), ("HAProxy", ha)):
            key = ("healthgate" if name == "healthgate" else "haproxy") + scenario
            md.append(
                f"| {scenario} | {conns} | {name} | {a['rps']:.0f} | {a['p50_us']:.0f} | {a['p99_us']:.0f} | {a['p999_us']:.0f} | "
                f"{a['cpu_us_per_req']:.2f} {a['cpu_all']} | {a['sys_share'] * 100:.0f} % | {peak.get(key, 0) / 1024:.1f} |"
            )
    if idle:
        md.extend(memory_table(idle))
    if cg:
        md.append("")
        md.append(f"Callgrind, instructions per request ({CG_REQUESTS} sequential keep-alive requests, counters zeroed after a warm-up):\n")
        md.append("| path | healthgate | HAProxy | ratio |")
        md.append("|---|---|---|---|")
        for sc in ("proxied", "503"):
            if ("healthgate", sc, 0) in cg:
                h, a = cg[("healthgate", sc, 0)], cg.get(("haproxy", sc, 0), float("nan"))
                md.append(f"| {sc} | {h:.0f} | {a:.0f} | {ratio(h, a):.2f} |")
    sc_runs = {(r["proxy"], r["scenario"]): r for r in RUNS if r["kind"] == "syscalls"}
    if sc_runs:
        md.append("")
        md.append("Syscalls per request (strace -c over wrk -c32; only calls at ≥ 0.01 per request):\n")
        md.append("| path | proxy | total | calls |")
        md.append("|---|---|---|---|")
        for (kind, sc), r in sorted(sc_runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            calls = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["per_req"].items(), key=lambda kv: -kv[1]) if v >= 0.01)
            md.append(f"| {sc} | {kind} | {r['total_per_req']:.2f} | {calls} |")
    rt = [r for r in load if r["scenario"] == "routes"]
    if rt:
        md.append("")
        md.append(f"Route matching (issue 10): healthgate, proxied `GET {ROUTES_PATH}`, 32 connections:\n")
        md.append("| routes | req/s | p99 µs | CPU µs/req | callgrind instr/req |")
        md.append("|---|---|---|---|---|")
        for n, tag in ((0, "routes0"), (200, "routes200")):
            rs = [r for r in rt if r["variant"] == tag]
            c = cg.get(("healthgate", "routes", n))
            md.append(
                f"| {n} | {med([r['rps'] for r in rs]):.0f} | {med([r['p99_us'] for r in rs]):.0f} | "
                f"{med([r['cpu_us_per_req'] for r in rs]):.2f} {[round(r['cpu_us_per_req'], 2) for r in rs]} | "
                f"{'' if c is None else f'{c:.0f}'} |"
            )
    md.append("")
    md.append("Ratios healthgate / HAProxy (below 1 = healthgate better, except req/s):\n")
    md.append("| measure | ratio |")
    md.append("|---|---|")
    for name, v in ratios:
        md.append(f"| {name} | {v:.2f} |")
    return "\n".join(md) + "\n", ratios


def main():
    raise_nofile()
    cmd = " ".join(["bench/compare.sh"] + sys.argv[1:])
    env_cmd = " ".join(f"{k}={os.environ[k]}" for k in ("QUICK", "REPEATS", "DURATION", "CONNS", "IDLE_CONNS", "CG_REQUESTS", "SKIP_CALLGRIND", "PHASES") if k in os.environ)
    if env_cmd:
        cmd = env_cmd + " " + cmd
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    info = machine()
    log(f"bench: tmp {TMP}; {REPEATS} repeats × {DURATION}s; conns {CONNS}")
    app, app_port = start_app()
    try:
        dead = f"127.0.0.1:{dead_port()}"
        idle = None
        if "load" in PHASES:
            procs = {}
            for kind in ("healthgate", "haproxy"):
                procs[(kind, "proxied")] = Proxy(kind, app_port, MYSQL, "main")
                procs[(kind, "503")] = Proxy(kind, app_port, dead, "main")
            for (kind, sc), p in procs.items():
                p.wait(200 if sc == "proxied" else 503)
            log("proxied path (every dependency up):")
            load_phase([procs[("healthgate", "proxied")], procs[("haproxy", "proxied")]], "proxied", CONNS)
            log("short-circuit path (MySQL check on a dead port: 503):")
            load_phase([procs[("healthgate", "503")], procs[("haproxy", "503")]], "503", CONNS)
            for (kind, sc), p in procs.items():
                RUNS.append(dict(kind="peak", proxy=kind, scenario=sc, hwm_kib=status_kib(p.pid, "VmHWM")))
                p.stop()

        if "routes" in PHASES:
            log(f"route matching: healthgate with 0 vs 200 routes, GET {ROUTES_PATH}:")
            r0 = Proxy("healthgate", app_port, MYSQL, "routes0", routes=0)
            r200 = Proxy("healthgate", app_port, MYSQL, "routes200", routes=200)
            r0.wait(200, ROUTES_PATH)
            r200.wait(200, ROUTES_PATH)
            load_phase([r0, r200], "routes", [32], ROUTES_PATH)
            r0.stop()
            r200.stop()

        if "idle" in PHASES:
            log(f"{IDLE_CONNS} idle keep-alive connections:")
            idle = idle_phase(app_port)

        if "syscalls" in PHASES and shutil.which("strace"):
            log("syscalls per request (strace -c, wrk -c32):")
            for kind in ("healthgate", "haproxy"):
                syscalls(kind, app_port, MYSQL, "proxied", 200)
                syscalls(kind, app_port, dead, "503", 503)

        if "callgrind" in PHASES:
            log(f"callgrind ({CG_REQUESTS} requests each):")
            for kind in ("healthgate", "haproxy"):
                callgrind(kind, app_port, MYSQL, "proxied", 200)
                callgrind(kind, app_port, dead, "503", 503)
            callgrind("healthgate", app_port, MYSQL, "routes", 200, routes=0, path=ROUTES_PATH)
            callgrind("healthgate", app_port, MYSQL, "routes", 200, routes=200, path=ROUTES_PATH)
    finally:
        for p in list(PROCS):
            stop(p)

    md, ratios = report(started, info, idle, cmd)
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    # Only a full run replaces the committed results.
    out = "latest" if PHASES == ALL_PHASES else "partial"
    with open(os.path.join(out_dir, out + ".md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, out + ".jsonl"), "w") as f:
        for r in RUNS:
            f.write(json.dumps(r | {"date": started}) + "\n")
    print(md)
    print("Ratios healthgate/HAProxy:")
    for name, v in ratios:
        print(f"  {name:40} {v:.2f}")
    log(f"wrote bench/results/{out}.md and {out}.jsonl; callgrind dumps and logs in {TMP}")


if __name__ == "__main__":
    main()
