"""Constants of the growth model and of the imaging model, defined once (docs/model.md).

Everything that decides what the model *is* lives here: the initial condition, which voxels can hold tumor cells,
how much slower grey matter diffuses, and the concentrations at which a tumor becomes visible on MRI. Other modules
import these names; none repeats the numbers.
"""
import math

# ---- growth model ---------------------------------------------------------------------------------------------------
# Initial condition: c0(r) = 250 / (4 pi 5)^(3/2) exp(-r^2 / 20 mm^2), set to 0 below 0.1, clipped to 1, 0 outside
# GM/WM (as in the reference toolkit the published dataset was made with, expressed in mm).
INITIAL_AMPLITUDE = 250.0 / (4.0 * math.pi * 5.0) ** 1.5
INITIAL_WIDTH_MM2 = 20.0
INITIAL_CUTOFF = 0.1
# Radius (mm) beyond which the initial condition is exactly zero: amplitude * exp(-r^2/20) < 0.1.
INITIAL_RADIUS_MM = math.sqrt(INITIAL_WIDTH_MM2 * math.log(INITIAL_AMPLITUDE / INITIAL_CUTOFF))

# Voxels with WM+GM below this hold no tumor cells and pass no flux (the face diffusivity rule).
BRAIN_FRACTION_THRESHOLD = 0.1
# Grey matter diffuses ten times slower than white matter.
GREY_TO_WHITE_DIFFUSIVITY = 0.1

# ---- imaging model --------------------------------------------------------------------------------------------------
# A tumor is visible where its cell concentration exceeds a threshold: on FLAIR/T2 (edema) at 0.25, on T1Gd (enhancing
# core) at 0.675. Values from the literature on image-driven tumor-model personalisation (Konukoglu et al., IEEE TMI
# 2010; Lipkova et al., IEEE TMI 2019), used by the published learnable-prior work and the PREDICT-GBM benchmark.
EDEMA_THRESHOLD = 0.25
CORE_THRESHOLD = 0.675
VISIBLE_THRESHOLDS = (EDEMA_THRESHOLD, CORE_THRESHOLD)
# Label values of a tumor segmentation by default, BraTS 2023's (NECROTIC, EDEMA, ENHANCING); BraTS 2021 files use
# enhancing = 4. observation.SegmentationLabels' defaults and every tumor-label option's default.
DEFAULT_TUMOR_LABELS = (1, 2, 3)

# ---- inversion methods ----------------------------------------------------------------------------------------------
# Names of the inversion methods (inversion/methods.py) and the default: the most accurate method whose median wall
# time stays within 30 s on 2 CPU cores on brains other than the bundled atlas (benchmarks/inversion.py: the shifted
# brains and nipype's brain). hybrid-fd refines with FD gradients, so a surrogate that is wrong on an unfamiliar
# brain cannot pull its answer away; hybrid is faster on the atlas but its worst cases on other brains are far worse.
METHODS = ("hybrid", "hybrid-fd", "gb-surrogate", "direct", "cma-surrogate", "cma-solver")
DEFAULT_METHOD = "hybrid-fd"
# Voxel size (mm) of the grid the search's FD runs use; the final run is always on the tissue's own grid.
DEFAULT_WORKING_SPACING_MM = 2.0

# ---- clinical target volume -----------------------------------------------------------------------------------------
# The standard radiotherapy plan: the tumor core grown by this margin (mm), clipped to the brain (ESTRO-EANO 2016
# guideline for glioblastoma, the PREDICT-GBM benchmark's standard plan).
STANDARD_MARGIN_MM = 15.0
