"""HTTP query service: images in, the kNN-defended label (and its evidence) out.

Why FastAPI + uvicorn: the service is a plain ASGI app, small, and testable in-process (Starlette's
TestClient or httpx with an ASGI transport, no sockets). One uvicorn process with one worker owns the
job's LevelDB store, which LevelDB requires (one process per database); do not run it with several
workers. Scale out with one such process per replica of the store.

Requests are decoded and checked on the event loop's thread pool; the defense itself (model, FAISS,
LevelDB) runs only in one dedicated worker thread. A :class:`MicroBatcher` merges the images of
requests that arrive within ``batch_window_ms`` of each other (up to ``max_batch`` images, grouped
by (layer, weighting, k) so different parameters never mix) into one forward + search + lookup.

Endpoints: ``POST /classify``, ``GET /healthz``, ``GET /info``, and the neighbour viewer's page
at ``/`` with its endpoints (``pipeline/serve/viewer.py``). Every bad input gets a 4xx with a
JSON ``detail``: 400 malformed JSON/base64, 401 missing or wrong token (``pipeline/serve/
access.py``), 413 too large (body, pixels, image count), 415 not an image / unsupported content
type, 422 corrupt image, empty list or bad parameters.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline import __version__
from pipeline.features.backbones import decode_args
from pipeline.features.tensor_decode import decode_like_database

WEIGHTINGS = ("uw", "cbw_e", "cbw_d")
TOP_CLASSES = 5
DEFAULT_LIMITS = dict(max_request_bytes=32 << 20, max_image_pixels=4096 * 4096,
                      max_images_per_request=64, max_k=1024, batch_window_ms=5.0, max_batch=64)


# ----------------------------------------------------------------------------------------------
# Micro-batching


@dataclass
class _Batch:
    key: tuple
    items: list = field(default_factory=list)  # (images [n, ...], future)
    count: int = 0
    closed: bool = False
    full: asyncio.Event = field(default_factory=asyncio.Event)


class MicroBatcher:
    """Merges concurrent requests with the same key into one call of ``run(key, images)``.

    ``run`` takes the concatenated images [N, ...] and returns a tuple of arrays whose first axis
    is N; each request gets back its own rows. Calls run one at a time in ``executor`` (a single
    thread: the defense and its LevelDB store belong to this process). A batch starts with its
    first request and runs ``window_s`` later, or as soon as it holds ``max_batch`` images.
    Counters: ``batches_run``, ``requests_run``, ``images_run``."""

    def __init__(self, run, *, window_s: float, max_batch: int, executor: ThreadPoolExecutor):
        self._run, self.window_s, self.max_batch, self._executor = run, window_s, max_batch, executor
        self._open: dict[tuple, _Batch] = {}
        self._tasks: set[asyncio.Task] = set()
        self.batches_run = self.requests_run = self.images_run = 0

    def stats(self) -> dict:
        return {"batches_run": self.batches_run, "requests_run": self.requests_run,
                "images_run": self.images_run}

    async def submit(self, key: tuple, images: np.ndarray):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        n = len(images)
        batch = self._open.get(key)
        if batch is not None and batch.count + n > self.max_batch:
            self._close(batch)  # would overflow: run what it has now, start a new one
            batch = None
        if batch is None:
            batch = self._open[key] = _Batch(key)
            task = loop.create_task(self._lead(batch))  # a task, so a client leaving can't stop it
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        batch.items.append((images, future))
        batch.count += n
        if batch.count >= self.max_batch:
            self._close(batch)
        return await future

    def _close(self, batch: _Batch) -> None:
        batch.closed = True
        batch.full.set()
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]

    async def _lead(self, batch: _Batch) -> None:
        try:
            await asyncio.wait_for(batch.full.wait(), self.window_s)
        except asyncio.TimeoutError:
            pass
        self._close(batch)
        futures = [f for _, f in batch.items]
        try:
            images = np.concatenate([im for im, _ in batch.items])
            loop = asyncio.get_running_loop()
            outputs = await loop.run_in_executor(self._executor, self._run, batch.key, images)
        except Exception as exn:  # every waiting request gets the error
            for f in futures:
                if not f.done():
                    f.set_exception(exn)
            return
        self.batches_run += 1
        self.requests_run += len(batch.items)
        self.images_run += len(images)
        start = 0
        for im, f in batch.items:
            rows = tuple(o[start:start + len(im)] for o in outputs)
            start += len(im)
            if not f.done():
                f.set_result(rows)


# ----------------------------------------------------------------------------------------------
# Body size limit (pure ASGI, so it acts before anything reads the body)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the {limit}-byte limit (max_request_bytes)")


class _BodyLimit:
    """413 at once when Content-Length is over the limit; otherwise count bytes as they stream
    in and raise :class:`BodyTooLarge` (an HTTPException, answered by the app) past it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    response = JSONResponse({"detail": "invalid Content-Length header"}, 400)
                    return await response(scope, receive, send)
                if declared > self.max_bytes:
                    response = JSONResponse({"detail": BodyTooLarge(self.max_bytes).detail}, 413,
                                            headers={"Connection": "close"})
                    return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        return await self.app(scope, limited_receive, send)


# ----------------------------------------------------------------------------------------------
# Request parsing


def _bad(status: int, detail: str) -> HTTPException:
    return HTTPException(status, detail)


def _parse_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise _bad(422, f"{name} must be a boolean (true/false), got {value!r}")


def _b64(text: str, i: int) -> bytes:
    if text.startswith("data:") and "," in text:  # data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exn:
        raise _bad(400, f"images[{i}]: malformed base64 ({exn})") from None


class _Params:
    """Query parameters merged with body fields (JSON or form); conflicting values are a 422."""

    def __init__(self, query, body: dict):
        self.query, self.body = query, body

    def get(self, name: str):
        q, b = self.query.get(name), self.body.get(name)
        if q is not None and b is not None and str(q) != str(b):
            raise _bad(422, f"{name} given twice with different values ({q!r} in the query, "
                            f"{b!r} in the body)")
        return b if b is not None else q


def _decode_one(data: bytes, i: int, max_pixels: int, decode: dict, decoder: str = "pil"
                ) -> np.ndarray:
    """One request image, decoded as the database's images were (``decoder``: the recipe's)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode_like_database(data, max_pixels, decoder, **decode)
    except (OverflowError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
        raise _bad(413, f"images[{i}]: too many pixels ({exn}; max_image_pixels={max_pixels})"
                   ) from None
    except UnidentifiedImageError:
        raise _bad(415, f"images[{i}]: not an image format this server can read "
                        "(send PNG, JPEG, WebP, ...)") from None
    except Exception as exn:  # any decoder failure on user bytes is a bad image, not ours
        reason = str(exn) or type(exn).__name__
        raise _bad(422, f"images[{i}]: corrupt or unreadable image ({reason})") from None


# ----------------------------------------------------------------------------------------------
# The app


def create_app(defense, *, job_dir=None, token: str | None = None,
               reload_interval_s: float = 2.0,
               max_request_bytes: int = DEFAULT_LIMITS["max_request_bytes"],
               max_image_pixels: int = DEFAULT_LIMITS["max_image_pixels"],
               max_images_per_request: int = DEFAULT_LIMITS["max_images_per_request"],
               max_k: int = DEFAULT_LIMITS["max_k"],
               batch_window_ms: float = DEFAULT_LIMITS["batch_window_ms"],
               max_batch: int = DEFAULT_LIMITS["max_batch"], **viewer_limits) -> FastAPI:
    """ASGI app serving ``defense`` (a :class:`~pipeline.defense.classifier.DefendedClassifier`).
    ``job_dir``: its job folder, for the viewer's query list and attack database;
    ``reload_interval_s``: how often generation.json is polled for a newer database generation
    (0: never; ``POST /admin/reload`` from loopback reloads at once); ``token``:
    required on every request but /healthz; ``viewer_limits``: overrides of
    ``pipeline.serve.viewer.VIEWER_LIMITS``. ``app.state.batcher`` exposes the micro-batcher."""
    from pipeline.serve.access import TokenCheck
    from pipeline.serve.viewer import VIEWER_LIMITS, add_viewer

    unknown = set(viewer_limits) - set(VIEWER_LIMITS)
    if unknown:
        raise TypeError(f"unknown limits {sorted(unknown)}")
    model = defense.model
    decode = decode_args(model)  # the same resize/crop the database images got
    limits = dict(max_request_bytes=max_request_bytes, max_image_pixels=max_image_pixels,
                  max_images_per_request=max_images_per_request, max_k=max_k,
                  batch_window_ms=batch_window_ms, max_batch=max_batch,
                  **{**VIEWER_LIMITS, **viewer_limits})
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knn-defense")

    def run_batch(key: tuple, images: np.ndarray):
        layer, weighting, k = key
        probs, by_layer = defense.neighbours_all_layers(images, [layer], k=k)
        neighbours = by_layer[layer]
        labels, scores = defense.vote(neighbours, weighting)
        # the generation that answered: swaps happen on this thread, between batches
        generation = np.full(len(images), getattr(defense, "generation", 0))
        return probs, labels, scores, neighbours.ids, neighbours.distances, generation

    batcher = MicroBatcher(run_batch, window_s=batch_window_ms / 1000.0, max_batch=max_batch,
                           executor=executor)

    reload_lock = asyncio.Lock()

    async def reload_generation() -> bool:
        """Load the database's newer generation beside the current one, then swap it in on
        the defense's thread between two batches: every request is answered wholly by the old
        generation or wholly by the new one. Store deletions a removal deferred to this
        process (it holds the store) are applied after the swap."""
        async with reload_lock:
            prepared = await run_in_threadpool(defense.prepare_reload)
            if prepared is None:
                return False
            await asyncio.get_running_loop().run_in_executor(executor, defense.swap, prepared)
            await run_in_threadpool(_apply_deferred_deletions, defense)
            return True

    async def watch_generations(interval_s: float):
        while True:
            await asyncio.sleep(interval_s)
            try:
                if not await reload_generation():  # and deletions a failed attempt left
                    await run_in_threadpool(_apply_deferred_deletions, defense)
            except Exception as exn:  # a half-written change is retried at the next poll
                print(f"knn-defense serve: reload failed ({type(exn).__name__}: {exn}); "
                      "still answering from generation", defense.generation, flush=True)

    @asynccontextmanager
    async def lifespan(app):
        watcher = None
        if reload_interval_s > 0 and getattr(defense, "job_dir", None) is not None:
            watcher = asyncio.create_task(watch_generations(reload_interval_s))
        yield
        if watcher is not None:
            watcher.cancel()
        executor.shutdown(wait=True)
        app.state.attack_executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="knn-defense", version=__version__, lifespan=lifespan,
                  summary="kNN defense against adversarial images (Dubey et al., CVPR 2019)")
    app.state.batcher = batcher
    app.state.defense = defense
    app.state.limits = limits
    app.add_middleware(_BodyLimit, max_bytes=max_request_bytes)
    if token is not None:
        app.add_middleware(TokenCheck, token=token)  # added last: runs first

    async def read_request(request: Request) -> tuple[list[bytes], _Params]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=max_images_per_request + 1,
                                          max_fields=max_images_per_request + 16,
                                          max_part_size=max_request_bytes)
            except StarletteHTTPException as exn:
                if exn.status_code == 413:
                    raise
                if "Too many" in str(exn.detail):
                    raise _bad(413, f"{exn.detail} (max_images_per_request="
                                    f"{max_images_per_request})") from None
                raise _bad(400, f"bad multipart body: {exn.detail}") from None
            raw, fields = [], {}
            for name, value in form.multi_items():
                if name == "images":
                    raw.append(value)
                elif not isinstance(value, UploadFile):
                    fields[name] = value
            if len(raw) > max_images_per_request:
                raise _bad(413, f"{len(raw)} images in one request; the limit is "
                                f"{max_images_per_request} (max_images_per_request)")
            datas = []
            for i, value in enumerate(raw):
                datas.append(await value.read() if isinstance(value, UploadFile) else _b64(value, i))
            await form.close()
            return datas, _Params(request.query_params, fields)
        if ctype in ("application/json", ""):
            body = await request.body()
            try:
                payload = json.loads(body) if body else None
            except (json.JSONDecodeError, UnicodeDecodeError) as exn:
                raise _bad(400, f"malformed JSON body ({exn})") from None
            if not isinstance(payload, dict) or "images" not in payload:
                raise _bad(422, 'JSON body must be an object {"images": [base64, ...], ...}')
            images = payload["images"]
            if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
                raise _bad(422, '"images" must be a list of base64 strings')
            if len(images) > max_images_per_request:
                raise _bad(413, f"{len(images)} images in one request; the limit is "
                                f"{max_images_per_request} (max_images_per_request)")
            fields = {k: v for k, v in payload.items() if k != "images"}
            return [_b64(x, i) for i, x in enumerate(images)], _Params(request.query_params, fields)
        raise _bad(415, f"unsupported content type {ctype!r}: send multipart/form-data with file "
                        'field "images", or application/json {"images": [base64, ...]}')

    def check_params(params: _Params) -> tuple[str, str, int, bool]:
        layer = params.get("layer") or defense.layer
        if layer not in defense.layers:
            raise _bad(422, f"unknown layer {layer!r}; this server has {defense.layers}")
        weighting = params.get("weighting") or defense.weighting
        if weighting not in WEIGHTINGS:
            raise _bad(422, f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        k = params.get("k")
        if k is None:
            k = defense.k
        elif isinstance(k, bool) or not (isinstance(k, int) or str(k).strip().isdigit()):
            raise _bad(422, f"k must be a positive integer, got {k!r}")
        k = int(k)
        if not 1 <= k <= max_k:
            raise _bad(422, f"k must be in [1, {max_k}], got {k}")
        neighbours = _parse_bool("neighbours", params.get("neighbours") or False)
        return str(layer), str(weighting), k, neighbours

    def decode_all(datas: list[bytes]) -> np.ndarray:
        return np.stack([_decode_one(d, i, max_image_pixels, decode, defense.decoder)
                         for i, d in enumerate(datas)])

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exn: Exception):  # not a client error: say so
        return JSONResponse({"detail": f"internal error: {type(exn).__name__}: {exn}"}, 500)

    @app.post("/classify")
    async def classify(request: Request):
        """Classify one or many images; see the module docstring for the request forms."""
        datas, params = await read_request(request)
        layer, weighting, k, want_neighbours = check_params(params)
        if not datas:
            raise _bad(422, "no images in the request (multipart field or JSON list \"images\")")

        images = await run_in_threadpool(decode_all, datas)
        probs, labels, scores, ids, dists, generation = await batcher.submit(
            (layer, weighting, k), images)
        generation = int(generation[0])
        results = []
        for j in range(len(images)):
            top = np.argsort(-scores[j], kind="stable")[:TOP_CLASSES]
            item = {"label": int(labels[j]),
                    "scores": [{"class": int(c), "score": float(scores[j, c])} for c in top],
                    "undefended_label": int(probs[j].argmax()),
                    "undefended_score": float(probs[j].max())}
            if want_neighbours:
                ok = ids[j] != -1
                item["neighbours"] = {"ids": ids[j][ok].tolist(),
                                      "distances": dists[j][ok].astype(float).tolist()}
                if getattr(defense, "keys_of", None) is not None:
                    item["neighbours"]["keys"] = defense.keys_of(ids[j][ok])
            results.append(item)
        return {"layer": layer, "weighting": weighting, "k": k, "generation": generation,
                "results": results}

    def index_sizes() -> dict:
        return {name: int(index.ntotal) for name, index in defense.indexes.items()}

    def store_loaded() -> bool:
        return defense.store is not None and getattr(defense.store, "loaded", True)

    @app.get("/healthz")
    async def healthz():
        sizes = index_sizes()
        ok = store_loaded() and bool(sizes) and all(n > 0 for n in sizes.values())
        body = {"ok": ok, "store_loaded": store_loaded(), "indexes": sizes}
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/info")
    async def info():
        return {"version": __version__, "generation": getattr(defense, "generation", 0),
                "layers": list(defense.layers), "layer": defense.layer,
                "layer_reason": defense.layer_reason,
                "k": defense.k, "weighting": defense.weighting, "weightings": list(WEIGHTINGS),
                "cbw_d": {"m": defense.cbw_d_m, "p": defense.cbw_d_p},
                "num_classes": int(model.num_classes), "index_sizes": index_sizes(),
                "input": {"size": decode["size"], "channels": decode["channels"],
                          "resize": decode["resize"], "interpolation": decode["interpolation"]},
                "recipe": defense.recipe, "limits": limits,
                "batching": batcher.stats()}

    @app.post("/admin/reload")
    async def admin_reload(request: Request):
        """Reload a newer database generation now (loopback clients only)."""
        from pipeline.serve.access import is_loopback

        if request.client is None or not is_loopback(request.client.host):
            raise _bad(403, "POST /admin/reload is answered to loopback clients only")
        reloaded = await reload_generation()
        return {"generation": getattr(defense, "generation", 0), "reloaded": reloaded}

    add_viewer(app, defense, job_dir=job_dir, read_request=read_request,
               check_params=check_params, decode_all=decode_all, executor=executor, limits=limits)
    return app


def _apply_deferred_deletions(defense) -> None:
    """Removals that found the store held by this process left their deletions to it."""
    from pipeline.layout import JobLayout
    from pipeline.runtime.living import apply_pending_deletions

    apply_pending_deletions(JobLayout(defense.job_dir),
                            lambda store_dir, p, ids: defense.store.delete_many(ids))


def serve(job_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", layer: str | None = None, token_file=None, **limits) -> None:
    """Load a finished job folder and serve it with uvicorn (one process, one worker: the
    process owns the LevelDB store). Binds loopback unless ``host`` says otherwise; any other
    address needs a token (``token_file`` or $KNN_DEFENSE_SERVE_TOKEN), checked before loading."""
    import uvicorn

    from pipeline.defense.classifier import DefendedClassifier
    from pipeline.serve.access import resolve_token

    token = resolve_token(host, token_file)
    defense = DefendedClassifier.from_job(job_dir, layer=layer)
    try:
        app = create_app(defense, job_dir=job_dir, token=token, **limits)
        print(f"knn-defense: the neighbour viewer is at http://{host}:{port}/"
              + ("?token=<your token>" if token else ""), flush=True)
        if token:
            import logging

            from pipeline.serve.access import RedactToken

            logging.getLogger("uvicorn.access").addFilter(RedactToken())
        uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)
    finally:
        defense.store.close()
