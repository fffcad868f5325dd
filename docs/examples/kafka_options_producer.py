"""A producer configured with Kafka's option names, as a confluent-kafka or kafka-python
program would set it up, with serializers for keys and values.

Run with a broker going (`make run`): python docs/examples/kafka_options_producer.py
"""

import json
import os

import trio

import client
from client.kafka_options import UnknownOptionError

BOOTSTRAP = os.environ.get("DWAL_BOOTSTRAP", "127.0.0.1:9092")
TOPIC = "example-kafka-options"

# The dict a Kafka client would take (values may be strings, as in a properties file).
CONFIG = {
    "acks": "all",
    "linger.ms": "5",
    "compression.type": "lz4",
    "enable.idempotence": "true",
    "max.in.flight.requests.per.connection": 5,
    "buffer.memory": 32 * 1024 * 1024,
    "key.serializer": str.encode,
    "value.serializer": lambda value: json.dumps(value).encode(),
}


async def main() -> None:
    # bootstrap_servers, as kafka-python and aiokafka spell it
    async with client.connect(bootstrap_servers=BOOTSTRAP) as cluster:
        await client.Admin(cluster).create_topic(TOPIC, partitions=3)
        try:
            client.Producer.from_config(cluster, {**CONFIG, "group.id": "billing"})
        except UnknownOptionError as error:
            print(error)  # 'group.id' is a consumer option
        producer = client.Producer.from_config(cluster, CONFIG)
        async with producer:
            for n in range(6):
                await producer.send(TOPIC, {"order": n, "amount": 10 * n}, key=f"customer-{n % 2}")
            assert await producer.flush() == []

        consumer = client.Consumer(cluster, auto_offset_reset="earliest")
        await consumer.assign_topic(TOPIC)
        orders = []
        while len(orders) < 6:
            for records in (await consumer.poll(timeout_ms=1000)).values():
                orders.extend(json.loads(record.value)["order"] for record in records)
        assert sorted(orders) == list(range(6)), orders
        print("read back", sorted(orders))


trio.run(main)
