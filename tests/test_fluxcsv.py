"""flux.csv in ALMA's columns (and almapipe's earlier form): reading, writing, models."""
import numpy as np
import pytest

from almapipe.calibration import fluxcsv

ALMA = """ms,field,spw,I,Q,U,V,spix,uvmin,uvmax,comment
uid___A002_X1_X2.ms,J1924-2914,17,3.100000,0.0,0.0,0.0,-0.6,0.0,0.0,"catalogue, 2026-04-30"
uid___A002_X1_X2.ms,J1924-2914,19,3.000000,0.0,0.0,0.0,-0.6,0.0,0.0,catalogue
uid___A002_X1_X2.ms,J1924-2914,25,9.9,0.0,0.0,0.0,-0.6,0.0,0.0,a spw this EB does not have
uid___A002_X9_X9.ms,J1924-2914,17,5.0,0.0,0.0,0.0,-0.6,0.0,0.0,another EB of the MOUS
"""
OLD_ALMA = "ms,field,spw,I,Q,U,V,spix,comment\nx.ms,J1924-2914,17,3.1,0,0,0,-0.6,old file\n"


def test_alma_columns_per_ms_field_and_spw():
    freqs = {17: 230e9, 19: 232e9}
    m = fluxcsv.parse(ALMA, freqs, "uid___A002_X1_X2")["J1924-2914"]
    assert m["spw_fluxes"] == [[230e9, 3.1, -0.6], [232e9, 3.0, -0.6]]
    # each spw gets its own row's flux at its centre, with the row's spectral index around it
    np.testing.assert_allclose(fluxcsv.model_flux(m, np.array([230e9, 232e9])), [3.1, 3.0])
    assert fluxcsv.model_flux(m, 230.5e9) == pytest.approx(3.1 * (230.5 / 230.0) ** -0.6)
    # the rows of another EB of the MOUS are used only when none name this one
    assert fluxcsv.parse(ALMA, freqs, "uid___A002_X9_X9")["J1924-2914"]["spw_fluxes"] == [[230e9, 5.0, -0.6]]
    assert fluxcsv.parse(OLD_ALMA, freqs, "other")["J1924-2914"]["spw_fluxes"] == [[230e9, 3.1, -0.6]]


def test_earlier_form_and_bad_files_are_named():
    m = fluxcsv.parse("field,freq_hz,flux_jy,spix,comment\nJ1,230e9,2.0,-0.5,x\n", {}, None)["J1"]
    assert fluxcsv.model_flux(m, 460e9) == pytest.approx(2.0 * 2 ** -0.5)
    with pytest.raises(fluxcsv.FluxCsvError, match="line 2"):
        fluxcsv.parse("ms,field,spw,I,Q,U,V,spix\nx.ms,J1,17,bright,0,0,0,0\n", {17: 1e11}, None)
    with pytest.raises(fluxcsv.FluxCsvError, match="neither ALMA"):
        fluxcsv.parse("name,jansky\nJ1,2\n", {}, None)


def test_written_flux_csv_reads_back():
    text = fluxcsv.write([{"field": "J1832-2039", "spw": 17, "flux_jy": 0.81, "spix": -0.4, "comment": "fluxscale"}],
                         "eb1")
    assert text.splitlines()[0] == ",".join(fluxcsv.ALMA_COLUMNS)
    m = fluxcsv.parse(text, {17: 230e9}, "eb1")["J1832-2039"]
    assert m["spw_fluxes"] == [[230e9, 0.81, -0.4]]
