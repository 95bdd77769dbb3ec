"""Fetch the optional demo data into the capi_lab cache ($CAPI_LAB_CACHE or ~/.cache/capi_lab/demo-data).

    python scripts/fetch_demo_data.py            # all sources
    python scripts/fetch_demo_data.py --only foolbox opencv
    python scripts/fetch_demo_data.py --list     # what each source is, and the packages left out and why

Sources (each optional: one that cannot be fetched is skipped with a line naming it, and the rest are fetched):
  foolbox     20 ImageNet sample photos shipped in the foolbox wheel (MIT); read from the wheel, not installed
  opencv      photos among Debian opencv-doc's example data (BSD-3-Clause / Apache-2.0)
  mate        Debian mate-backgrounds, nature/ (GPL-2+ and other free licences)
  plasma      Debian plasma-workspace-wallpapers (LGPL-3 / CC-BY-SA)
  lomiri      the photographs among Debian lomiri-wallpapers-16.04 and -20.04 (CC-BY-4.0 / CC-BY-SA-4.0 / CC0)
  gcompris    the photographs inside Debian gcompris-qt-data's Qt resource bundles: monuments, animals, objects,
              musicians, sea floors (GPL-3+ / CC-BY-SA / public domain, per file); its drawings and paintings
              are left out
  stellarium  the opaque (photographed) part of Debian stellarium-data's landscape panoramas (GPL-2+)
  tuxpaint    Debian tuxpaint-stamps-default photo cut-outs with exact alpha masks (GPL-2+), for seg-knn and the
              `composite` training source, kept apart from the photos

Debian packages are taken with `apt-get download` + `dpkg-deb -x`, never installed. Images are downscaled to at
most 1024 px on their longer side; images under 64 px are dropped; an image that looks the same as one already
kept (a 64-bit difference hash within 6 bits, across every source and the photos the Python packages ship) is
dropped as a duplicate. A manifest.json lists path, source, licence (from the package's machine-readable
copyright file, per image where it says), origin and size of every image; capi_lab's `demo-photos` reads it.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from capi_lab.data import cache_dir  # noqa: E402

MAX_SIDE = 1024
MIN_SIDE = 64
DUPLICATE_BITS = 6
"""Two images whose difference hashes differ in at most this many of 64 bits are taken for the same photo."""

LICENSES = {
    "foolbox": "MIT (foolbox sample data)",
    "opencv": "BSD-3-Clause / Apache-2.0 (OpenCV sample data, Debian opencv-doc)",
    "mate": "GPL-2+ / free (Debian mate-backgrounds, see COPYRIGHT)",
    "plasma": "LGPL-3 / CC-BY-SA (Debian plasma-workspace-wallpapers, see COPYRIGHT)",
    "lomiri": "CC-BY-4.0 / CC-BY-SA-4.0 / CC0-1.0 (Debian lomiri-wallpapers, see COPYRIGHT)",
    "gcompris": "GPL-3+ / CC-BY-SA / public domain (Debian gcompris-qt-data, see COPYRIGHT)",
    "stellarium": "GPL-2+ (Debian stellarium-data, see COPYRIGHT)",
    "tuxpaint": "GPL-2+ (Debian tuxpaint-stamps-default, see COPYRIGHT)",
}
DEBIAN = {
    "opencv": ("opencv-doc",),
    "mate": ("mate-backgrounds",),
    "plasma": ("plasma-workspace-wallpapers",),
    "lomiri": ("lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04"),
    "gcompris": ("gcompris-qt-data",),
    "stellarium": ("stellarium-data",),
    "tuxpaint": ("tuxpaint-stamps-default",),
}
LEFT_OUT = {
    "gnome-backgrounds": "rendered abstract patterns (pixels, wood, truchet, blobs) and SVG drawings: no photographs",
    "ukui-wallpapers": "abstract renders (calla, rhythm, string, goldfish ...): no photographs",
    "desktop-base": "Debian's theme artwork: SVG wallpapers, logos, boot screens",
    "sway-backgrounds": "the sway logo on flat colour, in eight sizes",
    "lomiri-wallpapers": "one abstract wallpaper (warty-final-ubuntu)",
    "lomiri-wallpapers-16.04 / -20.04 (part)": "analogpattern, umang, Fossa, Painting-Colors, Infinite-Sea "
    "(abstract or digital art) and greentock (a rendered clock) are left out; the other 13 are photographs",
    "stellarium-data (part)": "the ocean landscape (rendered water), and the fog and night-light layers of the "
    "photographed panoramas; of those, the transparent sky is cut away",
    "gcompris-qt-data (part)": "lang (cartoon drawings of words), paintings and the painting puzzles of erase and "
    "details, babyshapes, leftright (hands cut out on coloured fill), solar_system and gravity (planet renders), "
    "other activities' drawings and icons",
}
OPENCV_PHOTOS = (
    "HappyFish aero1 aero3 aloeL apple baboon basketball1 basketball2 board box box_in_scene building butterfly "
    "cards chicky_512 fruits graf1 graf3 home leuvenA leuvenB messi5 orange rubberwhale1 smarties squirrel_cls "
    "stuff sudoku"
).split()
LOMIRI_PHOTOS = (
    "Bridge_by_Sander_Klootwijk Dragonfly_by_Bolly Picture_0B_by_freespace Picture_1A_by_freespace Wine_by_Jakkub_Mede "
    "aitzgorri_by_Aitzol_Berasategi free_by_Peter_Nerlich friends_by_Aitzol_Berasategi life_by_Aitzol_Berasategi "
    "picosdeeuropa_by_Aitzol_Berasategi seeding_by_Clements_Engelhardt sunset_by_Aitzol_Berasategi "
    "Kleiber_by_Lukas_Baubkus"
).split()
STELLARIUM_MIN_BYTES = 50_000
"""Smaller files of stellarium-data's landscapes are masks and thumbnails, not photographs."""
STELLARIUM_LEFT_OUT = ("ocean",)
"""Landscapes of stellarium-data that are rendered, not photographed."""
GCOMPRIS_PHOTOS = {
    # activity bundle -> pattern a photograph's file name matches (the bundles also hold drawings and paintings)
    "categorization": r".*",
    "explore_monuments": r".*",
    "explore_world_animals": r".*",
    "explore_farm_animals": r".*",
    "erase": r"(?i)^(?!.*(gogh|eglise|portrait)).*",  # monument photos; the Van Gogh paintings are left out
    "details": r"^sea\d",  # sea floors; the rest are paintings
    "explore_world_music": r"(?i)^(?!texture).*",
    "louis-braille": r"(?i)^(?!louis).*",  # photos of the school, the statue, braille; not the portrait
}


@dataclass
class Candidate:
    """An image found in a source, before it is checked and saved."""

    name: str
    """File name to save it under (in the source's folder)."""
    origin: str
    """Where it came from, relative to the package (the licence is looked up by it)."""
    data: bytes | Path
    """The encoded image, or its path."""


# ----------------------------------------------------------------------------- images


def open_image(data: bytes | Path) -> Image.Image:
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    img.load()
    return img


def difference_hash(img: Image.Image) -> int:
    """64-bit difference hash: the sign of horizontal brightness steps on a 9x8 thumbnail."""
    g = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def is_duplicate(h: int, seen: list[int]) -> bool:
    return any(bin(h ^ s).count("1") <= DUPLICATE_BITS for s in seen)


def opaque_band(img: Image.Image, min_fraction: float = 0.25) -> Image.Image | None:
    """The tallest band of rows that are (all but 1 %) opaque: a panorama tile's photographed ground without
    the transparent sky. The whole image when it has no alpha; None when the band is under ``min_fraction`` of
    the height."""
    if "A" not in img.getbands() and not (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGB")
    alpha = np.asarray(img.convert("RGBA"))[..., 3]
    full = (alpha >= 250).mean(axis=1) >= 0.99
    best, start = (0, 0), None
    for y, ok in enumerate([*full, False]):
        if ok and start is None:
            start = y
        elif not ok and start is not None:
            best = max(best, (y - start, start))
            start = None
    height, top = best
    if height < max(MIN_SIDE, min_fraction * img.height):
        return None
    return img.convert("RGB").crop((0, top, img.width, top + height))


def save_image(img: Image.Image, dst: Path, keep_alpha: bool = False) -> Path:
    img = img.convert("RGBA" if keep_alpha else "RGB")
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst = dst.with_suffix(".png" if keep_alpha else ".jpg")
    img.save(dst, quality=92)
    return dst


# ----------------------------------------------------------------------------- package formats


def rcc_files(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Every file in a Qt binary resource bundle (``.rcc``, format versions 1-3) as ``(path, bytes)``.

    Layout: a header ``qres``, version, then the offsets of the tree, the data and the names. Tree nodes are 14
    bytes (22 from version 2: a modification time follows): name offset, flags (1 zlib, 2 directory, 4 zstd),
    then a directory's child count and first child, or a file's locale and data offset. Names are a length, a
    hash and UTF-16BE characters; data a length and the bytes (zlib data has Qt's 4-byte size prefix)."""
    if data[:4] != b"qres":
        raise ValueError("not a Qt resource bundle (no 'qres' header)")
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    node_size = 22 if version >= 2 else 14

    def name(offset: int) -> str:
        (n,) = struct.unpack(">H", data[names + offset : names + offset + 2])
        return data[names + offset + 6 : names + offset + 6 + 2 * n].decode("utf-16-be")

    stack = [(0, "")]
    while stack:
        index, prefix = stack.pop()
        base = tree + index * node_size
        name_offset, flags = struct.unpack(">IH", data[base : base + 6])
        path = f"{prefix}{name(name_offset)}" if index else ""
        if flags & 2:
            count, first = struct.unpack(">II", data[base + 6 : base + 14])
            stack += [(c, f"{path}/" if index else "") for c in reversed(range(first, first + count))]
            continue
        (offset,) = struct.unpack(">I", data[base + 10 : base + 14])
        (n,) = struct.unpack(">I", data[payload + offset : payload + offset + 4])
        blob = data[payload + offset + 4 : payload + offset + 4 + n]
        if flags & 1:
            import zlib

            blob = zlib.decompress(blob[4:])
        elif flags & 4:
            try:
                import zstandard
            except ImportError:
                continue  # no zstd decoder here: such a file is not offered
            blob = zstandard.ZstdDecompressor().decompress(blob)
        yield path, blob


def copyright_licenses(text: str) -> list[tuple[list[str], str, str]]:
    """``(file patterns, licence, copyright holder)`` of each ``Files:`` stanza of a machine-readable Debian
    copyright file, in order (the last stanza that matches a file is the one that applies to it)."""
    stanzas = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "files" in fields and "license" in fields:
            holder = fields.get("copyright", "").split(" 1", 1)[0].strip()
            stanzas.append((fields["files"].split(), fields["license"].split()[0], holder))
    return stanzas


def license_of(origin: str, stanzas: list[tuple[list[str], str, str]], default: str) -> str:
    """The licence the copyright file gives ``origin`` (a path in the package, or in the upstream tree); a
    pattern naming a file matches it in any folder (packages install files elsewhere than their source tree)."""
    parts = origin.split("/")
    tails = ["/".join(parts[i:]) for i in range(len(parts))]
    found = None
    for patterns, lic, holder in stanzas:
        for pat in patterns:
            base = pat.rsplit("/", 1)[-1]
            if any(fnmatch.fnmatchcase(t, pat) for t in tails) or (
                not any(c in base for c in "*?[") and base == parts[-1]
            ):
                found = f"{lic} ({holder})" if holder and pat != "*" else lic
    return f"{found}; {default}" if found else default


# ----------------------------------------------------------------------------- sources


def extract_deb(package: str, tmp: Path) -> Path:
    """``apt-get download`` + ``dpkg-deb -x`` into ``tmp/package``; never installed."""
    cmd = ["apt-get", "download", package]
    if subprocess.run(cmd, cwd=tmp, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed: {r.stderr.strip().splitlines()[-1:]}")
    deb = next(tmp.glob(f"{package}_*.deb"))
    root = tmp / package
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def candidates(source: str, root: Path) -> Iterator[Candidate]:
    """The images a source offers, from its extracted package tree ``root``."""
    if source == "opencv":  # the photographs among the sample data (not charts, logos, text or shapes)
        data = root / "usr/share/doc/opencv-doc/examples/data"
        for n in OPENCV_PHOTOS:
            if (data / f"{n}.jpg").exists():
                yield Candidate(f"{n}.jpg", f"samples/data/{n}.jpg", data / f"{n}.jpg")
    elif source == "mate":
        for f in sorted((root / "usr/share/backgrounds/mate/nature").glob("*")):
            yield Candidate(f.name, f"nature/{f.name}", f)
    elif source == "plasma":
        for wall in sorted((root / "usr/share/wallpapers").glob("*")):
            images = sorted((wall / "contents/images").glob("*.*"), key=lambda p: p.stat().st_size)
            if images:  # the largest rendition of each wallpaper
                yield Candidate(
                    f"{wall.name}.jpg", f"wallpapers/{wall.name}/contents/images/{images[-1].name}", images[-1]
                )
    elif source == "lomiri":
        for f in sorted((root / "usr/share/backgrounds").rglob("*")):
            if f.stem in LOMIRI_PHOTOS:
                yield Candidate(f.name, f.name, f)
    elif source == "gcompris":
        for bundle in sorted((root / "usr/share/gcompris-qt/rcc").glob("*.rcc")):
            keep = GCOMPRIS_PHOTOS.get(bundle.stem)
            if keep is None:
                continue
            for path, blob in rcc_files(bundle.read_bytes()):
                name = path.rsplit("/", 1)[-1]
                if name.lower().endswith((".jpg", ".jpeg", ".png", ".webp")) and re.match(keep, name):
                    yield Candidate(f"{bundle.stem}/{name}", path.removeprefix("gcompris/"), blob)
    elif source == "stellarium":
        for f in sorted((root / "usr/share/stellarium/landscapes").glob("*/*")):
            if f.parent.name in STELLARIUM_LEFT_OUT or re.search(r"fog|_il\b|_illum", f.stem):
                continue  # the rendered ocean, and the fog and night-light layers of the panoramas
            if f.suffix.lower() in (".png", ".jpg", ".jpeg") and f.stat().st_size > STELLARIUM_MIN_BYTES:
                yield Candidate(f"{f.parent.name}/{f.stem}.jpg", f"landscapes/{f.parent.name}/{f.name}", f)
    elif source == "tuxpaint":  # keep alpha and the category folders (they are the segmentation classes)
        base = root / "usr/share/tuxpaint/stamps"
        for f in sorted(base.rglob("*.png")):
            yield Candidate(str(f.relative_to(base)), f"stamps/{f.relative_to(base)}", f)
    else:
        raise ValueError(f"unknown source {source!r}")


def foolbox_candidates(tmp: Path) -> tuple[list[Candidate], str]:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "foolbox==3.3.4", "-d", str(tmp)], check=True
    )
    wheel = next(tmp.glob("foolbox-*.whl"))
    found, lic = [], ""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("foolbox/data/imagenet_") and name.endswith(".jpg"):
                found.append(Candidate(Path(name).name, name, z.read(name)))
        lic_files = [n for n in z.namelist() if n.endswith("LICENSE")]
        if lic_files:
            lic = z.read(lic_files[0]).decode(errors="replace")
    return found, lic


def prepare(img: Image.Image, source: str) -> Image.Image | None:
    """What is kept of an image: the opaque band of a stellarium panorama tile, None if too small."""
    if source == "stellarium":
        img = opaque_band(img)
        if img is None:
            return None
    return img if min(img.size) >= MIN_SIDE else None


def fetch_source(source: str, out: Path, tmp: Path, seen: list[int], log=print) -> list[dict]:
    """Fetch one source into ``out``; returns its manifest rows. ``seen`` (the hashes of the images kept so far)
    grows with every photo kept. A corrupt image is skipped with one line naming it."""
    found: list[tuple[Candidate, list]] = []  # each image with the copyright stanzas of its own package
    texts = []
    if source == "foolbox":
        cands, text = foolbox_candidates(tmp)
        found, texts = [(c, []) for c in cands], [text]
    else:
        for package in DEBIAN[source]:
            root = extract_deb(package, tmp)
            cfile = root / "usr/share/doc" / package / "copyright"
            text = cfile.read_text(errors="replace") if cfile.exists() else ""
            stanzas = copyright_licenses(text)
            found += [(c, stanzas) for c in candidates(source, root)]
            texts.append(text)
    out.mkdir(parents=True, exist_ok=True)
    if any(texts):
        (out / "COPYRIGHT").write_text("\n\n".join(t for t in texts if t))
    rows, duplicates, small = [], 0, 0
    for c, stanzas in found:
        try:
            img = open_image(c.data)
        except Exception as e:  # a broken or exotic file in a package: skip it, keep the rest
            log(f"  skip {source}/{c.name}: cannot decode ({type(e).__name__}: {e})")
            continue
        if source == "tuxpaint":
            if min(img.size) < MIN_SIDE:
                small += 1
                continue
            dst = save_image(img, out / c.name, keep_alpha=True)
        else:
            img = prepare(img, source)
            if img is None:
                small += 1
                continue
            h = difference_hash(img)
            if is_duplicate(h, seen):
                duplicates += 1
                continue
            seen.append(h)
            dst = save_image(img, out / c.name)
        with Image.open(dst) as saved:
            w, hgt = saved.size
        rows.append({"path": f"{source}/{dst.relative_to(out).as_posix()}", "source": source,
                     "license": license_of(c.origin, stanzas, LICENSES[source]), "origin": c.origin,
                     "width": w, "height": hgt})  # fmt: skip
    if duplicates or small:
        log(f"  {source}: {duplicates} duplicates of images already kept and {small} too small or empty left out")
    return rows


def packaged_hashes() -> list[int]:
    """Hashes of the photos the installed Python packages ship (so that fetched copies of them are dropped)."""
    from capi_lab.data import demo_photos

    hashes = []
    for p in demo_photos():
        if p.source in ("scikit-image", "scikit-learn", "matplotlib"):
            with Image.open(p.path) as img:
                hashes.append(difference_hash(img))
    return hashes


def summary(manifest: list[dict]) -> str:
    photos = [r for r in manifest if r["source"] != "tuxpaint"]
    pixels = sum(r.get("width", 0) * r.get("height", 0) for r in photos)
    cutouts = len(manifest) - len(photos)
    return f"{len(photos)} distinct fetched photos ({pixels / 1e6:.0f} megapixels) and {cutouts} cut-outs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(LICENSES), help="fetch only these sources")
    ap.add_argument("--out", default=None, help="target folder (default: the capi_lab cache's demo-data/)")
    ap.add_argument("--list", action="store_true", help="list the sources and the packages left out, and stop")
    args = ap.parse_args(argv)
    if args.list:
        for s, lic in LICENSES.items():
            print(f"{s:11s} {', '.join(DEBIAN.get(s, ('foolbox wheel',)))}: {lic}")
        print("\nleft out:")
        for p, why in LEFT_OUT.items():
            print(f"  {p}: {why}")
        return 0
    target = Path(args.out) if args.out else cache_dir() / "demo-data"
    target.mkdir(parents=True, exist_ok=True)
    manifest_path = target / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else []
    chosen = args.only or list(LICENSES)
    kept = [r for r in manifest if r["source"] not in chosen]  # sources not refetched keep their rows
    seen = packaged_hashes()
    for row in kept:  # their photos count for the duplicate check too
        p = target / row["path"]
        if row["source"] != "tuxpaint" and p.exists():
            with Image.open(p) as img:
                seen.append(difference_hash(img))
    for source in [s for s in LICENSES if s in chosen]:
        print(f"{source}: fetching ...", flush=True)
        out, staging = target / source, target / f".{source}.partial"
        before = len(seen)
        with tempfile.TemporaryDirectory() as t:
            try:
                shutil.rmtree(staging, ignore_errors=True)
                rows = fetch_source(source, staging, Path(t), seen)
            except Exception as e:  # what was fetched before of this source stays as it was
                del seen[before:]
                shutil.rmtree(staging, ignore_errors=True)
                kept += [r for r in manifest if r["source"] == source]
                print(f"{source}: skipped ({type(e).__name__}: {e})")
                continue
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        kept += rows
        print(f"{source}: {len(rows)} images in {out}", flush=True)
    manifest_path.write_text(json.dumps(kept, indent=1))
    print(f"manifest: {manifest_path} ({len(kept)} images: {summary(kept)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
