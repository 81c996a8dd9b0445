"""The Python API: load what the pipeline trained, then encode, decode, truncate and sample.

The pipeline's model files rebuild themselves (``spectralar.artifacts``); this module wraps them in
two small objects with checked inputs and documented shapes, so a notebook needs neither the
stage code nor the params file::

    import spectralar

    codec = spectralar.load_codec("models/tokenizer")          # the train_tokenizer stage's folder
    generator = spectralar.load_generator("models/generator")  # the train_generator stage's folder
    generator.check_codec(codec)                                # trained on this tokenizer's tokens?

    images, labels = spectralar.load_images("data/prepared", "val", count=8)  # uint8 (8, H, W, C)
    ids = codec.encode(images)                     # int64 (8, N): the spectral token ids
    coarse = codec.decode(ids, num_tokens=2)       # uint8 (8, H, W, C) from the first 2 tokens only
    sampled = spectralar.generate(generator, ["Sneaker"] * 4, seed=0)   # int64 (4, N)
    spectralar.save_png("sneakers.png", codec.decode(sampled))

Image conventions: uint8 numpy arrays are (B, H, W, C) with values 0..255 (ADM's sample layout,
what ``samples.npz`` holds); float torch tensors are (B, C, H, W) in [-1, 1] (the models' input
range, ``uint8 / 127.5 - 1``). Token ids are int64 tensors (B, n), n <= N; the first n ids of an
image decode the tokenizer's reconstruction of the image low-passed at ω_n (Nested Spectral
Tokenization, SpectralAR §3.1), so dropping the last tokens is truncation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from spectralar.artifacts import GENERATOR_FILE, TOKENIZER_FILE
from spectralar.artifacts import load_codec as _load_codec_module
from spectralar.artifacts import load_generator as _load_generator_model
from spectralar.data.loader import to_float
from spectralar.io import sha256_file
from spectralar.models.codec import decode_uint8
from spectralar.models.sampling import generate as generate_ids

__all__ = ["Codec", "Generator", "load_codec", "load_generator", "load_images", "generate", "save_png"]

Images = Union[np.ndarray, torch.Tensor]
Ids = Union[np.ndarray, torch.Tensor]
Labels = Union[int, str, Sequence[Union[int, str]], np.ndarray, torch.Tensor]


def _model_file(path: str | Path, file_name: str, stage: str) -> Path:
    """``path`` itself when it is a file, else ``path/file_name`` (a stage's output folder)."""
    path = Path(path)
    found = path / file_name if path.is_dir() else path
    if not found.is_file():
        raise FileNotFoundError(f"{found} not found: pass the {stage} stage's output folder or its {file_name} "
                                f"(run `dvc repro {stage}` to make it)")
    return found


# ------------------------------------------------------------------------------------------------
# Codec: images <-> token ids
# ------------------------------------------------------------------------------------------------

class Codec:
    """A trained Nested Spectral Tokenizer: images -> N token ids -> images, any prefix decodable.

    Wraps :class:`spectralar.models.codec.SpectralCodec` (``.module``) in eval mode, on ``device``.

    Example::

        codec = spectralar.load_codec("models/tokenizer")
        ids = codec.encode(images_uint8_BHWC)          # (B, N) int64
        full = codec.decode(ids)                       # (B, H, W, C) uint8
        blurred = codec.decode(ids, num_tokens=1)      # the 1-token prefix: lowest frequencies only
    """

    def __init__(self, module, path: Optional[Path] = None) -> None:
        self.module = module
        self.path = path
        self._sha256: Optional[str] = None

    @property
    def num_tokens(self) -> int:
        """N, the length of a full token sequence."""
        return self.module.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.module.tokenizer.config.codebook_size

    @property
    def omegas(self) -> tuple[int, ...]:
        """ω_1..ω_N: token i completes the ω_i x ω_i low-frequency DCT block."""
        return tuple(self.module.omegas)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images the tokenizer was trained on (the only size it takes)."""
        config = self.module.tokenizer.config
        return (config.image_size, config.image_size, config.in_channels)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def sha256(self) -> Optional[str]:
        """sha256 of the loaded file (what the token dump and the generator file record), or None."""
        if self._sha256 is None and self.path is not None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    @torch.no_grad()
    def encode(self, images: Images, batch_size: int = 256) -> torch.Tensor:
        """Images -> token ids, int64 (B, N) on the codec's device.

        ``images``: uint8 numpy (B, H, W, C) in 0..255, or a float tensor (B, C, H, W) in [-1, 1],
        at :attr:`image_shape`. Encoded in chunks of ``batch_size`` (the result does not depend on it
        beyond float rounding).
        """
        x_BCHW = self.as_model_input(images)
        chunks = [self.module.encode(x_BCHW[start:start + batch_size].to(self.device))
                  for start in range(0, len(x_BCHW), batch_size)]
        return torch.cat(chunks).long()  # (B, N)

    @torch.no_grad()
    def decode_float(self, ids: Ids, num_tokens: Optional[int] = None, batch_size: int = 256) -> torch.Tensor:
        """Token ids (B, n) -> images, float (B, C, H, W) in [-1, 1] on the codec's device.

        ``num_tokens`` = k decodes only the first k ids (truncation: the reconstruction of the
        image low-passed at ω_k); default: all n given ids.
        """
        ids_Bn = self.as_ids(ids, num_tokens)
        return torch.cat([self.module.decode(ids_Bn[start:start + batch_size])
                          for start in range(0, len(ids_Bn), batch_size)])

    def decode(self, ids: Ids, num_tokens: Optional[int] = None, batch_size: int = 256) -> np.ndarray:
        """Token ids (B, n) -> images, uint8 numpy (B, H, W, C) (ADM's layout, as ``samples.npz``).

        ``num_tokens`` = k decodes only the first k ids (truncation); default: all n given ids.
        The sample stage decodes its samples and their truncations with the same function.
        """
        return decode_uint8(self.module, self.as_ids(ids, num_tokens), batch_size)

    def as_model_input(self, images: Images) -> torch.Tensor:
        """Checked images as the float (B, C, H, W) in [-1, 1] the tokenizer takes (on the CPU)."""
        height, width, channels = self.image_shape
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise ValueError(f"numpy images must be uint8 (B, H, W, C) in 0..255, got dtype {images.dtype}; "
                                 "pass floats as a torch tensor (B, C, H, W) in [-1, 1]")
            if images.ndim != 4 or images.shape[1:] != (height, width, channels):
                raise ValueError(f"numpy images must be uint8 (B, {height}, {width}, {channels}) (batch, height, "
                                 f"width, channels), got shape {images.shape}"
                                 + ("; add a batch axis: images[None]" if images.ndim == 3 else ""))
            if not len(images):
                raise ValueError("no images to encode (batch of 0)")
            return to_float(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))  # (B, C, H, W)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a uint8 numpy array (B, H, W, C) or a float tensor (B, C, H, W), "
                            f"got {type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(f"tensor images must be float (B, C, H, W) in [-1, 1], got dtype {images.dtype}; "
                             "pass 0..255 pixels as a uint8 numpy array (B, H, W, C)")
        if images.ndim != 4 or tuple(images.shape[1:]) != (channels, height, width):
            raise ValueError(f"tensor images must be float (B, {channels}, {height}, {width}) (batch, channels, "
                             f"height, width), got shape {tuple(images.shape)}"
                             + ("; add a batch axis: images[None]" if images.ndim == 3 else ""))
        if not len(images):
            raise ValueError("no images to encode (batch of 0)")
        images = images.detach().float()
        low, high = float(images.min()), float(images.max())
        if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:  # a small float overshoot (a resize, a blur) is tolerated
            raise ValueError(f"float images must lie in [-1, 1] (uint8 / 127.5 - 1), got values in "
                             f"[{low:.3g}, {high:.3g}]")
        return images.clamp(-1, 1)

    def as_ids(self, ids: Ids, num_tokens: Optional[int] = None) -> torch.Tensor:
        """Checked token ids (B, n) as int64 on the codec's device, cut to the first ``num_tokens``."""
        if isinstance(ids, np.ndarray):
            ids = torch.from_numpy(ids.astype(np.int64))
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must be integers (B, n), got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.num_tokens:
            raise ValueError(f"ids must be (B, n) with 1 <= n <= N = {self.num_tokens}, got shape {tuple(ids.shape)}"
                             + ("; add a batch axis: ids[None]" if ids.ndim == 1 else ""))
        if not len(ids):
            raise ValueError("no ids to decode (batch of 0)")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"ids must lie in 0..{self.vocab_size - 1} (the tokenizer's codebook), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        if num_tokens is not None:
            if not 1 <= num_tokens <= ids.shape[1]:
                raise ValueError(f"num_tokens must lie in 1..{ids.shape[1]} (the ids given), got {num_tokens}")
            ids = ids[:, :num_tokens]
        return ids.long().to(self.device)

    def __repr__(self) -> str:
        height, width, channels = self.image_shape
        return (f"Codec(N={self.num_tokens}, vocab={self.vocab_size}, images {height}x{width}x{channels}, "
                f"omegas={list(self.omegas)}, file={self.path})")


def load_codec(path: str | Path = "models/tokenizer", device: str | torch.device = "cpu") -> Codec:
    """The trained tokenizer of the pipeline as a :class:`Codec`.

    ``path``: the train_tokenizer stage's output folder (``models/tokenizer``) or its
    ``tokenizer.pt``. ``device``: where it runs (``"cpu"``, ``"cuda"``, ...).

    Example::

        codec = spectralar.load_codec("models/tokenizer")
        codec.num_tokens, codec.image_shape        # e.g. 16, (32, 32, 1)
    """
    file = _model_file(path, TOKENIZER_FILE, "train_tokenizer")
    return Codec(_load_codec_module(file, device), file)


# ------------------------------------------------------------------------------------------------
# Generator: class labels -> token ids
# ------------------------------------------------------------------------------------------------

class Generator:
    """A trained class-conditional spectral AR generator (``.model``: a :class:`SpectralGPT`).

    ``class_names`` come from the data it was trained on; ``tokenizer_sha256`` names the tokenizer
    file whose tokens it learnt (check with :meth:`check_codec` before decoding its ids).

    Example::

        generator = spectralar.load_generator("models/generator")
        ids = generator.sample(["Sneaker", "Bag"], seed=0)   # (2, N) int64
    """

    def __init__(self, model, extra: dict[str, Any], path: Optional[Path] = None) -> None:
        self.model = model
        self.path = path
        self.class_names: list[str] = list(extra.get("class_names") or
                                           [str(c) for c in range(model.config.num_classes)])
        self.tokenizer_sha256: Optional[str] = extra.get("tokenizer_sha256")

    @property
    def num_tokens(self) -> int:
        return self.model.config.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_codec(self, codec: Codec) -> None:
        """Raise ValueError unless ``codec`` is the tokenizer whose tokens this generator learnt
        (same N and vocabulary, and the same file when the generator recorded its sha256)."""
        if (self.num_tokens, self.vocab_size) != (codec.num_tokens, codec.vocab_size):
            raise ValueError(f"the generator (N={self.num_tokens}, vocab {self.vocab_size}) does not match the "
                             f"tokenizer (N={codec.num_tokens}, vocab {codec.vocab_size})")
        if self.tokenizer_sha256 and codec.sha256 and self.tokenizer_sha256 != codec.sha256:
            raise ValueError(f"{self.path} was trained on the tokens of another tokenizer than {codec.path} "
                             f"(sha256 {self.tokenizer_sha256[:12]}... vs {codec.sha256[:12]}...): "
                             "rerun dump_tokens and train_generator, or load the matching tokenizer")

    def labels(self, labels: Labels) -> torch.Tensor:
        """Class indices or names (one, a list, an array or a tensor) -> int64 (B,), range-checked."""
        if isinstance(labels, (int, np.integer, str)):
            labels = [labels]
        if isinstance(labels, np.ndarray) and labels.dtype.kind in "US":  # an array of class names
            labels = labels.tolist()
        if isinstance(labels, (list, tuple)):
            labels = [self._class_index(label) for label in labels]
        tensor = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, torch.Tensor) else labels
        if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.ndim != 1 or not len(tensor):
            raise ValueError(f"labels must be class indices or names, one or a 1-D batch; got "
                             f"{tensor.dtype} of shape {tuple(tensor.shape)}")
        if int(tensor.min()) < 0 or int(tensor.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, "
                             f"got {int(tensor.min())}..{int(tensor.max())}")
        return tensor.long()

    def _class_index(self, label: int | str) -> int:
        if isinstance(label, str):
            if label not in self.class_names:
                raise ValueError(f"unknown class {label!r}; the classes are {self.class_names}")
            return self.class_names.index(label)
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise ValueError(f"a label must be a class index or name, got {label!r}")
        return int(label)

    def sample(self, labels: Labels, *, num_tokens: Optional[int] = None, seed: Optional[int] = 0,
               batch_size: int = 256, **sampling: Any) -> torch.Tensor:
        """Sample token ids int64 (B, n) for ``labels``: see :func:`generate`."""
        labels_B = self.labels(labels)
        random = torch.Generator(self.device)
        if seed is None:
            random.seed()
        else:
            random.manual_seed(seed)
        prefix_BP = sampling.pop("prefix_ids", None)  # spectrum completion: one prefix row per label
        if prefix_BP is not None:
            prefix_BP = torch.as_tensor(prefix_BP).long()
            if prefix_BP.ndim != 2 or len(prefix_BP) != len(labels_B):
                raise ValueError(f"prefix_ids must be (B={len(labels_B)}, P), got {tuple(prefix_BP.shape)}")
        chunks = []
        for start in range(0, len(labels_B), batch_size):
            prefix = None if prefix_BP is None else prefix_BP[start:start + batch_size].to(self.device)
            chunks.append(generate_ids(self.model, labels_B[start:start + batch_size].to(self.device),
                                       num_tokens=num_tokens, prefix_ids=prefix, generator=random, **sampling))
        return torch.cat(chunks)

    def __repr__(self) -> str:
        return (f"Generator(N={self.num_tokens}, vocab={self.vocab_size}, {self.num_classes} classes, "
                f"file={self.path})")


def load_generator(path: str | Path = "models/generator", device: str | torch.device = "cpu") -> Generator:
    """The trained generator of the pipeline as a :class:`Generator`.

    ``path``: the train_generator stage's output folder (``models/generator``) or its
    ``generator.pt``. ``device``: where it runs.

    Example::

        generator = spectralar.load_generator("models/generator")
        generator.class_names[:3]                  # e.g. ['T-shirt/top', 'Trouser', 'Pullover']
    """
    file = _model_file(path, GENERATOR_FILE, "train_generator")
    model, extra = _load_generator_model(file, device)
    return Generator(model, extra, file)


def generate(generator: Generator, labels: Labels, *, num_tokens: Optional[int] = None, seed: Optional[int] = 0,
             batch_size: int = 256, **sampling: Any) -> torch.Tensor:
    """Sample token ids int64 (B, n) for class ``labels`` (indices or names), on the generator's device.

    num_tokens: stop after the first n <= N tokens (truncated generation, SpectralAR Table 3). With
        the same seed and all labels in one batch they equal the first n tokens of a full run (a
        later batch would start from a random state that fewer draws left behind).
    seed: seeds every draw (None: a fresh random seed). The labels are drawn in chunks of
        ``batch_size`` from one seeded generator, as the sample stage does, so the sample stage's
        labels, ``run.seed`` and ``sample.batch_size`` reproduce its ``samples.npz`` ids.
    sampling: the keywords of :func:`spectralar.models.sampling.generate` (``cfg_scale``,
        ``cfg_schedule``, ``temperature``, ``top_k``, ``top_p``, ``prefix_ids`` for spectrum
        completion, ``use_kv_cache``, ``compiled`` for torch.compile over a static KV cache), with its
        defaults (VAR's: cfg 1.5 on a linear ramp).

    Example::

        ids = spectralar.generate(generator, ["Sneaker"] * 8, seed=0, cfg_scale=2.0)
        images = codec.decode(ids)                  # uint8 (8, H, W, C)
    """
    return generator.sample(labels, num_tokens=num_tokens, seed=seed, batch_size=batch_size, **sampling)


# ------------------------------------------------------------------------------------------------
# Data in, pictures out
# ------------------------------------------------------------------------------------------------

def load_images(data: str | Path = "data/prepared", split: str = "val",
                count: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (B, H, W, C) and labels int64 (B,) of a prepared dataset's split.

    ``count`` images spread evenly over the split (as the evaluation subsets are: an ImageFolder
    split is stored class by class); None: the whole split.
    """
    from spectralar.data.shards import ImageShards

    shards = ImageShards(data, split)
    index = np.arange(len(shards)) if count is None else shards.spread(count)
    return shards.images(index), shards.labels[index]


def save_png(path: str | Path, images: np.ndarray, columns: Optional[int] = None) -> Path:
    """Save uint8 images (B, H, W, C) as one PNG grid, ``columns`` per row (default: all in one row)."""
    from PIL import Image

    valid = isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
    if not valid or images.shape[-1] not in (1, 3):
        raise ValueError(f"save_png takes uint8 (B, H, W, C) with C = 1 or 3 (what Codec.decode returns), got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    count, height, width, channels = images.shape
    columns = count if columns is None else max(1, min(columns, count))
    rows = -(-count // columns)
    canvas = np.zeros((rows * height, columns * width, channels), dtype=np.uint8)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        canvas[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    Image.fromarray(canvas[..., 0] if channels == 1 else canvas).save(path)
    return Path(path)
