"""An offline photo set for `scale=short`: the photographs among Debian's desktop backgrounds.

    python -m wetok.wallpapers data/wallpapers            # ~3 MB; then data.root=data/wallpapers

Downloads the packages with `apt-get download` (no install, no root needed beyond apt's
cache), unpacks them with `dpkg -x`, keeps the real photographs, and writes an image folder
that the `imagefolder` data kind reads:

    OUT/train/<package>/<name>.jpg     the photo, short side resized to --short-side (512)
    OUT/val/<package>/<name>_rRcC.jpg  held-out photos cut into --val-tile (128) tiles, a grid
    OUT/manifest.csv                   one row per written file: split, file, package, version,
                                       source path, author, licence
    OUT/licences/<package>.copyright   the package's Debian copyright file

Which files are photographs was decided by looking at every raster image of the packages
(Debian bookworm): gnome-backgrounds 43 (abstract renders), sway-backgrounds (logo art) and
ukui-wallpapers (illustrations) hold none; plasma-workspace-wallpapers holds 12 and the two
lomiri-wallpapers releases 14 (PHOTOS; their renders, and two pictures that may not be plain
photographs, Infinite-Sea and analogpattern, are left out). mate-backgrounds is deliberately
not used (kept for an independent check). Per photo only the largest file is kept (the others
are the same picture at other resolutions). Split by photo, fixed: VAL holds out 3 photos of
each source, picked to span its kinds of scene (6 val, 20 train). The val split is tiles rather
than whole photos because the imagefolder val transform takes one centre crop per file: tiles
give --val-tile-sized held-out crops at the training scale. Author and licence: plasma's
per-wallpaper metadata.json; lomiri's per-file stanzas of its DEP-5 copyright file.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

PACKAGES = ("gnome-backgrounds", "plasma-workspace-wallpapers", "ukui-wallpapers",
            "sway-backgrounds", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04")
# package -> photographs (plasma: the wallpaper folder name). Chosen by eye, see the docstring.
PHOTOS = {
    "plasma-workspace-wallpapers": (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
        "Grey", "Kite", "OneStandsOut", "Path", "summer_1am", "Volna"),
    "lomiri-wallpapers-16.04": (
        "aitzgorri_by_Aitzol_Berasategi", "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly",
        "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich",
        "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi",
        "Picture_0B_by_freespace", "Picture_1A_by_freespace", "seeding_by_Clements_Engelhardt",
        "sunset_by_Aitzol_Berasategi", "Wine_by_Jakkub_Mede"),
    "lomiri-wallpapers-20.04": ("Kleiber_by_Lukas_Baubkus",),
}
VAL = ("EveningGlow", "OneStandsOut", "Volna", "friends_by_Aitzol_Berasategi",
       "picosdeeuropa_by_Aitzol_Berasategi", "Wine_by_Jakkub_Mede")
RASTER = (".jpg", ".jpeg", ".png", ".webp")
MIN_SHORT_SIDE = 512


def download(packages, workdir: Path) -> dict:
    """apt-get download + dpkg -x each package into workdir/<package>; returns {package: version}."""
    try:
        subprocess.run(["apt-get", "download", *packages], cwd=workdir, check=True,
                       stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"error: apt-get download {' '.join(packages)} failed ({exc}); this "
                         "needs Debian's apt with package lists (run `apt-get update` first)")
    versions = {}
    for package in packages:
        debs = sorted(workdir.glob(f"{package}_*.deb"))
        if not debs:
            raise SystemExit(f"error: apt-get download gave no .deb for {package}")
        versions[package] = debs[-1].name.split("_")[1].replace("%3a", ":")
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(workdir / package)], check=True)
    return versions


def find_photos(package: str, tree: Path) -> list[dict]:
    """The photographs of one unpacked package: the largest raster file per photo."""
    best = {}
    for path in sorted(tree.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.suffix.lower() not in RASTER:
            continue
        name = _photo_name(package, path.relative_to(tree))
        if name not in PHOTOS.get(package, ()):
            continue
        if name not in best or path.stat().st_size > best[name]["path"].stat().st_size:
            best[name] = {"name": name, "path": path}
    for photo in best.values():
        photo.update(_plasma_metadata(photo["path"]))
    return [best[n] for n in sorted(best, key=str.lower)]


def _photo_name(package: str, rel: Path) -> str:
    parts = rel.parts
    if package == "plasma-workspace-wallpapers" and "wallpapers" in parts:
        i = parts.index("wallpapers")
        if "screenshot" not in rel.name and len(parts) > i + 3 and parts[i + 2] == "contents":
            return parts[i + 1]
        return ""
    return rel.stem


def _plasma_metadata(path: Path) -> dict:
    """Author and licence from the wallpaper's metadata.json (KDE's per-wallpaper record)."""
    for parent in path.parents:
        meta = parent / "metadata.json"
        if meta.is_file():
            plugin = json.loads(meta.read_text()).get("KPlugin", {})
            authors = ", ".join(a.get("Name", "") for a in plugin.get("Authors", []))
            return {"author": authors, "licence": plugin.get("License", "")}
    return {}


def package_licence(copyright_file: Path) -> str:
    """The License of the `Files: *` stanza of a DEP-5 copyright file ('' when not found)."""
    return file_metadata(copyright_file, "*").get("licence", "")


def file_metadata(copyright_file: Path, name: str) -> dict:
    """Author (the Copyright field) and licence of the DEP-5 stanza whose Files list holds
    `name` (a file name, or "*"); {} when no stanza does."""
    for stanza in re.split(r"\n\s*\n", copyright_file.read_text()):
        fields = dict(re.findall(r"^(Files|Copyright|License):[ \t]*(.*)$", stanza, flags=re.M))
        patterns = fields.get("Files", "").split()
        if name in (patterns if name == "*" else [Path(f).name for f in patterns]):
            return {"author": fields.get("Copyright", "").strip(),
                    "licence": fields.get("License", "").strip()}
    return {}


def resize_short(img: Image.Image, short: int) -> Image.Image:
    w, h = img.size
    scale = short / min(w, h)
    if scale >= 1:
        return img
    return img.resize((round(w * scale), round(h * scale)), Image.BICUBIC, reducing_gap=3.0)


def tiles(img: Image.Image, size: int):
    """Non-overlapping size x size tiles on a centred grid: ((row, col), tile)."""
    w, h = img.size
    rows, cols = h // size, w // size
    top, left = (h - rows * size) // 2, (w - cols * size) // 2
    for r in range(rows):
        for c in range(cols):
            x, y = left + c * size, top + r * size
            yield (r, c), img.crop((x, y, x + size, y + size))


def build(out: Path, workdir: Path, short_side: int = 512, val_tile: int = 128,
          quality: int = 92) -> list[dict]:
    """Write OUT (see the module docstring); returns the manifest rows."""
    versions = download(PACKAGES, workdir)
    rows = []
    (out / "licences").mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        tree = workdir / package
        copyright_file = tree / "usr" / "share" / "doc" / package / "copyright"
        shutil.copyfile(copyright_file, out / "licences" / f"{package}.copyright")
        default_licence = package_licence(copyright_file)
        photos = find_photos(package, tree)
        for photo in photos:
            if not photo.get("licence"):
                photo.update(file_metadata(copyright_file, photo["path"].name))
            img = Image.open(photo["path"]).convert("RGB")
            if min(img.size) < MIN_SHORT_SIDE:
                print(f"skipped {photo['path'].name}: short side {min(img.size)} < "
                      f"{MIN_SHORT_SIDE}", file=sys.stderr)
                continue
            img = resize_short(img, short_side)
            split = "val" if photo["name"] in VAL else "train"
            items = ([(f"{photo['name']}_r{r}c{c}", t) for (r, c), t in tiles(img, val_tile)]
                     if split == "val" else [(photo["name"], img)])
            for stem, image in items:
                rel = Path(split) / package / f"{stem}.jpg"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                image.save(out / rel, quality=quality)
                rows.append({
                    "split": split, "file": rel.as_posix(), "package": package,
                    "version": versions[package],
                    "source": "/" + photo["path"].relative_to(tree).as_posix(),
                    "author": photo.get("author", ""),
                    "licence": photo.get("licence") or default_licence,
                    "copyright_file": f"licences/{package}.copyright"})
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wetok.wallpapers", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (data.root of scale=short)")
    parser.add_argument("--short-side", type=int, default=512, help="resize so min(w, h) <= this")
    parser.add_argument("--val-tile", type=int, default=128, help="val tile size (pixels)")
    parser.add_argument("--quality", type=int, default=92, help="JPEG quality")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} exists and is not empty", file=sys.stderr)
        return 2
    if args.val_tile > args.short_side:
        print("error: --val-tile must be <= --short-side", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = build(args.out, Path(tmp), args.short_side, args.val_tile, args.quality)
    size = sum((args.out / r["file"]).stat().st_size for r in rows)
    photos = {(r["package"], r["source"]) for r in rows}
    by_split = {s: sum(r["split"] == s for r in rows) for s in ("train", "val")}
    print(f"{len(photos)} photos -> {by_split['train']} train files, {by_split['val']} val tiles, "
          f"{size / 2**20:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
