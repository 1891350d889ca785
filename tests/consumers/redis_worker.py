"""A Redis list-queue worker (redis-py), for tests/consumers.rs.

Usage: redis_worker.py HOST PORT QUEUE MODE NAME

MODE `blpop`: the common pattern, `BLPOP queue` then process; a message popped
while the connection is being closed is lost.
MODE `blmove`: the reliable-queue pattern, `BLMOVE queue processing LEFT LEFT`,
process, then `LREM processing`; after a reconnect the worker first processes
what its processing list still holds (at-least-once: duplicates possible).

Prints `GOT <message>` for each message processed, `ATTEMPT n` before each
connect, `CONNECTED` once working and `LOST <exception>` when a connection ends;
reconnects at once. redis-py's own retries are off: by default it reconnects and
re-sends a failed command inside the library, so the worker's recovery of its
processing list would not run after a lost connection (and a re-sent BLMOVE
takes the next message, leaving the one whose reply was lost behind). Killed by
the test.
"""

import sys
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

host, port, queue, mode, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
processing = f"{queue}:processing:{name}"


def process(message):
    print(f"GOT {message.decode()}", flush=True)
    time.sleep(0.002)


attempt = 0
while True:
    attempt += 1
    print(f"ATTEMPT {attempt}", flush=True)
    try:
        r = redis.Redis(host=host, port=port, socket_timeout=5, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0))
        r.ping()
        print("CONNECTED", flush=True)
        if mode == "blmove":
            # Left over by a connection that ended between taking and finishing.
            for message in reversed(r.lrange(processing, 0, -1)):
                process(message)
                r.lrem(processing, 1, message)
        while True:
            if mode == "blpop":
                item = r.blpop([queue], timeout=1)
                if item:
                    process(item[1])
            else:
                message = r.blmove(queue, processing, 1, "LEFT", "LEFT")
                if message is not None:
                    process(message)
                    r.lrem(processing, 1, message)
    except Exception as e:  # noqa: BLE001 - any error means: reconnect
        print(f"LOST {type(e).__name__}", flush=True)
