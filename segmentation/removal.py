"""Background removal: a SegFormer's logits -> a soft alpha -> a clean RGBA cut-out.

``remove_background`` runs four steps for each image:

1. the segmenter's logits (1/4 of the model's input size) are upsampled to the image's own size
   and turned into a probability of foreground (``predict_alpha``; optionally averaged over
   mirrored and rescaled views);
2. the edge is snapped to the colour boundary (``snap_edge``: in a band a pixel wide, alpha from
   the local foreground and background colours), then the edge band is refined with a guided
   filter (He et al., 2010) guided by the image itself, so the matte follows real colour edges
   instead of the 4x-upsampled logit grid; away from the edge the alpha is snapped to exactly 0
   or 255;
3. the foreground colour at the fringe is re-estimated (Forte & Pitie's blur-fusion foreground
   estimation, 2021), so the old background does not bleed into semi-transparent edge pixels;
4. the result is assembled as RGBA at the input size.

The guided filter and the blur fusion are a few box filters on ``cv2`` primitives (opencv's
``cv2.ximgproc.guidedFilter`` is in the contrib build only). numpy, cv2, torch; nothing here loads
a model: the segmenter comes in as an argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import cv2
import numpy as np
from PIL import Image

from pipeline.errors import ImageTooLargeError, ImageTooSmallError, NotAnImageError
from pipeline.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    import torch

    from pipeline.models import Segmenter


@dataclass(frozen=True)
class RefineConfig:
    """How the coarse alpha becomes the final matte. Radii are fractions of the image's shorter
    side, so results look the same at any resolution."""

    certain_low: float = 0.05  # below this probability a pixel is background, alpha exactly 0
    certain_high: float = 0.95  # above it foreground, alpha exactly 255 (outside the edge band)
    band: float = 0.012  # half-width of the edge band that the guided filter may change
    guided_radius: float = 0.008  # guided-filter window radius
    guided_eps: float = 1e-3  # guided-filter regularisation: larger = smoother, less edge-following
    fusion_radii: tuple[float, float] = (0.09, 0.008)  # blur-fusion passes, coarse then fine
    decontaminate: bool = True  # re-estimate fringe colours (step 3)
    snap: bool = True  # move the edge to the colour boundary first (``snap_edge``)
    snap_band: float = 0.01  # half-width of the band where it may move
    snap_radius: float = 0.02  # window of the local foreground and background colour means
    snap_contrast: float = 0.05  # least distance of those means (RGB in [0, 1]) to trust them


DEFAULT_REFINE = RefineConfig()


# --- input checks -------------------------------------------------------------------------------


def _name_of(image: Image.Image, index: int) -> str:
    filename = getattr(image, "filename", "") or ""
    return str(filename) if filename else f"image {index}"


def check_image(image: Any, *, index: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_side: int = 1) -> Image.Image:
    """The image as RGB (RGBA composited on white), or an ImageError that names it."""
    if not isinstance(image, Image.Image):
        raise NotAnImageError(f"image {index}", f"expected a PIL image, got {type(image).__name__}")
    name = _name_of(image, index)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(name, f"{width}x{height} is over the limit of {max_pixels:,} pixels")
    if min(width, height) < max(1, min_side):
        raise ImageTooSmallError(name, f"{width}x{height} is too small for background removal")
    try:
        image.load()  # decode now: a truncated or corrupt file fails here, with its name
        if image.mode == "RGB":
            return image
        if image.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise NotAnImageError(name, f"the image is corrupt ({exc.__class__.__name__})") from exc


# --- model input and alpha prediction ------------------------------------------------------------


def model_input_size(segmenter: Segmenter) -> tuple[int, int]:
    """(height, width) the segmenter's image processor resizes to."""
    size = getattr(segmenter.processor, "size", None) or {}
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        side = int(size["shortest_edge"])
        return side, side
    return 512, 512


def normalize_batch(segmenter: Segmenter, pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> the float tensor the model takes (N, 3, H, W), on its device and
    dtype, normalised as the segmenter's image processor does. Training uses this too, so the
    model sees the same numbers at training and at inference."""
    import torch

    proc = segmenter.processor
    param = next(segmenter.model.parameters())
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(param.device)
    x = x.permute(0, 3, 1, 2).float()
    if getattr(proc, "do_rescale", True):
        x = x * float(getattr(proc, "rescale_factor", 1 / 255))
    if getattr(proc, "do_normalize", True):
        mean = torch.tensor(list(proc.image_mean or (0.485, 0.456, 0.406)), device=x.device)
        std = torch.tensor(list(proc.image_std or (0.229, 0.224, 0.225)), device=x.device)
        x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return x.to(param.dtype)


def foreground_logit(segmenter: Segmenter, logits: torch.Tensor) -> torch.Tensor:
    """(N, L, h, w) logits -> (N, h, w) foreground logits, in float32.

    One label: the logit itself (sigmoid gives P(foreground)). Several labels: the log-odds of
    1 - P(background labels) (label 0 when the model names no background class)."""
    import torch

    logits = logits.float()
    if logits.shape[1] == 1:
        return logits[:, 0]
    background = list(segmenter.background_labels) or [0]
    log_p = torch.log_softmax(logits, dim=1)
    log_bg = torch.logsumexp(log_p[:, background], dim=1)
    keep = [i for i in range(logits.shape[1]) if i not in set(background)]
    log_fg = torch.logsumexp(log_p[:, keep], dim=1)
    return log_fg - log_bg


SCALE_RANGE = (0.25, 4.0)  # test-time input sizes, as multiples of the model's


def check_scales(scales: Sequence[float]) -> None:
    """A ValueError unless ``scales`` is a non-empty list of multiples within ``SCALE_RANGE``."""
    low, high = SCALE_RANGE
    if not scales or any(not low <= s <= high for s in scales):
        raise ValueError(
            f"scales must be between {low:g} and {high:g} times the model's input size, not {tuple(scales)}"
        )


def predict_alpha(segmenter: Segmenter, images: Sequence[Image.Image], *, batch_size: int = 8,
                  max_pixels: int = DEFAULT_MAX_PIXELS, flip: bool = False,
                  scales: Sequence[float] = (1.0,), rotate: bool = False) -> list[np.ndarray]:
    """P(foreground) for each image, float32 in [0, 1], at the image's own size (H, W).

    Images are resized to the model's input size for the forward pass; the logits (1/4 of that)
    are upsampled bilinearly to each image's size before the sigmoid, so edges stay smooth.

    Test-time augmentation (each view costs one more forward pass; the logits of all views are
    averaged at the image's size):

    - ``flip``: the model also sees each image mirrored left to right (the logits mirrored back),
      a steadier edge and a prediction that mirrors exactly with its input;
    - ``rotate``: the model also sees each view turned by 90, 180 and 270 degrees (the logits
      turned back): four times the views, for evaluation more than for the product;
    - ``scales``: the model also runs at other multiples of its input size (``(1.0, 4 / 3)``: at
      96 and 128 px for a 96-px model). A larger input puts the stride-4 logit grid closer to
      the pixels, so edges land more precisely; each scale costs its square in model time."""
    import torch
    import torch.nn.functional as F

    rgb = [check_image(img, index=i, max_pixels=max_pixels) for i, img in enumerate(images)]
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    check_scales(scales)
    height, width = model_input_size(segmenter)
    views = [(max(32, round(height * s)), max(32, round(width * s))) for s in scales]
    out: list[np.ndarray] = []
    for start in range(0, len(rgb), batch_size):
        chunk = rgb[start:start + batch_size]
        summed: list[torch.Tensor | None] = [None] * len(chunk)  # per image, the views' logits added
        for view_h, view_w in views:
            pixels = np.stack([
                np.asarray(img if img.size == (view_w, view_h)
                           else img.resize((view_w, view_h), Image.Resampling.BILINEAR))
                for img in chunk
            ])
            with torch.inference_mode():
                x = normalize_batch(segmenter, pixels)
                looks = [(turn, mirror) for turn in (range(4) if rotate else (0,))
                         for mirror in ((False, True) if flip else (False,))]
                fg = None
                for turn, mirror in looks:  # each look undone on its logits, then averaged
                    seen = torch.rot90(x, turn, dims=(2, 3))
                    seen = seen.flip(-1) if mirror else seen
                    logit = foreground_logit(segmenter, segmenter.model(pixel_values=seen).logits)
                    logit = torch.rot90(logit.flip(-1) if mirror else logit, -turn, dims=(1, 2))
                    fg = logit if fg is None else fg + logit
                assert fg is not None
                fg = fg / len(looks)
                for i, img in enumerate(chunk):
                    w, h = img.size
                    up = F.interpolate(fg[i][None, None], size=(h, w), mode="bilinear", align_corners=False)
                    previous = summed[i]
                    summed[i] = up[0, 0] if previous is None else previous + up[0, 0]
        with torch.inference_mode():
            for total in summed:
                assert total is not None
                out.append(torch.sigmoid(total / len(views)).cpu().numpy().astype(np.float32))
    return out


# --- edge refinement and colour decontamination --------------------------------------------------


def _box(x: np.ndarray, radius: int) -> np.ndarray:
    k = 2 * radius + 1
    return cv2.boxFilter(x, ddepth=-1, ksize=(k, k), normalize=True, borderType=cv2.BORDER_REFLECT)


def guided_filter(guide: np.ndarray, src: np.ndarray, *, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter with a colour guide (H, W, 3) in [0, 1] and a one-channel
    source (H, W): the output is locally a linear function of the guide's colours, so it keeps
    the guide's edges while smoothing ``src``."""
    guide = guide.astype(np.float32)
    p = src.astype(np.float32)
    mean_i = _box(guide, radius)
    mean_p = _box(p, radius)
    mean_ip = _box(guide * p[..., None], radius)
    cov_ip = mean_ip - mean_i * mean_p[..., None]
    # The 3x3 covariance of the guide per pixel, inverted in closed form.
    r, g, b = guide[..., 0], guide[..., 1], guide[..., 2]
    mr, mg, mb = mean_i[..., 0], mean_i[..., 1], mean_i[..., 2]
    var_rr = _box(r * r, radius) - mr * mr + eps
    var_rg = _box(r * g, radius) - mr * mg
    var_rb = _box(r * b, radius) - mr * mb
    var_gg = _box(g * g, radius) - mg * mg + eps
    var_gb = _box(g * b, radius) - mg * mb
    var_bb = _box(b * b, radius) - mb * mb + eps
    inv_rr = var_gg * var_bb - var_gb * var_gb
    inv_rg = var_gb * var_rb - var_rg * var_bb
    inv_rb = var_rg * var_gb - var_gg * var_rb
    inv_gg = var_rr * var_bb - var_rb * var_rb
    inv_gb = var_rb * var_rg - var_rr * var_gb
    inv_bb = var_rr * var_gg - var_rg * var_rg
    det = var_rr * inv_rr + var_rg * inv_rg + var_rb * inv_rb
    cr, cg, cb = cov_ip[..., 0], cov_ip[..., 1], cov_ip[..., 2]
    a_r = (inv_rr * cr + inv_rg * cg + inv_rb * cb) / det
    a_g = (inv_rg * cr + inv_gg * cg + inv_gb * cb) / det
    a_b = (inv_rb * cr + inv_gb * cg + inv_bb * cb) / det
    bias = mean_p - a_r * mr - a_g * mg - a_b * mb
    return (_box(a_r, radius) * r + _box(a_g, radius) * g + _box(a_b, radius) * b
            + _box(bias, radius))


def contour_band(alpha: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(hard, band): the mask ``alpha >= 0.5`` as uint8, and the pixels within ``radius`` of its
    contour (a disc dilation that differs from the erosion)."""
    hard = (alpha >= 0.5).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return hard, cv2.dilate(hard, kernel) != cv2.erode(hard, kernel)


def snap_edge(image: np.ndarray, alpha: np.ndarray, config: RefineConfig = DEFAULT_REFINE) -> np.ndarray:
    """Move the 0.5 contour of a coarse P(foreground) to the colour boundary (the image
    (H, W, 3) float in [0, 1]; the alpha (H, W)).

    The model's logits live on a grid 4 times coarser than its input, so its edge is often a
    pixel off. In a thin band around the contour, each pixel is compared with the mean colour of
    the confident foreground (F) and background (B) pixels near it, outside the band: the alpha
    of a pixel that mixes the two is its projection on the line from B to F (the colour-line
    model of natural image matting), ``a = (I - B) . (F - B) / |F - B|^2``, clipped to [0, 1].
    Where F and B are too alike to tell apart (closer than ``snap_contrast``), or one side has
    no confident pixel nearby, the model's alpha stays."""
    side = min(alpha.shape)
    band_r = max(1, round(config.snap_band * side))
    radius = max(band_r + 1, round(config.snap_radius * side))  # reaches past the band
    hard, band = contour_band(alpha, band_r)
    if not band.any():
        return alpha

    def window_sum(x: np.ndarray) -> np.ndarray:
        # Sums, not ``_box``'s reflected means: past the image border there are no pixels to
        # count as confident foreground or background.
        k = 2 * radius + 1
        return cv2.boxFilter(x, ddepth=-1, ksize=(k, k), normalize=False, borderType=cv2.BORDER_CONSTANT)

    image = image.astype(np.float32)
    sure_fg = ((hard == 1) & ~band).astype(np.float32)
    sure_bg = ((hard == 0) & ~band).astype(np.float32)
    count_fg, count_bg = window_sum(sure_fg), window_sum(sure_bg)
    mean_fg = window_sum(image * sure_fg[..., None]) / np.maximum(count_fg, 1e-6)[..., None]
    mean_bg = window_sum(image * sure_bg[..., None]) / np.maximum(count_bg, 1e-6)[..., None]
    line = mean_fg - mean_bg
    length2 = (line * line).sum(axis=-1)
    projected = np.clip(((image - mean_bg) * line).sum(axis=-1) / (length2 + 1e-6), 0.0, 1.0)
    trusted = band & (count_fg > 0) & (count_bg > 0) & (length2 > config.snap_contrast**2)
    return np.where(trusted, projected, alpha).astype(np.float32)


def refine_alpha(image: np.ndarray, alpha: np.ndarray, config: RefineConfig = DEFAULT_REFINE) -> np.ndarray:
    """Coarse P(foreground) (H, W) + the image (H, W, 3, float in [0, 1]) -> the final alpha.

    First the contour moves to the colour boundary (``snap_edge``, when ``config.snap``). Then,
    outside a thin band around the 0.5 contour the alpha is snapped to exactly 0 or 1 (where the
    model is certain, or far from any edge); inside the band the guided filter's output, clipped
    to [0, 1], replaces it."""
    if config.snap:
        alpha = snap_edge(image, alpha, config)
    h, w = alpha.shape
    side = min(h, w)
    hard, band = contour_band(alpha, max(1, round(config.band * side)))
    refined = alpha.astype(np.float32).copy()
    if band.any():
        radius = max(1, round(config.guided_radius * side))
        filtered = guided_filter(image, alpha, radius=radius, eps=config.guided_eps)
        refined[band] = filtered[band]
    refined = np.clip(refined, 0.0, 1.0)
    # Away from the band the matte is binary; inside it, confident pixels stay confident.
    refined[~band] = hard[~band].astype(np.float32)
    refined[alpha <= config.certain_low] = 0.0
    refined[(alpha >= config.certain_high) & ~band] = 1.0
    return refined


def estimate_foreground(image: np.ndarray, alpha: np.ndarray, *, radii: Sequence[int]) -> np.ndarray:
    """Blur-fusion foreground estimation (Forte & Pitie, 2021): the colour F with
    ``image = alpha * F + (1 - alpha) * B`` where F and B are smooth nearby colours. Pixels with
    alpha 1 keep their colour exactly."""
    a = alpha.astype(np.float32)[..., None]
    fg = image.astype(np.float32)
    bg = image.astype(np.float32)
    for radius in radii:
        blurred_a = _box(a[..., 0], radius)[..., None]
        blurred_f = _box(fg * a, radius) / (blurred_a + 1e-5)
        blurred_b = _box(bg * (1 - a), radius) / ((1 - blurred_a) + 1e-5)
        fused = blurred_f + a * (image - a * blurred_f - (1 - a) * blurred_b)
        fg = np.clip(fused, 0.0, 1.0).astype(np.float32)
        bg = blurred_b.astype(np.float32)
    return fg


def cut_out(image: Image.Image, alpha: np.ndarray, config: RefineConfig = DEFAULT_REFINE) -> Image.Image:
    """An RGB image and its coarse P(foreground) -> the refined RGBA cut-out, same size."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if alpha.shape != rgb.shape[:2]:
        raise ValueError(f"alpha {alpha.shape} does not match the image {rgb.shape[:2]}")
    matte = refine_alpha(rgb, alpha, config)
    if config.decontaminate:
        side = min(matte.shape)
        radii = [max(1, round(r * side)) for r in config.fusion_radii]
        fg = estimate_foreground(rgb, matte, radii=radii)
        # Opaque pixels keep their exact colour; only the fringe is re-estimated.
        fg = np.where(matte[..., None] >= 1.0, rgb, fg)
    else:
        fg = rgb
    rgba = np.empty((*matte.shape, 4), dtype=np.uint8)
    rgba[..., :3] = np.clip(fg * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgba[..., 3] = np.clip(matte * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


@overload
def remove_background(segmenter: Segmenter, image: Image.Image, *, batch_size: int = ...,
                      max_pixels: int = ..., config: RefineConfig = ..., flip: bool = ...,
                      scales: Sequence[float] = ..., rotate: bool = ...) -> Image.Image: ...
@overload
def remove_background(segmenter: Segmenter, image: Sequence[Image.Image], *, batch_size: int = ...,
                      max_pixels: int = ..., config: RefineConfig = ...,
                      flip: bool = ..., scales: Sequence[float] = ...,
                      rotate: bool = ...) -> list[Image.Image]: ...


def remove_background(segmenter: Segmenter, image: Image.Image | Sequence[Image.Image], *,
                      batch_size: int = 8, max_pixels: int = DEFAULT_MAX_PIXELS,
                      config: RefineConfig = DEFAULT_REFINE, flip: bool = False,
                      scales: Sequence[float] = (1.0,),
                      rotate: bool = False) -> Image.Image | list[Image.Image]:
    """Cut the foreground out of one image (-> an RGBA image) or several (-> a list), each the
    same size as its input. An RGBA input is segmented over white and keeps its own
    transparency: the output alpha is the product of both. ``flip``, ``scales`` and ``rotate``:
    mirror, multi-scale and quarter-turn test-time augmentation (``predict_alpha``)."""
    single = isinstance(image, Image.Image)
    images: list[Image.Image] = [image] if isinstance(image, Image.Image) else list(image)
    # 1. check inputs (named errors for empty, huge or unreadable images)
    rgb = [check_image(img, index=i, max_pixels=max_pixels) for i, img in enumerate(images)]
    # 2. P(foreground) at each image's size
    alphas = predict_alpha(segmenter, rgb, batch_size=batch_size, max_pixels=max_pixels, flip=flip,
                           scales=scales, rotate=rotate)
    results = []
    for original, picture, alpha in zip(images, rgb, alphas, strict=True):
        # 3. snap the edge to the colour boundary, refine the edge band, decontaminate the fringe
        out = cut_out(picture, alpha, config)
        # 4. an input that was already partly transparent stays so
        if original.mode in ("RGBA", "LA", "PA", "P") and original.mode != "RGB":
            own = np.asarray(original.convert("RGBA").getchannel("A"), dtype=np.uint16)
            if (own < 255).any():
                arr = np.asarray(out).copy()
                arr[..., 3] = (arr[..., 3].astype(np.uint16) * own // 255).astype(np.uint8)
                out = Image.fromarray(arr, "RGBA")
        results.append(out)
    return results[0] if single else results
