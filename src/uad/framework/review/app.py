"""The review station's web application (FastAPI on uvicorn).

Why FastAPI: an ASGI application on Starlette, served by uvicorn, both already in this project's
environment through MLflow's server and kept current by large communities; it streams a request
body, so an upload's size limit is enforced while it arrives (no multipart parser needed: the page
sends each file as its own request), and its exception handlers turn every error into one JSON
message the page shows. The page itself is static HTML + one script (no build step, no CDN).

Security:

* bound to 127.0.0.1 unless ``--host`` says otherwise; any other address requires a token (given,
  or generated and printed), checked on every request (``Authorization: Bearer``, or the cookie
  set when the printed address with ``?token=`` is opened);
* on loopback the ``Host`` header must name loopback (a page elsewhere cannot reach the server
  through a rebound DNS name);
* a request that changes something (every POST) must come from the page itself: one of the page's
  content types (JSON, octet-stream), and ``Origin`` / ``Sec-Fetch-Site`` naming this server where
  the browser sends them, so another site open in the same browser cannot save a threshold or mark
  an image through the loopback address (:func:`_cross_site`);
* a folder named on the page is resolved (``..`` and symbolic links followed) and refused unless
  it lies inside the project or a folder given with ``--allow``;
* an upload over ``max_upload_mb`` is refused while it arrives; an image over ``max_pixels`` is
  refused before it is decoded.
"""

from __future__ import annotations

import hmac
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request  # module level: the routes' annotations are resolved by name
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from uad.errors import ConfigError, UadError

from .model import ReviewModel, save_thresholds
from .store import Item, Items, ReviewedDataset, safe_name

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
BROWSER_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "BMP": "image/bmp", "WEBP": "image/webp",
                   "GIF": "image/gif"}


class ReviewError(UadError):
    """A request the server refuses, with the HTTP status it answers."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Settings:
    """What ``kedro review`` decided: where things are, the limits, the token."""

    def __init__(self, project: Path, env: str | None, reviewed: Path, allow: list[Path] | None = None,
                 token: str | None = None, max_upload_mb: float = 64.0, max_pixels: int = 40_000_000,
                 max_folder_images: int = 500, loopback: bool = True, class_name: str | None = None):
        self.project = Path(project).resolve()
        self.env = env
        self.reviewed = Path(reviewed).resolve()
        self.allowed = [self.project] + [Path(a).expanduser().resolve() for a in (allow or [])]
        self.token = token
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.max_upload_mb = max_upload_mb
        self.max_pixels = int(max_pixels)
        self.max_folder_images = int(max_folder_images)
        self.loopback = loopback
        self.class_name = class_name

    def resolve_folder(self, text: str) -> Path:
        """A folder named on the page, inside the allowed folders, or a :class:`ReviewError`."""
        raw = str(text or "").strip()
        if not raw:
            raise ReviewError("name a folder the server can read (a path inside the project, e.g. data/01_raw/...)")
        if "\x00" in raw:
            raise ReviewError("the folder name holds a NUL character")
        p = Path(raw).expanduser()
        if not p.is_absolute():
            p = self.project / p
        resolved = p.resolve()
        if not any(resolved == a or resolved.is_relative_to(a) for a in self.allowed):
            roots = ", ".join(str(a) for a in self.allowed)
            raise ReviewError(f"{raw} is outside the folders this server may read ({roots}): copy the images under "
                              f"the project, or restart kedro review with --allow=<that folder>", 403)
        if not resolved.exists():
            raise ReviewError(f"{raw} does not exist ({resolved}): check the path (relative paths start at the project, "
                              f"{self.project})", 404)
        if not resolved.is_dir():
            raise ReviewError(f"{raw} is a file, not a folder: name the folder that holds the images")
        try:
            next(resolved.iterdir(), None)
        except PermissionError:
            raise ReviewError(f"{raw}: the server may not read this folder (permission denied); give the server's "
                              f"user read access or copy the images elsewhere in the project", 403) from None
        return resolved


def heat_levels(amap: np.ndarray, pixel_threshold: float | None) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(level in [0, 1], valid, low, high)``: where the map sits on the overlay's colour scale.

    The scale runs from the map's own median (the part's background: clear) to the pixel
    threshold (red, and everything above it), so a region well above the background shows as a
    warm, opaque patch even when it stays below the threshold, and red always means "at or above
    the pixel threshold", the same on every image. (A scale from 0 to twice the threshold, as
    before, put a distance map offset at 15-30 into one faint blue-green band.) Without a pixel
    threshold the map's 99th percentile stands in; where the threshold lies at or below the median
    (most of the image above it) the scale starts at the map's minimum."""
    m = np.asarray(amap, np.float32)
    valid = np.isfinite(m)
    if not valid.any():
        return np.zeros(m.shape, np.float32), valid, 0.0, 0.0
    v = m[valid]
    thr = float(pixel_threshold) if pixel_threshold is not None and np.isfinite(pixel_threshold) else None
    high = thr if thr is not None else float(np.quantile(v, 0.99))
    low = float(np.median(v))
    if high <= low:
        low = float(v.min())
    filled = np.nan_to_num(m, nan=-np.inf)
    if high <= low:  # every scored pixel at or above the threshold
        level = (filled >= high).astype(np.float32)
    else:
        level = np.clip((filled - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return np.where(valid, level, 0.0).astype(np.float32), valid, low, high


def heat_png(amap: np.ndarray, pixel_threshold: float | None) -> bytes:
    """The map as an RGBA PNG at its full size (jet over :func:`heat_levels`' scale: clear at the
    map's median, opaque from half-way up, red at the pixel threshold; the region at or above the
    pixel threshold outlined in white, as the ``infer`` overlays outline it; transparent where not
    scored)."""
    from matplotlib import colormaps
    from PIL import Image

    m = np.asarray(amap, np.float32)
    level, valid, _low, high = heat_levels(m, pixel_threshold)
    lut = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    rgba = np.empty(m.shape + (4,), np.uint8)
    rgba[..., :3] = lut[(level * 255).astype(np.uint8)]
    rgba[..., 3] = np.where(valid, 240 * np.clip((level - 0.1) / 0.4, 0.0, 1.0), 0).astype(np.uint8)
    if pixel_threshold is not None and valid.any():
        hot = valid & (np.nan_to_num(m, nan=-np.inf) >= float(high))
        edge = hot & ~(np.roll(hot, 1, 0) & np.roll(hot, -1, 0) & np.roll(hot, 1, 1) & np.roll(hot, -1, 1))
        rgba[edge] = (255, 255, 255, 255)
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def thumb_jpeg(path: str, amap: np.ndarray | None, pixel_threshold: float | None, side: int = 320) -> bytes:
    """A small picture of the image with its map blended in (the grid's card)."""
    from PIL import Image

    from uad.data.images import load_image

    img = Image.fromarray(load_image(path))
    img.thumbnail((side, side), Image.BILINEAR)
    if amap is not None:
        heat = Image.open(io.BytesIO(heat_png(np.asarray(Image.fromarray(amap, mode="F").resize(img.size, Image.BILINEAR)),
                                              pixel_threshold)))
        base = img.convert("RGBA")
        heat.putalpha(heat.getchannel("A").point(lambda a: int(a * 0.7)))
        img = Image.alpha_composite(base, heat).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


class Station:
    """The state behind the page: the model, the items, the reviewed dataset."""

    def __init__(self, model: ReviewModel, settings: Settings):
        self.model = model
        self.settings = settings
        self.items = Items()
        self.reviewed = ReviewedDataset(settings.reviewed)
        self._score_lock = threading.Lock()
        self.kinds = self._known_kinds()

    def _known_kinds(self) -> list[str]:
        kinds = set()
        if self.settings.reviewed.is_dir():
            kinds |= {p.name for p in self.settings.reviewed.glob("*/test/*") if p.is_dir() and p.name != "good"}
        return sorted(kinds) or ["defect"]

    # ---------------------------------------------------------------------------------- scoring
    def check_image(self, path: Path, shown: str) -> tuple[int, int, str]:
        """``(height, width, format)`` from the file's header, or one message saying why it is not
        an image the server scores."""
        import warnings

        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    w, h, fmt = im.width, im.height, str(im.format or "")
        except UnidentifiedImageError:
            raise ReviewError(f"{shown} is not an image the server can read (png, jpg, bmp, tif): it may be another "
                              f"kind of file or damaged") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ReviewError(f"{shown} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS:,} pixels): "
                              f"scale it down", 413) from None
        except OSError as e:
            raise ReviewError(f"{shown} cannot be read ({e}): check the file") from None
        if w * h > self.settings.max_pixels:
            raise ReviewError(f"{shown} is {w} x {h} px ({w * h / 1e6:.0f} MP), over this server's limit of "
                              f"{self.settings.max_pixels / 1e6:.0f} MP: scale it down, or restart kedro review "
                              f"with --max-pixels={w * h}", 413)
        return h, w, fmt

    def score(self, item: Item, started: float) -> Item:
        """The item scored by the Inferencer (at its own resolution), its map kept."""
        try:
            item.height, item.width, _ = self.check_image(Path(item.path), item.name)
        except ReviewError as e:
            item.status, item.error = "refused", str(e)
            return self.items.add(item)
        with self._score_lock:
            res = self.model.inferencer.predict([item.path])[0]
        if res.status != "ok":
            item.status, item.error = res.status, f"{item.name}: {res.error}"
        else:
            item.score, item.decision, item.anomalous_area = float(res.score), res.decision, res.anomalous_area
            finite = res.map[np.isfinite(res.map)] if res.map is not None else np.empty(0)
            item.map_max = float(finite.max()) if finite.size else None
            self.items.save_map(item, res.map)
        item.seconds = time.perf_counter() - started
        return self.items.add(item)

    def thresholds(self) -> dict[str, Any]:
        t = self.model.inferencer.thresholds
        return {"image": t.get("image"), "image_source": t.get("image_source"), "pixel": t.get("pixel"),
                "pixel_source": t.get("pixel_source"), "frame": self.model.inferencer.threshold_frame,
                "version": self.model.thresholds_version}

    def state(self) -> dict[str, Any]:
        rm = self.model
        root = self.settings.reviewed
        try:
            shown_root = root.relative_to(self.settings.project)
        except ValueError:
            shown_root = root
        return {"model": rm.description, "method": rm.namespace, "classes": rm.classes,
                "class_name": self.settings.class_name or (rm.classes[0] if len(rm.classes) == 1 else ""),
                "thresholds": self.thresholds(), "reference": rm.reference.as_json(),
                "items": [i.as_json() for i in self.items.all()], "kinds": self.kinds,
                "reviewed": str(root), "reviewed_counts": self.reviewed.counts(),
                "retrain": f"UAD_DATA_ROOT={shown_root} kedro run --pipeline={rm.namespace}"
                           + (f" --env={self.settings.env}" if self.settings.env else ""),
                "infer": f"kedro run --pipeline=infer --namespaces={rm.namespace} --params=\"infer.images=<folder>\"",
                "limits": {"max_upload_mb": self.settings.max_upload_mb, "max_pixels": self.settings.max_pixels},
                "frame": rm.inferencer.frame}


def create_app(station: Station):
    """The FastAPI application of one :class:`Station`."""
    app = FastAPI(title="uad review", docs_url=None, redoc_url=None, openapi_url=None)
    st = station.settings
    app.state.station = station

    @app.exception_handler(ReviewError)
    async def _refused(_request: Request, exc: ReviewError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(UadError)
    async def _project_error(_request: Request, exc: UadError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception):
        log.exception("review: unexpected error")
        return JSONResponse({"error": f"the server failed on this request ({type(exc).__name__}: {exc}); the "
                                      f"details are in the server's log"}, status_code=500)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if st.loopback:
            host = (request.headers.get("host") or "").rsplit(":", 1)[0] if not (request.headers.get("host") or "").startswith("[") \
                else (request.headers.get("host") or "").split("]")[0] + "]"
            if host not in LOOPBACK_HOSTS:
                return JSONResponse({"error": f"host {host!r} refused: this server answers on loopback only"},
                                    status_code=421)
        refused = _cross_site(request)
        if refused:
            return JSONResponse({"error": refused}, status_code=403)
        if st.token:
            given = request.query_params.get("token") or request.cookies.get("uad_review_token") or ""
            auth = request.headers.get("authorization") or ""
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), st.token.encode()):
                return JSONResponse({"error": "this review server needs its token: open the address kedro review "
                                              "printed (it ends in ?token=...)"}, status_code=401)
        response = await call_next(request)
        if st.token and request.query_params.get("token"):
            response.set_cookie("uad_review_token", st.token, httponly=True, samesite="strict")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/favicon.ico")
    def favicon():
        return Response(status_code=204)

    @app.get("/static/{name}")
    def static(name: str):
        files = {"review.js": "text/javascript", "review.css": "text/css"}
        if name not in files:
            raise ReviewError(f"no file {name!r}", 404)
        return FileResponse(STATIC / name, media_type=files[name])

    @app.get("/api/state")
    def state():
        return station.state()

    @app.post("/api/upload")
    async def upload(request: Request, name: str = "image"):
        started = time.perf_counter()
        shown = safe_name(name)
        declared = request.headers.get("content-length")
        limit = st.max_upload_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            raise ReviewError(f"{shown} is {int(declared) / 2**20:.1f} MB, over this server's upload limit of "
                              f"{st.max_upload_mb:g} MB: scale it down, or restart kedro review with "
                              f"--max-upload-mb={int(declared) // 2**20 + 1}", 413)
        item = Item(station.items.new_id(), shown, "", "upload")
        path = station.items.upload_path(item.id, shown)
        size = 0
        with path.open("wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    fh.close()
                    path.unlink(missing_ok=True)
                    raise ReviewError(f"{shown} is over this server's upload limit of {st.max_upload_mb:g} MB: scale "
                                      f"it down, or restart kedro review with a larger --max-upload-mb", 413)
                fh.write(chunk)
        if size == 0:
            raise ReviewError(f"{shown} is empty (0 bytes): choose the image file again")
        item.path = str(path)
        from starlette.concurrency import run_in_threadpool

        item = await run_in_threadpool(station.score, item, started)
        if item.status == "refused":  # an upload refused is a message, not a card
            station.items.remove(item.id)
            path.unlink(missing_ok=True)
            raise ReviewError(item.error, 413 if "limit" in item.error or "too large" in item.error else 400)
        return item.as_json()

    @app.post("/api/folder")
    async def folder(request: Request):
        body = await _json(request)
        root = st.resolve_folder(str(body.get("path") or ""))
        from starlette.concurrency import run_in_threadpool

        from uad.data.folder import scan_image_folder

        try:
            rows = scan_image_folder(root)
        except UadError as e:
            raise ReviewError(str(e).replace("infer.images ", "")) from None
        if len(rows) > st.max_folder_images:
            raise ReviewError(f"{body.get('path')} holds {len(rows)} images, over this page's limit of "
                              f"{st.max_folder_images}: name a smaller folder, or use kedro run --pipeline=infer")
        out = []
        for r in rows.itertuples():
            started = time.perf_counter()
            item = Item(station.items.new_id(), r.relative_path, r.image_path, str(root))
            out.append((await run_in_threadpool(station.score, item, started)).as_json())
        return {"items": out}

    @app.get("/api/items/{item_id}/image")
    def image(item_id: str):
        item = station.items.get(item_id)
        from PIL import Image

        with Image.open(item.path) as im:
            fmt = str(im.format or "")
        if fmt in BROWSER_FORMATS:
            return FileResponse(item.path, media_type=BROWSER_FORMATS[fmt])
        from uad.data.images import load_image

        buf = io.BytesIO()
        Image.fromarray(load_image(item.path)).save(buf, format="PNG", compress_level=1)
        return Response(buf.getvalue(), media_type="image/png")

    @app.get("/api/items/{item_id}/heat.png")
    def heat(item_id: str):
        item = station.items.get(item_id)
        return Response(heat_png(station.items.load_map(item), station.model.inferencer.thresholds.get("pixel")),
                        media_type="image/png")

    @app.get("/api/items/{item_id}/thumb.jpg")
    def thumb(item_id: str):
        item = station.items.get(item_id)
        amap = station.items.load_map(item) if item.map_file else None
        return Response(thumb_jpeg(item.path, amap, station.model.inferencer.thresholds.get("pixel")),
                        media_type="image/jpeg")

    @app.post("/api/items/{item_id}/mark")
    async def mark(item_id: str, request: Request):
        body = await _json(request)
        item = station.items.get(item_id)
        amap = station.items.load_map(item) if item.map_file else None
        thr = station.model.inferencer.thresholds
        cls = str(body.get("class_name") or "").strip()
        out = station.reviewed.mark(item, str(body.get("mark") or ""), cls, str(body.get("defect_kind") or ""),
                                    amap, thr.get("pixel"), body.get("threshold", thr.get("image")),
                                    station.model.description)
        if item.defect_kind and item.defect_kind not in station.kinds:
            station.kinds = sorted(set(station.kinds) | {item.defect_kind})
        return {"item": item.as_json(), **out, "reviewed_counts": station.reviewed.counts(), "kinds": station.kinds}

    @app.post("/api/thresholds")
    async def thresholds(request: Request):
        body = await _json(request)
        try:
            value = float(body.get("image"))
        except (TypeError, ValueError):
            raise ReviewError(f"threshold {body.get('image')!r} is not a number") from None
        from starlette.concurrency import run_in_threadpool

        saved = await run_in_threadpool(save_thresholds, st.project, st.env, station.model, value)
        return {**saved, "thresholds": station.thresholds(),
                "items": [i.as_json() for i in _redecide(station)]}

    return app


def _redecide(station: Station) -> list[Item]:
    """Every item's decision at the Inferencer's (new) image threshold."""
    t = station.model.inferencer.thresholds.get("image")
    for item in station.items.all():
        if item.score is not None and t is not None:
            item.decision = "anomalous" if item.score >= float(t) else "normal"
    return station.items.all()


#: what the page sends: a cross-site form can send neither without the browser asking first (CORS)
POST_TYPES = ("application/json", "application/octet-stream")


def _cross_site(request: Request) -> str:
    """Why a state-changing request is refused as coming from another site ("" when it is not).

    The Host check alone does not stop a page on another site from POSTing to
    ``http://127.0.0.1:<port>/api/thresholds`` (the browser sends that Host): it could save a
    threshold that ``infer`` then applies. So every POST must carry one of the page's own
    content types (a cross-site form cannot, and a cross-site ``fetch`` with one is preflighted,
    which this server never allows), and the browser's ``Origin`` / ``Sec-Fetch-Site``, where
    sent, must name this server."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return ""
    from urllib.parse import urlsplit

    fetch_site = (request.headers.get("sec-fetch-site") or "").lower()
    origin = request.headers.get("origin")
    host = (request.headers.get("host") or "").lower()
    if fetch_site and fetch_site not in ("same-origin", "none"):
        return f"a request from another site ({fetch_site}) refused: use the review page itself"
    if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host):
        return f"a request from {origin} refused: this server takes changes from its own page only"
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype not in POST_TYPES:
        return (f"content type {ctype or 'none'!r} refused: the page sends {' or '.join(POST_TYPES)} "
                "(a form from another site cannot)")
    return ""


async def _json(request) -> dict[str, Any]:
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001 - any undecodable body is the same mistake
        raise ReviewError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ReviewError("the request body is not a JSON object")
    return body


class Server:
    """uvicorn serving :func:`create_app` in a thread (``start`` returns once it listens)."""

    def __init__(self, station: Station, host: str = "127.0.0.1", port: int = 8765):
        import uvicorn

        self.station = station
        self.config = uvicorn.Config(create_app(station), host=host, port=port, log_level="warning",
                                     access_log=False, lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        for s in getattr(self.server, "servers", []) or []:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return int(self.config.port)

    @property
    def sockets(self) -> list[tuple]:
        return [sock.getsockname() for s in (getattr(self.server, "servers", []) or []) for sock in s.sockets]

    def start(self, timeout: float = 30.0) -> "Server":
        self.thread = threading.Thread(target=self.server.run, name="uad-review", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the review server could not listen on {self.config.host}:{self.config.port} "
                                  f"(in use? give another --port)")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.station.items.close()
