"""Fixed radiometric mappings of multi-band imagery to the model's 8-bit RGB, one per sensor preset.

    rgb = to_rgb8(bands, PRESETS["generic"])       # bands: (count, H, W) digital numbers

The mapping is the same for every scene (no per-scene percentile stretch, which would make a
tile's embedding depend on the rest of its scene):

    reflectance = DN * scale + offset
    rgb8        = clip(reflectance / white, 0, 1) * 255   (rounded)

on the preset's red, green and blue bands (1-based band numbers, as GDAL counts them).

| preset        | bands (R, G, B) | scale   | offset | white | for                                   |
|---------------|-----------------|---------|--------|-------|---------------------------------------|
| generic       | 1, 2, 3         | 1e-4    | 0      | 0.3   | uint16 reflectance x 10,000 (the generated scenes) |
| sentinel2_l2a | 4, 3, 2         | 1e-4    | -0.1   | 0.3   | Sentinel-2 L2A, processing baseline >= 04.00 (BOA_ADD_OFFSET -1000) |
| naip          | 1, 2, 3         | 1/255   | 0      | 1.0   | NAIP 8-bit RGBN                        |

`white` is the reflectance drawn as full white: 0.3 is the usual true-colour choice for land
(vegetation and bare soil stay below it; clouds and roofs saturate). Nodata pixels become 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RadiometricPreset:
    name: str
    rgb_bands: tuple[int, int, int]  # 1-based band numbers of red, green, blue
    scale: float
    offset: float
    white: float  # reflectance shown as 255

    @property
    def min_bands(self) -> int:
        return max(self.rgb_bands)


PRESETS: dict[str, RadiometricPreset] = {
    "generic": RadiometricPreset("generic", (1, 2, 3), 1e-4, 0.0, 0.3),
    "sentinel2_l2a": RadiometricPreset("sentinel2_l2a", (4, 3, 2), 1e-4, -0.1, 0.3),
    "naip": RadiometricPreset("naip", (1, 2, 3), 1 / 255, 0.0, 1.0),
}


def check_bands(preset: RadiometricPreset, count: int) -> None:
    """Raise ValueError when a scene of `count` bands cannot feed the preset."""
    if count < preset.min_bands:
        raise ValueError(f"{count} band(s), preset {preset.name!r} needs band {preset.min_bands} "
                         f"(R, G, B = bands {', '.join(map(str, preset.rgb_bands))})")


def to_rgb8(rgb_dn: np.ndarray, preset: RadiometricPreset, valid: np.ndarray | None = None) -> np.ndarray:
    """(3, H, W) digital numbers of the preset's R, G, B bands -> (3, H, W) uint8 by the fixed
    mapping above; pixels where `valid` is False become 0."""
    reflectance = rgb_dn.astype(np.float32) * np.float32(preset.scale) + np.float32(preset.offset)
    out = np.rint(np.clip(reflectance / np.float32(preset.white), 0.0, 1.0) * 255.0).astype(np.uint8)
    if valid is not None:
        out[:, ~valid] = 0
    return out


def from_rgb8(rgb8: np.ndarray, preset: RadiometricPreset) -> np.ndarray:
    """The inverse mapping (uint8 RGB -> the preset's uint16 digital numbers), used to write
    generated scenes whose tiles map back to the drawn colours exactly."""
    reflectance = rgb8.astype(np.float32) * np.float32(preset.white / 255.0)  # float32: a big scene's bands fit
    return np.rint((reflectance - np.float32(preset.offset)) / np.float32(preset.scale)).astype(np.uint16)
