"""Pause one partition while the others are read, then resume it: flow control.

Run with a broker going (`make run`): python docs/examples/pause_resume.py
"""

import os

import trio

import client
from client import TopicPartition

BOOTSTRAP = os.environ.get("DWAL_BOOTSTRAP", "127.0.0.1:9092")
TOPIC = "example-pause"


async def main() -> None:
    async with client.connect(BOOTSTRAP) as cluster:
        await client.Admin(cluster).create_topic(TOPIC, partitions=2)
        async with client.Producer(cluster) as producer:
            for n in range(3):
                await producer.send(TOPIC, b"fast-%d" % n, partition=0)
                await producer.send(TOPIC, b"slow-%d" % n, partition=1)
        fast, slow = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)

        consumer = client.Consumer(cluster, auto_offset_reset="earliest")
        consumer.assign([fast, slow])
        consumer.pause([slow])  # say its downstream is busy
        print("paused:", consumer.paused())

        read = []
        while len(read) < 3:
            for tp, records in (await consumer.poll(timeout_ms=500)).items():
                assert tp == fast, "a paused partition returns nothing"
                read.extend(record.value for record in records)
        print("while paused:", read)

        consumer.resume([slow])
        while len(read) < 6:
            for records in (await consumer.poll(timeout_ms=500)).values():
                read.extend(record.value for record in records)
        print("after resume:", read[3:])
        assert read[3:] == [b"slow-0", b"slow-1", b"slow-2"], read
        # where each partition stands, and where the log ends
        print(await consumer.end_offsets([fast, slow]), consumer.position(slow))


trio.run(main)
