"""scripts/fetch_demo_data.py on tiny synthetic packages: Qt resource bundles, licences from Debian copyright
files, duplicate and panorama handling, which images a source keeps, and bad input (a missing package, a corrupt
image) skipped with a line while the rest is fetched and nothing fetched before is lost."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import fetch_demo_data as fetch


def _photo(seed: int, size=(96, 80)) -> Image.Image:
    """A smooth random picture (distinct seeds give distinct difference hashes)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _encoded(img: Image.Image, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _rcc(files: dict[str, bytes], compress: set[str] = frozenset(), version: int = 2) -> bytes:
    """A Qt binary resource bundle holding ``files`` (paths with '/'), written the way rcc lays it out."""
    tree: dict = {}
    for path, data in files.items():
        node = tree
        *dirs, leaf = path.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[leaf] = data
    names, name_at = b"", {}

    def name_offset(n: str) -> int:
        nonlocal names
        if n not in name_at:
            name_at[n] = len(names)
            names += struct.pack(">HI", len(n), 0) + n.encode("utf-16-be")
        return name_at[n]

    nodes: list[tuple[str, object]] = [("", tree)]  # breadth first: a directory's children are contiguous
    records: list[bytes] = []
    payload = b""
    i = 0
    node_tail = b"\0" * 8 if version >= 2 else b""
    while i < len(nodes):
        name, content = nodes[i]
        if isinstance(content, dict):
            first = len(nodes)
            nodes += sorted(content.items())
            records.append(struct.pack(">IHII", name_offset(name), 2, len(content), first) + node_tail)
        else:
            data = content
            flags = 0
            if name in compress:
                data, flags = struct.pack(">I", len(data)) + zlib.compress(data), 1
            records.append(struct.pack(">IHHHI", name_offset(name), flags, 0, 0, len(payload)) + node_tail)
            payload += struct.pack(">I", len(data)) + data
        i += 1
    header = 24 if version >= 3 else 20
    tree_bytes = b"".join(records)
    tree_at, payload_at = header, header + len(tree_bytes)
    names_at = payload_at + len(payload)
    head = b"qres" + struct.pack(">IIII", version, tree_at, payload_at, names_at)
    if version >= 3:
        head += struct.pack(">I", 0)
    return head + tree_bytes + payload + names


@pytest.mark.parametrize("version", [1, 2, 3])
def test_rcc_files_reads_every_file_plain_and_compressed(version):
    files = {"gcompris/src/a/x.webp": b"first" * 30, "gcompris/src/a/b/y.jpg": b"second", "top.txt": b"3"}
    got = dict(fetch.rcc_files(_rcc(files, compress={"y.jpg"}, version=version)))
    assert got == files
    with pytest.raises(ValueError, match="qres"):
        list(fetch.rcc_files(b"not a bundle at all"))


COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: wallpapers

Files: *
Copyright: 2010 The Project
License: GPL-3+

Files: 16.04/aitzgorri_by_Aitzol.jpg
Copyright: 2016 Aitzol Berasategi
License: CC-BY-4.0

Files: src/activities/explore/resource/*.webp
  src/activities/other/*.jpg
Copyright: 2018 Someone
License: CC-BY-SA-4.0
 The licence text follows, indented.
"""


def test_licence_per_image_from_the_copyright_file():
    stanzas = fetch.copyright_licenses(COPYRIGHT)
    assert [s[1] for s in stanzas] == ["GPL-3+", "CC-BY-4.0", "CC-BY-SA-4.0"]
    assert stanzas[2][0] == ["src/activities/explore/resource/*.webp", "src/activities/other/*.jpg"]
    # a file named by a stanza matches wherever the package installed it; the last matching stanza wins
    assert fetch.license_of("aitzgorri_by_Aitzol.jpg", stanzas, "pkg").startswith("CC-BY-4.0 (2016 Aitzol")
    assert fetch.license_of("src/activities/explore/resource/cow.webp", stanzas, "pkg").startswith("CC-BY-SA-4.0")
    assert fetch.license_of("src/activities/other/dog.jpg", stanzas, "pkg").startswith("CC-BY-SA-4.0")
    assert fetch.license_of("anything/else.png", stanzas, "pkg") == "GPL-3+; pkg"
    assert fetch.license_of("x.png", [], "the package's licence") == "the package's licence"


def test_duplicates_are_found_across_sizes_and_recompression_but_distinct_photos_are_not():
    a = _photo(1, (300, 200))
    again = Image.open(io.BytesIO(_encoded(a.resize((150, 100)), "JPEG")))
    seen = [fetch.difference_hash(a)]
    assert fetch.is_duplicate(fetch.difference_hash(again), seen)
    others = [fetch.difference_hash(_photo(s, (300, 200))) for s in range(2, 12)]
    assert not any(fetch.is_duplicate(h, seen) for h in others)


def test_opaque_band_keeps_the_photographed_ground_of_a_panorama_tile():
    rgba = np.zeros((200, 160, 4), dtype=np.uint8)
    rgba[..., :3] = 120
    rgba[90:, :, 3] = 255  # ground from row 90 down, transparent sky above
    band = fetch.opaque_band(Image.fromarray(rgba, "RGBA"))
    assert band.mode == "RGB" and band.size == (160, 110)
    rgba[:, :, 3] = 0
    rgba[150:, :, 3] = 255  # 50 rows: under a quarter of the height
    assert fetch.opaque_band(Image.fromarray(rgba, "RGBA")) is None
    rgb = _photo(3)
    assert fetch.opaque_band(rgb).size == rgb.size


def _fake_packages(tmp_path: Path) -> dict[str, Path]:
    """Extracted trees of the packages the lomiri and gcompris sources read, with photos, a duplicate, a
    painting, a corrupt file, a tiny image and files no rule names."""
    trees = {}
    lomiri = tmp_path / "pkg" / "lomiri-wallpapers-16.04"
    bg = lomiri / "usr/share/backgrounds"
    bg.mkdir(parents=True)
    _photo(10, (400, 300)).save(bg / "Bridge_by_Sander_Klootwijk.jpg")
    _photo(10, (200, 150)).save(bg / "Dragonfly_by_Bolly.jpg")  # the same picture again: a duplicate
    (bg / "Wine_by_Jakkub_Mede.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    _photo(11, (40, 30)).save(bg / "free_by_Peter_Nerlich.jpg")  # too small
    _photo(12).save(bg / "umang_by_Abhishek_Mudgal.jpg")  # abstract art, not listed
    doc = lomiri / "usr/share/doc/lomiri-wallpapers-16.04"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Files: *\nLicense: CC-BY-SA-3.0\n\nFiles: 16.04/Bridge_by_Sander_Klootwijk.jpg\n"
        "Copyright: 2016 Sander Klootwijk\nLicense: CC-BY-SA-4.0\n"
    )
    trees["lomiri-wallpapers-16.04"] = lomiri
    lomiri20 = tmp_path / "pkg" / "lomiri-wallpapers-20.04"
    (lomiri20 / "usr/share/backgrounds").mkdir(parents=True)
    _photo(13, (320, 240)).save(lomiri20 / "usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg")
    trees["lomiri-wallpapers-20.04"] = lomiri20
    gc = tmp_path / "pkg" / "gcompris-qt-data"
    rcc = gc / "usr/share/gcompris-qt/rcc"
    rcc.mkdir(parents=True)
    (rcc / "details.rcc").write_bytes(
        _rcc({
            "gcompris/src/activities/details/resource/sea1.webp": _encoded(_photo(20), "WEBP"),
            "gcompris/src/activities/details/resource/Bosschaert_04.jpg": _encoded(_photo(21)),  # a painting
        })
    )  # fmt: skip
    (rcc / "lang.rcc").write_bytes(_rcc({"gcompris/src/activities/lang/resource/cat.png": _encoded(_photo(22), "PNG")}))
    (rcc / "explore_monuments.rcc").write_bytes(
        _rcc(
            {"gcompris/src/activities/explore_monuments/resource/x/colosseum.jpg": _encoded(_photo(23))},
            {"colosseum.jpg"},
        )
    )
    trees["gcompris-qt-data"] = gc
    return trees


def _patch_packages(monkeypatch, trees: dict[str, Path], missing: tuple[str, ...] = ()):
    def extract(package, tmp):
        if package in missing or package not in trees:
            raise RuntimeError(f"apt-get download {package} failed: E: Unable to locate package {package}")
        return trees[package]

    monkeypatch.setattr(fetch, "extract_deb", extract)
    monkeypatch.setattr(fetch, "packaged_hashes", lambda: [])


def test_a_source_keeps_its_photographs_and_names_what_it_skips(tmp_path, monkeypatch, capsys):
    _patch_packages(monkeypatch, _fake_packages(tmp_path))
    out = tmp_path / "demo"
    assert fetch.main(["--only", "lomiri", "gcompris", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skip lomiri/Wine_by_Jakkub_Mede.jpg: cannot decode" in text  # the corrupt one, by name
    assert "1 duplicates" in text and "1 too small" in text
    manifest = {Path(r["path"]).name: r for r in json.loads((out / "manifest.json").read_text())}
    assert set(manifest) == {"Bridge_by_Sander_Klootwijk.jpg", "Kleiber_by_Lukas_Baubkus.jpg", "sea1.jpg",
                             "colosseum.jpg"}  # fmt: skip
    bridge = manifest["Bridge_by_Sander_Klootwijk.jpg"]
    assert bridge["license"].startswith("CC-BY-SA-4.0 (2016 Sander Klootwijk)")  # per image, not per package
    assert manifest["Kleiber_by_Lukas_Baubkus.jpg"]["license"] == fetch.LICENSES["lomiri"]  # its package has none
    assert (bridge["width"], bridge["height"]) == (400, 300)
    assert manifest["sea1.jpg"]["origin"] == "src/activities/details/resource/sea1.webp"
    for row in manifest.values():
        with Image.open(out / row["path"]) as img:
            assert img.mode == "RGB" and max(img.size) <= fetch.MAX_SIDE
    assert "4 distinct fetched photos" in text


def test_a_missing_package_is_skipped_and_loses_nothing_fetched_before(tmp_path, monkeypatch, capsys):
    trees = _fake_packages(tmp_path)
    out = tmp_path / "demo"
    _patch_packages(monkeypatch, trees)
    fetch.main(["--only", "lomiri", "gcompris", "--out", str(out)])
    before = json.loads((out / "manifest.json").read_text())
    _patch_packages(monkeypatch, trees, missing=("gcompris-qt-data",))
    capsys.readouterr()
    assert fetch.main(["--only", "lomiri", "gcompris", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "gcompris: skipped (RuntimeError: apt-get download gcompris-qt-data failed" in text
    assert "lomiri: 2 images" in text  # the rest is still fetched
    after = json.loads((out / "manifest.json").read_text())
    assert sorted(r["path"] for r in after) == sorted(r["path"] for r in before)  # gcompris' rows kept
    assert all((out / r["path"]).exists() for r in after)  # and its files


def test_the_list_names_every_source_and_why_packages_were_left_out(capsys):
    assert fetch.main(["--list"]) == 0
    text = capsys.readouterr().out
    for source in fetch.LICENSES:
        assert source in text
    assert "gnome-backgrounds: rendered abstract patterns" in text


def test_stellarium_keeps_the_photographed_ground_of_its_panoramas(tmp_path, monkeypatch):
    root = tmp_path / "stellarium-data"
    land = root / "usr/share/stellarium/landscapes"

    def tile(path: Path, seed: int, sky_rows: int):
        rgba = np.asarray(_photo(seed, (240, 240)).convert("RGBA")).copy()
        rgba[:sky_rows, :, 3] = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgba, "RGBA").save(path)

    tile(land / "guereins/guereins1.png", 30, 100)
    tile(land / "ocean/ocean1.png", 31, 0)  # rendered water: left out
    tile(land / "trees/trees_fog_512.png", 32, 0)  # a fog layer: left out
    tile(land / "grossmugl/grossmugl_leeberg_il.png", 33, 0)  # night lights: left out
    monkeypatch.setattr(fetch, "extract_deb", lambda package, tmp: root)
    monkeypatch.setattr(fetch, "packaged_hashes", lambda: [])
    monkeypatch.setattr(fetch, "STELLARIUM_MIN_BYTES", 0)
    rows = fetch.fetch_source("stellarium", tmp_path / "out" / "stellarium", tmp_path, [])
    assert [r["path"] for r in rows] == ["stellarium/guereins/guereins1.jpg"]
    assert (rows[0]["width"], rows[0]["height"]) == (240, 140)  # the sky cut away
