"""wetok/wallpapers.py on a fake unpacked package (no apt, no network)."""
from __future__ import annotations

import json

from PIL import Image

from wetok import wallpapers as wp

PKG = "plasma-workspace-wallpapers"


def _wallpaper(root, name, sizes, licence="LGPLv3"):
    folder = root / "usr/share/wallpapers" / name
    (folder / "contents/images").mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps(
        {"KPlugin": {"Authors": [{"Name": "A. Photographer"}], "License": licence}}))
    for w, h in sizes:
        Image.new("RGB", (w, h), (w % 256, 0, 0)).save(folder / f"contents/images/{w}x{h}.jpg")
    Image.new("RGB", (40, 30)).save(folder / "contents/screenshot.jpg")
    return folder


def test_find_photos_keeps_the_largest_file_of_listed_photos(tmp_path):
    _wallpaper(tmp_path, "Path", [(800, 500), (1600, 1000)])
    _wallpaper(tmp_path, "Volna", [(900, 600)], licence="CC-BY-SA-4.0")
    _wallpaper(tmp_path, "Flow", [(900, 600)])              # a render: not in PHOTOS
    link = tmp_path / "usr/share/wallpapers/Path/contents/images/3200x2000.jpg"
    link.symlink_to("1600x1000.jpg")                        # resolutions are symlinks
    photos = wp.find_photos(PKG, tmp_path)
    assert [p["name"] for p in photos] == ["Path", "Volna"]
    assert photos[0]["path"].name == "1600x1000.jpg"
    assert photos[1]["licence"] == "CC-BY-SA-4.0" and photos[1]["author"] == "A. Photographer"
    assert wp.find_photos("sway-backgrounds", tmp_path) == []


def test_package_licence_reads_the_files_star_stanza(tmp_path):
    f = tmp_path / "copyright"
    f.write_text("Format: x\n\nFiles: debian/*\nLicense: MIT\n\nFiles: *\nCopyright: 2014 KDE\n"
                 "License: GPL-2+\n")
    assert wp.package_licence(f) == "GPL-2+"
    f.write_text("no stanza\n")
    assert wp.package_licence(f) == ""


def test_resize_and_tiles():
    img = wp.resize_short(Image.new("RGB", (2560, 1600)), 512)
    assert img.size == (819, 512)
    assert wp.resize_short(Image.new("RGB", (300, 200)), 512).size == (300, 200)  # no upscaling
    cut = list(wp.tiles(img, 128))
    assert len(cut) == 4 * 6 and {t.size for _, t in cut} == {(128, 128)}
    assert cut[-1][0] == (3, 5)


def test_val_photos_are_listed_photos():
    listed = {name: package for package, names in wp.PHOTOS.items() for name in names}
    assert set(wp.VAL) < set(listed) and set(wp.PHOTOS) <= set(wp.PACKAGES)
    held_out = [listed[name] for name in wp.VAL]
    assert held_out.count(PKG) == 3 and len(held_out) - held_out.count(PKG) == 3
    assert "mate-backgrounds" not in wp.PACKAGES


def test_lomiri_photos_take_author_and_licence_from_their_own_stanza(tmp_path):
    lomiri = "lomiri-wallpapers-16.04"
    folder = tmp_path / "usr/share/backgrounds"
    folder.mkdir(parents=True)
    for name in ("Bridge_by_Sander_Klootwijk", "umang_by_Abhishek_Mudgal"):  # a photo, a render
        Image.new("RGB", (900, 600)).save(folder / f"{name}.jpg")
    assert [p["name"] for p in wp.find_photos(lomiri, tmp_path)] == ["Bridge_by_Sander_Klootwijk"]
    f = tmp_path / "copyright"
    f.write_text("Format: x\n\nFiles: *\nCopyright: 2020 UBports\nLicense: GPL-3\n\n"
                 "Files: 16.04/aitzgorri_by_Aitzol_Berasategi.jpg\nCopyright: Aitzol Berasategi, 2018\n"
                 "License: CC-BY-4.0\n\nFiles: 16.04/Bridge_by_Sander_Klootwijk.jpg\n"
                 "Copyright: 2018. Sander Klootwijk\nLicense: CC-BY-SA-4.0\n")
    assert wp.file_metadata(f, "Bridge_by_Sander_Klootwijk.jpg") == {
        "author": "2018. Sander Klootwijk", "licence": "CC-BY-SA-4.0"}
    assert wp.file_metadata(f, "Dragonfly_by_Bolly.jpg") == {}
    assert wp.package_licence(f) == "GPL-3"
