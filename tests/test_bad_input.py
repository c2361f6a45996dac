"""Bad input: every odd file gets a clear error record or a correct result, in one job that completes.

The whole catalogue goes to one worker as a single chunk, so each case also
proves that one bad file cannot take its neighbours down; the worker must
then serve a follow-up job from the same pool process.  When the tests run
as root, the worker runs without the capabilities that let root ignore file
modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so "unreadable" is honest.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, TiffImagePlugin
from pillow_heif import register_heif_opener

from benchmarks.common.imagery import held_out_patches
from benchmarks.common.service import WorkerProcess, crackq_cli
from producer.api import Client
from producer.cli import main as crackq
from shared.config import Settings
from tests.faults import task_events

#: Files above this size are refused (the setting is lowered so the test needs no 512 MB file).
MAX_FILE_BYTES = 2_000_000


@dataclass
class Case:
    path: str
    error: str = ""                              # expected start of the error ("" = must be classified)
    check: Callable[[dict, dict], None] | None = None  # extra check of a classified record (record, all records)


def _same_label_as(reference: str):
    def check(record: dict, records: dict) -> None:
        assert record["label"] == records[reference]["label"]
    return check


def _size(width: int, height: int):
    def check(record: dict, records: dict) -> None:
        assert (record["width"], record["height"]) == (width, height)
    return check


def _no_altitude(record: dict, records: dict) -> None:
    assert record["latitude"] == 51.5 and record["longitude"] == -3.0 and record.get("altitude") is None


def _png_bomb(path: Path, side: int, bit_depth: int = 8) -> None:
    """A grey PNG of side×side pixels that compresses to a few hundred KB (written row by row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = b"\x00" * (side * bit_depth // 8 + 1)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def build_catalogue(data: Path, outside: Path, crack_patch: Path, plain_patch: Path) -> dict[str, Case]:
    """Write every case of the catalogue under ``data`` (the worker's root) and ``outside`` (not a root)."""
    data.mkdir(parents=True)
    outside.mkdir(parents=True)
    crack = Image.open(crack_patch).convert("RGB")
    plain = Image.open(plain_patch).convert("RGB")
    cases: dict[str, Case] = {}

    def add(name: str, filename: str, **expect) -> Path:
        path = data / filename
        cases[name] = Case(str(path), **expect)
        return path

    shutil.copy(crack_patch, add("reference crack patch", "reference_crack.jpg"))
    shutil.copy(plain_patch, add("reference plain patch", "reference_plain.jpg"))
    same = _same_label_as(str(data / "reference_crack.jpg"))

    add("missing file", "missing.jpg", error="file not found")
    add("directory", "folder.jpg", error="is a directory").mkdir()
    add("empty file", "empty.jpg", error="empty file").touch()
    jpeg = crack_patch.read_bytes()
    add("truncated JPEG", "truncated.jpg", error="corrupt or truncated image").write_bytes(jpeg[: len(jpeg) // 2])
    add("garbage bytes with an image extension", "garbage.jpg",
        error="not an image or unsupported format").write_bytes(os.urandom(8192))
    add("text file", "notes.txt", error="not an image or unsupported format").write_text("not a photo\n" * 50)

    rgba = crack.convert("RGBA")
    alpha = Image.new("L", crack.size, 255)
    alpha.paste(0, (0, 0, crack.width, 3))  # a transparent strip: composited over white
    rgba.putalpha(alpha)
    rgba.save(add("PNG with alpha", "alpha.png", check=same))
    crack.convert("L").save(add("grayscale", "grey.jpg", check=_size(*crack.size)), quality=95)
    grey16 = Image.fromarray(np.asarray(crack.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    grey16.save(add("16-bit PNG", "grey16.png", check=_size(*crack.size)))
    crack.convert("CMYK").save(add("CMYK JPEG", "cmyk.jpg", check=same), quality=95)
    crack.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(add("palette GIF", "palette.gif", check=same))
    crack.save(add("animated GIF (first frame is used)", "animated.gif", check=same), save_all=True,
               append_images=[plain, plain], duration=100, loop=0)
    crack.save(add("multi-page TIFF (first page is used)", "pages.tiff", check=same), save_all=True,
               append_images=[plain, plain])
    crack.save(add("WebP", "patch.webp", check=same), lossless=True)
    register_heif_opener()  # (the workers register it in shared.preprocessing)
    crack.save(add("HEIC (pillow-heif)", "patch.heic", check=same), quality=95)
    add("unsupported format (SVG)", "drawing.svg", error="not an image or unsupported format").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="227" height="227"><rect width="9" height="9"/></svg>')

    rotated = crack.resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotate 90° clockwise)
    rotated.save(add("EXIF-rotated photo", "rotated.jpg", check=_size(200, 300)), exif=exif, quality=95)
    Image.new("RGB", (1, 1), (128, 128, 128)).save(add("1x1 px image", "pixel.png", check=_size(1, 1)))
    _png_bomb(add("over the pixel limit (decompression bomb)", "bomb.png", error="image too large"), 13_000)
    spaced = data / "dir with spaces" / "fissure ß 裂缝 é.jpg"
    spaced.parent.mkdir()
    shutil.copy(crack_patch, spaced)
    cases["path with spaces and non-ASCII characters"] = Case(str(spaced), check=same)

    unreadable = add("unreadable permissions", "locked.jpg", error="permission denied")
    shutil.copy(crack_patch, unreadable)
    unreadable.chmod(0)
    secret = outside / "secret.jpg"
    shutil.copy(crack_patch, secret)
    os.symlink(secret, add("symlink pointing outside the data roots", "escape.jpg",
                           error="path outside the worker's data roots"))
    cases["path outside the data roots"] = Case(str(secret), error="path outside the worker's data roots")
    deep = add("16-bit 100 Mpx PNG (decoding memory)", "deep16.png", error="image too large to decode")
    _png_bomb(deep, 10_000, bit_depth=16)  # under the pixel limit, but ~2.6 GB to decode: refused from the header
    os.mkfifo(add("named pipe (FIFO)", "pipe.jpg", error="not a regular file"))
    latin1 = Path(os.fsdecode(os.fsencode(str(data)) + b"/fissure caf\xe9 \xff.jpg"))  # a name that is not UTF-8
    shutil.copy(crack_patch, latin1)
    cases["file name that is not UTF-8"] = Case(str(latin1), check=same)
    gps = Image.Exif()
    gps[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (3.0, 0.0, 0.0), 6: TiffImagePlugin.IFDRational(7, 0)}
    crack.save(add("GPS altitude with a zero denominator", "gps.jpg", check=_no_altitude), exif=gps, quality=95)
    huge = add("file over max_file_bytes", "huge.jpg", error="file too large")
    huge.write_bytes(jpeg)
    os.truncate(huge, MAX_FILE_BYTES + 1)
    return cases


#: Root reads a mode-000 file through these capabilities; the catalogue's worker runs without them.
_BYPASS_CAPS = "-dac_override,-dac_read_search"


def _without_permission_bypass(cmd: list[str]) -> tuple[list[str], bool]:
    """The worker command, run as root minus the capabilities that ignore file modes (when we are root).

    Returns False when root cannot shed them here (no setpriv, or no
    CAP_SETPCAP), because a mode-000 file would then be readable.
    """
    if os.geteuid() != 0:
        return cmd, True
    setpriv = shutil.which("setpriv")
    prefix = [setpriv, f"--bounding-set={_BYPASS_CAPS}"] if setpriv else []
    if not setpriv or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        return cmd, False
    return [*prefix, *cmd], True


@pytest.fixture(scope="module")
def catalogue(redis_server, shipped_model, concrete_dir, tmp_path_factory):
    """Run the whole catalogue as one job (one chunk) on one worker, then a follow-up job; yield what they left."""
    base = tmp_path_factory.mktemp("bad-input")
    held_out = held_out_patches(concrete_dir)
    cases = build_catalogue(base / "data", base / "outside", held_out["Positive"][0], held_out["Negative"][0])
    queue = f"test-{uuid.uuid4().hex[:10]}"
    worker = WorkerProcess(redis_server.url, queue, base / "worker.log",
                           model=shipped_model, data_roots=[str(base / "data")],
                           env={"CRACKQ_MAX_FILE_BYTES": str(MAX_FILE_BYTES)})
    worker.cmd, honest_permissions = _without_permission_bypass(worker.cmd)
    try:
        worker.start().wait_ready()
        client = Client(Settings.load(redis_url=redis_server.url, queue=queue))
        paths = [case.path for case in cases.values()]
        job_id = client.submit(paths, chunk_size=len(paths) * 100)
        status = client.wait(job_id, timeout=180)
        records = {r["path"]: r for r in client.results(job_id)}
        follow_up_paths = [str(base / "data" / "reference_crack.jpg"), str(base / "data" / "reference_plain.jpg")]
        follow_up = client.wait(client.submit(follow_up_paths), timeout=120)
        follow_up_records = list(client.results(follow_up.id))
        yield {"cases": cases, "status": status, "records": records, "worker": worker, "url": redis_server.url,
               "honest_permissions": honest_permissions, "chunks": client.store.client.hget(
                   f"crackq:job:{job_id}", "chunks"),
               "follow_up": follow_up, "follow_up_records": follow_up_records}
    finally:
        worker.stop()


CASE_NAMES = [
    "missing file", "directory", "empty file", "truncated JPEG", "garbage bytes with an image extension", "text file",
    "PNG with alpha", "grayscale", "16-bit PNG", "CMYK JPEG", "palette GIF", "animated GIF (first frame is used)",
    "multi-page TIFF (first page is used)", "WebP", "HEIC (pillow-heif)", "unsupported format (SVG)",
    "EXIF-rotated photo", "1x1 px image", "over the pixel limit (decompression bomb)",
    "path with spaces and non-ASCII characters", "unreadable permissions", "symlink pointing outside the data roots",
    "path outside the data roots", "file over max_file_bytes", "16-bit 100 Mpx PNG (decoding memory)",
    "named pipe (FIFO)", "file name that is not UTF-8", "GPS altitude with a zero denominator",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gets_a_clear_error_record_or_a_correct_result(catalogue, name):
    if name == "unreadable permissions" and not catalogue["honest_permissions"]:
        message = "root cannot drop CAP_DAC_OVERRIDE here (no setpriv or CAP_SETPCAP): it reads mode-000 files"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    case = catalogue["cases"][name]
    records = catalogue["records"]
    record = records[case.path]
    assert record["path"] == case.path
    if case.error:
        assert record["error"].startswith(case.error), record
        assert record["label"] == "" and record["crack_probability"] is None
        return
    assert record["error"] == "", record
    assert record["label"] in ("crack", "no_crack") and 0.0 <= record["crack_probability"] <= 1.0
    if case.check:
        case.check(record, records)


def test_the_catalogue_job_completes_in_one_chunk_and_the_worker_survives(catalogue):
    status, records = catalogue["status"], catalogue["records"]
    cases = catalogue["cases"]
    assert int(catalogue["chunks"]) == 1  # every bad file shared a chunk with the good ones
    assert status.state == "done" and status.done == status.total == len(cases) == len(records)
    assert status.failed == sum(1 for c in cases.values() if c.error)
    # The references anchor the label checks: the model must be sure about them.
    crack = records[cases["reference crack patch"].path]
    plain = records[cases["reference plain patch"].path]
    assert crack["label"] == "crack" and crack["crack_probability"] >= 0.9
    assert plain["label"] == "no_crack"
    # Same pool process, same parent, for the next job; no bad file was retried.
    worker = catalogue["worker"]
    assert catalogue["follow_up"].state == "done"
    assert {r["worker"] for r in catalogue["follow_up_records"]} == {crack["worker"]}
    assert worker.proc.poll() is None
    log = worker.log()
    assert task_events(log, "retry") == [] and "WorkerLostError" not in log


def test_the_catalogue_results_write_as_csv_jsonl_and_geojson_with_every_name_intact(catalogue, tmp_path):
    """Non-UTF-8 names, NaN-free JSON, formula-safe CSV: the files `crackq results` writes open cleanly."""
    env = {"CRACKQ_REDIS_URL": catalogue["url"]}
    job = catalogue["status"].id
    latin1 = os.fsencode(catalogue["cases"]["file name that is not UTF-8"].path)
    for fmt in ("csv", "jsonl", "geojson"):
        out = tmp_path / f"results.{fmt}"
        crackq_cli("results", job, "--format", fmt, "--output", str(out), env=env)
        data = out.read_bytes()
        if fmt == "geojson":
            json.loads(data, parse_constant=_refuse)  # strict JSON: no NaN
        else:
            assert latin1 in data  # the original bytes of the name
    stdout = subprocess.run([sys.executable, "-m", "producer.cli", "results", job, "--format", "jsonl"],
                            capture_output=True, env={**os.environ, **env}, timeout=120)
    assert stdout.returncode == 0, stdout.stderr
    lines = stdout.stdout.splitlines()
    assert len(lines) == len(catalogue["cases"]) and latin1 in stdout.stdout
    for line in lines:
        json.loads(line.decode("utf-8", errors="surrogateescape"), parse_constant=_refuse)


def _refuse(constant):
    raise ValueError(f"non-standard JSON constant {constant}")


def test_producer_rejects_obviously_bad_input_up_front_with_exit_code_2(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("CRACKQ_REDIS_URL", redis_server.url)
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(crackq, list(args), catch_exceptions=False)
        return result.exit_code, result.output

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    for command in ("submit", "run"):
        extra = ["--out", str(tmp_path / "out.csv")] if command == "run" else []
        code, out = run(command, str(empty), *extra)
        assert code == 2 and "no images found" in out, out
    code, out = run("submit", str(tmp_path / "no-such-*.jpg"))
    assert code == 2 and "no images found" in out

    for command in ("status", "wait", "results", "cancel"):
        code, out = run(command, "0" * 32)
        assert code == 2 and "unknown job" in out, (command, out)

    (tmp_path / "a.jpg").write_bytes(b"x")
    monkeypatch.setenv("CRACKQ_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    for args in (("submit", str(tmp_path / "a.jpg")), ("status", "0" * 32), ("wait", "0" * 32)):
        code, out = run(*args)
        assert code == 2 and "cannot reach Redis at redis://:***@127.0.0.1:1/0" in out, out
        assert "hunter2" not in out
