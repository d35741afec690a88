"""The WLF loss against a pytorch_wavelets reference, and the Parseval identity."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LAYER_TOL, rel_err
from pytorch_wavelets import DWTForward

from d4k_jax.diffusion import wavelet


def _inputs(shape=(3, 16, 12, 4), seed=0):
    rng = np.random.default_rng(seed)
    v, x0, eps = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
    return v, x0, eps, rng.uniform(0.001, 1.0, shape[0]).astype(np.float32)


def _reference(v, x0, eps, sigma):
    """REFERENCE.md §2 in torch: DWTForward(J=1, mode='zero', wave='haar'), subbands concatenated on channels."""
    t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
    s = torch.from_numpy(sigma)[:, None, None, None]
    x_t = (1 - s) * t(x0) + s * t(eps)
    x0_hat = x_t - s * t(v)
    dwt = DWTForward(J=1, mode="zero", wave="haar")

    def bands(x):
        low, high = dwt(x)
        return torch.cat([low, high[0].flatten(1, 2)], dim=1)

    return ((bands(x0_hat) - bands(t(x0))) ** 2).mean(dim=(1, 2, 3)).mean().item()


@pytest.mark.parametrize("shape", [(3, 16, 12, 4), (2, 8, 8, 16), (1, 6, 10, 16)])
def test_equals_pytorch_wavelets_reference(shape):
    v, x0, eps, sigma = _inputs(shape)
    ours = wavelet.wlf_loss(jnp.asarray(v), x0, eps, sigma)
    assert rel_err(ours, _reference(v, x0, eps, sigma)) < LAYER_TOL


def test_parseval_identity_sigma_squared_velocity_mse():
    v, x0, eps, sigma = _inputs()
    per_sample = ((v - (eps - x0)) ** 2).mean(axis=(1, 2, 3))
    assert rel_err(wavelet.wlf_loss(v, x0, eps, sigma), np.mean(sigma**2 * per_sample)) < LAYER_TOL


def test_unequal_subband_weights_change_the_loss_and_levels_need_more_weights():
    v, x0, eps, sigma = _inputs()
    base = float(wavelet.wlf_loss(v, x0, eps, sigma))
    assert float(wavelet.wlf_loss(v, x0, eps, sigma, subband_weights=[1, 1, 1, 1])) == pytest.approx(base, rel=1e-6)
    high = float(wavelet.wlf_loss(v, x0, eps, sigma, subband_weights=[1, 2, 2, 2]))
    assert high > base * 1.2
    two = wavelet.wlf_loss(v, x0, eps, sigma, level=2, subband_weights=[1, 1, 1, 1, 1, 1, 1])
    assert float(two) == pytest.approx(base, rel=1e-5)  # still orthonormal
    with pytest.raises(ValueError, match="needs 7 values for level 2"):
        wavelet.wlf_loss(v, x0, eps, sigma, level=2, subband_weights=[1, 1, 1, 1])


def test_flow_matching_ablation():
    v, x0, eps, _ = _inputs()
    assert rel_err(wavelet.flow_matching_loss(v, x0, eps), np.mean((v - (eps - x0)) ** 2)) < LAYER_TOL
