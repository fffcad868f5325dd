"""A consumer configured with Kafka's option names, with deserializers, committing offsets
with metadata in a consumer group.

Run with a broker going (`make run`): python docs/examples/kafka_options_consumer.py
"""

import json
import os

import trio

import client

BOOTSTRAP = os.environ.get("DWAL_BOOTSTRAP", "127.0.0.1:9092")
TOPIC = "example-kafka-consumer"


async def main() -> None:
    async with client.connect(BOOTSTRAP) as cluster:
        await client.Admin(cluster).create_topic(TOPIC, partitions=1)
        async with client.Producer(cluster) as producer:
            for n in range(5):
                await producer.send(TOPIC, json.dumps({"n": n}), key="sensor-%d" % (n % 2))

        # The same settings a confluent-kafka or Java client takes; string values are fine.
        config = {
            "group.id": "example-kafka-consumer",
            "auto.offset.reset": "smallest",  # Kafka's old name for earliest
            "enable.auto.commit": "false",
            "max.poll.records": 2,
            "fetch.max.wait.ms": 500,
            "max.poll.interval.ms": 60000,  # becomes the group's rebalance timeout
            "key.deserializer": bytes.decode,
            "value.deserializer": json.loads,
        }
        async with client.Consumer.from_config(cluster, config) as consumer:
            consumer.subscribe([TOPIC])
            seen = []
            while len(seen) < 5:
                for records in (await consumer.poll(timeout_ms=500)).values():
                    assert len(records) <= 2  # max.poll.records
                    seen.extend(records)
            print([(record.key, record.value) for record in seen])
            assert [record.value for record in seen] == [{"n": n} for n in range(5)]

            # Commit with a note next to the offset; committed(..., with_metadata=True)
            # gives it back.
            partition = client.TopicPartition(TOPIC, 0)
            await consumer.commit({partition: client.OffsetAndMetadata(5, "batch-17 done")})
            committed = await consumer.committed([partition], with_metadata=True)
            print(committed[partition])
            assert committed[partition] == (5, "batch-17 done")

        # A misspelt option is refused with a hint.
        try:
            client.Consumer(cluster, fetch_min_byte=1)
        except client.UnknownOptionError as error:
            print(error)


trio.run(main)
