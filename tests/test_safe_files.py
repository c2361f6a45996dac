"""Files in and out: one checked open per input file, bounded decoding, result files that are safe to open.

No worker needed: these call the functions the worker and the producer use.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, TiffImagePlugin

from producer.cli import main as crackq
from producer.formats import open_results_file, write_csv, write_geojson, write_jsonl
from shared.config import Settings
from shared.contract import result_record
from shared.exif import photo_metadata
from shared.preprocessing import ImageError, open_checked, prepare_image


# ---- one open per file ---------------------------------------------------------------------------------
def test_a_symlink_swapped_between_check_and_open_never_reads_outside_the_roots(tmp_path):
    """A racing thread flips a symlink under the root between a file inside and one outside, 300 reads."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (40, 30), "white").save(root / "inside.png")
    Image.new("RGB", (50, 70), "black").save(outside / "secret.png")
    link, flip = root / "photo.png", root / "photo.png.new"
    targets = [str(root / "inside.png"), str(outside / "secret.png")]
    os.symlink(targets[0], link)
    stop = threading.Event()

    def swap():
        i = 0
        while not stop.is_set():
            i += 1
            os.symlink(targets[i % 2], flip)
            os.replace(flip, link)  # atomic: the link always exists, pointing in or out

    racer = threading.Thread(target=swap, daemon=True)
    racer.start()
    sizes, refused = [], 0
    try:
        for _ in range(300):
            try:
                with open_checked(str(link), (str(root),), 10**6) as handle:
                    prepared = prepare_image(handle, tile=0)
                sizes.append((prepared.width, prepared.height))
            except ImageError as exc:
                assert str(exc) == "path outside the worker's data roots (CRACKQ_DATA_ROOTS)"
                refused += 1
    finally:
        stop.set()
        racer.join()
    assert (50, 70) not in sizes  # zero reads outside the roots
    assert sizes and refused  # the race really happened both ways
    assert set(sizes) == {(40, 30)}


def test_an_opened_file_is_checked_for_what_it_is(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pipe.jpg")
    (root / "folder.jpg").mkdir()
    with pytest.raises(ImageError, match="not a regular file"):
        open_checked(str(root / "pipe.jpg"), (str(root),), 10**6)  # never blocks on a FIFO
    with pytest.raises(ImageError, match="is a directory"):
        open_checked(str(root / "folder.jpg"), (str(root),), 10**6)
    with pytest.raises(ImageError, match="file not found"):
        open_checked(str(root / "missing.jpg"), (str(root),), 10**6)


# ---- bounded work per image -----------------------------------------------------------------------
def _png16(path: Path, side: int) -> None:
    """A 16-bit grey PNG of side×side px that compresses to a few hundred KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = b"\x00" * (2 * side + 1)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_a_16_bit_100_megapixel_png_is_refused_from_its_header(tmp_path):
    path = tmp_path / "deep.png"
    _png16(path, 10_000)  # 100 Mpx: under the pixel limit, but ~2.6 GB to decode and convert
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match=r"image too large to decode \(10000x10000 I;16 needs ~2479 MB"):
        prepare_image(str(path))


def test_tiny_tiles_are_refused_by_count_and_by_upscaling(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (2000, 1500), "grey").save(path)
    with pytest.raises(ImageError, match=r"too many tiles \(11750 > limit 4096, CRACKQ_MAX_TILES\)"):
        prepare_image(str(path), tile=16)
    with pytest.raises(ImageError, match="image too large to tile"):
        prepare_image(str(path), tile=16, max_tiles=10**6, max_pixels=10_000_000)
    assert len(prepare_image(str(path), tile=227).boxes) == 9 * 7


@pytest.mark.parametrize("args, message", [
    (["--tile-overlap", "-1000"], "tile_overlap must be an integer of at least 0"),
    (["--tile-size", "2"], "tile_size must be 0 (no tiling) or an integer of at least 16"),
    (["--threshold", "1.5"], "threshold must be a number between 0 and 1"),
    (["--threshold", "nan"], "threshold must be a number between 0 and 1"),
    (["--tile-size", "100", "--tile-overlap", "100"], "tile_overlap (100) must be smaller than tile_size (100)"),
])
@pytest.mark.parametrize("command", ["submit", "run"])
def test_out_of_range_options_are_refused_by_the_cli_with_exit_code_2(tmp_path, command, args, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    extra = ["--out", str(tmp_path / "r.csv")] if command == "run" else []
    result = CliRunner().invoke(crackq, [command, str(tmp_path / "a.png"), *extra, *args],
                                env={"CRACKQ_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_settings_refuse_out_of_range_tiling(monkeypatch):
    monkeypatch.setenv("CRACKQ_TILE_OVERLAP", "-5")
    with pytest.raises(ValueError, match="tile_overlap must be an integer of at least 0"):
        Settings.load()
    monkeypatch.setenv("CRACKQ_TILE_OVERLAP", "0")
    monkeypatch.setenv("CRACKQ_MAX_TILES", "0")
    with pytest.raises(ValueError, match="max_tiles"):
        Settings.load()


# ---- safe result files --------------------------------------------------------------------------------
def test_csv_text_cells_that_would_run_as_formulas_are_neutralised_numbers_are_not():
    record = result_record("/data/=HYPERLINK(1).jpg", label="crack", crack_probability=0.9, longitude=-3.5,
                           latitude=51.25, altitude=-12.0, error="=cmd|' /C calc'!A0",
                           captured_at="+2024-01-01", worker="@host\tname", model="-1+1")
    for lead in ("\t", "\r"):
        record[f"x{ord(lead)}"] = lead + "x"
    out = io.StringIO()
    write_csv([record], out, columns=("path", "error", "captured_at", "worker", "model", "longitude",
                                      "altitude", "x9", "x13"))
    row = next(csv.DictReader(io.StringIO(out.getvalue(), newline="")))
    assert row["path"] == "/data/=HYPERLINK(1).jpg"  # does not start with a formula character
    assert row["error"] == "'=cmd|' /C calc'!A0"
    assert row["captured_at"] == "'+2024-01-01" and row["worker"] == "'@host\tname" and row["model"] == "'-1+1"
    assert row["x9"] == "'\tx" and row["x13"].startswith("'") and row["x13"].endswith("x")
    assert row["longitude"] == "-3.5" and row["altitude"] == "-12.0"  # numbers stay numbers


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_never_reach_json(tmp_path):
    record = result_record("/data/a.jpg", label="crack", crack_probability=float("nan"), latitude=1.0,
                           longitude=2.0, altitude=float("inf"), domain_score=float("-inf"))
    assert record["crack_probability"] is None and record["altitude"] is None and record["domain_score"] is None
    raw = dict(record, altitude=float("nan"))  # even a record made elsewhere
    for writer in (write_jsonl, write_geojson):
        out = io.StringIO()
        writer([raw], out)
        for line in out.getvalue().splitlines():
            _strict(line)

    # A GPS altitude with a zero denominator (seen in the wild) gives no altitude, not NaN.
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (3.0, 0.0, 0.0),
                    6: TiffImagePlugin.IFDRational(100, 0)}
    Image.new("RGB", (8, 8)).save(tmp_path / "gps.jpg", exif=exif)
    with Image.open(tmp_path / "gps.jpg") as img:
        meta = photo_metadata(img)
    assert meta["latitude"] == 51.5 and meta["longitude"] == -3.0 and "altitude" not in meta


def test_a_file_name_that_is_not_utf8_round_trips_through_csv_and_jsonl(tmp_path):
    name = os.fsdecode(b"/data/caf\xe9 \xff.jpg")  # what os.listdir gives for a Latin-1 name
    record = result_record(name, label="crack", crack_probability=0.75)
    for writer, fmt in ((write_csv, "csv"), (write_jsonl, "jsonl")):
        path = tmp_path / f"r.{fmt}"
        with open_results_file(str(path)) as fh:
            writer([record], fh)
        data = path.read_bytes()
        assert b"/data/caf\xe9 \xff.jpg" in data  # the original bytes: the file can be found again
        text = data.decode("utf-8", errors="surrogateescape")
        back = next(csv.DictReader(io.StringIO(text)))["path"] if fmt == "csv" else json.loads(text)["path"]
        assert back == name
