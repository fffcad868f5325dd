"""Positions and offsets the way Kafka clients look them up, and the rebalance callbacks.

Serializers on the producer, deserializers on the consumer; beginning_offsets, end_offsets
and offsets_for_times; a group member that commits, is closed (its revoke callback runs,
while the partitions are still its own), and a second member that resumes with
seek_to_committed.

Run with a broker going (`make run`): python docs/examples/positions_and_callbacks.py
"""

import json
import os
import time

import trio

import client
from client import TopicPartition

BOOTSTRAP = os.environ.get("DWAL_BOOTSTRAP", "127.0.0.1:9092")
TOPIC = "example-positions"
GROUP = "example-positions"


async def main() -> None:
    async with client.connect(BOOTSTRAP) as cluster:
        await client.Admin(cluster).create_topic(TOPIC, partitions=1)
        partition = TopicPartition(TOPIC, 0)
        start_ms = int(time.time() * 1000)
        async with client.Producer(
            cluster, value_serializer=lambda value: json.dumps(value).encode()
        ) as producer:
            for n in range(10):
                await producer.send_and_wait(TOPIC, {"n": n})

        # Offsets a consumer can look up without reading: the log's ends and by time.
        looker = client.Consumer(cluster)
        assert await looker.beginning_offsets([partition]) == {partition: 0}
        assert await looker.end_offsets([partition]) == {partition: 10}
        by_time = await looker.offsets_for_times({partition: start_ms})
        assert by_time[partition] is not None and by_time[partition] <= 9, by_time
        far_future = await looker.offsets_for_times({partition: start_ms + 3_600_000})
        assert far_future == {partition: None}, far_future

        # A group member: reads 4 records, commits them, and is closed. Its revoke callback
        # runs at the close, while the partition is still its own.
        revoked = []
        first = client.Consumer(
            cluster,
            group_id=GROUP,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            value_deserializer=json.loads,
            max_poll_records=4,
            on_revoked=lambda partitions: revoked.append(sorted(partitions)),
        )
        async with first:
            first.subscribe([TOPIC])
            batch = []
            while not batch:
                batch = [r for rs in (await first.poll(timeout_ms=500)).values() for r in rs]
            assert [record.value for record in batch] == [{"n": n} for n in range(4)], batch
            await first.commit()  # the positions: offset 4
        assert revoked == [[partition]], revoked

        # Another consumer of the group, assigned by hand, resumes where the group left off.
        second = client.Consumer(cluster, group_id=GROUP, value_deserializer=json.loads)
        second.assign([partition])
        await second.seek_to_committed()
        assert second.position(partition) == 4
        rest = []
        async for record in second:
            rest.append(record.value["n"])
            if record.offset == 9:
                break
        assert rest == [4, 5, 6, 7, 8, 9], rest
        print("resumed from the committed offset:", rest)


trio.run(main)
