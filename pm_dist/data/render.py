"""The procedural face renderer behind the synthetic identities, in exactly reproducible arithmetic.

Two layers:

* ``face_layer(z, size)``: an identity's look, a deterministic function of its latent vector ``z``
  (uniforms in [0, 1)): head and hair shape, skin tone and marks, eyes, brows, nose, mouth, ears, and
  discrete traits (baldness, beard, glasses). It returns premultiplied RGBA so that each image can put
  the head on its own background.
* ``render_image(layer, rng)``: one photograph of that head: a pose warp (rotation, scale, shift, a
  yaw-like horizontal squeeze), a random background and clothing, occluders (sunglasses, mask, hand,
  random patch), illumination (colour cast, directional light, contrast curve), blur and sensor noise.

**Why only +, −, ×, ÷, min/max, floor and gathers.** "Same bytes for the same seed on every machine"
is the contract. IEEE 754 rounds those operations exactly, and numpy's SIMD paths keep that, whereas
``exp``/``sin``/``log`` and matrix products differ in the last bit between CPUs (numpy dispatches
transcendental ufuncs to CPU-specific kernels; BLAS blocks and fuses differently per CPU), and one
last-bit difference can flip a pixel after rounding to uint8. So shapes are polynomial (quadratic
ellipse forms, ``(1-q)²`` bumps), rotations use the rational parametrisation
cos = (1-t²)/(1+t²), sin = 2t/(1+t²), and the random numbers are raw uniforms from PCG64 (bit-exact
everywhere), never ``rng.normal`` (whose tails call libm). Scalars are prepared in Python float64
(exact IEEE too) and enter the float32 arrays through a single rounding.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
LATENT_DIM = 96  # uniforms per identity; the face uses 71, the rest are reserved for new traits


def pixel_centres(size: int) -> np.ndarray:
    """Coordinates of pixel centres in [-1, 1] (same for x and y; y grows downwards)."""
    return ((2.0 * np.arange(size) + 1.0) / size - 1.0).astype(F32)


def _span(centre: float, radius: float, size: int) -> tuple[int, int]:
    """Pixel index range [lo, hi) whose centres lie within ``centre ± radius`` (clipped to the image)."""
    lo = math.ceil((centre - radius + 1.0) * size / 2.0 - 0.5)
    hi = math.floor((centre + radius + 1.0) * size / 2.0 - 0.5) + 1
    return max(lo, 0), min(hi, size)


def _ellipse_q(grid, x0, x1, y0, y1, cx, cy, rx, ry, shear):
    """Quadratic form q (<1 inside) of a sheared ellipse over the pixel block [y0:y1, x0:x1]."""
    du = (grid[x0:x1] - F32(cx)) * F32(1.0 / rx)
    a = (grid[y0:y1, None] - F32(cy) + F32(shear * rx) * du[None, :]) * F32(1.0 / ry)
    return du[None, :] * du[None, :] + a * a


def _colour(color) -> np.ndarray:
    return np.asarray(color, F32)[:, None, None]


def paint(
    rgba: np.ndarray, grid: np.ndarray, cx: float, cy: float, rx: float, ry: float, color,
    *, shear: float = 0.0, opacity: float = 1.0, soft: bool = False, hole: float = 0.0,
    alpha: bool = False,
) -> None:
    """Blend an ellipse of ``color`` into planar premultiplied ``rgba`` [4, S, S], in place.

    ``soft`` gives a smooth bump (1-q)² (shading, marks), otherwise an edge about one pixel wide.
    ``hole`` in (0, 1) cuts out the inner ellipse scaled by it (a ring: glasses rims).
    ``alpha`` makes the shape part of the head silhouette; otherwise it only recolours what is there.
    Only the ellipse's bounding box is touched, which keeps small features cheap. (Planar layout:
    numpy's elementwise loops are several times faster over [C, H, W] than over [H, W, C].)
    """
    size = rgba.shape[1]
    x0, x1 = _span(cx, rx, size)
    y0, y1 = _span(cy, ry + abs(shear) * rx, size)
    if x0 >= x1 or y0 >= y1:
        return
    q = _ellipse_q(grid, x0, x1, y0, y1, cx, cy, rx, ry, shear)
    if soft:
        t = np.clip(F32(1.0) - q, F32(0.0), None)
        m = t * t
    else:
        hardness = max(1.0, min(rx, ry) * size / 4.0)
        m = np.clip((F32(1.0) - q) * F32(hardness), F32(0.0), F32(1.0))
    if hole > 0.0:
        inner_hardness = max(1.0, min(rx, ry) * hole * size / 4.0)
        inner = np.clip((F32(1.0) - q * F32(1.0 / (hole * hole))) * F32(inner_hardness), F32(0.0), F32(1.0))
        m = m * (F32(1.0) - inner)
    if opacity != 1.0:
        m = m * F32(opacity)
    block = rgba[:, y0:y1, x0:x1]
    if alpha:
        block[:3] += m * (_colour(color) - block[:3])
        block[3] += m * (F32(1.0) - block[3])
    else:  # recolour in proportion to the coverage already there (premultiplied colour)
        block[:3] += m * (_colour(color) * block[3] - block[:3])


class _Latents:
    """Reads an identity's latent uniforms one at a time, mapped to ranges."""

    def __init__(self, z: np.ndarray):
        self.z = z
        self.i = 0

    def __call__(self, lo: float, hi: float) -> float:
        v = lo + (hi - lo) * float(self.z[self.i])
        self.i += 1
        return v

    def colour(self, dark, light, jitter: float) -> tuple[float, float, float]:
        t = self(0.0, 1.0)
        return tuple(min(1.0, max(0.0, d + (l - d) * t + self(-jitter, jitter))) for d, l in zip(dark, light))


def face_layer(z: np.ndarray, size: int) -> np.ndarray:
    """An identity's head, frontal and unlit: planar premultiplied RGBA float32 [4, size, size]."""
    if z.shape != (LATENT_DIM,):
        raise ValueError(f"latent vector must have shape ({LATENT_DIM},), got {z.shape}")
    p = _Latents(z)
    g = pixel_centres(size)
    rgba = np.zeros((4, size, size), F32)

    skin = p.colour((0.36, 0.22, 0.15), (0.96, 0.82, 0.72), 0.05)
    hair = p.colour((0.05, 0.04, 0.03), (0.85, 0.70, 0.45), 0.08)
    fx, fy = p(-0.06, 0.06), p(0.00, 0.12)
    rx, ry = p(0.46, 0.64), p(0.60, 0.80)
    bald = p(0.0, 1.0) < 0.12
    hair_rx, hair_ry, hair_up = rx * p(1.04, 1.22), ry * p(0.70, 0.95), p(0.12, 0.32)
    fringe_len = p(0.10, 0.45)
    fringe_side = p(-0.25, 0.25)
    ear_y, ear_r = p(-0.10, 0.08), p(0.08, 0.14)
    neck_w = p(0.22, 0.34)

    # silhouette: neck, hair behind the head, ears, face
    paint(rgba, g, fx, fy + ry * 0.9, neck_w, 0.5, tuple(c * 0.85 for c in skin), alpha=True)
    if not bald:
        paint(rgba, g, fx, fy - hair_up, hair_rx, hair_ry + hair_up, hair, alpha=True)
    for side in (-1.0, 1.0):
        paint(rgba, g, fx + side * rx * 0.98, fy + ear_y, ear_r * 0.7, ear_r, skin, alpha=True)
    paint(rgba, g, fx, fy, rx, ry, skin, alpha=True)

    # skin marks and shading: identity-specific texture
    for _ in range(4):
        mx, my = fx + p(-0.8, 0.8) * rx, fy + p(-0.7, 0.8) * ry
        amp = p(-0.35, 0.25)
        paint(rgba, g, mx, my, p(0.03, 0.14), p(0.03, 0.14), tuple(c * (1.0 + amp) for c in skin),
              soft=True)
    cheek = p(0.0, 0.35)
    for side in (-1.0, 1.0):
        paint(rgba, g, fx + side * rx * 0.55, fy + ry * 0.25, rx * 0.28, ry * 0.18,
              (min(1.0, skin[0] * 1.15), skin[1] * 0.85, skin[2] * 0.85), soft=True, opacity=cheek)

    # eyes, brows
    eye_y, eye_dx = fy + p(-0.24, -0.04), p(0.17, 0.29)
    eye_rx = p(0.07, 0.13)
    eye_ry = eye_rx * p(0.40, 0.75)
    iris = p.colour((0.10, 0.06, 0.03), (0.35, 0.55, 0.75), 0.10)
    iris_r = p(0.45, 0.75)
    brow_up, brow_w, brow_t, brow_tilt = p(0.07, 0.18), p(0.09, 0.17), p(0.015, 0.045), p(-0.5, 0.5)
    brow_col = tuple(c * 0.6 for c in hair)
    for side in (-1.0, 1.0):
        ex = fx + side * eye_dx
        paint(rgba, g, ex, eye_y, eye_rx, eye_ry, (0.92, 0.92, 0.90))
        paint(rgba, g, ex, eye_y, eye_ry * iris_r * 1.3, eye_ry * iris_r * 1.3, iris)
        paint(rgba, g, ex, eye_y, eye_ry * iris_r * 0.5, eye_ry * iris_r * 0.5, (0.02, 0.02, 0.02))
        paint(rgba, g, ex, eye_y - eye_ry - brow_up, brow_w, brow_t, brow_col, shear=side * brow_tilt)

    # nose: shading and nostrils
    nose_y, nose_l, nose_w = fy + p(0.02, 0.14), p(0.10, 0.22), p(0.05, 0.11)
    paint(rgba, g, fx, nose_y, nose_w, nose_l, tuple(c * 0.78 for c in skin), soft=True)
    for side in (-1.0, 1.0):
        paint(rgba, g, fx + side * nose_w * 0.7, nose_y + nose_l * 0.8, nose_w * 0.35, nose_w * 0.22,
              tuple(c * 0.45 for c in skin))

    # mouth
    mouth_y, mouth_w, lip_h = fy + p(0.28, 0.44), p(0.11, 0.24), p(0.025, 0.07)
    lips = p.colour((0.45, 0.15, 0.15), (0.85, 0.45, 0.45), 0.06)
    paint(rgba, g, fx, mouth_y, mouth_w, lip_h, lips)
    paint(rgba, g, fx, mouth_y, mouth_w * 0.9, max(0.008, lip_h * 0.2), (0.18, 0.06, 0.06))

    # hair over the forehead, beard, glasses
    if not bald:
        paint(rgba, g, fx + fringe_side * rx, fy - ry * 0.95, rx * 1.05, ry * fringe_len + 0.1, hair)
    beard = p(0.0, 1.0)
    if beard > 0.78:
        paint(rgba, g, fx, fy + ry * 0.62, rx * 0.8, ry * 0.45, hair, soft=True, opacity=(beard - 0.78) * 4.0)
    glasses = p(0.0, 1.0)
    frame = p.colour((0.02, 0.02, 0.02), (0.55, 0.35, 0.20), 0.05)  # drawn always: fixed latent slots
    if glasses > 0.82:
        for side in (-1.0, 1.0):
            paint(rgba, g, fx + side * eye_dx, eye_y, eye_rx * 1.6, eye_rx * 1.25, frame, hole=0.85)
        paint(rgba, g, fx, eye_y - eye_rx * 0.3, eye_dx - eye_rx * 1.5, 0.015, frame)
    if p.i > LATENT_DIM:
        raise AssertionError(f"face uses {p.i} latents but only {LATENT_DIM} are drawn")
    return rgba


class Nuisance:
    """Ranges of the per-image variation; ``scale`` multiplies all of them (0 gives a frontal, clean,
    evenly lit face on a random background)."""

    def __init__(self, scale: float = 1.0):
        if scale < 0:
            raise ValueError(f"nuisance scale must be >= 0, got {scale}")
        s = scale
        self.rotation = 0.11 * s  # t of the rational rotation; 0.11 ≈ ±12.5°
        self.scale = 0.08 * s
        self.shift = 0.10 * s  # in [-1, 1] image units: ±5 % of the side
        self.yaw = 0.22 * s
        self.occlusion_p = min(1.0, 0.30 * s)
        self.brightness = (max(0.2, 1.0 - 0.40 * s), 1.0 + 0.30 * s)
        self.cast = 0.10 * s
        self.light = 0.40 * s
        self.curve = 0.35 * s
        self.blur_p = min(1.0, 0.30 * s)
        self.noise = 0.08 * s


def _warp(layer: np.ndarray, grid: np.ndarray, rng: np.random.Generator, nz: Nuisance) -> np.ndarray:
    """Resample the planar RGBA layer under a random pose: bilinear, border-clamped."""
    size = layer.shape[1]
    r = rng.random(5)
    t = (2.0 * r[0] - 1.0) * nz.rotation
    cos, sin = (1.0 - t * t) / (1.0 + t * t), 2.0 * t / (1.0 + t * t)
    inv_s = 1.0 / (1.0 + (2.0 * r[1] - 1.0) * nz.scale)
    sx, sy = (2.0 * r[2] - 1.0) * nz.shift, (2.0 * r[3] - 1.0) * nz.shift
    yaw = (2.0 * r[4] - 1.0) * nz.yaw
    # output pixel (u, v) → canonical (us, vs): undo shift, scale, rotation, then the yaw squeeze
    u = (grid[None, :] - F32(sx)) * F32(inv_s)
    v = (grid[:, None] - F32(sy)) * F32(inv_s)
    us = u * F32(cos) + v * F32(sin)
    vs = v * F32(cos) - u * F32(sin)
    us = us - F32(yaw) * (F32(1.0) - us * us)
    # canonical coordinate → pixel index space
    half = size / 2.0
    x = np.clip((us + F32(1.0)) * F32(half) - F32(0.5), F32(0.0), F32(size - 1)).reshape(-1)
    y = np.clip((vs + F32(1.0)) * F32(half) - F32(0.5), F32(0.0), F32(size - 1)).reshape(-1)
    x0, y0 = np.floor(x), np.floor(y)
    ax, ay = x - x0, y - y0
    ix0, iy0 = x0.astype(np.intp), y0.astype(np.intp)
    ix1, iy1 = np.minimum(ix0 + 1, size - 1), np.minimum(iy0 + 1, size - 1)
    row0, row1 = iy0 * size, iy1 * size
    flat = layer.reshape(4, size * size)
    a, b = flat.take(row0 + ix0, axis=1), flat.take(row0 + ix1, axis=1)
    top = a + (b - a) * ax
    a, b = flat.take(row1 + ix0, axis=1), flat.take(row1 + ix1, axis=1)
    bottom = a + (b - a) * ax
    return (top + (bottom - top) * ay).reshape(4, size, size)


def _occlude(layer: np.ndarray, grid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint one occluder into a copy of the canonical layer, so that it moves with the head."""
    layer = layer.copy()
    r = rng.random(8)
    kind = int(r[0] * 4.0)
    colour = (float(r[1]), float(r[2]), float(r[3]))
    if kind == 0:  # sunglasses: a dark band over both eyes
        dark = tuple(c * 0.25 for c in colour)
        paint(layer, grid, -0.0 + (r[4] - 0.5) * 0.1, -0.12 + (r[5] - 0.5) * 0.15, 0.62, 0.10 + 0.06 * r[6], dark)
    elif kind == 1:  # medical mask: lower face
        light = tuple(0.6 + 0.4 * c for c in colour)
        paint(layer, grid, (r[4] - 0.5) * 0.1, 0.42 + (r[5] - 0.5) * 0.1, 0.55, 0.32 + 0.08 * r[6], light,
              alpha=True)
    elif kind == 2:  # a hand or object in front: a big ellipse entering from a side
        side = -1.0 if r[4] < 0.5 else 1.0
        paint(layer, grid, side * (0.55 + 0.4 * r[5]), 0.6 * r[6] - 0.2, 0.35 + 0.2 * r[7], 0.45, colour,
              alpha=True)
    else:  # a random rectangle-ish patch (hard edges: a very flat sheared ellipse is not needed)
        size = layer.shape[1]
        w, h = 0.25 + 0.35 * r[4], 0.25 + 0.35 * r[5]
        cx, cy = (2.0 * r[6] - 1.0) * 0.6, (2.0 * r[7] - 1.0) * 0.6
        x0, x1 = _span(cx, w / 2.0, size)
        y0, y1 = _span(cy, h / 2.0, size)
        layer[:3, y0:y1, x0:x1] = _colour(colour)
        layer[3, y0:y1, x0:x1] = F32(1.0)
    return layer


def _background(grid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A vertical two-colour gradient with clothing at the bottom: planar RGB float32 [3, S, S]."""
    size = grid.shape[0]
    r = rng.random(13)
    top, bottom = _colour(r[0:3]), _colour(r[3:6])
    t = ((grid + F32(1.0)) * F32(0.5))[None, :, None]
    cloth = np.ones((4, size, size), F32)
    cloth[:3] = top + (bottom - top) * t
    paint(cloth, grid, (r[6] - 0.5) * 0.3, 1.05 + 0.1 * r[7], 0.8 + 0.3 * r[8], 0.45, tuple(r[9:12]))
    return cloth[:3]


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1]/4 blur of planar [C, S, S] (interior pixels): a slightly defocused camera."""
    out = img.copy()
    out[:, 1:-1] = (img[:, :-2] + img[:, 1:-1] * F32(2.0) + img[:, 2:]) * F32(0.25)
    tmp = out.copy()
    out[:, :, 1:-1] = (tmp[:, :, :-2] + tmp[:, :, 1:-1] * F32(2.0) + tmp[:, :, 2:]) * F32(0.25)
    return out


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Planar float [3, S, S] in [0, 1] → uint8 [S, S, 3] (round half to even)."""
    q = np.rint(np.clip(img, F32(0.0), F32(1.0)) * F32(255.0)).astype(np.uint8)
    return np.ascontiguousarray(q.transpose(1, 2, 0))


def render_image(layer: np.ndarray, rng: np.random.Generator, nuisance: Nuisance) -> np.ndarray:
    """One photograph of the head in ``layer``: uint8 RGB [S, S, 3].

    The order of random draws is fixed (it defines the image): background, occlusion, pose,
    illumination, blur, noise.
    """
    size = layer.shape[1]
    grid = pixel_centres(size)
    bg = _background(grid, rng)
    if rng.random() < nuisance.occlusion_p:
        layer = _occlude(layer, grid, rng)
    head = _warp(layer, grid, rng, nuisance)
    img = bg * (F32(1.0) - head[3]) + head[:3]

    r = rng.random(8)
    lo, hi = nuisance.brightness
    gain = lo + (hi - lo) * r[0]
    cast = [gain * (1.0 + (2.0 * r[i] - 1.0) * nuisance.cast) for i in (1, 2, 3)]
    lx, ly = (2.0 * r[4] - 1.0) * nuisance.light, (2.0 * r[5] - 1.0) * nuisance.light
    light = F32(1.0) + F32(lx) * grid[None, :] + F32(ly) * grid[:, None]
    img = img * light * _colour(cast)
    img = np.clip(img, F32(0.0), F32(1.0))
    curve = (2.0 * r[6] - 1.0) * nuisance.curve  # x(1 + c(1-x)): monotone contrast/gamma-like bend
    img = img * (F32(1.0) + F32(curve) * (F32(1.0) - img))
    if r[7] < nuisance.blur_p:
        img = _blur(img)
    amp = rng.random() * nuisance.noise
    if amp > 0.0:
        img = img + (rng.random((3, size, size), dtype=F32) - F32(0.5)) * F32(2.0 * amp)
    return _to_uint8(img)


def frontal_image(layer: np.ndarray, background: float = 0.5) -> np.ndarray:
    """The head without any nuisance on a flat grey background: uint8 RGB (for measuring looks)."""
    return _to_uint8(F32(background) * (F32(1.0) - layer[3]) + layer[:3])
