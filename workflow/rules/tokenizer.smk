rule train_proxy:
    input:
        "spectralar/data",
        "spectralar/models",
        "spectralar/stages/common.py",
        "spectralar/stages/train_proxy.py",
        "spectralar/training",
        "data/prepared",
    output:
        directory("models/proxy"),
        metrics="metrics/train_proxy.json",
    threads: STAGE_THREADS
    params:
        sections=section("run", "proxy", "train_proxy"),
    resources:
        gpu=1,
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/train_proxy.log",
    shell:
        "python -m spectralar train_proxy --params params.yaml --metrics metrics/train_proxy.json --data data/prepared --out models/proxy --checkpoints runs/checkpoints/train_proxy 2> {log}"


rule extract_proxy_codes:
    input:
        "spectralar/data",
        "spectralar/models",
        "spectralar/spectral",
        "spectralar/stages/common.py",
        "spectralar/stages/extract_proxy_codes.py",
        "spectralar/training",
        "data/prepared",
        "models/proxy",  # directory output of train_proxy (Snakemake matches outputs, not files inside them)
    output:
        directory("data/proxy_codes"),
        metrics="metrics/extract_proxy_codes.json",
    threads: STAGE_THREADS
    params:
        sections=section("run", "tokenizer", "extract_proxy_codes"),
    resources:
        gpu=1,
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/extract_proxy_codes.log",
    shell:
        "python -m spectralar extract_proxy_codes --params params.yaml --metrics metrics/extract_proxy_codes.json --data data/prepared --proxy models/proxy/proxy.pt --out data/proxy_codes 2> {log}"


rule train_tokenizer:
    input:
        "spectralar/data",
        "spectralar/models",
        "spectralar/spectral",
        "spectralar/stages/common.py",
        "spectralar/stages/extract_proxy_codes.py",
        "spectralar/stages/train_tokenizer.py",
        "spectralar/training",
        "data/prepared",
        "models/proxy",  # directory output of train_proxy (Snakemake matches outputs, not files inside them)
        "data/proxy_codes",
    output:
        directory("models/tokenizer"),
        metrics="metrics/train_tokenizer.json",
    threads: STAGE_THREADS
    params:
        sections=section("run", "tokenizer", "train_tokenizer"),
    resources:
        gpu=1,
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/train_tokenizer.log",
    shell:
        "python -m spectralar train_tokenizer --params params.yaml --metrics metrics/train_tokenizer.json --data data/prepared --proxy models/proxy/proxy.pt --codes data/proxy_codes --out models/tokenizer --checkpoints runs/checkpoints/train_tokenizer 2> {log}"
