"""The release table, the downloader and the cache (releases.py).

All network traffic goes to a local server on 127.0.0.1 (see ckpt_fakes.FakeServer); a guard
fixture makes any other connection attempt fail the test.
"""
import hashlib
import socket
import threading

import pytest
import torch

import releases as rel
from ckpt_fakes import FakeServer


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch, tmp_path):
    """Fail on any connection that is not to 127.0.0.1, and isolate the cache and mirror."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] != "127.0.0.1":
            raise AssertionError(f"test tried to reach {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("FIBER_CACHE", str(tmp_path / "env_cache"))
    monkeypatch.delenv("FIBER_BASE_URL", raising=False)


@pytest.fixture
def server():
    srv = FakeServer().start()
    yield srv
    srv.stop()


def test_release_table_covers_the_published_files():
    coarse = ["fiber_pretrain", "fiber_coco_irtr_itc", "fiber_coco_irtr_itm",
              "fiber_f30k_irtr_itc", "fiber_f30k_irtr_itm", "fiber_vqa", "fiber_nlvr2",
              "fiber_coco_caption"]
    fine = ["fiber_coarse_then_fine", "fiber_coco", "fiber_lvis", "fiber_refcoco",
            "fiber_refcocoplus", "fiber_refcocog", "fiber_coarse_init"]
    assert set(coarse + fine) <= set(rel.RELEASES)
    assert all(rel.RELEASES[n].kind == "coarse" for n in coarse)
    assert all(rel.RELEASES[n].kind == "fine" for n in fine)
    assert rel.RELEASES["fiber_vqa"].url_path == "coarse_grained/fiber_vqa.ckpt"
    assert rel.RELEASES["fiber_refcocoplus"].url_path == "fine_grained/fiber_refcoco%2B.pth"
    assert rel.RELEASES["fiber_refcocoplus"].filename == "fiber_refcoco+.pth"
    assert rel.RELEASES["fiber_coarse_init"].url_path == "coarse_grained/fiber_coarse_init.pt"
    filenames = [r.filename for r in rel.RELEASES.values()]
    assert len(set(filenames)) == len(filenames)  # one cache directory holds them all


def fake_checkpoint_bytes(tmp_path, n=20000):
    path = tmp_path / "src.ckpt"
    torch.save({"state_dict": {"w": torch.arange(n, dtype=torch.float32)}, "epoch": 1}, path)
    return path.read_bytes()


@pytest.fixture
def vqa(server, tmp_path):
    """fiber_vqa served by the fake server; returns (bytes, cache dir)."""
    data = fake_checkpoint_bytes(tmp_path)
    server.files["/coarse_grained/fiber_vqa.ckpt"] = data
    return data, tmp_path / "cache"


def test_download_then_cached(server, vqa):
    data, cache = vqa
    path = rel.download("fiber_vqa", cache_dir=cache, base_url=server.url, progress=True)
    assert path == cache / "fiber_vqa.ckpt" and path.read_bytes() == data
    assert server.requests == [("/coarse_grained/fiber_vqa.ckpt", None)]
    assert rel.download("fiber_vqa", cache_dir=cache, base_url=server.url) == path
    assert len(server.requests) == 1  # served from the cache
    assert sorted(p.name for p in cache.iterdir()) == ["fiber_vqa.ckpt", "fiber_vqa.ckpt.lock"]


def test_interrupted_download_resumes_with_range(server, vqa):
    data, cache = vqa
    server.cuts, server.cut_after = 1, 5000
    path = rel.download("fiber_vqa", cache_dir=cache, base_url=server.url, progress=False)
    assert [r for _, r in server.requests] == [None, "bytes=5000-"]
    assert path.read_bytes() == data


def test_resume_across_calls(server, vqa):
    data, cache = vqa
    server.cuts, server.cut_after = 1, 7000
    with pytest.raises(rel.DownloadError) as info:
        rel.download("fiber_vqa", cache_dir=cache, base_url=server.url, progress=False,
                    retries=0)
    part = cache / "fiber_vqa.ckpt.part"
    assert part.stat().st_size == 7000 and str(part) in str(info.value)
    assert not (cache / "fiber_vqa.ckpt").exists()

    path = rel.download("fiber_vqa", cache_dir=cache, base_url=server.url, progress=False)
    assert server.requests[-1][1] == "bytes=7000-"
    assert path.read_bytes() == data and not part.exists()


def test_server_ignoring_range_restarts_from_zero(server, vqa):
    data, cache = vqa
    server.cuts, server.cut_after, server.ignore_range = 1, 3000, True
    path = rel.download("fiber_vqa", cache_dir=cache, base_url=server.url, progress=False)
    assert [r for _, r in server.requests] == [None, "bytes=3000-"]  # asked, got a 200
    assert path.read_bytes() == data


def test_complete_part_file_is_not_fetched_again(server, vqa):
    data, cache = vqa
    cache.mkdir()
    (cache / "fiber_vqa.ckpt.part").write_bytes(data)  # e.g. killed before the final rename
    path = rel.download("fiber_vqa", cache_dir=cache, base_url=server.url, progress=False)
    assert server.requests == [("/coarse_grained/fiber_vqa.ckpt", f"bytes={len(data)}-")]
    assert path.read_bytes() == data


def test_concurrent_downloads_of_one_file_fetch_it_once(server, vqa):
    # e.g. every DDP rank resolving the same release at start-up
    data, cache = vqa
    server.delay = 0.3
    results = []

    def fetch():
        results.append(rel.download("fiber_vqa", cache_dir=cache, base_url=server.url,
                                   progress=False))

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [cache / "fiber_vqa.ckpt"] * 3
    assert len(server.requests) == 1 and results[0].read_bytes() == data


def test_corrupted_download_is_detected_and_not_cached(server, vqa):
    data, cache = vqa
    server.corrupt_at = len(data) // 2  # inside the tensor bytes; the size stays right
    with pytest.raises(rel.DownloadError, match="CRC") as info:
        rel.download("fiber_vqa", cache_dir=cache, base_url=server.url, progress=False)
    target = cache / "fiber_vqa.ckpt"
    assert f"put it at:\n    {target}" in str(info.value)
    assert info.value.cache_path == target
    assert not target.exists() and not (cache / "fiber_vqa.ckpt.part").exists()


def test_refused_access_says_where_to_put_the_file(server, vqa):
    _, cache = vqa
    server.status = 403
    with pytest.raises(rel.DownloadError) as info:
        rel.download("fiber_vqa", cache_dir=cache, base_url=server.url, progress=False)
    message = str(info.value)
    assert "HTTP 403" in message and str(cache / "fiber_vqa.ckpt") in message
    assert "FIBER_BASE_URL" in message and "coarse_grained/fiber_vqa.ckpt" in message
    assert not (cache / "fiber_vqa.ckpt").exists()


def test_known_size_and_sha256_are_checked(server, tmp_path, monkeypatch):
    data = fake_checkpoint_bytes(tmp_path)
    server.files["/test/tiny.ckpt"] = data
    good = hashlib.sha256(data).hexdigest()
    for name, release_extra, error in [
        ("ok", {"sha256": good, "size": len(data)}, None),
        ("bad_sha", {"sha256": "0" * 64}, "sha256"),
        ("bad_size", {"size": len(data) + 1}, "bytes instead of"),
    ]:
        release = rel.Release(filename=f"{name}.ckpt", url_path="test/tiny.ckpt", kind="coarse",
                             description="test file", **release_extra)
        monkeypatch.setitem(rel.RELEASES, name, release)
        call = lambda: rel.download(name, cache_dir=tmp_path / "c", base_url=server.url,
                                   progress=False)
        if error is None:
            assert call().read_bytes() == data
        else:
            with pytest.raises(rel.DownloadError, match=error):
                call()
            assert not (tmp_path / "c" / f"{name}.ckpt").exists()


def test_environment_variables_choose_cache_and_mirror(server, vqa, monkeypatch, tmp_path):
    data, _ = vqa
    monkeypatch.setenv("FIBER_BASE_URL", server.url + "/")
    monkeypatch.setenv("FIBER_CACHE", str(tmp_path / "from_env"))
    path = rel.download("fiber_vqa", progress=False)
    assert path == tmp_path / "from_env" / "fiber_vqa.ckpt" and path.read_bytes() == data
    assert rel.cache_path("fiber_vqa") == path


def test_resolve_and_load_weights(server, vqa, tmp_path):
    data, cache = vqa
    local = tmp_path / "mine.pt"
    torch.save({"w": torch.ones(1)}, local)
    assert rel.resolve(local) == local
    state = rel.load_weights("fiber_vqa", cache_dir=cache, base_url=server.url,
                               progress=False)
    assert state.container == "lightning" and state.extra["epoch"] == 1
    assert torch.equal(state.tensors["w"], torch.arange(20000, dtype=torch.float32))
    url = f"{server.url}/coarse_grained/fiber_vqa.ckpt"
    assert rel.resolve(url, cache_dir=tmp_path / "by_url", progress=False).read_bytes() == data
    with pytest.raises(FileNotFoundError, match="fiber_pretrain"):
        rel.resolve("fiber_does_not_exist")
