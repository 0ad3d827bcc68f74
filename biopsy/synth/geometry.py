"""Small geometric helpers shared by the layout builders: polar outlines, periodic noise, points."""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import Polygon

OUTLINE_VERTICES = 96


def angles(count: int = OUTLINE_VERTICES) -> np.ndarray:
    return np.linspace(0.0, 2 * np.pi, count, endpoint=False)


def periodic_noise(rng: np.random.Generator, theta: np.ndarray, harmonics: range,
                   amplitude: float) -> np.ndarray:
    """Smooth random function of the angle: a sum of harmonics with amplitude ~ 1/k, max |.| ~ amplitude."""
    total = np.zeros_like(theta)
    for k in harmonics:
        total += rng.normal(0, 1.0 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    scale = np.abs(total).max()
    return total * (amplitude / scale) if scale > 0 else total


def polar_outline(centre_xy: tuple[float, float], radius: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """(k, 2) float32 vertices (x, y) of the closed curve r(theta) around ``centre_xy``."""
    x = centre_xy[0] + radius * np.cos(theta)
    y = centre_xy[1] + radius * np.sin(theta)
    return np.stack([x, y], axis=1).astype(np.float32)


def polygon_of(vertices: np.ndarray) -> Polygon:
    polygon = Polygon(vertices)
    return polygon if polygon.is_valid else shapely.make_valid(polygon).buffer(0)


def largest_part(geometry) -> Polygon | None:
    """The largest polygon of a (multi)polygon, or None when it is empty."""
    if geometry.is_empty:
        return None
    parts = getattr(geometry, "geoms", [geometry])
    parts = [p for p in parts if isinstance(p, Polygon) and not p.is_empty]
    return max(parts, key=lambda p: p.area) if parts else None


def exterior_vertices(polygon: Polygon) -> np.ndarray:
    """(k, 2) float32 exterior vertices without the repeated closing vertex."""
    return np.asarray(polygon.exterior.coords, np.float32)[:-1]


def hex_points(bounds: tuple[float, float, float, float], spacing: float, jitter: float,
               rng: np.random.Generator) -> np.ndarray:
    """(n, 2) points of a jittered hexagonal grid covering ``bounds`` (xmin, ymin, xmax, ymax)."""
    xmin, ymin, xmax, ymax = bounds
    row_step = spacing * np.sqrt(3) / 2
    rows = np.arange(ymin, ymax + row_step, row_step)
    cols = np.arange(xmin, xmax + spacing, spacing)
    x = cols[None, :] + (np.arange(len(rows)) % 2)[:, None] * spacing / 2
    y = np.broadcast_to(rows[:, None], x.shape)
    points = np.stack([x.ravel(), y.ravel()], axis=1)
    return points + rng.uniform(-jitter, jitter, points.shape)


def points_along(vertices: np.ndarray, spacing: float, rng: np.random.Generator,
                 keep: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Points every ~``spacing`` along a closed outline and the tangent angle (degrees) at each.

    A random fraction ``1 - keep`` of them is dropped (nuclei out of the plane of section).
    """
    closed = np.vstack([vertices, vertices[:1]]).astype(np.float64)
    steps = np.diff(closed, axis=0)
    lengths = np.hypot(steps[:, 0], steps[:, 1])
    cumulative = np.concatenate([[0.0], np.cumsum(lengths)])
    count = int(cumulative[-1] // spacing)
    if count < 1:
        return np.zeros((0, 2)), np.zeros(0)
    at = (np.arange(count) + rng.uniform(0, 1)) * cumulative[-1] / count
    at = (at + rng.normal(0, spacing * 0.15, count)) % cumulative[-1]
    segment = np.clip(np.searchsorted(cumulative, at, side="right") - 1, 0, len(steps) - 1)
    t = ((at - cumulative[segment]) / np.maximum(lengths[segment], 1e-9))[:, None]
    points = closed[segment] + t * steps[segment]
    tangent = np.degrees(np.arctan2(steps[segment, 1], steps[segment, 0]))
    chosen = rng.random(count) < keep
    return points[chosen], tangent[chosen]


def random_points_in(polygon, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` uniform random points inside ``polygon`` (rejection from its box)."""
    if count <= 0 or polygon.is_empty:
        return np.zeros((0, 2))
    xmin, ymin, xmax, ymax = polygon.bounds
    fill = max(polygon.area / max((xmax - xmin) * (ymax - ymin), 1e-9), 0.05)
    candidates = rng.uniform((xmin, ymin), (xmax, ymax), (int(count / fill * 1.3) + 8, 2))
    inside = shapely.contains_xy(polygon, candidates[:, 0], candidates[:, 1])
    return candidates[inside][:count]


def nuclei_rows(points: np.ndarray, semi_axes_px: tuple[float, float], angle_deg, rng,
                darkness: float = 1.0, size_jitter: float = 0.15) -> np.ndarray:
    """(n, 6) float32 nucleus table: x, y, semi-axis a, semi-axis b (px), angle (deg), darkness."""
    n = len(points)
    size = 1 + rng.normal(0, size_jitter, n)
    angle = np.broadcast_to(np.asarray(angle_deg, np.float64), (n,)) if np.ndim(angle_deg) == 0 \
        else np.asarray(angle_deg)
    return np.column_stack([
        points[:, 0], points[:, 1],
        np.maximum(semi_axes_px[0] * size, 1.0), np.maximum(semi_axes_px[1] * size, 0.8),
        angle, darkness * (1 + rng.normal(0, 0.12, n)),
    ]).astype(np.float32)
