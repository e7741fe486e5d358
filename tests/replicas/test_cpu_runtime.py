"""tune_malloc: glibc's mallopt once per process, a no-op elsewhere."""

import ctypes.util
import platform

import pytest

from lorafleet.replicas import cpu_runtime


@pytest.mark.skipif(platform.system() != "Linux" or "musl" in (ctypes.util.find_library("c") or ""),
                    reason="glibc only")
def test_tunes_glibc_once():
    assert cpu_runtime.tune_malloc() is True
    assert cpu_runtime.tune_malloc() is True   # idempotent: the second call only reads the flag


def test_without_mallopt_it_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setattr(cpu_runtime, "_is_tuned", None)
    monkeypatch.setattr(cpu_runtime.ctypes, "CDLL", lambda name: object())   # a C library without mallopt
    assert cpu_runtime.tune_malloc() is False
