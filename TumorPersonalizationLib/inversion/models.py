"""The forward models that score a candidate, with one interface (a batch of parameters in, one data loss per member
out), and the cache that builds them once for a problem and its sub-stages:
- ``FDModel``: the finite-difference solver on the working grid (2 mm by default): slow, right, differentiable;
- ``SurrogateModel``: the frozen neural surrogate in its frame around the tumor: fast, differentiable, approximate.
"""
from typing import Dict, NamedTuple, Optional

import torch

from ..frame import SurrogateFrame
from ..observation import GriddedObservation
from ..parameters import GrowthParameters
from ..solver import StepControl, TissueOperator, simulate_tensor
from ..surrogate import brain_mask_from_tissue
from ..tissue import Tissue


class FDModel:
    """The FD solver on the working grid, with the observation there: parameters -> data loss."""

    def __init__(self, tissue: Tissue, observation: GriddedObservation, device="cpu",
                 control: StepControl = StepControl()):
        if not tissue.geometry.same_grid(observation.geometry):
            raise ValueError("tissue and observation must share the working grid")
        self.operator = TissueOperator(tissue, device=device)
        self.observation = observation
        self.terms = observation.loss_terms(self.operator.device, self.operator.dtype)
        self.brain = self.operator.brain_mask
        self.control = control
        self.runs = 0

    def concentration(self, seeds, mu_d, mu_rho, cancel=None, progress=None) -> torch.Tensor:
        self.runs += 1
        return simulate_tensor(self.operator, mu_d, mu_rho, seeds, control=self.control, cancel=cancel,
                               progress=progress)

    def losses(self, seeds, mu_d, mu_rho, cancel=None) -> torch.Tensor:
        """(B, 3), (B,), (B,) tensors -> (B,) data losses (differentiable when the inputs require grad)."""
        return self.observation.loss(self.concentration(seeds, mu_d, mu_rho, cancel), self.brain, self.terms)

    def loss_of(self, parameters: GrowthParameters, cancel=None) -> float:
        with torch.no_grad():
            return float(self.losses([parameters.seed_ras_mm], [parameters.mu_d_mm], [parameters.mu_rho], cancel)[0])

    def no_tumor_loss(self) -> float:
        return self.observation.no_tumor_loss(self.brain, self.terms)


class SurrogateModel:
    """The frozen surrogate in its frame around the tumor: normalised parameters -> data loss in the frame."""

    def __init__(self, model, card: Dict, frame: SurrogateFrame, tissue: Tissue, observation: GriddedObservation,
                 device="cpu"):
        self.model, self.card, self.frame = model, card, frame
        self.device = torch.device(device)
        channels = frame.tissue_channels(tissue)
        self.tissue = torch.as_tensor(channels[None], dtype=torch.float32, device=self.device)
        self.brain = brain_mask_from_tissue(self.tissue)[0]
        self.observation = observation.in_frame(frame)
        self.terms = self.observation.loss_terms(self.device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        # The tissue half of the network, once: every candidate of a search shares it (about 40 % of a forward
        # pass), and nothing in it depends on the parameters, so no gradient flows through it.
        with torch.no_grad():
            self.encoded = self.model.encode(self.tissue)

    def predict(self, normalised: torch.Tensor) -> torch.Tensor:
        """(B, 5) normalised parameters -> (B, G, G, G) concentration in the frame."""
        return torch.sigmoid(self.model.decode(self.encoded, normalised))

    def losses(self, seeds, mu_d, mu_rho) -> torch.Tensor:
        normalised = self.frame.normalise(seeds, mu_d, mu_rho).to(torch.float32)
        return self.observation.loss(self.predict(normalised), self.brain, self.terms)

    def no_tumor_loss(self) -> float:
        return self.observation.no_tumor_loss(self.brain, self.terms)


class InverseNetwork(NamedTuple):
    """The inverse network, its model card and its frame around the tumor."""

    model: torch.nn.Module
    card: Dict
    frame: SurrogateFrame


class ModelCache:
    """The models of one problem, each built on first use and then shared: by the problem and by every sub-problem
    made from it (Problem.with_progress), so a method's stages load each network and build each operator once. The
    models keep the settings they were built with (the networks' names, the working grid's step control), whatever
    options a sub-problem is handed.

    tissue / observation: on the tissue's own grid (the networks' frames, the tissue-grid runs); work_tissue /
    work_observation: on the working grid (the FD model)."""

    def __init__(self, tissue: Tissue, observation: GriddedObservation, work_tissue: Tissue,
                 work_observation: GriddedObservation, options, device="cpu"):
        self.tissue, self.observation = tissue, observation
        self.work_tissue, self.work_observation = work_tissue, work_observation
        self.surrogate_name, self.inverse_name = options.surrogate, options.inverse
        self.working_control = options.working_step_control()
        self.device = device
        # Name -> {"kind", "sha256"} of every network loaded, for the result's provenance.
        self.models_used: Dict[str, Dict] = {}
        self._fd: Optional[FDModel] = None
        self._surrogate: Optional[SurrogateModel] = None
        self._inverse: Optional[InverseNetwork] = None
        self._tissue_operator: Optional[TissueOperator] = None

    def fd(self) -> FDModel:
        """The FD model on the working grid (the working step control)."""
        if self._fd is None:
            self._fd = FDModel(self.work_tissue, self.work_observation, self.device, self.working_control)
        return self._fd

    def frame_for(self, card: Dict) -> SurrogateFrame:
        """A network's frame around this problem's tumor, from its model card."""
        # Centred as the network's training crops were: on the whole concentration (the first datasets) or on its
        # visible part (the "anatomy" recipe), as recorded in the card's training-data configuration.
        anatomy = card.get("training_data", {}).get("config", {}).get("anatomy") or {}
        visible_only = anatomy.get("crop_center", "concentration") == "visible"
        return SurrogateFrame.from_card(card, self.observation.center_of_mass_ras(visible_only), self.tissue.geometry)

    def surrogate(self) -> SurrogateModel:
        if self._surrogate is None:
            from ..registry import load_model

            model, card = load_model(self.surrogate_name, kind="surrogate", device=self.device)
            self.models_used[self.surrogate_name] = {"kind": "surrogate", "sha256": card["sha256"]}
            self._surrogate = SurrogateModel(model, card, self.frame_for(card), self.tissue, self.observation,
                                             self.device)
        return self._surrogate

    def inverse(self) -> InverseNetwork:
        if self._inverse is None:
            from ..registry import load_model

            model, card = load_model(self.inverse_name, kind="inverse", device=self.device)
            self.models_used[self.inverse_name] = {"kind": "inverse", "sha256": card["sha256"]}
            self._inverse = InverseNetwork(model, card, self.frame_for(card))
        return self._inverse

    def tissue_operator(self) -> TissueOperator:
        """The solver's operator on the tissue's own grid, built once: a judge's runs and the final run share it."""
        if self._tissue_operator is None:
            self._tissue_operator = TissueOperator(self.tissue, device=self.device)
        return self._tissue_operator

    @property
    def fd_runs(self) -> int:
        """FD runs made on the working grid so far (0 when the FD model was never built)."""
        return self._fd.runs if self._fd is not None else 0

    @property
    def surrogate_loaded(self) -> bool:
        return self._surrogate is not None

    @property
    def network_frame(self) -> Optional[SurrogateFrame]:
        """The frame a network worked in (the surrogate's, else the inverse net's), None when neither was loaded."""
        if self._surrogate is not None:
            return self._surrogate.frame
        return self._inverse.frame if self._inverse is not None else None
