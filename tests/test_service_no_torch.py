"""Importing the service, starting it and answering requests never imports torch (the serving image has none)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import base64, io, json, sys
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
import service.app
from service.settings import Settings

after_import = sorted(m for m in ("torch", "transformers", "training") if m in sys.modules)
buf = io.BytesIO()
Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(buf, "PNG")
settings = Settings(bundles=[sys.argv[1]], store=sys.argv[2])
with TestClient(service.app.create_app(settings)) as client:
    ready = client.get("/readyz").status_code
    image = base64.b64encode(buf.getvalue()).decode()
    first = client.post("/vqa", json={"image": image, "question": "what shape is it?"})
    second = client.post("/vqa", json={"image_id": first.json()["image_id"], "question": "what shape is it?"})
    client.post("/images", json={"image": image})
    client.get("/metrics")
print(json.dumps({
    "after_import": after_import,
    "after_serving": sorted(m for m in ("torch", "transformers", "training") if m in sys.modules),
    "statuses": [ready, first.status_code, second.status_code],
}))
"""


def test_serving_leaves_torch_out_of_sys_modules(tiny_bundle: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_bundle), str(tmp_path / "store")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["statuses"] == [200, 200, 200]
    assert result["after_import"] == [] and result["after_serving"] == []
