import pytest

from workers.store import NotFound, check_key, open_store, LocalStore


def test_roundtrip_bytes_and_json(store):
    store.put_bytes("datasets/d/images/a/x.jpg", b"\xff\xd8abc", "image/jpeg")
    assert store.get_bytes("datasets/d/images/a/x.jpg") == b"\xff\xd8abc"
    store.put_json("datasets/d/report.json", {"classes": {"a": 3}})
    assert store.get_json("datasets/d/report.json") == {"classes": {"a": 3}}
    assert store.exists("datasets/d/report.json")
    assert not store.exists("datasets/d/missing.json")


def test_overwrite_is_idempotent(store):
    store.put_bytes("k/a", b"1")
    store.put_bytes("k/a", b"2")
    assert store.get_bytes("k/a") == b"2"
    assert store.list("k/") == ["k/a"]


def test_list_by_prefix_sorted_and_scoped(store):
    for key in ["p/b/2.jsonl", "p/a/1.jsonl", "p/a/0.jsonl", "q/a/0.jsonl"]:
        store.put_bytes(key, b"x")
    assert store.list("p/") == ["p/a/0.jsonl", "p/a/1.jsonl", "p/b/2.jsonl"]
    assert store.list("p/a/") == ["p/a/0.jsonl", "p/a/1.jsonl"]
    assert store.list("none/") == []


def test_jsonl_roundtrip(store):
    rows = [{"a": 1}, {"b": [1, 2]}]
    store.put_jsonl("x/rows.jsonl", rows)
    assert store.get_jsonl("x/rows.jsonl") == rows
    store.put_jsonl("x/empty.jsonl", [])
    assert store.get_jsonl("x/empty.jsonl") == []


def test_missing_key_raises_notfound_and_default(store):
    with pytest.raises(NotFound):
        store.get_bytes("nope/x")
    assert store.get_json_or("nope/x.json", {"d": 1}) == {"d": 1}


def test_a_folder_removed_under_a_local_store_is_made_again(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("datasets/d/images/a/1.jpg", b"1")
    import shutil

    shutil.rmtree(tmp_path / "store" / "datasets")  # e.g. a dataset deleted by hand while workers run
    store.put_bytes("datasets/d/images/a/2.jpg", b"2")
    assert store.list("datasets/") == ["datasets/d/images/a/2.jpg"]
    assert [p.name for p in (tmp_path / "store" / "datasets/d/images/a").iterdir()] == ["2.jpg"]  # no temp file left


def test_delete(store):
    store.put_bytes("d/x", b"1")
    store.delete("d/x")
    assert not store.exists("d/x")


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../../b", "a//b", "a/./b", "", "a b", "a\\b", "a/"])
def test_keys_outside_the_store_are_refused(store, key):
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")


def test_check_key_accepts_layout_keys():
    assert check_key("datasets/dog-1a2b/images/boston-terrier/ab12.jpg")


def test_open_store_picks_implementation(tmp_path, s3_endpoint, monkeypatch):
    assert isinstance(open_store(str(tmp_path / "s")), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}/s2"), LocalStore)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    s3 = open_store("s3://open-store-test/pre")
    s3.put_bytes("a", b"1")
    assert s3.get_bytes("a") == b"1"
    assert s3.url == "s3://open-store-test/pre/"
    with pytest.raises(ValueError, match="no bucket"):
        open_store("s3:///x")
    with pytest.raises(ValueError, match="unsupported"):
        open_store("ftp://x/y")
