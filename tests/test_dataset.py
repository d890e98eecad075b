from workers.dataset import build_manifest, finalize, split_of
from workers.store import LocalStore


def row(label, ijn, pos, sha, status="stored", reason=None):
    r = {"label": label, "ijn": ijn, "position": pos, "url": f"http://h/{label}/{ijn}/{pos}", "status": status}
    if status == "stored":
        r.update(key=f"datasets/d/images/{label}/{sha}.jpg", sha256=sha, phash="0" * 16, width=100, height=80)
    else:
        r["reason"] = reason
    return r


def sha(n):
    return f"{n:064x}"


def test_within_class_duplicates_keep_the_first():
    rows = [row("a", 1, 3, sha(1)), row("a", 0, 5, sha(1)), row("a", 0, 6, sha(2))]
    manifest, dups = build_manifest(rows)
    assert [(m["url"], m["sha256"]) for m in manifest] == [("http://h/a/0/5", sha(1)), ("http://h/a/0/6", sha(2))]
    assert dups["within_class"] == 1 and dups["cross_class"] == 0


def test_cross_class_duplicate_is_dropped_from_both_and_reported():
    rows = [row("a", 0, 1, sha(7)), row("b", 0, 2, sha(7)), row("a", 0, 3, sha(8)), row("b", 0, 4, sha(9))]
    manifest, dups = build_manifest(rows)
    assert sorted(m["sha256"] for m in manifest) == [sha(8), sha(9)]
    assert dups["cross_class"] == 2
    assert dups["cross_class_images"] == [{"sha256": sha(7), "labels": ["a", "b"]}]


def test_split_is_deterministic_from_content_hash():
    assert split_of("00000000" + "f" * 56, 20) == "val"      # 0 % 100 < 20
    assert split_of(f"{99:08x}" + "0" * 56, 20) == "train"    # 99 % 100 >= 20
    hashes = [f"{i * 2654435761 % 2**32:08x}" + "0" * 56 for i in range(2000)]
    val = sum(split_of(h, 20) == "val" for h in hashes)
    assert 300 < val < 500  # about 20 %


def test_finalize_writes_manifest_and_report(tmp_path):
    store = LocalStore(tmp_path)
    store.put_jsonl("datasets/d/pages/a/0.jsonl", [row("a", 0, 1, sha(1)), row("a", 0, 2, sha(1)),
                                                   row("a", 0, 3, None, "rejected", "html"),
                                                   row("a", 0, 4, None, "rejected", "http_error")])
    store.put_jsonl("datasets/d/pages/b/0.jsonl", [row("b", 0, 1, sha(2)), row("b", 0, 2, sha(3))])
    store.put_jsonl("datasets/d/pages/c/0.jsonl", [])
    report = finalize(store, "d", labels=["a", "b", "c"], pages_expected=3)
    assert report["classes"] == {"a": 1, "b": 2, "c": 0}
    assert report["rejected"] == {"html": 1, "http_error": 1}
    assert report["duplicates_removed"] == 1
    assert report["empty_classes"] == ["c"]
    assert report["pages"]["with_shard"] == 3
    assert store.get_json("datasets/d/report.json") == report
    manifest = store.get_jsonl("datasets/d/manifest.jsonl")
    assert {m["sha256"] for m in manifest} == {sha(1), sha(2), sha(3)}
    assert all(m["split"] in ("train", "val") for m in manifest)
