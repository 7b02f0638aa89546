"""Batched augmentations of digit images on the device, each drawn per image from the caller's generator: rotation
and zoom about the centre (bilinear, zero fill), elastic distortion (a smoothed random displacement field, Simard et
al.) applied in the same resample, and random erasing (one rectangle set to the background)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rotate_zoom_theta(angle, zoom):
    """The output -> input maps [B, 2, 3] (affine_grid's normalised coordinates) that turn each image
    counter-clockwise by ``angle[b]`` radians and magnify it by ``zoom[b]`` about its centre."""
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zero = torch.zeros_like(cos)
    # affine_grid's (x, y) have y pointing down: a counter-clockwise turn on screen samples the input at the
    # output point turned clockwise
    return torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)


def rotate_zoom(x, angle, zoom):
    """Images x [B, C, H, W] (float) each rotated counter-clockwise by ``angle[b]`` radians and magnified by
    ``zoom[b]`` about the image centre; bilinear, zero fill outside."""
    grid = F.affine_grid(rotate_zoom_theta(angle, zoom).to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# elastic distortion (Simard et al., 2003): the random displacement field's smoothing, in pixels
ELASTIC_SIGMA = 4.0


def elastic_field(u, alpha, sigma=ELASTIC_SIGMA):
    """Displacement fields [B, 2, H, W] in pixels ((dx, dy)) from uniform draws ``u`` [B, 2, H, W] in [0, 1): each
    component 2u - 1 smoothed by a Gaussian of ``sigma`` pixels (kernel normalised to sum 1, radius 3 sigma, zeros
    outside the image: the field fades towards the borders, which hold the digits' background) and scaled by
    ``alpha``."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, device=u.device, dtype=u.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    b, c, h, w = u.shape
    f = (2 * u - 1).reshape(b * c, 1, h, w)
    f = F.conv2d(f, k.view(1, 1, 1, -1), padding=(0, r))
    f = F.conv2d(f, k.view(1, 1, -1, 1), padding=(r, 0))
    return alpha * f.reshape(b, c, h, w)


def elastic_warp(x, disp, theta=None):
    """Images x [B, C, H, W] (float) resampled at every pixel's own position plus ``disp`` [B, 2, H, W] ((dx, dy),
    pixels): output[y, x] = input[y + dy, x + dx], bilinear, zero fill outside. ``theta`` [B, 2, 3]
    (rotate_zoom_theta) puts a rotation/zoom before the distortion in the same single resample: output[p] =
    input[theta(p + disp(p))], the image ``elastic_warp(rotate_zoom(x, ...), disp)`` would give without blurring
    the digits by a second bilinear interpolation."""
    b, c, h, w = x.shape
    ys = (torch.arange(h, device=x.device, dtype=disp.dtype) + 0.5) * (2.0 / h) - 1
    xs = (torch.arange(w, device=x.device, dtype=disp.dtype) + 0.5) * (2.0 / w) - 1
    gx = xs[None, None, :] + disp[:, 0] * (2.0 / w)
    gy = ys[None, :, None] + disp[:, 1] * (2.0 / h)
    grid = torch.stack([gx, gy], -1)
    if theta is not None:
        theta = theta.to(grid.dtype)
        grid = torch.einsum("bhwj,bij->bhwi", grid, theta[:, :, :2]) + theta[:, None, None, :, 2]
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


# random erasing (Zhong et al., 2017): the erased rectangle's area as a fraction of the image, and its aspect ratio
ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = (0.3, 1 / 0.3)


def erase_mask(u, p, h, w):
    """Boolean [B, 1, H, W] masks, one rectangle per image whose first draw is below ``p``: ``u`` [5, B] uniform
    draws in [0, 1) give (erase or not, area, log aspect, top, left). The rectangle (area ``s * H * W``, height over
    width ``r``) is clipped to the image; images not erased get an all-False mask."""
    ue, ua, ur, ut, ul = u
    area = (ERASE_AREA[0] + ua * (ERASE_AREA[1] - ERASE_AREA[0])) * (h * w)
    lo, hi = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = torch.exp(lo + ur * (hi - lo))
    eh = torch.sqrt(area * aspect).round().clamp(1, h).long()
    ew = torch.sqrt(area / aspect).round().clamp(1, w).long()
    top = (ut * (h - eh + 1)).long()
    left = (ul * (w - ew + 1)).long()
    ys = torch.arange(h, device=u.device)[None, :, None]
    xs = torch.arange(w, device=u.device)[None, None, :]
    inside = ((ys >= top[:, None, None]) & (ys < (top + eh)[:, None, None]) &
              (xs >= left[:, None, None]) & (xs < (left + ew)[:, None, None]))
    return (inside & (ue < p)[:, None, None])[:, None]
