rule prepare:
    input:
        "spectralar/data",
        "spectralar/stages/prepare.py",
    output:
        directory("data/prepared"),
        metrics="metrics/prepare.json",
    threads: STAGE_THREADS
    params:
        sections=section("run", "data"),
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/prepare.log",
    shell:
        "python -m spectralar prepare --params params.yaml --metrics metrics/prepare.json --out data/prepared 2> {log}"
