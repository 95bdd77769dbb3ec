"""Fetch the optional demo data into the capi_lab cache ($CAPI_LAB_CACHE or ~/.cache/capi_lab/demo-data).

    python scripts/fetch_demo_data.py            # all sources
    python scripts/fetch_demo_data.py --only foolbox opencv

Sources (each optional: one that cannot be fetched is skipped with a note):
  foolbox   20 ImageNet sample photos shipped in the foolbox wheel (MIT); read from the wheel, not installed
  opencv    photos among Debian opencv-doc's example data (BSD-3-Clause / Apache-2.0)
  mate      Debian mate-backgrounds, nature/ (GPL-2+ and other free licences, see COPYRIGHT)
  plasma    Debian plasma-workspace-wallpapers (LGPL-3 / CC-BY-SA, see COPYRIGHT)
  tuxpaint  Debian tuxpaint-stamps-default photo cut-outs with exact alpha masks (GPL-2+), for seg-knn

Debian packages are taken with `apt-get download` + `dpkg-deb -x`, never installed. Large images are
downscaled to at most 1024 px on their longer side. A manifest.json lists path, source and licence of
every image; capi_lab's `demo-photos` reads it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from capi_lab.data import cache_dir  # noqa: E402

MAX_SIDE = 1024
LICENSES = {
    "foolbox": "MIT (foolbox sample data)",
    "opencv": "BSD-3-Clause / Apache-2.0 (OpenCV sample data, Debian opencv-doc)",
    "mate": "GPL-2+ / free (Debian mate-backgrounds, see COPYRIGHT)",
    "plasma": "LGPL-3 / CC-BY-SA (Debian plasma-workspace-wallpapers, see COPYRIGHT)",
    "tuxpaint": "GPL-2+ (Debian tuxpaint-stamps-default, see COPYRIGHT)",
}
OPENCV_PHOTOS = (
    "HappyFish aero1 aero3 aloeL apple baboon basketball1 basketball2 board box box_in_scene building butterfly "
    "cards chicky_512 fruits graf1 graf3 home leuvenA leuvenB messi5 orange rubberwhale1 smarties squirrel_cls "
    "stuff sudoku"
).split()
DEBIAN = {
    "opencv": "opencv-doc",
    "mate": "mate-backgrounds",
    "plasma": "plasma-workspace-wallpapers",
    "tuxpaint": "tuxpaint-stamps-default",
}


def save_image(src: Path, dst: Path, keep_alpha: bool = False) -> bool:
    try:
        with Image.open(src) as img:
            img.load()
            if min(img.size) < 64:
                return False
            img = img.convert("RGBA" if keep_alpha else "RGB")
            img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
            dst.parent.mkdir(parents=True, exist_ok=True)
            img.save(dst.with_suffix(".png") if keep_alpha else dst.with_suffix(".jpg"), quality=92)
            return True
    except Exception as e:  # a broken or exotic file in a package: skip it
        print(f"  skip {src.name}: {e}")
        return False


def fetch_foolbox(out: Path, tmp: Path) -> list[Path]:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "foolbox==3.3.4", "-d", str(tmp)], check=True
    )
    wheel = next(tmp.glob("foolbox-*.whl"))
    saved = []
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("foolbox/data/imagenet_") and name.endswith(".jpg"):
                dst = out / Path(name).name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(z.read(name))
                saved.append(dst)
        lic = [n for n in z.namelist() if n.endswith("LICENSE")]
        if lic:
            (out / "COPYRIGHT").write_bytes(z.read(lic[0]))
    return saved


def extract_deb(package: str, tmp: Path) -> Path:
    cmd = ["apt-get", "download", package]
    if subprocess.run(cmd, cwd=tmp, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
    deb = next(tmp.glob(f"{package}_*.deb"))
    root = tmp / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def fetch_debian(source: str, out: Path, tmp: Path) -> list[Path]:
    package = DEBIAN[source]
    root = extract_deb(package, tmp)
    copyright_file = root / "usr/share/doc" / package / "copyright"
    out.mkdir(parents=True, exist_ok=True)
    if copyright_file.exists():
        shutil.copyfile(copyright_file, out / "COPYRIGHT")
    saved: list[Path] = []
    if source == "opencv":  # the photographs among the sample data (not charts, logos, text or shapes)
        data = root / "usr/share/doc/opencv-doc/examples/data"
        files = [data / f"{n}.jpg" for n in OPENCV_PHOTOS if (data / f"{n}.jpg").exists()]
    elif source == "mate":
        files = sorted((root / "usr/share/backgrounds/mate/nature").glob("*"))
    elif source == "plasma":
        files = []
        for wall in sorted((root / "usr/share/wallpapers").glob("*")):
            images = sorted((wall / "contents/images").glob("*.*"), key=lambda p: p.stat().st_size)
            if images:
                files.append(images[-1])  # the largest rendition of each wallpaper
    else:  # tuxpaint: keep alpha, keep the category folders (they are the segmentation classes)
        base = root / "usr/share/tuxpaint/stamps"
        for f in sorted(base.rglob("*.png")):
            rel = f.relative_to(base)
            if save_image(f, out / rel, keep_alpha=True):
                saved.append((out / rel).with_suffix(".png"))
        return saved
    for f in files:
        name = f.parents[2].name + ".jpg" if source == "plasma" else f.name
        if save_image(f, out / name):
            saved.append((out / name).with_suffix(".jpg"))
    return saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(LICENSES), help="fetch only these sources")
    ap.add_argument("--out", default=None, help="target folder (default: the capi_lab cache's demo-data/)")
    args = ap.parse_args()
    target = Path(args.out) if args.out else cache_dir() / "demo-data"
    target.mkdir(parents=True, exist_ok=True)
    manifest_path = target / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else []
    for source in args.only or list(LICENSES):
        print(f"{source}: fetching ...")
        with tempfile.TemporaryDirectory() as t:
            try:
                out = target / source
                if out.exists():
                    shutil.rmtree(out)
                saved = fetch_foolbox(out, Path(t)) if source == "foolbox" else fetch_debian(source, out, Path(t))
            except Exception as e:
                print(f"{source}: skipped ({type(e).__name__}: {e})")
                continue
        manifest = [row for row in manifest if row["source"] != source]
        manifest += [{"path": str(p.relative_to(target)), "source": source, "license": LICENSES[source]} for p in saved]
        print(f"{source}: {len(saved)} images in {out}")
    manifest_path.write_text(json.dumps(manifest, indent=1))
    print(f"manifest: {manifest_path} ({len(manifest)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
