"""The module's Logic and the headless batch script, on the real Slicer MRML libraries (slicer-core).

Two parts:
- Tests that run now: the Logic's input conversion, the background run (progress, loading the outputs, a re-run
  replacing them, Cancel, a failed run's message) against a stand-in for the command line that takes the exact
  command the Logic builds, the dependency guard, and the batch script's files -> nodes -> files path with a stand-in
  personalisation.
- Tests of the real personalisation: the Logic's personalize on a rotated, anisotropic segmentation, the module's
  self-test, a background run of the real command line and the batch script on the bundled atlas.
"""
import importlib.util
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from conftest_slicer import (  # noqa: F401  (mrml_scene: fixture; importing skips when slicer-core is absent)
    CSF_VOXEL,
    GM_VOXEL,
    REPOSITORY,
    ROTATED_GEOMETRY,
    WM_VOXEL,
    load_module_file,
    mrml_scene,
    reference_node,
    segmentation_from_masks,
    slicer,
    tissue_masks,
)
from TumorPersonalizationLib import mrml
from TumorPersonalizationLib.errors import InputError
from TumorPersonalizationLib.geometry import Geometry, Volume
from TumorPersonalizationLib.tissue import Tissue

# A stand-in for `python -m TumorPersonalizationLib.cli personalize ...`: same arguments, behaviour chosen by the
# environment variable FAKE_CLI (succeed | hang | fail). On success it writes an output folder as the command line
# does, made from the tissue it was given (with --t1: the T1's values / 100 taken as CSF 1, GM 2, WM 3 labels), the
# tissue included, and records the arguments it received in parameters.json.
FAKE_CLI = r'''
import argparse, json, os, sys, time
sys.path.insert(0, os.environ["FAKE_CLI_REPOSITORY"])
parser = argparse.ArgumentParser()
parser.add_argument("command")
for option in ("--tissue", "--t1", "--tumor", "--tumor-kind", "--method", "--device", "--progress", "--out-dir",
               "--lesion-tissue", "--recurrence"):
    parser.add_argument(option)
parser.add_argument("--tumor-labels", nargs=3, type=int)
parser.add_argument("--recurrence-labels", nargs=3, type=int)
args = parser.parse_args()

def progress(fraction, message):
    sys.stderr.write(json.dumps({"fraction": fraction, "message": message}) + "\n")
    sys.stderr.flush()

behaviour = os.environ.get("FAKE_CLI", "succeed")
if behaviour == "fail":
    progress(0.0, "preparing the observation")
    sys.stderr.write("tumor-personalization: error: the tumor lies outside the brain\n")
    sys.exit(2)
progress(0.1, "working")
if behaviour == "hang":
    time.sleep(120)
from pathlib import Path
import numpy as np
from TumorPersonalizationLib.geometry import Volume
from TumorPersonalizationLib.imageio import write_image
from TumorPersonalizationLib.tissue import Tissue
assert (args.tissue is None) != (args.t1 is None), "exactly one of --tissue and --t1"
if args.t1:
    t1 = Volume.load(args.t1)
    tissue = Tissue.from_labelmap(Volume(np.rint(t1.array / 100).astype(np.int16), t1.geometry))
else:
    tissue = Tissue.from_file(args.tissue)
tumor = Volume.load(args.tumor)
progress(0.5, "half way")
out = Path(args.out_dir)
out.mkdir(parents=True)
Volume(tissue.wm * 0.5, tissue.geometry).save(out / "infiltration.nii.gz")
Volume((tissue.gm > 0.5).astype("uint8"), tissue.geometry).save(out / "plan_standard.nii.gz")
Volume((tissue.wm > 0.5).astype("uint8"), tissue.geometry).save(out / "plan_model.nii.gz")
write_image(tissue.to_volume_image(), out / "tissue.nii.gz")
voxel_cm3 = tissue.geometry.voxel_volume_mm3() / 1000
summary = {"seed_ras_mm": [1.5, -2.0, 3.25], "mu_d_mm": 6.5, "mu_rho": 2.5, "method": args.method, "loss": 0.01,
           "runtime_s": 1.0, "plans": {"standard_cm3": float((tissue.gm > 0.5).sum() * voxel_cm3),
                                       "model_cm3": float((tissue.wm > 0.5).sum() * voxel_cm3)},
           "warnings": ["a warning"], "history": [{"loss": 1.0}],
           "tissue": {"source": "t1" if args.t1 else args.lesion_tissue, "lesion_cm3": 2.0,
                      "refilled_cm3": 0.0 if args.t1 else 1.25, "registration_quality": 0.9, "runtime_s": 0.1},
           "received": {
               "tumor_kind": args.tumor_kind, "tumor_labels": args.tumor_labels, "device": args.device,
               "progress": args.progress, "tumor_max": float(tumor.array.max()), "lesion_tissue": args.lesion_tissue,
               "tumor_on_tissue_grid": tumor.geometry.same_grid(tissue.geometry),
               "recurrence_on_tissue_grid": (Volume.load(args.recurrence).geometry.same_grid(tissue.geometry)
                                             if args.recurrence else None)}}
(out / "parameters.json").write_text(json.dumps(summary))
progress(1.0, "done")
'''


@pytest.fixture
def module():
    return load_module_file()


@pytest.fixture
def fake_cli(tmp_path, monkeypatch, module):
    """Route the Logic's background command to FAKE_CLI, keeping every argument the Logic built."""
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    monkeypatch.setenv("FAKE_CLI_REPOSITORY", str(REPOSITORY))
    logic_class = module.TumorPersonalizationLogic
    real_command = logic_class.personalizeCommand
    commands = []

    def command(*args, **kwargs):
        built = real_command(*args, **kwargs)
        commands.append(built)
        assert built[1:4] == ["-m", "TumorPersonalizationLib.cli", "personalize"]
        return [built[0], str(script)] + built[3:]

    monkeypatch.setattr(logic_class, "personalizeCommand", staticmethod(command))
    return commands


def _wait_for(condition, timeout_s=20.0):
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "timed out"
        time.sleep(0.05)


def _tissue_segmentation(scene):
    reference = reference_node(scene)
    segmentation = segmentation_from_masks(scene, tissue_masks(), reference)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    return segmentation, reference


# ---- inputs ---------------------------------------------------------------------------------------------------------
def test_logic_turns_each_kind_of_input_into_the_library_types(mrml_scene, module):
    logic = module.TumorPersonalizationLogic()
    segmentation, reference = _tissue_segmentation(mrml_scene)
    masks = tissue_masks()
    tissue = logic.tissueFromNode(segmentation)
    assert tissue.geometry.same_grid(ROTATED_GEOMETRY)
    assert tissue.fractions_at_ras(ROTATED_GEOMETRY.index_kji_to_ras(WM_VOXEL)) == (1.0, 0.0, 0.0)
    assert logic.defaultBackgroundNode(segmentation) is reference

    labels = masks["CSF"] * 4 + masks["GM"] * 5 + masks["WM"] * 6
    labelmap = mrml.volume_to_node(mrml_scene, Volume(labels, ROTATED_GEOMETRY), "labels", labelmap=True)
    tissue = logic.tissueFromNode(labelmap, tissueLabels={"csf": 4, "gm": 5, "wm": 6})
    assert tissue.fractions_at_ras(ROTATED_GEOMETRY.index_kji_to_ras(CSF_VOXEL)) == (0.0, 0.0, 1.0)
    probabilities = tuple(mrml.volume_to_node(mrml_scene, Volume(masks[n] * 1.0, ROTATED_GEOMETRY), n)
                          for n in ("WM", "GM", "CSF"))
    tissue = logic.tissueFromNode(probabilities)
    assert tissue.fractions_at_ras(ROTATED_GEOMETRY.index_kji_to_ras(GM_VOXEL)) == (0.0, 1.0, 0.0)

    # Tumor: a segmentation becomes the chosen label values on the tissue's grid; a label map is a segmentation;
    # another volume a concentration.
    tumor = segmentation_from_masks(mrml_scene, {"Edema": masks["WM"] | masks["GM"], "Enhancing": masks["GM"]},
                                    reference, "tumor")
    volume, kind = logic.tumorVolumeFromNode(tumor, tissue.geometry, tumorLabels=(1, 2, 4))
    assert kind == "segmentation" and volume.geometry.same_grid(tissue.geometry)
    assert volume.array[WM_VOXEL] == 2 and volume.array[GM_VOXEL] == 4 and volume.array[CSF_VOXEL] == 0
    assert logic.tumorVolumeFromNode(labelmap, tissue.geometry)[1] == "segmentation"
    assert logic.tumorVolumeFromNode(probabilities[0], tissue.geometry)[1] == "concentration"
    with pytest.raises(InputError, match="no tumor selected"):
        logic.tumorVolumeFromNode(None, tissue.geometry)
    with pytest.raises(TypeError, match="unknown option"):
        logic.startBackgroundRun(segmentation, labelmap, tumourKind="segmentation")


def test_panel_selections_become_the_logic_arguments(mrml_scene, module):
    logic = module.TumorPersonalizationLogic()
    parameters = logic.getParameterNode()
    segmentation, reference = _tissue_segmentation(mrml_scene)
    tumor = mrml.volume_to_node(mrml_scene, Volume(tissue_masks()["WM"], ROTATED_GEOMETRY), "tumor", labelmap=True)
    parameters.tissueSegmentation = segmentation
    parameters.tumorInput = module.TUMOR_INPUTS[1]
    assert logic.missingInputs(parameters) == ["tumor label map"]
    parameters.tumorLabelmap = tumor
    parameters.enhancingLabel = 4
    parameters.gmSegmentName = "Grey"
    inputs = logic.inputsFromParameterNode(parameters)
    assert inputs["tissueNode"] is segmentation and inputs["tumorNode"] is tumor
    assert inputs["tumorKind"] == "segmentation" and inputs["tumorLabels"] == (1, 2, 4)
    assert inputs["segmentNames"] == {"wm": "WM", "gm": "Grey", "csf": "CSF"}
    parameters.tissueInput = module.TISSUE_INPUTS[2]
    with pytest.raises(InputError, match="select: WM probability map, GM probability map, CSF probability map"):
        logic.inputsFromParameterNode(parameters)


# ---- background run -------------------------------------------------------------------------------------------------
def test_background_run_follows_progress_and_a_rerun_replaces_the_outputs(mrml_scene, module, fake_cli):
    logic = module.TumorPersonalizationLogic()
    segmentation, reference = _tissue_segmentation(mrml_scene)
    tumor = mrml.volume_to_node(mrml_scene, Volume(tissue_masks()["WM"] * 2, ROTATED_GEOMETRY), "tumor",
                                labelmap=True)

    def run_once():
        run = logic.startBackgroundRun(segmentation, tumor, method="direct", device="cpu")
        fractions = []
        while not run.poll():
            fractions.append(run.fraction)
            time.sleep(0.05)
        assert run.returncode == 0, run.errorMessage()
        assert run.fraction == 1.0 and run.message == "done"
        summary, nodes = logic.loadOutputs(run.outputDirectory, run.anchorNode, run.backgroundNode)
        run.cleanup()
        assert not run.workDirectory.exists()
        return summary, nodes

    summary, nodes = run_once()
    command = fake_cli[0]
    assert command[command.index("--progress") + 1] == "json" and command[command.index("--method") + 1] == "direct"
    assert summary["received"] == {"tumor_kind": "segmentation", "tumor_labels": [1, 2, 3], "device": "cpu",
                                   "progress": "json", "tumor_max": 2.0, "lesion_tissue": "atlas",
                                   "tumor_on_tissue_grid": True, "recurrence_on_tissue_grid": None}
    # The tissue reached the command line on its own grid, and the results came back onto it in RAS.
    infiltration = mrml.volume_from_node(nodes["infiltration"])
    assert infiltration.geometry.same_grid(ROTATED_GEOMETRY, tolerance_mm=1e-4)
    assert infiltration.array[WM_VOXEL] == pytest.approx(0.5) and infiltration.array[GM_VOXEL] == 0.0
    standard = module.PLAN_SEGMENT_NAMES["standard"]
    assert mrml.segment_names(nodes["plans"]) == [standard, module.PLAN_SEGMENT_NAMES["model"]]
    assert mrml.plan_volume_cm3(nodes["plans"], standard) == pytest.approx(summary["plans"]["standard_cm3"],
                                                                           abs=1e-3)
    table = mrml.dict_from_table_node(nodes["table"])
    assert table["mu_d_mm"] == "6.5" and table["warnings"] == "a warning" and "history" not in table
    np.testing.assert_allclose(nodes["seed"].GetNthControlPointPositionWorld(0), [1.5, -2.0, 3.25])
    assert tumor.GetNodeReference(module.OUTPUT_ROLES["infiltration"]) is nodes["infiltration"]
    labels = module.TumorPersonalizationLogic.resultLabels(summary)
    assert labels["mu_D"] == "6.50 mm" and labels["seed"] == "(1.5, -2.0, 3.2) mm RAS"

    count = mrml_scene.GetNumberOfNodes()
    _, again = run_once()
    assert mrml_scene.GetNumberOfNodes() == count
    assert all(again[key] is nodes[key] for key in nodes)


def _t1_geometry():
    """An axis-aligned 1.5 mm grid around ROTATED_GEOMETRY's box: the T1 is on another grid than the segmentations
    (drawn on the rotated reference), as a patient's T1 and a segmentation from another tool would be."""
    shape = np.asarray(ROTATED_GEOMETRY.shape_kji)
    corners = np.array([[k, j, i] for k in (0, shape[0] - 1) for j in (0, shape[1] - 1) for i in (0, shape[2] - 1)])
    ras = ROTATED_GEOMETRY.index_kji_to_ras(corners)
    low, high = ras.min(axis=0) - 3.0, ras.max(axis=0) + 3.0
    shape_ijk = np.ceil((high - low) / 1.5).astype(int) + 1
    return Geometry(tuple(int(n) for n in shape_ijk[::-1]), (1.5, 1.5, 1.5), tuple(low), np.eye(3))


def _t1_node(scene, name="T1"):
    """A T1 whose values / 100 the fake command line reads as labels: CSF (100) in the first third along i, GM (200)
    in the second, WM (300) in the last. Returns (node, geometry, expected label array)."""
    geometry = _t1_geometry()
    i = np.arange(geometry.shape_kji[2])
    labels = np.broadcast_to(np.where(i < geometry.shape_kji[2] // 3, 1,
                                      np.where(i < 2 * geometry.shape_kji[2] // 3, 2, 3)), geometry.shape_kji)
    node = mrml.volume_to_node(scene, Volume((labels * 100).astype(np.float32), geometry), name)
    return node, geometry, np.ascontiguousarray(labels)


def _tumor_segmentation(scene, reference, name="tumor"):
    masks = tissue_masks()
    return segmentation_from_masks(scene, {"Edema": masks["WM"] | masks["GM"], "Enhancing": masks["GM"]}, reference,
                                   name)


def test_the_t1_choice_runs_the_command_line_on_the_t1_and_shows_the_model_tissue(mrml_scene, module, fake_cli):
    logic = module.TumorPersonalizationLogic()
    t1, t1_geometry, t1_labels = _t1_node(mrml_scene)
    reference = reference_node(mrml_scene)
    tumor = _tumor_segmentation(mrml_scene, reference)
    followup = _tumor_segmentation(mrml_scene, reference, "follow-up")
    parameters = logic.getParameterNode()
    parameters.tissueInput = module.TISSUE_INPUTS[3]
    parameters.tumorInput = module.TUMOR_INPUTS[2]
    parameters.tumorSegmentation = tumor
    parameters.lesionTissue = module.LESION_TISSUE_CHOICES[1]
    parameters.recurrence = followup
    assert logic.missingInputs(parameters) == ["T1-weighted image"]
    parameters.t1Volume = t1
    parameters.tissueSegmentation = segmentation_from_masks(mrml_scene, tissue_masks(), reference)  # not used

    # What the panel does with its selections (onPersonalizeButton).
    inputs = logic.inputsFromParameterNode(parameters)
    assert inputs["tissueNode"] is None and inputs["t1Node"] is t1 and inputs["recurrenceNode"] is followup
    assert inputs["lesionTissue"] == "surround"
    run = logic.startBackgroundRun(inputs.pop("tissueNode"), inputs.pop("tumorNode"), method="direct", device="cpu",
                                   **inputs)
    assert run.wait(timeout=30) == 0, run.errorMessage()
    command = fake_cli[-1]
    assert "--tissue" not in command and command[command.index("--lesion-tissue") + 1] == "surround"
    written_t1 = Volume.load(command[command.index("--t1") + 1])
    assert written_t1.geometry.same_grid(t1_geometry, tolerance_mm=1e-4)
    np.testing.assert_array_equal(written_t1.array, t1_labels * 100)
    assert "--recurrence" in command
    assert run.backgroundNode is t1, "results are shown over the T1"
    summary, nodes = logic.loadOutputs(run.outputDirectory, run.anchorNode, run.backgroundNode)
    run.cleanup()
    # The tumor and the follow-up segmentations went to the command line on the T1's grid.
    assert summary["received"]["tumor_on_tissue_grid"] and summary["received"]["recurrence_on_tissue_grid"]
    assert mrml.volume_from_node(nodes["infiltration"]).geometry.same_grid(t1_geometry, tolerance_mm=1e-4)

    # The tissue the model ran on: a hidden segmentation on the T1's grid, no lesion outline (no mask in the folder).
    tissue_node = nodes["tissue"]
    assert tissue_node.GetName() == "tumor model tissue"
    assert tumor.GetNodeReference(module.OUTPUT_ROLES["tissue"]) is tissue_node
    assert mrml.segment_names(tissue_node) == ["WM", "GM", "CSF"]
    assert not tissue_node.GetDisplayNode().GetVisibility()
    shown = mrml.labels_from_segmentation_node(tissue_node, t1_geometry, {"CSF": 1, "GM": 2, "WM": 3})
    np.testing.assert_array_equal(shown.array, t1_labels)
    table = mrml.dict_from_table_node(nodes["table"])
    assert table["tissue.source"] == "t1" and table["tissue.registration_quality"] == "0.9"
    labels = module.TumorPersonalizationLogic.resultLabels(summary)
    assert labels["tissue"] == "derived from the T1 (atlas registered to it), registration quality 0.90"


def test_the_lesion_option_reaches_the_command_line(mrml_scene, module, fake_cli):
    logic = module.TumorPersonalizationLogic()
    segmentation, _reference = _tissue_segmentation(mrml_scene)
    tumor = mrml.volume_to_node(mrml_scene, Volume(tissue_masks()["WM"] * 2, ROTATED_GEOMETRY), "tumor",
                                labelmap=True)
    run = logic.startBackgroundRun(segmentation, tumor, lesionTissue="keep")
    assert run.wait(timeout=30) == 0, run.errorMessage()
    summary, nodes = logic.loadOutputs(run.outputDirectory, tumor)
    run.cleanup()
    command = fake_cli[-1]
    assert command[command.index("--lesion-tissue") + 1] == "keep" and "--t1" not in command
    assert summary["received"]["lesion_tissue"] == "keep"
    assert mrml.dict_from_table_node(nodes["table"])["tissue.source"] == "keep"
    assert module.TumorPersonalizationLogic.resultLabels(summary)["tissue"] == \
        "as given (lesion kept), registration quality 0.90"
    with pytest.raises(InputError, match="unknown lesion tissue 'fill': choose one of atlas, surround, keep"):
        logic.startBackgroundRun(segmentation, tumor, lesionTissue="fill")
    with pytest.raises(InputError, match="either a tissue or a T1"):
        logic.startBackgroundRun(segmentation, tumor, t1Node=_t1_node(mrml_scene)[0])


def test_load_outputs_refuses_a_tissue_on_another_grid(mrml_scene, module, fake_cli, tmp_path):
    from TumorPersonalizationLib.imageio import write_image

    logic = module.TumorPersonalizationLogic()
    segmentation, _reference = _tissue_segmentation(mrml_scene)
    tumor = mrml.volume_to_node(mrml_scene, Volume(tissue_masks()["WM"] * 2, ROTATED_GEOMETRY), "tumor",
                                labelmap=True)
    run = logic.startBackgroundRun(segmentation, tumor)
    assert run.wait(timeout=30) == 0, run.errorMessage()
    t1_geometry = _t1_geometry()
    write_image(Tissue.from_labelmap(Volume(np.full(t1_geometry.shape_kji, 3, np.int16), t1_geometry))
                .to_volume_image(), run.outputDirectory / "tissue.nii.gz")
    count = mrml_scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="tissue.nii.gz is not on the infiltration map's grid"):
        logic.loadOutputs(run.outputDirectory, tumor)
    run.cleanup()
    assert mrml_scene.GetNumberOfNodes() == count


def _stand_in_personalize(calls):
    """A stand-in for pipeline.personalize with its signature's tissue arguments: records them, and returns a
    result whose tissue is the given one (or the T1's values / 100 as labels) and whose lesion is the tumor."""
    from TumorPersonalizationLib.lesion import LesionTissue

    def personalize(tissue, observation, method=None, progress=None, cancel=None, device="auto",
                    lesion_tissue="atlas", t1=None, **kwargs):
        calls.append({"tissue": tissue, "observation": observation, "lesion_tissue": lesion_tissue, "t1": t1,
                      "other": kwargs})
        ran_on = tissue if tissue is not None else Tissue.from_labelmap(
            Volume(np.rint(t1.array / 100).astype(np.int16), t1.geometry))
        lesion = observation.on_grid(ran_on.geometry).visible > 0.5
        source = "t1" if t1 is not None else lesion_tissue
        made = LesionTissue(ran_on, lesion, source, 0.0 if source in ("t1", "keep") else 0.5,
                            0.8 if source in ("t1", "atlas") else None)
        summary = {"seed_ras_mm": [0.0, 0.0, 0.0], "mu_d_mm": 5.0, "mu_rho": 2.0, "method": method, "loss": 0.1,
                   "runtime_s": 0.1, "plans": {}, "warnings": [], "tissue": made.to_dict()}
        plans = SimpleNamespace(standard=(ran_on.gm > 0.5).astype(np.uint8), model=(ran_on.wm > 0.5).astype(np.uint8),
                                iso=None)
        return SimpleNamespace(to_dict=lambda: summary, concentration=Volume(ran_on.wm * 0.5, ran_on.geometry),
                               plans=plans, tissue=ran_on, lesion=made)

    return personalize


def test_in_process_run_passes_the_lesion_option_and_the_t1_and_outlines_the_refilled_lesion(mrml_scene, module,
                                                                                             monkeypatch):
    import TumorPersonalizationLib.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "personalize", _stand_in_personalize(calls))
    logic = module.TumorPersonalizationLogic()
    segmentation, reference = _tissue_segmentation(mrml_scene)
    masks = tissue_masks()
    tumor = mrml.volume_to_node(mrml_scene, Volume(masks["WM"] * 2, ROTATED_GEOMETRY), "tumor", labelmap=True)

    result, nodes = logic.personalize(segmentation, tumor, lesionTissue="surround")
    assert calls[-1]["lesion_tissue"] == "surround" and calls[-1]["t1"] is None
    assert calls[-1]["tissue"].geometry.same_grid(ROTATED_GEOMETRY)
    tissue_node = nodes["tissue"]
    assert mrml.segment_names(tissue_node) == ["WM", "GM", "CSF", "Refilled lesion"]
    assert not tissue_node.GetDisplayNode().GetVisibility()
    outline = mrml.labels_from_segmentation_node(tissue_node, ROTATED_GEOMETRY, {"Refilled lesion": 1})
    np.testing.assert_array_equal(outline.array, masks["WM"])
    assert mrml.dict_from_table_node(nodes["table"])["tissue.source"] == "surround"
    assert module.TumorPersonalizationLogic.resultLabels(result.to_dict())["tissue"] == \
        "lesion refilled from the surrounding WM/GM, 0.5 cm\u00b3 refilled of a " \
        f"{masks['WM'].sum() * ROTATED_GEOMETRY.voxel_volume_mm3() / 1000:.1f} cm\u00b3 lesion"

    # Kept as given: nothing was refilled, so the re-run's model tissue has no outline; the node is reused.
    _, again = logic.personalize(segmentation, tumor, lesionTissue="keep")
    assert calls[-1]["lesion_tissue"] == "keep"
    assert again["tissue"] is tissue_node and mrml.segment_names(tissue_node) == ["WM", "GM", "CSF"]

    # A T1 instead of a tissue: personalize(None, observation, t1=...), the tumor segmentation on the T1's grid.
    t1, t1_geometry, t1_labels = _t1_node(mrml_scene)
    tumor_segmentation = _tumor_segmentation(mrml_scene, reference)
    _, t1_nodes = logic.personalize(None, tumor_segmentation, t1Node=t1)
    call = calls[-1]
    assert call["tissue"] is None and call["lesion_tissue"] == "atlas"
    assert call["t1"].geometry.same_grid(t1_geometry) and call["t1"].array.dtype == np.float32
    np.testing.assert_array_equal(call["t1"].array, t1_labels * 100)
    assert call["observation"].kind == "segmentation"
    assert call["observation"].volume.geometry.same_grid(t1_geometry)
    assert np.count_nonzero(call["observation"].volume.array) > 0
    assert mrml.segment_names(t1_nodes["tissue"]) == ["WM", "GM", "CSF"]  # derived, not refilled: no outline

    count = len(calls)
    with pytest.raises(InputError, match="unknown lesion tissue 'fill'"):
        logic.personalize(segmentation, tumor, lesionTissue="fill")
    with pytest.raises(InputError, match="is a label map; the T1 must be"):
        logic.personalize(None, tumor, t1Node=tumor)
    with pytest.raises(InputError, match="either a tissue or a T1"):
        logic.personalize(segmentation, tumor, t1Node=t1)
    assert len(calls) == count, "bad input was refused before the personalisation"


def test_panel_fields_for_patients_inputs(mrml_scene, module):
    """The parameter node's T1, lesion-tissue and follow-up fields: defaults, the choices against the library's
    modes, what reaches the Logic, and a missing T1 reported when the T1 choice is selected."""
    from TumorPersonalizationLib.lesion import DEFAULT_LESION_TISSUE, LESION_TISSUE_MODES

    logic = module.TumorPersonalizationLogic()
    parameters = logic.getParameterNode()
    assert parameters.t1Volume is None and parameters.recurrence is None
    assert module.lesionTissueMode(parameters.lesionTissue) == DEFAULT_LESION_TISSUE
    assert parameters.lesionTissue == "atlas (default)"
    assert sorted(module.lesionTissueMode(c) for c in module.LESION_TISSUE_CHOICES) == sorted(LESION_TISSUE_MODES)
    toolTips = module.lesionTissueToolTips()
    assert set(toolTips) == set(LESION_TISSUE_MODES)
    assert "atlas" in toolTips["atlas"] and "surrounds" in toolTips["surround"] and "kept as given" in toolTips["keep"]
    with pytest.raises(InputError, match="unknown lesion tissue"):
        module.lesionTissueMode("atlas please")

    parameters.tissueInput = module.TISSUE_INPUTS[3]
    assert parameters.tissueInput == "T1-weighted image"
    assert logic.missingInputs(parameters) == ["T1-weighted image", "concentration map"]
    with pytest.raises(InputError, match="select: T1-weighted image, concentration map"):
        logic.inputsFromParameterNode(parameters)
    t1, _geometry, _labels = _t1_node(mrml_scene)
    tumor = mrml.volume_to_node(mrml_scene, Volume(tissue_masks()["WM"] * 0.8, ROTATED_GEOMETRY), "tumor")
    followup = mrml.volume_to_node(mrml_scene, Volume(tissue_masks()["WM"] * 2, ROTATED_GEOMETRY), "follow-up",
                                   labelmap=True)
    parameters.t1Volume, parameters.tumorConcentration, parameters.recurrence = t1, tumor, followup
    parameters.lesionTissue = module.LESION_TISSUE_CHOICES[2]
    inputs = logic.inputsFromParameterNode(parameters)
    assert inputs["tissueNode"] is None and inputs["t1Node"] is t1 and inputs["tumorNode"] is tumor
    assert inputs["recurrenceNode"] is followup and inputs["lesionTissue"] == "keep"
    # Back to a tissue segmentation: the T1 stays selected in the panel but is not passed on.
    parameters.tissueInput = module.TISSUE_INPUTS[0]
    parameters.tissueSegmentation = _tissue_segmentation(mrml_scene)[0]
    inputs = logic.inputsFromParameterNode(parameters)
    assert inputs["t1Node"] is None and inputs["tissueNode"] is parameters.tissueSegmentation


def test_cancel_ends_the_process_and_leaves_the_scene_as_it_was(mrml_scene, module, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_CLI", "hang")
    logic = module.TumorPersonalizationLogic()
    segmentation, _ = _tissue_segmentation(mrml_scene)
    tumor = mrml.volume_to_node(mrml_scene, Volume(tissue_masks()["WM"] * 0.8, ROTATED_GEOMETRY), "tumor")
    count = mrml_scene.GetNumberOfNodes()
    run = logic.startBackgroundRun(segmentation, tumor)
    _wait_for(lambda: run.poll() or run.fraction > 0)
    assert run.message == "working" and run.returncode is None
    run.cancel()
    assert run.process.poll() is not None, "the process ended"
    assert not run.workDirectory.exists(), "its folder is gone"
    assert mrml_scene.GetNumberOfNodes() == count
    assert logic.outputNodes(tumor) == {}


def test_a_failed_run_reports_the_command_lines_one_line_error(mrml_scene, module, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_CLI", "fail")
    logic = module.TumorPersonalizationLogic()
    segmentation, _ = _tissue_segmentation(mrml_scene)
    tumor = mrml.volume_to_node(mrml_scene, Volume(tissue_masks()["WM"] * 0.8, ROTATED_GEOMETRY), "tumor")
    run = logic.startBackgroundRun(segmentation, tumor)
    assert run.wait(timeout=20) == 2
    assert run.errorMessage() == "the tumor lies outside the brain"
    with pytest.raises(InputError, match="no parameters.json"):
        logic.loadOutputs(run.outputDirectory, tumor)
    run.cleanup()


def test_dependencies_are_never_installed_outside_the_application(module, monkeypatch):
    logic_class = module.TumorPersonalizationLogic
    installs = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: installs.append(a))
    installed = {"torch": None}
    real_version = module.slicer_deps.installed_version
    monkeypatch.setattr(module.slicer_deps, "installed_version",
                        lambda name: installed[name] if name in installed else real_version(name))
    with pytest.raises(RuntimeError, match="needs PyTorch"):
        logic_class().ensureDependencies()
    # A torch older than the supported one is not used: the error points to the PyTorch Util module.
    installed["torch"] = "1.13.1"
    with pytest.raises(RuntimeError, match="PyTorch 1.13.1 is installed.*'PyTorch Util' module"):
        logic_class().ensureDependencies()
    assert installs == []
    installed["torch"] = "2.13.0+cpu"
    monkeypatch.setattr(logic_class, "missingPythonPackages", staticmethod(lambda: []))
    assert logic_class().ensureDependencies() is True

    # When it does install (after the user said yes, in the application), Slicer's numpy stays as it is.
    from importlib import metadata

    constraints = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: constraints.append(
        open(args[args.index("-c") + 1]).read()))
    logic_class.pipInstallKeepingSlicerPackages(["cma>=3.2"])
    assert f"numpy=={metadata.version('numpy')}" in constraints[0].split()


# ---- batch script ---------------------------------------------------------------------------------------------------
def batch_module():
    if "slicer_batch" not in sys.modules:
        spec = importlib.util.spec_from_file_location("slicer_batch", REPOSITORY / "scripts" / "slicer_batch.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["slicer_batch"] = module
        spec.loader.exec_module(module)
    return sys.modules["slicer_batch"]


def test_batch_script_reads_files_into_nodes_and_writes_the_output_nodes(tmp_path, monkeypatch, capsys):
    batch = batch_module()
    scene = mrml.create_headless_scene()
    masks = tissue_masks()
    tissue_path = tmp_path / "tissue.nii.gz"
    Volume((masks["CSF"] * 1 + masks["GM"] * 2 + masks["WM"] * 3).astype(np.uint8), ROTATED_GEOMETRY).save(
        tissue_path)
    # The tumor as a Slicer segmentation file with Edema and Enhancing segments.
    tumor_path = tmp_path / "tumor.seg.nrrd"
    tumor_node = segmentation_from_masks(scene, {"Edema": masks["WM"] | masks["GM"], "Enhancing": masks["GM"]},
                                         reference_node(scene), "tumor input")
    batch.write_node(tumor_node, tumor_path)
    received = {}

    def stand_in(tissue, tumor_volume, kind, labels, method=None, device="auto", progress=None, cancel=None):
        received.update(tissue=tissue, tumor=tumor_volume, kind=kind, labels=tuple(labels), method=method)
        concentration = Volume(tissue.wm * 0.75, tissue.geometry)
        plans = SimpleNamespace(standard=(tissue.gm > 0).astype(np.uint8), model=(tissue.wm > 0).astype(np.uint8),
                                iso=None)
        summary = {"seed_ras_mm": [3.0, 2.0, 1.0], "mu_d_mm": 7.0, "mu_rho": 2.0, "method": method, "loss": 0.5,
                   "runtime_s": 0.1, "plans": {"standard_cm3": 1.0, "model_cm3": 1.0}, "warnings": [],
                   "history": [{"loss": np.float32(0.5)}]}
        return SimpleNamespace(to_dict=lambda: summary, concentration=concentration, plans=plans)

    monkeypatch.setattr(batch, "run_personalization", stand_in)
    out_dir = tmp_path / "out"
    status = batch.main(["--", "--tissue", str(tissue_path), "--tumor", str(tumor_path), "--tumor-labels", "1", "2",
                         "4", "--method", "direct", "--progress", "none", "--no-report", "--out-dir", str(out_dir)])
    assert status == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["mu_d_mm"] == 7.0

    # What the personalisation got: the tissue as the library reads the file, the tumor on its grid.
    expected = Tissue.from_file(tissue_path)
    assert received["tissue"].geometry.same_grid(expected.geometry, tolerance_mm=1e-4)
    np.testing.assert_array_equal(received["tissue"].wm, expected.wm)
    assert received["kind"] == "segmentation" and received["labels"] == (1, 2, 4) and received["method"] == "direct"
    assert received["tumor"].array[WM_VOXEL] == 2 and received["tumor"].array[GM_VOXEL] == 4

    # What was written: Slicer's files, readable back onto the tissue's grid.
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(set(batch.OUTPUT_FILES) - {"report.png"})
    infiltration = Volume.load(out_dir / "infiltration.nrrd")
    assert infiltration.geometry.same_grid(expected.geometry, tolerance_mm=1e-4)
    np.testing.assert_allclose(infiltration.array, expected.wm * 0.75)
    plans = batch.read_segmentation_node(scene, out_dir / "target_plans.seg.nrrd", "plans read back")
    model = mrml.labels_from_segmentation_node(plans, expected.geometry, {mrml.PLAN_SEGMENT_NAMES["model"]: 1})
    np.testing.assert_array_equal(model.array, masks["WM"])
    markups = json.loads((out_dir / "seed.mrk.json").read_text())["markups"][0]
    flip = [-1, -1, 1] if markups["coordinateSystem"] == "LPS" else [1, 1, 1]  # Slicer writes LPS files
    np.testing.assert_allclose(np.multiply(markups["controlPoints"][0]["position"], flip), [3.0, 2.0, 1.0])
    assert "mu_d_mm\t7" in (out_dir / "results.tsv").read_text()
    assert json.loads((out_dir / "parameters.json").read_text())["history"] == [{"loss": 0.5}]


def test_batch_script_refuses_bad_input_with_one_line(tmp_path, capsys):
    batch = batch_module()
    status = batch.main(["--tissue", str(tmp_path / "missing.nii.gz"), "--tumor", "x.nii.gz", "--out-dir",
                         str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert status == 2 and error.startswith("slicer_batch: error: file not found") and "\n" not in error
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert batch.main(["--tissue", "atlas", "--tumor", "x.nii.gz", "--out-dir", str(busy)]) == 2
    assert "holds other files (notes.txt)" in capsys.readouterr().err


# ---- the real personalisation ---------------------------------------------------------------------------------------
TRUE_SEED_RAS_MM = (28.0, -12.0, 24.0)


def _atlas_on_rotated_anisotropic_grid():
    """The 2 mm atlas resampled onto an oblique grid with anisotropic voxels, as hard WM/GM/CSF masks."""
    from TumorPersonalizationLib.atlas import load_atlas
    from TumorPersonalizationLib.geometry import resample_linear

    atlas = load_atlas(2)
    angle = np.deg2rad(20.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    spacing = np.array([2.0, 2.5, 3.0])
    shape_ijk = np.array([80, 72, 56])
    centre = np.asarray(atlas.geometry.index_kji_to_ras(np.asarray(atlas.geometry.shape_kji) / 2.0))
    origin = centre - direction @ (spacing * (shape_ijk - 1) / 2.0)
    geometry = Geometry(tuple(shape_ijk[::-1]), tuple(spacing), tuple(origin), direction)
    fractions = {name: resample_linear(getattr(atlas, name), atlas.geometry, geometry)
                 for name in ("wm", "gm", "csf")}
    label = np.argmax(np.stack([fractions["csf"], fractions["gm"], fractions["wm"]]), axis=0)
    inside = sum(fractions.values()) >= 0.5
    masks = {name: ((label == index) & inside).astype(np.uint8) for index, name in enumerate(("CSF", "GM", "WM"))}
    return atlas, geometry, masks


def test_personalize_on_a_rotated_anisotropic_segmentation_is_aligned_in_ras(mrml_scene, module):
    from TumorPersonalizationLib import GrowthParameters, simulate
    from TumorPersonalizationLib.progress import Cancelled

    atlas, geometry, masks = _atlas_on_rotated_anisotropic_grid()
    reference = mrml.volume_to_node(mrml_scene, Volume(masks["WM"] * 100.0, geometry), "patient image")
    segmentation = segmentation_from_masks(mrml_scene, {"WM": masks["WM"], "GM": masks["GM"], "CSF": masks["CSF"]},
                                           reference)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)  # as Slicer does for a new segmentation
    truth = simulate(atlas, GrowthParameters(TRUE_SEED_RAS_MM, 5.0, 2.0))  # on the atlas's own (other) grid
    tumor = mrml.volume_to_node(mrml_scene, truth, "tumor")
    logic = module.TumorPersonalizationLogic()

    # Cancelled half-way: an exception, and the scene as it was.
    count = mrml_scene.GetNumberOfNodes()

    class CancelLater:
        def __init__(self):
            self.calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 3

    with pytest.raises(Cancelled):
        logic.personalize(segmentation, tumor, method="hybrid", cancel=CancelLater())
    assert mrml_scene.GetNumberOfNodes() == count

    result, nodes = logic.personalize(segmentation, tumor, method="hybrid", backgroundNode=reference)
    infiltration = mrml.volume_from_node(nodes["infiltration"])
    assert infiltration.geometry.same_grid(geometry), "on the tissue's (rotated) grid"
    # At known RAS points: where the true tumor is dense (its peak is about 0.54) the result is too; far from it,
    # nothing. A rotation or axis-order slip would put these points outside the ~1 cm tumor.
    dense = np.argwhere(truth.array > 0.4)[::5]
    points = atlas.geometry.index_kji_to_ras(dense)
    index = np.rint(geometry.ras_to_index_kji(points)).astype(int)
    inside = np.all((index >= 0) & (index < geometry.shape_kji), axis=1)
    values = infiltration.array[tuple(index[inside].T)]
    assert inside.sum() > 10 and np.median(values) > 0.25
    far = np.rint(geometry.ras_to_index_kji(np.add(TRUE_SEED_RAS_MM, (-60.0, 0.0, 0.0)))).astype(int)
    assert infiltration.array[tuple(far)] < 0.01
    assert np.linalg.norm(np.subtract(result.parameters.seed_ras_mm, TRUE_SEED_RAS_MM)) < 15.0

    table = mrml.dict_from_table_node(nodes["table"])
    assert float(table["mu_d_mm"]) == pytest.approx(result.parameters.mu_d_mm, rel=1e-5)
    for key in ("standard", "model"):
        assert mrml.plan_volume_cm3(nodes["plans"], module.PLAN_SEGMENT_NAMES[key]) == pytest.approx(
            result.plans.volumes_cm3[f"{key}_cm3"], abs=1e-2)

    count = mrml_scene.GetNumberOfNodes()
    _, again = logic.personalize(segmentation, tumor, method="direct")
    assert mrml_scene.GetNumberOfNodes() == count and all(again[k] is nodes[k] for k in nodes)


def test_module_self_test_runs_under_slicer_core(module):
    mrml.create_headless_scene()
    case = module.TumorPersonalizationTest("runTest")
    result = case.defaultTestResult()
    case.run(result)
    assert result.wasSuccessful() and not result.skipped, result.errors + result.failures + result.skipped


def test_background_run_of_the_real_command_line(mrml_scene, module):
    from TumorPersonalizationLib import GrowthParameters, load_atlas, simulate

    atlas = load_atlas(2)
    nodes = tuple(mrml.volume_to_node(mrml_scene, Volume(getattr(atlas, n), atlas.geometry), n)
                  for n in ("wm", "gm", "csf"))
    tumor = mrml.volume_to_node(mrml_scene, simulate(atlas, GrowthParameters(TRUE_SEED_RAS_MM, 5.0, 2.0)), "tumor")
    logic = module.TumorPersonalizationLogic()
    run = logic.startBackgroundRun(nodes, tumor, method="direct", device="cpu")
    fractions = set()
    while not run.poll():
        fractions.add(run.fraction)
        time.sleep(0.1)
    assert run.returncode == 0, run.errorMessage()
    assert len(fractions) > 2, "progress was followed"
    summary, outputs = logic.loadOutputs(run.outputDirectory, tumor)
    run.cleanup()
    assert np.linalg.norm(np.subtract(summary["seed_ras_mm"], TRUE_SEED_RAS_MM)) < 15.0
    assert mrml.volume_from_node(outputs["infiltration"]).geometry.same_grid(atlas.geometry)


def test_batch_script_on_the_bundled_atlas_under_plain_python(tmp_path):
    from TumorPersonalizationLib import GrowthParameters, load_atlas, simulate

    tumor_path = tmp_path / "tumor.nii.gz"
    simulate(load_atlas(2), GrowthParameters(TRUE_SEED_RAS_MM, 5.0, 2.0)).save(tumor_path)
    out_dir = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, str(REPOSITORY / "scripts" / "slicer_batch.py"), "--tissue", "atlas", "--tumor",
         str(tumor_path), "--method", "direct", "--progress", "none", "--out-dir", str(out_dir)],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(batch_module().OUTPUT_FILES)
    summary = json.loads((out_dir / "parameters.json").read_text())
    assert np.linalg.norm(np.subtract(summary["seed_ras_mm"], TRUE_SEED_RAS_MM)) < 15.0


def test_self_test_without_dependencies_is_a_skip_in_reload_and_test_and_under_unittest(module, monkeypatch):
    """"Reload and Test" calls runTest directly: a missing torch shows as a skip message there, not an error; under
    unittest's runner the same test is reported as skipped."""
    monkeypatch.setattr(module.slicer_deps, "installed_version", lambda name: None)
    mrml.create_headless_scene()
    messages = []
    case = module.TumorPersonalizationTest("runTest")
    monkeypatch.setattr(case, "delayDisplay", lambda message, msec=None: messages.append(message))
    case.runTest()  # raises nothing
    assert any(m.startswith("Test skipped: ") and "PyTorch (torch >=2.1) is not installed" in m for m in messages)
    result = case.defaultTestResult()
    module.TumorPersonalizationTest("runTest").run(result)
    assert result.wasSuccessful() and len(result.skipped) == 1, result.errors
