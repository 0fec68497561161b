"""The extension's installed layout works: the library finds its atlas and models beside the module.

TumorPersonalization/CMakeLists.txt installs TumorPersonalization.py, TumorPersonalizationLib/ and Resources/ side by
side in the module folder. This test lays that folder out in a temporary directory from the CMake lists themselves
(so a file missing from the lists fails here), imports the library from there in a fresh interpreter (PYTHONPATH set
to that folder, working directory elsewhere, no TUMORPERSONALIZATION_RESOURCES), and loads the atlas and both models.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_slicer_module_static import LIBRARY_DIRECTORY, MODULE_DIRECTORY, REPOSITORY, cmake_list

MODULE_CMAKE = MODULE_DIRECTORY / "CMakeLists.txt"

CHECK = r"""
import json, sys
from pathlib import Path
import TumorPersonalizationLib
from TumorPersonalizationLib.atlas import load_atlas, resources_dir
from TumorPersonalizationLib.registry import SHIPPED_MODELS, load_model

atlas = load_atlas(2)
surrogate, surrogate_card = load_model(SHIPPED_MODELS["surrogate"])
inverse, inverse_card = load_model(SHIPPED_MODELS["inverse"])
print(json.dumps({
    "library": str(Path(TumorPersonalizationLib.__file__).resolve().parent),
    "resources": str(resources_dir().resolve()),
    "atlas_shape": list(atlas.geometry.shape_kji),
    "atlas_brain_voxels": int(atlas.brain_mask.sum()),
    "models": [surrogate_card["kind"], inverse_card["kind"]],
}))
"""


def lay_out_installed_module(folder):
    """The module folder as the extension installs it, from the CMake lists."""
    for script in cmake_list(MODULE_CMAKE, "MODULE_PYTHON_SCRIPTS"):
        shutil.copy2(MODULE_DIRECTORY / script, folder / script)
    (folder / "TumorPersonalizationLib").mkdir()
    for name in cmake_list(MODULE_CMAKE, "LIBRARY_PYTHON_FILES"):
        target = folder / "TumorPersonalizationLib" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(LIBRARY_DIRECTORY / name, target)
    for relative in cmake_list(MODULE_CMAKE, "MODULE_PYTHON_RESOURCES"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(MODULE_DIRECTORY / relative, folder / relative)
    for relative in cmake_list(MODULE_CMAKE, "LIBRARY_RUNTIME_RESOURCES"):
        target = folder / "Resources" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPOSITORY / "Resources" / relative, target)


def test_library_loads_atlas_and_models_from_the_installed_layout(tmp_path):
    installed = tmp_path / "qt-scripted-modules"
    installed.mkdir()
    lay_out_installed_module(installed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TUMORPERSONALIZATION_RESOURCES", "PYTHONPATH")}
    environment["PYTHONPATH"] = str(installed)

    completed = subprocess.run([sys.executable, "-c", CHECK], cwd=str(elsewhere), env=environment,
                               capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found["library"] == str((installed / "TumorPersonalizationLib").resolve()), "imported the installed copy"
    assert found["resources"] == str((installed / "Resources").resolve())
    assert found["atlas_shape"] == [81, 96, 78] and found["atlas_brain_voxels"] > 100000
    assert found["models"] == ["surrogate", "inverse"]
    # The module's own resources sit in the same Resources/ folder.
    assert (installed / "Resources" / "UI" / "TumorPersonalization.ui").is_file()
    assert (installed / "TumorPersonalization.py").is_file()


def test_resources_models_holds_only_the_shipped_models_and_their_cards():
    from TumorPersonalizationLib.registry import SHIPPED_MODELS

    models = Path(__file__).resolve().parents[1] / "Resources" / "Models"
    expected = {f"{name}{suffix}" for name in SHIPPED_MODELS.values() for suffix in (".pt", ".json")}
    assert {p.name for p in models.iterdir()} == expected
