import pytest

from kiln.tasks.core.cache import StageCache, code_version, make_key


def test_result_is_persisted_and_reused(tmp_path):
    cache, calls = StageCache(tmp_path), []

    def work(folder):
        calls.append(folder)
        (folder / "out.txt").write_text("done")
        return {"path": "out.txt"}

    first, hit1 = cache.run("k", work)
    second, hit2 = StageCache(tmp_path).run("k", work)  # a new process sees the same folder
    assert (hit1, hit2) == (False, True) and first == second and len(calls) == 1
    assert (cache.folder("k") / "out.txt").read_text() == "done"


def test_a_killed_stage_leaves_nothing_that_looks_finished(tmp_path):
    cache = StageCache(tmp_path)

    def dies(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.run("k", dies)
    assert cache.get("k") is None and not (tmp_path / "k").exists()
    # The next attempt gets the same work folder back, so a checkpointing stage can resume.
    result, hit = cache.run("k", lambda folder: {"resumed": (folder / "half.bin").exists()})
    assert result == {"resumed": True} and not hit
    assert not (tmp_path / ".k.partial").exists()


def test_keys_change_with_any_input():
    base = make_key("model/1", "digest", {"p": 1}, "code")
    assert base == make_key("model/1", "digest", {"p": 1}, "code")
    assert len({base, make_key("model/2", "digest", {"p": 1}, "code"), make_key("model/1", "digest", {"p": 2},
                "code"), make_key("model/1", "digest", {"p": 1}, "code2")}) == 4


def test_code_version_tracks_the_module_source():
    from kiln.tasks.compress import recipes
    from kiln.tasks.compress.quantization import dynamic as quantize

    assert code_version(quantize.int8_dynamic) != code_version(recipes.export_stage)
    assert code_version(quantize.int8_dynamic).startswith("0.")
