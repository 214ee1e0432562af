"""storage: URIs, atomic local writes, listing, and clear preflight errors against a real S3."""

import socket

import pytest

from harma import storage


def test_local_round_trip_and_listing(tmp_path):
    storage.write_bytes(tmp_path / "a" / "b.bin", b"xyz")
    assert storage.read_bytes(tmp_path / "a" / "b.bin") == b"xyz"
    assert storage.list_files(tmp_path, ".bin") == [str(tmp_path / "a" / "b.bin")]
    assert not list((tmp_path / "a").glob("*.tmp-*"))
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes(tmp_path / "missing")


def test_join():
    assert storage.join("s3://b/p/", "x", "y.json") == "s3://b/p/x/y.json"


def test_preflight_local(tmp_path):
    storage.preflight(tmp_path)
    with pytest.raises(storage.StorageError, match="no such file or folder"):
        storage.preflight(tmp_path / "nope")
    storage.preflight(tmp_path / "new", write=True)
    assert (tmp_path / "new").is_dir()


def test_preflight_s3_errors(s3_server, monkeypatch):
    s3_server.create_bucket("present")
    storage.preflight("s3://present/prefix")
    with pytest.raises(storage.StorageError, match="bucket 'absent' does not exist"):
        storage.preflight("s3://absent/prefix")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(storage.StorageError, match="credentials were rejected"):
        storage.preflight("s3://present/prefix")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    with pytest.raises(storage.StorageError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{dead}"):
        storage.preflight("s3://present/prefix")


def test_secrets_never_appear_in_errors(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "super-secret-value")
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes("s3://present/x")
    assert "super-secret-value" not in str(err.value)


def test_ray_storage_and_paths_ray_reports(tmp_path, s3_server):
    path, fs = storage.ray_storage(tmp_path / "runs")
    assert path == str(tmp_path / "runs") and fs is None  # Ray's default local filesystem
    path, fs = storage.ray_storage("s3://bucket/runs")
    assert path == "bucket/runs" and fs is not None
    assert storage.from_ray_path("bucket/runs/ckpt", "s3://bucket/runs") == "s3://bucket/runs/ckpt"
    assert storage.from_ray_path("/abs/runs/ckpt", tmp_path) == "/abs/runs/ckpt"


def _base(where: str, tmp_path, request, bucket: str) -> str:
    """A folder URI: `tmp_path`, or a fresh bucket on the tests' S3 server."""
    if where == "s3":
        request.getfixturevalue("s3_server").create_bucket(bucket)
        return f"s3://{bucket}/k"
    return str(tmp_path)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_size_and_read_head(where, tmp_path, request):
    base = _base(where, tmp_path, request, "heads")
    uri = storage.join(base, "f.bin")
    storage.write_bytes(uri, bytes(range(200)))
    assert storage.size(uri) == 200
    assert storage.read_head(uri, 5) == bytes(range(5))
    assert storage.read_head(uri, 1000) == bytes(range(200))
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.size(storage.join(base, "missing.bin"))
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_head(storage.join(base, "missing.bin"), 8)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_table_reads_a_parquet_file_by_uri(where, tmp_path, request):
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = _base(where, tmp_path, request, "tables")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": [3, 1, 2], "caption": ["a", "b", "c"]}), buf)
    uri = storage.join(base, "t.parquet")
    storage.write_bytes(uri, buf.getvalue().to_pybytes())
    assert storage.read_table(uri).to_pydict() == {"id": [3, 1, 2], "caption": ["a", "b", "c"]}
    assert storage.read_table(uri, columns=["caption"]).to_pydict() == {"caption": ["a", "b", "c"]}
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_table(storage.join(base, "missing.parquet"))
