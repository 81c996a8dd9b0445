# The report: every stage's metrics and figures in reports/report.md, and the pipeline's MLflow record
# completed. Table 4's sweep table is an input only once a sweep has written it (snakemake ablation).


rule report:
    input:
        "spectralar/stages/report.py",
        "spectralar/sweep.py",
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
        "models/tokenizer",
        "models/generator",
        "samples",
        "reports/correlation",
        optional_input("runs/ablation/table.csv"),
    output:
        "reports/report.md",
        "reports/ablation.csv",
        "reports/truncation.csv",
        "reports/correlation.csv",
        "reports/stages.csv",
        directory("reports/figures"),
        metrics="metrics/report.json",
    params:
        sections=section("run", "sweeps"),
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/report.log",
    shell:
        "python -m spectralar report --params params.yaml --metrics metrics/report.json --metrics-dir metrics --tokenizer models/tokenizer --generator models/generator --samples samples --correlation reports/correlation --ablation runs/ablation/table.csv --out reports 2> {log}"
