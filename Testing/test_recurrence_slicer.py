"""A follow-up segmentation through the Slicer module's Logic (slicer-core, headless): the coverage reaches the
result and the results table; a bad follow-up is refused before the personalisation; the background command passes
it on."""
import numpy as np
import pytest

from conftest_slicer import load_module_file, mrml_scene  # noqa: F401  (fixture; skips without slicer-core)
from TumorPersonalizationLib import GrowthParameters, load_atlas, simulate
from TumorPersonalizationLib import mrml
from TumorPersonalizationLib.errors import InputError
from TumorPersonalizationLib.geometry import Volume


def test_recurrence_node_reaches_the_result_and_the_table(mrml_scene, monkeypatch):  # noqa: F811
    module = load_module_file()
    atlas = load_atlas(2)
    nodes = tuple(mrml.volume_to_node(mrml_scene, Volume(getattr(atlas, n), atlas.geometry), n)
                  for n in ("wm", "gm", "csf"))
    tumor_volume = simulate(atlas, GrowthParameters((28.0, -12.0, 24.0), 6.0, 2.5))
    tumor = mrml.volume_to_node(mrml_scene, tumor_volume, "tumor")
    c = tumor_volume.array
    labels = np.where(c >= 0.675, 3, np.where(c >= 0.25, 2, 0)).astype(np.int16)
    followup = mrml.volume_to_node(mrml_scene, Volume(labels, atlas.geometry), "followup", labelmap=True)
    empty = mrml.volume_to_node(mrml_scene, Volume(np.zeros_like(labels), atlas.geometry), "nothing",
                                labelmap=True)
    logic = module.TumorPersonalizationLogic()

    import TumorPersonalizationLib.pipeline as pipeline

    def must_not_run(*args, **kwargs):
        raise AssertionError("the personalisation started before the follow-up was checked")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "personalize", must_not_run)
        with pytest.raises(InputError, match="recurrence 'nothing' is empty"):
            logic.personalize(nodes, tumor, method="direct", recurrenceNode=empty)

    result, outputs = logic.personalize(nodes, tumor, method="direct", device="cpu", recurrenceNode=followup)
    assert result.recurrence["enhancing"]["standard"] == 1.0  # today's core lies inside its own margin
    table = mrml.dict_from_table_node(outputs["table"])
    for part in ("all", "enhancing"):
        for plan in ("standard", "model"):
            assert table[f"recurrence.{part}.{plan}"] == mrml.format_value(result.recurrence[part][plan])
    assert float(table["recurrence.all.volume_cm3"]) == pytest.approx(result.recurrence["all"]["volume_cm3"])
    # The tissue the model ran on (the atlas refill by default) is shown, its refilled lesion outlined.
    assert table["tissue.source"] == "atlas"
    assert mrml.segment_names(outputs["tissue"]) == ["WM", "GM", "CSF", "Refilled lesion"]
    outline = mrml.labels_from_segmentation_node(outputs["tissue"], atlas.geometry, {"Refilled lesion": 1})
    np.testing.assert_array_equal(outline.array > 0, result.lesion.lesion)

    # The panel's follow-up selector reaches the Logic's recurrenceNode.
    parameters = logic.getParameterNode()
    parameters.tumorConcentration, parameters.recurrence = tumor, followup
    parameters.tissueInput = module.TISSUE_INPUTS[2]
    parameters.wmProbability, parameters.gmProbability, parameters.csfProbability = nodes
    assert logic.inputsFromParameterNode(parameters)["recurrenceNode"] is followup

    command = module.TumorPersonalizationLogic.personalizeCommand("t.nii.gz", "u.nii.gz", "segmentation", (1, 2, 4),
                                                                  None, "cpu", "out", recurrencePath="r.nii.gz")
    assert command[command.index("--recurrence") + 1] == "r.nii.gz"
    assert command[command.index("--recurrence-labels") + 1:][:3] == ["1", "2", "4"]
