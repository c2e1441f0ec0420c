"""Inputs are bounded (decision 0009): decompression bombs and server-side imaging caps.

Unit tests on real files; the limits are read from the environment where they apply.
"""
from __future__ import annotations

import gzip
import io
import os
import tarfile

import pytest

from almapipe import limits
from almapipe.errors import ParameterError
from almapipe.stages.base import StageError
from almapipe.stages.importdata import _unpack_input

FITS_HEAD = (b"SIMPLE  =                    T" + b" " * 50 + b"GROUPS  =                    T").ljust(2880, b" ")


def _bomb(path, n_mb: int, head: bytes = b"") -> str:
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(head)
        block = b"A" * (1 << 20)    # not zeros: a gzip of zeros reads as an empty tar
        for _ in range(n_mb):
            f.write(block)
    return str(path)


def test_a_gzip_bomb_stops_at_the_ratio(tmp_path, monkeypatch):
    monkeypatch.setenv("ALMAPIPE_MAX_UNPACK_RATIO", "50")
    path = _bomb(tmp_path / "bomb.gz", 40)       # ~40 kB that would become 40 MB (ratio ~1000)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(StageError, match="ALMAPIPE_MAX_UNPACK_RATIO") as e:
        _unpack_input(path, str(work))
    assert "bomb.gz" in str(e.value) and "50 times" in str(e.value)
    # nothing larger than the cap was left on disk
    assert sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(work) for f in fs) == 0
    assert not os.path.exists(path + ".raw")


def test_a_uvfits_gzip_bomb_stops_too(tmp_path, monkeypatch):
    monkeypatch.setenv("ALMAPIPE_MAX_UNPACK_RATIO", "1000000")
    monkeypatch.setenv("ALMAPIPE_MAX_UNPACKED_MB", "5")
    path = _bomb(tmp_path / "obs.uvfits.gz", 20, FITS_HEAD)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(StageError, match="ALMAPIPE_MAX_UNPACKED_MB") as e:
        _unpack_input(path, str(work))
    assert "more than 5 MB" in str(e.value)
    assert os.listdir(work) == []      # the partial gunzip was removed


def test_a_tar_declaring_too_much_is_refused_before_extracting(tmp_path, monkeypatch):
    monkeypatch.setenv("ALMAPIPE_MAX_UNPACKED_MB", "1")
    path = str(tmp_path / "x.tar")
    with tarfile.open(path, "w") as t:
        data = bytes(3 << 20)
        info = tarfile.TarInfo("x.ms/table.f1")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(StageError, match="ALMAPIPE_MAX_UNPACKED_MB"):
        _unpack_input(path, str(work))
    assert not os.listdir(work / "untar")


def test_real_data_is_well_inside_the_defaults():
    from conftest import NGC5921
    cap, _ = limits.unpack_cap(os.path.getsize(NGC5921), "x")
    assert cap > 30 * os.path.getsize(NGC5921)


def test_imaging_caps_name_the_parameter(monkeypatch):
    monkeypatch.setenv("ALMAPIPE_MAX_IMSIZE", "2048")
    monkeypatch.setenv("ALMAPIPE_MAX_IMAGE_CHANNELS", "1000")
    ok = {"stages": [{"stage": "makeimages", "params": {"cube": {"imsize": 256, "chans": "5~50"}}}]}
    limits.imaging_caps(ok)
    for params, word in (({"cube": {"max_imsize": 100000}}, "makeimages.cube.max_imsize"),
                         ({"calibrator": {"imsize": 4096}}, "makeimages.calibrator.imsize"),
                         ({"cube": {"chans": "0~5000"}}, "5001 channels"),
                         ({"cube": {"imsize": "big"}}, "not an integer")):
        with pytest.raises(ParameterError, match=word):
            limits.imaging_caps({"stages": [{"stage": "makeimages", "params": params}]})
