"""Without matplotlib (a stock 3D Slicer ships none, and the module does not install it) every output path completes:
report.png is skipped and parameters.json records it, in the command line's / panel's write_outputs and in the
headless batch script."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from TumorPersonalizationLib.geometry import Geometry, Volume
from TumorPersonalizationLib.pipeline import write_outputs
from TumorPersonalizationLib.figures import REPORT_SKIPPED
from TumorPersonalizationLib.tissue import Tissue


def _stand_in_result():
    geometry = Geometry((6, 7, 8), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    concentration = np.zeros(geometry.shape_kji, np.float32)
    concentration[2:4, 3:5, 3:6] = 0.8
    plans = SimpleNamespace(standard=(concentration > 0).astype(np.uint8), model=(concentration > 0.5).astype(np.uint8),
                            iso=None)
    summary = {"seed_ras_mm": [6.0, 8.0, 6.0], "mu_d_mm": 5.0, "mu_rho": 2.0, "loss": 0.1, "warnings": ["earlier"]}
    ones = np.ones(geometry.shape_kji, np.float32)
    tissue = Tissue(ones, 0 * ones, 0 * ones, geometry)
    return SimpleNamespace(concentration=Volume(concentration, geometry), plans=plans, tissue=tissue,
                           to_dict=lambda: dict(summary))


def test_write_outputs_without_matplotlib_skips_the_picture_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib now fails
    out = write_outputs(_stand_in_result(), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["infiltration.nii.gz", "parameters.json", "plan_model.nii.gz",
                                                     "plan_standard.nii.gz", "tissue.nii.gz"]
    written = json.loads((out / "parameters.json").read_text())
    assert written["report_png"] == REPORT_SKIPPED
    assert written["warnings"] == ["earlier", REPORT_SKIPPED]


def test_write_outputs_with_matplotlib_records_the_picture(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the test environment installs matplotlib (pyproject.toml)")
    drawn = []
    monkeypatch.setattr("TumorPersonalizationLib.figures.save_result_figure",
                        lambda path, result: (drawn.append(path), open(path, "wb").write(b"png")))
    out = write_outputs(_stand_in_result(), tmp_path / "out")
    assert drawn == [drawn[0]] and (out / "report.png").is_file()
    assert json.loads((out / "parameters.json").read_text())["report_png"] == "written"


def test_batch_script_without_matplotlib_completes_and_says_the_picture_was_skipped(tmp_path, monkeypatch, capsys):
    pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries, Python >= 3.11) not installed")
    from test_slicer_logic import batch_module

    from TumorPersonalizationLib.tissue import Tissue

    batch = batch_module()
    result = _stand_in_result()
    geometry = result.concentration.geometry
    wm = np.zeros(geometry.shape_kji, np.float32)
    wm[1:5, 1:6, 1:7] = 1.0
    tissue_path, tumor_path = tmp_path / "tissue.nii.gz", tmp_path / "tumor.nii.gz"
    Volume((wm * 3).astype(np.uint8), geometry).save(tissue_path)
    result.concentration.save(tumor_path)

    def stand_in(tissue, tumor_volume, kind, labels, method=None, device="auto", progress=None, cancel=None):
        assert isinstance(tissue, Tissue)
        return result

    monkeypatch.setattr(batch, "run_personalization", stand_in)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    out_dir = tmp_path / "out"
    status = batch.main(["--tissue", str(tissue_path), "--tumor", str(tumor_path), "--progress", "none",
                         "--out-dir", str(out_dir)])
    assert status == 0, capsys.readouterr().err
    assert "report.png" not in {p.name for p in out_dir.iterdir()}
    written = json.loads((out_dir / "parameters.json").read_text())
    assert written["report_png"] == REPORT_SKIPPED and REPORT_SKIPPED in written["warnings"]
    assert f"slicer_batch: warning: {REPORT_SKIPPED}" in capsys.readouterr().err
