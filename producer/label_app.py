"""The labelling page of ``crackq label``: a small Flask app, bound to 127.0.0.1 only.

One tile at a time, large, beside its photo (downsized, the tile's box drawn)
and the model's probability; keys ``c`` crack, ``n`` no crack, ``s`` skip,
``u`` undo.  Each key is one POST that :class:`producer.labelbook.LabelBook`
writes to disk before answering, so the page holds no state worth losing.

Local pages are still reachable by any web site the user visits (through the
browser), so every POST carries a per-run random token that only this page
knows, and requests whose ``Host`` is not this loopback address are refused
(DNS rebinding).
"""

from __future__ import annotations

import hashlib
import io
import secrets
import threading
from collections import OrderedDict

from flask import Flask, Response, abort, jsonify, render_template_string, request
from PIL import Image, ImageDraw

from producer.candidates import Tile
from producer.labelbook import LabelBook
from shared.config import Settings
from shared.preprocessing import Box, load_rgb

#: Longest side of the photo shown for context.
CONTEXT_SIDE = 640
#: Decoded photos kept in memory (consecutive tiles often share a photo).
PHOTO_CACHE = 3


def tile_id(tile: Tile) -> str:
    return hashlib.sha1(repr(tile.key).encode()).hexdigest()[:16]


class LabelSession:
    """The queue of tiles still to decide and the book they are written to."""

    def __init__(self, book: LabelBook, picks: list[Tile], threshold: float, settings: Settings, source: str):
        self.book = book
        self.threshold = threshold
        self.settings = settings
        self.source = source
        decided = book.decided()
        self.pending = [t for t in picks if t.key not in decided]
        self.budget = len(self.pending)
        self.done_here = 0
        self.tiles = {tile_id(t): t for t in self.pending}
        self.lock = threading.Lock()
        self._photos: OrderedDict[str, Image.Image] = OrderedDict()

    def photo(self, path: str) -> Image.Image:
        """The full, EXIF-oriented photo (a few kept decoded)."""
        with self.lock:
            if path in self._photos:
                self._photos.move_to_end(path)
                return self._photos[path]
        img = load_rgb(path, max_pixels=self.settings.max_pixels, max_file_bytes=self.settings.max_file_bytes)
        with self.lock:
            self._photos[path] = img
            while len(self._photos) > PHOTO_CACHE:
                self._photos.popitem(last=False)
        return img

    def state(self) -> dict:
        current = self.pending[0] if self.pending else None
        counts = self.book.counts()
        return {
            "tile": None if current is None else {
                "id": tile_id(current), "photo": current.photo, "name": current.photo.rsplit("/", 1)[-1],
                **current.box.as_dict(), "probability": current.probability},
            "position": self.done_here + (1 if current else 0), "budget": self.budget,
            "remaining": len(self.pending), "counts": counts, "threshold": self.threshold,
            "out": str(self.book.out), "can_undo": bool(self.book.rows), "source": self.source,
        }

    def decide(self, tid: str, label: str) -> dict:
        with self.lock:
            if not self.pending or tile_id(self.pending[0]) != tid:
                raise LookupError("that tile is not the current one (page out of date)")
            tile = self.pending[0]
        image = None if label == "skip" else self.photo(tile.photo)
        self.book.add(tile.photo, tile.box, label, tile.probability, image)
        with self.lock:
            self.pending.pop(0)
            self.done_here += 1
        return self.state()

    def undo(self) -> dict:
        row = self.book.undo()
        if row is not None:
            box = Box(int(row.x), int(row.y), int(row.w), int(row.h))
            tile = Tile(row.photo, box, float(row.probability) if row.probability else None)
            with self.lock:
                self.tiles.setdefault(tile_id(tile), tile)
                self.pending.insert(0, self.tiles[tile_id(tile)])
                if self.done_here:
                    self.done_here -= 1
                else:
                    self.budget += 1  # undoing a decision of an earlier run
        return self.state()

    def context_jpeg(self, tile: Tile) -> bytes:
        img = self.photo(tile.photo)
        scale = min(1.0, CONTEXT_SIDE / max(img.size))
        small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        draw = ImageDraw.Draw(small)
        b = tile.box
        box = [b.x * scale, b.y * scale, (b.x + b.w) * scale - 1, (b.y + b.h) * scale - 1]
        draw.rectangle(box, outline=(0, 0, 0), width=5)
        draw.rectangle(box, outline=(255, 220, 0), width=3)
        return _encode(small, "JPEG")

    def tile_png(self, tile: Tile) -> bytes:
        b = tile.box
        return _encode(self.photo(tile.photo).crop((b.x, b.y, b.x + b.w, b.y + b.h)), "PNG")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    return buf.getvalue()


def create_app(session: LabelSession, port_holder: dict) -> Flask:
    """The Flask app; ``port_holder["port"]`` is the bound port (known only once the server listens)."""
    app = Flask(__name__)
    token = secrets.token_urlsafe(24)

    @app.before_request
    def local_only():
        allowed = {f"127.0.0.1:{port_holder.get('port')}", f"localhost:{port_holder.get('port')}"}
        if request.host not in allowed:
            abort(403)
        if request.method == "POST" and request.headers.get("X-Crackq-Token") != token:
            abort(403)

    @app.get("/")
    def page():
        return render_template_string(PAGE, token=token)

    @app.get("/api/state")
    def state():
        return jsonify(session.state())

    @app.post("/api/label")
    def label():
        body = request.get_json(silent=True) or {}
        if body.get("label") not in ("crack", "no_crack", "skip"):
            return jsonify(error="label must be crack, no_crack or skip"), 400
        try:
            return jsonify(session.decide(str(body.get("id")), body["label"]))
        except LookupError as exc:
            return jsonify(error=str(exc), **session.state()), 409

    @app.post("/api/undo")
    def undo():
        return jsonify(session.undo())

    @app.get("/tile/<tid>.png")
    def tile(tid):
        return _image(session.tile_png, tid, "image/png")

    @app.get("/context/<tid>.jpg")
    def context(tid):
        return _image(session.context_jpeg, tid, "image/jpeg")

    def _image(render, tid, mimetype):
        tile = session.tiles.get(tid)
        if tile is None:
            abort(404)
        return Response(render(tile), mimetype=mimetype, headers={"Cache-Control": "max-age=3600"})

    return app


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>crackq label</title>
<meta name="crackq-token" content="{{ token }}">
<style>
 body { font-family: system-ui, sans-serif; margin: 0; background: #1e1f22; color: #e8e8e8; }
 header { display: flex; gap: 2em; align-items: center; padding: .6em 1.2em; background: #2b2d31; flex-wrap: wrap; }
 header b { color: #fff; }
 #bar { flex: 1; min-width: 160px; height: 10px; background: #444; border-radius: 5px; overflow: hidden; }
 #fill { height: 100%; background: #4caf50; width: 0; }
 main { display: flex; gap: 1.5em; padding: 1.2em; align-items: flex-start; flex-wrap: wrap; }
 #tile { width: 454px; height: 454px; image-rendering: auto; border: 3px solid #ffdc00; background: #000; }
 #context { max-width: 640px; max-height: 640px; border: 1px solid #555; }
 .keys span { display: inline-block; margin-right: 1em; }
 kbd { background: #444; border-radius: 3px; padding: 0 .4em; font-weight: bold; color: #fff; }
 #prob { font-size: 1.3em; }
 #flash { min-height: 1.4em; color: #9fd39f; }
 .crack { color: #ff8a80; } .nocrack { color: #80d8ff; }
 #done { display: none; padding: 2em; font-size: 1.2em; }
 button { font-size: 1em; margin-right: .4em; }
</style></head>
<body>
<header>
 <div><b>crackq label</b></div>
 <div id="progress">tile <b id="pos">-</b> of <b id="budget">-</b></div>
 <div id="bar"><div id="fill"></div></div>
 <div id="counts"><span class="crack">crack <b id="n-crack">0</b></span> &middot;
   <span class="nocrack">no crack <b id="n-no_crack">0</b></span> &middot; skipped <b id="n-skip">0</b></div>
</header>
<main id="work">
 <div>
  <img id="tile" alt="tile to label">
  <div id="prob">model: crack probability <b id="p">-</b> (threshold <span id="thr">-</span>)</div>
  <div class="keys">
   <span><kbd>c</kbd> crack</span><span><kbd>n</kbd> no crack</span><span><kbd>s</kbd> skip</span><span><kbd>u</kbd> undo</span>
  </div>
  <div><button id="b-c">crack (c)</button><button id="b-n">no crack (n)</button>
   <button id="b-s">skip (s)</button><button id="b-u">undo (u)</button></div>
  <div id="flash"></div>
 </div>
 <div>
  <img id="context" alt="the tile's photo, tile outlined">
  <div id="where"></div>
 </div>
</main>
<div id="done">All tiles of this run are decided. Labels are in <code id="out"></code>.
 Next: <code>crackq adapt <span id="out2"></span> --out NEW_MODEL_DIR</code> (press <kbd>u</kbd> to undo the last one).</div>
<script>
const token = document.querySelector('meta[name="crackq-token"]').content;
let state = null, busy = false;
function show(s) {
  state = s;
  document.getElementById('pos').textContent = s.position;
  document.getElementById('budget').textContent = s.budget;
  document.getElementById('fill').style.width = (s.budget ? 100 * (s.budget - s.remaining) / s.budget : 100) + '%';
  for (const k of ['crack', 'no_crack', 'skip']) document.getElementById('n-' + k).textContent = s.counts[k] || 0;
  document.getElementById('thr').textContent = s.threshold.toFixed(2);
  const t = s.tile;
  document.getElementById('work').style.display = t ? 'flex' : 'none';
  document.getElementById('done').style.display = t ? 'none' : 'block';
  document.getElementById('out').textContent = s.out;
  document.getElementById('out2').textContent = s.out;
  document.body.dataset.tile = t ? t.id : '';
  if (!t) return;
  document.getElementById('tile').src = '/tile/' + t.id + '.png';
  document.getElementById('context').src = '/context/' + t.id + '.jpg';
  document.getElementById('p').textContent = t.probability === null ? 'n/a' : t.probability.toFixed(3);
  document.getElementById('where').textContent = t.name + '  x ' + t.x + ', y ' + t.y + ', ' + t.w + '\u00d7' + t.h + ' px';
}
async function call(path, body) {
  if (busy) return;
  busy = true;
  try {
    const r = await fetch(path, {method: 'POST', headers: {'Content-Type': 'application/json', 'X-Crackq-Token': token},
                                 body: JSON.stringify(body || {})});
    const s = await r.json();
    document.getElementById('flash').textContent = s.error || '';
    show(s);
  } catch (e) {
    document.getElementById('flash').textContent = 'could not reach crackq label: ' + e;
  } finally { busy = false; document.body.dataset.busy = ''; }
}
function label(l) { if (state && state.tile) { document.body.dataset.busy = '1'; call('/api/label', {id: state.tile.id, label: l}); } }
function undo() { document.body.dataset.busy = '1'; call('/api/undo'); }
document.addEventListener('keydown', e => {
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  const k = e.key.toLowerCase();
  if (k === 'c') label('crack'); else if (k === 'n') label('no_crack');
  else if (k === 's') label('skip'); else if (k === 'u') undo();
});
document.getElementById('b-c').onclick = () => label('crack');
document.getElementById('b-n').onclick = () => label('no_crack');
document.getElementById('b-s').onclick = () => label('skip');
document.getElementById('b-u').onclick = undo;
fetch('/api/state').then(r => r.json()).then(show);
</script>
</body></html>
"""
