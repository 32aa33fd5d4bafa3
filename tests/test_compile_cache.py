"""stt_kernels' build in torch.compile's cache keys (stt_kernels/_compile_cache.py): a graph
compiled against one build is not served to another."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache
from torch.compiler import config as compiler_config

import stt_kernels
from stt_kernels import _compile_cache


@pytest.fixture
def restore_tag():
    tag = compiler_config.cache_key_tag
    yield
    compiler_config.cache_key_tag = tag


def _package(tmp_path, text="x = 1\n"):
    (tmp_path / "ops.py").write_text(text)
    (tmp_path / "__pycache__").mkdir(exist_ok=True)
    return tmp_path


def test_import_tags_the_caches_with_the_installed_build():
    assert f"stt_kernels-{_compile_cache.fingerprint()}" in compiler_config.cache_key_tag.split("+")
    assert stt_kernels.__version__  # the tag is set by the import itself, before any compile


def test_fingerprint_follows_sources_and_libraries_not_bytecode(tmp_path):
    root = _package(tmp_path)
    before = _compile_cache.fingerprint(root)
    (root / "__pycache__" / "ops.cpython-311.pyc").write_bytes(b"\0" * 10)
    assert _compile_cache.fingerprint(root) == before
    (root / "_C.so").write_bytes(b"\0" * 10)
    with_library = _compile_cache.fingerprint(root)
    assert with_library != before
    (root / "ops.py").write_text("x = 22\n")
    assert _compile_cache.fingerprint(root) != with_library


def test_a_user_tag_is_kept_and_ours_added_once(tmp_path, restore_tag):
    root = _package(tmp_path)
    compiler_config.cache_key_tag = "mine"
    first = _compile_cache.tag_compile_caches(root)
    assert first == f"mine+stt_kernels-{_compile_cache.fingerprint(root)}"
    assert _compile_cache.tag_compile_caches(root) == first


def test_another_build_misses_the_graph_this_one_cached(tmp_path, restore_tag):
    """What the tag is for: the same graph compiled under the next build's tag is a cache miss,
    under this build's a hit (torch's FX-graph cache, in a fresh cache folder)."""

    def hits_and_misses(tag):
        compiler_config.cache_key_tag = tag
        torch._dynamo.reset()
        counters.clear()
        torch.compile(lambda t: (t.sin() * 2).sum(-1))(torch.randn(5, 3))
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    root = _package(tmp_path)
    compiler_config.cache_key_tag = ""
    this_build = _compile_cache.tag_compile_caches(root)
    (root / "ops.py").write_text("x = 333\n")
    compiler_config.cache_key_tag = ""
    next_build = _compile_cache.tag_compile_caches(root)
    assert next_build != this_build
    try:
        with fresh_cache():
            assert hits_and_misses(this_build) == (0, 1)
            assert hits_and_misses(this_build) == (1, 0)
            assert hits_and_misses(next_build) == (0, 1)
    finally:
        torch._dynamo.reset()
