"""The MS at the edges of the visibility store: streaming an MS in, exporting one out.

The MS stays the boundary format (decision 0015): importdata streams each spectral
window of the input MS into the store's arrays in row blocks (never the whole EB in
memory), keeps the subtables as an MS *shell* (the MS without rows), and exportdata
writes a CASA-readable MS back: the shell plus the rows of the store's arrays.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import casacore.tables as ct

from . import ms as msio
from ..platform import visstore as vst


def make_shell(ms_path: str, dest: str) -> str:
    """The MS's subtables and main-table description, with no rows."""
    with ct.table(ms_path, ack=False) as t:
        empty = t.selectrows([])
        empty.copy(dest, deep=True).close()
        empty.close()
    # a copy of the table keeps the subtables its keywords name, not what else lives in
    # their directories: CASA's ephemeris tables (FIELD/EPHEM<id>_*.tab), for one
    for name in os.listdir(ms_path):
        src, dst = os.path.join(ms_path, name), os.path.join(dest, name)
        if os.path.isdir(src) and os.path.isdir(dst):
            for extra in os.listdir(src):
                if not os.path.exists(os.path.join(dst, extra)):
                    copy = shutil.copytree if os.path.isdir(os.path.join(src, extra)) else shutil.copy2
                    copy(os.path.join(src, extra), os.path.join(dst, extra))
    return dest


def ingest_spw(vs: vst.VisStore, ms_path: str, spw: int, prefix: str, tag: str, meta_key: str,
               name: str) -> dict:
    """Stream one spectral window of an MS into the store (rows sorted by time and
    baseline, FLAG_ROW folded into FLAG); returns the partition's entry."""
    q = msio.spw_rows_query(ms_path, spw)
    corr = msio.corr_types_of_spw(ms_path, spw)
    with msio.subtable(ms_path, "SPECTRAL_WINDOW") as t:
        nchan = int(t.getcell("NUM_CHAN", spw))
    ncorr = len(corr)
    rows_chunk, chan_chunk = vst.chunking(nchan, ncorr)
    with ct.table(ms_path, ack=False) as t:
        sel = t.query(q, sortlist="TIME,ANTENNA1,ANTENNA2")
        n = int(sel.nrows())
        cols = set(sel.colnames())
        arrays, zs = {}, {}

        def new(array, shape, chunks, dtype):
            key = f"{prefix}/{array}/{tag}"
            zs[array] = vs.create(key, shape, chunks, dtype)
            arrays[array] = key

        new("VISIBILITY", (n, nchan, ncorr), (rows_chunk, chan_chunk, ncorr), "complex64")
        new("FLAG", (n, nchan, ncorr), (rows_chunk, chan_chunk, ncorr), "bool")
        for col, (array, dtype, trail) in vst.ROW_ARRAYS.items():
            if col in cols:
                trail = ncorr if trail == "ncorr" else trail
                new(array, (n, trail), (rows_chunk, trail), dtype)
        index_cols = [c for c in vst.INDEX_ARRAYS if c in cols]
        for col in index_cols:
            array, dtype = vst.INDEX_ARRAYS[col]
            new(array, (n,), (rows_chunk * vst.INDEX_FACTOR,), dtype)
        missing = {"TIME", "ANTENNA1", "ANTENNA2", "FIELD_ID", "UVW", "WEIGHT"} - cols
        if missing:
            raise msio.MSError(f"{ms_path}: main table lacks {sorted(missing)}")
        big = rows_chunk * vst.INDEX_FACTOR
        zero_rows = []         # rows holding an exactly zero visibility: flagdata reads only these
        for start in range(0, n, big):
            nr = min(big, n - start)
            for col in index_cols:
                zs[vst.INDEX_ARRAYS[col][0]][start:start + nr] = sel.getcol(col, startrow=start, nrow=nr)
            for s in range(start, start + nr, rows_chunk):
                m = min(rows_chunk, start + nr - s)
                flag = sel.getcol("FLAG", startrow=s, nrow=m)
                flag_row = sel.getcol("FLAG_ROW", startrow=s, nrow=m) if "FLAG_ROW" in cols else None
                if flag_row is not None and flag_row.any():
                    flag |= flag_row[:, None, None]
                zs["FLAG"][s:s + m] = flag
                data = sel.getcol("DATA", startrow=s, nrow=m).astype(np.complex64, copy=False)
                zs["VISIBILITY"][s:s + m] = data
                zero_rows.append(s + np.flatnonzero((data == 0).any(axis=(1, 2))))
                for col, (array, dtype, _) in vst.ROW_ARRAYS.items():
                    if col in cols:
                        zs[array][s:s + m] = sel.getcol(col, startrow=s, nrow=m).astype(dtype, copy=False)
        sel.close()
        zero_rows = np.concatenate(zero_rows) if zero_rows else np.zeros(0, np.int64)
        new(vst.ZERO_ROWS, (len(zero_rows),), (max(len(zero_rows), 1),), "int64")
        if len(zero_rows):
            zs[vst.ZERO_ROWS][:] = zero_rows
    return {"name": name, "spw": int(spw), "meta": meta_key, "nrow": n, "nrows": n, "nchan": nchan,
            "ncorr": ncorr, "corr_types": corr, "chunks": [rows_chunk, chan_chunk], "arrays": arrays,
            "zero_rows_of": arrays["VISIBILITY"]}


def ingest_spw_job(cfg, ms_path: str, spw: int, prefix: str, tag: str, meta_key: str, name: str) -> tuple:
    """ingest_spw in a process of its own (spws in parallel): (entry, bytes written)."""
    from ..platform import memory
    memory.tune_malloc()            # its row blocks reuse one heap, as a worker's do
    vs = vst.VisStore(cfg, cache_dir=None, cache_limit=0)
    entry = ingest_spw(vs, ms_path, spw, prefix, tag, meta_key, name)
    return entry, vs.counter.s3_written


def export_ms(parts: list, shell_path: str, dest: str, open_part, corrected: bool = True) -> str:
    """Write a CASA-readable MS at dest: the shell's subtables and the rows of the
    partitions (DATA, CORRECTED_DATA where the store has it, FLAG, WEIGHT...), streamed
    in row blocks. `open_part(entry)` gives a VisPartition."""
    if os.path.exists(dest):
        shutil.rmtree(dest)
    with ct.table(shell_path, ack=False) as t:
        t.copy(dest, deep=True).close()
    with ct.table(dest, readonly=False, ack=False) as t:
        want_corrected = corrected and any(vst.has_corrected(p) for p in parts)
        # columns of the input MS that the store does not keep: left in, the new rows'
        # cells would be undefined (CASA fails reading them); CASA falls back to WEIGHT
        # and SIGMA without the spectra, and a split MS has no CORRECTED_DATA
        stale = ["MODEL_DATA", "WEIGHT_SPECTRUM", "SIGMA_SPECTRUM"] + ([] if want_corrected else ["CORRECTED_DATA"])
        stale = [c for c in stale if c in t.colnames()]
        if stale:
            t.removecols(stale)
        if want_corrected and "CORRECTED_DATA" not in t.colnames():
            desc = t.getcoldesc("DATA")
            desc["comment"] = "CORRECTED_DATA written by almapipe"
            dminfo = t.getdminfo("DATA")
            dminfo["NAME"] = "CorrectedData"
            t.addcols(ct.maketabdesc(ct.makecoldesc("CORRECTED_DATA", desc)), dminfo)
        dd_of = {s: d for d, s in sorted(msio.spw_of_ddid(dest).items(), reverse=True)}
        for entry in parts:
            part = open_part(entry)
            ddid = dd_of.get(entry["spw"])
            if ddid is None:
                raise msio.MSError(f"{dest}: the shell has no data description for spw {entry['spw']}")
            rows_all = part.select()
            for lo in range(0, len(rows_all), part.chunk_rows):
                rows = rows_all[lo:lo + part.chunk_rows]
                start = t.nrows()
                t.addrows(len(rows))
                t.putcol("DATA_DESC_ID", np.full(len(rows), ddid, np.int32), startrow=start)
                for col in vst.INDEX_ARRAYS:
                    if vst.INDEX_ARRAYS[col][0] in entry["arrays"]:
                        t.putcol(col, part.index(col)[rows], startrow=start)
                for col in vst.ROW_ARRAYS:
                    if vst.ROW_ARRAYS[col][0] in entry["arrays"]:
                        t.putcol(col, part.rows_of(col, rows), startrow=start)
                flag = part.rows_of("FLAG", rows)
                t.putcol("FLAG", flag, startrow=start)
                t.putcol("FLAG_ROW", flag.all(axis=(1, 2)), startrow=start)
                t.putcol("DATA", part.rows_of("DATA", rows), startrow=start)
                if want_corrected:
                    col = "CORRECTED_DATA" if part.has("CORRECTED_DATA") else "DATA"
                    t.putcol("CORRECTED_DATA", part.rows_of(col, rows), startrow=start)
    return dest
