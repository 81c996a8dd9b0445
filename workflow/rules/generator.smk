rule dump_tokens:
    input:
        "spectralar/data",
        "spectralar/models",
        "spectralar/stages/common.py",
        "spectralar/stages/dump_tokens.py",
        "spectralar/training",
        "data/prepared",
        "models/tokenizer",  # directory output of train_tokenizer (Snakemake matches outputs, not files inside them)
    output:
        directory("data/tokens"),
        metrics="metrics/dump_tokens.json",
    threads: STAGE_THREADS
    params:
        sections=section("run", "dump_tokens"),
    resources:
        gpu=1,
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/dump_tokens.log",
    shell:
        "python -m spectralar dump_tokens --params params.yaml --metrics metrics/dump_tokens.json --data data/prepared --tokenizer models/tokenizer/tokenizer.pt --out data/tokens 2> {log}"


rule train_generator:
    input:
        "spectralar/data",
        "spectralar/models",
        "spectralar/spectral",
        "spectralar/stages/common.py",
        "spectralar/stages/dump_tokens.py",
        "spectralar/stages/extract_proxy_codes.py",
        "spectralar/stages/train_generator.py",
        "spectralar/stages/train_tokenizer.py",
        "spectralar/training",
        "data/tokens",
    output:
        directory("models/generator"),
        metrics="metrics/train_generator.json",
    threads: STAGE_THREADS
    params:
        sections=section("run", "generator", "train_generator"),
    resources:
        gpu=1,
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/train_generator.log",
    shell:
        "python -m spectralar train_generator --params params.yaml --metrics metrics/train_generator.json --tokens data/tokens --out models/generator --checkpoints runs/checkpoints/train_generator 2> {log}"


rule sample:
    input:
        "spectralar/data",
        "spectralar/models",
        "spectralar/spectral",
        "spectralar/stages/common.py",
        "spectralar/stages/dump_tokens.py",
        "spectralar/stages/extract_proxy_codes.py",
        "spectralar/stages/sample.py",
        "spectralar/stages/train_generator.py",
        "spectralar/stages/train_tokenizer.py",
        "spectralar/training",
        "models/generator",  # directory output of train_generator
        "models/tokenizer",  # directory output of train_tokenizer
        "data/prepared",
    output:
        directory("samples"),
        metrics="metrics/sample.json",
    threads: STAGE_THREADS
    params:
        sections=section("run", "sample"),
    resources:
        gpu=1,
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/sample.log",
    shell:
        "python -m spectralar sample --params params.yaml --metrics metrics/sample.json --generator models/generator/generator.pt --tokenizer models/tokenizer/tokenizer.pt --data data/prepared --out samples 2> {log}"
