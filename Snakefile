# SpectralAR pipeline for Snakemake, generated from dvc.yaml (the one declaration of the stages):
# workflow/rules/stages.smk makes one rule per dvc.yaml stage (rule name = DVC stage =
# `python -m spectralar <stage>`), workflow/rules/sweep.smk the sweep rows of params.yaml's `sweeps`.
from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/stages.smk"
include: "workflow/rules/sweep.smk"


rule all:
    input:
        final_outputs(PIPELINE),
    default_target: True
