"""Model registry: trained weights in Resources/Models, each with a JSON model card, loaded safely.

A model NAME is the pair NAME.pt (a state dict saved by torch.save) and NAME.json (the card: kind, network config,
grid, spacing, parameter scaling, training data manifest hash, epochs, wall time, held-out metrics and the weights'
sha256). Loading checks the checksum before torch.load(weights_only=True) reads a byte, so a corrupt, truncated or
substituted file is refused with a message that names it.
"""
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

from .errors import InputError
from .imageio import sha256_file

# The models personalisation loads by default and the Slicer extension ships, by kind: the one place their names
# are set. A retrained pair is switched here (the CMake resource list is checked against it by
# Testing/test_slicer_module_static.py); the cards of replaced models move to scripts/recipes/cards as provenance.
SHIPPED_MODELS: Dict[str, str] = {"surrogate": "surrogate32_v3", "inverse": "inverse32_v2"}


def models_dir() -> Path:
    from .atlas import resources_dir

    return resources_dir() / "Models"


def build_model(kind: str, config: Dict):
    """An untrained network of `kind` ("surrogate" or "inverse") with the design `config` (a card's or recipe's)."""
    if kind == "surrogate":
        from .surrogate import SurrogateConfig, SurrogateUNet

        return SurrogateUNet(SurrogateConfig.from_dict(config))
    if kind == "inverse":
        from .inverse_net import InverseConfig, InverseNet

        return InverseNet(InverseConfig.from_dict(config))
    raise InputError(f"unknown model kind {kind!r} (expected 'surrogate' or 'inverse')")


def save_model(model, card: Dict, name: str, directory: Optional[Path] = None) -> Tuple[Path, Path]:
    """Write NAME.pt and NAME.json (the card gains the weights' sha256 and file name)."""
    import io

    import torch

    from .imageio import atomic_write_bytes

    directory = Path(directory) if directory is not None else models_dir()
    weights_path, card_path = directory / f"{name}.pt", directory / f"{name}.json"
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    atomic_write_bytes(weights_path, buffer.getvalue())
    card = dict(card, weights_file=weights_path.name, sha256=sha256_file(weights_path))
    atomic_write_bytes(card_path, (json.dumps(card, indent=2) + "\n").encode())
    return weights_path, card_path


def read_card(name: str, directory: Optional[Path] = None) -> Dict:
    directory = Path(directory) if directory is not None else models_dir()
    card_path = directory / f"{name}.json"
    if not card_path.exists():
        raise InputError(f"model card not found: {card_path}")
    try:
        return json.loads(card_path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"model card {card_path} is not valid JSON ({error.msg})") from None


def load_model(name: str, kind: Optional[str] = None, grid: Optional[int] = None, device="cpu",
               directory: Optional[Path] = None):
    """(model in eval mode, card). Refuses a missing, corrupt or mismatched weights file, naming it."""
    import torch

    directory = Path(directory) if directory is not None else models_dir()
    card = read_card(name, directory)
    if kind is not None and card.get("kind") != kind:
        raise InputError(f"model {name} is a {card.get('kind')!r} model, not {kind!r}")
    if grid is not None and int(card["config"]["grid"]) != int(grid):
        raise InputError(f"model {name} was trained on a {card['config']['grid']}^3 grid, not {grid}^3 "
                         f"({directory / card.get('weights_file', name + '.pt')})")
    weights_path = directory / card.get("weights_file", f"{name}.pt")
    if not weights_path.exists():
        raise InputError(f"weights file not found: {weights_path} (train it with scripts/train.py)")
    actual = sha256_file(weights_path)
    if actual != card.get("sha256"):
        raise InputError(f"weights file {weights_path} is corrupt or was replaced: sha256 {actual[:12]}... does not "
                         f"match the model card's {str(card.get('sha256'))[:12]}...")
    try:
        state = torch.load(weights_path, map_location=device, weights_only=True)
    except Exception as error:  # the checksum matched, so this is a card written for a broken file
        raise InputError(f"cannot read weights file {weights_path}: {error}") from None
    model = build_model(card["kind"], card["config"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"weights file {weights_path} does not fit the network in its card: {first}") from None
    return model.to(device).eval(), card
