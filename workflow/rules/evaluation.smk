rule train_evalnet:
    input:
        "spectralar/data",
        "spectralar/evaluation",
        "spectralar/stages/common.py",
        "spectralar/stages/train_evalnet.py",
        "spectralar/training",
        "data/prepared",
    output:
        directory("models/evalnet"),
        metrics="metrics/train_evalnet.json",
    threads: STAGE_THREADS
    params:
        sections=section("run", "train_evalnet"),
    resources:
        gpu=1,
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/train_evalnet.log",
    shell:
        "python -m spectralar train_evalnet --params params.yaml --metrics metrics/train_evalnet.json --data data/prepared --out models/evalnet 2> {log}"


rule reference_stats:
    input:
        "spectralar/data",
        "spectralar/evaluation",
        "spectralar/stages/common.py",
        "spectralar/stages/reference_stats.py",
        "spectralar/training",
        "data/prepared",
        "models/evalnet",  # directory output of train_evalnet
    output:
        directory("data/reference"),
        metrics="metrics/reference_stats.json",
    threads: STAGE_THREADS
    params:
        sections=section("run", "reference_stats"),
    resources:
        gpu=1,
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/reference_stats.log",
    shell:
        "python -m spectralar reference_stats --params params.yaml --metrics metrics/reference_stats.json --data data/prepared --evalnet models/evalnet/evalnet.pt --out data/reference 2> {log}"


rule correlation:
    input:
        "spectralar/data",
        "spectralar/evaluation",
        "spectralar/stages/correlation.py",
        "data/prepared",
    output:
        directory("reports/correlation"),
        metrics="metrics/correlation.json",
    threads: STAGE_THREADS
    params:
        sections=section("run", "correlation"),
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/correlation.log",
    shell:
        "python -m spectralar correlation --params params.yaml --metrics metrics/correlation.json --data data/prepared --out reports/correlation 2> {log}"


rule evaluate:
    input:
        "spectralar/data",
        "spectralar/evaluation",
        "spectralar/models",
        "spectralar/spectral",
        "spectralar/stages/common.py",
        "spectralar/stages/dump_tokens.py",
        "spectralar/stages/evaluate.py",
        "spectralar/stages/extract_proxy_codes.py",
        "spectralar/stages/reference_stats.py",
        "spectralar/stages/sample.py",
        "spectralar/stages/train_generator.py",
        "spectralar/stages/train_tokenizer.py",
        "spectralar/training",
        "samples",  # directory output of sample
        "data/reference",  # directory output of reference_stats
        "models/evalnet",  # directory output of train_evalnet
        "models/tokenizer",  # directory output of train_tokenizer
        "data/prepared",
    output:
        directory("reports/evaluate"),
        metrics="metrics/evaluate.json",
    threads: STAGE_THREADS
    params:
        sections=section("run", "evaluate"),
    resources:
        gpu=1,
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/evaluate.log",
    shell:
        "python -m spectralar evaluate --params params.yaml --metrics metrics/evaluate.json --samples samples --reference data/reference --evalnet models/evalnet/evalnet.pt --tokenizer models/tokenizer/tokenizer.pt --data data/prepared --out reports/evaluate 2> {log}"
