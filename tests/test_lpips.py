"""LPIPS (VGG16) parity with a plain-torch reference of the `lpips` package's v0.1 'vgg' metric.

torchvision cannot be imported here (and `lpips` needs it), so the reference below rebuilds
torchvision's VGG16 `features` layout exactly (same state-dict keys) and the lpips formula.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from fape_jax.errors import FapeError
from fape_jax.models import lpips

# torchvision vgg16 cfg "D"; "M" = MaxPool2d(2, 2). Indices of the Sequential match torchvision's.
_CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class _TorchVGG16(torch.nn.Module):

  def __init__(self):
    super().__init__()
    layers, cin = [], 3
    for v in _CFG_D:
      if v == "M":
        layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        conv = torch.nn.Conv2d(cin, v, kernel_size=3, padding=1)
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # keeps activations O(1)
        torch.nn.init.uniform_(conv.bias, -0.1, 0.1)
        layers += [conv, torch.nn.ReLU(inplace=True)]
        cin = v
    self.features = torch.nn.Sequential(*layers)


class _NetLin(torch.nn.Module):

  def __init__(self, c):
    super().__init__()
    self.model = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Conv2d(c, 1, 1, bias=False))
    torch.nn.init.uniform_(self.model[1].weight, 0.0, 1.0)  # lpips' lin weights are >= 0


class _TorchLPIPS(torch.nn.Module):
  """lpips.LPIPS(net='vgg', version='0.1') forward, spatial=False, normalize=False."""

  def __init__(self):
    super().__init__()
    self.net = _TorchVGG16()
    for k, c in enumerate((64, 128, 256, 512, 512)):
      setattr(self, f"lin{k}", _NetLin(c))
    self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

  def taps(self, x):
    h, out = (x - self.shift) / self.scale, []
    for lo, hi in ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)):  # lpips.pretrained_networks.vgg16
      h = self.net.features[lo:hi](h)
      out.append(h)
    return out

  def forward(self, x0, x1):
    norm = lambda f: f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + 1e-10)
    val = 0
    for k, (f0, f1) in enumerate(zip(self.taps(x0), self.taps(x1))):
      d = (norm(f0) - norm(f1))**2
      val = val + getattr(self, f"lin{k}").model(d).mean([2, 3], keepdim=True)
    return val[:, 0, 0, 0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torch.manual_seed(0)
  ref = _TorchLPIPS().eval()
  d = tmp_path_factory.mktemp("lpips")
  vgg_sd = ref.net.state_dict()
  lin_sd = {k: v for k, v in ref.state_dict().items() if k.startswith("lin")}
  assert "features.28.weight" in vgg_sd and "lin4.model.1.weight" in lin_sd
  torch.save(vgg_sd, d / "vgg16-397923af.pth")
  torch.save(lin_sd, d / "vgg.pth")
  return ref, str(d / "vgg16-397923af.pth"), str(d / "vgg.pth")


def _pairs(shape, seed):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, shape).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, shape), -1, 1).astype(np.float32)
  return x, y


def _torch_nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("shape", [(4, 32, 32, 3), (2, 37, 45, 3)])  # odd: floor-mode pooling
def test_lpips_matches_torch_reference(reference, shape):
  ref, vgg_path, lin_path = reference
  ours = lpips.load_lpips(vgg_path, lin_path)
  x, y = _pairs(shape, seed=shape[1])
  with torch.no_grad():
    want = ref(_torch_nchw(x), _torch_nchw(y)).numpy()
    want_taps = ref.taps(_torch_nchw(x))
  got = np.asarray(nnx.jit(lambda m, a, b: m(a, b))(ours, x, y))
  assert got.shape == (shape[0],)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # The feature extractor on its own (the discriminator's backbone) gives torchvision's taps.
  for ours_tap, ref_tap in zip(ours.features(jnp.asarray(x)), want_taps):
    ref_tap = ref_tap.numpy().transpose(0, 2, 3, 1)
    assert ours_tap.shape == ref_tap.shape
    np.testing.assert_allclose(np.asarray(ours_tap), ref_tap, rtol=1e-4,
                               atol=1e-4 * np.abs(ref_tap).max())


def test_lpips_identity_zero_and_monotone_in_noise(reference):
  _, vgg_path, lin_path = reference
  ours = lpips.load_lpips(vgg_path, lin_path)
  x, _ = _pairs((3, 32, 32, 3), seed=1)
  noise = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
  assert np.all(np.asarray(ours(x, x)) == 0.0)
  dists = [np.asarray(ours(x, np.clip(x + s * noise, -1, 1))) for s in (0.05, 0.15, 0.4)]
  assert np.all(dists[0] > 0)
  assert np.all(dists[0] < dists[1]) and np.all(dists[1] < dists[2]), dists


def test_weights_are_frozen_type_and_other_formats_load_the_same(reference, tmp_path):
  _, vgg_path, lin_path = reference
  ours = lpips.load_lpips(vgg_path, lin_path)
  # Nothing an nnx.Param optimiser would train.
  assert not jax.tree.leaves(nnx.state(ours, nnx.Param))
  assert len(jax.tree.leaves(nnx.state(ours, lpips.PretrainedWeight))) == 13 * 2 + 5
  vgg_sd = lpips.read_state_dict(vgg_path)
  lin_sd = lpips.read_state_dict(lin_path)
  save_file(vgg_sd, str(tmp_path / "vgg16.safetensors"))
  np.savez(tmp_path / "lin.npz", **lin_sd)
  other = lpips.load_lpips(str(tmp_path / "vgg16.safetensors"), str(tmp_path / "lin.npz"))
  x, y = _pairs((2, 32, 32, 3), seed=3)
  np.testing.assert_array_equal(np.asarray(other(x, y)), np.asarray(ours(x, y)))


def test_missing_weights_switch_lpips_off_with_a_warning(caplog):
  with caplog.at_level(logging.WARNING):
    assert lpips.maybe_load_lpips(None, "") is None
  assert "LPIPS weights not configured" in caplog.text
  assert "the LPIPS term is switched off" in caplog.text


def test_bad_checkpoints_raise_fape_error(reference, tmp_path):
  _, vgg_path, lin_path = reference
  with pytest.raises(FapeError, match="does not exist"):
    lpips.maybe_load_lpips(str(tmp_path / "nope.pth"), lin_path)
  sd = lpips.read_state_dict(vgg_path)
  del sd["features.14.weight"]
  np.savez(tmp_path / "short.npz", **sd)
  with pytest.raises(FapeError, match="features.14.weight"):
    lpips.load_vgg16_features(str(tmp_path / "short.npz"))
  sd = lpips.read_state_dict(lin_path)
  sd["lin2.model.1.weight"] = sd["lin2.model.1.weight"][:, :100]
  np.savez(tmp_path / "lin_bad.npz", **sd)
  with pytest.raises(FapeError, match="shape"):
    lpips.load_lpips(vgg_path, str(tmp_path / "lin_bad.npz"))
  (tmp_path / "w.ckpt").write_bytes(b"")
  with pytest.raises(FapeError, match="unsupported file type"):
    lpips.read_state_dict(str(tmp_path / "w.ckpt"))
  lpips_model = lpips.load_lpips(vgg_path, lin_path)
  with pytest.raises(FapeError, match="differ in shape"):
    lpips_model(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 16, 3)))
