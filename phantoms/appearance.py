"""Image appearance: tissue contrast, texture, bias field, blur, gamma and Rician noise.

The fixed look reproduces one realistic contrast per phantom kind; the randomised
look draws SynthSeg-style appearance (random per-tissue intensities, bias, noise,
blur, gamma, occasional inversion) for detector and segmenter training.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

#: Stored value of intensity 1.0.
INTENSITY_SCALE = 2500.0

#: Relative texture amplitude of tissues with visible structure (trabeculae, fibres, fat lobules).
TEXTURE_AMPLITUDE: dict[str, float] = {"muscle": 0.07, "fat": 0.05, "marrow": 0.08, "bowel": 0.12}

#: Half-size of the cube, mm, over which the bias polynomial is normalised.
BIAS_SCALE_MM = 120.0

#: Monomial exponents of the second-order bias polynomial.
_BIAS_TERMS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1)]


@dataclass(frozen=True)
class BiasField:
    """Smooth multiplicative field ``1 + strength * P(p / BIAS_SCALE_MM)`` with ``|P| <= 1`` on the cube.

    Attributes
    ----------
    coefficients : tuple of float
        Coefficients of the monomials in ``_BIAS_TERMS``.
    strength : float
        Maximum relative deviation from 1.
    centre : tuple of float
        Patient point (mm) at the centre of the normalisation cube.
    """

    coefficients: tuple[float, ...]
    strength: float
    centre: tuple[float, float, float]

    @classmethod
    def draw(cls, rng: np.random.Generator, strength: float, centre: tuple[float, float, float]) -> BiasField:
        """Random polynomial normalised so its maximum magnitude on the cube is 1."""
        coefficients = rng.normal(size=len(_BIAS_TERMS))
        corners = np.linspace(-1.0, 1.0, 5)
        u, v, w = np.meshgrid(corners, corners, corners, indexing="ij")
        peak = np.abs(_polynomial(coefficients, u, v, w)).max()
        return cls(tuple(float(c / peak) for c in coefficients), strength, centre)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> npt.NDArray[np.float32]:
        """Field value at patient points."""
        u, v, w = ((c - c0) / BIAS_SCALE_MM for c, c0 in zip((x, y, z), self.centre))
        return (1.0 + self.strength * _polynomial(np.asarray(self.coefficients), u, v, w)).astype(np.float32)


def _polynomial(coefficients: np.ndarray, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    return sum(c * u**i * v**j * w**k for c, (i, j, k) in zip(coefficients, _BIAS_TERMS))


@dataclass(frozen=True)
class Texture:
    """Smooth zero-mean pattern from random plane waves, continuous in patient space.

    Attributes
    ----------
    waves : numpy.ndarray
        (n, 3) wave vectors in radians per mm.
    phases : numpy.ndarray
        (n,) phases in radians.
    """

    waves: np.ndarray = field(repr=False)
    phases: np.ndarray = field(repr=False)

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int = 10, wavelengths_mm: tuple[float, float] = (3.0, 25.0)) -> Texture:
        """Random directions, wavelengths and phases."""
        directions = rng.normal(size=(n, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(*wavelengths_mm, size=(n, 1))
        return cls(2.0 * np.pi * directions / wavelengths, rng.uniform(0.0, 2.0 * np.pi, size=n))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> npt.NDArray[np.float32]:
        """Pattern at patient points, roughly unit variance."""
        total = np.zeros(np.shape(x), dtype=np.float32)
        for (kx, ky, kz), phase in zip(self.waves.tolist(), self.phases.tolist()):
            total += np.cos(kx * x + ky * y + kz * z + phase)
        return total * np.float32(np.sqrt(2.0 / len(self.phases)))


@dataclass(frozen=True)
class Look:
    """All appearance parameters of one image series.

    Attributes
    ----------
    intensity : dict
        Intensity (0..1) of each tissue class.
    bias : BiasField
        Multiplicative bias field.
    snr : float
        Mean tissue signal divided by the noise standard deviation.
    blur_px : float
        In-plane Gaussian blur sigma, pixels.
    gamma : float
        Exponent applied to the normalised image.
    """

    intensity: dict[str, float]
    bias: BiasField
    snr: float
    blur_px: float = 0.0
    gamma: float = 1.0

    @classmethod
    def fixed(cls, contrast: Mapping[str, float], rng: np.random.Generator, centre: tuple[float, float, float]) -> Look:
        """The realistic default look: given contrast, +-15 % bias, SNR 25."""
        return cls(dict(contrast), BiasField.draw(rng, 0.15, centre), 25.0)

    @classmethod
    def randomised(cls, contrast: Mapping[str, float], rng: np.random.Generator,
                   centre: tuple[float, float, float]) -> Look:
        """SynthSeg-style random look over the tissue classes of ``contrast``."""
        intensity = {tissue: float(rng.uniform(0.05, 1.0)) for tissue in contrast}
        if rng.random() < 0.15:
            intensity = {tissue: 1.05 - value for tissue, value in intensity.items()}
        intensity["air"] = float(rng.uniform(0.0, 0.05))
        bias = BiasField.draw(rng, float(rng.uniform(0.05, 0.4)), centre)
        return cls(intensity, bias, float(rng.uniform(8.0, 60.0)), float(rng.uniform(0.0, 1.2)),
                   float(np.exp(rng.uniform(np.log(0.6), np.log(1.6)))))


def texture_amplitudes(tissues: list[str]) -> npt.NDArray[np.float32]:
    """Texture amplitude of each tissue in ``tissues``."""
    return np.array([TEXTURE_AMPLITUDE.get(t, 0.0) for t in tissues], dtype=np.float32)


def finish(
    signal: npt.NDArray[np.float32],
    texture_weight: npt.NDArray[np.float32],
    texture: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32],
    look: Look,
    rng: np.random.Generator,
    noise_sigma: float | None = None,
) -> npt.NDArray[np.uint16]:
    """Turn a partial-volume signal image into stored pixel values.

    Parameters
    ----------
    signal : numpy.ndarray
        (slices, rows, columns) noiseless intensity, 0..1.
    texture_weight, texture : numpy.ndarray
        Per-voxel texture amplitude and the unit texture pattern.
    bias : numpy.ndarray
        Bias field sampled on the grid.
    look : Look
        Blur, gamma and SNR to apply.
    rng : numpy.random.Generator
        Noise generator.
    noise_sigma : float, optional
        Noise standard deviation in intensity units; by default the mean tissue
        signal divided by ``look.snr``.

    Returns
    -------
    numpy.ndarray
        uint16 pixels, intensity 1.0 stored as ``INTENSITY_SCALE``.
    """
    image = signal * (1.0 + texture_weight * texture)
    if look.blur_px > 0.0:
        image = ndimage.gaussian_filter(image, sigma=(0.0, look.blur_px, look.blur_px))
    image = image * bias
    if look.gamma != 1.0:
        peak = max(float(image.max()), 1e-6)
        image = peak * (np.clip(image, 0.0, None) / peak) ** look.gamma
    if noise_sigma is None:
        tissue = image[image > 0.1 * image.max()]
        noise_sigma = float(tissue.mean()) / look.snr if tissue.size else 0.01
    real = image + rng.normal(0.0, noise_sigma, image.shape).astype(np.float32)
    imaginary = rng.normal(0.0, noise_sigma, image.shape).astype(np.float32)
    magnitude = np.hypot(real, imaginary)
    return np.clip(np.rint(magnitude * INTENSITY_SCALE), 0, 65535).astype(np.uint16)
