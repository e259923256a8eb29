"""A normal (non-editable) install carries the viewer's page: build the wheel, install it into
a folder of its own, and serve the page from there."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE_FILES = {"pipeline/serve/static/index.html", "pipeline/serve/static/viewer.js",
              "pipeline/serve/static/viewer.css", "pipeline/data/imagenet_hashtags.json"}


def test_wheel_ships_and_serves_the_viewer_page(tmp_path):
    source = tmp_path / "src"  # a clean copy of what the wheel is built from
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copytree(ROOT / "pipeline", source / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True)
    (wheel,) = (tmp_path / "dist").glob("knn_defense-*.whl")
    assert PAGE_FILES <= set(zipfile.ZipFile(wheel).namelist())
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True)
    probe = (
        "import pipeline, fastapi.testclient as t\n"
        "from pipeline.serve.viewer import page_html\n"
        "print(pipeline.__file__)\n"
        "html = page_html()\n"
        "assert 'function render()' in html and '--accent' in html, html[:200]\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip().startswith(str(site))  # the installed copy, not the checkout
