#!/usr/bin/env python
"""The extension's Extensions Index entry: write the public address into the metadata, and check the index's rules.

The public address of the repository is known only at publication, so this script is the one place that sets it:
it writes the address (and the links derived from it) into the top-level CMakeLists.txt (EXTENSION_HOMEPAGE,
EXTENSION_ICONURL, EXTENSION_SCREENSHOTURLS) and into TumorPersonalization.json (scm_url, scm_revision), then runs
the checks below. Until publication the committed files carry an example address in the same form.

    python scripts/prepare_index_entry.py https://github.com/OWNER/SlicerTumorPersonalization [--revision main]
    python scripts/prepare_index_entry.py --check            # check the committed files only (CI)
    python scripts/prepare_index_entry.py ADDRESS --root DIR  # work on a copy of the repository in DIR

The checks follow the rules the Extensions Index applies to a submitted entry (its description-file checker):
- the description file parses as JSON, has LF line endings only, a "$schema", and writes every array one item a
  line; its name (without .json) is the CMake project name and does not start with "Slicer";
- "category" is one of the index's accepted categories, and the CMake EXTENSION_CATEGORY is the same;
- "scm_url" is a git or https URL (scheme://host/path) whose repository name contains "Slicer" (the index's naming
  rule for repositories; the extension keeps its own name);
- EXTENSION_HOMEPAGE, EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS are literal http(s) links in the forms the
  index's checker reads (a quoted string each), derived from scm_url at scm_revision;
- the icon and every screenshot they link to exist in the repository as PNG files; a LICENSE file exists.
What needs the network (cloning, downloading the images, the repository's topics) is not checked here.

Exit code 0 when every check passes, 1 with one line per problem otherwise, 2 on a bad address.
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlsplit

REPOSITORY = Path(__file__).resolve().parents[1]
EXTENSION_NAME = "TumorPersonalization"
CATEGORY = "Simulation"
# Files the index links to, relative to the repository root.
ICON_PATH = "TumorPersonalization/Resources/Icons/TumorPersonalization.png"
SCREENSHOT_PATHS = ("Resources/Images/TumorPersonalization_panel.png",)
SCHEMA = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
          "slicer-extension-catalog-entry-schema-v1.0.1.json#")
# The index's accepted categories (its checker's list).
ACCEPTED_CATEGORIES = (
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda", "Converters",
    "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation", "Filtering",
    "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis", "IGT", "Informatics",
    "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning", "Otolaryngology",
    "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy", "Registration", "Remote",
    "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis", "Shape Regression", "Shape Visualization",
    "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging", "Supervisely", "Surface Models", "SurfaceLearner",
    "Tomographic Reconstruction", "Tracking", "Tractography", "Training", "Ultrasound", "Utilities",
    "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools", "Web System Tools", "Wizards",
)
LINK_VARIABLES = ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS")


class AddressError(ValueError):
    """The address given is not one the index accepts."""


# ---- the links, from the address ---------------------------------------------------------------------------------
def check_address(address: str) -> str:
    """The address without a trailing slash or ".git". Raises AddressError unless it is an https or git URL whose
    repository name contains "Slicer"."""
    address = address.strip().rstrip("/")
    if address.endswith(".git"):
        address = address[: -len(".git")]
    parts = urlsplit(address)
    if "://" not in address or parts.scheme not in ("https", "git") or not parts.netloc or \
            len([p for p in parts.path.split("/") if p]) < 1:
        raise AddressError(f"{address!r} is not an https:// or git:// repository address")
    name = parts.path.rstrip("/").split("/")[-1]
    if "slicer" not in name.lower():
        raise AddressError(f"repository name {name!r} does not contain 'Slicer' (the index's rule; publish the "
                           f"repository as Slicer{EXTENSION_NAME})")
    return address


def raw_link(address: str, revision: str, path: str) -> str:
    """The https link to a file of the repository at `revision` (GitHub's raw-content host for github.com, the
    "/raw/<revision>/" form of other hosts)."""
    parts = urlsplit(address)
    if parts.netloc.lower() == "github.com":
        return f"https://raw.githubusercontent.com{parts.path}/{revision}/{path}"
    return f"https://{parts.netloc}{parts.path}/raw/{revision}/{path}"


def links(address: str, revision: str) -> Dict[str, str]:
    """The CMake link variables for an address and revision."""
    homepage = address if address.startswith("https://") else "https://" + urlsplit(address).netloc + \
        urlsplit(address).path
    return {
        "EXTENSION_HOMEPAGE": homepage,
        "EXTENSION_ICONURL": raw_link(address, revision, ICON_PATH),
        "EXTENSION_SCREENSHOTURLS": " ".join(raw_link(address, revision, p) for p in SCREENSHOT_PATHS),
    }


# ---- reading and writing the files -------------------------------------------------------------------------------
def cmake_string(text: str, variable: str) -> Optional[str]:
    """The value of `set(VARIABLE "value")` in CMake text (the quoted form the index's checker reads), or None."""
    match = re.search(rf'set\s*\(\s*{variable}\s*"([^"]*)"\s*\)', text)
    return match.group(1) if match else None


def description_text(metadata: Dict) -> str:
    """The description file's text: two-space indentation (so each array item is on a line of its own), LF, a final
    newline."""
    return json.dumps(metadata, indent=2) + "\n"


def write_entry(address: str, revision: str = "main", root: Path = REPOSITORY) -> None:
    """Write the address into root/CMakeLists.txt and root/TumorPersonalization.json. Raises AddressError for an
    address the index would refuse, FileNotFoundError when a file is missing."""
    address = check_address(address)
    cmake_path = root / "CMakeLists.txt"
    text = cmake_path.read_text()
    for variable, value in links(address, revision).items():
        pattern = rf'set\s*\(\s*{variable}\s[^)]*\)'
        if not re.search(pattern, text):
            raise FileNotFoundError(f"{cmake_path} has no set({variable} ...)")
        text = re.sub(pattern, lambda _: f'set({variable} "{value}")', text, count=1)
    cmake_path.write_text(text)
    json_path = root / f"{EXTENSION_NAME}.json"
    metadata = json.loads(json_path.read_text())
    metadata.update({"scm_url": address, "scm_revision": revision})
    json_path.write_text(description_text(metadata))


# ---- the index's rules -------------------------------------------------------------------------------------------
def _png(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(8) == b"\x89PNG\r\n\x1a\n"


def check_entry(root: Path = REPOSITORY) -> List[str]:
    """Every broken rule of the module docstring's list, one sentence each ([] when the entry is acceptable)."""
    problems = []
    json_path = root / f"{EXTENSION_NAME}.json"
    raw = json_path.read_bytes()
    if b"\r" in raw:
        problems.append(f"{json_path.name}: line endings must be LF only")
    try:
        metadata = json.loads(raw.decode("utf-8"))
    except ValueError as error:
        return problems + [f"{json_path.name} is not valid JSON: {error}"]
    name = json_path.stem
    if name.lower().startswith("slicer"):
        problems.append(f"extension name {name!r} must not start with 'Slicer'")
    if not metadata.get("$schema"):
        problems.append(f"{json_path.name}: no $schema")
    text = raw.decode("utf-8")
    for key, value in metadata.items():
        if isinstance(value, list) and value and re.search(rf'"{re.escape(key)}"\s*:\s*\[[^\n\]]*[^\s\[]', text):
            problems.append(f"{json_path.name}: {key} must be written one item a line")
    for key in ("build_dependencies", "category", "scm_revision", "scm_url", "tier"):
        if key not in metadata:
            problems.append(f"{json_path.name}: {key} is missing")
    category = metadata.get("category")
    if category not in ACCEPTED_CATEGORIES:
        problems.append(f"category {category!r} is not one the index accepts (e.g. Simulation, Neuroimaging, "
                        f"Radiotherapy)")
    address = str(metadata.get("scm_url", ""))
    try:
        address = check_address(address)
    except AddressError as error:
        problems.append(f"scm_url: {error}")
        address = None

    cmake = (root / "CMakeLists.txt").read_text()
    project = re.search(r"project\s*\(\s*([^\s)]+)", cmake, re.IGNORECASE)
    if not project or project.group(1).strip("\"'") != name:
        problems.append(f"CMakeLists.txt project() must be {name}")
    if cmake_string(cmake, "EXTENSION_CATEGORY") != category:
        problems.append(f"EXTENSION_CATEGORY must equal the description's category {category!r}")
    values = {variable: cmake_string(cmake, variable) for variable in LINK_VARIABLES}
    for variable, value in values.items():
        urls = (value or "").split()
        if not urls:
            problems.append(f"{variable} must be set to a quoted http(s) link")
        for url in urls:
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
                problems.append(f"{variable} {url!r} is not an http(s) link")
    if address:
        expected = links(address, str(metadata.get("scm_revision", "main")))
        for variable in LINK_VARIABLES:
            if values[variable] is not None and values[variable] != expected[variable]:
                problems.append(f"{variable} does not follow scm_url and scm_revision (run this script with the "
                                f"address): {values[variable]!r} instead of {expected[variable]!r}")
    for path in (ICON_PATH,) + SCREENSHOT_PATHS:
        file = root / path
        if not file.is_file():
            problems.append(f"{path}, which the index entry links to, does not exist")
        elif not _png(file):
            problems.append(f"{path} is not a PNG image")
    if not (root / "LICENSE").is_file():
        problems.append("no LICENSE file in the repository root")
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="prepare_index_entry.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("address", nargs="?", help="the repository's public address, e.g. "
                                                   "https://github.com/OWNER/SlicerTumorPersonalization")
    parser.add_argument("--revision", default="main", help="the branch or tag the index builds (default main)")
    parser.add_argument("--check", action="store_true", help="only check the files as they are")
    parser.add_argument("--root", type=Path, default=REPOSITORY, help="the repository to work on (default: this one)")
    args = parser.parse_args(argv)
    if not args.check:
        if not args.address:
            parser.error("give the address, or --check")
        try:
            write_entry(args.address, args.revision, args.root)
        except AddressError as error:
            print(f"prepare_index_entry: error: {error}", file=sys.stderr)
            return 2
    problems = check_entry(args.root)
    for problem in problems:
        print(f"prepare_index_entry: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.root / (EXTENSION_NAME + '.json')}: the index's rules hold")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
