"""The test object store itself: its capacity must not depend on the machine's free disk."""

import json
import urllib.request

from harma import storage
from s3server import VOLUME_SLOTS


def test_volume_slots_are_fixed_not_sized_from_free_disk(s3_server):
    # `weed mini` sizes its volume count from free disk unless told; CI machines with a few GiB free
    # then ran out of volumes after six buckets (each bucket takes one).
    status = json.load(urllib.request.urlopen(f"{s3_server.master}/dir/status", timeout=5))
    assert status["Topology"]["Max"] == VOLUME_SLOTS


def test_many_buckets_each_take_writes(s3_server):
    # More buckets than the whole test session makes, each written and read back.
    for i in range(16):
        bucket = f"slots-{i:02d}"
        s3_server.create_bucket(bucket)
        storage.write_bytes(f"s3://{bucket}/k/obj.bin", bytes([i]) * 70_000)
        assert storage.read_bytes(f"s3://{bucket}/k/obj.bin") == bytes([i]) * 70_000
