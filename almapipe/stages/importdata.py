"""importdata (importer service): ingest, partition by spw, summarise, assign roles."""
from __future__ import annotations

import os
import shutil
import tarfile

import casacore.tables as ct

from .base import QA, Param, StageError, StageIO, stage
from .. import limits
from ..msio import listobs, ms as msio, uvfits


# Files an input tar may carry beside the MS, as ALMA's pipeline finds them in
# its working directory; each lands in the context's user inputs.
SIDECARS = {"antennapos.csv": "antennapos", "flagtemplate.txt": "flag_template", "cont.dat": "cont_dat",
            "flux.csv": "flux_csv", "flagtargetstemplate.txt": "flagtargets_template"}


def _unpack_input(path: str, workdir: str, packed_size: int = 0) -> tuple[str, str]:
    """Return (ms_path, input_format) for an MS tar or a UVFITS file. Unpacking stops at
    the limits of almapipe/limits.py (decompression bombs), with an error naming them."""
    name = os.path.basename(path)
    if uvfits.is_uvfits(path):
        ms_path = os.path.join(workdir, "input.ms")
        try:
            uvfits.uvfits_to_ms(path, ms_path)
        except limits.UnpackLimit as exc:
            raise StageError(f"importdata: {name}: {exc}") from None
        except msio.MSError as exc:
            raise StageError(f"importdata: {name}: {exc}") from exc
        return ms_path, "UVFITS"
    if tarfile.is_tarfile(path):
        dest = os.path.join(workdir, "untar")
        os.makedirs(dest, exist_ok=True)    # an empty tar extracts nothing: say so below
        with tarfile.open(path) as tar:
            try:   # the members' sizes, before anything lands on disk
                limits.check_tar(tar, packed_size or os.path.getsize(path), f"importdata: {name}")
            except limits.UnpackLimit as exc:
                raise StageError(str(exc)) from None
            tar.extractall(dest, filter="data")
        tops = [d for d in os.listdir(dest) if os.path.isdir(os.path.join(dest, d))]
        if len(tops) != 1:
            raise StageError(f"importdata: {name}: a tar must hold exactly one MS directory (and optionally "
                             f"{', '.join(SIDECARS)}), found {tops}")
        ms_path = os.path.join(dest, tops[0])
        try:
            msio.check_ms(ms_path)
        except msio.MSError as exc:
            raise StageError(f"importdata: {name}: {exc}") from exc
        return ms_path, "MeasurementSet"
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:2] == b"\x1f\x8b":   # a gzip of something that is not UVFITS: maybe a .tar.gz
        raw = path + ".raw"
        try:
            limits.gunzip_bounded(path, raw, f"importdata: {name}")
        except limits.UnpackLimit as exc:
            os.unlink(raw)
            raise StageError(str(exc)) from None
        if tarfile.is_tarfile(raw):
            # the tar's ratio counts from the gzip that arrived, not from the gunzipped tar
            return _unpack_input(raw, workdir, packed_size=os.path.getsize(path))
    raise StageError(f"importdata: {name} is neither a MeasurementSet (as a tar of its directory) "
                     f"nor a UVFITS file (first bytes {head[:16]!r})")


def _partition(ms_path: str, workdir: str, basename: str, spws: list) -> list:
    """One MS per spectral window of `spws` (the unit of fan-out for later stages);
    the subtables (SYSCAL, FLAG_CMD...) go with each."""
    spw_of = msio.spw_of_ddid(ms_path)
    if set(spw_of.values()) == set(spws) and len(spws) == 1:
        dest = os.path.join(workdir, f"{basename}.spw{spws[0]}.ms")
        shutil.move(ms_path, dest)
        return [(spws[0], dest)]
    out = []
    with ct.table(ms_path, ack=False) as t:
        for s in spws:
            dd = [d for d, sp in spw_of.items() if sp == s]
            dest = os.path.join(workdir, f"{basename}.spw{s}.ms")
            sel = t.query(f"DATA_DESC_ID IN {dd}")
            sel.copy(dest, deep=True).close()
            sel.close()
            out.append((s, dest))
    return out


@stage("importdata", service="importer", topic="Data set", reads=("input_key", "user"),
       writes=("user", "observation", "fields", "partitions", "aux_partitions", "ms_name", "input_format"), params=(
           Param("field_roles", dict, None, "intents by field name ({\"3C286\": \"FLUX,BANDPASS\"}); "
                 "none: the scan intents, else heuristics"),
           Param("name", str, "", "the MS's base name; empty: the input's")))
def importdata(ctx: dict, params: dict, io: StageIO) -> QA:
    qa = QA()
    local = io.fetch_raw(ctx["input_key"])
    ms_path, fmt = _unpack_input(local, io.workdir)
    io.log("input %s read as %s", os.path.basename(local), fmt)
    for fname, key in SIDECARS.items():
        side = os.path.join(os.path.dirname(ms_path), fname)
        if os.path.exists(side) and not ctx["user"].get(key):
            with open(side) as f:
                ctx["user"][key] = f.read()
            qa.note(f"Found {fname} beside the MS.")
    obs = listobs.summary(ms_path)
    try:
        fields = listobs.assign_roles(obs, params["field_roles"])
    except ValueError as exc:
        raise StageError(f"importdata: {exc}") from exc
    basename = params["name"] or os.path.basename(ctx["input_key"]).split(".")[0]
    science = obs["science_spws"]
    if not science:
        kinds = ", ".join(f"{s['id']} ({s['kind']})" for s in obs["spws"])
        raise StageError(f"importdata: no science spectral window in the data (spws: {kinds})")
    wvr = [s["id"] for s in obs["spws"] if s["kind"] == "wvr" and s["id"] in
           {sid for sc in obs["scans"] for sid in sc["spws"]}]
    parts, aux = [], {}
    for spw, path in _partition(ms_path, io.workdir, basename, science + wvr[:1]):
        with ct.table(path, ack=False) as t:
            nvis = int(t.nrows())
        entry = io.put_dir(path, os.path.basename(path))
        part = {"spw": int(spw), "key": entry["key"], "sha256": entry["sha256"], "name": os.path.basename(path),
                "nrows": nvis}
        if spw in science:
            parts.append(part)
        else:
            aux["wvr"] = part
        io.visibilities += nvis
    ctx.update(partitions=parts, observation=obs, fields=fields, ms_name=basename, input_format=fmt)
    if aux:
        ctx["aux_partitions"] = aux
    others = [s for s in obs["spws"] if s["kind"] != "science"]
    if others:
        qa.note("Science spws " + ", ".join(map(str, science)) + "; not science data: " +
                ", ".join(f"{s['id']} ({s['kind']})" for s in others) + ".")
    roles_from = fields[0]["roles_from"] if fields else ""
    for f in fields:
        io.log("field %s: %s", f["name"], ",".join(f["intents"]) or "no intent")
    if roles_from.startswith("heuristic"):
        qa.lower(0.8, "No scan intents in the data: field roles were inferred from calibrator names "
                      "and the scan pattern; check them, or give field_roles.")
    else:
        qa.note(f"Field roles from the {roles_from}.")
    missing = {"BANDPASS", "PHASE", "TARGET"} - {i for f in fields for i in f["intents"]}
    if missing:
        qa.lower(0.5, f"No field with intent(s) {', '.join(sorted(missing))}.")
    nant_data = sum(a["has_data"] for a in obs["antennas"])
    qa.note(f"{fmt}: {obs['nrows']} rows, {len(obs['scans'])} scans, {len(obs['fields'])} fields, "
            f"{len(obs['spws'])} spw(s), {nant_data} antennas with data.")
    return qa
