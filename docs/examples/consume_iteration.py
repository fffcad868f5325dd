"""Read records with `async for`, one at a time or in lists, and stop with a cancel scope.

Run with a broker going (`make run`): python docs/examples/consume_iteration.py
"""

import os

import trio

import client

BOOTSTRAP = os.environ.get("DWAL_BOOTSTRAP", "127.0.0.1:9092")
TOPIC = "example-iteration"


async def main() -> None:
    async with client.connect(BOOTSTRAP) as cluster:
        await client.Admin(cluster).create_topic(TOPIC, partitions=2)
        async with client.Producer(cluster) as producer:
            for n in range(10):
                await producer.send(TOPIC, b"order-%d" % n, partition=n % 2)

        consumer = client.Consumer(cluster, auto_offset_reset="earliest")
        await consumer.assign_topic(TOPIC)

        # One record at a time; it follows forever, so something must stop it: here a
        # cancel scope, cancelled after four records. The records fetched but not yet
        # returned stay with the consumer for the next loop or poll.
        first = []
        with trio.CancelScope() as scope:
            async for record in consumer:
                first.append(record)
                if len(first) == 4:
                    scope.cancel()
        for record in first:
            # every record says where it comes from
            print(record.topic, record.partition, record.offset, record.value)

        # Lists of at most three records; with timeout_ms an empty list says "nothing came
        # for that long", which ends this loop once everything was read.
        rest = []
        async for batch in consumer.batches(max_records=3, timeout_ms=500):
            assert len(batch) <= 3
            if not batch:
                break
            rest.extend(batch)

        values = sorted(record.value for record in first + rest)
        assert values == sorted(b"order-%d" % n for n in range(10)), values
        assert all(record.topic == TOPIC for record in first + rest)
        print("read", len(values), "records, none twice")


trio.run(main)
