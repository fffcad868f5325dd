"""Delivery callbacks, send_and_wait and flush(): learn each record's outcome as it comes.

A callback is called once per record, in the producer's callback task, with (metadata, None)
when the record is stored or (None, error) when it failed; flush() waits for the callbacks
and returns the failures since the previous flush. A record too large is refused by send()
alone: the records around it are stored.

Run with a broker going (`make run`): python docs/examples/delivery_callbacks.py
"""

import os

import trio

import client
from client import DwalError, ErrorCode, RecordMetadata

BOOTSTRAP = os.environ.get("DWAL_BOOTSTRAP", "127.0.0.1:9092")
TOPIC = "example-callbacks"


async def main() -> None:
    stored: list[RecordMetadata] = []
    failed: list[DwalError] = []

    def on_delivery(metadata: RecordMetadata | None, error: DwalError | None) -> None:
        # Runs in the producer's task: keep it short, never block; an exception raised here
        # would stop the producer and come out of its `async with` block.
        if error is not None:
            failed.append(error)
        else:
            assert metadata is not None
            stored.append(metadata)

    async with client.connect(BOOTSTRAP) as cluster:
        await client.Admin(cluster).create_topic(
            TOPIC, partitions=2, configs={"max.message.bytes": "10000"}
        )
        async with client.Producer(cluster, acks="all", on_delivery=on_delivery) as producer:
            for n in range(10):
                await producer.send(TOPIC, b"order-%d" % n, key=b"customer-%d" % (n % 3))
            try:
                await producer.send(TOPIC, b"x" * 20_000)  # over the topic's max.message.bytes
            except DwalError as error:
                assert error.code == ErrorCode.MESSAGE_TOO_LARGE
                print("refused alone:", error.message)
            failures = await producer.flush()  # every callback due has run
            assert failures == [], failures
            assert len(stored) == 10 and not failed

            # One record, waiting for its outcome: the metadata, or its error raised.
            metadata = await producer.send_and_wait(TOPIC, b"urgent", key=b"customer-0")
            print(f"stored at {metadata.topic}-{metadata.partition}@{metadata.offset}")
    for metadata in stored[:3]:
        print("callback:", metadata.partition, metadata.offset)


trio.run(main)
