"""Produce three records and read them back: the smallest complete program.

Run with a broker going (`make run`): python docs/examples/produce_and_consume.py
"""

import os

import trio

import client

BOOTSTRAP = os.environ.get("DWAL_BOOTSTRAP", "127.0.0.1:9092")


async def main() -> None:
    async with client.connect(BOOTSTRAP) as cluster:
        await client.Admin(cluster).create_topic("example-basics", partitions=1)
        async with client.Producer(cluster, acks="all") as producer:
            deliveries = [await producer.send("example-basics", b"v%d" % n) for n in range(3)]
        offsets = [(await delivery.wait()).offset for delivery in deliveries]
        assert offsets == [0, 1, 2], offsets

        consumer = client.Consumer(cluster, auto_offset_reset="earliest")
        await consumer.assign_topic("example-basics")
        values: list[bytes] = []
        while len(values) < 3:
            for records in (await consumer.poll(timeout_ms=1000)).values():
                values.extend(record.value for record in records)
        assert values == [b"v0", b"v1", b"v2"], values
        print("read back", values)


trio.run(main)
