# SpectralAR pipeline for Snakemake. Rules live in workflow/rules/*.smk, one file per topic;
# rule name = DVC stage = `python -m spectralar <stage>` (tests/test_orchestration.py checks parity).
configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/generator.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        "metrics/prepare.json",
        "metrics/train_proxy.json",
        "metrics/extract_proxy_codes.json",
        "metrics/train_tokenizer.json",
        "metrics/train_evalnet.json",
        "metrics/reference_stats.json",
        "metrics/correlation.json",
        "metrics/dump_tokens.json",
        "metrics/train_generator.json",
        "metrics/sample.json",
        "metrics/evaluate.json",
        "metrics/report.json",
    default_target: True
