import protocol


def test_batch_round_trip():
    batch = protocol.build_batch([(1000, b"k", b"v"), (1005, None, b"w")])
    records = protocol.decode_records(batch)
    assert [(r.offset, r.timestamp, r.key, r.value) for r in records] == [
        (0, 1000, b"k", b"v"),
        (1, 1005, None, b"w"),
    ]
