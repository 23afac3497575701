"""Generate the default avatar (``avatars/default/``) from scikit-image's astronaut portrait.

Dev-time only: needs scikit-image, dlib and face_recognition_models. The server reads the
committed ``avatar.json`` and never imports dlib.

    .venv/bin/python avatars/tools/make_default_avatar.py [--out avatars/default]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "default"
UPSAMPLE = 4  # the predictor runs on a 4x upscaled copy: landmarks get sub-pixel precision


def detect_landmarks(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """68 dlib landmarks (x, y) of the most confident frontal face, in pixel coordinates."""
    import dlib  # dev-time dependency only
    import face_recognition_models

    detector = dlib.get_frontal_face_detector()
    rects, scores, _ = detector.run(rgb, 1, 0.0)
    if len(rects) == 0:
        raise RuntimeError("no face found")
    best = max(range(len(rects)), key=lambda i: scores[i])
    r = rects[best]
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
    big = cv2.resize(rgb, None, fx=UPSAMPLE, fy=UPSAMPLE, interpolation=cv2.INTER_CUBIC)
    big_rect = dlib.rectangle(
        r.left() * UPSAMPLE, r.top() * UPSAMPLE, r.right() * UPSAMPLE, r.bottom() * UPSAMPLE
    )
    shape = predictor(big, big_rect)
    pts = np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=np.float64)
    # pixel-centre convention of cv2.resize: x_big = (x + 0.5) * s - 0.5
    return (pts + 0.5) / UPSAMPLE - 0.5


def _format_json(meta: dict[str, Any]) -> str:
    """Indented JSON with one ``[x, y]`` landmark per line (diff-friendly)."""
    lines = ["{"]
    items = list(meta.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if key == "landmarks":
            pts = ",\n".join(f"    [{x}, {y}]" for x, y in value)
            lines.append(f'  "{key}": [\n{pts}\n  ]{comma}')
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    if json.loads(text) != meta:
        raise RuntimeError("JSON formatting round-trip failed")
    return text


def make_default_avatar(out_dir: Path) -> dict[str, Any]:
    from skimage import data  # dev-time dependency only

    rgb = np.ascontiguousarray(data.astronaut(), dtype=np.uint8)
    if rgb.shape != (512, 512, 3):
        raise RuntimeError(f"unexpected astronaut image shape {rgb.shape}")
    landmarks = detect_landmarks(rgb)
    out_dir.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(out_dir / "astronaut.png"), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise RuntimeError("could not write astronaut.png")
    meta: dict[str, Any] = {
        "id": "default",
        "name": "Eileen Collins (NASA)",
        "image": "astronaut.png",
        "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in landmarks],
        "source": "NASA portrait of astronaut Eileen Collins, as distributed with "
        "scikit-image (skimage.data.astronaut)",
        "license": "Public domain (NASA image)",
    }
    (out_dir / "avatar.json").write_text(_format_json(meta), encoding="utf-8")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args()
    meta = make_default_avatar(args.out)
    print(f"wrote {args.out}: {len(meta['landmarks'])} landmarks")


if __name__ == "__main__":
    main()
