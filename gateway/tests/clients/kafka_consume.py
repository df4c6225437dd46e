#!/usr/bin/env python3
"""Reads a whole Kafka topic from the beginning with kafka-python (a client nobody on this
project wrote) and prints one JSON object per record on stdout:

    {"partition": 0, "offset": 0, "key": "dev-a", "value": "...", "timestamp": 1700000000000,
     "headers": {"device_id": "dev-a", ...}, "murmur2_partition": 0}

`murmur2_partition` is kafka-python's own murmur2 of the key modulo the topic's partition count
(the Java default partitioner), an independent check of the gateway's choice.

Used by gateway/tests/uplink_kafka.rs. Reads until at least --expect records arrived and then
500 ms passed without another (so extra records, e.g. duplicates, are printed too). Exits 0
then, 1 if --expect records did not arrive within --timeout seconds (printing what did arrive),
2 on other errors.
Needs kafka-python 3.x (`pip install 'kafka-python>=3'`); Debian's kcat does not work with tansu.
"""

import argparse
import json
import sys
import time

from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2


def text(b):
    if b is None:
        return None
    return b.decode("utf-8", errors="replace")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--expect", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args()

    consumer = KafkaConsumer(
        bootstrap_servers=a.bootstrap,
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
        consumer_timeout_ms=500,
        request_timeout_ms=10000,
    )
    deadline = time.monotonic() + a.timeout
    partitions = None
    while partitions is None:
        partitions = consumer.partitions_for_topic(a.topic)
        if partitions is None:
            if time.monotonic() > deadline:
                print(f"topic {a.topic} not found", file=sys.stderr)
                return 2
            time.sleep(0.2)
    count = len(partitions)
    tps = [TopicPartition(a.topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)

    got = 0
    # The iterator ends after 500 ms without records: read on until at least --expect arrived,
    # then stop at the first quiet spell (so duplicates beyond --expect are seen too).
    while got < a.expect and time.monotonic() < deadline:
        for m in consumer:
            key = m.key
            out = {
                "partition": m.partition,
                "offset": m.offset,
                "key": text(key),
                "value": text(m.value),
                "timestamp": m.timestamp,
                "headers": {k: text(v) for k, v in (m.headers or [])},
                "murmur2_partition": (
                    (murmur2(key) & 0x7FFFFFFF) % count if key is not None else None
                ),
            }
            print(json.dumps(out), flush=True)
            got += 1
    consumer.close()
    if got < a.expect:
        print(f"only {got} of {a.expect} records within {a.timeout} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
