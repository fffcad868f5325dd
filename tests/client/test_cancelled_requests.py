"""Issue item 10: a cancelled request must not duplicate records.

Producer, metadata and admin requests share one connection. A user's timeout around an
admin call (a cancel scope, in trio) used to close that connection, and the producer then
resent its in-flight batches: thousands of records were stored twice. Now a cancelled
request only gives up its answer, and the producer never resends what may be stored.
"""

from __future__ import annotations

import trio

import client
from client import Admin, Consumer, Producer

RECORDS = 20_000


async def test_impatient_admin_calls_never_duplicate_produced_records(broker):
    async with client.connect(broker.bootstrap) as cluster:
        admin = Admin(cluster)
        await admin.create_topic("exactly-once", partitions=2)
        connection = await cluster.any_connection()  # shared by producer, metadata, admin
        produced = trio.Event()
        cancelled = 0

        async def impatient_admin() -> None:
            nonlocal cancelled
            while not produced.is_set():
                with trio.move_on_after(0.0003) as scope:
                    await admin.list_topics()
                cancelled += scope.cancelled_caught

        async with trio.open_nursery() as nursery:
            nursery.start_soon(impatient_admin)
            async with Producer(cluster, linger_ms=0, batch_size=1024) as producer:
                deliveries = [
                    await producer.send("exactly-once", b"%d" % i, key=b"%d" % (i % 7))
                    for i in range(RECORDS)
                ]
            produced.set()

        assert cancelled > 0
        assert [d.error for d in deliveries if d.error is not None] == []
        assert not connection.closed
        described = await admin.describe_topic("exactly-once")
        assert sum(p.high_watermark for p in described.partitions) == RECORDS

        consumer = Consumer(cluster, auto_offset_reset="earliest")
        await consumer.assign_topic("exactly-once")
        by_partition: dict[int, list[int]] = {}
        while sum(map(len, by_partition.values())) < RECORDS:
            for partition, records in (await consumer.poll(timeout_ms=500)).items():
                by_partition.setdefault(partition.partition, []).extend(
                    int(record.value) for record in records
                )
    values = [value for values in by_partition.values() for value in values]
    assert sorted(values) == list(range(RECORDS))  # every record, exactly once
    for stored in by_partition.values():
        assert stored == sorted(stored)  # in send() order within a partition
