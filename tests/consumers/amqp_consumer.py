"""A RabbitMQ job consumer as apps write them (pika, manual acks), for tests/consumers.rs.

Usage: amqp_consumer.py HOST PORT QUEUE USER PASSWORD [CA_FILE]

With CA_FILE, the connection is AMQP over TLS, the broker's certificate
verified against CA_FILE for the name `localhost` (end to end: a TCP listener
passes TLS through untouched).

Connects, consumes QUEUE with manual acks, prints `GOT <body> <redelivered>`
for each delivery before acking it, and on any connection error reconnects at
once (the worst case for a sidecar that refuses it: no back-off of its own).
Prints `ATTEMPT n` before each connect, `CONNECTED` once consuming and
`LOST <exception>` when a connection ends. Killed by the test.
"""

import ssl
import sys
import time

import pika

host, port, queue, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
params = pika.ConnectionParameters(
    host,
    port,
    "/",
    pika.PlainCredentials(user, password),
    connection_attempts=1,
    socket_timeout=5,
    heartbeat=10,
    ssl_options=None,
)
if len(sys.argv) > 6:
    context = ssl.create_default_context(cafile=sys.argv[6])
    params.ssl_options = pika.SSLOptions(context, server_hostname="localhost")


def on_message(channel, method, _properties, body):
    print(f"GOT {body.decode()} {int(method.redelivered)}", flush=True)
    time.sleep(0.002)  # "processing"
    channel.basic_ack(method.delivery_tag)


attempt = 0
while True:
    attempt += 1
    print(f"ATTEMPT {attempt}", flush=True)
    try:
        connection = pika.BlockingConnection(params)
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        channel.basic_qos(prefetch_count=10)
        channel.basic_consume(queue, on_message)
        print("CONNECTED", flush=True)
        channel.start_consuming()
    except Exception as e:  # noqa: BLE001 - any error means: reconnect
        print(f"LOST {type(e).__name__}", flush=True)
