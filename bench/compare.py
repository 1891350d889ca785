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
* healthgate with a 200-route table vs none (issue 10);
* the kernel floor: bench/floor.c, a relay making the same syscalls per
  request with no HTTP work, loaded like the proxies;
* multi-core: 2 workers / nbthread 2 / 2 floor threads, wrk -t2 -c64;
* slowloris: SLOW_CONNS clients that each send part of a request head and
  stall; RSS while both proxies hold them;
* cache and branch simulation (callgrind --cache-sim=yes --branch-sim=yes);
* HTTP/2 (h2load, 32 connections x 10 streams, h2c both sides) when h2load
  is installed and healthgate accepts `upstream_protocol: h2c`, and callgrind
  instructions per HTTP/2 request (h2load -c1 -m1, same setup).

The proxied path has every dependency up (the machine's MariaDB, Redis and
RabbitMQ, never reconfigured); the short-circuit path points both proxies'
MySQL check at a port with nothing listening, so both answer 503 themselves.

Environment: QUICK=1 (one repeat, short runs), REPEATS, DURATION (s),
CONNS (e.g. "32,256"), IDLE_CONNS, SLOW_CONNS, CG_REQUESTS, HG_BIN,
SKIP_CALLGRIND=1 (no valgrind phase: callgrind, cachesim, callgrind-h2), PHASES (subset of
load,multicore,routes,idle,slowloris,callgrind,cachesim,syscalls,h2,
callgrind-h2; a partial run writes results/partial.* instead of latest.*).
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
SLOW_CONNS = int(os.environ.get("SLOW_CONNS", str(min(8000, MAXCONN - 50))))
CG_REQUESTS = int(os.environ.get("CG_REQUESTS", "2000" if QUICK else "5000"))
ALL_PHASES = {"load", "multicore", "routes", "idle", "slowloris", "callgrind", "cachesim", "syscalls", "h2",
              "callgrind-h2"}
PHASES = set(os.environ.get("PHASES", ",".join(sorted(ALL_PHASES))).split(","))
if os.environ.get("SKIP_CALLGRIND") == "1":
    PHASES -= {"callgrind", "cachesim", "callgrind-h2"}
HG_BIN = os.environ.get("HG_BIN", os.path.join(ROOT, "target", "release", "healthgate"))
FLOOR_BIN = None  # built from bench/floor.c into TMP by main()
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


def start_app(h2=False):
    """nginx answering APP_BODY: HTTP/1.1, or prior-knowledge h2c (plaintext
    `listen ... http2`) with `h2`."""
    port = free_port()
    name = "nginx-h2" if h2 else "nginx"
    prefix = os.path.join(TMP, name)
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    listen = "http2" if h2 else "reuseport"
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
    http2_max_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port} {listen};
        default_type text/plain;
        location / {{ return 200 "{APP_BODY.strip()}\\n"; }}
    }}
}}
""")
    p = spawn(["nginx", "-p", prefix, "-c", conf], name)
    if not h2:
        # (the h2c app is waited for through the proxy in front of it)
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

    def __init__(self, kind, app_port, mysql, tag, routes=0, valgrind=None, workers=1, h2=False, header_timeout="10s"):
        self.kind, self.tag = kind, tag
        self.port = free_port()
        name = f"{kind}-{tag}-{self.port}"
        h2_opt = " proto h2" if h2 else ""
        if kind == "haproxy":
            cfg = fill(os.path.join(HERE, "haproxy.cfg"), name + ".cfg", LISTEN=self.port, APP=app_port, MYSQL=mysql,
                       MAXCONN=MAXCONN, WORKERS=workers, HEADER_TIMEOUT=header_timeout, BIND_OPTS=h2_opt,
                       SERVER_OPTS=h2_opt)
            argv = ["haproxy", "-db", "-f", cfg]
        elif kind == "floor":
            # The 503 path of the floor answers itself (no app connection).
            argv = [FLOOR_BIN, str(self.port), str(app_port if mysql == MYSQL else 0), str(workers)]
        else:
            cfg = fill(
                os.path.join(HERE, "healthgate.yaml"),
                name + ".yaml",
                LISTEN=self.port,
                ADMIN=free_port(),
                APP=app_port,
                MYSQL=mysql,
                ROUTES=routes_yaml(routes),
                WORKERS=workers,
                HEADER_TIMEOUT=header_timeout,
                LISTENER_EXTRA="    upstream_protocol: h2c" if h2 else "",
            )
            argv = [HG_BIN, "run", "--config", cfg]
        env = dict(os.environ, RUST_LOG="warn")
        if valgrind:
            self.cg_out = os.path.join(TMP, f"cg-{name}.out")
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.cg_out}"] + valgrind + argv
        self.proc = spawn(argv, name, env=env)
        self.pid = self.proc.pid

    def wait(self, want, path="/", timeout=60.0):
        if self.kind == "floor":
            # It never closes a connection itself: wait for it to listen.
            deadline = time.time() + timeout
            while time.time() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return
                except OSError:
                    time.sleep(0.1)
            raise RuntimeError("floor never listened")
        wait_status(self.port, want, path, timeout)

    def stop(self):
        stop(self.proc)


# === load ===


def wrk(port, conns, duration, path="/", threads=1):
    argv = [
        "wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--timeout", "5s",
        "-s", os.path.join(HERE, "wrk-report.lua"), f"http://127.0.0.1:{port}{path}",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, preexec_fn=raise_nofile, check=True).stdout
    m = re.search(r"WRKJSON (\{.*\})", out)
    if not m:
        raise RuntimeError("wrk printed no report:\n" + out)
    return json.loads(m.group(1))


def measured_run(proxy, scenario, conns, rep, path="/", threads=1):
    (u0, s0) = cpu_ticks(proxy.pid)
    r = wrk(proxy.port, conns, DURATION, path, threads)
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
        user_us_per_req=(u1 - u0) / TICK * 1e6 / max(r["requests"], 1),
        sys_us_per_req=(s1 - s0) / TICK * 1e6 / max(r["requests"], 1),
        errors=r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"],
        non_2xx=r["err_status"],
    )
    RUNS.append(r)
    log(
        f"  {scenario:8} c={conns:<4} #{rep} {proxy.kind:10} {proxy.tag:8} {r['rps']:9.0f} req/s"
        f"  p99 {r['p99_us']:6} µs  cpu {r['cpu_us_per_req']:6.2f} µs/req  non-2xx {r['non_2xx']}  errors {r['errors']}"
    )
    return r


def load_phase(pairs, scenario, conns_list, path="/", threads=1):
    """pairs: [A, B, ...] proxies serving the same scenario; runs A B A B ..."""
    for proxy in pairs:
        wrk(proxy.port, 32, 1, path, threads)  # warm up (connections, pools, caches)
    for conns in conns_list:
        for rep in range(REPEATS):
            order = pairs if rep % 2 == 0 else list(reversed(pairs))
            for proxy in order:
                measured_run(proxy, scenario, conns, rep, path, threads)


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
        # Idle RSS is mostly pages of the executable (file-backed), not
        # allocations: kept apart so the two are not mistaken for each other.
        anon, file = status_kib(p.pid, "RssAnon"), status_kib(p.pid, "RssFile")
        socks, ok = idle_connections(p.port, IDLE_CONNS)
        # Let per-connection state settle: healthgate parks idle connections
        # after 100 ms, and shrinks the app connection pool a burst filled
        # 1-2 s after it (POOL_SHRINK_AFTER and the sweeper's look-again delay).
        time.sleep(3)
        rss = status_kib(p.pid, "VmRSS")
        hwm = status_kib(p.pid, "VmHWM")
        for s in socks:
            s.close()
        p.stop()
        r = dict(kind="idle", proxy=kind, idle_rss_kib=idle, idle_anon_kib=anon, idle_file_kib=file, conns=IDLE_CONNS,
                 answered=ok, rss_kib=rss, hwm_kib=hwm)
        RUNS.append(r)
        out[kind] = r
        log(f"  idle {kind:10} idle RSS {idle / 1024:.1f} MiB; {ok}/{IDLE_CONNS} answered, RSS {rss / 1024:.1f} MiB (peak {hwm / 1024:.1f})")
    return out


# === slowloris: partial request heads ===

SLOW_HEAD = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: slow\r\n"


def slow_connections(port, n):
    """Opens n connections and sends the start of a request head on each
    (never its end). Returns the sockets."""
    socks = []
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
        if i % 500 == 499:
            time.sleep(0.05)  # keep the accept backlog from overflowing
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_WRITE)
    left, deadline = len(socks), time.time() + 60
    while left and time.time() < deadline:
        for key, _ in sel.select(0.5):
            try:
                key.fileobj.send(SLOW_HEAD)
            except OSError:
                pass
            sel.unregister(key.fileobj)
            left -= 1
    sel.close()
    return socks


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def slowloris_phase(app_port):
    """RSS while each proxy holds SLOW_CONNS stalled request heads (both with
    a 60 s head timeout, so that none is cut while they are counted)."""
    out = {}
    for kind in ("haproxy", "healthgate"):
        p = Proxy(kind, app_port, MYSQL, "slow", header_timeout="60s")
        p.wait(200)
        time.sleep(1)
        idle = status_kib(p.pid, "VmRSS")
        fds0 = open_fds(p.pid)
        socks = slow_connections(p.port, SLOW_CONNS)
        deadline = time.time() + 30
        while open_fds(p.pid) < fds0 + SLOW_CONNS * 0.98 and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        rss = status_kib(p.pid, "VmRSS")
        hwm = status_kib(p.pid, "VmHWM")
        held = open_fds(p.pid) - fds0
        for s in socks:
            s.close()
        p.stop()
        r = dict(kind="slowloris", proxy=kind, idle_rss_kib=idle, conns=SLOW_CONNS, held=held, rss_kib=rss, hwm_kib=hwm,
                 per_conn_bytes=(rss - idle) * 1024 / max(held, 1))
        RUNS.append(r)
        out[kind] = r
        log(f"  slowloris {kind:10} {held}/{SLOW_CONNS} held, RSS {idle / 1024:.1f} -> {rss / 1024:.1f} MiB "
            f"(peak {hwm / 1024:.1f}), {r['per_conn_bytes']:.0f} B per connection")
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


CACHE_EVENTS = ("Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw", "Bc", "Bcm", "Bi", "Bim")


def callgrind_zero(proxy):
    """Zeroes the counters of a proxy running under callgrind (after its warm-up)."""
    subprocess.run(["callgrind_control", "-z", str(proxy.pid)], check=True, capture_output=True)


def callgrind_dump(proxy, keep):
    """Dumps the counters of a proxy running under callgrind, copies the dump
    to `keep` (for callgrind_annotate) and returns its totals by event name."""
    subprocess.run(["callgrind_control", "-d", str(proxy.pid)], check=True, capture_output=True)
    dumps = sorted(f for f in os.listdir(TMP) if f.startswith(os.path.basename(proxy.cg_out) + "."))
    if not dumps:
        raise RuntimeError("callgrind wrote no dump")
    dump = os.path.join(TMP, dumps[-1])
    with open(dump) as f:
        lines = f.readlines()
    names = next(line.split()[1:] for line in lines if line.startswith("events:"))
    totals = [line for line in lines if line.startswith(("summary:", "totals:"))]
    shutil.copy(dump, keep)
    return dict(zip(names, (int(v) for v in totals[-1].split()[1:])))


def callgrind(kind, app_port, mysql, scenario, want, routes=0, path="/", cachesim=False):
    tag = f"{scenario}{routes or ''}{'-cachesim' if cachesim else ''}"
    flags = ["--dump-instr=no"] + (["--cache-sim=yes", "--branch-sim=yes"] if cachesim else [])
    p = Proxy(kind, app_port, mysql, "cg-" + tag, routes=routes, valgrind=flags)
    try:
        p.wait(want, path, timeout=180)
        keepalive_requests(p.port, 200, path)  # warm up
        callgrind_zero(p)
        keepalive_requests(p.port, CG_REQUESTS, path)
        keep = os.path.join(TMP, f"callgrind-{kind}-{tag}.out")
        values = callgrind_dump(p, keep)
        ir = values["Ir"]
    finally:
        p.stop()
    r = dict(kind="cachesim" if cachesim else "callgrind", proxy=kind, scenario=scenario, routes=routes,
             requests=CG_REQUESTS, instructions=ir, instr_per_req=ir / CG_REQUESTS, dump=keep,
             per_req={k: values.get(k, 0) / CG_REQUESTS for k in CACHE_EVENTS})
    RUNS.append(r)
    log(f"  callgrind {kind:10} {tag:10} {ir / CG_REQUESTS:9.0f} instructions/request")
    return r


# === HTTP/2 ===


def h2load(port, duration):
    """h2load, 32 connections x 10 concurrent streams, prior-knowledge h2c."""
    argv = ["h2load", "-c32", "-m10", "-t1", f"-D{duration}", "--warm-up-time=1", f"http://127.0.0.1:{port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, preexec_fn=raise_nofile, timeout=duration + 60).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if not (m and done):
        raise RuntimeError("h2load printed no summary:\n" + out[-2000:])

    def us(v):
        for unit, f in (("us", 1), ("ms", 1e3), ("s", 1e6)):
            if v.endswith(unit):
                return float(v[: -len(unit)]) * f
        return float("nan")

    return dict(rps=float(m.group(1)), done=int(done.group(1)), succeeded=int(done.group(2)),
                failed=int(done.group(3)) + int(done.group(4)), mean_us=us(lat.group(3)) if lat else float("nan"))


def h2_cell(proxy, scenario, rep):
    (u0, s0) = cpu_ticks(proxy.pid)
    r = h2load(proxy.port, DURATION)
    (u1, s1) = cpu_ticks(proxy.pid)
    n = max(r["done"], 1)
    # h2load's warm-up second is not counted in `done` but costs CPU: scale
    # by the time measured (DURATION) over the time loaded (DURATION + 1).
    scale = DURATION / (DURATION + 1)
    r.update(kind="h2", proxy=proxy.kind, scenario=scenario, rep=rep,
             cpu_us_per_req=(u1 - u0 + s1 - s0) / TICK * 1e6 * scale / n,
             user_us_per_req=(u1 - u0) / TICK * 1e6 * scale / n, sys_us_per_req=(s1 - s0) / TICK * 1e6 * scale / n)
    RUNS.append(r)
    log(f"  h2 {scenario:8} #{rep} {proxy.kind:10} {r['rps']:9.0f} req/s  mean {r['mean_us']:7.0f} µs  "
        f"cpu {r['cpu_us_per_req']:6.2f} µs/req  succeeded {r['succeeded']}  failed {r['failed']}")
    return r


def h2_phase(dead):
    if not shutil.which("h2load"):
        log("  h2: h2load missing (apt install nghttp2-client); skipped")
        return "h2load missing"
    app, port = start_app(h2=True)
    try:
        wait_listen(port)
        for scenario, mysql, want in (("proxied", MYSQL, 200), ("503", dead, 503)):
            pair = [Proxy(kind, port, mysql, "h2-" + scenario, h2=True) for kind in ("healthgate", "haproxy")]
            try:
                time.sleep(1)
                if pair[0].proc.poll() is not None:
                    log(f"  h2: healthgate refused the h2c config (no `upstream_protocol: h2c` in this build); skipped")
                    return "healthgate without upstream_protocol: h2c"
                for p in pair:
                    wait_h2(p, want)
                for rep in range(REPEATS):
                    for p in pair if rep % 2 == 0 else list(reversed(pair)):
                        h2_cell(p, scenario, rep)
            finally:
                for p in pair:
                    p.stop()
    finally:
        stop(app)
    return None


def wait_listen(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def h2_status_count(out, want):
    """How many responses of `want`'s class h2load's output reports (0 if none)."""
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    return int(m.group(want // 100 - 1)) if m else 0


def wait_h2(proxy, want, timeout=60.0):
    """Until one h2c request through the proxy gets `want` (its class)."""
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        if proxy.proc.poll() is not None:
            raise RuntimeError(f"{proxy.kind} exited before answering over h2c (log in {TMP})")
        last = subprocess.run(["h2load", "-n1", "-c1", f"http://127.0.0.1:{proxy.port}/"], capture_output=True,
                              text=True).stdout
        if h2_status_count(last, want) == 1:
            return
        time.sleep(0.3)
    raise RuntimeError(f"{proxy.kind} never answered {want} over h2c: {last[-800:]}")


# === callgrind over HTTP/2 ===


def h2_requests(port, n, want):
    """n requests on one prior-knowledge h2c connection, one stream at a time
    (h2load -c1 -m1); fails unless all n got `want` (its class)."""
    argv = ["h2load", f"-n{n}", "-c1", "-m1", "-t1", f"http://127.0.0.1:{port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=1800).stdout
    got = h2_status_count(out, want)
    if got != n:
        raise RuntimeError(f"h2load: {got}/{n} answered {want}:\n{out[-2000:]}")


def callgrind_h2(kind, app_port, mysql, scenario, want):
    """Callgrind instructions per HTTP/2 request, the proxy configured as in
    the h2 phase. One stream at a time (like the sequential HTTP/1.1
    requests of callgrind()), so that every stream is its own read, dispatch
    and write: with streams in flight, how many share a read or a write
    depends on how fast the proxy runs under valgrind relative to h2load,
    which is the machine's timing, not the proxy's work."""
    p = Proxy(kind, app_port, mysql, "cg-h2-" + scenario, h2=True, valgrind=["--dump-instr=no"])
    try:
        wait_h2(p, want, timeout=180)
        h2_requests(p.port, 200, want)  # warm up (upstream connection, pools, caches)
        time.sleep(0.5)  # the warm-up connection's teardown is not counted
        callgrind_zero(p)
        h2_requests(p.port, CG_REQUESTS, want)
        keep = os.path.join(TMP, f"callgrind-{kind}-h2-{scenario}.out")
        ir = callgrind_dump(p, keep)["Ir"]
    finally:
        p.stop()
    r = dict(kind="callgrind-h2", proxy=kind, scenario=scenario, requests=CG_REQUESTS, client="h2load -c1 -m1",
             instructions=ir, instr_per_req=ir / CG_REQUESTS, dump=keep)
    RUNS.append(r)
    log(f"  callgrind h2 {kind:10} {scenario:8} {ir / CG_REQUESTS:9.0f} instructions/request")
    return r


def callgrind_h2_phase(dead):
    """callgrind_h2 for both proxies, proxied and 503, against the h2c app."""
    if not shutil.which("h2load"):
        log("  callgrind h2: h2load missing (apt install nghttp2-client); skipped")
        return
    app, port = start_app(h2=True)
    try:
        wait_listen(port)
        for kind in ("healthgate", "haproxy"):
            callgrind_h2(kind, port, MYSQL, "proxied", 200)
            callgrind_h2(kind, port, dead, "503", 503)
    finally:
        stop(app)


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


def memory_table(idle, slow):
    md = ["", "| memory | healthgate | HAProxy |", "|---|---|---|"]
    if idle:
        hg, ha = idle["healthgate"], idle["haproxy"]
        per = lambda r: (r["rss_kib"] - r["idle_rss_kib"]) * 1024 / max(r["answered"], 1)
        md += [
            f"| idle RSS MiB | {hg['idle_rss_kib'] / 1024:.1f} | {ha['idle_rss_kib'] / 1024:.1f} |",
            f"| of which allocations (RssAnon) / executable and libraries (RssFile), MiB | "
            f"{hg['idle_anon_kib'] / 1024:.1f} / {hg['idle_file_kib'] / 1024:.1f} | "
            f"{ha['idle_anon_kib'] / 1024:.1f} / {ha['idle_file_kib'] / 1024:.1f} |",
            f"| RSS with {IDLE_CONNS} idle keep-alive clients, MiB | {hg['rss_kib'] / 1024:.1f} | {ha['rss_kib'] / 1024:.1f} |",
            f"| per idle client (RSS growth / clients), bytes | {per(hg):.0f} | {per(ha):.0f} |",
            f"| clients answered | {hg['answered']} | {ha['answered']} |",
        ]
    if slow:
        hg, ha = slow["healthgate"], slow["haproxy"]
        md += [
            f"| RSS with {SLOW_CONNS} stalled partial heads (slowloris), MiB | {hg['rss_kib'] / 1024:.1f} | {ha['rss_kib'] / 1024:.1f} |",
            f"| per stalled client, bytes | {hg['per_conn_bytes']:.0f} | {ha['per_conn_bytes']:.0f} |",
            f"| peak RSS in the slowloris test, MiB | {hg['hwm_kib'] / 1024:.1f} | {ha['hwm_kib'] / 1024:.1f} |",
            f"| stalled clients held | {hg['held']} | {ha['held']} |",
        ]
    return md


SCENARIOS = (("proxied", 1), ("503", 1), ("proxied-2w", 2))


def report(started, info, idle, slow, h2_note, cmd):
    load = [r for r in RUNS if r["kind"] == "load"]
    rows = []
    ratios = []
    for scenario, _ in SCENARIOS:
        for conns in sorted({r["conns"] for r in load if r["scenario"] == scenario}):
            def agg(kind):
                rs = [r for r in load if r["scenario"] == scenario and r["conns"] == conns and r["proxy"] == kind]
                if not rs:
                    return None
                keys = ("rps", "p50_us", "p99_us", "p999_us", "cpu_us_per_req", "sys_share", "user_us_per_req", "sys_us_per_req")
                return {k: med([r.get(k, float("nan")) for r in rs]) for k in keys} | {
                    "cpu_all": [round(r["cpu_us_per_req"], 2) for r in rs],
                }
            hg, ha, fl = agg("healthgate"), agg("haproxy"), agg("floor")
            rows.append((scenario, conns, hg, ha, fl))
            if hg and ha:
                ratios.append((f"{scenario} c={conns} CPU/req", ratio(hg["cpu_us_per_req"], ha["cpu_us_per_req"])))
                ratios.append((f"{scenario} c={conns} user CPU/req", ratio(hg["user_us_per_req"], ha["user_us_per_req"])))
                ratios.append((f"{scenario} c={conns} p99", ratio(hg["p99_us"], ha["p99_us"])))
                ratios.append((f"{scenario} c={conns} req/s", ratio(hg["rps"], ha["rps"])))
    cg = {(r["proxy"], r["scenario"], r["routes"]): r["instr_per_req"] for r in RUNS if r["kind"] == "callgrind"}
    for sc in ("proxied", "503"):
        if ("healthgate", sc, 0) in cg and ("haproxy", sc, 0) in cg:
            ratios.append((f"{sc} callgrind instr/req", ratio(cg[("healthgate", sc, 0)], cg[("haproxy", sc, 0)])))
    cg_h2 = {(r["proxy"], r["scenario"]): r["instr_per_req"] for r in RUNS if r["kind"] == "callgrind-h2"}
    for sc in ("proxied", "503"):
        if ("healthgate", sc) in cg_h2 and ("haproxy", sc) in cg_h2:
            ratios.append((f"h2 {sc} callgrind instr/req", ratio(cg_h2[("healthgate", sc)], cg_h2[("haproxy", sc)])))
    if idle:
        ratios.append(("idle RSS", ratio(idle["healthgate"]["idle_rss_kib"], idle["haproxy"]["idle_rss_kib"])))
        ratios.append((f"RSS with {IDLE_CONNS} idle conns", ratio(idle["healthgate"]["rss_kib"], idle["haproxy"]["rss_kib"])))
    if slow:
        ratios.append((f"RSS with {SLOW_CONNS} slowloris conns", ratio(slow["healthgate"]["rss_kib"], slow["haproxy"]["rss_kib"])))

    peak = {r["proxy"] + r["scenario"]: r["hwm_kib"] for r in RUNS if r["kind"] == "peak"}
    md = []
    md.append("# healthgate vs HAProxy\n")
    md.append(f"- date: {started} UTC")
    for k, v in info.items():
        md.append(f"- {k}: {v}")
    md.append(f"- loadavg_at_end: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    md.append(f"- command: `{cmd}`")
    if rows:
        md.append(f"- load: wrk -t1 (-t2 in the 2-worker rows), keep-alive, {DURATION} s per run, {REPEATS} runs per "
                  "cell, interleaved; medians shown (CPU µs/req of every run in brackets); user and sys from "
                  "/proc/PID/stat; floor = bench/floor.c (same syscalls, no HTTP work)\n")
        md.append("| path | conns | proxy | req/s | p50 µs | p99 µs | p99.9 µs | CPU µs/req | user µs/req | sys µs/req "
                  "| peak RSS MiB |")
        md.append("|---|---|---|---|---|---|---|---|---|---|---|")
    else:
        md.append("")
    for scenario, conns, hg, ha, fl in rows:
        for name, a in (("healthgate", hg), ("HAProxy", ha), ("floor", fl)):
            if a is None:
                continue
            key = {"healthgate": "healthgate", "HAProxy": "haproxy", "floor": "floor"}[name] + scenario
            md.append(
                f"| {scenario} | {conns} | {name} | {a['rps']:.0f} | {a['p50_us']:.0f} | {a['p99_us']:.0f} | {a['p999_us']:.0f} | "
                f"{a['cpu_us_per_req']:.2f} {a['cpu_all']} | {a['user_us_per_req']:.2f} | {a['sys_us_per_req']:.2f} | "
                f"{peak.get(key, 0) / 1024:.1f} |"
            )
    floor_rows = [(sc, c, hg, ha, fl) for sc, c, hg, ha, fl in rows if fl and hg and ha]
    if floor_rows:
        md.append("")
        md.append("Distance to the kernel floor (CPU µs per request above the floor's; floor = 0):\n")
        md.append("| path | conns | floor CPU µs/req | healthgate above floor | HAProxy above floor | healthgate / floor | HAProxy / floor |")
        md.append("|---|---|---|---|---|---|---|")
        for sc, c, hg, ha, fl in floor_rows:
            f = fl["cpu_us_per_req"]
            md.append(f"| {sc} | {c} | {f:.2f} | {hg['cpu_us_per_req'] - f:+.2f} | {ha['cpu_us_per_req'] - f:+.2f} | "
                      f"{ratio(hg['cpu_us_per_req'], f):.2f} | {ratio(ha['cpu_us_per_req'], f):.2f} |")
    if idle or slow:
        md.extend(memory_table(idle, slow))
    if cg:
        md.append("")
        md.append(f"Callgrind, instructions per request ({CG_REQUESTS} sequential keep-alive requests, counters zeroed after a warm-up):\n")
        md.append("| path | healthgate | HAProxy | ratio |")
        md.append("|---|---|---|---|")
        for sc in ("proxied", "503"):
            if ("healthgate", sc, 0) in cg:
                h, a = cg[("healthgate", sc, 0)], cg.get(("haproxy", sc, 0), float("nan"))
                md.append(f"| {sc} | {h:.0f} | {a:.0f} | {ratio(h, a):.2f} |")
    cs = {r["proxy"]: r["per_req"] for r in RUNS if r["kind"] == "cachesim"}
    if cs:
        md.append("")
        md.append("Cache and branch simulation (callgrind `--cache-sim=yes --branch-sim=yes`, proxied, per request; "
                  "simulated caches of this CPU, user space only):\n")
        md.append("| proxy | instructions | I1 misses | D1 misses | LL misses | branches | mispredicted | mispredict % |")
        md.append("|---|---|---|---|---|---|---|---|")
        for kind in ("healthgate", "haproxy"):
            if kind in cs:
                e = cs[kind]
                br, bm = e["Bc"] + e["Bi"], e["Bcm"] + e["Bim"]
                md.append(f"| {kind} | {e['Ir']:.0f} | {e['I1mr']:.0f} | {e['D1mr'] + e['D1mw']:.0f} | "
                          f"{e['ILmr'] + e['DLmr'] + e['DLmw']:.0f} | {br:.0f} | {bm:.0f} | {100 * bm / max(br, 1):.1f} |")
    h2 = [r for r in RUNS if r["kind"] == "h2"]
    md.append("")
    md.append("HTTP/2 (h2load -c32 -m10, prior-knowledge h2c to the proxy and from the proxy to nginx `listen ... http2`):\n")
    if h2:
        md.append("| path | proxy | req/s | mean latency µs | CPU µs/req | user µs/req | sys µs/req | not 2xx/3xx (all, on the 503 path) |")
        md.append("|---|---|---|---|---|---|---|---|")
        for sc in ("proxied", "503"):
            for kind in ("healthgate", "haproxy"):
                rs = [r for r in h2 if r["scenario"] == sc and r["proxy"] == kind]
                if rs:
                    md.append(f"| {sc} | {kind} | {med([r['rps'] for r in rs]):.0f} | {med([r['mean_us'] for r in rs]):.0f} | "
                              f"{med([r['cpu_us_per_req'] for r in rs]):.2f} {[round(r['cpu_us_per_req'], 2) for r in rs]} | "
                              f"{med([r['user_us_per_req'] for r in rs]):.2f} | {med([r['sys_us_per_req'] for r in rs]):.2f} | "
                              f"{sum(r['failed'] for r in rs)} |")
    else:
        md.append(f"not measured: {h2_note or 'phase not run'}")
    if cg_h2:
        md.append("")
        md.append(f"Callgrind, instructions per HTTP/2 request (h2load -n{CG_REQUESTS} -c1 -m1: one h2c connection, one "
                  "stream at a time, counters zeroed after a 200-request warm-up; proxies configured as above):\n")
        md.append("| path | healthgate | HAProxy | ratio |")
        md.append("|---|---|---|---|")
        for sc in ("proxied", "503"):
            if ("healthgate", sc) in cg_h2:
                h, a = cg_h2[("healthgate", sc)], cg_h2.get(("haproxy", sc), float("nan"))
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


def build_floor():
    global FLOOR_BIN
    FLOOR_BIN = os.path.join(TMP, "floor")
    subprocess.run(["cc", "-O2", "-pthread", "-o", FLOOR_BIN, os.path.join(HERE, "floor.c")], check=True)


def main():
    raise_nofile()
    cmd = " ".join(["bench/compare.sh"] + sys.argv[1:])
    env_cmd = " ".join(f"{k}={os.environ[k]}" for k in ("QUICK", "REPEATS", "DURATION", "CONNS", "IDLE_CONNS", "SLOW_CONNS",
                                                        "CG_REQUESTS", "SKIP_CALLGRIND", "PHASES") if k in os.environ)
    if env_cmd:
        cmd = env_cmd + " " + cmd
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    info = machine()
    build_floor()
    log(f"bench: tmp {TMP}; {REPEATS} repeats × {DURATION}s; conns {CONNS}")
    app, app_port = start_app()
    idle = slow = h2_note = None
    try:
        dead = f"127.0.0.1:{dead_port()}"
        for scenario, workers in SCENARIOS:
            if ("multicore" if workers > 1 else "load") not in PHASES:
                continue
            kinds = ("healthgate", "haproxy", "floor")
            procs = {k: Proxy(k, app_port, dead if scenario == "503" else MYSQL, scenario, workers=workers) for k in kinds}
            for p in procs.values():
                p.wait(503 if scenario == "503" else 200)
            log(f"{scenario} path, {workers} worker(s):")
            conns = CONNS if workers == 1 else [64]
            load_phase([procs[k] for k in kinds], scenario, conns, threads=workers)
            for k, p in procs.items():
                RUNS.append(dict(kind="peak", proxy=k, scenario=scenario, hwm_kib=status_kib(p.pid, "VmHWM")))
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

        if "slowloris" in PHASES:
            log(f"{SLOW_CONNS} stalled partial request heads:")
            slow = slowloris_phase(app_port)

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

        if "cachesim" in PHASES:
            log(f"callgrind with cache and branch simulation ({CG_REQUESTS} requests each):")
            for kind in ("healthgate", "haproxy"):
                callgrind(kind, app_port, MYSQL, "proxied", 200, cachesim=True)

        if "h2" in PHASES:
            log("HTTP/2 (h2load -c32 -m10):")
            h2_note = h2_phase(dead)

        # h2_note says why the h2 phase could not run (no h2load, or a
        # healthgate build without h2c): this phase could not either.
        if "callgrind-h2" in PHASES and not h2_note:
            log(f"callgrind over HTTP/2 ({CG_REQUESTS} requests each, h2load -c1 -m1):")
            callgrind_h2_phase(dead)
    finally:
        for p in list(PROCS):
            stop(p)

    md, ratios = report(started, info, idle, slow, h2_note, cmd)
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
