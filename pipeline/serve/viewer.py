"""The neighbour viewer: a page at ``/`` and the endpoints it calls.

``GET /``: the page (package data, inlined into one response; no build step, no CDN). ``POST /explain``:
one image's undefended prediction and, for every layer, its K neighbours (ids, keys, distances,
vote weights) and the defended prediction under every weighting. ``GET /queries?page=N`` and
``GET /query-image/{key}``: the job's query split, paged. ``GET /image/{id}?size=S``: a database
image (a neighbour) by id, one ranged read of its shard, as a thumbnail. ``POST /attack``: gray-
box PGD (or the adaptive kNN attack, when the job's attack database can be built) on the server,
one at a time (429 while busy), steps and budget capped, stopped at a time limit (504); it runs
in its own thread, so ``/classify`` keeps answering."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from pipeline.data.offsets import ImageNotFound
from pipeline.weighting import vote

WEIGHTINGS = ("uw", "cbw_e", "cbw_d")
VIEWER_LIMITS = dict(max_attack_steps=100, max_attack_budget=1.0, attack_timeout_s=60.0,
                     attack_database_size=2000, max_thumbnail=512, queries_per_page=48)


class AttackTimeout(RuntimeError):
    pass


def page_html() -> str:
    """The page with its stylesheet and script inlined: one guarded request loads it all (a
    ``<script src>`` could not carry the token)."""
    files = resources.files("pipeline.serve").joinpath("static")
    html = files.joinpath("index.html").read_text()
    html = html.replace('<link rel="stylesheet" href="viewer.css">',
                        f"<style>\n{files.joinpath('viewer.css').read_text()}</style>")
    return html.replace('<script src="viewer.js"></script>',
                        f"<script>\n{files.joinpath('viewer.js').read_text()}</script>")


def thumbnail(data: bytes, size: int, max_pixels: int) -> tuple[bytes, str]:
    """A thumbnail of at most ``size`` px a side: PNG for small images (exact pixels; the page
    scales them up crisply), JPEG otherwise."""
    with Image.open(io.BytesIO(data)) as img:
        if img.width * img.height > max_pixels:
            raise ValueError(f"image has {img.width * img.height} pixels (max {max_pixels})")
        img = img.convert("L" if img.mode in ("L", "I;16", "1") else "RGB")
        img.thumbnail((size, size), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        if img.width * img.height <= 128 * 128:
            img.save(out, "PNG")
            return out.getvalue(), "image/png"
        img.save(out, "JPEG", quality=85)
        return out.getvalue(), "image/jpeg"


def png_data_url(image: np.ndarray) -> str:
    """HWC uint8 (C = 1 or 3) as a data: URL."""
    out = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def amplified(delta: np.ndarray) -> np.ndarray:
    """A perturbation made visible: mid-grey is zero, the largest change reaches black/white."""
    scale = max(float(np.abs(delta).max()), 1e-8)
    return np.clip(np.round(127.5 + 127.5 * delta / scale), 0, 255).astype(np.uint8)


def explain(defense, images: np.ndarray, k: int, class_name) -> list[dict]:
    """Everything the page shows about each image: undefended prediction, and per layer the
    neighbours with their vote weights and the defended prediction under every weighting."""
    probs, by_layer = defense.neighbours_all_layers(images, defense.layers, k=k)
    weights = {(layer, rule): defense.weights_for(by_layer[layer], rule)
               for layer in defense.layers for rule in WEIGHTINGS}
    votes = {}
    for (layer, rule), w in weights.items():
        scores = vote(by_layer[layer].softmax, w)
        votes[layer, rule] = scores.argmax(-1), scores
    out = []
    for j in range(len(images)):
        undefended = int(probs[j].argmax())
        item = {"undefended": {"label": undefended, "name": class_name(undefended),
                               "score": float(probs[j, undefended])}, "layers": {},
                "generation": getattr(defense, "generation", 0)}  # the database that answered
        for layer in defense.layers:
            neigh = by_layer[layer]
            ok = neigh.ids[j] != -1
            ids = neigh.ids[j][ok].tolist()
            keys = defense.keys_of(ids) if defense.keys_of is not None else [None] * len(ids)
            voted = neigh.softmax[j][ok].argmax(-1).tolist()
            predictions = {}
            for rule in WEIGHTINGS:
                labels, scores = votes[layer, rule]
                predictions[rule] = {"label": int(labels[j]), "name": class_name(int(labels[j])),
                                     "scores": [float(s) for s in scores[j]]}
            item["layers"][layer] = {"predictions": predictions, "neighbours": [
                {"id": i, "key": key, "distance": float(d), "vote": v, "vote_name": class_name(v),
                 "weights": {r: float(weights[layer, r][j][ok][n]) for r in WEIGHTINGS}}
                for n, (i, key, d, v) in enumerate(zip(ids, keys, neigh.distances[j][ok].tolist(),
                                                       voted, strict=True))]}
        out.append(item)
    return out


class _Attacker:
    """Crafts one adversarial image at a time against the defense's model (thread-safe reads
    of the model: attacks only differentiate through it)."""

    def __init__(self, defense, job_dir, limits: dict):
        self.defense, self.job_dir, self.limits = defense, job_dir, limits
        self._attack_db = None
        self._db_lock = threading.Lock()

    @property
    def methods(self) -> list[str]:
        """PGD always; the adaptive attack where the defense's features are differentiable and
        a job folder can supply the attack database."""
        adaptive = self.job_dir is not None and hasattr(self.defense.model, "forward_taps")
        return ["pgd", "adaptive"] if adaptive else ["pgd"]

    def attack_db(self):
        """The attacker's database, built once on first use from the job's
        ``evaluate.attack_database`` (size capped, drawn from the defense database)."""
        with self._db_lock:
            if self._attack_db is None:
                from pipeline.evaluate.experiment import build_attack_database
                from pipeline.jobfolder import load_spec

                spec = load_spec(self.job_dir).evaluate.attack_database
                size = min(spec.size, self.limits["attack_database_size"])
                spec = spec.model_copy(update={"size": size, "overlap": 1.0})
                empty = np.zeros((0,), np.uint8)
                self._attack_db = build_attack_database(
                    self.defense, str(self.job_dir), spec, {"images": empty, "labels": empty},
                    list(self.defense.layers))
            return self._attack_db

    def run(self, image: np.ndarray, label: int, method: str, budget: float, steps: int,
            layer: str, weighting: str, k: int) -> np.ndarray:
        """The adversarial image, rounded to 8 bits (what a client would send)."""
        from pipeline.attacks.knn_aware import feature_fn_for, soft_knn_margin_attack
        from pipeline.attacks.pgd import pgd_l2
        from pipeline.features.backbones import images_to_tensor

        deadline = time.monotonic() + self.limits["attack_timeout_s"]

        def in_time(fn):
            def call(x):
                if time.monotonic() > deadline:
                    raise AttackTimeout(f"the attack ran past the server's "
                                        f"{self.limits['attack_timeout_s']:g} s limit "
                                        "(--attack-timeout-s); use fewer steps")
                return fn(x)
            return call

        x = images_to_tensor(image[None])
        y = torch.as_tensor([label])
        if method == "pgd":
            adv = pgd_l2(in_time(self.defense.model), x, y, budget, steps)
        else:
            from pipeline.weighting import neighbour_weights

            db = self.attack_db()
            weights = None if weighting == "uw" else torch.as_tensor(neighbour_weights(
                db.softmax.numpy(), weighting, self.defense.cbw_d_m, self.defense.cbw_d_p),
                dtype=torch.float32)
            adv = soft_knn_margin_attack(in_time(feature_fn_for(self.defense, layer)), x, y,
                                         db.features[layer], db.softmax, budget, steps,
                                         min(k, len(db.softmax)), db_weights=weights)
        adv = adv[0].permute(1, 2, 0).numpy()
        return np.clip(np.round(adv * 255), 0, 255).astype(np.uint8)


def add_viewer(app: FastAPI, defense, *, job_dir, read_request, check_params, decode_all,
               executor: ThreadPoolExecutor, limits: dict) -> None:
    """Mount the page and its endpoints on ``app`` (see the module docstring)."""
    from pipeline.jobfolder import QueryImages, class_names

    max_pixels = limits["max_image_pixels"]
    queries = QueryImages(job_dir) if job_dir is not None else None
    attacker = _Attacker(defense, job_dir, limits)
    attack_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knn-defense-attack")
    attack_lock = asyncio.Lock()
    names_cache: list = []

    def names() -> list[str]:
        if not names_cache:
            found = class_names(job_dir) if job_dir is not None else {}
            names_cache.append([found.get(c, f"class {c}")
                                for c in range(int(defense.model.num_classes))])
        return names_cache[0]

    def class_name(c: int) -> str:
        table = names()
        return table[c] if 0 <= c < len(table) else f"class {c}"

    async def on_defense_thread(fn, *args):  # FAISS and LevelDB stay on the defense's thread
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def not_found(exn: Exception) -> HTTPException:
        return HTTPException(404, str(exn))

    def size_param(size) -> int:
        if size is None:
            return 160
        if not str(size).isdigit() or not 16 <= int(size) <= limits["max_thumbnail"]:
            raise HTTPException(422, f"size must be an integer in [16, {limits['max_thumbnail']}]"
                                     f", got {size!r}")
        return int(size)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html())

    @app.get("/viewer-info")
    async def viewer_info():
        return {"class_names": await run_in_threadpool(names), "attacks": attacker.methods,
                "queries": queries is not None, "limits": limits}

    @app.get("/queries")
    async def list_queries(page: int = 0):
        if queries is None:
            raise HTTPException(404, "this server has no job folder, hence no query split")
        keys = await run_in_threadpool(queries.keys)
        per_page = limits["queries_per_page"]
        pages = max(1, math.ceil(len(keys) / per_page))
        if not 0 <= page < pages:
            raise HTTPException(422, f"page must be in [0, {pages - 1}], got {page}")
        chosen = keys[page * per_page:(page + 1) * per_page]
        return {"page": page, "pages": pages, "total": len(keys),
                "queries": [{"key": key, "label": queries.label(key),
                             "name": None if queries.label(key) is None
                             else class_name(queries.label(key))} for key in chosen]}

    async def image_response(read, what: str, size) -> Response:
        size = size_param(size)
        try:
            data = await run_in_threadpool(read)
            body, media = await run_in_threadpool(thumbnail, data, size, max_pixels)
        except (ImageNotFound, OverflowError) as exn:
            raise not_found(exn) from None
        except (OSError, ValueError) as exn:
            raise HTTPException(422, f"{what}: unreadable image ({exn})") from None
        return Response(body, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @app.get("/query-image/{key}")
    async def query_image(key: str, size: str | None = None):
        if queries is None:
            raise HTTPException(404, "this server has no job folder, hence no query split")
        return await image_response(lambda: queries(key), f"query {key!r}", size or 512)

    @app.get("/image/{image_id}")
    async def database_image(image_id: int, size: str | None = None):
        if defense.image_of is None:
            raise HTTPException(404, "this server has no job folder to read images from")
        return await image_response(lambda: defense.image(image_id), f"id {image_id}", size)

    async def one_image(request: Request):
        datas, params = await read_request(request)
        if len(datas) != 1:
            raise HTTPException(422, f"send exactly one image, got {len(datas)}")
        layer, weighting, k, _ = check_params(params)
        images = await run_in_threadpool(decode_all, datas)
        return images, params, layer, weighting, k

    @app.post("/explain")
    async def explain_one(request: Request):
        images, _, layer, weighting, k = await one_image(request)
        (item,) = await on_defense_thread(explain, defense, images, k, class_name)
        return {"layer": layer, "weighting": weighting, "k": k, "layers": list(defense.layers),
                **item}

    def attack_params(params) -> tuple[str, float, int]:
        method = params.get("method") or "pgd"
        if method not in attacker.methods:
            raise HTTPException(422, f"method {method!r}: this server runs {attacker.methods}")
        try:
            budget = float(params.get("budget") or 0.06)
            steps = int(params.get("steps") or 10)
        except ValueError:
            raise HTTPException(422, "budget must be a number and steps an integer") from None
        if not 0 < budget <= limits["max_attack_budget"]:
            raise HTTPException(422, f"budget must be in (0, {limits['max_attack_budget']:g}] "
                                     f"(||x* - x|| / ||x||), got {budget:g}")
        if not 1 <= steps <= limits["max_attack_steps"]:
            raise HTTPException(422, f"steps must be in [1, {limits['max_attack_steps']}], "
                                     f"got {steps}")
        return method, budget, steps

    @app.post("/attack")
    async def attack(request: Request):
        images, params, layer, weighting, k = await one_image(request)
        method, budget, steps = attack_params(params)
        if attack_lock.locked():
            raise HTTPException(429, "an attack is already running on this server (one at a "
                                     "time); try again when it finishes")
        async with attack_lock:
            (clean,) = await on_defense_thread(explain, defense, images, k, class_name)
            label = params.get("label")
            label = int(label) if label is not None and str(label).isdigit() \
                else clean["undefended"]["label"]
            loop = asyncio.get_running_loop()
            try:
                adv = await loop.run_in_executor(attack_executor, attacker.run, images[0], label,
                                                 method, budget, steps, layer, weighting, k)
            except AttackTimeout as exn:
                raise HTTPException(504, str(exn)) from None
            (moved,) = await on_defense_thread(explain, defense, adv[None], k, class_name)
        x, x_adv = images[0].astype(np.float64) / 255, adv.astype(np.float64) / 255
        achieved = float(np.linalg.norm(x_adv - x) / max(np.linalg.norm(x), 1e-12))
        return {"method": method, "budget": budget, "achieved": achieved, "steps": steps,
                # a reload between the clean and the adversarial search: they differ in database
                "generation_changed": clean["generation"] != moved["generation"],
                "label": label, "layer": layer, "weighting": weighting, "k": k,
                "clean": clean, "adversarial": moved,
                "images": {"clean": png_data_url(images[0]), "adversarial": png_data_url(adv),
                           "perturbation": png_data_url(amplified(x_adv - x))}}

    app.state.attack_executor, app.state.attacker = attack_executor, attacker
